"""The leaderboard as a PNG: the metric per run, and the metric against each varied hyperparameter;
for one study, the objective per trial (with the best so far) and against each tuned parameter.

Drawn with matplotlib's object API on the Agg canvas, so it works headless and never
touches pyplot's global state (safe inside the long-running local stack).
"""

from __future__ import annotations

from pathlib import Path

from mmp.models.compare import Leaderboard

MAX_PARAM_PANELS = 8
PANEL_INCHES = (4.8, 3.6)
# Run data (parameter values, experiment names) is drawn as written: matplotlib would read
# `$…$` in it as mathtext, and an odd `$` makes savefig raise.
LITERAL = {"parse_math": False}


class PlotError(ValueError):
    """Nothing to plot (no metric chosen, or no run logged it)."""


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_leaderboard(board: Leaderboard, path: str | Path, *, dpi: int = 100) -> Path:
    """Write the PNG and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = board.metric
    if not metric:
        raise PlotError("--plot needs --metric: say which metric to draw")
    if board.study:
        return plot_study(board, path, dpi=dpi)
    rows = [r for r in board.rows if metric in r.metrics and not r.study]
    if not rows:
        raise PlotError(f"no run of {board.experiment!r} logged the metric {metric!r}")
    params = board.varied_params[:MAX_PARAM_PANELS]
    panels = 1 + len(params)
    fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    # The metric per run, oldest to newest, the best run marked.
    by_time = sorted(rows, key=lambda r: r.start_time or 0)
    best = board.best()
    ax = axes[0]
    colours = ["tab:orange" if best is not None and r.run_id == best.run_id else "tab:blue" for r in by_time]
    ax.bar(range(len(by_time)), [r.metrics[metric] for r in by_time], color=colours)
    if len(by_time) <= 30:
        ax.set_xticks(range(len(by_time)), [r.run_id[:7] for r in by_time], rotation=60, fontsize=7)
    ax.set_xlabel("run (oldest → newest)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per run ({board.mode} is best)")
    _against_params(axes[1:], params, rows, metric)
    fig.suptitle(f"{board.experiment}: {len(rows)} runs with {metric}", **LITERAL)
    return _save(fig, path, dpi)


def plot_study(board: Leaderboard, path: str | Path, *, dpi: int = 100) -> Path:
    """One study: the objective against the trial number (with the best so far), and against each tuned parameter."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = board.metric
    rows = sorted((r for r in board.rows if metric in r.metrics and r.trial is not None), key=lambda r: r.trial)
    if not rows:
        raise PlotError(f"no trial of study {board.study} logged the objective {metric!r} yet")
    params = board.varied_params[:MAX_PARAM_PANELS]
    fig = Figure(figsize=(PANEL_INCHES[0] * (1 + len(params)), PANEL_INCHES[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(params), squeeze=False)[0]
    ax = axes[0]
    numbers, values = [r.trial for r in rows], [r.metrics[metric] for r in rows]
    pick = max if board.mode == "max" else min
    best_so_far = [pick(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, alpha=0.7, label="trial")
    ax.step(numbers, best_so_far, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial ({board.mode} is best)")
    ax.legend(fontsize=8)
    _against_params(axes[1:], params, rows, metric)
    fig.suptitle(f"{board.experiment}: study {board.study[:8]}, {len(rows)} trials", **LITERAL)
    return _save(fig, path, dpi)


def _against_params(axes, params: list[str], rows, metric: str) -> None:
    """The metric against each hyperparameter that varies (log axis over wide positive ranges)."""
    for ax, name in zip(axes, params):
        have = [r for r in rows if name in r.params]
        values = [r.params[name] for r in have]
        ys = [r.metrics[metric] for r in have]
        numbers = _numeric(values)
        if numbers is not None:
            ax.scatter(numbers, ys, alpha=0.7)
            if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                ax.set_xscale("log")
        else:
            labels = sorted(set(values))
            ax.scatter([labels.index(v) for v in values], ys, alpha=0.7)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8, **LITERAL)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {name}")


def _save(fig, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out
