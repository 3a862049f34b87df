"""Status sequences, StopTrainingJob, throttling and retried launches: botocore Stubber for
what moto cannot do (its jobs are always Completed; it has no StopTrainingJob), each run
through the real Pipeline with a real MLflow (SQLite) run; CloudWatch logs from moto."""

from __future__ import annotations

import json
import time

import pytest

from ..conftest import REGION
from botocore.stub import ANY, Stubber

from mmp import aws
from mmp.backends.base import JobHandle, JobState
from mmp.backends.sagemaker import LOG_GROUP, SageMakerBackend, job_name, job_status


@pytest.fixture
def stubbed(aws_env, stack_env):
    """A SageMaker client whose answers the test scripts; logs go to moto for real."""
    client = aws.client("sagemaker")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def expect_create(stubber, name_holder: dict):
    def _create(name):
        stubber.add_response("create_training_job",
                             {"TrainingJobArn": f"arn:aws:sagemaker:eu-west-1:123456789012:training-job/{name}"},
                             {"TrainingJobName": name, "AlgorithmSpecification": ANY, "RoleArn": ANY,
                              "HyperParameters": ANY, "InputDataConfig": ANY, "OutputDataConfig": ANY,
                              "ResourceConfig": ANY, "StoppingCondition": ANY, "Environment": ANY,
                              "EnableNetworkIsolation": False, "EnableManagedSpotTraining": ANY, "Tags": ANY,
                              **name_holder.get("extra", {})})
    return _create


def put_logs(name: str, *messages: str) -> None:
    logs = aws.client("logs")
    try:
        logs.create_log_group(logGroupName=LOG_GROUP)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    stream = f"{name}/algo-1-1764150000"
    logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream,
                        logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(messages)])


def name_for(repo, sm) -> str:
    trigger = sm.trigger_for(repo)
    return job_name("mmp", "fashion-demo", trigger.commit, trigger.delivery_id)


def artifact_text(tracker, run_id, path) -> str:
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracker.tracking_uri)
    with open(local) as fh:
        return fh.read()


def test_in_progress_to_completed_finishes_the_run_with_spot_figures(stubbed, sm_repo, sm, stack_env):
    stack_env.setenv("MMP_CHECKPOINT_S3_URI", "s3://ckpt-bucket/mmp")
    client, stubber = stubbed
    repo = sm_repo(Use_Spot=True)
    name = name_for(repo, sm)
    put_logs(name, "train.py: 16 rank(s)", "epoch 1/40 val_accuracy=0.81")
    expect_create(stubber, {"extra": {"CheckpointConfig": ANY}})(name)
    for status, secondary in (("InProgress", "Starting"), ("InProgress", "Downloading"),
                              ("InProgress", "Training")):
        stubber.add_response("describe_training_job", sm.describe_response(name, status, secondary),
                             {"TrainingJobName": name})
    stubber.add_response("describe_training_job", sm.describe_response(
        name, "Completed", "Completed", BillableTimeInSeconds=300, TrainingTimeInSeconds=1000,
        EnableManagedSpotTraining=True), {"TrainingJobName": name})

    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "SUCCEEDED", outcome.message
    run = tracker.client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["billable_seconds"] == 300
    assert run.data.metrics["training_seconds"] == 1000
    assert run.data.metrics["spot_savings_percent"] == 70
    assert run.data.tags["mmp.outcome"].startswith("Completed/Completed")
    log = artifact_text(tracker, outcome.run_id, "logs/train.log")
    assert "train.py: 16 rank(s)" in log and "epoch 1/40 val_accuracy=0.81" in log


def test_in_progress_to_failed_fails_the_run_with_the_failure_reason(stubbed, sm_repo, sm):
    client, stubber = stubbed
    repo = sm_repo()
    name = name_for(repo, sm)
    expect_create(stubber, {})(name)
    stubber.add_response("describe_training_job", sm.describe_response(name, "InProgress", "Training"))
    reason = "AlgorithmError: horovodrun exited 1: [1]<stderr>:ValueError: bad shape"
    stubber.add_response("describe_training_job", sm.describe_response(
        name, "Failed", "Failed", FailureReason=reason, BillableTimeInSeconds=42))

    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "FAILED"
    assert reason in outcome.message
    run = tracker.client.get_run(outcome.run_id)
    assert run.info.status == "FAILED"
    assert reason in run.data.tags["mmp.outcome"]
    assert run.data.metrics["billable_seconds"] == 42
    assert "spot_savings_percent" not in run.data.metrics


def test_stopped_by_someone_else_kills_the_run(stubbed, sm_repo, sm):
    client, stubber = stubbed
    repo = sm_repo()
    name = name_for(repo, sm)
    expect_create(stubber, {})(name)
    for status, secondary in (("InProgress", "Training"), ("Stopping", "Stopping"), ("Stopped", "Stopped")):
        stubber.add_response("describe_training_job", sm.describe_response(name, status, secondary))

    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "CANCELLED"
    assert tracker.client.get_run(outcome.run_id).info.status == "KILLED"


def test_interrupting_the_pipeline_stops_the_job_and_kills_the_run(stubbed, sm_repo, sm):
    client, stubber = stubbed
    repo = sm_repo()
    name = name_for(repo, sm)
    put_logs(name, "epoch 1/40 started")
    expect_create(stubber, {})(name)
    stubber.add_response("describe_training_job", sm.describe_response(name, "InProgress", "Training"))
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": name})  # moto lacks it
    # teardown looks once more: the job is Stopping, so it does not stop it twice
    stubber.add_response("describe_training_job", sm.describe_response(name, "Stopping", "Stopping"))
    outcomes = {}

    def press_ctrl_c(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outcomes["run"] = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0),
                                          on_log=press_ctrl_c)
    from mlflow.tracking import MlflowClient

    from mmp import config

    client_ml = MlflowClient(config.tracking_uri())
    runs = client_ml.search_runs([client_ml.get_experiment_by_name("fashion-demo").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_throttled_describe_is_polled_again(stubbed, sm_repo, sm):
    client, stubber = stubbed
    repo = sm_repo()
    name = name_for(repo, sm)
    expect_create(stubber, {})(name)
    stubber.add_response("describe_training_job", sm.describe_response(name, "InProgress", "Training"))
    stubber.add_client_error("describe_training_job", "ThrottlingException", "Rate exceeded", 400)
    stubber.add_client_error("describe_training_job", "ThrottlingException", "Rate exceeded", 400)
    stubber.add_response("describe_training_job", sm.describe_response(name, "Completed", "Completed"))

    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "SUCCEEDED", outcome.message
    assert tracker.client.get_run(outcome.run_id).info.status == "FINISHED"


def test_a_retried_launch_follows_the_existing_job(stubbed, sm_repo, sm):
    """CreateTrainingJob answers ResourceInUse (the first try got through): no second job."""
    client, stubber = stubbed
    repo = sm_repo()
    name = name_for(repo, sm)
    stubber.add_client_error("create_training_job", "ResourceInUse", f"Training job {name} already exists", 400)
    stubber.add_response("describe_training_job", sm.describe_response(name, "InProgress", "Training"),
                         {"TrainingJobName": name})
    stubber.add_response("describe_training_job", sm.describe_response(name, "Completed", "Completed"))
    handles = []

    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0),
                                       on_launch=lambda run_id, handle: handles.append(handle))

    assert outcome.state == "SUCCEEDED"
    assert handles[0].job_id == name and handles[0].data["attached"] is True
    assert handles[0].data["arn"].endswith(f"training-job/{name}")
    json.dumps(handles[0].to_dict())  # a handle another process can follow


def test_other_create_errors_fail_the_run_without_retrying(stubbed, sm_repo, sm):
    client, stubber = stubbed
    repo = sm_repo()
    stubber.add_client_error("create_training_job", "ResourceLimitExceeded",
                             "The account-level service limit 'ml.p3.16xlarge for training job usage' is 0", 400)
    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))
    assert outcome.state == "FAILED"
    assert "ResourceLimitExceeded" in outcome.message and "ml.p3.16xlarge" in outcome.message
    assert tracker.client.get_run(outcome.run_id).info.status == "FAILED"


# -- the backend alone ---------------------------------------------------------------
def test_sagemakers_own_max_runtime_stop_is_a_failure(stubbed, sm):
    """SageMaker ends the job at MaxRuntime (StoppingCondition); mmp reports that as a failure."""
    client, stubber = stubbed
    backend = SageMakerBackend(sagemaker_client=client, poll_seconds=0)
    handle = JobHandle("sagemaker", "mmp-x-1", {"job_name": "mmp-x-1"})
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "InProgress", "Training"))
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "Stopped", "MaxRuntimeExceeded"))
    status = backend.wait(handle, deadline=time.time() - 3601)  # no StopTrainingJob from mmp
    assert status.state is JobState.FAILED and "MaxRuntimeExceeded" in status.message


def test_no_deadline_from_launch_stops_a_job_still_provisioning_or_waiting_for_spot(stubbed, sm):
    """Provisioning and the spot wait do not count against Max_Runtime on SageMaker: a job launched
    two hours before a one-hour Max_Runtime ran out is left to SageMaker's StoppingCondition."""
    client, stubber = stubbed
    backend = SageMakerBackend(sagemaker_client=client, poll_seconds=0)
    assert backend.bounds_runtime is True
    handle = JobHandle("sagemaker", "mmp-x-1", {"job_name": "mmp-x-1"})
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "InProgress", "Starting"))
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "InProgress", "Training"))
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "Completed", "Completed"))
    assert backend.wait(handle, deadline=time.time() - 2 * 3600).state is JobState.SUCCEEDED  # no stop call
    stubber.assert_no_pending_responses()


def test_teardown_stops_a_running_job_once_and_is_idempotent(stubbed, sm):
    client, stubber = stubbed
    backend = SageMakerBackend(sagemaker_client=client)
    handle = JobHandle("sagemaker", "mmp-x-1", {})
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "InProgress", "Training"))
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": "mmp-x-1"})
    backend.teardown(handle)
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "Stopping", "Stopping"))
    backend.teardown(handle)  # already stopping: no second StopTrainingJob
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "InProgress", "Training"))
    stubber.add_client_error("stop_training_job", "ValidationException",
                             "The training job mmp-x-1 is not in progress", 400)
    backend.teardown(handle)  # a race with the job ending is not an error
    stubber.add_client_error("describe_training_job", "ValidationException",
                             "Could not find training job 'mmp-x-1'", 400)
    backend.teardown(handle)  # never created
    stubber.add_response("describe_training_job", sm.describe_response("mmp-x-1", "Completed", "Completed"))
    assert backend.status(handle).state is JobState.SUCCEEDED
    backend.teardown(handle)  # known ended: no call at all (the Stubber would fail on one)


def test_cancel_sends_stop_training_job(stubbed):
    client, stubber = stubbed
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": "mmp-x-2"})
    SageMakerBackend(sagemaker_client=client).cancel(JobHandle("sagemaker", "mmp-x-2", {}))


def test_botocore_retries_throttling_on_the_wire(httpserver, monkeypatch, sm, stack_env):
    """The client from mmp.aws retries a throttled DescribeTrainingJob by itself."""
    from werkzeug import Response

    calls = []

    def answer(request):
        calls.append(request.headers.get("X-Amz-Target"))
        if len(calls) <= 2:
            return Response(json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}), 400,
                            content_type="application/x-amz-json-1.1")
        body = sm.describe_response("mmp-x-3", "InProgress", "Training")
        body["CreationTime"] = 1767225600
        body["SecondaryStatusTransitions"][0]["StartTime"] = 1767225600
        return Response(json.dumps(body), 200, content_type="application/x-amz-json-1.1")

    httpserver.expect_request("/", method="POST").respond_with_handler(answer)
    monkeypatch.setenv("AWS_ENDPOINT_URL", httpserver.url_for("/").rstrip("/"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    status = SageMakerBackend().status(JobHandle("sagemaker", "mmp-x-3", {}))
    assert status.state is JobState.RUNNING
    assert calls == ["SageMaker.DescribeTrainingJob"] * 3


# -- mapping and names -----------------------------------------------------------------
@pytest.mark.parametrize("status, secondary, extra, state, words", [
    ("InProgress", "Starting", {}, JobState.PENDING, "InProgress/Starting"),
    ("InProgress", "LaunchingMLInstances", {}, JobState.PENDING, "LaunchingMLInstances"),
    ("InProgress", "Downloading", {}, JobState.PENDING, "Downloading"),
    ("InProgress", "Training", {}, JobState.RUNNING, "InProgress/Training"),
    ("InProgress", "Interrupted", {}, JobState.RUNNING, "Interrupted"),
    ("InProgress", "Uploading", {}, JobState.RUNNING, "Uploading"),
    ("Stopping", "Stopping", {}, JobState.RUNNING, "Stopping"),
    ("Completed", "Completed", {}, JobState.SUCCEEDED, "Completed"),
    ("Stopped", "Stopped", {}, JobState.CANCELLED, "Stopped"),
    ("Stopped", "MaxRuntimeExceeded", {}, JobState.FAILED, "MaxRuntimeExceeded"),
    ("Stopped", "MaxWaitTimeExceeded", {}, JobState.FAILED, "MaxWaitTimeExceeded"),
    ("Failed", "Failed", {"FailureReason": "ClientError: No S3 objects found under S3 URL"}, JobState.FAILED,
     "No S3 objects found"),
])
def test_status_mapping(sm, status, secondary, extra, state, words):
    result = job_status(sm.describe_response("j", status, secondary, **extra))
    assert result.state is state
    assert words in result.message
    assert result.detail["secondary_status"] == secondary


def test_spot_savings_only_for_spot_jobs(sm):
    plain = job_status(sm.describe_response("j", "Completed", "Completed", BillableTimeInSeconds=100,
                                            TrainingTimeInSeconds=100))
    assert plain.detail["metrics"] == {"billable_seconds": 100.0, "training_seconds": 100.0}
    spot = job_status(sm.describe_response("j", "Completed", "Completed", BillableTimeInSeconds=25,
                                           TrainingTimeInSeconds=100, EnableManagedSpotTraining=True))
    assert spot.detail["metrics"]["spot_savings_percent"] == 75.0


def test_job_names_are_deterministic_short_and_valid():
    import re

    pattern = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
    commit = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
    first = job_name("mmp", "fashion-demo", commit, "d-1")
    assert first == job_name("mmp", "fashion-demo", commit, "d-1")
    assert first.startswith("mmp-fashion-demo-0d1a26e-")
    assert job_name("mmp", "fashion-demo", commit, "d-2") != first  # another delivery: another job
    assert job_name("mmp", "fashion-demo", commit) != first
    assert job_name("mmp", "other", commit, "d-1") != first
    for experiment in ("x" * 128, "my_exp.v2", "a..b", "-lead", "Ünïcode_name", "___"):
        for prefix in ("mmp", "a-very-long-prefix-for-the-team-and-project", "__"):
            name = job_name(prefix, experiment, commit, "delivery")
            assert len(name) <= 63 and pattern.fullmatch(name), name
