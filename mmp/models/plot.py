"""The leaderboard as a PNG: the metric per run, and the metric against each varied hyperparameter;
for one study, the objective per trial (with the best so far) and against each tuned parameter.

Drawn with matplotlib's object API on the Agg canvas, so it works headless and never
touches pyplot's global state (safe inside the long-running local stack).
"""

from __future__ import annotations

from pathlib import Path

from mmp.models.compare import Leaderboard, Row

MAX_PARAM_PANELS = 8
PANEL_INCHES = (4.8, 3.6)
# A pruned trial's score is partial (its value at the step the pruner stopped it): drawn apart, hollow and grey.
PARTIAL_STYLE = {"marker": "x", "color": "tab:gray", "alpha": 0.8}
PARTIAL_LABEL = "pruned (partial score)"
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
    return _save(figure(board), path, dpi)


def figure(board: Leaderboard):
    """The leaderboard's matplotlib Figure (one study's when the board is one study's trials)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = board.metric
    if not metric:
        raise PlotError("--plot needs --metric: say which metric to draw")
    if board.study:
        return study_figure(board)
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
    colours = ["tab:orange" if best is not None and r.run_id == best.run_id else
               "lightgray" if r.partial else "tab:blue" for r in by_time]
    ax.bar(range(len(by_time)), [r.metrics[metric] for r in by_time], color=colours,
           hatch=["//" if r.partial else "" for r in by_time])
    if len(by_time) <= 30:
        ax.set_xticks(range(len(by_time)), [r.run_id[:7] for r in by_time], rotation=60, fontsize=7)
    ax.set_xlabel("run (oldest → newest)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per run ({board.mode} is best)")
    _against_params(axes[1:], params, rows, metric, board.scales)
    fig.suptitle(f"{board.experiment}: {len(rows)} runs with {metric}", **LITERAL)
    return fig


def study_figure(board: Leaderboard):
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
    whole = [r for r in rows if not r.partial]
    partial = [r for r in rows if r.partial]
    if whole:
        ax.scatter([r.trial for r in whole], [r.metrics[metric] for r in whole], alpha=0.7, label="trial")
    if partial:
        ax.scatter([r.trial for r in partial], [r.metrics[metric] for r in partial], label=PARTIAL_LABEL,
                   **PARTIAL_STYLE)
    finished = [r for r in rows if r.comparable]  # the best so far counts completed trials only
    if finished:
        pick = max if board.mode == "max" else min
        values = [r.metrics[metric] for r in finished]
        ax.step([r.trial for r in finished], [pick(values[: i + 1]) for i in range(len(values))], where="post",
                color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial ({board.mode} is best)")
    ax.legend(fontsize=8)
    _against_params(axes[1:], params, rows, metric, board.scales)
    fig.suptitle(f"{board.experiment}: study {board.study[:8]}, {len(rows)} trials", **LITERAL)
    return fig


def log_axis(name: str, numbers: list[float], scales: dict[str, str]) -> bool:
    """A log x axis for a parameter a study sampled on a log scale, and only for that; a parameter no
    study sampled (hand-set values across runs) gets one when its values span 100× or more."""
    if not numbers or min(numbers) <= 0:
        return False
    if name in scales:
        return scales[name] == "log"
    return max(numbers) / min(numbers) >= 100


def _against_params(axes, params: list[str], rows: list[Row], metric: str, scales: dict[str, str]) -> None:
    """The metric against each hyperparameter that varies; pruned trials' partial scores drawn apart."""
    for ax, name in zip(axes, params):
        have = [r for r in rows if name in r.params]
        values = [r.params[name] for r in have]
        numbers = _numeric(values)
        if numbers is not None:
            xs = numbers
            if log_axis(name, numbers, scales):
                ax.set_xscale("log")
        else:
            labels = sorted(set(values))
            xs = [labels.index(v) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8, **LITERAL)
        whole = [(x, r.metrics[metric]) for x, r in zip(xs, have) if not r.partial]
        partial = [(x, r.metrics[metric]) for x, r in zip(xs, have) if r.partial]
        if whole:
            ax.scatter(*zip(*whole), alpha=0.7)
        if partial:
            ax.scatter(*zip(*partial), label=PARTIAL_LABEL, **PARTIAL_STYLE)
            ax.legend(fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {name}")


def _save(fig, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out
