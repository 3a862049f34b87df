"""Serve a registered model locally with MLflow's pyfunc scoring server.

`mmp serve MODEL[@ALIAS]` runs `mlflow models serve --env-manager local` (the
model runs in this Python environment, nothing is installed) on 127.0.0.1. The
server runs in its own process group so stopping it stops its uvicorn workers too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from mmp import config
from mmp.system.childguard import PR_SET_PDEATHSIG, prctl
from mmp.models.promote import DEFAULT_ALIAS

DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL: `mmp serve` is gone within seconds whatever the load
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, `kill`, a closed terminal


class ServeError(RuntimeError):
    """The model could not be served (bad reference, server died, no answer in time)."""


class Stopped(BaseException):
    """A stop signal arrived (BaseException: no `except Exception` on the way may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """In the scoring server: unblock the stop signals (the mask is inherited) and, on Linux,
    get SIGTERM when the process that started it dies, even by SIGKILL."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def model_uri(ref: str) -> str:
    """`name@alias`, `name/3` or `name` (meaning @production) as a `models:/` URI.

    Only the registry (`models:/…`) and a run's artifacts (`runs:/RUN_ID/PATH`) are
    served: any other URI or a path (`file:///etc`, `s3://…`, `/tmp/x`) would make
    MLflow copy whatever it names, so it is refused here, before anything starts.
    """
    ref = ref.strip()
    if not ref:
        raise ServeError("MODEL is empty; give NAME, NAME@ALIAS or NAME/VERSION")
    if ref.startswith(("models:/", "runs:/")):
        scheme, _, rest = ref.partition(":/")
        parts = rest.strip("/").split("/")
        if not rest.strip("/") or any(p in ("", ".", "..") for p in parts) or (scheme == "runs" and len(parts) < 2):
            raise ServeError(f"{ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
        return ref
    if ":" in ref or ref.startswith(("/", ".", "~")) or "\\" in ref:
        raise ServeError(f"{ref!r}: mmp serve serves registered models (NAME, NAME@ALIAS, NAME/VERSION, "
                         "models:/…) and run artifacts (runs:/RUN_ID/PATH) only, not other URIs or paths")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if not name or not alias:
            raise ServeError(f"{ref!r}: expected NAME@ALIAS")
        return f"models:/{name}@{alias}"
    name, _, version = ref.rpartition("/")
    if name and version.isdigit():
        return f"models:/{name}/{version}"
    return f"models:/{ref}@{DEFAULT_ALIAS}"


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_argv(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. A zombie does not count: a member that
    outlived its parent waits for init to reap it, which under load takes seconds."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or a reused id we do not own
        return False
    if not os.path.isdir("/proc/self"):  # pragma: no cover - not Linux: no cheaper way to tell
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                state, _ppid, pgrp = fh.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


class ModelServer:
    """One `mlflow models serve` process: start, wait until it answers, predict, stop."""

    def __init__(self, ref: str, *, host: str = DEFAULT_HOST, port: int | None = None,
                 tracking_uri: str | None = None, log_path: str | None = None):
        self.uri = model_uri(ref)
        self.host = host
        self.port = port or free_port(host)
        self.tracking_uri = tracking_uri or config.tracking_uri()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT_S) -> "ModelServer":
        self._check_model()
        # MLflow execs `uvicorn` by name: put this interpreter's bin folder (the venv's) first.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "PATH": path}
        self._log = open(self.log_path, "ab") if self.log_path else None
        out = self._log if self._log else subprocess.DEVNULL if wait else None
        # A stop signal between fork and `self.proc = …` would orphan the server: hold them until
        # the handle is kept (a signal that came meanwhile is delivered right after).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(serve_argv(self.uri, self.host, self.port), env=env, stdout=out,
                                         stderr=subprocess.STDOUT if out is not None else None,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if wait:
            self.wait_ready(timeout)
        return self

    def _check_model(self) -> None:
        """Fail fast with a clear message when the registry has no such model or alias."""
        if not self.uri.startswith("models:/") or self.uri.startswith("models:/m-"):
            return
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        body = self.uri[len("models:/"):]
        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            if "@" in body:
                name, alias = body.rsplit("@", 1)
                client.get_model_version_by_alias(name, alias)
            else:
                name, version = body.rsplit("/", 1)
                client.get_model_version(name, version)
        except MlflowException as exc:
            raise ServeError(f"{self.uri}: {exc.message}") from None

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll /ping until it answers; on any failure or Ctrl-C the server is stopped, not orphaned."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise ServeError(f"the scoring server for {self.uri} exited with code {self.proc.returncode} "
                                     "before answering" + (f"; see {self.log_path}" if self.log_path else ""))
                if self.ping():
                    return
                time.sleep(0.25)
            raise ServeError(f"the scoring server for {self.uri} did not answer /ping within {timeout:.0f} s")
        except BaseException:
            self.stop()
            raise

    def predict(self, inputs: Any, timeout: float = 60) -> Any:
        """POST {"inputs": ...} to /invocations and return the predictions."""
        if hasattr(inputs, "tolist"):
            inputs = inputs.tolist()
        body = json.dumps({"inputs": inputs}).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServeError(f"/invocations answered {exc.code}: {detail}") from None
        return answer.get("predictions", answer) if isinstance(answer, dict) else answer

    def wait(self) -> int:
        """Block until the server exits (Ctrl-C stops it)."""
        assert self.proc is not None, "start() first"
        try:
            return self.proc.wait()
        except KeyboardInterrupt:
            self.stop(grace=STOP_GRACE_S)
            return 130

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the server's process group, wait until every member is gone, SIGKILL if not."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
                if not _group_alive(proc.pid):
                    break
                try:
                    os.killpg(proc.pid, sig)  # the group start_new_session made: mlflow and its uvicorn
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _group_alive(proc.pid):
                    proc.poll()  # reap the leader so it does not linger as a zombie
                    time.sleep(0.1)
            proc.poll()
        if self._log is not None:
            self._log.close()
            self._log = None

    def serve_until_stopped(self, on_ready=None) -> int:
        """Start, wait until it answers, call `on_ready`, run until the server exits or a stop
        signal (SIGINT, SIGTERM, SIGHUP) arrives; always stop the server's whole process group.
        Returns the server's exit code, or 128 + the signal number."""
        def _stop(signum: int, _frame: object) -> None:
            raise Stopped(signum)

        previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
        try:
            self.start(wait=False)
            self.wait_ready()
            if on_ready is not None:
                on_ready()
            return self.proc.wait()
        except Stopped as stop:
            return 128 + stop.signum
        finally:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C waits
            try:
                self.stop(grace=STOP_GRACE_S)
            finally:
                for sig in STOP_SIGNALS:  # stop signals that came during the clean-up are dropped
                    signal.signal(sig, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def __enter__(self) -> "ModelServer":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
