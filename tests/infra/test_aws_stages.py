"""The state machine's stages, run one by one in the order its definition routes them.

tests/infra/sfn.py walks the definition the Pulumi program deploys; the Lambda stages
are the real handlers against a real MLflow server, GitHub's API (pytest-httpserver)
and moto (server mode) for SNS, SQS, S3, Secrets Manager and SageMaker. What moto
cannot show (a job still running when the wait fails; the execution history Conclude
reads after a timeout) comes from botocore Stubbers with the services' own shapes.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from mmp import aws
from mmp.backends.sagemaker import SageMakerBackend
from mmp.pipeline import aws_stages

from .pipeline_stack import OK_TRAIN, REPO, TOKEN, experiment, head, job, stack, stages_mlflow  # noqa: F401
from .sfn import TaskFailed

SAGEMAKER_PATH = ["Prepare", "NeedsRunner?", "Accepted?", "BuildImage", "Train where?", "Launch", "Launched?", "Train",
                  "Conclude", "Succeeded?"]


def _push(stack, make_repo, files=("experiment.json",), train=OK_TRAIN, **fields):
    repo = make_repo(experiment=experiment(**fields), files={"train.py": train})
    sha = head(repo)
    stack.serve(repo, sha)
    return job(repo, sha, files), sha


def test_a_sagemaker_push_trains_through_the_sync_integration_and_reports_everywhere(stack, make_repo, monkeypatch):
    start, sha = _push(stack, make_repo)
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == SAGEMAKER_PATH + ["Done"]
    # Train handed Step Functions the request the SageMaker backend built, whole, and a bounded wait.
    request = dict(run.calls)["Train"]
    assert request == state["training_request"] and request["TrainingJobName"] == state["handle"]["job_id"]
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 240 * 60}  # the default Max_Runtime
    assert run.timeouts["Train"] == 240 * 60 + 3600  # a backstop past SageMaker's own bound
    job_seen = aws.client("sagemaker").describe_training_job(TrainingJobName=request["TrainingJobName"])
    assert job_seen["AlgorithmSpecification"]["TrainingImage"].endswith(f":{state['image']['tag']}")
    assert state["training"] == {"status": "Completed"}
    (build,) = stack.builds  # the dependency set's image was not in ECR yet: built once, every value resolved
    assert build["ProjectName"] == "mmp-image" and all("Value" in v for v in build["EnvironmentVariablesOverride"])

    assert state["outcome"]["state"] == "SUCCEEDED" and state["succeeded"] is True
    run_id = state["started"]["run_id"]
    assert stack.mlflow_run(run_id)["info"]["status"] == "FINISHED"
    assert [s["state"] for s in stack.statuses] == ["pending", "success"]
    assert stack.statuses[-1]["target_url"] == state["started"]["run_url"]
    mails = stack.messages()
    assert len(mails) == 1 and "SUCCEEDED" in mails[0]["Subject"]
    assert TOKEN not in json.dumps(state) + json.dumps(mails) + json.dumps(stack.statuses)


def _running_job_backend(name: str):
    """A SageMaker backend whose job is still InProgress: Conclude must stop it."""
    from botocore.stub import Stubber

    client = aws.client("sagemaker")
    stubber = Stubber(client)
    running = {"TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:eu-west-1:123456789012:training-job/{name}",
               "TrainingJobStatus": "InProgress", "SecondaryStatus": "Training",
               "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {
                   "InstanceCount": 1, "InstanceType": "ml.m5.xlarge", "VolumeSizeInGB": 50},
               "StoppingCondition": {"MaxRuntimeInSeconds": 86400}, "CreationTime": dt.datetime(2026, 1, 1),
               "ModelArtifacts": {"S3ModelArtifacts": ""}}
    stubber.add_response("describe_training_job", running, {"TrainingJobName": name})
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": name})
    stubber.add_response("describe_training_job", {**running, "TrainingJobStatus": "Stopping"},
                         {"TrainingJobName": name})
    stubber.activate()
    return SageMakerBackend(sagemaker_client=client), stubber


@pytest.mark.parametrize("error", ["States.Timeout", "States.TaskFailed"])
def test_a_wait_that_fails_stops_the_job_and_still_concludes(stack, make_repo, monkeypatch, error):
    """Train's own TimeoutSeconds (or any failure of the wait) is caught into Conclude."""
    start, _ = _push(stack, make_repo)
    stubbed: dict = {}

    def wait_fails(arguments, data):
        backend, stubber = _running_job_backend(arguments["TrainingJobName"])
        aws_stages._BACKENDS["sagemaker"] = backend  # what Conclude will ask
        stubbed["stubber"] = stubber
        raise TaskFailed(error, "the wait for the job ended")

    run = stack.execution(monkeypatch, **{"arn:aws:states:::sagemaker:createTrainingJob.sync": wait_fails})
    end, state = run.run(start)
    assert end == "Fail" and run.path == SAGEMAKER_PATH + ["Failed"]
    stubbed["stubber"].assert_no_pending_responses()  # described, stopped, described again at teardown
    assert state["outcome"]["state"] == "FAILED" and error in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    assert "FAILED" in stack.messages()[0]["Subject"]


def _history(entered: list[tuple[str, dict]], concluded: bool = False) -> dict:
    """GetExecutionHistory, newest first, in the service's own shape."""
    events, when = [], dt.datetime(2026, 1, 1)
    if concluded:
        events.append({"timestamp": when, "type": "TaskStateExited", "id": 99,
                       "stateExitedEventDetails": {"name": "Conclude", "output": "{}"}})
    for number, (name, state) in enumerate(reversed(entered)):
        events.append({"timestamp": when, "type": "TaskStateEntered" if not name.endswith("?") else "ChoiceStateEntered",
                       "id": 50 - number, "previousEventId": 49 - number,
                       "stateEnteredEventDetails": {"name": name, "input": json.dumps(state)}})
    return {"events": events}


def _status_event(status: str, start: dict) -> dict:
    arn = "arn:aws:states:eu-west-1:123456789012:execution:mmp-pipeline:72d3162e"
    return {"version": "0", "source": "aws.states", "detail-type": "Step Functions Execution Status Change",
            "detail": {"executionArn": arn, "status": status, "input": json.dumps(start),
                       "stateMachineArn": "arn:aws:states:eu-west-1:123456789012:stateMachine:mmp-pipeline"}}


def _stub_history(monkeypatch, *histories: dict):
    from botocore.stub import Stubber

    sfn = aws.client("stepfunctions")
    stubber = Stubber(sfn)
    for history in histories:
        stubber.add_response("get_execution_history", history)
    stubber.activate()
    real = aws.client
    monkeypatch.setattr(aws, "client", lambda service, *a, **k: sfn if service == "stepfunctions" else real(service, *a, **k))
    return stubber


@pytest.mark.parametrize("status", ["TIMED_OUT", "ABORTED"])
def test_an_execution_that_ends_without_conclude_is_concluded_by_the_status_rule(stack, make_repo, monkeypatch,
                                                                                 status):
    """The execution's own TimeoutSeconds cannot be caught in ASL: EventBridge hands it to
    Conclude, which rebuilds the last state from the history and stops the job."""
    start, _ = _push(stack, make_repo)
    seen: dict = {}

    class Stopped(Exception):
        pass

    def execution_ends(arguments, data):
        seen["train_input"] = data
        raise Stopped()

    run = stack.execution(monkeypatch, **{"arn:aws:states:::sagemaker:createTrainingJob.sync": execution_ends})
    with pytest.raises(Stopped):
        run.run(start)
    entered = [("Prepare", start), ("Train", seen["train_input"])]
    backend, stubber = _running_job_backend(seen["train_input"]["training_request"]["TrainingJobName"])
    aws_stages._BACKENDS["sagemaker"] = backend
    history = _stub_history(monkeypatch, _history(entered), _history(entered, concluded=True))

    state = aws_stages.conclude(_status_event(status, start))
    stubber.assert_no_pending_responses()
    assert state["outcome"]["state"] == "FAILED" and f"Execution.{status}" in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    assert len(stack.messages()) == 1

    # A run that failed ends the execution FAILED after Conclude: the rule must not conclude twice.
    assert aws_stages.conclude(_status_event("FAILED", start)) == {"concluded": "already"}
    history.assert_no_pending_responses()
    assert len(stack.statuses) == 2 and stack.messages() == []


def test_a_prepare_that_fails_is_caught_and_reported(stack, make_repo, monkeypatch):
    start, sha = _push(stack, make_repo)
    run = stack.execution(monkeypatch)

    def times_out(event):
        raise TimeoutError("Task timed out after 300.00 seconds")

    run.lambdas[next(k for k in run.lambdas if k.endswith("prepare"))] = times_out
    end, state = run.run(start)
    assert end == "Fail" and run.path == ["Prepare", "Conclude", "Succeeded?", "Failed"]
    assert state["outcome"]["state"] == "ERROR" and "Task timed out" in state["outcome"]["message"]
    assert [s["state"] for s in stack.statuses] == ["error"]
    assert "ERROR" in stack.messages()[0]["Subject"]


def test_an_invalid_experiment_is_rejected_before_mlflow_and_reported_once(stack, make_repo, monkeypatch):
    start, _ = _push(stack, make_repo, Instance_Count="two", Colour="red")
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Fail" and run.path == ["Prepare", "NeedsRunner?", "Accepted?", "Conclude", "Succeeded?", "Failed"]
    assert state["outcome"]["state"] == "INVALID" and "started" not in state
    problems = " ".join(state["outcome"]["problems"])
    assert "Instance_Count" in problems and "Colour" in problems
    assert [s["state"] for s in stack.statuses] == ["failure"]  # Conclude adds nothing
    assert len(stack.messages()) == 1


def test_a_failed_image_build_is_reported(stack, make_repo, monkeypatch):
    start, _ = _push(stack, make_repo)

    def build_fails(arguments, data):
        raise TaskFailed("States.TaskFailed", '{"Build": {"BuildStatus": "FAILED"}}')

    run = stack.execution(monkeypatch, **{"arn:aws:states:::codebuild:startBuild.sync": build_fails})
    end, state = run.run(start)
    assert run.path == ["Prepare", "NeedsRunner?", "Accepted?", "BuildImage", "Conclude", "Succeeded?", "Failed"]
    assert state["outcome"]["state"] == "FAILED" and state["outcome"]["message"].startswith("image build failed")
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"


def test_prepare_hands_a_study_to_the_runner_task_without_making_a_run(stack, make_repo):
    """A study is many jobs: Prepare validates it and stages its image; the runner task makes its runs."""
    tuning = {"Objective_Metric": "val_accuracy", "Strategy": "grid", "Ranges": {"lr": {"Values": [0.1, 0.01]}}}
    start, _ = _push(stack, make_repo, Tuning=tuning)
    state = aws_stages.prepare(start)
    assert state["accepted"] is True and state["study"] is True and state["runner"] is True
    assert "started" not in state and state["image"]["code_uri"].startswith("s3://")
    assert state["runner_timeout_seconds"] == 240 * 60 + aws_stages.RUNNER_GRACE_SECONDS
    assert [(s["state"], s["description"]) for s in stack.statuses] == [("pending", "study on sagemaker: starting")]


def test_a_bad_tuning_block_is_refused_by_prepare(stack, make_repo):
    tuning = {"Objective_Metric": "val accuracy!", "Strategy": "grid", "Ranges": {"lr": {"Min": 0.1, "Max": 0.01}}}
    start, _ = _push(stack, make_repo, Tuning=tuning)
    state = aws_stages.prepare(start)
    assert state["accepted"] is False and state["study"] is False and "started" not in state
    assert "Tuning.Objective_Metric" in state["outcome"]["message"] and "Tuning.Ranges.lr" in state["outcome"]["message"]
    assert [s["state"] for s in stack.statuses] == ["failure"]


def test_the_lambda_refuses_a_local_tracking_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    with pytest.raises(RuntimeError, match="http"):
        aws_stages.make_pipeline()
