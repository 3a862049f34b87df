"""The webhook Lambda's GitHub compare call ends inside its budget even when GitHub never
answers, so the handler (not API Gateway's own timeout) tells GitHub to redeliver."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mmp.webhook import aws_lambda


@pytest.fixture
def silent_github(monkeypatch):
    """A server that accepts connections and reads the request, then says nothing, ever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("MMP_GITHUB_API_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_test")
    yield
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_compare_gives_up_within_its_budget(silent_github):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer"):
        aws_lambda.budget_compare("github")("acme/demo", "https://github.com/acme/demo.git", "a" * 40, "b" * 40)
    # Before: 3 tries × 3 s socket timeouts plus back-off, past API Gateway's 9 s.
    assert time.monotonic() - started < aws_lambda.COMPARE_BUDGET_S + 1.5
