"""A GitLab push on the AWS path, in eu-west-1 with every AWS call judged against its role's policy:
the webhook Lambda (POST /webhook/gitlab, its own secret from Secrets Manager) → the execution input →
the state machine the Pulumi program deploys, walked (tests/infra/sfn.py) → a concluded run in MLflow,
the commit read from and reported to the GitLab stand-in."""

from __future__ import annotations

import base64
import json
import time

import pytest

from mmp import aws

from ..conftest import ACCOUNT, REGION
from ..infra.pipeline_stack import OK_TRAIN, experiment, head, stack, stages_mlflow  # noqa: F401
from .conftest import PROJECT, SECRET, TOKEN, GitLabStandIn, push_for, token_headers

SAGEMAKER_PATH = ["Prepare", "NeedsRunner?", "Accepted?", "BuildImage", "Train where?", "Launch", "Launched?", "Train",
                  "Conclude", "Succeeded?", "Done"]


def v2_event(path: str, body: bytes, headers: dict) -> dict:
    """An API Gateway HTTP API payload v2 event as AWS delivers it (lower-cased headers, base64 body)."""
    return {"version": "2.0", "routeKey": f"POST {path}", "rawPath": path, "rawQueryString": "",
            "headers": {k.lower(): v for k, v in headers.items()},
            "requestContext": {"http": {"method": "POST", "path": path, "protocol": "HTTP/1.1",
                                        "sourceIp": "34.74.90.64", "userAgent": "GitLab/17.6.0"},
                               "requestId": "abc", "stage": "$default", "timeEpoch": int(time.time() * 1000)},
            "body": base64.b64encode(body).decode(), "isBase64Encoded": True}


@pytest.fixture
def gitlab_aws(stack, make_repo, monkeypatch, iam_enforced):  # noqa: F811 - the stack fixture
    """The stand-in over a repository with a SageMaker experiment, and the webhook's and GitLab's AWS parts."""
    repo = make_repo(experiment=experiment(), files={"train.py": OK_TRAIN})
    standin = GitLabStandIn(repo).start()
    sm = aws.client("secretsmanager")
    token_arn = sm.create_secret(Name="gl-token", SecretString=TOKEN)["ARN"]
    secret_arn = sm.create_secret(Name="gl-webhook", SecretString=SECRET)["ARN"]
    aws.client("dynamodb").create_table(
        TableName="mmp-deliveries", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}])
    machine = aws.client("stepfunctions").create_state_machine(
        name="mmp-pipeline", roleArn=f"arn:aws:iam::{ACCOUNT}:role/sfn",
        definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}}))["stateMachineArn"]
    secrets = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
    iam_enforced.bind({token_arn: secrets + "GITLAB_TOKEN", secret_arn: secrets + "GITLAB_WEBHOOK_SECRET",
                       "table/mmp-deliveries": "table/DELIVERIES",
                       machine: f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:PIPELINE"})
    for key, value in {"MMP_GITLAB_URL": standin.url, "MMP_GITLAB_TOKEN_SECRET_ARN": token_arn,
                       "MMP_GITLAB_WEBHOOK_SECRET_ARN": secret_arn, "MMP_DELIVERIES_TABLE": "mmp-deliveries",
                       "MMP_STATE_MACHINE_ARN": machine}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MMP_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("MMP_GITLAB_WEBHOOK_SECRET", raising=False)
    aws._SECRETS.clear()
    yield standin, repo, machine
    standin.stop()


def test_a_gitlab_push_trains_through_the_state_machine_and_reports_on_gitlab(stack, gitlab_aws, monkeypatch):  # noqa: F811
    from mmp.webhook import lambda_handler

    standin, repo, machine = gitlab_aws
    sha = head(repo)
    body = json.dumps(push_for(before="0" * 40, after=sha, added=["experiment.json", "train.py"])).encode()
    headers = token_headers(body, key="5f0e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")

    forged = lambda_handler(v2_event("/webhook/gitlab", body, {**headers, "X-Gitlab-Token": "forged"}), None)
    assert forged["statusCode"] == 401
    on_github_path = lambda_handler(v2_event("/webhook", body, headers), None)
    assert on_github_path["statusCode"] in (401, 500)  # GitHub's route wants GitHub's signature (and secret)
    reply = lambda_handler(v2_event("/webhook/gitlab", body, headers), None)
    assert reply["statusCode"] == 202, reply
    again = lambda_handler(v2_event("/webhook/gitlab", body, headers), None)  # GitLab's retry
    assert json.loads(again["body"])["status"] == "duplicate"

    sfn = aws.client("stepfunctions")
    (execution,) = sfn.list_executions(stateMachineArn=machine)["executions"]
    assert execution["name"] == "gl-5f0e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
    start = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
    assert start["host"] == "gitlab" and start["repository"] == PROJECT and start["after"] == sha

    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == SAGEMAKER_PATH, (run.path, state.get("outcome"))
    assert state["outcome"]["state"] == "SUCCEEDED" and state["succeeded"] is True
    mlflow_run = stack.mlflow_run(state["started"]["run_id"])
    tags = {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}
    assert mlflow_run["info"]["status"] == "FINISHED"
    assert tags["mmp.host"] == "gitlab" and tags["mlflow.source.name"] == PROJECT
    assert standin.states(sha) == ["pending", "success"]
    assert standin.statuses[-1]["target_url"] == state["started"]["run_url"]
    assert stack.statuses == []  # nothing went to GitHub
    code = aws.client("s3").list_objects_v2(Bucket="mmp-artifacts", Prefix="code/")["Contents"]
    assert any(sha in o["Key"] for o in code)  # Prepare staged GitLab's archive of the commit
    mails = stack.messages()
    assert len(mails) == 1 and "SUCCEEDED" in mails[0]["Subject"]
    assert TOKEN not in json.dumps(state) + json.dumps(mails) + json.dumps(standin.statuses)
