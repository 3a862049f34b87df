"""The AWS pipeline's surroundings for the stage and runner tests (fixtures, imported by them).

Real parts: a real `mlflow server` (one per session), GitHub's REST API served by
pytest-httpserver in the shape of the recorded fixtures, SNS/SQS/S3/Secrets
Manager/SageMaker/EC2 from moto in server mode, and the state machine definition the
Pulumi program makes, walked by tests/infra/sfn.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mmp import aws
from mmp.infra.pipeline import state_machine_definition
from mmp.pipeline import aws_stages, runner_results

from ..conftest import ACCOUNT, REGION, create_bucket
from ..conftest import mlflow_server as start_mlflow_server
from .sfn import Execution, TaskFailed

TOKEN = "ghp_stagetokenthatmustnotleak000000000000"
REPO = "octo-org/fashion-demo"
BUCKET = "mmp-artifacts"
FUNCTIONS = {s: f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:mmp-{s}" for s in ("prepare", "launch", "conclude")}
RUNNER = {"cluster": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/mmp-runner",
          "task_definition": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/mmp-runner",
          "subnets": ["subnet-0aaa", "subnet-0bbb"], "security_groups": ["sg-0runner"],
          "build_project": "mmp-runner-image"}
OK_TRAIN = "import sys\nprint('epoch 1 loss 0.5', flush=True)\nprint('args', sys.argv[1:], flush=True)\n"


def definition() -> dict:
    """What the Pulumi program deploys, with this test's ARNs."""
    return state_machine_definition(FUNCTIONS, "mmp-image", RUNNER, timeout_seconds=130 * 3600)


@pytest.fixture(scope="session")
def stages_mlflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with start_mlflow_server(root, "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")) as url:
        yield url


class Stack:
    """What one test sees: GitHub's side, the mail queue, the bucket, and executions."""

    def __init__(self, httpserver, mlflow: str, queue: str):
        self.httpserver, self.mlflow, self.queue = httpserver, mlflow, queue
        self.statuses: list[dict] = []
        self.builds: list[dict] = []

    def serve(self, repo: Path, sha: str, names=("experiment.json", "train.py", "promote.json",
                                                 "requirements.txt", "pyproject.toml", "setup.py", "setup.cfg")) -> None:
        def record_status(request):
            from werkzeug import Response

            assert request.headers["Authorization"] == f"Bearer {TOKEN}"
            self.statuses.append(request.get_json())
            return Response(json.dumps({"id": 1, **request.get_json()}), status=201, content_type="application/json")

        for name in names:
            path, uri = repo / name, f"/repos/{REPO}/contents/{name}"
            if path.exists():
                content = base64.encodebytes(path.read_bytes()).decode()  # wrapped at 76 columns, as GitHub does
                self.httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json(
                    {"type": "file", "encoding": "base64", "name": name, "path": name, "content": content})
            else:
                self.httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json(
                    {"message": "Not Found"}, status=404)
        self.httpserver.expect_request(f"/repos/{REPO}/statuses/{sha}", method="POST").respond_with_handler(
            record_status)
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar.gz",
                                  f"--prefix=octo-org-fashion-demo-{sha[:7]}/", sha], capture_output=True,
                                 check=True).stdout  # what GitHub's tarball endpoint serves
        self.httpserver.expect_request(f"/repos/{REPO}/tarball/{sha}").respond_with_data(
            archive, content_type="application/x-gzip")

    def messages(self) -> list[dict]:
        got = aws.client("sqs").receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(m["Body"]) for m in got]

    def mlflow_run(self, run_id: str) -> dict:
        with urllib.request.urlopen(f"{self.mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}") as resp:
            return json.loads(resp.read())["run"]

    # -- the integrations the state machine calls ---------------------------------------
    def codebuild(self, arguments: dict, data: dict) -> dict:
        """CodeBuild cannot run here: record the start (the buildspec has its own tests)."""
        self.builds.append(arguments)
        return {"Build": {"Id": f"{arguments['ProjectName']}:1", "BuildStatus": "SUCCEEDED"}}

    @staticmethod
    def sagemaker(arguments: dict, data: dict) -> dict:
        """createTrainingJob.sync: moto creates and describes the job; a job that did not
        complete fails the task, as the integration does."""
        sm = aws.client("sagemaker")
        sm.create_training_job(**arguments)
        job = json.loads(json.dumps(sm.describe_training_job(TrainingJobName=arguments["TrainingJobName"]),
                                    default=str))
        if job["TrainingJobStatus"] != "Completed":
            raise TaskFailed("States.TaskFailed", json.dumps(job))
        return job

    @staticmethod
    def runner(arguments: dict, data: dict, monkeypatch: Any) -> dict:
        """ecs:runTask.sync: the runner's entry command, in this process, with the task's overrides."""
        from mmp.pipeline import aws_runner

        assert arguments["Cluster"] == RUNNER["cluster"] and arguments["LaunchType"] == "FARGATE"
        network = arguments["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["Subnets"] == RUNNER["subnets"] and network["AssignPublicIp"] == "DISABLED"
        # ECS refuses overrides over 8,192 characters, JSON formatting included (RunTask's reference).
        assert len(json.dumps(arguments["Overrides"], separators=(",", ":"))) <= runner_results.ECS_OVERRIDES_LIMIT
        (override,) = arguments["Overrides"]["ContainerOverrides"]
        assert override["Name"] == "runner"
        for item in override["Environment"]:
            monkeypatch.setenv(item["Name"], item["Value"])
        try:
            code = aws_runner.main(override["Command"])
        except SystemExit as exc:  # stopped (SIGTERM) or a usage error: the task failed
            raise TaskFailed("States.TaskFailed", f"Essential container in task exited ({exc.code})") from None
        except Exception as exc:  # a crash: Python prints the traceback and exits 1
            raise TaskFailed("States.TaskFailed", f"Essential container in task exited (1): {exc}") from None
        if code:
            raise TaskFailed("States.TaskFailed", f"Essential container in task exited ({code})")
        return {"TaskArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/mmp-runner/0123abcd", "LastStatus": "STOPPED"}

    def execution(self, monkeypatch, **replace: Any) -> Execution:
        integrations = {
            "arn:aws:states:::codebuild:startBuild.sync": self.codebuild,
            "arn:aws:states:::sagemaker:createTrainingJob.sync": self.sagemaker,
            "arn:aws:states:::ecs:runTask.sync": lambda a, d: self.runner(a, d, monkeypatch),
        }
        integrations.update(replace)
        lambdas = {FUNCTIONS["prepare"]: aws_stages.prepare, FUNCTIONS["launch"]: aws_stages.launch,
                   FUNCTIONS["conclude"]: aws_stages.conclude}
        return Execution(definition(), lambdas, integrations)


def bind_stack_names(iam_enforced, *, topic: str, token_arn: str, ecr_repository: str) -> None:
    """This file's resource names are the stack's (tests/iam_enforce: IAM checks use the stack's policies)."""
    secrets = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
    iam_enforced.bind({f"arn:aws:s3:::{BUCKET}": "arn:aws:s3:::ARTIFACTS", "arn:aws:s3:::mmp-datasets": "arn:aws:s3:::DATASETS",
                       topic: f"arn:aws:sns:{REGION}:{ACCOUNT}:NOTIFY_TOPIC", token_arn: secrets + "GITHUB_TOKEN",
                       f"repository/{ecr_repository}": "repository/TRAINING_IMAGES",
                       "training-job/mmp-": "training-job/JOBS-",
                       f"role/mmp-sagemaker": "role/SAGEMAKER_ROLE",
                       f"execution:mmp-pipeline:": "execution:PIPELINE:"})


@pytest.fixture
def stack(aws_env, stages_mlflow, httpserver, monkeypatch, digits, iam_enforced) -> Stack:
    """The stage Lambdas' and the runner's environment, pointed at the real parts above."""
    sns, sqs = aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name="mmp-notify")["TopicArn"]
    queue = sqs.create_queue(QueueName="mail")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "false"})
    token_arn = aws.client("secretsmanager").create_secret(Name="gh", SecretString=TOKEN)["ARN"]
    create_bucket(aws.client("s3"), BUCKET)
    ecr_uri = aws.client("ecr").create_repository(repositoryName="mmp-training")["repository"]["repositoryUri"]
    bind_stack_names(iam_enforced, topic=topic, token_arn=token_arn, ecr_repository="mmp-training")
    for key, value in {
        "MLFLOW_TRACKING_URI": stages_mlflow, "MMP_GITHUB_API_URL": httpserver.url_for("").rstrip("/"),
        "MMP_GITHUB_TOKEN_SECRET_ARN": token_arn, "MMP_NOTIFY_TOPIC_ARN": topic, "MMP_GITHUB_MAX_WAIT": "0",
        "MMP_ARTIFACTS_BUCKET": BUCKET, "MMP_PIPELINE_PLATFORMS": "sagemaker,dlami",
        "MMP_ECR_REPOSITORY_URI": ecr_uri, "MMP_IMAGE_CONTEXT_DIGEST": "0" * 64,
        "MMP_SAGEMAKER_ROLE_ARN": f"arn:aws:iam::{ACCOUNT}:role/mmp-sagemaker",
        "MMP_DATASETS": json.dumps({"digits": {"s3": "s3://mmp-datasets/digits/"}}),
        "MMP_JOB_NAME_PREFIX": "mmp",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    aws_stages._BACKENDS.clear()
    yield Stack(httpserver, stages_mlflow, queue)
    aws_stages._BACKENDS.clear()


def job(repo: Path, sha: str, files=("experiment.json",)) -> dict:
    """The execution's input: the webhook's job (mmp.webhook.core.Job.to_dict())."""
    return {"repository": REPO, "clone_url": str(repo), "before": "0" * 40, "after": sha,
            "ref": "refs/heads/main", "delivery_id": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "trigger_files": list(files)}


def experiment(**extra) -> dict:
    return {"Platform": "sagemaker", "Dataset_Name": "digits", "Training_Instance": "ml.m5.xlarge",
            "Instance_Count": "1", "Hyperparameters": "{'epochs': '1', 'batch-size': '16'}", **extra}


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
