"""Bad input is a clear error before any API call: nothing reaches AWS, no MLflow run."""

from __future__ import annotations

import pytest

from mmp import aws
from mmp.backends.sagemaker import SageMakerBackend, SageMakerFsxBackend


@pytest.fixture
def watched(aws_env):
    """Clients that record every API call they would make (there must be none)."""
    calls: list[str] = []
    clients = {}
    for service in ("sagemaker", "logs"):
        client = aws.client(service)
        client.meta.events.register("before-call", lambda model, **_: calls.append(model.name))
        clients[service] = client
    return clients, calls


def run_rejected(sm, repo, backend):
    from mlflow.tracking import MlflowClient

    from mmp import config

    outcome, _ = sm.run_pipeline(repo, backend)
    assert outcome.state == "INVALID", outcome.message
    assert outcome.run_id is None
    assert MlflowClient(config.tracking_uri()).get_experiment_by_name("fashion-demo") is None
    return outcome


@pytest.mark.parametrize("overrides, env, words", [
    ({"Training_Instance": "p3.8xlarge"}, {},
     ["Training_Instance: 'p3.8xlarge' is not a SageMaker instance type", "ml.*"]),
    ({"Training_Instance": "local"}, {}, ["Training_Instance: 'local'"]),
    ({"Instance_Count": "5"}, {"MMP_SAGEMAKER_MAX_INSTANCES": "4"},
     ["Instance_Count: 5 is above this stack's quota of 4", "MMP_SAGEMAKER_MAX_INSTANCES"]),
    ({"Use_Spot": True}, {}, ["Use_Spot:", "checkpoint location", "MMP_CHECKPOINT_S3_URI"]),
    ({"Use_Spot": True}, {"MMP_CHECKPOINT_S3_URI": "/local/ckpt"}, ["MMP_CHECKPOINT_S3_URI must be an s3:// URI"]),
    ({}, {"MMP_SAGEMAKER_INPUT_MODE": "Pipe"}, ["MMP_SAGEMAKER_INPUT_MODE: 'Pipe'", "File or FastFile"]),
    ({}, {"MMP_SUBNET_IDS": "subnet-1"}, ["MMP_SUBNET_IDS and MMP_SECURITY_GROUP_IDS must be set together"]),
    ({}, {"MMP_SAGEMAKER_ROLE_ARN": ""}, ["MMP_SAGEMAKER_ROLE_ARN is not set"]),
    ({}, {"MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS": "7200"},
     ["MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS: a warm pool's keep-alive must be 0 (off) to 3600 seconds, got 7200"]),
    ({}, {"MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS": "-60"},
     ["MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS: a warm pool's keep-alive must be 0 (off) to 3600 seconds, got -60"]),
])
def test_sagemaker_refuses_before_any_api_call(stack_env, watched, sm_repo, sm, overrides, env, words):
    for key, value in env.items():
        stack_env.setenv(key, value)
    clients, calls = watched
    backend = SageMakerBackend(sagemaker_client=clients["sagemaker"], logs_client=clients["logs"])
    outcome = run_rejected(sm, sm_repo(**overrides), backend)
    for word in words:
        assert word in outcome.message
    assert calls == []


def test_dataset_without_s3_location(stack_env, watched, make_repo, sm, mmp_home):
    from mmp.contract.datasets import add_dataset

    add_dataset("only-local", local=str(mmp_home))
    clients, calls = watched
    repo = make_repo(experiment={**sm.SM_EXPERIMENT, "Dataset_Name": "only-local"})
    outcome = run_rejected(sm, repo, SageMakerBackend(sagemaker_client=clients["sagemaker"]))
    assert "Dataset_Name: 'only-local' has no S3 location" in outcome.message
    assert "--s3 s3://" in outcome.message
    assert calls == []


@pytest.mark.parametrize("env, dataset, words", [
    ({"MMP_FSX_FILE_SYSTEM_ID": "fs-1", "MMP_FSX_MOUNT_NAME": "m", "MMP_SUBNET_IDS": "s", "MMP_SECURITY_GROUP_IDS": "g"},
     {"s3": "s3://b/p/"}, ["Dataset_Name: 'fx' has no FSx path", "--fsx /datasets/fx"]),
    ({"MMP_SUBNET_IDS": "s", "MMP_SECURITY_GROUP_IDS": "g"}, {"fsx": "/datasets/fx"},
     ["this stack has no FSx for Lustre file system", "MMP_FSX_FILE_SYSTEM_ID"]),
    ({"MMP_FSX_FILE_SYSTEM_ID": "fs-1", "MMP_FSX_MOUNT_NAME": "m"}, {"fsx": "/datasets/fx"},
     ["sagemaker-fsx needs the VPC", "MMP_SUBNET_IDS"]),
])
def test_sagemaker_fsx_refuses_before_any_api_call(stack_env, watched, make_repo, sm, env, dataset, words):
    from mmp.contract.datasets import add_dataset

    for key, value in env.items():
        stack_env.setenv(key, value)
    add_dataset("fx", **dataset)
    clients, calls = watched
    repo = make_repo(experiment={**sm.SM_EXPERIMENT, "Platform": "sagemaker-fsx", "Dataset_Name": "fx"})
    outcome = run_rejected(sm, repo, SageMakerFsxBackend(sagemaker_client=clients["sagemaker"]))
    for word in words:
        assert word in outcome.message
    assert calls == []


def test_every_problem_is_reported_at_once(stack_env, sm):
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    stack_env.setenv("MMP_SAGEMAKER_MAX_INSTANCES", "2")
    experiment = parse_experiment({**sm.SM_EXPERIMENT, "Training_Instance": "p3.2xlarge", "Instance_Count": "3",
                                   "Use_Spot": True})
    problems = SageMakerBackend().check(experiment, Dataset(name="x"))
    assert [p.split(":")[0] for p in problems] == ["Training_Instance", "Instance_Count", "Dataset_Name", "Use_Spot"]


def test_a_good_request_has_no_problems(stack_env, sm, sm_dataset):
    from mmp.contract.experiment import parse_experiment

    assert SageMakerBackend().check(parse_experiment(sm.SM_EXPERIMENT), sm_dataset) == []


def test_bad_numbers_in_the_stack_configuration_name_the_variable(stack_env):
    from mmp.backends import BackendError

    stack_env.setenv("MMP_SAGEMAKER_VOLUME_GB", "lots")
    with pytest.raises(BackendError, match="MMP_SAGEMAKER_VOLUME_GB must be a whole number, got 'lots'"):
        SageMakerBackend()
    stack_env.setenv("MMP_SAGEMAKER_VOLUME_GB", "50")
    stack_env.setenv("MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", "10m")
    with pytest.raises(BackendError, match="MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS must be a whole number, got '10m'"):
        SageMakerBackend()
