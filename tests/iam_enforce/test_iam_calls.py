"""The IAM checker itself: it refuses what the rendered policies do not grant (by action, by
resource ARN, by condition key), models S3's 403 for a missing key, and reports a refused
call by code path, role and action. Policies are the stack's, rendered by the Pulumi program."""

from __future__ import annotations

import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

import iam_calls
from iam_calls import Request, allowed

from ..conftest import ACCOUNT, REGION, create_bucket

ARTIFACTS = "arn:aws:s3:::ARTIFACTS"


def test_the_evaluator_refuses_an_action_the_role_lacks(iam_policies):
    stages = iam_policies["pipeline-stages"]
    topic = f"arn:aws:sns:{REGION}:{ACCOUNT}:NOTIFY_TOPIC"
    assert allowed(stages, Request("sns:Publish", topic))
    assert not allowed(stages, Request("sns:Subscribe", topic))
    assert not allowed(iam_policies["webhook-lambda"], Request("sns:Publish", topic))


def test_the_evaluator_refuses_a_resource_outside_the_granted_arns(iam_policies):
    stages = iam_policies["pipeline-stages"]
    assert allowed(stages, Request("s3:PutObject", f"{ARTIFACTS}/code/octo/demo/abc.tar.gz"))
    assert not allowed(stages, Request("s3:PutObject", f"{ARTIFACTS}/runner/abc/result.json"))
    assert not allowed(stages, Request("s3:PutObject", "arn:aws:s3:::DATASETS/code/x"))
    jobs = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/"
    assert allowed(stages, Request("sagemaker:StopTrainingJob", jobs + "JOBS-fashion-1"))
    assert not allowed(stages, Request("sagemaker:StopTrainingJob", jobs + "someone-elses-job"))
    # "." in a granted ARN is a character, not a regex wildcard (moto's own matcher treats it as one)
    assert not allowed({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::a.b/*"}]},
                       Request("s3:GetObject", "arn:aws:s3:::axb/k"))


def test_the_evaluator_refuses_a_call_whose_condition_keys_do_not_match(iam_policies):
    task = iam_policies["pipeline-runner-task"]
    assert allowed(task, Request("s3:ListBucket", ARTIFACTS, {"s3:prefix": "runner/study/d1/journal/"}))
    assert not allowed(task, Request("s3:ListBucket", ARTIFACTS, {"s3:prefix": "code/"}))
    assert not allowed(task, Request("s3:ListBucket", ARTIFACTS))  # a missing key fails a positive operator
    role = f"arn:aws:iam::{ACCOUNT}:role/SAGEMAKER_ROLE"
    assert allowed(task, Request("iam:PassRole", role, {"iam:PassedToService": "sagemaker.amazonaws.com"}))
    assert not allowed(task, Request("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"}))
    instance = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0123"
    assert allowed(task, Request("ec2:TerminateInstances", instance, {"aws:ResourceTag/mmp:managed": "true"}))
    assert not allowed(task, Request("ec2:TerminateInstances", instance, {"aws:ResourceTag/Name": "someone's"}))


def test_an_explicit_deny_wins_and_negated_operators_pass_on_a_missing_key():
    policy = {"Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/*"},
        {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*",
         "Condition": {"StringNotEquals": {"aws:PrincipalTag/team": "ml"}}}]}
    assert allowed(policy, Request("s3:GetObject", "arn:aws:s3:::b/k"))
    assert not allowed(policy, Request("s3:DeleteObject", "arn:aws:s3:::b/k"))
    assert allowed(policy, Request("s3:DeleteObject", "arn:aws:s3:::b/k", {"aws:PrincipalTag/team": "ml"}))


# -- through botocore, against moto: what a code path sees --------------------------------------

def _demo_path(role: str, monkeypatch) -> None:
    """Make `as_role` below an entry point of `role` for this test."""
    monkeypatch.setitem(iam_calls.ENTRY_POINTS, ("tests/iam_enforce/test_iam_calls.py", "as_role"),
                        (f"demo as {role}", role))


def as_role(fn):
    return fn()


def test_a_missing_key_answers_403_without_list_bucket_and_404_with_it(aws_env, iam_enforced, monkeypatch):
    from mmp import aws

    create_bucket(aws.client("s3"), "mmp-artifacts")
    iam_enforced.bind({"arn:aws:s3:::mmp-artifacts": ARTIFACTS})
    s3 = aws.client("s3")
    _demo_path("pipeline-stages", monkeypatch)  # GetObject on runner/*, no s3:ListBucket on the whole bucket
    with pytest.raises(ClientError) as denied:
        as_role(lambda: s3.get_object(Bucket="mmp-artifacts", Key="runner/run-1/result.json"))
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as head:
        as_role(lambda: s3.head_object(Bucket="mmp-artifacts", Key="runner/run-1/result.json"))
    assert head.value.response["Error"]["Code"] == "403"
    assert as_role(lambda: aws.s3_keys(s3, "mmp-artifacts", "runner/run-1/")) == []  # listing under runner/ is granted
    _demo_path("pipeline-sagemaker", monkeypatch)  # this role may list the artifacts bucket: S3 says 404
    with pytest.raises(ClientError) as missing:
        as_role(lambda: s3.head_object(Bucket="mmp-artifacts", Key="runner/run-1/result.json"))
    assert missing.value.response["Error"]["Code"] == "404"


def test_a_call_no_role_grants_is_refused_and_named_by_code_path_role_and_action(aws_env, iam_enforced, monkeypatch):
    from mmp import aws

    _demo_path("webhook-lambda", monkeypatch)
    with pytest.raises(ClientError) as denied:
        as_role(lambda: aws.client("sns").publish(TopicArn=f"arn:aws:sns:{REGION}:{ACCOUNT}:mmp-notify", Message="x"))
    message = denied.value.response["Error"]["Message"]
    assert "demo as webhook-lambda" in message and "role webhook-lambda" in message and "sns:Publish" in message
    (call,) = iam_enforced.calls()
    assert (call.code_path, call.role, call.action, call.allowed) == ("demo as webhook-lambda", "webhook-lambda",
                                                                      "sns:Publish", False)
    iam_enforced.expect_denied("sns:Publish")  # else this test's teardown fails with the same names


def test_an_unmapped_operation_is_an_error_not_a_pass(aws_env, iam_enforced, monkeypatch):
    from mmp import aws

    _demo_path("pipeline-stages", monkeypatch)
    with pytest.raises(iam_calls.Unmapped, match="sns.CreateTopic"):
        as_role(lambda: aws.client("sns").create_topic(Name="x"))
    iam_enforced.expect_denied("?")


def test_a_subprocess_on_the_iam_pythonpath_is_checked_too(aws_env, iam_enforced):
    """The SageMaker entrypoint and the DLAMI ranks run as processes of their own: they load
    iam_enforce/sitecustomize.py and write to the same call log."""
    code = ("from mmp import aws\n"
            "def main():\n"
            "    aws.client('sns').publish(TopicArn='arn:aws:sns:%s:%s:t', Message='x')\n"
            "main.__code__ = main.__code__.replace(co_filename='/x/mmp/runtime/rank.py')\n"
            "try:\n    main()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n" % (REGION, ACCOUNT))
    import os

    env = {**os.environ, "PYTHONPATH": iam_enforced.pythonpath}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "AccessDenied" in out.stdout, out.stderr[-2000:]
    (call,) = iam_enforced.calls()
    assert (call.code_path, call.role, call.action) == ("DLAMI training container (rank)", "dlami-host", "sns:Publish")
    iam_enforced.expect_denied("sns:Publish")


def test_the_docs_table_reads_back_what_it_was_written_from_and_the_doc_lists_every_role():
    import iam_doc

    rows = {("pipeline-stages", "Prepare", "s3:ListBucket"), ("pipeline-stages", "Prepare", "sns:Publish"),
            ("webhook-lambda", "webhook", "states:StartExecution")}
    assert iam_doc.documented(iam_doc.render(rows)) == rows
    in_doc = {role for role, _, _ in iam_doc.documented(iam_doc.DOC.read_text())}
    assert {"pipeline-stages", "pipeline-runner-task", "pipeline-sagemaker", "dlami-host", "webhook-lambda",
            "pipeline-sfn", "pipeline-build", "pipeline-runner-build"} <= in_doc


def test_train_pys_roles_write_the_artifacts_bucket_but_never_the_pipelines_record_of_runs(iam_policies):
    """Issue 20.7: promotion trusts pipeline-runs/<run id> (mmp.pipeline.run_record); the explicit Deny
    keeps the roles train.py runs with from forging one, and only the pipeline's roles write it."""
    record = f"{ARTIFACTS}/pipeline-runs/0123456789abcdef"
    for role in ("pipeline-sagemaker", "dlami-host", "kubernetes-training"):
        assert allowed(iam_policies[role], Request("s3:PutObject", f"{ARTIFACTS}/fashion/run/output/model.tar.gz"))
        assert not allowed(iam_policies[role], Request("s3:PutObject", record)), role
        assert not allowed(iam_policies[role], Request("s3:DeleteObject", record)), role
    assert allowed(iam_policies["pipeline-stages"], Request("s3:PutObject", record))  # Prepare
    task = iam_policies["pipeline-runner-task"]
    assert allowed(task, Request("s3:PutObject", record))  # a study's trials
    assert allowed(task, Request("s3:ListBucket", ARTIFACTS, {"s3:prefix": "pipeline-runs/0123456789abcdef"}))
    writers = [name for name, doc in iam_policies.items() if allowed(doc, Request("s3:PutObject", record))]
    assert sorted(writers) == ["pipeline-runner-task", "pipeline-stages"], writers
