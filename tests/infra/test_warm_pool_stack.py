"""The stack's side of SageMaker warm pools: the two keep-alive settings reach the backend through
the environment it renders (validated before any resource exists), and UpdateTrainingJob, which
ends a pool, is granted to exactly the roles whose code calls it: the runner task (a study's end)
and the stage Lambdas (Conclude ending a dead study's trials), on the stack's jobs only."""

from __future__ import annotations

import json

import pytest

REGION = "eu-west-1"


def _policies(run) -> dict[str, dict]:
    return {p.name: json.loads(p.inputs["policy"].replace(f"arn:aws:iam:{REGION}:", "arn:aws:iam::"))
            for p in run.of_type("aws:iam/rolePolicy:RolePolicy")}


def test_the_keep_alive_settings_reach_the_backend(dev, h, monkeypatch):
    from mmp.backends import LaunchRequest
    from mmp.backends.sagemaker import SageMakerBackend
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    env = dev.exports["backendEnv"]
    assert env["MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS"] == "600" and env["MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS"] == "0"
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:sagemakerCommitKeepAliveSeconds": "900",
                              "mmp:sagemakerTrialKeepAliveSeconds": "300"})
    for key, value in run.exports["backendEnv"].items():
        monkeypatch.setenv(key, value)
    entry = json.loads(run.exports["backendEnv"]["MMP_DATASETS"])["digits"]
    experiment = parse_experiment({"Platform": "sagemaker", "Dataset_Name": "digits",
                                   "Training_Instance": "ml.g5.xlarge", "Instance_Count": "1"})
    request = LaunchRequest(experiment=experiment, experiment_name="e", run_id="r1", repository="a/b", clone_url="",
                            commit="c" * 40, mlflow_env={}, dataset=Dataset(name="digits", **entry))
    backend = SageMakerBackend()
    assert backend.check(experiment, request.dataset) == []
    assert backend.training_job_request(request)["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 900
    trial = LaunchRequest(**{**request.__dict__, "study": "mmp-d1"})
    assert backend.training_job_request(trial)["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 300


@pytest.mark.parametrize("key, value, words", [
    ("sagemakerTrialKeepAliveSeconds", "7200", "less than or equal to 3600"),
    ("sagemakerCommitKeepAliveSeconds", "-1", "greater than or equal to 0")])
def test_a_keep_alive_outside_sagemakers_range_fails_naming_the_key(h, key, value, words):
    with pytest.raises(Exception) as info:
        h.run_stack("dev", {**h.DEV_CONFIG, f"mmp:{key}": value})
    assert f"mmp:{key}: Input should be {words}" in str(info.value)


def test_update_training_job_is_granted_to_exactly_the_roles_that_call_it(dev):
    policies = _policies(dev)
    granted = {name: [s for s in doc["Statement"] if "sagemaker:UpdateTrainingJob" in s["Action"]]
               for name, doc in policies.items()}
    holders = sorted(name for name, statements in granted.items() if statements)
    assert holders == ["pipeline-runner-task", "pipeline-stages"], holders
    for name in holders:
        (statement,) = granted[name]
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        assert [r.rsplit(":", 1)[1] for r in statement["Resource"]] == ["training-job/mmp-acme-ml-dev*"], statement
