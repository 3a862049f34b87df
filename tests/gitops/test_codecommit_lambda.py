"""The CodeCommit trigger Lambda: AWS's documented EventBridge events (tests/fixtures/codecommit), pointed at
a real git repository behind MMP's CodeCommit stand-in, DynamoDB and Step Functions from moto, every AWS
call judged against the trigger role the Pulumi program renders (tests/iam_enforce)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from ..codecommit_standin import CodeCommitStandIn
from ..conftest import ACCOUNT, REGION, commit_all, git

DEFINITION = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}})
NAME = "fashion-demo"  # the rendered stack lists it (tests/iam_enforce/render_policies.py)
ARN = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:{NAME}"


@pytest.fixture
def cc(monkeypatch, tmp_path, iam_enforced):
    from moto import mock_aws

    for key, value in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    repo = tmp_path / NAME
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("print('hi')\n")
    (repo / "README.md").write_text("demo\n")
    base = commit_all(repo, "initial")
    with CodeCommitStandIn() as standin, mock_aws():
        import boto3

        standin.add(NAME, repo)
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", standin.url)
        boto3.client("dynamodb").create_table(
            TableName="mmp-deliveries", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}])
        sfn = boto3.client("stepfunctions")
        arn = sfn.create_state_machine(name="mmp-pipeline", definition=DEFINITION,
                                       roleArn="arn:aws:iam::123456789012:role/sfn")["stateMachineArn"]
        iam_enforced.bind({"table/mmp-deliveries": "table/DELIVERIES",
                           arn: f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:PIPELINE"})
        monkeypatch.setenv("MMP_DELIVERIES_TABLE", "mmp-deliveries")
        monkeypatch.setenv("MMP_STATE_MACHINE_ARN", arn)
        monkeypatch.setenv("MMP_CODECOMMIT_REPOSITORIES", ARN)
        yield {"repo": repo, "base": base, "sfn": sfn, "arn": arn, "standin": standin}


def event(fixture_json, name: str, commit: str, old: str | None = None, event_id: str = "5e1c7c6a-1111-4a2b-9c3d-000000000001",
          **detail) -> dict:
    """AWS's documented event, with the stand-in repository's region, ARN and commit ids."""
    body = copy.deepcopy(fixture_json(f"codecommit/{name}"))
    body.update(id=event_id, region=REGION, account=ACCOUNT, resources=[ARN])
    body["detail"].update(repositoryName=NAME, commitId=commit, **detail)
    if old is not None:
        body["detail"]["oldCommitId"] = old
    return body


def executions(cc):
    return cc["sfn"].list_executions(stateMachineArn=cc["arn"])["executions"]


def test_a_push_adding_an_experiment_starts_one_execution_with_the_github_shaped_job(cc, fixture_json):
    from mmp.webhook.codecommit_lambda import lambda_handler

    (cc["repo"] / "experiment.json").write_text("{}")
    head = commit_all(cc["repo"], "experiment")
    reply = lambda_handler(event(fixture_json, "reference-updated.json", head, old=cc["base"],
                                 referenceName="main", referenceFullName="refs/heads/main"))
    assert reply["statusCode"] == 202 and reply["status"] == "queued" and reply["job"]["trigger_files"] == ["experiment.json"]
    (execution,) = executions(cc)
    job = json.loads(cc["sfn"].describe_execution(executionArn=execution["executionArn"])["input"])
    assert job["repository"] == NAME and job["after"] == head and job["before"] == cc["base"]
    assert job["ref"] == "refs/heads/main" and job["delivery_id"] == "5e1c7c6a-1111-4a2b-9c3d-000000000001"
    assert job["clone_url"] == f"https://git-codecommit.{REGION}.amazonaws.com/v1/repos/{NAME}"
    assert job.get("host", "codecommit") == "codecommit"
    # EventBridge delivers at least once: the same event again launches nothing
    again = lambda_handler(event(fixture_json, "reference-updated.json", head, old=cc["base"],
                                 referenceName="main", referenceFullName="refs/heads/main"))
    assert again["statusCode"] == 200 and again["status"] == "duplicate" and len(executions(cc)) == 1
    assert {"GetCommit", "GetDifferences"} <= set(cc["standin"].operations())


def test_a_new_branch_is_compared_with_the_default_branch(cc, fixture_json):
    from mmp.webhook.codecommit_lambda import lambda_handler

    git(cc["repo"], "checkout", "-q", "-b", "myBranch")
    (cc["repo"] / "notes.txt").write_text("no experiment here")
    head = commit_all(cc["repo"], "notes")
    reply = lambda_handler(event(fixture_json, "reference-created.json", head))
    assert reply["statusCode"] == 202 and "no change to experiment.json" in reply["reason"]
    (cc["repo"] / "experiment_config.json").write_text("{}")
    head = commit_all(cc["repo"], "experiment on the branch")
    reply = lambda_handler(event(fixture_json, "reference-created.json", head, event_id="second-event"))
    assert reply["statusCode"] == 202 and reply["job"]["trigger_files"] == ["experiment_config.json"]
    assert reply["job"]["before"] == "0" * 40  # a new branch, as GitHub says it
    differences = [p for op, p in cc["standin"].calls if op == "GetDifferences"]
    assert differences[-1]["beforeCommitSpecifier"] == "main"


@pytest.mark.parametrize("change, answer", [
    ({"resources": [f"arn:aws:codecommit:{REGION}:{ACCOUNT}:someone-elses"]}, (403, "not one this stack listens to")),
    ({"detail": {"repositoryName": "other"}}, (400, "is not the one its ARN names")),
    ({"detail": {"commitId": "f" * 40}}, (404, "does not exist in fashion-demo")),
    ({"detail": {"commitId": "3e5983DESTINATION"}}, (400, "40-character hex")),
    ({"detail": {"referenceFullName": "refs/heads/--upload-pack=x"}}, (400, "starting with '-'")),
    ({"detail": {"referenceType": "tag", "referenceFullName": "refs/tags/v1"}}, (202, "not a branch")),
    ({"detail-type": "CodeCommit Pull Request State Change"}, (202, "not a CodeCommit Repository State Change")),
])
def test_the_event_is_a_pointer_checked_before_anything_starts(cc, fixture_json, change, answer):
    from mmp.webhook.codecommit_lambda import lambda_handler

    (cc["repo"] / "experiment.json").write_text("{}")
    body = event(fixture_json, "reference-created.json", commit_all(cc["repo"]))
    detail = change.pop("detail", {})
    body.update(change)
    body["detail"].update(detail)
    reply = lambda_handler(body)
    assert (reply["statusCode"], answer[1] in json.dumps(reply)) == (answer[0], True), reply
    assert executions(cc) == []


def test_a_deleted_branch_is_ignored(cc, fixture_json):
    from mmp.webhook.codecommit_lambda import lambda_handler

    body = copy.deepcopy(fixture_json("codecommit/reference-deleted.json"))
    body.update(region=REGION, resources=[ARN])
    body["detail"].update(repositoryName=NAME, oldCommitId=cc["base"])
    reply = lambda_handler(body)
    assert reply["statusCode"] == 202 and "referenceDeleted" in reply["reason"] and executions(cc) == []


def test_a_failed_hand_off_raises_so_lambda_retries_and_releases_the_claim(cc, fixture_json):
    from mmp.webhook import codecommit_lambda

    (cc["repo"] / "experiment.json").write_text("{}")
    head = commit_all(cc["repo"])
    cc["sfn"].delete_state_machine(stateMachineArn=cc["arn"])  # StartExecution now fails in the service
    with pytest.raises(codecommit_lambda.RetryLater, match="could not be queued"):
        codecommit_lambda.lambda_handler(event(fixture_json, "reference-updated.json", head, old=cc["base"]))
    assert cc["sfn"].create_state_machine(name="mmp-pipeline", definition=DEFINITION,
                                          roleArn="arn:aws:iam::123456789012:role/sfn")["stateMachineArn"] == cc["arn"]
    reply = codecommit_lambda.lambda_handler(event(fixture_json, "reference-updated.json", head, old=cc["base"]))
    assert reply["statusCode"] == 202 and reply["status"] == "queued" and len(executions(cc)) == 1


def test_the_lambda_stays_light():
    code = ("import sys; import mmp.webhook.codecommit_lambda, mmp.hosts.codecommit; "
            "print(sorted(m for m in ('mlflow','torch','pulumi','paramiko','typer','rich','pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
