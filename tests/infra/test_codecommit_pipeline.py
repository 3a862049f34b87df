"""End to end on AWS's side for a CodeCommit push: AWS's documented EventBridge event goes through the
trigger Lambda (moto's DynamoDB and Step Functions), the execution's input goes through the state
machine the Pulumi program deploys (tests/infra/sfn.py) to a trained, concluded run in a real MLflow
server, and the run reports back as one comment on MMP's CodeCommit stand-in. Every AWS call is judged
against the role that makes it (the trigger's, the stages', the state machine's)."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest

from mmp import aws

from ..codecommit_standin import CodeCommitStandIn
from ..conftest import ACCOUNT, REGION, commit_all
from .pipeline_stack import OK_TRAIN, experiment, head, stack, stages_mlflow  # noqa: F401

NAME = "fashion-demo"  # the rendered stack lists it (tests/iam_enforce/render_policies.py)
ARN = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:{NAME}"
SAGEMAKER_PATH = ["Prepare", "NeedsRunner?", "Accepted?", "BuildImage", "Train where?", "Launch", "Launched?", "Train",
                  "Conclude", "Succeeded?", "Done"]
PASS = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}})


@pytest.fixture
def codecommit(stack, monkeypatch, iam_enforced):  # noqa: F811
    ddb, sfn = aws.client("dynamodb"), aws.client("stepfunctions")
    ddb.create_table(TableName="mmp-deliveries", BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}])
    machine = sfn.create_state_machine(name="mmp-pipeline", definition=PASS,
                                       roleArn=f"arn:aws:iam::{ACCOUNT}:role/sfn")["stateMachineArn"]
    iam_enforced.bind({"table/mmp-deliveries": "table/DELIVERIES",
                       machine: f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:PIPELINE"})
    for key, value in {"MMP_DELIVERIES_TABLE": "mmp-deliveries", "MMP_STATE_MACHINE_ARN": machine,
                       "MMP_CODECOMMIT_REPOSITORIES": ARN}.items():
        monkeypatch.setenv(key, value)
    with CodeCommitStandIn() as standin:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", standin.url)
        yield standin, sfn, machine


def test_a_codecommit_push_trains_through_the_state_machine_and_comments_on_the_commit(
        stack, codecommit, make_repo, monkeypatch, fixture_json):  # noqa: F811
    from mmp.webhook.codecommit_lambda import lambda_handler

    standin, sfn, machine = codecommit
    repo = make_repo(name=NAME, experiment=experiment(), files={"train.py": OK_TRAIN, "notes.md": "not shipped",
                                                                ".gitattributes": "*.md export-ignore\n"})
    before = head(repo)
    (repo / "experiment.json").write_text(json.dumps(experiment(Hyperparameters="{'epochs': '2'}")))
    after = commit_all(repo, "two epochs")
    standin.add(NAME, repo)

    event = copy.deepcopy(fixture_json("codecommit/reference-updated.json"))  # AWS's documented event
    event.update(id="8d3c5f0e-2222-4b6e-8f10-codecommit01", region=REGION, account=ACCOUNT, resources=[ARN])
    event["detail"].update(repositoryName=NAME, referenceName="main", referenceFullName="refs/heads/main",
                           commitId=after, oldCommitId=before)
    reply = lambda_handler(event)
    assert reply["statusCode"] == 202 and reply["status"] == "queued"
    (execution,) = sfn.list_executions(stateMachineArn=machine)["executions"]
    start = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
    assert start["host"] == "codecommit" and start["trigger_files"] == ["experiment.json"]

    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == SAGEMAKER_PATH, (run.path, state.get("outcome"))
    assert state["outcome"]["state"] == "SUCCEEDED"
    mlflow_run = stack.mlflow_run(state["started"]["run_id"])
    assert mlflow_run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}
    assert tags["mlflow.source.name"] == NAME and tags["mmp.host"] == "codecommit"

    # The code the job ran: built from GetFolder + GetBlob, export-ignore honoured as git archive does.
    bucket, _, key = state["image"]["code_uri"].removeprefix("s3://").partition("/")
    body = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = set(tar.getnames())
    assert {"train.py", "experiment.json"} <= names and "notes.md" not in names

    # One comment on the commit, edited from pending to the result with the MLflow link.
    (comment,) = standin.comments_on(NAME, after)
    assert [h.splitlines()[0] for h in comment["_history"]] == ["**MMP mmp/training**: ⏳ pending",
                                                                "**MMP mmp/training**: ✅ success"]
    assert state["started"]["run_url"] in comment["content"]
    mails = stack.messages()
    assert len(mails) == 1 and "SUCCEEDED" in mails[0]["Subject"]
