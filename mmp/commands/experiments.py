"""`mmp validate`, `run`, `runs`, `status`, `logs`, `cancel`: one experiment's life."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from mmp.commands import app, console, err_console, esc, fail, print_json


@app.command()
def validate(
    file: Optional[Path] = typer.Argument(None, help="experiment.json (default: the one in the current folder)."),
    schema: bool = typer.Option(False, "--schema", help="Print the JSON Schema of experiment.json and exit."),
    no_catalogue: bool = typer.Option(False, "--no-catalogue", help="Do not check Dataset_Name against the catalogue."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check an experiment file; exit 1 listing every field error (usable as a pre-commit hook)."""
    from mmp.backends import available_platforms
    from mmp.contract.datasets import load_catalogue
    from mmp.contract.experiment import ExperimentError, json_schema, load_experiment

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
            err_console().print(f"[bold red]{esc(exc.source)} is invalid[/]")
            for p in exc.problems:
                err_console().print(f"  [red]✗[/] [bold]{esc(p.field)}[/]: {esc(p.message)}", soft_wrap=True)
        raise typer.Exit(1)
    except FileNotFoundError as exc:
        fail(f"{exc.filename}: no such file", 1)
    if as_json:
        print_json({"valid": True, "experiment": experiment.to_file_dict(), "notes": experiment.notes()})
    else:
        console().print(f"[green]✓[/] valid: {esc(experiment.describe())}")
        for note in experiment.notes():
            console().print(f"  note: {note}", markup=False)


@app.command()
def run(
    file: Optional[Path] = typer.Argument(None, help="Experiment file to use instead of the committed one."),
    repo: Path = typer.Option(Path("."), "--repo", help="The git repository holding train.py."),
    commit: str = typer.Option("HEAD", "--commit", help="Commit to train (default HEAD)."),
    detach: bool = typer.Option(False, "--detach", help="Return once the run is created; follow with "
                                                        "`mmp status RUN` / `mmp logs RUN`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream the training log."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
    started_file: Optional[Path] = typer.Option(None, "--started-file", hidden=True,
                                                help="(--detach's child) write the run id here once launched."),
    resume: bool = typer.Option(False, "--resume", help="Resume the interrupted study of this commit and "
                                                        "experiment file; fail if there is none."),
    fresh: bool = typer.Option(False, "--fresh", help="Start a new study even if one of this commit and "
                                                      "experiment file was interrupted (default: resume it)."),
) -> None:
    """Launch the experiment at the repository's commit without a push, and follow it.

    A study (a Tuning block) stopped by Ctrl-C is left to resume: running `mmp run` again on the same
    commit and experiment file resumes it, unless --fresh."""
    from mmp import config
    from mmp.hosts import localgit as gitutil
    from mmp.pipeline.runs import local_trigger, mlflow_link, run_trigger

    try:
        sha = gitutil.resolve(repo, commit)
    except gitutil.GitError as exc:
        fail(str(exc), 2)
    if file is not None and not file.is_file():
        fail(f"{file}: no such experiment file", 2)
    if resume and fresh:
        fail("--resume and --fresh contradict each other; give one", 2)
    if detach:
        _run_detached(file, repo, sha, as_json, ["--resume"] * resume + ["--fresh"] * fresh)
        return
    from mmp.tuning import resume as resumes

    key = resumes.resume_key(repo, sha, file)
    delivery_id = _study_to_resume(key, sha, resume=resume, fresh=fresh, quiet=as_json)
    stack = config.running_stack() or {}
    if not os.environ.get("MLFLOW_TRACKING_URI") and stack.get("mlflow_url"):
        os.environ["MLFLOW_TRACKING_URI"] = stack["mlflow_url"]  # the stack's server: links point at its UI
        os.environ.setdefault("MMP_MLFLOW_UI_URL", stack["mlflow_url"])
    trigger = local_trigger(repo, sha, experiment_file=file, delivery_id=delivery_id)
    on_log = None if (quiet or as_json) else _print_line
    studies: list[str] = []

    def remember_study(run_id: str, handle) -> None:
        if handle is None:  # a study's parent run: a Ctrl-C from here on leaves it to resume
            resumes.remember(key, trigger.delivery_id)
            studies.append(run_id)

    on_launch = _chain(remember_study, _started_writer(started_file, None if as_json else _announce))
    with contextlib.ExitStack() as held:
        start_server = _use_shared_tracking_server(held)
        try:
            outcome = run_trigger(trigger, on_log=on_log, on_launch=on_launch, resume_studies=True)
        except KeyboardInterrupt:
            if not studies:
                raise
            _say_interrupted(trigger.delivery_id, sha, as_json)
            raise typer.Exit(130) from None
        if start_server:  # for the next run, now that the store exists and is migrated
            from mmp.tracking.server import start_in_background

            start_in_background()
    if as_json:
        print_json({"state": outcome.state, "message": outcome.message, "run_id": outcome.run_id,
                    "run_url": outcome.run_url, "problems": outcome.problems})
    elif outcome.state == "INVALID":
        err_console().print("[bold red]not launched:[/]")
        for problem in outcome.problems:
            err_console().print(f"  [red]✗[/] {esc(problem)}", soft_wrap=True)
    else:
        colour = "green" if outcome.ok else "red"
        console().print(f"[bold {colour}]{outcome.state}[/] " + esc(f"run {outcome.run_id}: {outcome.message}"),
                        soft_wrap=True)
        if outcome.run_url:
            console().print(mlflow_link(outcome.run_url), soft_wrap=True, markup=False)
    if not outcome.ok:
        raise typer.Exit(2 if outcome.state == "INVALID" else 1)


def _study_to_resume(key: str, sha: str, *, resume: bool, fresh: bool, quiet: bool) -> str | None:
    """The delivery id of the interrupted study to resume (same commit and experiment file), or None for a
    new run; says which, and refuses --resume when there is nothing to resume."""
    from mmp.tuning import resume as resumes

    found = None if fresh else resumes.find(key)
    say = (lambda text: None) if quiet else (lambda text: err_console().print(esc(text), soft_wrap=True))
    if found is not None and found.running_pid is not None:
        if resume:
            fail(f"the study of commit {sha[:7]} is running now (pid {found.running_pid}); stop it first, or "
                 "give --fresh to start another", 2)
        say(f"a study of commit {sha[:7]} is running now (pid {found.running_pid}); starting another")
        return None
    if found is None:
        if resume:
            fail(f"no interrupted study of commit {sha[:7]} with this experiment file to resume", 2)
        return None
    progress = resumes.progress(found.delivery_id)
    where = f" (parent run {progress.parent_run_id}): {progress.describe()}" if progress else ""
    say(f"resuming the interrupted study of commit {sha[:7]}{where}; `mmp run --fresh` starts a new one")
    return found.delivery_id


def _say_interrupted(delivery_id: str, sha: str, as_json: bool) -> None:
    """After Ctrl-C of a study: what was done, that it is left to resume, and how."""
    from mmp.tuning import resume as resumes

    try:
        progress = resumes.progress(delivery_id)
    except Exception as exc:  # the storage is unreadable: still say how to resume
        progress, problem = None, f"{type(exc).__name__}: {exc}"
    else:
        problem = None
    how = f"`mmp run` again on commit {sha[:7]} resumes it (or `mmp run --resume`); `mmp run --fresh` starts over"
    if as_json:
        print_json({"state": "INTERRUPTED", "resumable": True, "delivery_id": delivery_id,
                    "run_id": progress.parent_run_id if progress else None,
                    "trials_done": progress.done if progress else None,
                    "trials_total": progress.total if progress else None, "resume": how})
        return
    done = progress.describe() if progress else f"trial counts unavailable ({problem})"
    parent = f" {progress.parent_run_id}" if progress and progress.parent_run_id else ""
    err_console().print(esc(f"interrupted: study{parent} stopped after {done}; its running trials were stopped "
                            "and will run again."), soft_wrap=True)
    err_console().print(esc(f"The study is left to resume: {how}."), soft_wrap=True)


def _chain(*callbacks):
    """One on_launch that calls each of `callbacks` that is set, in order."""
    def on_launch(run_id: str, handle) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(run_id, handle)

    return on_launch


def _use_shared_tracking_server(held: contextlib.ExitStack) -> bool:
    """Without `mmp up` or a configured server, track through the server an earlier `mmp run` left
    serving the SQLite store (mmp.tracking.server), holding a lease on it until `held` closes.
    True when none serves yet: the caller starts one once this run is over."""
    from mmp.tracking import client as tracking, server as tracking_server

    if os.environ.get("MLFLOW_TRACKING_URI") or tracking_server.idle_seconds() <= 0:
        return False
    url = held.enter_context(tracking_server.lease())
    if url is None:
        return True
    os.environ["MLFLOW_TRACKING_URI"] = url
    os.environ.setdefault("MMP_MLFLOW_UI_URL", tracking.ui_url())  # links as without it: `mmp up`'s UI
    return False


def _started_writer(path: Optional[Path], then):
    """on_launch for the detached child: record the run id for the waiting parent, then `then`."""
    if path is None:
        return then

    def on_launch(run_id: str, handle) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id)
        tmp.replace(path)  # atomic: the parent never reads half an id
        if then is not None:
            then(run_id, handle)

    return on_launch


def _run_detached(file: Optional[Path], repo: Path, sha: str, as_json: bool, flags: list[str]) -> None:
    """Start `mmp run` in its own session and wait until it has launched its run or died, and say which."""
    stem = _detached_log_dir() / f"run-{sha[:12]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_file, started = stem.with_suffix(".log"), stem.with_suffix(".started")
    argv = [sys.executable, "-m", "mmp", "run"]
    if file is not None:
        argv.append(str(file.resolve()))
    argv += ["--repo", str(Path(repo).resolve()), "--commit", sha, "--quiet", "--started-file", str(started), *flags]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        while not started.exists() and proc.poll() is None:
            time.sleep(0.1)
    except KeyboardInterrupt:  # stop waiting, not the run
        err_console().print(esc(f"still starting in the background (pid {proc.pid}, log {log_file})"))
        raise typer.Exit(130) from None
    run_id = started.read_text().strip() if started.exists() else None
    if run_id is not None:
        started.unlink(missing_ok=True)
        if as_json:
            print_json({"detached": True, "run_id": run_id, "pid": proc.pid, "commit": sha, "log": str(log_file)})
        else:
            console().print(esc(f"run {run_id} launched in the background (pid {proc.pid}, log {log_file}); ")
                            + f"follow with [bold]mmp logs -f {esc(run_id)}[/] or [bold]mmp status {esc(run_id)}[/]",
                            soft_wrap=True)
        return
    output = log_file.read_text(errors="replace").strip()
    if as_json:
        print_json({"detached": True, "run_id": None, "pid": proc.pid, "exit_code": proc.returncode,
                    "commit": sha, "log": str(log_file), "output": output[-4000:]})
    else:
        err_console().print(f"[bold red]the background run exited ({proc.returncode}) before launching[/] "
                            + esc(f"(log {log_file}):"), soft_wrap=True)
        err_console().print(output[-4000:], markup=False, soft_wrap=True)
    raise typer.Exit(proc.returncode or 1)


def _detached_log_dir() -> Path:
    from mmp import config

    path = config.mmp_home() / "detached"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _announce(run_id: str, handle) -> None:
    if handle is None:  # a study: its parent run, whose trials are the jobs
        err_console().print("[dim]" + esc(f"started study run {run_id}; its trials follow") + "[/]")
        return
    err_console().print("[dim]" + esc(f"launched run {run_id} on {handle.platform} (job {handle.job_id})") + "[/]")


@app.command("runs")
def list_runs(
    limit: int = typer.Option(20, "--limit", "-n"),
    state: Optional[str] = typer.Option(None, "--state", help="PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent runs, newest first."""
    from mmp.pipeline.store import RunStore

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
        table.add_row(r.run_id[:12], f"[{colours.get(r.state, 'white')}]{r.state}[/]", esc(r.experiment),
                      r.commit_sha[:7], esc(r.platform), started, esc(r.message[:60]))
    console().print(table)


def _record(run_id: str):
    from mmp.pipeline.store import RunStore

    record = RunStore().get(run_id)
    if record is None:
        fail(f"no run {run_id!r} (see `mmp runs`)", 2)
    return record


@app.command()
def status(run_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One run's state, platform and links, and its commit's statuses (as GitHub would show them)."""
    from mmp.pipeline.reporting import LocalStatusReporter
    from mmp.pipeline.runs import mlflow_link

    record = _record(run_id)
    statuses = LocalStatusReporter().history(record.repository, record.commit_sha)
    if as_json:
        print_json({**record.to_dict(), "statuses": statuses})
        return
    c = console()
    for key in ("run_id", "state", "message", "experiment", "repository", "commit_sha", "platform"):
        c.print(f"[bold]{key:>11}[/] " + esc(getattr(record, key) or "-"), soft_wrap=True)
    if record.run_url:
        c.print(f"[bold]{'MLflow':>11}[/] " + esc(mlflow_link(record.run_url).removeprefix("MLflow run: ")
                                                   .removeprefix("MLflow: ")), soft_wrap=True)
    c.print(f"[bold]{'statuses':>11}[/] " + ("" if statuses else "none recorded (in $MMP_HOME/statuses/)"))
    for entry in statuses:
        at = time.strftime("%H:%M:%S", time.localtime(entry.get("at", 0)))
        link = f" → {entry['target_url']}" if entry.get("target_url") else ""
        c.print("            " + esc(f"{at} {entry.get('context', '')} {entry.get('state', '')}: "
                                     f"{entry.get('description', '')}{link}"), soft_wrap=True)


@app.command()
def logs(run_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends.")) -> None:
    """Print a run's training log."""
    from mmp.backends import JobHandle, get_backend

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
    from mmp.pipeline.runs import cancel_run
    from mmp.tuning import control as study_control

    record = _record(run_id)
    if record.state not in ("PENDING", "RUNNING"):
        fail(f"run {record.run_id} is already {record.state}", 1)
    if study_control.request_cancel(record.run_id):
        console().print(f"cancel sent to study {record.run_id}: its running trials stop and it ends as KILLED")
        return
    if not record.handle:
        fail(f"run {record.run_id} has no job to cancel yet", 1)
    stopped, message = cancel_run(record)
    console().print(esc(message), soft_wrap=True)
    if not stopped:
        raise typer.Exit(1)
