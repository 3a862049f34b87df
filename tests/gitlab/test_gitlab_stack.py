"""The Pulumi program's GitLab part, rendered under Pulumi's mocks (preview=False): a route and a secret
beside GitHub's only when the GitLab secrets are set, and roles that read exactly those secrets."""

from __future__ import annotations

import json

import pytest

from ..infra import conftest as h
from mmp.infra.settings import SettingsError, parse_settings

GITLAB = {"mmp:gitlabToken": "glpat-stacktoken-thatmustnotleak", "mmp:gitlabWebhookSecret": "gitlab-webhook-thatmustnotleak",
          "mmp:gitlabUrl": "https://git.example.org"}


@pytest.fixture(scope="module")
def with_gitlab():
    return h.run_stack("dev", {**h.DEV_CONFIG, **GITLAB})


def _policy(run, name_part: str) -> dict:
    return json.loads(run.one("aws:iam/rolePolicy:RolePolicy", name_part).inputs["policy"])


def _secret_resources(policy: dict) -> set[str]:
    found = set()
    for st in policy["Statement"]:
        if "secretsmanager:GetSecretValue" in st["Action"]:
            found |= set([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])
    return found


def test_gitlab_route_secret_and_environment(with_gitlab):
    routes = sorted(r.inputs["routeKey"] for r in with_gitlab.of_type("aws:apigatewayv2/route:Route"))
    assert routes == ["POST /webhook", "POST /webhook/gitlab"]
    stage = with_gitlab.one("aws:apigatewayv2/stage:Stage")
    assert sorted(s["routeKey"] for s in stage.inputs["routeSettings"]) == routes  # both throttled
    permissions = [p.inputs["sourceArn"] for p in with_gitlab.of_type("aws:lambda/permission:Permission")
                   if p.inputs.get("principal") == "apigateway.amazonaws.com"]
    assert any(a.endswith("/*/*/webhook/gitlab") for a in permissions)
    webhook = with_gitlab.one("aws:lambda/function:Function", "webhook-handler").inputs["environment"]["variables"]
    gitlab_secret = with_gitlab.one("aws:secretsmanager/secret:Secret", "webhook-gitlab-secret")
    gitlab_token = with_gitlab.one("aws:secretsmanager/secret:Secret", "pipeline-gitlab-token")
    assert webhook["MMP_GITLAB_WEBHOOK_SECRET_ARN"] == gitlab_secret.outputs["arn"]
    assert webhook["MMP_GITLAB_TOKEN_SECRET_ARN"] == gitlab_token.outputs["arn"]
    assert webhook["MMP_GITLAB_URL"] == "https://git.example.org"
    assert with_gitlab.exports["gitlabWebhookUrl"].endswith("/webhook/gitlab")
    assert _secret_resources(_policy(with_gitlab, "webhook-lambda")) >= {gitlab_secret.outputs["arn"],
                                                                         gitlab_token.outputs["arn"]}
    assert gitlab_token.outputs["arn"] in _secret_resources(_policy(with_gitlab, "pipeline-stages"))
    rendered = json.dumps([r.inputs for r in with_gitlab.resources], default=str)
    for value in GITLAB.values():  # the secrets reach Secrets Manager versions only
        if value.startswith("https://"):
            continue
        versions = [r for r in with_gitlab.of_type("aws:secretsmanager/secretVersion:SecretVersion")
                    if value in json.dumps(r.inputs, default=str)]
        assert len(versions) == 1 and rendered.count(value) == 1


def test_without_gitlab_there_is_no_gitlab_route_secret_or_grant():
    run = h.run_stack("dev", h.DEV_CONFIG)
    assert [r.inputs["routeKey"] for r in run.of_type("aws:apigatewayv2/route:Route")] == ["POST /webhook"]
    assert not [s for s in run.of_type("aws:secretsmanager/secret:Secret") if "gitlab" in s.name]
    assert "gitlabWebhookUrl" not in run.exports
    env = run.one("aws:lambda/function:Function", "webhook-handler").inputs["environment"]["variables"]
    assert not [k for k in env if "GITLAB" in k]


def test_one_gitlab_secret_without_the_other_is_refused_naming_it():
    values = {k.removeprefix("mmp:"): v for k, v in h.DEV_CONFIG.items() if k.startswith("mmp:")}
    secrets = {"githubToken", "webhookSecret", "mlflowAdminPassword", "gitlabToken"}
    with pytest.raises(SettingsError, match="gitlabWebhookSecret: GitLab needs both"):
        parse_settings("dev", {**values, "gitlabToken": "x"}, region="eu-west-1", secret_keys=tuple(secrets))
