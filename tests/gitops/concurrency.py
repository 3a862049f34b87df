"""Jobs released together by a barrier: how the webhook's burst tests and bench/webhook_faults.py
send many requests at once. Plain Python (no pytest), so the benchmark imports it too."""

from __future__ import annotations

import threading
import time


def concurrently(jobs: list, timeout: float = 120.0) -> list:
    """Run the callables at once; each one's result, or the exception it raised (a reset or a
    timeout is a result to report, not a crash). Raises TimeoutError if one never finished."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=timeout)
            results[i] = jobs[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"some of {len(jobs)} jobs never finished in {timeout}s")
    return results
