"""`mmp compare`, `mmp promote` and `mmp serve`: from runs to a model in production."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmp.commands import app, console, err_console, esc, fail, print_json

WIDE = 200  # columns for the leaderboard when stdout is not a terminal (pipes, CI logs)
TABLE_ROWS = 50  # rich renders ~2 ms a row: the table shows the best 50 unless --limit says otherwise


def _wide_console():
    out = console()
    if not out.is_terminal:
        out.width = max(out.width, WIDE)
    return out


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="MLflow experiment: the repository's name unless its "
                                               "experiment.json sets Experiment_Name."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m",
                                               help="Metric to show; repeat for more. The first one ranks the runs."),
    mode: Optional[str] = typer.Option(None, "--mode", help="max: higher is better; min: lower is better "
                                                            "(default max, or the study's direction)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: the metric per run and against each "
                                                              "varied hyperparameter (per trial with --study)."),
    study: Optional[str] = typer.Option(None, "--study", help="Only this study's trials (its parent run id or a "
                                                             "prefix), ranked by its objective."),
    as_json: bool = typer.Option(False, "--json", help="Print the leaderboard as JSON."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1,
                                        help=f"Only the best N runs (the table shows {TABLE_ROWS} unless given)."),
) -> None:
    """Leaderboard of an experiment's runs: best first, only the hyperparameters that differ."""
    from mmp.models.compare import CompareError, leaderboard, table
    from mmp.models.plot import PlotError, plot_leaderboard

    try:
        board = leaderboard(experiment, metric or None, mode=mode, limit=limit, study=study)
        written = plot_leaderboard(board, plot) if plot else None
    except (CompareError, PlotError) as exc:
        fail(str(exc))
        return
    if as_json:
        data = board.to_dict()
        if written:
            data["plot"] = str(written)
        print_json(data)
        return
    _wide_console().print(table(board, max_rows=limit or TABLE_ROWS))
    if written:
        console().print(f"plot written to {esc(written)}")


@app.command()
def promote(
    experiment: str = typer.Argument(..., help="MLflow experiment whose best run is promoted."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="Metric that decides the best run."),
    mode: str = typer.Option("max", "--mode", help="max: higher is better; min: lower is better."),
    alias: str = typer.Option("production", "--alias", help="Registered-model alias to move."),
    require: Optional[float] = typer.Option(None, "--require",
                                            help="Refuse unless the best run's metric reaches this value."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Promote this run instead of the best one."),
    study: Optional[str] = typer.Option(None, "--study", help="Promote this study's best trial (parent run id or "
                                                             "prefix); --metric defaults to its objective."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="Registered model (default: $MMP_MODEL_NAME, else EXPERIMENT)."),
    rollback: bool = typer.Option(False, "--rollback", help="Give the alias back to its previous holder."),
    no_deploy: bool = typer.Option(False, "--no-deploy", help="Do not deploy a SageMaker endpoint even if "
                                                              "MMP_ENDPOINT_* configures one."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Register the best FINISHED run's model and move the alias to it (or --rollback)."""
    from mmp.models import promote as promotion

    deployer = None if no_deploy else "auto"
    try:
        if rollback:
            result = promotion.rollback(experiment, alias=alias, model_name=model_name, deployer=deployer)
        else:
            if study:
                metric, mode, run_id = _study_choice(experiment, study, metric, mode)
            if not metric:
                fail("--metric is required: say which metric decides the best run (e.g. --metric val_accuracy)")
            result = promotion.promote(experiment, metric or "", mode=mode, alias=alias, require=require,
                                       model_name=model_name, run_id=run_id, deployer=deployer)
    except promotion.PromotionError as exc:
        fail(str(exc))
        return
    if as_json:
        print_json(result.to_dict())
        return
    for other in result.skipped:
        err_console().print(f"[yellow]![/] run {esc(other)} ranks higher but logged no model; skipped")
    for other in result.foreign:
        err_console().print(f"[yellow]![/] run {esc(other)} ranks higher but came from another repository; skipped")
    for other in result.unrecorded:
        err_console().print(f"[yellow]![/] run {esc(other)} ranks higher but was not created by the pipeline; skipped")
    console().print(f"[green]✓[/] {esc(result.summary())}")
    if result.deployment:
        d = result.deployment
        console().print(esc(f"  SageMaker endpoint {d['endpoint']} {d['action']} ({d['endpoint_config']})"))


def _study_choice(experiment: str, study: str, metric: str | None, mode: str) -> tuple[str, str, str]:
    """The metric, mode and run that promoting a study's best trial means."""
    from mmp.models.search import CompareError, make_client
    from mmp.models.studies import best_trial, find_study, objective

    try:
        parent = find_study(make_client(), experiment, study)
        objective_metric, objective_mode = objective(parent)
        return metric or objective_metric, objective_mode, best_trial(parent)
    except CompareError as exc:
        fail(str(exc))
        raise


@app.command()
def serve(
    model: str = typer.Argument(..., help="NAME[@ALIAS] (default alias: production), NAME/VERSION, "
                                          "models:/… or runs:/RUN_ID/PATH (no other URIs or paths)."),
    port: int = typer.Option(5001, "--port", "-p", min=1, max=65535, help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (keep 127.0.0.1 unless you mean it)."),
) -> None:
    """Serve a registered model locally with MLflow's pyfunc scoring server (POST /invocations).

    Ctrl-C, SIGTERM or SIGHUP stops the scoring server (its whole process group) within seconds.
    """
    from mmp.models.serve import ModelServer, ServeError

    try:
        server = ModelServer(model, host=host, port=port)
    except ServeError as exc:
        fail(str(exc))
        return

    def ready() -> None:
        console().print(f"[green]✓[/] serving {esc(server.uri)} at {server.url} — POST {server.url}/invocations "
                        '{"inputs": ...}; Ctrl-C stops it')

    try:
        code = server.serve_until_stopped(on_ready=ready)
    except ServeError as exc:
        fail(str(exc))
        return
    if code > 128:  # stopped by a signal, the server is gone: leave now, not after seconds of
        sys.stdout.flush()  # tearing down MLflow's modules (what made Ctrl-C seem ignored under load)
        sys.stderr.flush()
        os._exit(0)
    raise typer.Exit(code)
