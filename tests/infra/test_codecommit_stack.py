"""The CodeCommit trigger in the Pulumi program: made only when mmp:codecommitRepositories lists
repositories, invokable only by its rule, every CodeCommit action scoped to the listed ARNs
(parliament finds nothing), and its event pattern matched by EventBridge's own matcher (moto's
TestEventPattern) against AWS's documented events."""

from __future__ import annotations

import copy
import json

import pytest

from mmp.infra.codecommit import PIPELINE_ACTIONS, TRIGGER_ACTIONS
from mmp.infra.settings import SettingsError, parse_settings

from .iam_lint import parliament

OTHER = "arn:aws:codecommit:eu-west-1:123456789012:other-repo"


@pytest.fixture(scope="module")
def cc_stack(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:codecommitRepositories": json.dumps(["fashion-demo", OTHER])})


def _policies(run) -> dict[str, dict]:
    return {p.name: json.loads(p.inputs["policy"]) for p in run.of_type("aws:iam/rolePolicy:RolePolicy")}


def _codecommit_statements(policy: dict) -> list[dict]:
    return [s for s in policy["Statement"] if any(a.startswith("codecommit:") for a in s["Action"])]


ARNS = ["arn:aws:codecommit:eu-west-1:123456789012:fashion-demo", OTHER]


def test_without_the_setting_nothing_codecommit_exists(dev):
    assert not [r for r in dev.resources if "codecommit" in r.name]
    assert all(not _codecommit_statements(p) for p in _policies(dev).values())
    assert dev.exports["codecommitRuleName"] == ""


def test_the_rule_lambda_and_role_exist_and_only_the_rule_may_invoke(cc_stack):
    rule = cc_stack.one("aws:cloudwatch/eventRule:EventRule", "codecommit")
    pattern = json.loads(rule.inputs["eventPattern"])
    assert pattern == {"source": ["aws.codecommit"], "detail-type": ["CodeCommit Repository State Change"],
                       "resources": ARNS, "detail": {"event": ["referenceCreated", "referenceUpdated"],
                                                     "referenceType": ["branch"]}}
    function = cc_stack.one("aws:lambda/function:Function", "codecommit")
    assert function.inputs["handler"] == "mmp.webhook.codecommit_lambda.lambda_handler"
    assert function.inputs["environment"]["variables"]["MMP_CODECOMMIT_REPOSITORIES"] == ",".join(ARNS)
    (permission,) = [p for p in cc_stack.of_type("aws:lambda/permission:Permission") if "codecommit" in p.name]
    assert permission.inputs["principal"] == "events.amazonaws.com"
    assert permission.inputs["sourceArn"] == rule.outputs["arn"] and rule.inputs["name"] in rule.outputs["arn"]
    target = cc_stack.one("aws:cloudwatch/eventTarget:EventTarget", "codecommit")
    assert target.inputs["arn"] == f"arn:aws:lambda:eu-west-1:123456789012:function:{function.inputs['name']}"
    assert cc_stack.exports["codecommitRuleName"] == rule.inputs["name"]


def test_every_codecommit_action_is_scoped_to_the_listed_repositories(cc_stack):
    policies = _policies(cc_stack)
    trigger = policies["codecommit-trigger"]
    (reads,) = _codecommit_statements(trigger)
    assert sorted(reads["Action"]) == sorted(TRIGGER_ACTIONS) and reads["Resource"] == ARNS
    other = [s for s in trigger["Statement"] if s not in (reads,)]
    assert {a for s in other for a in s["Action"]} == {"logs:CreateLogStream", "logs:PutLogEvents", "dynamodb:PutItem",
                                                       "dynamodb:DeleteItem", "states:StartExecution"}
    for role in ("pipeline-stages", "pipeline-runner-task"):
        (st,) = _codecommit_statements(policies[role])
        assert sorted(st["Action"]) == sorted(PIPELINE_ACTIONS) and st["Resource"] == ARNS
    assert [r for r, p in policies.items() if _codecommit_statements(p)] == sorted(
        ["codecommit-trigger", "pipeline-stages", "pipeline-runner-task"], key=list(policies).index)
    linter = parliament()
    for role in ("codecommit-trigger", "pipeline-stages", "pipeline-runner-task"):
        findings = linter.analyze_policy_string(json.dumps(policies[role])).findings
        assert not findings, (role, [(f.issue, f.detail) for f in findings])


@pytest.mark.parametrize("entries, message", [
    (["arn:aws:codecommit:us-west-2:123456789012:elsewhere"], "codecommitRepositories: .* is in us-west-2"),
    (["bad name!"], "neither a CodeCommit repository name"),
    (["demo", "arn:aws:codecommit:eu-west-1:123456789012:demo"], "demo listed more than once"),
])
def test_bad_repository_lists_fail_naming_the_key(entries, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings("dev", {"deploymentName": "acme", "codecommitRepositories": entries}, region="eu-west-1",
                       secret_keys=("githubToken", "webhookSecret", "mlflowAdminPassword"))


def test_eventbridge_matches_the_rule_to_aws_documented_events(cc_stack, fixture_json):
    """moto's EventBridge pattern matcher (its TestEventPattern answers nothing) on the rule's pattern."""
    from moto.events.models import EventPattern

    pattern = EventPattern.load(cc_stack.one("aws:cloudwatch/eventRule:EventRule", "codecommit").inputs["eventPattern"])

    def matches(name: str, **detail) -> bool:
        event = copy.deepcopy(fixture_json(f"codecommit/{name}"))
        event.update(region="eu-west-1", resources=[ARNS[0]])
        event["detail"].update(repositoryName="fashion-demo", **detail)
        return pattern.matches_event(event)

    assert matches("reference-created.json") and matches("reference-updated.json")
    assert not matches("reference-deleted.json")
    assert not matches("reference-created.json", referenceType="tag", referenceFullName="refs/tags/v1")
    unlisted = copy.deepcopy(fixture_json("codecommit/reference-created.json"))  # AWS's own MyDemoRepo
    assert not pattern.matches_event(unlisted)
