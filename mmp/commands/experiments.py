"""`mmp validate`, `run`, `runs`, `status`, `logs`, `cancel`: one experiment's life."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from . import app, console, err_console, fail, print_json


@app.command()
def validate(
    file: Optional[Path] = typer.Argument(None, help="experiment.json (default: the one in the current folder)."),
    schema: bool = typer.Option(False, "--schema", help="Print the JSON Schema of experiment.json and exit."),
    no_catalogue: bool = typer.Option(False, "--no-catalogue", help="Do not check Dataset_Name against the catalogue."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check an experiment file; exit 1 listing every field error (usable as a pre-commit hook)."""
    from ..backends import available_platforms
    from ..datasets import load_catalogue
    from ..experiment import ExperimentError, json_schema, load_experiment

    if schema:
        print_json(json_schema())
        return
    path = file or Path.cwd()
    try:
        experiment = load_experiment(
            path, datasets=None if no_catalogue else load_catalogue().keys(), platforms=available_platforms()
        )
    except ExperimentError as exc:
        if as_json:
            print_json({"valid": False, "problems": [p.model_dump() for p in exc.problems]})
        else:
            err_console().print(f"[bold red]{exc.source} is invalid[/]")
            for p in exc.problems:
                err_console().print(f"  [red]✗[/] [bold]{p.field}[/]: {p.message}", soft_wrap=True)
        raise typer.Exit(1)
    except FileNotFoundError as exc:
        fail(f"{exc.filename}: no such file", 1)
    if as_json:
        print_json({"valid": True, "experiment": experiment.to_file_dict(), "notes": experiment.notes()})
    else:
        console().print(f"[green]✓[/] valid: {experiment.describe()}")
        for note in experiment.notes():
            console().print(f"  note: {note}", markup=False)


@app.command()
def run(
    file: Optional[Path] = typer.Argument(None, help="Experiment file to use instead of the committed one."),
    repo: Path = typer.Option(Path("."), "--repo", help="The git repository holding train.py."),
    commit: str = typer.Option("HEAD", "--commit", help="Commit to train (default HEAD)."),
    detach: bool = typer.Option(False, "--detach", help="Return at once; follow with `mmp runs` / `mmp logs`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream the training log."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Launch the experiment at the repository's commit without a push, and follow it."""
    from .. import gitutil
    from ..pipeline.runs import local_trigger, run_trigger

    try:
        sha = gitutil.resolve(repo, commit)
    except gitutil.GitError as exc:
        fail(str(exc), 2)
    if detach:
        log_dir = _detached_log_dir()
        log_file = log_dir / f"run-{sha[:12]}-{int(time.time())}.log"
        argv = [sys.executable, "-m", "mmp", "run", "--repo", str(Path(repo).resolve()), "--commit", sha, "--quiet"]
        if file:
            argv.insert(3, str(Path(file).resolve()))
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        if as_json:
            print_json({"detached": True, "pid": proc.pid, "commit": sha, "log": str(log_file)})
        else:
            console().print(f"started in the background (pid {proc.pid}); follow with [bold]mmp runs[/] "
                            f"and [bold]mmp logs RUN[/]")
        return
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from ..pipeline.runs import local_stack_tracking_uri

        stack_uri = local_stack_tracking_uri()
        if stack_uri:
            os.environ["MLFLOW_TRACKING_URI"] = stack_uri
    trigger = local_trigger(repo, sha, experiment_file=file)
    on_log = None if (quiet or as_json) else _print_line
    outcome = run_trigger(trigger, on_log=on_log, on_launch=None if as_json else _announce)
    if as_json:
        print_json({"state": outcome.state, "message": outcome.message, "run_id": outcome.run_id,
                    "run_url": outcome.run_url, "problems": outcome.problems})
    elif outcome.state == "INVALID":
        err_console().print("[bold red]not launched:[/]")
        for problem in outcome.problems:
            err_console().print(f"  [red]✗[/] {problem}", soft_wrap=True)
    else:
        colour = "green" if outcome.ok else "red"
        console().print(f"[bold {colour}]{outcome.state}[/] run {outcome.run_id}: {outcome.message}")
        if outcome.run_url:
            console().print(f"MLflow run: {outcome.run_url}")
    if not outcome.ok:
        raise typer.Exit(2 if outcome.state == "INVALID" else 1)


def _detached_log_dir() -> Path:
    from .. import config

    path = config.mmp_home() / "detached"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _announce(run_id: str, handle) -> None:
    err_console().print(f"[dim]launched run {run_id} on {handle.platform} (job {handle.job_id})[/]")


@app.command("runs")
def list_runs(
    limit: int = typer.Option(20, "--limit", "-n"),
    state: Optional[str] = typer.Option(None, "--state", help="PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent runs, newest first."""
    from ..pipeline.store import RunStore

    records = RunStore().list(limit=limit, state=state)
    if as_json:
        print_json([r.to_dict() for r in records])
        return
    from rich.table import Table

    table = Table(title="runs")
    for col in ("run", "state", "experiment", "commit", "platform", "started", "message"):
        table.add_column(col, overflow="fold")
    colours = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan"}
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        table.add_row(r.run_id[:12], f"[{colours.get(r.state, 'white')}]{r.state}[/]", r.experiment,
                      r.commit_sha[:7], r.platform, started, r.message[:60])
    console().print(table)


def _record(run_id: str):
    from ..pipeline.store import RunStore

    record = RunStore().get(run_id)
    if record is None:
        fail(f"no run {run_id!r} (see `mmp runs`)", 2)
    return record


@app.command()
def status(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One run's state, platform and links."""
    record = _record(run_id)
    if as_json:
        print_json(record.to_dict())
        return
    c = console()
    for key in ("run_id", "state", "message", "experiment", "repository", "commit_sha", "platform", "run_url"):
        c.print(f"[bold]{key:>11}[/] {getattr(record, key) or '-'}", soft_wrap=True)


@app.command()
def logs(run_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends.")) -> None:
    """Print a run's training log."""
    from ..backends import JobHandle, get_backend

    record = _record(run_id)
    if not record.handle:
        fail(f"run {record.run_id} has no job yet (state {record.state})", 1)
    handle = JobHandle.from_dict(record.handle)
    backend = get_backend(handle.platform)
    cursor = None
    while True:
        lines, cursor = backend.logs(handle, cursor)
        for line in lines:
            _print_line(line)
        if not follow or _record(run_id).state not in ("PENDING", "RUNNING"):
            if follow:
                for line in backend.logs(handle, cursor)[0]:
                    _print_line(line)
            break
        time.sleep(1.0)


@app.command()
def cancel(run_id: str) -> None:
    """Stop a run and everything it started; the pipeline then marks it KILLED."""
    from ..backends import JobHandle, get_backend

    from ..tuning import control as study_control

    record = _record(run_id)
    if record.state not in ("PENDING", "RUNNING"):
        fail(f"run {record.run_id} is already {record.state}", 1)
    if study_control.request_cancel(record.run_id):
        console().print(f"cancel sent to study {record.run_id}: its running trials stop and it ends as KILLED")
        return
    if not record.handle:
        fail(f"run {record.run_id} has no job to cancel yet", 1)
    handle = JobHandle.from_dict(record.handle)
    get_backend(handle.platform).cancel(handle)
    console().print(f"cancel sent to run {record.run_id}")
