"""SageMaker test fixtures: moto in server mode (one per session, reset per test), the
stack's MMP_* configuration, a repository whose experiment names platform sagemaker
and a catalogue dataset with an S3 location, and a helper running the real Pipeline."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import pytest

from ..conftest import ACCOUNT, REGION

ECR = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/mmp-training"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/mmp-sagemaker-execution"
BUCKET = "mmp-artifacts-test"
DATASET_S3 = "s3://mmp-datasets-test/fashion/"
SM_EXPERIMENT = {
    "Platform": "sagemaker",
    "Dataset_Name": "fashion-s3",
    "Training_Instance": "ml.p3.16xlarge",
    "Instance_Count": "2",
    "Max_Runtime": "120",
    "Hyperparameters": "{'epochs': '40', 'batch-size': '32'}",
}
STACK_ENV = {
    "MMP_ECR_REPOSITORY_URI": ECR,
    "MMP_SAGEMAKER_ROLE_ARN": ROLE,
    "MMP_ARTIFACTS_BUCKET": BUCKET,
}


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """One migrated MLflow SQLite database; creating the tables costs seconds per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _fresh_mlflow_db(mmp_home, _mlflow_template):
    """Each test still gets its own database (a copy), where config.tracking_uri() looks."""
    shutil.copy(_mlflow_template, mmp_home / "mlflow.db")


@pytest.fixture
def stack_env(monkeypatch):
    """The configuration the Pulumi stack gives the pipeline (MMP_* variables)."""
    for var in ("MMP_SAGEMAKER_INPUT_MODE", "MMP_SAGEMAKER_VOLUME_GB", "MMP_SUBNET_IDS", "MMP_SECURITY_GROUP_IDS",
                "MMP_FSX_FILE_SYSTEM_ID", "MMP_FSX_MOUNT_NAME", "MMP_SAGEMAKER_MAX_INSTANCES", "MMP_JOB_NAME_PREFIX",
                "MMP_CHECKPOINT_S3_URI", "MMP_MLFLOW_PASSWORD_SECRET_ARN", "MMP_MLFLOW_USERNAME",
                "MMP_SAGEMAKER_POLL_SECONDS", "MMP_SAGEMAKER_SPOT_EXTRA_WAIT_MINUTES",
                "MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", "MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS"):
        monkeypatch.delenv(var, raising=False)
    for key, value in STACK_ENV.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


@pytest.fixture
def sm_dataset(mmp_home):
    from mmp.contract.datasets import add_dataset

    return add_dataset("fashion-s3", s3=DATASET_S3, fsx="/datasets/fashion-s3")


@pytest.fixture
def sm_repo(make_repo, sm_dataset):
    def _make(**overrides):
        experiment = {**SM_EXPERIMENT, **overrides}
        return make_repo(experiment={k: v for k, v in experiment.items() if v is not None})

    return _make


def trigger_for(repo, delivery_id: str | None = "72d3162e-cc78-11e3-81ab-4c9367dc0958"):
    from mmp.hosts.localgit import resolve
    from mmp.pipeline.sources import LocalGitSource, Trigger

    sha = resolve(repo)
    return Trigger(repository="acme/fashion-demo", clone_url=str(repo), commit=sha,
                   source=LocalGitSource(repo, sha), delivery_id=delivery_id, ref="refs/heads/main")


def run_pipeline(repo, backend, *, delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958", **kwargs):
    """The real Pipeline with a real MLflow (SQLite) tracker, on this backend."""
    from mmp.pipeline.runner import Pipeline
    from mmp.tracking.client import RunTracker

    tracker = RunTracker()
    pipeline = Pipeline(tracker=tracker, backend_factory=lambda platform: backend, **kwargs)
    outcome = pipeline.run(trigger_for(repo, delivery_id))
    return outcome, tracker


def describe_response(name: str, status: str, secondary: str, **extra) -> dict:
    """A DescribeTrainingJob response with every member the model requires."""
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    response = {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/x/{name}/output/model.tar.gz"},
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingImage": f"{ECR}:abc", "TrainingInputMode": "File"},
        "ResourceConfig": {"InstanceType": "ml.p3.16xlarge", "InstanceCount": 2, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
        "CreationTime": now,
        "SecondaryStatusTransitions": [{"Status": secondary, "StartTime": now,
                                        "StatusMessage": f"{secondary} (test)"}],
    }
    response.update(extra)
    return response


class SM:
    """Constants and helpers for the tests (conftest modules cannot be imported by name)."""

    ACCOUNT, REGION, ECR, ROLE, BUCKET, DATASET_S3 = ACCOUNT, REGION, ECR, ROLE, BUCKET, DATASET_S3
    SM_EXPERIMENT, STACK_ENV = SM_EXPERIMENT, STACK_ENV
    trigger_for = staticmethod(trigger_for)
    run_pipeline = staticmethod(run_pipeline)
    describe_response = staticmethod(describe_response)


@pytest.fixture
def sm():
    return SM
