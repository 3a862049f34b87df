"""The worker under faults: killed right after MLflow's create_run, an MLflow store made
read-only or deleted mid-run, and `mmp cancel` of a run whose job already ended.

Every test drives a real worker process (`python -m mmp.pipeline.worker`), real
horovodrun and a real SQLite MLflow store; faults are real too (SIGKILL, the file made
immutable with chattr as root or read-only with chmod otherwise, the file deleted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmp.pipeline.reporting import LocalStatusReporter
from mmp.pipeline.store import RunStore
from mmp.pipeline.job import Job

QUICK_TRAIN = "print('quick run', flush=True)\n"
GATED_TRAIN = """
import pathlib, time
pathlib.Path({started!r}).touch()
deadline = time.time() + 300
while not pathlib.Path({gate!r}).exists() and time.time() < deadline:
    time.sleep(0.05)
print('trained past the gate', flush=True)
"""
pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def job(n: int, after: str, clone_url: str) -> Job:
    return Job(repository="demo", clone_url=clone_url, before="0" * 40, after=after, ref="refs/heads/main",
               delivery_id=f"delivery-{n}", trigger_files=["experiment.json"])


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def wait_for(condition, what: str, timeout: float = 240.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}) while waiting for {what}: "
                        + (log.read_text(errors="replace")[-3000:] if log else ""))
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (": " + log.read_text(errors="replace")[-3000:] if log else ""))


@pytest.fixture
def store_dir(mmp_home, empty_mlflow_db, monkeypatch) -> Path:
    """The MLflow store in a folder of its own (so it can be made read-only alone), as the tracking URI."""
    folder = mmp_home / "mlflow-store"
    folder.mkdir()
    shutil.copy(empty_mlflow_db, folder / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    return folder


@contextmanager
def read_only(path: Path):
    """Make an SQLite file unwritable for this process's children: chattr +i as root, chmod otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)
        path.parent.chmod(0o555)  # no journal either: pooled read-write connections fail too
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.parent.chmod(0o755)
            path.chmod(0o644)


def mlflow_runs(delivery_id: str):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from mmp import config
    from mmp.tracking.client import fresh_store

    fresh_store(config.tracking_uri())  # this process must not read a deleted store's file either
    client = MlflowClient(tracking_uri=config.tracking_uri())
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, f"tags.`mmp.delivery_id` = '{delivery_id}'", run_view_type=ViewType.ALL)


def notification_for(mmp_home: Path, key: str) -> dict | None:
    path = mmp_home / "notifications" / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_worker_killed_between_create_run_and_the_record_is_reconciled(queue, make_repo, digits, mmp_home,
                                                                       store_dir, start_worker):
    """Issue 11.4: the MLflow run made just before a SIGKILL is ended FAILED by the next worker."""
    repo = make_repo(files={"train.py": QUICK_TRAIN})
    sha = git(repo, "rev-parse", "HEAD")
    queue.submit(job(1, sha, str(repo)), "b1")

    crashed = start_worker("--once", MMP_CRASH_AT="after-create-run")
    assert crashed.wait(timeout=240) == -signal.SIGKILL, start_worker.log.read_text()
    (orphan,) = mlflow_runs("delivery-1")
    assert orphan.info.status == "RUNNING"  # what the crash left: MLflow knows the run, nothing else does
    assert RunStore().list() == [] and queue.get("delivery-1").state == "running"

    recovery = start_worker("--once")
    assert recovery.wait(timeout=240) == 0, start_worker.log.read_text()
    (ended,) = mlflow_runs("delivery-1")
    assert ended.info.status == "FAILED"
    assert "interrupted" in ended.data.tags["mmp.outcome"] and "never recorded" in ended.data.tags["mmp.outcome"]
    assert queue.get("delivery-1").state == "failed"
    assert LocalStatusReporter().history("demo", sha)[-1]["state"] == "error"
    note = notification_for(mmp_home, "delivery-1")
    assert note is not None and note["state"] == "INTERRUPTED" and orphan.info.run_id in note["run_ids"]


def test_a_read_only_then_deleted_store_never_wedges_the_worker(queue, make_repo, digits, mmp_home, store_dir,
                                                                start_worker, tmp_path):
    """Issue 11.5: status and notification whatever MLflow does; the run is ended once the store is back."""
    from mlflow.tracking import MlflowClient

    from mmp import config

    started, gate = tmp_path / "started", tmp_path / "gate"
    repo = make_repo(files={"train.py": GATED_TRAIN.format(started=str(started), gate=str(gate))})
    sha = git(repo, "rev-parse", "HEAD")
    db = store_dir / "mlflow.db"
    worker = start_worker("--poll", "0.2", "--reconcile", "0.3")
    queue.submit(job(1, sha, str(repo)), "b1")
    wait_for(started.exists, "train.py to start", proc=worker, log=start_worker.log)
    (record,) = RunStore().list()

    with read_only(db):
        gate.touch()
        wait_for(lambda: queue.get("delivery-1").state in ("done", "failed"), "job 1 to end", proc=worker,
                 log=start_worker.log)
        # training succeeded; MLflow refused the final write, and the commit and the team still hear of it
        assert RunStore().get(record.run_id).state == "SUCCEEDED"
        assert LocalStatusReporter().history("demo", sha)[-1]["state"] == "success"
        note = notification_for(mmp_home, record.run_id)
        assert note["state"] == "SUCCEEDED" and "MLflow not updated" in note["problems"][0]
        # `mmp cancel` says what is true instead of "cancel sent"
        from mmp.cli import app

        cancel = CliRunner().invoke(app, ["cancel", record.run_id])
        assert cancel.exit_code == 1 and "already SUCCEEDED" in cancel.output, cancel.output
        # a job that starts while the store is read-only still ends with a status and a notification
        queue.submit(job(2, sha, str(repo)), "b2")
        wait_for(lambda: queue.get("delivery-2").state == "failed", "job 2 to fail", proc=worker,
                 log=start_worker.log)
        assert notification_for(mmp_home, "delivery-2")["state"] == "ERROR"

    # the store is writable again: the idle worker ends the run it could not end, without a restart
    client = MlflowClient(tracking_uri=config.tracking_uri())
    wait_for(lambda: client.get_run(record.run_id).info.status == "FINISHED", "the run to be ended",
             proc=worker, log=start_worker.log)
    assert client.get_run(record.run_id).data.tags["mmp.outcome"] == "train.py exited 0"

    # the store is deleted: the next job recreates it and trains as usual
    for leftover in store_dir.glob("mlflow.db*"):
        leftover.unlink()
    started.unlink()
    queue.submit(job(3, sha, str(repo)), "b3")
    wait_for(lambda: queue.get("delivery-3").state in ("done", "failed"), "job 3 to end", proc=worker,
             log=start_worker.log)
    job3 = queue.get("delivery-3")
    assert job3.state == "done", job3.message
    (run3,) = mlflow_runs("delivery-3")
    assert run3.info.status == "FINISHED" and db.exists()
    assert LocalStatusReporter().history("demo", sha)[-1]["state"] == "success"
    assert notification_for(mmp_home, run3.info.run_id)["state"] == "SUCCEEDED"
    assert worker.poll() is None  # the same worker, never restarted
