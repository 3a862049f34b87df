"""Model-step fixtures: real runs of the example train.py (trained once per session and
copied into each test's MMP_HOME), synthetic runs made straight through MlflowClient,
and moto in server mode for the SageMaker endpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fashion"
GIT_ENV = {"GIT_AUTHOR_NAME": "MMP Test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "MMP Test", "GIT_COMMITTER_EMAIL": "test@example.com"}
EXPERIMENT = "digits-demo"
# Two real trainings that differ in two hyperparameters (and so in accuracy).
REAL_RUNS = ({"epochs": "1", "batch-size": "16", "lr": "0.05"}, {"epochs": "1", "batch-size": "64", "lr": "0.01"})


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A session MMP_HOME holding an MLflow DB with two real runs of examples/fashion/train.py."""
    from mmp.contract.datasets import prepare_digits
    from mmp.pipeline.runs import local_trigger, run_trigger

    home = tmp_path_factory.mktemp("trained-home")
    repo = tmp_path_factory.mktemp("trained-repo") / EXPERIMENT
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMP_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MMP_DATASETS"):
            mp.delenv(var, raising=False)
        prepare_digits(home / "datasets" / "digits")
        shutil.copytree(EXAMPLE, repo)
        _git(repo, "init", "-q", "-b", "main")
        outcomes = []
        for hyper in REAL_RUNS:
            experiment = json.loads((EXAMPLE / "experiment.json").read_text())
            experiment["Hyperparameters"] = hyper
            (repo / "experiment.json").write_text(json.dumps(experiment, indent=2))
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", f"train with {hyper}")
            sha = _git(repo, "rev-parse", "HEAD")
            outcome = run_trigger(local_trigger(repo, sha))
            assert outcome.state == "SUCCEEDED", outcome.message
            outcomes.append(outcome)
    return {"home": home, "db": home / "mlflow.db", "run_ids": [o.run_id for o in outcomes], "repo": repo}


@pytest.fixture
def real_runs(trained, mmp_home):
    """This test's MMP_HOME with a private copy of the trained MLflow DB (artifacts are shared, read-only)."""
    shutil.copy(trained["db"], mmp_home / "mlflow.db")
    shutil.copy(trained["home"] / "mmp.db", mmp_home / "mmp.db")  # the pipeline's record of those runs
    return trained


@pytest.fixture
def client(mmp_home, empty_mlflow_db):
    """An MlflowClient on this test's own MLflow DB (a copy of the empty one)."""
    from mlflow.tracking import MlflowClient

    from mmp import config

    if not (mmp_home / "mlflow.db").exists():
        shutil.copy(empty_mlflow_db, mmp_home / "mlflow.db")
    return MlflowClient(tracking_uri=config.tracking_uri())


class Synthetic:
    """Runs made directly through MlflowClient: tags like the pipeline's, any metrics and params, and
    (unless `recorded=False`) a row in the local run store, as the pipeline would have written."""

    def __init__(self, client, experiment: str = "synthetic", artifact_location: str | None = None):
        self.client = client
        self.experiment = experiment
        found = client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifact_location)

    def run(self, *, metrics: dict | None = None, params: dict | None = None, status: str = "FINISHED",
            model: bool = True, commit: str = "a" * 40, platform: str = "sagemaker",
            instance_type: str = "ml.p3.2xlarge", instance_count: int = 2, seconds: float = 0.0,
            recorded: bool = True, tags: dict | None = None) -> str:
        from mlflow.entities import Metric, Param

        tags = {"mlflow.source.git.commit": commit, "mmp.platform": platform,
                "mmp.instance_type": instance_type, "mmp.instance_count": str(instance_count), **(tags or {})}
        start_ms = int(time.time() * 1000)
        run = self.client.create_run(self.experiment_id, tags=tags, start_time=start_ms)
        run_id = run.info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), start_ms, 1) for k, v in (metrics or {}).items()],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])
        if model:
            logged = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=run_id)
            self.client.finalize_logged_model(logged.model_id, "READY")
        if status != "RUNNING":
            self.client.set_terminated(run_id, status=status, end_time=start_ms + int(seconds * 1000))
        if recorded:
            from mmp.pipeline.store import RunStore

            RunStore().add(run_id=run_id, experiment=self.experiment, repository="synthetic", commit_sha=commit,
                           platform=platform, state=status)
        return run_id


@pytest.fixture
def synthetic(client):
    return Synthetic(client)


@pytest.fixture
def aws(aws_env):
    return aws_env
