"""`mmp deploy`: what the seed's bin/deploy asked, then `pulumi up` for one stack.

It asks for the region, a lower-case deployment name, an e-mail address for the
notifications and a GitHub token (each also an option), sets the stack's config
(the token, a generated webhook secret and a generated MLflow admin password as
Pulumi secrets, passed on stdin so they never appear in a process list), then
runs `pulumi up`. Existing generated secrets are kept, so re-running does not
break the webhook already pasted into GitHub. `plan()` builds the commands and is
what the tests check; running them needs the Pulumi CLI.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import typer

from mmp.commands import app, console, esc, fail

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
STACK_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
GENERATED = ("mmp:webhookSecret", "mmp:mlflowAdminPassword")


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    stdin: str | None = None  # secret values go here, never in argv

    def shown(self) -> str:
        return " ".join(self.argv) + (" < (secret)" if self.stdin is not None else "")


def check_region(value: str) -> str:
    if not REGION_RE.fullmatch(value or ""):
        raise typer.BadParameter(f"{value!r} is not an AWS region such as us-east-1 or eu-west-2")
    return value


def check_name(value: str) -> str:
    from mmp.infra.settings import validate_name

    try:
        return validate_name(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def check_email(value: str) -> str:
    from mmp.infra.settings import validate_email

    try:
        return validate_email(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def check_token(value: str) -> str:
    if not value or not value.strip() or any(c.isspace() for c in value.strip()):
        raise typer.BadParameter("the GitHub token is empty or has spaces")
    return value.strip()


def plan(*, stack: str, region: str, name: str, email: str, github_token: str, existing: frozenset[str] = frozenset(),
         yes: bool = False, new_secret=lambda: secrets.token_urlsafe(32)) -> list[Command]:
    """The pulumi commands, in order, for this stack (values validated first)."""
    if not STACK_RE.fullmatch(stack):
        raise typer.BadParameter(f"stack name {stack!r}: letters, digits, '_', '.', '-'")
    check_region(region), check_name(name), check_email(email), check_token(github_token)
    s = ("--stack", stack)
    commands = [
        Command(("pulumi", "stack", "select", "--create", stack)),
        Command(("pulumi", "config", "set", "aws:region", region, *s)),
        Command(("pulumi", "config", "set", "mmp:deploymentName", name, *s)),
        Command(("pulumi", "config", "set", "mmp:notifyEmail", email, *s)),
        Command(("pulumi", "config", "set", "--secret", "mmp:githubToken", *s), stdin=github_token.strip()),
    ]
    for key in GENERATED:
        if key not in existing:
            commands.append(Command(("pulumi", "config", "set", "--secret", key, *s), stdin=new_secret()))
    commands.append(Command(("pulumi", "up", *s, *(("--yes",) if yes else ()))))
    return commands


def _existing(stack: str, cwd: Path) -> frozenset[str]:
    found = set()
    for key in GENERATED:
        probe = subprocess.run(["pulumi", "config", "get", key, "--stack", stack], cwd=cwd,
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip():
            found.add(key)
    return frozenset(found)


@app.command()
def deploy(
    region: str = typer.Option(..., "--region", prompt="AWS region", callback=check_region,
                               envvar="AWS_REGION", help="AWS region, e.g. us-east-1"),
    name: str = typer.Option(..., "--name", prompt="Deployment name (lower-case)", callback=check_name,
                             help="lower-case deployment name: 3-20 of a-z, 0-9, '-'"),
    email: str = typer.Option(..., "--email", prompt="E-mail address for notifications", callback=check_email),
    github_token: str = typer.Option(..., "--github-token", prompt="GitHub token", hide_input=True,
                                     envvar="GITHUB_TOKEN", callback=check_token,
                                     help="token with repo contents read and commit statuses write"),
    stack: str = typer.Option("dev", "--stack", help="the Pulumi stack (environment): dev, prod, ..."),
    yes: bool = typer.Option(False, "--yes", help="pass --yes to pulumi up (no preview prompt)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the pulumi commands (secrets hidden) only"),
    cwd: Path = typer.Option(PROJECT_ROOT, "--cwd", help="the folder with Pulumi.yaml"),
) -> None:
    """Set the stack's config (secrets as secrets) and run `pulumi up`."""
    if dry_run:
        for command in plan(stack=stack, region=region, name=name, email=email, github_token=github_token, yes=yes):
            console().print(command.shown(), markup=False)
        return
    if shutil.which("pulumi") is None:
        fail("the Pulumi CLI is not installed (https://www.pulumi.com/docs/install/); "
             "`mmp deploy --dry-run` shows what it would run")
    if not (cwd / "Pulumi.yaml").is_file():
        fail(f"{cwd} has no Pulumi.yaml; pass --cwd")
    # The stack must exist before its config can be read.
    subprocess.run(["pulumi", "stack", "select", "--create", stack], cwd=cwd, check=False)
    commands = plan(stack=stack, region=region, name=name, email=email, github_token=github_token,
                    existing=_existing(stack, cwd), yes=yes)
    for command in commands:
        console().print(f"[dim]$ {esc(command.shown())}[/]")
        done = subprocess.run(list(command.argv), cwd=cwd, input=command.stdin, text=True)
        if done.returncode != 0:
            fail(f"`{command.shown()}` failed (exit {done.returncode})", done.returncode)
    url = subprocess.run(["pulumi", "stack", "output", "webhookUrl", "--stack", stack], cwd=cwd,
                         capture_output=True, text=True).stdout.strip()
    console().print(
        f"\nPaste into GitHub → the repository → Settings → Webhooks → Add webhook:\n"
        f"  Payload URL: {url}\n  Content type: application/json\n"
        f"  Secret: `pulumi stack output webhookSecret --show-secrets --stack {stack}`\n"
        f"  Events: Just the push event\n"
        f"Then confirm the SNS subscription mail sent to {email}.", markup=False)
