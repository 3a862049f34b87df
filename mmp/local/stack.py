"""`mmp up`: the embedded local stack — webhook server, pipeline worker and MLflow UI.

The webhook server runs in this process (threads); the worker and `mlflow server`
run as child processes in their own sessions, so a Ctrl-C reaches only this
supervisor, which then stops them in order: the server first (no new jobs), then
the worker with SIGTERM (it cancels the job in flight, marks the MLflow run KILLED
and exits; a study's trials are stopped and the study resumes with the next worker), then MLflow; whatever ignores SIGTERM gets SIGKILL. A worker that dies
is restarted, and on start it fails the job it was running (see mmp.pipeline.worker).
An empty MLflow store gets its schema before either child starts (mmp.tracking.store).

One stack per MMP_HOME: `stack.lock` is flocked for the stack's life (the kernel
releases it on any death), so a second `mmp up` is refused at once, naming the first.
Each child runs under `mmp.system.childguard`, so it dies with this process even on
`kill -9`; and should anything survive anyway, `stack.json` records each child's pid
and start time, and the next `mmp up` stops what matches both (never a reused pid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from mmp import config
from mmp.system import procs
from mmp.system.filelock import hold, holder, is_held
from mmp.system.childguard import guarded_argv
from mmp.system.interrupts import STOPPING_SIGNALS
from mmp.system.procs import stop_process
from mmp.tracking.server import MLFLOW_GRACE_S, mlflow_server_argv

log = logging.getLogger("mmp.local.stack")

STOP_GRACE_S = 20.0
STACK_ID_ENV = "MMP_STACK_ID"  # inherited by everything the stack starts: finds leftovers after a crash


class StackRunning(RuntimeError):
    """Another `mmp up` holds this MMP_HOME (or its worker lock); the message names it."""


def running_stack_description(home: Path) -> str:
    """`pid N, webhook URL, MLflow URL, up since T` from the running stack's stack.json (or its lock file)."""
    try:
        info = json.loads(config.local_stack_file().read_text())
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        try:
            info = json.loads(holder(home / "stack.lock") or "{}")
        except ValueError:
            info = {}
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("webhook_url"):
        parts.append(f"webhook {info['webhook_url']}")
    if info.get("mlflow_url"):
        parts.append(f"MLflow {info['mlflow_url']}")
    if info.get("started"):
        parts.append("up since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])))
    return ", ".join(parts)


def _same_process(record: Any) -> psutil.Process | None:
    """The process a stack.json record names, only if its pid AND start time still match (no reused pid)."""
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) \
            or not isinstance(record.get("started"), (int, float)):
        return None
    return procs.find_process(record["pid"], record["started"])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _stop_orphan(proc: psutil.Process, grace: float) -> None:
    """Stop a child (guard) of a dead stack: SIGTERM to it (its guard stops the group), SIGKILL to the group
    if it outlives the guard's own grace period. Identity was checked by the caller, and is again before SIGKILL."""
    try:
        started = proc.create_time()
    except psutil.Error:
        return
    if not procs.signal_process(proc, signal.SIGTERM) or procs.wait_gone(proc, grace + 5):
        return
    if procs.find_process(proc.pid, started) is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            procs.signal_process(proc, signal.SIGKILL)


def _stop_stack_leftovers(stack_id: Any, started: Any) -> list[str]:
    """Kill processes still carrying a dead stack's id in their environment (started after it: not reused)."""
    if not isinstance(stack_id, str) or not stack_id or not isinstance(started, (int, float)):
        return []
    found = procs.processes_with_env(STACK_ID_ENV, stack_id, started_after=started)
    for proc in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    gone, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [f"{p.info['name']} (pid {p.pid})" for p in found]


class LocalStack:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, mlflow_port: int = 5000, *, ui: bool = True,
                 worker: bool = True, say: Callable[[str], None] = print):
        self.host, self.port, self.mlflow_port = host, port, mlflow_port
        self.ui, self.run_worker, self.say = ui, worker, say
        self.server = None
        self.worker_proc: subprocess.Popen | None = None
        self.mlflow_proc: subprocess.Popen | None = None
        self.id = uuid.uuid4().hex
        self.started = procs.start_time(os.getpid()) or time.time()
        self._mlflow_url: str | None = None
        self._lock_fh = None
        self._restarts: list[float] = []
        self._stop = threading.Event()

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    # -- one stack per MMP_HOME ----------------------------------------------------------
    def _claim_home(self) -> None:
        """Hold stack.lock for this stack's life, or refuse at once, naming the stack that holds it."""
        home = config.mmp_home()
        fh = hold(home / "stack.lock", json.dumps({"pid": os.getpid(), "started": self.started}))
        if fh is None:
            raise StackRunning(f"another `mmp up` is running on MMP_HOME={home} ({running_stack_description(home)}); "
                               "stop it first (Ctrl-C in its terminal, or kill its pid)")
        self._lock_fh = fh

    def _release_home(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # the kernel drops the flock; the file stays (deleting lock files races)
            self._lock_fh = None

    def _clean_up_after_dead_stack(self) -> None:
        """Stop what an `mmp up` that died (kill -9, OOM) left running, after checking each is really its."""
        path = config.local_stack_file()
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(old, dict):
            old = {}
        if _same_process(old) is not None:  # alive without the lock: an mmp from before stack.lock existed
            raise StackRunning(f"another `mmp up` is running on MMP_HOME={config.mmp_home()} "
                               f"({running_stack_description(config.mmp_home())}); stop it first")
        stopped = []
        children = old.get("children")
        for role, record in (children.items() if isinstance(children, dict) else ()):
            proc = _same_process(record)
            if proc is None:
                continue
            self.say(f"stopping the {role} left by an `mmp up` that died (pid {old.get('pid')}): pid {proc.pid}")
            _stop_orphan(proc, float(record.get("grace") or STOP_GRACE_S))
            stopped.append(f"{role} (pid {proc.pid})")
        stopped += _stop_stack_leftovers(old.get("stack_id"), old.get("started"))
        if stopped:
            self.say(f"cleaned up after the `mmp up` that died (pid {old.get('pid')}): stopped {', '.join(stopped)}")
        path.unlink(missing_ok=True)

    def _check_worker_lock(self) -> None:
        """A worker this stack did not start (e.g. `mmp worker`) holding the queue: say so now, not after 5 crashes."""
        path = config.mmp_home() / "worker.lock"
        if is_held(path):
            raise StackRunning(f"another worker ({holder(path) or '?'}) holds {path}; stop it first "
                               "(one worker per MMP_HOME)")

    # -- children ------------------------------------------------------------------------
    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MMP_WEBHOOK_SECRET"}
        env["MMP_HOME"] = str(config.mmp_home())
        env[STACK_ID_ENV] = self.id
        if self.ui and "MMP_MLFLOW_UI_URL" not in env:
            env["MMP_MLFLOW_UI_URL"] = self.ui_url
        return env

    def _log_file(self, name: str):
        folder = config.mmp_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"{name}.log", "ab")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], grace: float) -> subprocess.Popen:
        """`argv` under mmp.system.childguard, in its own session: it dies with this process, even on kill -9."""
        guarded = guarded_argv(os.getpid(), grace, argv)
        with self._log_file(name) as out:
            return subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _prepare_store(self) -> None:
        """Make an empty local MLflow store's schema here, once, before the UI server and the worker open it:
        both migrating it at once killed the UI, failed the first job, or left the store half-migrated."""
        from mmp.tracking import store as mlflow_store

        try:
            if mlflow_store.prepare(config.tracking_uri(), config.artifact_root()):
                self.say(f"MLflow: created the store at {mlflow_store.sqlite_path(config.tracking_uri())}")
        except Exception as exc:  # the worker reports it on each job (and retries); the UI logs it
            self.say(f"MLflow: could not prepare the store ({type(exc).__name__}: {exc})")

    def start_worker(self) -> None:
        self.worker_proc = self._spawn("worker", [sys.executable, "-m", "mmp.pipeline.worker"], self._child_env(),
                                       STOP_GRACE_S)
        self._publish()

    def start(self) -> "LocalStack":
        from mmp.webhook.server import local_server

        self._claim_home()
        try:
            self._clean_up_after_dead_stack()
            if self.run_worker:
                self._check_worker_lock()
            self._prepare_store()  # before /healthz answers: once it does, the worker and the UI are starting
            self.server = local_server(self.host, self.port).start()
        except BaseException:
            self._release_home()
            raise
        self.port = self.server.port
        self._publish()
        if self.run_worker:
            self.start_worker()
        if self.ui:
            argv = mlflow_server_argv(self.host, self.mlflow_port)
            if argv is None:
                self.say(f"MLflow: using the tracking server at {config.tracking_uri()} (no local UI started)")
                self.ui = False
            elif _port_in_use(self.host, self.mlflow_port):
                self.say(f"MLflow UI not started: {self.host}:{self.mlflow_port} is in use by another program "
                         "(choose another with --mlflow-port)")
                self.ui = False
            else:
                env = self._child_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
                self.mlflow_proc = self._spawn("mlflow", argv, env, MLFLOW_GRACE_S)
                self._publish()
        return self

    def _publish(self, mlflow_url: str | None = None) -> None:
        """stack.json: how `mmp run` finds this stack (and its MLflow server, once it answers), and what
        the next `mmp up` must stop should this one die without cleaning up (pid + start time of each child)."""
        if mlflow_url is not None:
            self._mlflow_url = mlflow_url
        children = {}
        for role, proc, grace in (("worker", self.worker_proc, STOP_GRACE_S),
                                  ("mlflow", self.mlflow_proc, MLFLOW_GRACE_S)):
            started = procs.start_time(proc.pid) if proc is not None and proc.poll() is None else None
            if started is not None:
                children[role] = {"pid": proc.pid, "started": started, "grace": grace}
        path = config.local_stack_file()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({
            "pid": os.getpid(), "started": self.started, "stack_id": self.id,
            "webhook_url": f"http://{self.host}:{self.port}/webhook", "mlflow_url": self._mlflow_url,
            "children": children}))
        tmp.replace(path)  # readers never see half a file

    def wait_for_ui(self, timeout: float = 90.0) -> bool:
        """Wait until our MLflow server answers /health; then `mmp run` may track through it."""
        deadline = time.time() + timeout
        while (time.time() < deadline and not self.stopping and self.mlflow_proc is not None
               and self.mlflow_proc.poll() is None):
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
            self._publish()

    def stop(self) -> None:
        self._stop.set()
        try:
            if self.server is not None:
                self.server.stop()
                self.server = None
            stop_process(self.worker_proc, "worker")
            stop_process(self.mlflow_proc, "mlflow server", grace=MLFLOW_GRACE_S)
            if self._lock_fh is not None:
                config.local_stack_file().unlink(missing_ok=True)
        finally:
            self._release_home()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @contextlib.contextmanager
    def stopping_on_signals(self) -> Iterator[LocalStack]:
        """SIGINT/SIGTERM ask the stack to stop (`serve` then stops everything). Taken before `start`
        by `mmp up`: a signal while its children start or its UI comes up stops it as cleanly as one
        while it serves, instead of the default action killing it with its stack.json left behind."""
        old = {sig: signal.signal(sig, self.request_stop) for sig in STOPPING_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM (or one already asked for), then stop everything."""
        with self.stopping_on_signals():
            try:
                while not self._stop.wait(1.0):
                    self.check_children()
            finally:
                self.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
