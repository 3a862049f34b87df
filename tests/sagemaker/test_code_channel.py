"""CreateTrainingJob against moto (server mode) for a launch Prepare staged: the dependency
set's image, the commit's code as channel mmp-code, and no secret anywhere in the request."""

from __future__ import annotations

import json

import pytest

from mmp import aws
from mmp.backends import LaunchRequest
from mmp.backends.sagemaker import SageMakerBackend
from mmp.contract.image import CODE_CHANNEL

TAG = "deps-" + "ab" * 16


def capture(client) -> list[str]:
    sent: list[str] = []
    client.meta.events.register("before-send.sagemaker.CreateTrainingJob",
                                lambda request, **_: sent.append(request.body.decode()))
    return sent


def staged_request(sm, **experiment) -> LaunchRequest:
    from mmp.contract.datasets import load_catalogue
    from mmp.contract.experiment import parse_experiment

    commit = "c" * 40
    return LaunchRequest(
        experiment=parse_experiment({**sm.SM_EXPERIMENT, **experiment}), experiment_name="fashion-demo",
        run_id="r1", repository="acme/fashion-demo", clone_url="https://github.com/acme/fashion-demo.git",
        commit=commit, dataset=load_catalogue()["fashion-s3"],
        mlflow_env={"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "MLFLOW_EXPERIMENT_NAME": "fashion-demo",
                    "MLFLOW_RUN_ID": "r1"},
        image_tag=TAG, code_uri=f"s3://{sm.BUCKET}/code/acme/fashion-demo/{commit}.tar.gz")


def test_the_job_runs_the_dependency_image_with_the_commits_code_and_no_secret(aws_env, stack_env, sm_dataset, sm):
    password = "mlflow-pw-thatmustnotleak"
    arn = aws.client("secretsmanager").create_secret(Name="mlflow", SecretString=password)["ARN"]
    stack_env.setenv("MMP_MLFLOW_PASSWORD_SECRET_ARN", arn)
    stack_env.setenv("MMP_MLFLOW_USERNAME", "mmp")
    client = aws.client("sagemaker")
    sent = capture(client)
    request = staged_request(sm)

    handle = SageMakerBackend(sagemaker_client=client).launch(request)

    body = json.loads(sent[0])
    assert body["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}:{TAG}"
    assert body["InputDataConfig"][1] == {
        "ChannelName": CODE_CHANNEL,
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": request.code_uri,
                                        "S3DataDistributionType": "FullyReplicated"}},
        "InputMode": "File"}
    assert body["InputDataConfig"][0]["ChannelName"] == "fashion-s3"
    assert body["Environment"]["MMP_MLFLOW_PASSWORD_SECRET_ARN"] == arn
    described = client.describe_training_job(TrainingJobName=handle.job_id)
    assert password not in sent[0] and password not in json.dumps(described, default=str)


def test_a_dataset_named_like_the_code_channel_is_refused(aws_env, stack_env, sm):
    from mmp.contract.datasets import add_dataset, load_catalogue
    from mmp.contract.experiment import parse_experiment

    add_dataset(CODE_CHANNEL, s3="s3://mmp-datasets-test/x/")
    experiment = parse_experiment({**sm.SM_EXPERIMENT, "Dataset_Name": CODE_CHANNEL})
    problems = SageMakerBackend().check(experiment, load_catalogue()[CODE_CHANNEL])
    assert any(p.startswith(f"Dataset_Name: '{CODE_CHANNEL}' is the channel") for p in problems)
