"""`mmp up`: the embedded local stack — webhook server, pipeline worker and MLflow UI.

The webhook server runs in this process (threads); the worker and `mlflow server`
run as child processes in their own sessions, so a Ctrl-C reaches only this
supervisor, which then stops them in order: the server first (no new jobs), then
the worker with SIGTERM (it cancels the job in flight, marks the MLflow run KILLED
and exits), then MLflow; whatever ignores SIGTERM gets SIGKILL. A worker that dies
is restarted, and on start it fails the job it was running (see mmp.pipeline.worker).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

from . import config

log = logging.getLogger("mmp.localstack")

STOP_GRACE_S = 20.0


def mlflow_server_argv(host: str, port: int) -> list[str] | None:
    """`mlflow server` on the same SQLite store the pipeline writes; None for a remote store."""
    uri = config.tracking_uri()
    if not uri.startswith("sqlite:"):
        return None
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", uri, "--default-artifact-root", config.artifact_root(), "--no-serve-artifacts"]


def _stop_process(proc: subprocess.Popen | None, name: str, grace: float = STOP_GRACE_S) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0fs; killing it", name, grace)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group, or itself
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class LocalStack:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, mlflow_port: int = 5000, *, ui: bool = True,
                 worker: bool = True, say: Callable[[str], None] = print):
        self.host, self.port, self.mlflow_port = host, port, mlflow_port
        self.ui, self.run_worker, self.say = ui, worker, say
        self.server = None
        self.worker_proc: subprocess.Popen | None = None
        self.mlflow_proc: subprocess.Popen | None = None
        self._restarts: list[float] = []
        self._stop = threading.Event()

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MMP_WEBHOOK_SECRET"}
        env["MMP_HOME"] = str(config.mmp_home())
        if self.ui and "MMP_MLFLOW_UI_URL" not in env:
            env["MMP_MLFLOW_UI_URL"] = self.ui_url
        return env

    def _log_file(self, name: str):
        folder = config.mmp_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"{name}.log", "ab")

    def start_worker(self) -> None:
        with self._log_file("worker") as out:
            self.worker_proc = subprocess.Popen([sys.executable, "-m", "mmp.pipeline.worker"], env=self._child_env(),
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start(self) -> "LocalStack":
        from .webhook.server import local_server

        self.server = local_server(self.host, self.port).start()
        self.port = self.server.port
        if self.run_worker:
            self.start_worker()
        if self.ui:
            argv = mlflow_server_argv(self.host, self.mlflow_port)
            if argv is None:
                self.say(f"MLflow: using the tracking server at {config.tracking_uri()} (no local UI started)")
                self.ui = False
            else:
                env = self._child_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
                with self._log_file("mlflow") as out:
                    self.mlflow_proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._publish(mlflow_url=None)
        return self

    def _publish(self, mlflow_url: str | None) -> None:
        """stack.json: how `mmp run` finds this stack (and its MLflow server, once it answers)."""
        config.local_stack_file().write_text(json.dumps({
            "pid": os.getpid(), "webhook_url": f"http://{self.host}:{self.port}/webhook", "mlflow_url": mlflow_url}))

    def wait_for_ui(self, timeout: float = 90.0) -> bool:
        """Wait until the MLflow server answers /health; then `mmp run` may track through it."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.mlflow_proc is not None and self.mlflow_proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.ui_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._publish(mlflow_url=self.ui_url)
                        return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    def check_children(self) -> None:
        """Restart a worker that died (at most 5 times a minute)."""
        if self.run_worker and self.worker_proc is not None and self.worker_proc.poll() is not None \
                and not self._stop.is_set():
            now = time.time()
            self._restarts = [t for t in self._restarts if now - t < 60]
            if len(self._restarts) >= 5:
                self.say("worker keeps dying; see $MMP_HOME/logs/worker.log")
                self._stop.set()
                return
            self._restarts.append(now)
            self.say(f"worker exited with {self.worker_proc.returncode}; restarting it")
            self.start_worker()
        if self.mlflow_proc is not None and self.mlflow_proc.poll() is not None and not self._stop.is_set():
            self.say(f"MLflow UI exited with {self.mlflow_proc.returncode}; see $MMP_HOME/logs/mlflow.log")
            self.mlflow_proc = None

    def stop(self) -> None:
        self._stop.set()
        config.local_stack_file().unlink(missing_ok=True)
        if self.server is not None:
            self.server.stop()
            self.server = None
        _stop_process(self.worker_proc, "worker")
        _stop_process(self.mlflow_proc, "mlflow server", grace=10)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM, then stop everything."""
        old = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop.wait(1.0):
                self.check_children()
        finally:
            self.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
