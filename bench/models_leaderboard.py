"""Benchmark: `mmp compare` on 1,000 runs (target ≤ 0.5 s for the leaderboard data).

Makes 1,000 finished runs in a fresh SQLite MLflow store (tags like the pipeline's,
3 hyperparameters of which 2 vary, 4 metrics, through log_batch), then times
`mmp.models.compare.leaderboard` with a cold client (first call, engine made) and
warm (median of 5), the rich table rendering, and the search without the GC pause.

    .venv/bin/python bench/models_leaderboard.py [--runs 1000]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 0.5


def make_runs(uri: str, n: int, artifacts: str) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("bench", artifact_location=artifacts)
    rng = random.Random(0)
    for i in range(n):
        start = int(time.time() * 1000) - rng.randint(60_000, 3_600_000)
        run = client.create_run(exp_id, start_time=start, tags={
            "mlflow.source.git.commit": f"{rng.getrandbits(160):040x}", "mmp.platform": "sagemaker",
            "mmp.instance_type": rng.choice(["ml.p3.2xlarge", "ml.p3.16xlarge"]), "mmp.instance_count": "2"})
        acc = rng.random()
        client.log_batch(run.info.run_id, metrics=[
            Metric("val_accuracy", acc, start, 1), Metric("val_loss", 1 - acc, start, 1),
            Metric("train_loss", rng.random(), start, 1), Metric("epoch_seconds", rng.random() * 60, start, 1)],
            params=[Param("epochs", str(rng.choice([5, 10, 20]))), Param("lr", str(rng.choice([0.1, 0.01, 0.001]))),
                    Param("batch-size", "32")])
        client.set_terminated(run.info.run_id, end_time=start + rng.randint(60_000, 600_000))
    return exp_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from mmp.models import compare

    folder = Path(tempfile.mkdtemp(prefix="mmp-bench-leaderboard-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    artifacts = tempfile.mkdtemp(prefix="mmp-bench-art-")
    make_runs(uri, args.runs, artifacts)
    print(f"setup: {args.runs} runs made in {time.perf_counter() - started:.1f} s ({uri})")

    client = MlflowClient(tracking_uri=uri)
    t0 = time.perf_counter()
    board = compare.leaderboard("bench", "val_accuracy", client=client)
    cold = time.perf_counter() - t0
    assert len(board.rows) == args.runs and board.varied_params == ["epochs", "lr"], board.varied_params
    values = [r.metrics["val_accuracy"] for r in board.rows]
    assert values == sorted(values, reverse=True)

    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        compare.leaderboard("bench", ["val_accuracy", "val_loss"], client=client)
        warm.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    Console(file=io.StringIO(), width=200).print(compare.table(board, max_rows=50))
    render = time.perf_counter() - t0

    def no_pause():
        import contextlib

        from mmp.models import search

        saved = search.gc_paused
        search.gc_paused = contextlib.nullcontext
        try:
            t = time.perf_counter()
            compare.leaderboard("bench", "val_accuracy", client=client)
            return time.perf_counter() - t
        finally:
            search.gc_paused = saved

    unpaused = statistics.median(no_pause() for _ in range(3))
    median = statistics.median(warm)
    print(f"leaderboard of {args.runs} runs (search_runs order_by + pages, rows, varied params):")
    print(f"  cold (first leaderboard call): {cold:.3f} s")
    print(f"  warm median of 5:              {median:.3f} s   (min {min(warm):.3f}, max {max(warm):.3f})")
    print(f"  warm without the GC pause:     {unpaused:.3f} s   (median of 3)")
    print(f"  rich table render, 50 rows:    {render:.3f} s   (what `mmp compare` prints by default)")
    print(f"target ≤ {TARGET_S} s (warm): {'MET' if median <= TARGET_S else 'MISSED'}")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(artifacts, ignore_errors=True)


if __name__ == "__main__":
    main()
