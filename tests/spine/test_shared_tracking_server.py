"""`mmp run` without `mmp up`: the first run on the SQLite store leaves a real `mlflow server`
serving it (mmp.tracking.server), later runs track through it with the light REST tracker, and
it stops by itself: when idle, when its database file is replaced, on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.system import procs
from mmp.tracking import client as tracking, server as tracking_server
from mmp.system.filelock import try_lock

pytestmark = pytest.mark.horovod

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}
ENV_TRAIN = """
import json, os, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
json.dump(dict(os.environ), open(os.path.join(out, "env.json"), "w"))
"""
START_S = 240  # a real mlflow server on a loaded 2-core machine


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def mmp_run(repo, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "--json"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def seen_env(run_id: str) -> dict:
    return json.loads(next(config.runs_root().glob(f"*/{run_id}/output/env.json")).read_text())


def log_text() -> str:
    path = config.home_path() / "logs" / "tracking-server.log"
    return path.read_text(errors="replace") if path.exists() else ""


def server_lock_free() -> bool:
    """Nobody holds the server's lock: no shared server runs or starts."""
    with open(tracking_server._lock_file(), "a") as fh:
        return try_lock(fh)


def stop_server() -> None:
    """Stop whatever shared server this test started (SIGTERM to its watcher), and wait until it is gone."""
    try:
        state = json.loads(tracking_server._state_file().read_text())
    except FileNotFoundError:
        state = None
    if state:
        procs.signal_process(procs.find_process(state["pid"], state["started"]), signal.SIGTERM)
    wait_for(server_lock_free, 60, "the shared server to stop")


def test_the_first_run_leaves_a_server_the_next_run_tracks_through(make_repo, digits, monkeypatch):
    monkeypatch.setenv(tracking_server.IDLE_ENV, "600")
    repo = make_repo(experiment=LOCAL, files={"train.py": ENV_TRAIN})
    first = mmp_run(repo, GITHUB_TOKEN="ghp_secret_token", MMP_WEBHOOK_SECRET="hook-secret")
    try:
        assert seen_env(first["run_id"])["MLFLOW_TRACKING_URI"] == config.tracking_uri()  # the store itself
        url = wait_for(tracking_server.serving_url, START_S, "the shared server to answer")
        assert url.startswith("http://127.0.0.1:")
        state = json.loads(tracking_server._state_file().read_text())
        watcher = procs.find_process(state["pid"], state["started"])
        for proc in [watcher, *watcher.children(recursive=True)]:  # the watcher, the guard, mlflow server
            assert not {"GITHUB_TOKEN", "MMP_WEBHOOK_SECRET"} & set(proc.environ()), proc.cmdline()
        second = mmp_run(repo)
        assert seen_env(second["run_id"])["MLFLOW_TRACKING_URI"] == url
        assert second["run_url"].startswith(tracking.ui_url()), "links lead where they did without the server"
        store = MlflowClient(config.tracking_uri())  # both runs are in the one SQLite store
        assert [store.get_run(r["run_id"]).info.status for r in (first, second)] == ["FINISHED", "FINISHED"]
        assert store.get_run(second["run_id"]).data.params == store.get_run(first["run_id"]).data.params
        assert list(tracking_server._leases().iterdir()) == [], "a finished run holds no lease"
        assert mmp_run(repo)["state"] == "SUCCEEDED" and tracking_server.serving_url() == url  # reused, not restarted
    finally:
        stop_server()
    assert not tracking_server._answers(url, timeout=2) and not tracking_server._state_file().exists()


def test_the_server_stops_when_its_database_is_replaced(empty_mlflow_db, monkeypatch):
    monkeypatch.setenv(tracking_server.IDLE_ENV, "600")
    database = config.mmp_home() / "mlflow.db"
    shutil.copy(empty_mlflow_db, database)
    try:
        assert tracking_server.start_in_background()
        url = wait_for(tracking_server.serving_url, START_S, "the shared server to answer")
        shutil.copy(empty_mlflow_db, database.with_suffix(".new"))
        os.replace(database.with_suffix(".new"), database)  # a new file: the server would write into the old one
        assert tracking_server.serving_url() is None, "a run must not use it from now on"
        wait_for(server_lock_free, 60, "the server to stop")
    finally:
        stop_server()
    assert "the database file was replaced or deleted" in log_text()
    assert not tracking_server._answers(url, timeout=2)


def test_a_leased_server_outlives_its_idle_time_and_stops_once_released(empty_mlflow_db, monkeypatch):
    monkeypatch.setenv(tracking_server.IDLE_ENV, "1")
    shutil.copy(empty_mlflow_db, config.mmp_home() / "mlflow.db")
    try:
        with tracking_server.lease():  # a long training run holds it
            assert tracking_server.start_in_background()
            wait_for(tracking_server.serving_url, START_S, "the shared server to answer")
            held_until = time.monotonic() + 4  # four idle periods, a dozen of the watcher's checks
            while time.monotonic() < held_until:
                assert tracking_server.serving_url(), "the server stopped under a run that holds it"
        wait_for(lambda: "idle for 1 s; stopping" in log_text(), 60, "the released server to stop")
        wait_for(server_lock_free, 60, "the server to exit")
    finally:
        stop_server()
    url = re.search(r"serving \S+ at (http://\S+);", log_text()).group(1)
    assert not tracking_server._answers(url, timeout=2) and not tracking_server._state_file().exists()
    with tracking_server.lease() as found:
        assert found is None


def test_a_server_whose_home_was_deleted_does_not_make_it_again(tmp_path, monkeypatch):
    gone = tmp_path / "deleted-home"
    monkeypatch.setenv("MMP_HOME", str(gone))
    assert tracking_server._live_leases() == 0 and tracking_server.serving_url() is None
    tracking_server._state_file().unlink(missing_ok=True)  # what a stopping server does last
    assert not gone.exists()


def test_no_server_without_a_sqlite_file_or_when_turned_off(monkeypatch):
    monkeypatch.setenv(tracking_server.IDLE_ENV, "600")
    assert not tracking_server.start_in_background(), "no database yet: the first run creates and migrates it"
    (config.mmp_home() / "mlflow.db").touch()
    monkeypatch.setenv(tracking_server.IDLE_ENV, "0")
    assert not tracking_server.start_in_background()
    monkeypatch.setenv(tracking_server.IDLE_ENV, "soon")
    with pytest.raises(SystemExit, match="MMP_TRACKING_SERVER_IDLE='soon': expected a number of seconds"):
        tracking_server.idle_seconds()
