"""The Lambda adapter: API Gateway HTTP API v2 events, DynamoDB dedupe and Step Functions hand-off (moto)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest

from ..conftest import ACCOUNT, REGION

HEAVY = ("mlflow", "torch", "pulumi", "paramiko", "typer", "rich", "sagemaker", "pydantic")
DEFINITION = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}})


@pytest.fixture
def aws(monkeypatch, gh, iam_enforced):
    from moto import mock_aws

    for key, value in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        import boto3

        boto3.client("dynamodb").create_table(
            TableName="mmp-deliveries", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}])
        sfn = boto3.client("stepfunctions")
        arn = sfn.create_state_machine(name="mmp-pipeline", definition=DEFINITION,
                                       roleArn="arn:aws:iam::123456789012:role/sfn")["stateMachineArn"]
        secret_arn = boto3.client("secretsmanager").create_secret(Name="mmp-webhook", SecretString=gh.SECRET)["ARN"]
        iam_enforced.bind({  # this fixture's names are the stack's (IAM checks: tests/iam_enforce)
            "table/mmp-deliveries": "table/DELIVERIES", arn: f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:PIPELINE",
            secret_arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:WEBHOOK_SECRET"})
        monkeypatch.setenv("MMP_DELIVERIES_TABLE", "mmp-deliveries")
        monkeypatch.setenv("MMP_STATE_MACHINE_ARN", arn)
        monkeypatch.setenv("MMP_WEBHOOK_SECRET_ARN", secret_arn)
        from mmp import aws as mmp_aws

        mmp_aws._SECRETS.clear()
        yield {"sfn": sfn, "arn": arn, "ddb": boto3.client("dynamodb")}
        mmp_aws._SECRETS.clear()


def v2_event(body: bytes, headers: dict, base64_body: bool = True, method: str = "POST") -> dict:
    """An API Gateway HTTP API payload v2 event as AWS delivers it: lower-cased headers."""
    return {
        "version": "2.0", "routeKey": "POST /webhook", "rawPath": "/webhook", "rawQueryString": "",
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {"http": {"method": method, "path": "/webhook", "protocol": "HTTP/1.1",
                                    "sourceIp": "140.82.115.1", "userAgent": "GitHub-Hookshot/1"},
                           "requestId": "abc", "stage": "$default", "timeEpoch": int(time.time() * 1000)},
        "body": base64.b64encode(body).decode() if base64_body else body.decode(),
        "isBase64Encoded": base64_body,
    }


def executions(aws):
    return aws["sfn"].list_executions(stateMachineArn=aws["arn"])["executions"]


def test_accepted_push_starts_one_execution_named_after_the_delivery(aws, gh):
    from mmp.webhook import lambda_handler

    payload = gh.with_files("push-added-and-modified.json", added=["experiment.json"])
    body = json.dumps(payload).encode()
    delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    reply = lambda_handler(v2_event(body, gh.headers_for(body, delivery=delivery)), None)
    assert reply["statusCode"] == 202 and json.loads(reply["body"])["status"] == "queued"
    (execution,) = executions(aws)
    assert execution["name"] == f"gh-{delivery}"
    described = aws["sfn"].describe_execution(executionArn=execution["executionArn"])
    assert json.loads(described["input"]) == {
        "repository": "binkkatal/sample_app", "clone_url": "https://github.com/binkkatal/sample_app.git",
        "before": payload["before"], "after": payload["after"], "ref": "refs/heads/master",
        "delivery_id": delivery, "trigger_files": ["experiment.json"]}
    item = aws["ddb"].get_item(TableName="mmp-deliveries", Key={"delivery_id": {"S": delivery}})["Item"]
    assert int(item["expires_at"]["N"]) > time.time() + 6 * 86400


def test_redelivery_and_replayed_body_do_not_start_twice(aws, gh):
    from mmp.webhook import lambda_handler

    body = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    first = lambda_handler(v2_event(body, gh.headers_for(body, delivery="d-1")), None)
    again = lambda_handler(v2_event(body, gh.headers_for(body, delivery="d-1")), None)
    replay = lambda_handler(v2_event(body, gh.headers_for(body, delivery="d-2")), None)
    assert first["statusCode"] == 202
    assert json.loads(again["body"])["status"] == json.loads(replay["body"])["status"] == "duplicate"
    assert len(executions(aws)) == 1


def test_plain_text_body_and_ignored_events(aws, gh):
    from mmp.webhook import lambda_handler

    body = gh.fixture_bytes("push-tag-deleted.json")
    reply = lambda_handler(v2_event(body, gh.headers_for(body), base64_body=False), None)
    assert reply["statusCode"] == 202 and "deleted" in json.loads(reply["body"])["reason"]
    ping = gh.fixture_bytes("ping-with-app_id.json")
    assert lambda_handler(v2_event(ping, gh.headers_for(ping, event="ping")), None)["statusCode"] == 200
    assert executions(aws) == []


@pytest.mark.parametrize("mutate, status", [
    (lambda e: e.update(body="!!not base64!!"), 400),
    (lambda e: e["headers"].update({"x-hub-signature-256": "sha256=" + "0" * 64}), 401),
    (lambda e: e["requestContext"]["http"].update(method="GET"), 405),
])
def test_bad_requests_start_nothing(aws, gh, mutate, status):
    from mmp.webhook import lambda_handler

    body = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    event = v2_event(body, gh.headers_for(body))
    mutate(event)
    assert lambda_handler(event, None)["statusCode"] == status
    assert executions(aws) == []


def test_failed_start_releases_the_claim_so_a_redelivery_launches(aws, gh, monkeypatch, iam_enforced):
    from mmp.webhook import lambda_handler

    iam_enforced.expect_denied("states:StartExecution")  # the role starts only its own machine: refused first

    body = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    monkeypatch.setenv("MMP_STATE_MACHINE_ARN", aws["arn"] + "-missing")
    reply = lambda_handler(v2_event(body, gh.headers_for(body, delivery="d-9")), None)
    assert reply["statusCode"] == 503
    assert "Item" not in aws["ddb"].get_item(TableName="mmp-deliveries", Key={"delivery_id": {"S": "d-9"}})
    monkeypatch.setenv("MMP_STATE_MACHINE_ARN", aws["arn"])
    assert lambda_handler(v2_event(body, gh.headers_for(body, delivery="d-9")), None)["statusCode"] == 202
    assert len(executions(aws)) == 1


def test_missing_configuration_is_a_clear_500(monkeypatch, gh):
    from mmp.webhook import lambda_handler

    monkeypatch.delenv("MMP_DELIVERIES_TABLE", raising=False)
    body = b"{}"
    reply = lambda_handler(v2_event(body, gh.headers_for(body)), None)
    assert reply["statusCode"] == 500 and "MMP_DELIVERIES_TABLE" in reply["body"]


def test_execution_name_is_valid_for_any_delivery_id():
    from mmp.webhook.aws_lambda import execution_name

    assert execution_name("72d3162e-cc78-11e3-81ab-4c9367dc0958") == "gh-72d3162e-cc78-11e3-81ab-4c9367dc0958"
    odd = execution_name("a:b.c" * 30)
    assert len(odd) <= 80 and odd.startswith("gh-") and ":" not in odd


def test_importing_the_lambda_module_stays_light():
    code = ("import sys, mmp.webhook.aws_lambda, mmp.webhook; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
