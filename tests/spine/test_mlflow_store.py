"""Issue 20.1: an empty local MLflow store is migrated once, under a lock, before anything else opens it;
a transient store error on a job is retried, not final. Real MLflow, real SQLite, real processes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time

import pytest

from mmp import config
from mmp.tracking import store as mlflow_store
from mmp.local.stack import LocalStack
from mmp.tracking.client import RunTracker

from ..conftest import free_port, run_at_once


def db_path() -> str:
    return mlflow_store.sqlite_path(config.tracking_uri())


def test_up_makes_the_store_before_the_ui_and_the_worker_open_it(mmp_home, monkeypatch):
    """Before: the UI server and the worker each found an empty mlflow.db and migrated it at once."""
    seen: dict[str, bool] = {}
    spawn = LocalStack._spawn

    def spawn_and_look(self, name, argv, env, grace):
        seen[name] = mlflow_store.has_schema(db_path())  # what the child finds when it opens the store
        return spawn(self, name, argv, env, grace)

    monkeypatch.setattr(LocalStack, "_spawn", spawn_and_look)
    monkeypatch.setenv("MMP_WEBHOOK_SECRET", "store-test-secret")
    said: list[str] = []
    stack = LocalStack(port=0, mlflow_port=free_port(), say=said.append)
    try:
        stack.start()
    finally:
        stack.stop()
    assert seen == {"worker": True, "mlflow": True}, said
    assert any("created the store" in line for line in said)


OPEN_AT_ONCE = """
import pathlib, sys, time
from mmp.tracking.client import RunTracker
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
tracker = RunTracker()
print(tracker.start("race-" + sys.argv[2], run_name="r", tags={}, params={"n": sys.argv[2]}))
"""


def test_processes_opening_a_new_store_at_once_all_get_their_run(mmp_home, tmp_path):
    """Two `mmp run`s (or a run and a restarted worker) on a fresh MMP_HOME: each makes its run."""
    results = run_at_once(OPEN_AT_ONCE, 3, tmp_path / "go")
    assert [code for code, _ in results] == [0, 0, 0], results
    tracker = RunTracker()
    for i, (_, out) in enumerate(results):
        assert tracker.client.get_run(out.strip().splitlines()[-1]).data.params == {"n": str(i)}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="needs chattr as root")
def test_a_transient_store_error_is_retried_not_final(mmp_home, empty_mlflow_db, caplog):
    """Before: a job that met a locked or read-only store failed at once, for good."""
    shutil.copy(empty_mlflow_db, mmp_home / "mlflow.db")
    tracker = RunTracker()
    tracker.experiment_id("busy-store")  # the store is open and pooled, as in a worker
    retried = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "retrying" in record.getMessage():
                retried.set()

    watch = Watch()
    logging.getLogger("mmp.tracking.store").addHandler(watch)
    result: dict = {}

    def start():
        try:
            result["run"] = tracker.start("busy-store", run_name="r", tags={}, params={"lr": 0.1})
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            result["error"] = exc

    subprocess.run(["chattr", "+i", str(mmp_home / "mlflow.db")], check=True)
    try:
        thread = threading.Thread(target=start)
        thread.start()
        retried.wait(timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(mmp_home / "mlflow.db")], check=True)
        logging.getLogger("mmp.tracking.store").removeHandler(watch)
    thread.join(timeout=120)
    assert "error" not in result, result
    assert retried.is_set()
    assert tracker.client.get_run(result["run"]).data.params == {"lr": "0.1"}


def test_a_store_error_that_lasts_still_ends_the_call():
    """Retries are bounded: past them the error stands, as it was."""
    tries = []

    def busy(*_):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        tries.append(time.monotonic())
        raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    call = mlflow_store.retrying(busy, "busy", delays=(0.01, 0.01))
    with pytest.raises(Exception, match="database is locked"):
        call()
    assert len(tries) == 3
    not_transient = mlflow_store.retrying(lambda: 1 / 0, "div", delays=(0.01,))
    with pytest.raises(ZeroDivisionError):
        not_transient()
