"""`mmp up`, `mmp hook install`, `mmp demo`, `mmp worker`, `mmp jobs`: the local GitOps loop."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmp.commands import app, console, err_console, esc, fail, print_json

hook_app = typer.Typer(help="Git hooks that post push events to the local webhook.", no_args_is_help=True)
app.add_typer(hook_app, name="hook")


@app.command()
def up(
    host: str = typer.Option("127.0.0.1", "--host", help="Address the webhook and MLflow UI listen on."),
    port: int = typer.Option(8080, "--port", help="Webhook port (POST /webhook, GET /healthz)."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow UI port."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Start the MLflow UI."),
) -> None:
    """Run the local stack: webhook server, pipeline worker and MLflow UI, until Ctrl-C."""
    import logging

    from mmp import config
    from mmp.local.stack import LocalStack, StackRunning

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    c = console()
    stack = LocalStack(host, port, mlflow_port, ui=ui, say=c.print)
    with stack.stopping_on_signals():  # from here on a Ctrl-C or SIGTERM stops whatever has started
        try:
            stack.start()
        except StackRunning as exc:
            fail(str(exc), 1)
        except OSError as exc:
            fail(f"could not listen on {host}:{port}: {exc.strerror or exc}", 1)
        c.print(f"[bold]webhook[/]  http://{host}:{stack.port}/webhook   (health: /healthz)")
        for name in config.WEBHOOK_HOSTS:  # each with its own secret ($MMP_HOME/<host>-webhook-secret)
            c.print(f"[bold]{name}[/]   http://{host}:{stack.port}/webhook/{name}   "
                    f"(secret: MMP_{name.upper()}_WEBHOOK_SECRET or $MMP_HOME/{name}-webhook-secret)")
        if stack.ui:
            if stack.wait_for_ui():
                c.print(f"[bold]MLflow[/]   {stack.ui_url}")
            elif not stack.stopping:
                c.print("[yellow]MLflow UI did not answer; see $MMP_HOME/logs/mlflow.log[/]")
        c.print(f"[bold]state[/]    {esc(config.mmp_home())}  (worker log: logs/worker.log)")
        c.print("install the hook in a repository with [bold]mmp hook install REPO[/]; Ctrl-C stops everything")
        stack.serve()
    c.print("stopped")
    _say_studies_left(c)


def _say_studies_left(c) -> None:
    """After Ctrl-C: the studies the worker was running are not cancelled; say so, and how they resume."""
    from mmp.pipeline.queue import JobQueue
    from mmp.tuning.resume import studies_left_by

    try:
        left = studies_left_by([job.delivery_id for job in JobQueue().running()])
    except Exception as exc:  # the state DB or Optuna's storage unreadable: stopping still succeeded
        c.print(esc(f"could not read the studies left running: {type(exc).__name__}: {exc}"), markup=False)
        return
    for delivery_id, progress in left:
        done = f" after {progress.describe()}" if progress else ""
        parent = f" (parent run {progress.parent_run_id})" if progress and progress.parent_run_id else ""
        c.print(esc(f"study of delivery {delivery_id}{parent} stopped{done}; it is not cancelled: it resumes "
                    "when `mmp up` starts again (`mmp cancel` on its parent run ends it then, as cancelled)"), soft_wrap=True)


@hook_app.command("install")
def hook_install(
    repo: Path = typer.Argument(Path("."), help="Working repository (post-commit) or bare repository (post-receive)."),
    url: Optional[str] = typer.Option(None, "--url", help="Always post to this webhook URL. Default: decided each "
                                      "time the hook fires: $MMP_WEBHOOK_URL, else the `mmp up` running on "
                                      "$MMP_HOME (its stack.json), else http://127.0.0.1:8080/webhook."),
    force: bool = typer.Option(False, "--force", help="Replace a hook mmp did not install (kept as .bak)."),
) -> None:
    """Make commits (or pushes, for a bare repository) post signed push events to the local webhook."""
    from mmp.hosts.hooks import HookError, install

    try:
        path = install(repo, url=url, force=force)
    except HookError as exc:
        fail(str(exc), 2)
    target = url or "the `mmp up` running on MMP_HOME when the hook fires (else http://127.0.0.1:8080/webhook)"
    console().print(f"installed {path.name} in {path.parent} → {target}", markup=False)


@app.command()
def worker(once: bool = typer.Option(False, "--once", help="Run what is queued, then exit.")) -> None:
    """Run the pipeline worker on the durable queue (what `mmp up` starts)."""
    from mmp.pipeline.worker import main

    raise typer.Exit(main(["--once"] if once else []))


@app.command()
def jobs(limit: int = typer.Option(20, "--limit", "-n"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Webhook deliveries in the local queue, newest first."""
    from mmp.pipeline.queue import JobQueue

    items = JobQueue().list(limit=limit)
    if as_json:
        print_json([j.to_dict() for j in items])
        return
    from rich.table import Table

    table = Table(title="jobs")
    for col in ("delivery", "state", "repository", "commit", "run", "message"):
        table.add_column(col, overflow="fold")
    for j in items:
        table.add_row(esc(j.delivery_id[:13]), j.state, esc(j.repository), j.commit_sha[:7], (j.run_id or "-")[:12],
                      esc(j.message[:70]))
    console().print(table)


@app.command()
def demo(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to make the sample repository (default $MMP_HOME/demo)."),
    ui: bool = typer.Option(False, "--ui/--no-ui", help="Also start the MLflow UI and keep the stack up at the end."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
) -> None:
    """The whole story: a sample repository, the hook, two commits, two MLflow runs."""
    from mmp.local.demo import DemoError, run_demo

    try:
        out = console()
        result = run_demo(directory, ui=ui, mlflow_port=mlflow_port, console=out,
                          say=lambda text: out.print(text, markup=False, soft_wrap=True))  # paths print as they are
    except DemoError as exc:
        fail(str(exc), 1)
    if not result.ok:
        err_console().print("[red]not every run succeeded[/]")
        raise typer.Exit(1)
