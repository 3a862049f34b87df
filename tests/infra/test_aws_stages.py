"""The Step Functions stage handlers, run one by one as the state machine would.

Real parts: a real `mlflow server` (one per module), GitHub's REST API served by
pytest-httpserver in the shape of the recorded fixtures, SNS/SQS/Secrets Manager
from moto, and the local backend (real horovodrun) standing in for SageMaker so
launch/poll/cancel/teardown act on real processes.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mmp.pipeline import aws_stages

from ..conftest import mlflow_server as start_mlflow_server

TOKEN = "ghp_stagetokenthatmustnotleak000000000000"
REPO = "octo-org/fashion-demo"
OK_TRAIN = "import sys\nprint('epoch 1 loss 0.5', flush=True)\nprint('args', sys.argv[1:], flush=True)\n"
SLOW_TRAIN = "import time\nprint('training', flush=True)\ntime.sleep(120)\n"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with start_mlflow_server(root, "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")) as url:
        yield url


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        import boto3

        sns, sqs = boto3.client("sns"), boto3.client("sqs")
        topic = sns.create_topic(Name="mmp-notify")["TopicArn"]
        queue = sqs.create_queue(QueueName="mail")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        token_arn = boto3.client("secretsmanager").create_secret(Name="gh", SecretString=TOKEN)["ARN"]
        yield {"topic": topic, "queue": queue, "token_arn": token_arn, "sqs": sqs}


@pytest.fixture
def stack(aws, mlflow_server, httpserver, monkeypatch, digits):
    """The stage Lambdas' environment, pointed at the real parts above."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MMP_GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("MMP_GITHUB_TOKEN_SECRET_ARN", aws["token_arn"])
    monkeypatch.setenv("MMP_NOTIFY_TOPIC_ARN", aws["topic"])
    monkeypatch.setenv("MMP_PIPELINE_PLATFORMS", "local")
    monkeypatch.setenv("MMP_GITHUB_MAX_WAIT", "0")
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    aws_stages._BACKENDS.clear()
    statuses: list[dict] = []

    def record_status(request):
        from werkzeug import Response

        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        statuses.append(request.get_json())
        return Response(json.dumps({"id": 1, **request.get_json()}), status=201, content_type="application/json")

    def serve(repo: Path, sha: str):
        for name in ("experiment.json", "train.py"):
            path = repo / name
            uri = f"/repos/{REPO}/contents/{name}"
            if path.exists():
                content = base64.encodebytes(path.read_bytes()).decode()  # wrapped at 76 columns, as GitHub does
                httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json(
                    {"type": "file", "encoding": "base64", "name": name, "path": name, "content": content})
            else:
                httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json(
                    {"message": "Not Found"}, status=404)
        httpserver.expect_request(f"/repos/{REPO}/statuses/{sha}", method="POST").respond_with_handler(record_status)

    def messages() -> list[dict]:
        got = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(m["Body"]) for m in got]

    yield type("Stack", (), {"serve": staticmethod(serve), "statuses": statuses, "messages": staticmethod(messages),
                             "mlflow": mlflow_server})
    aws_stages._BACKENDS.clear()


def _job(repo: Path, sha: str, files=("experiment.json",)) -> dict:
    return {"repository": REPO, "clone_url": str(repo), "before": "0" * 40, "after": sha,
            "ref": "refs/heads/main", "delivery_id": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "trigger_files": list(files)}


def _experiment(**extra) -> dict:
    return {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1",
            "Hyperparameters": "{'epochs': '1', 'batch-size': '16'}", **extra}


def _sha(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _run(state: dict) -> dict:
    """What the state machine does between Launch and Conclude (JSON round trips included)."""
    state = json.loads(json.dumps(aws_stages.launch(json.loads(json.dumps(state)))))
    deadline = time.time() + 90
    while not state["status"]["terminal"]:
        assert time.time() < deadline, "the job never finished"
        time.sleep(0.3)
        state = json.loads(json.dumps(aws_stages.poll(state)))
    return state


def _mlflow_run(url: str, run_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}") as resp:
        return json.loads(resp.read())["run"]


def test_a_push_trains_and_reports_everywhere(stack, make_repo):
    repo = make_repo(experiment=_experiment(), files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha))
    assert state["accepted"] is True and state["platform"] == "local" and state["build_image"] is False
    run_id = state["started"]["run_id"]
    assert [s["state"] for s in stack.statuses] == ["pending"]

    state = _run(state)
    assert state["status"]["state"] == "SUCCEEDED" and state["polls"] >= 1
    state = json.loads(json.dumps(aws_stages.conclude(state)))
    assert state["outcome"]["state"] == "SUCCEEDED" and state["succeeded"] is True

    run = _mlflow_run(stack.mlflow, run_id)
    assert run["info"]["status"] == "FINISHED"
    assert [r["info"]["run_id"] for r in _runs_for_commit(stack.mlflow, sha)] == [run_id]  # the search works
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.source.git.commit"] == sha and tags["mmp.delivery_id"].startswith("72d3162e")
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {"epochs": "1", "batch-size": "16"}
    assert [s["state"] for s in stack.statuses] == ["pending", "success"]
    assert stack.statuses[-1]["target_url"] == state["started"]["run_url"]
    assert stack.statuses[-1]["context"] == "mmp/training"
    mails = stack.messages()
    assert len(mails) == 1 and "SUCCEEDED" in mails[0]["Subject"]
    record = json.loads(mails[0]["Message"].split("\n\n", 1)[1])
    assert record["run_id"] == run_id and record["commit"] == sha
    assert TOKEN not in json.dumps(state) + json.dumps(mails) + json.dumps(stack.statuses)


def test_an_invalid_experiment_is_rejected_before_mlflow(stack, make_repo):
    repo = make_repo(experiment=_experiment(Instance_Count="two", Colour="red"), files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha))
    assert state["accepted"] is False and "started" not in state
    assert state["outcome"]["state"] == "INVALID"
    problems = " ".join(state["outcome"]["problems"])
    assert "Instance_Count" in problems and "Colour" in problems
    assert [s["state"] for s in stack.statuses] == ["failure"]
    assert "INVALID" in stack.messages()[0]["Subject"]
    assert _runs_for_commit(stack.mlflow, sha) == []
    assert aws_stages.conclude(state) == state  # nothing started: Conclude has nothing to do


def test_a_dlami_push_is_refused_with_the_reason(stack, make_repo):
    repo = make_repo(experiment=_experiment(Platform="dlami", Training_Instance="p3.2xlarge"),
                     files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha))
    assert state["accepted"] is False
    assert "dlami" in state["outcome"]["message"] and "mmp run" in state["outcome"]["message"]
    assert stack.statuses[-1]["state"] == "failure"


def test_a_study_is_refused_on_aws_before_mlflow(stack, make_repo):
    tuning = {"Objective_Metric": "val_accuracy", "Strategy": "grid", "Ranges": {"lr": {"Values": [0.1, 0.01]}}}
    repo = make_repo(experiment=_experiment(Tuning=tuning), files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha))
    assert state["accepted"] is False and "started" not in state
    assert state["outcome"]["message"].startswith("Tuning: ") and "runner task" in state["outcome"]["message"]
    assert stack.statuses[-1]["state"] == "failure"
    assert _runs_for_commit(stack.mlflow, sha) == []


def test_max_runtime_cancels_the_job(stack, make_repo):
    repo = make_repo(experiment=_experiment(Max_Runtime="1"), files={"train.py": SLOW_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = json.loads(json.dumps(aws_stages.launch(aws_stages.prepare(_job(repo, sha)))))
    pid = state["handle"]["data"]["pid"]
    state["deadline"] = time.time() - 1  # as if a minute had passed
    state = aws_stages.poll(state)
    assert state["status"]["terminal"] is True and state["status"]["timed_out"] is True
    assert state["status"]["message"] == "stopped: Max_Runtime reached"
    state = aws_stages.conclude(state)
    assert state["outcome"]["state"] == "FAILED" and state["succeeded"] is False
    assert _gone(pid)
    assert _mlflow_run(stack.mlflow, state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]


def test_a_failed_poll_still_cancels_and_tears_down(stack, make_repo):
    """The state machine's Catch sends a crashed Poll to Conclude with `error` and a running job."""
    repo = make_repo(experiment=_experiment(), files={"train.py": SLOW_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = json.loads(json.dumps(aws_stages.launch(aws_stages.prepare(_job(repo, sha)))))
    pid = state["handle"]["data"]["pid"]
    state["error"] = {"Error": "Lambda.Unknown", "Cause": "Task timed out after 300.00 seconds"}
    state = aws_stages.conclude(state)
    assert _gone(pid)
    assert state["outcome"]["state"] == "FAILED"
    assert "Lambda.Unknown" in state["outcome"]["message"]
    assert _mlflow_run(stack.mlflow, state["started"]["run_id"])["info"]["status"] == "FAILED"


def test_a_failed_image_build_is_reported(stack, make_repo):
    repo = make_repo(experiment=_experiment(), files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha))
    state.update(build_image=True, error={"Error": "States.TaskFailed", "Cause": "{\"Build\": {\"BuildStatus\": \"FAILED\"}}"})
    state = aws_stages.conclude(state)
    assert state["outcome"]["state"] == "FAILED" and state["outcome"]["message"].startswith("image build failed")
    assert stack.statuses[-1]["state"] == "failure"


def test_a_promote_json_push_is_answered_on_the_commit_not_run(stack, make_repo):
    repo = make_repo(experiment=_experiment(), files={"train.py": OK_TRAIN})
    sha = _sha(repo)
    stack.serve(repo, sha)
    state = aws_stages.prepare(_job(repo, sha, files=("promote.json",)))
    assert state["accepted"] is False and state["outcome"]["state"] == "SKIPPED"
    assert [(s["state"], s["context"]) for s in stack.statuses] == [("error", "mmp/promotion")]
    assert "mmp promote" in stack.statuses[0]["description"] and len(stack.statuses[0]["description"]) <= 140


def test_the_lambda_refuses_a_local_tracking_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    with pytest.raises(RuntimeError, match="http"):
        aws_stages.make_pipeline()


def _runs_for_commit(url: str, sha: str) -> list:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1000") as resp:
        ids = [e["experiment_id"] for e in json.loads(resp.read()).get("experiments", [])]
    body = json.dumps({"experiment_ids": ids, "filter": f"tags.`mlflow.source.git.commit` = '{sha}'"}).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as resp:
        return json.loads(resp.read()).get("runs", [])


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
