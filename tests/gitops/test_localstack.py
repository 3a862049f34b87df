"""`mmp up` as users run it: webhook, worker and MLflow UI come up, and SIGTERM/SIGINT leave nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from mmp import config

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_then_stops_cleanly(sig, mmp_home, secret_env, gh):
    port, mlflow_port = free_port(), free_port()
    ui = sig == signal.SIGTERM  # the MLflow UI once (it takes seconds to start on 2 cores)
    argv = [sys.executable, "-m", "mmp", "up", "--port", str(port), "--mlflow-port", str(mlflow_port)]
    if not ui:
        argv.append("--no-ui")
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc, 30)
        body = json.dumps(gh.with_files("push-added-and-modified.json", removed=["experiment.json"])).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=body, headers=gh.headers_for(body))
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 202 and json.loads(resp.read())["status"] == "ignored"
        if ui:
            wait_for(f"http://127.0.0.1:{mlflow_port}/health", proc, 90)
        # stack.json tells `mmp run` where MLflow is, and only once it answers
        expected = f"http://127.0.0.1:{mlflow_port}" if ui else None
        deadline = time.time() + 10
        while json.loads(config.local_stack_file().read_text())["mlflow_url"] != expected:
            assert time.time() < deadline, config.local_stack_file().read_text()
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("mmp.pipeline.worker" in " ".join(c.cmdline()) for c in children)
        assert ui == any("mlflow" in " ".join(c.cmdline()) and "server" in c.cmdline() for c in children)
        time.sleep(0.5)  # let the worker get to its loop
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert not config.local_stack_file().exists()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
