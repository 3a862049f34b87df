"""`mmp run` against a real MLflow tracking server, through the light REST tracker.

With `mmp up` running (its stack.json present), `mmp run` uses the stack's MLflow
server instead of loading MLflow itself; training gets the server's URI, and
secrets in the caller's environment never reach train.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.backends import JobState
from mmp.tracking.rest import MlflowRestError, RestRunTracker

from ..conftest import mlflow_server as start_mlflow_server

ENV_TRAIN = """
import json, os, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
json.dump(dict(os.environ), open(os.path.join(out, "env.json"), "w"))
print("env written", flush=True)
"""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def test_rest_tracker_owns_a_run_like_the_client_does(mlflow_server):
    tracker = RestRunTracker(mlflow_server)
    run_id = tracker.start("rest-exp", run_name="r1", tags={"mmp.platform": "local"}, params={"epochs": 3, "lr": 0.1})
    assert tracker.run_url(run_id).endswith(f"/runs/{run_id}")
    tracker.log_metrics(run_id, {"billable_seconds": 42})
    assert tracker.finish(run_id, JobState.FAILED, message="boom", log_text="line 1\nline 2") == "FAILED"
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"epochs": "3", "lr": "0.1"}
    assert run.data.tags["mmp.outcome"] == "boom" and run.data.tags["mlflow.runName"] == "r1"
    assert run.data.metrics["billable_seconds"] == 42
    tail = MlflowClient(mlflow_server).download_artifacts(run_id, "logs/log-tail.txt")
    assert open(tail).read() == "line 1\nline 2"
    # the same experiment is found, not made twice
    assert RestRunTracker(mlflow_server).experiment_id("rest-exp") == tracker.experiment_id("rest-exp")


def test_rest_errors_name_the_call_and_never_the_password(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    with pytest.raises(MlflowRestError) as info:
        RestRunTracker(mlflow_server, retries=0).get_run("no-such-run")
    assert "runs/get" in str(info.value) and "s3cret-pw" not in str(info.value)


def test_mmp_run_uses_the_local_stacks_server_and_keeps_secrets_from_training(
        mlflow_server, make_repo, digits):
    from mmp.system.procs import start_time

    config.local_stack_file().write_text(json.dumps({"pid": os.getpid(), "started": start_time(os.getpid()),
                                                     "mlflow_url": mlflow_server}))
    repo = make_repo(experiment={"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local"},
                     files={"train.py": ENV_TRAIN})
    env = {**os.environ, "GITHUB_TOKEN": "ghp_secret_token", "MMP_WEBHOOK_SECRET": "hook-secret"}
    proc = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["state"] == "SUCCEEDED"
    assert MlflowClient(mlflow_server).get_run(outcome["run_id"]).info.status == "FINISHED"
    assert not (config.home_path() / "mlflow.db").exists(), "the sqlite store must not be used"
    seen = json.loads(next(config.runs_root().glob("*/*/output/env.json")).read_text())
    assert seen["MLFLOW_TRACKING_URI"] == mlflow_server and seen["MLFLOW_RUN_ID"] == outcome["run_id"]
    assert "GITHUB_TOKEN" not in seen and "MMP_WEBHOOK_SECRET" not in seen
    assert outcome["run_id"] and json.loads(proc.stdout)["run_url"].endswith(outcome["run_id"])


def test_rest_tracker_records_and_enforces_the_owner_and_finds_open_runs(mlflow_server):
    from mmp.tracking.ownership import OwnershipError

    tracker = RestRunTracker(mlflow_server)
    run_id = tracker.start("owned-exp", run_name="r1", tags={"mmp.delivery_id": "d-rest",
                                                              "mlflow.source.name": "acme/a"}, params={},
                           owner="acme/a")
    assert MlflowClient(mlflow_server).get_experiment_by_name("owned-exp").tags["mmp.owner"] == "acme/a"
    assert tracker.ownership_problem("owned-exp", "acme/a") is None
    assert "belongs to repository 'acme/a', not 'evil/b'" in tracker.ownership_problem("owned-exp", "evil/b")
    with pytest.raises(OwnershipError):
        RestRunTracker(mlflow_server).start("owned-exp", run_name="r2", tags={}, params={}, owner="evil/b")
    assert (run_id, "d-rest") in tracker.open_runs("mmp.delivery_id")
    tracker.finish(run_id, JobState.FAILED, message="ended")
    assert run_id not in [r for r, _ in tracker.open_runs("mmp.delivery_id")]
    # an experiment made before ownership is claimed by the repository whose runs it holds
    legacy = MlflowClient(mlflow_server).create_experiment("legacy-exp")
    MlflowClient(mlflow_server).create_run(legacy, tags={"mlflow.source.name": "acme/a"})
    assert "cannot claim it" in tracker.ownership_problem("legacy-exp", "evil/b")
    tracker.start("legacy-exp", run_name="r3", tags={}, params={}, owner="acme/a")
    assert MlflowClient(mlflow_server).get_experiment(legacy).tags["mmp.owner"] == "acme/a"
