"""`mmp deploy`: the questions, their validation, and the pulumi commands it would run."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mmp.cli import app
from mmp.commands.deploy import plan

TOKEN = "ghp_deploytokenthatmustnotleak00000000000"
ARGS = dict(stack="dev", region="eu-west-2", name="acme-ml", email="ml@example.com", github_token=TOKEN)


def test_plan_sets_config_with_secrets_on_stdin_then_runs_up():
    made = iter(["generated-1", "generated-2"])
    commands = plan(**ARGS, new_secret=lambda: next(made))
    argv = [c.argv for c in commands]
    assert argv[0] == ("pulumi", "stack", "select", "--create", "dev")
    assert ("pulumi", "config", "set", "aws:region", "eu-west-2", "--stack", "dev") in argv
    assert ("pulumi", "config", "set", "mmp:deploymentName", "acme-ml", "--stack", "dev") in argv
    assert ("pulumi", "config", "set", "mmp:notifyEmail", "ml@example.com", "--stack", "dev") in argv
    secret_sets = {c.argv[4]: c.stdin for c in commands if "--secret" in c.argv}
    assert secret_sets == {"mmp:githubToken": TOKEN, "mmp:webhookSecret": "generated-1",
                           "mmp:mlflowAdminPassword": "generated-2"}
    assert argv[-1] == ("pulumi", "up", "--stack", "dev")
    assert not any(TOKEN in " ".join(c.argv) or TOKEN in c.shown() for c in commands)


def test_plan_keeps_existing_generated_secrets_and_passes_yes():
    commands = plan(**{**ARGS, "stack": "prod"}, existing=frozenset({"mmp:webhookSecret"}), yes=True)
    keys = [c.argv[4] for c in commands if "--secret" in c.argv]
    assert keys == ["mmp:githubToken", "mmp:mlflowAdminPassword"]  # the pasted webhook secret stays valid
    assert commands[-1].argv == ("pulumi", "up", "--stack", "prod", "--yes")


@pytest.mark.parametrize("field, value, message", [
    ("name", "Acme_ML", "not a deployment name"),
    ("name", "ab", "not a deployment name"),
    ("name", "acme-", "not a deployment name"),
    ("region", "europe", "not an AWS region"),
    ("email", "nobody", "not an e-mail address"),
    ("github_token", "  ", "token is empty"),
    ("stack", "dev/prod", "stack name"),
])
def test_plan_refuses_bad_answers(field, value, message):
    with pytest.raises(typer.BadParameter, match=message):
        plan(**{**ARGS, field: value})


def test_cli_asks_each_question_and_dry_runs(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    result = CliRunner().invoke(app, ["deploy", "--dry-run"],
                                input="eu-west-2\nBad Name\nacme-ml\nml@example.com\n" + TOKEN + "\n")
    assert result.exit_code == 0, result.output
    for question in ("AWS region", "Deployment name (lower-case)", "E-mail address", "GitHub token"):
        assert question in result.output
    assert "not a deployment name" in result.output  # asked again after the bad name
    assert "pulumi config set --secret mmp:githubToken --stack dev < (secret)" in result.output
    assert "pulumi up --stack dev" in result.output
    assert TOKEN not in result.output


def test_cli_without_the_pulumi_cli_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["deploy", "--region", "eu-west-1", "--name", "acme-ml", "--email",
                                      "ml@example.com", "--github-token", TOKEN])
    assert result.exit_code == 1
    assert "Pulumi CLI is not installed" in result.output
