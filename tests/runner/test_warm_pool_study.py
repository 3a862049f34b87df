"""A SageMaker study through the state machine, its calls judged against the stack's IAM: the
runner task's study gives its trials' warm pool back when it ends, and Conclude ends the pool of
the trial a runner that kept dying left. SageMaker's side is tests/sagemaker/test_warm_pool.py's
`WarmPools` (moto has no warm pools and no UpdateTrainingJob); MLflow, GitHub's API, S3 and SNS
are the stage tests' real parts and moto."""

from __future__ import annotations

import pytest

from mmp import aws
from mmp.backends.sagemaker import SageMakerBackend
from mmp.pipeline import aws_stages

from ..infra.pipeline_stack import experiment, head, job
from ..sagemaker.conftest import SM
from ..sagemaker.test_warm_pool import WarmPools

STUDY_PATH = ["Prepare", "NeedsRunner?", "RunnerImage", "Promote?", "Accepted?", "BuildImage", "Train where?",
              "RunStudy", "Conclude", "Succeeded?"]
TUNING = {"Objective_Metric": "score", "Direction": "maximize", "Strategy": "grid", "Parallel": 1,
          "Ranges": {"batch-size": {"Values": [16, 32]}}}


@pytest.fixture
def sagemaker_study(stack, make_repo, monkeypatch):
    monkeypatch.setenv("MMP_STUDY_POLL_SECONDS", "0.2")

    def push(plan):
        client = aws.client("sagemaker")
        pools = WarmPools(client, SM, plan)
        aws_stages._BACKENDS["sagemaker"] = SageMakerBackend(sagemaker_client=client, poll_seconds=0.05)
        repo = make_repo(experiment=experiment(Tuning=TUNING))
        sha = head(repo)
        stack.serve(repo, sha)
        return pools, job(repo, sha)

    return push


def test_the_runner_tasks_study_gives_its_warm_pool_back(stack, sagemaker_study, monkeypatch, iam_enforced):
    pools, start = sagemaker_study(lambda job: "complete")
    end, state = stack.execution(monkeypatch).run(start)
    assert end == "Succeed", state.get("outcome")
    first, second = pools.order
    assert [keep for keep in (pools.jobs[n]["body"]["ResourceConfig"]["KeepAlivePeriodInSeconds"]
                              for n in pools.order)] == [600, 600]
    assert pools.jobs[first]["reused_by"] == second and pools.updates == [second] and pools.warm_left() == []
    updates = [c for c in iam_enforced.calls() if c.operation == "sagemaker.UpdateTrainingJob"]
    assert [(c.code_path, c.role, c.allowed) for c in updates] == [
        ("runner task: study", "pipeline-runner-task", True)]


def test_conclude_ends_the_pool_of_the_trial_a_dying_runner_left(stack, sagemaker_study, monkeypatch, iam_enforced):
    """Each runner attempt dies while its trial runs. A resuming attempt stops the interrupted trial
    and keeps its pool for the replacement (which takes it); after the last retry Conclude stops the
    trial progress.json names and ends its pool: nothing stays warm."""
    from mmp.tuning.study import StudyRunner

    original = StudyRunner._record_handles

    def dies_once_recorded(self):
        original(self)
        if self._recorded:
            raise RuntimeError("the runner task's container died")

    monkeypatch.setattr(StudyRunner, "_record_handles", dies_once_recorded)
    pools, start = sagemaker_study(lambda job: "hold")
    end, state = stack.execution(monkeypatch).run(start)
    assert end == "Fail" and "study did not complete" in state["outcome"]["message"]
    assert len(pools.order) == 3  # one trial per attempt
    assert [pools.jobs[n]["reused_by"] for n in pools.order] == [pools.order[1], pools.order[2], None]
    assert {pools.jobs[n]["status"] for n in pools.order} == {"Stopped"}
    assert pools.updates == [pools.order[-1]] and pools.warm_left() == []
    updates = [c for c in iam_enforced.calls() if c.operation == "sagemaker.UpdateTrainingJob"]
    assert [(c.code_path, c.role, c.allowed) for c in updates] == [("Conclude", "pipeline-stages", True)]
