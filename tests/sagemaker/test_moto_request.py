"""A pipeline run with platform sagemaker against moto (server mode) creates exactly the
job a SageMaker engineer would expect: the wire request, field by field, then what
DescribeTrainingJob and ListTags give back."""

from __future__ import annotations

import json
import time

import pytest

from ..conftest import REGION

from mmp import aws
from mmp.backends.sagemaker import SageMakerBackend, SageMakerFsxBackend, job_name


def capture_requests(client) -> list[dict]:
    """The JSON bodies of every CreateTrainingJob this client sends over HTTP."""
    sent: list[dict] = []

    def keep(request, **_):
        sent.append(json.loads(request.body))

    client.meta.events.register("before-send.sagemaker.CreateTrainingJob", keep)
    return sent


def test_pipeline_creates_exactly_the_expected_training_job(aws_env, stack_env, sm_repo, sm):
    stack_env.setenv("MMP_SUBNET_IDS", "subnet-0a1, subnet-0b2")
    stack_env.setenv("MMP_SECURITY_GROUP_IDS", "sg-0c3")
    stack_env.setenv("MMP_SAGEMAKER_INPUT_MODE", "FastFile")
    stack_env.setenv("MMP_SAGEMAKER_VOLUME_GB", "100")
    stack_env.setenv("MMP_MLFLOW_PASSWORD_SECRET_ARN", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mlflow-pw")
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    backend = SageMakerBackend(sagemaker_client=client, poll_seconds=0)
    repo = sm_repo(Processes_Per_Host="8")
    trigger = sm.trigger_for(repo)

    outcome, tracker = sm.run_pipeline(repo, backend)

    assert outcome.state == "SUCCEEDED", outcome.message  # moto's jobs are always Completed
    run = tracker.client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    name = job_name("mmp", "fashion-demo", trigger.commit, trigger.delivery_id)
    assert len(sent) == 1
    expected = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": f"{sm.ECR}:{trigger.commit}", "TrainingInputMode": "FastFile"},
        "RoleArn": sm.ROLE,
        "HyperParameters": {"epochs": "40", "batch-size": "32"},
        "InputDataConfig": [{
            "ChannelName": "fashion-s3",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": sm.DATASET_S3,
                                            "S3DataDistributionType": "FullyReplicated"}},
            "InputMode": "FastFile",
        }],
        "OutputDataConfig": {"S3OutputPath": f"s3://{sm.BUCKET}/fashion-demo/{outcome.run_id}"},
        "ResourceConfig": {"InstanceType": "ml.p3.16xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100},
        "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
        "Environment": {
            "MLFLOW_TRACKING_URI": tracker.tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": "fashion-demo",
            "MLFLOW_RUN_ID": outcome.run_id,
            "MMP_DATASET": "fashion-s3",
            "MMP_COMMIT": trigger.commit,
            "AWS_DEFAULT_REGION": REGION,
            "MMP_HYPERPARAMETER_ORDER": "epochs,batch-size",
            "MMP_PROCESSES_PER_HOST": "8",
            "MMP_MLFLOW_PASSWORD_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mlflow-pw",
        },
        "EnableNetworkIsolation": False,
        "EnableManagedSpotTraining": False,
        "VpcConfig": {"SecurityGroupIds": ["sg-0c3"], "Subnets": ["subnet-0a1", "subnet-0b2"]},
        "Tags": [
            {"Key": "mmp:repository", "Value": "acme/fashion-demo"},
            {"Key": "mmp:commit", "Value": trigger.commit},
            {"Key": "mmp:delivery-id", "Value": trigger.delivery_id},
            {"Key": "mmp:experiment", "Value": "fashion-demo"},
            {"Key": "mmp:mlflow-run-id", "Value": outcome.run_id},
            {"Key": "mmp:platform", "Value": "sagemaker"},
        ],
    }
    assert set(sent[0]) == set(expected)
    for key, value in expected.items():
        assert sent[0][key] == value, key

    # What SageMaker (moto) recorded and answers.
    job = client.describe_training_job(TrainingJobName=name)
    assert job["TrainingJobStatus"] == "Completed"
    for key in ("RoleArn", "HyperParameters", "InputDataConfig", "OutputDataConfig", "ResourceConfig",
                "StoppingCondition", "VpcConfig"):
        assert job[key] == expected[key], key
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}:{trigger.commit}"
    assert job["EnableManagedSpotTraining"] is False
    tags = client.list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]
    assert tags == expected["Tags"]
    # The MLflow run knows the job, and no secret value went anywhere near the request.
    assert run.data.tags["mmp.platform"] == "sagemaker"
    assert "mlflow-pw" not in json.dumps(sent[0]["HyperParameters"])


def test_spot_job_has_checkpoints_and_a_longer_wait(aws_env, stack_env, sm_repo, sm):
    stack_env.setenv("MMP_CHECKPOINT_S3_URI", "s3://mmp-checkpoints-test/ckpt/")
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    repo = sm_repo(Use_Spot=True, Max_Runtime="60")
    outcome, tracker = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "SUCCEEDED", outcome.message
    body = sent[0]
    name = body["TrainingJobName"]
    assert body["EnableManagedSpotTraining"] is True
    assert body["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert body["CheckpointConfig"] == {"S3Uri": f"s3://mmp-checkpoints-test/ckpt/fashion-demo/{name}",
                                        "LocalPath": "/opt/ml/checkpoints"}
    assert body["Environment"]["MMP_CHECKPOINT_DIR"] == "/opt/ml/checkpoints"
    job = client.describe_training_job(TrainingJobName=name)
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"] == body["CheckpointConfig"]
    assert job["StoppingCondition"] == body["StoppingCondition"]


def test_fsx_job_reads_the_file_system_in_file_mode(aws_env, stack_env, sm_repo, sm):
    stack_env.setenv("MMP_SAGEMAKER_INPUT_MODE", "FastFile")  # the S3 default; FSx still uses File
    stack_env.setenv("MMP_FSX_FILE_SYSTEM_ID", "fs-0123456789abcdef0")
    stack_env.setenv("MMP_FSX_MOUNT_NAME", "abcdefgh")
    stack_env.setenv("MMP_SUBNET_IDS", "subnet-0a1")
    stack_env.setenv("MMP_SECURITY_GROUP_IDS", "sg-0c3,sg-0d4")
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    repo = sm_repo(Platform="sagemaker-fsx")
    outcome, _ = sm.run_pipeline(repo, SageMakerFsxBackend(sagemaker_client=client, poll_seconds=0))

    assert outcome.state == "SUCCEEDED", outcome.message
    body = sent[0]
    assert body["InputDataConfig"] == [{
        "ChannelName": "fashion-s3",
        "DataSource": {"FileSystemDataSource": {"FileSystemId": "fs-0123456789abcdef0", "FileSystemAccessMode": "ro",
                                                "FileSystemType": "FSxLustre",
                                                "DirectoryPath": "/abcdefgh/datasets/fashion-s3"}},
        "InputMode": "File",
    }]
    assert body["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert body["VpcConfig"] == {"SecurityGroupIds": ["sg-0c3", "sg-0d4"], "Subnets": ["subnet-0a1"]}
    assert {"Key": "mmp:platform", "Value": "sagemaker-fsx"} in body["Tags"]
    job = client.describe_training_job(TrainingJobName=body["TrainingJobName"])
    assert job["InputDataConfig"] == body["InputDataConfig"]


def test_pinned_image_and_prefix_are_used_as_configured(aws_env, stack_env, sm_repo, sm):
    stack_env.setenv("MMP_ECR_REPOSITORY_URI", f"{sm.ECR}@sha256:{'a' * 64}")
    stack_env.setenv("MMP_JOB_NAME_PREFIX", "team_x")
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    outcome, _ = sm.run_pipeline(sm_repo(), SageMakerBackend(sagemaker_client=client, poll_seconds=0))
    assert outcome.state == "SUCCEEDED"
    assert sent[0]["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}@sha256:{'a' * 64}"
    assert sent[0]["TrainingJobName"].startswith("team-x-fashion-demo-")


def test_logs_come_from_every_stream_of_the_job_and_the_cursor_moves_on(aws_env, stack_env):
    from mmp.backends.base import JobHandle

    logs = aws.client("logs")
    group = "/aws/sagemaker/TrainingJobs"
    logs.create_log_group(logGroupName=group)
    for stream in ("mmp-job-1/algo-1-1700000000", "mmp-job-1/algo-2-1700000000", "mmp-job-10/algo-1-1700000000"):
        logs.create_log_stream(logGroupName=group, logStreamName=stream)

    def put(stream, *messages):  # CloudWatch drops events older than 14 days: stamp them now
        now = int(time.time() * 1000)
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": now + i, "message": m} for i, m in enumerate(messages)])

    put("mmp-job-1/algo-1-1700000000", "epoch 1/2 loss=0.5", "epoch 2/2 loss=0.3")
    put("mmp-job-1/algo-2-1700000000", "worker ready")
    put("mmp-job-10/algo-1-1700000000", "another job")
    backend = SageMakerBackend(poll_seconds=0)
    handle = JobHandle("sagemaker", "mmp-job-1", {"job_name": "mmp-job-1"})

    lines, cursor = backend.logs(handle)
    assert lines == ["[algo-1-1700000000] epoch 1/2 loss=0.5", "[algo-1-1700000000] epoch 2/2 loss=0.3",
                     "[algo-2-1700000000] worker ready"]
    assert backend.logs(handle, cursor)[0] == []
    put("mmp-job-1/algo-2-1700000000", "done")
    lines, _ = backend.logs(handle, cursor)
    assert lines == ["[algo-2-1700000000] done"]


def test_logs_before_the_log_group_exists_are_empty(aws_env, stack_env):
    from mmp.backends.base import JobHandle

    lines, cursor = SageMakerBackend().logs(JobHandle("sagemaker", "mmp-none", {}))
    assert (lines, cursor) == ([], {})


@pytest.mark.parametrize("uri", ["https://admin:hunter2@mlflow.example.com", "http://u:p@10.0.0.5:5000"])
def test_tracking_uri_with_a_password_never_reaches_the_request(aws_env, stack_env, sm_repo, sm, uri):
    from mmp.backends import BackendError, LaunchRequest
    from mmp.contract.datasets import load_catalogue
    from mmp.contract.experiment import parse_experiment

    client = aws.client("sagemaker")
    sent = capture_requests(client)
    experiment = parse_experiment(sm.SM_EXPERIMENT)
    request = LaunchRequest(experiment=experiment, experiment_name="fashion-demo", run_id="r1", repository="a/b",
                            clone_url="/x", commit="c" * 40, dataset=load_catalogue()["fashion-s3"],
                            mlflow_env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "e",
                                        "MLFLOW_RUN_ID": "r1"})
    with pytest.raises(BackendError, match="MMP_MLFLOW_PASSWORD_SECRET_ARN") as info:
        SageMakerBackend(sagemaker_client=client).launch(request)
    assert sent == []
    assert "hunter2" not in str(info.value) and ":p@" not in str(info.value)


def test_the_registry_backend_runs_against_moto_with_env_configuration(aws_env, stack_env, sm_repo, sm):
    """No injection: Pipeline's default factory finds `sagemaker` by name, reads MMP_* vars."""
    from mmp.backends import get_backend
    from mmp.pipeline.runner import Pipeline
    from mmp.tracking.client import RunTracker

    assert SageMakerBackend.poll_seconds == 30.0
    stack_env.setenv("MMP_SAGEMAKER_POLL_SECONDS", "0.01")
    backend = get_backend("sagemaker")
    assert type(backend) is SageMakerBackend and backend.poll_seconds == 0.01
    assert type(get_backend("sagemaker-fsx")) is SageMakerFsxBackend

    repo = sm_repo()
    tracker = RunTracker()
    outcome = Pipeline(tracker=tracker).run(sm.trigger_for(repo, delivery_id=None))
    assert outcome.state == "SUCCEEDED", outcome.message
    trigger = sm.trigger_for(repo, delivery_id=None)
    name = job_name("mmp", "fashion-demo", trigger.commit)
    job = aws.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{sm.BUCKET}/fashion-demo/{outcome.run_id}"
    tags = {t["Key"]: t["Value"] for t in aws.client("sagemaker").list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
    assert tags["mmp:delivery-id"] == "none" and tags["mmp:mlflow-run-id"] == outcome.run_id


def test_managed_mlflow_jobs_log_through_the_plugin_with_the_servers_arn(aws_env, stack_env, sm_dataset, sm):
    """mlflowMode sagemaker: train.py's MLflow client takes the tracking server's ARN as its URI
    (the sagemaker-mlflow plugin signs with the job role); no username or password goes along."""
    from mmp.backends import LaunchRequest
    from mmp.contract.datasets import load_catalogue
    from mmp.contract.experiment import parse_experiment

    arn = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/acme-ml-dev-mlflow"
    stack_env.setenv("MMP_MLFLOW_TRACKING_SERVER_ARN", arn)
    stack_env.delenv("MMP_MLFLOW_PASSWORD_SECRET_ARN", raising=False)
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    request = LaunchRequest(experiment=parse_experiment(sm.SM_EXPERIMENT), experiment_name="fashion-demo",
                            run_id="r1", repository="a/b", clone_url="/x", commit="c" * 40,
                            dataset=load_catalogue()["fashion-s3"],
                            mlflow_env={"MLFLOW_TRACKING_URI": "https://eu-west-1.experiments.sagemaker.aws",
                                        "MLFLOW_EXPERIMENT_NAME": "fashion-demo", "MLFLOW_RUN_ID": "r1"})
    SageMakerBackend(sagemaker_client=client).launch(request)
    env = sent[0]["Environment"]
    assert env["MLFLOW_TRACKING_URI"] == arn and env["MLFLOW_RUN_ID"] == "r1"
    assert "MMP_MLFLOW_PASSWORD_SECRET_ARN" not in env
