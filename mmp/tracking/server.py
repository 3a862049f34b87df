"""The tracking server `mmp run` starts once and then reuses, when no `mmp up` runs.

Why: against the bare SQLite store, `mmp run` must import MLflow's client and open
the store (schema check included) before it can create the run that train.py
continues: about 1.6 s on 2 cores, more than a bare horovodrun takes to start
train.py. Through a tracking server the pipeline uses the stdlib REST tracker and
imports nothing heavy. So the first `mmp run` on the SQLite store trains against the
store directly (which also creates and migrates it, so no server ever races a
migration) and, when it ends, leaves `python -m mmp.tracking.server` behind: it runs
`mlflow server` on the same store and artifact folder (loopback, a free port, under
mmp.system.childguard so it dies with it), and publishes it in `$MMP_HOME/tracking-server.json`
once `/health` answers. Later runs use it while they hold a lease (a file naming their
pid and start time). It stops itself after MMP_TRACKING_SERVER_IDLE seconds
(default 900; 0 turns the whole thing off) with no live lease, as soon as the
database file is replaced or deleted (it would write into the old one), or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from mmp import config
from mmp.system import procs
from mmp.system.procs import stop_process
from mmp.system.filelock import hold, is_held

IDLE_ENV = "MMP_TRACKING_SERVER_IDLE"
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 180.0  # `mlflow server` takes ~7 s to answer on an idle 2-core machine
POLL_S = 1.0
MLFLOW_GRACE_S = 10.0


def mlflow_server_argv(host: str, port: int) -> list[str] | None:
    """`mlflow server` on the same SQLite store the pipeline writes; None for a remote store."""
    uri = config.tracking_uri()
    if not uri.startswith("sqlite:"):
        return None
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", uri, "--default-artifact-root", config.artifact_root(), "--no-serve-artifacts"]


def idle_seconds() -> float:
    """How long the server may sit unused; 0 (or less) means `mmp run` never starts one."""
    raw = os.environ.get(IDLE_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_IDLE_S
    except ValueError:
        raise SystemExit(f"{IDLE_ENV}={raw!r}: expected a number of seconds (0 turns the shared server off)")


def _folder() -> Path:
    """Never created by a lookup: a server whose MMP_HOME was deleted must not make it again."""
    return config.home_path() / "tracking-server"


def _state_file() -> Path:
    return _folder() / "state.json"


def _lock_file() -> Path:
    return _folder() / "lock"


def _leases() -> Path:
    return _folder() / "leases"


def _database_identity(uri: str) -> list[int] | None:
    """(device, inode) of the SQLite file behind `uri`: a replaced or deleted file has another, or none."""
    from mmp.tracking.store import sqlite_path

    path = sqlite_path(uri)
    try:
        st = os.stat(path) if path else None
    except FileNotFoundError:
        return None
    return None if st is None else [st.st_dev, st.st_ino]


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def serving_url() -> str | None:
    """The URL of this MMP_HOME's shared server when it runs on today's database file and answers."""
    try:
        state = json.loads(_state_file().read_text())
        alive = procs.find_process(int(state["pid"]), float(state["started"])) is not None
        url, database, uri = str(state["url"]), state["database"], str(state["tracking_uri"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not alive or uri != config.tracking_uri() or database is None or database != _database_identity(uri):
        return None
    return url if _answers(url, timeout=2.0) else None


@contextlib.contextmanager
def lease() -> Iterator[str | None]:
    """Hold the shared server for this process's run: yields its URL, or None when none serves
    (this run then uses the store directly)."""
    _leases().mkdir(parents=True, exist_ok=True)
    mine = _leases() / str(os.getpid())
    mine.write_text(json.dumps({"pid": os.getpid(), "started": procs.start_time(os.getpid())}))
    try:  # the lease first, then the server: it never stops between the two (see serve)
        yield serving_url()
    finally:
        mine.unlink(missing_ok=True)


def _live_leases() -> int:
    live = 0
    for path in _leases().glob("*"):  # nothing (and no error) once the folder is gone
        try:
            held = json.loads(path.read_text())
            if procs.find_process(int(held["pid"]), float(held["started"])) is not None:
                live += 1
                continue
        except (OSError, ValueError, KeyError, TypeError):
            pass
        path.unlink(missing_ok=True)  # its holder is gone (killed): it holds nothing
    return live


def start_in_background() -> bool:
    """Start the shared server for later runs unless it is off, one runs or starts already, or the
    store is not a SQLite file that exists. Returns whether one was started; it never waits."""
    uri = config.tracking_uri()
    if idle_seconds() <= 0 or _database_identity(uri) is None:
        return False
    _folder().mkdir(parents=True, exist_ok=True)
    if is_held(_lock_file()):  # by a server, for its whole life
        return False
    log_path = config.mmp_home() / "logs" / "tracking-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "mmp.tracking.server"], stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True, env=config.training_environ())
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_state(state: dict) -> None:
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(_state_file())  # readers never see half a file


def serve() -> int:
    """The shared server's life: start, publish, stop when idle, replaced or told to. Exit 0 when
    another one holds the lock (two runs that ended at once)."""
    from mmp.system.childguard import guarded_argv

    uri, idle = config.tracking_uri(), idle_seconds()
    database = _database_identity(uri)
    _folder().mkdir(parents=True, exist_ok=True)
    lock = hold(_lock_file(), f"pid {os.getpid()}")
    if lock is None or idle <= 0 or database is None:
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = mlflow_server_argv("127.0.0.1", port)
    if argv is None:
        return 0
    server = subprocess.Popen(guarded_argv(os.getpid(), MLFLOW_GRACE_S, argv), stdin=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url, timeout=2.0):
            if stop or server.poll() is not None or time.monotonic() > deadline:
                print(f"mlflow server on {uri} did not answer at {url}", flush=True)
                return 1
            time.sleep(0.3)
        state = {"pid": os.getpid(), "started": procs.start_time(os.getpid()), "url": url,
                 "tracking_uri": uri, "database": database}
        _write_state(state)
        print(f"serving {uri} at {url}; stops after {idle:.0f} s without a run", flush=True)
        last_used = time.monotonic()
        while not stop:
            if server.poll() is not None:
                print(f"mlflow server exited {server.returncode}", flush=True)
                break
            if _database_identity(uri) != database:
                print(f"{uri}: the database file was replaced or deleted; stopping", flush=True)
                break
            if _live_leases():
                last_used = time.monotonic()
            elif time.monotonic() - last_used > idle:
                _state_file().unlink(missing_ok=True)  # no new lease finds it from here on
                if not _live_leases():  # one taken between the check and the unlink keeps it serving
                    print(f"idle for {idle:.0f} s; stopping", flush=True)
                    break
                _write_state(state)
                last_used = time.monotonic()
            time.sleep(min(POLL_S, max(idle / 4, 0.1)))
        return 0
    finally:
        _state_file().unlink(missing_ok=True)  # this lock holder wrote it: nobody else's
        stop_process(server, "mlflow server", grace=MLFLOW_GRACE_S)


if __name__ == "__main__":
    sys.exit(serve())
