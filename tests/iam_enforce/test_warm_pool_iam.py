"""UpdateTrainingJob (ending a warm pool) as the IAM checker judges it: mapped to its action on the
job's ARN, allowed for the runner task (a study's end) and the stage Lambdas (Conclude), on the
stack's jobs only, and refused to every other role."""

from __future__ import annotations

import iam_calls
from iam_calls import Request, allowed

from ..conftest import ACCOUNT, REGION

JOBS = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/"


def test_update_training_job_maps_to_its_action_on_the_jobs_arn():
    params = {"TrainingJobName": "JOBS-Fashion-abc1234-0a1b2c3d", "ResourceConfig": {"KeepAlivePeriodInSeconds": 0}}
    [request] = iam_calls.requests_for("sagemaker", "UpdateTrainingJob", params, REGION, ACCOUNT)
    assert (request.action, request.resource) == ("sagemaker:UpdateTrainingJob", JOBS + "jobs-fashion-abc1234-0a1b2c3d")


def test_only_the_runner_task_and_the_stages_may_end_a_pool_and_only_on_the_stacks_jobs(iam_policies):
    ours, theirs = Request("sagemaker:UpdateTrainingJob", JOBS + "JOBS-fashion-1"), \
        Request("sagemaker:UpdateTrainingJob", JOBS + "someone-elses-job")
    for role in ("pipeline-runner-task", "pipeline-stages"):
        assert allowed(iam_policies[role], ours), role
        assert not allowed(iam_policies[role], theirs), role
    others = sorted(set(iam_policies) - {"pipeline-runner-task", "pipeline-stages"})
    assert "pipeline-sfn" in others and "pipeline-sagemaker" in others
    assert [role for role in others if allowed(iam_policies[role], ours)] == []
