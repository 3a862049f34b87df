"""The leaderboard: one MLflow search, paginated, turned into rows people can compare.

A row carries what decides between runs: the status, the commit and platform, the
instance type × count, the training processes (hosts × per host), the hyperparameters that differ across runs (equal ones are
noise), the chosen metrics, the duration and the instance-hours it cost. Sorting is
MLflow's own `order_by`, so the best run comes first without loading a metric
history. Garbage collection is paused while MLflow builds thousands of run objects:
on 1,000 runs it halves the time (mmp.models.search; see bench/models_leaderboard.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from mmp.contract.experiment import AUTO_PROCESSES, TAG_PROCESSES, TAG_PROCESSES_PER_HOST
from mmp.models.search import CompareError, experiment_id, make_client, search_all
from mmp.models.studies import find_study, objective, sampling_scales
from mmp.tuning.tags import TAG_PARENT, TAG_STUDY, TAG_TRIAL, TAG_TRIAL_STATE

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

MODES = ("max", "min")
TAG_COMMIT = "mlflow.source.git.commit"
TAG_PLATFORM = "mmp.platform"
TAG_INSTANCE_TYPE = "mmp.instance_type"
TAG_INSTANCE_COUNT = "mmp.instance_count"
# A study's trials rank by how they ended before their score: a pruned trial's objective is its value at
# the step the pruner stopped it (a partial score), never comparable with a finished trial's last value.
TRIAL_STATE_ORDER = {"complete": 0, "running": 1, "pruned": 2}
PARTIAL_MARK = "†"
PARTIAL_NOTE = f"{PARTIAL_MARK} pruned: the score at the step the trial was stopped, not comparable with finished trials"


@dataclass
class Row:
    rank: int
    run_id: str
    run_name: str
    status: str
    commit: str | None
    platform: str | None
    instance_type: str | None
    instance_count: int
    processes: str | None  # total ranks, as tagged at launch ("auto": one per GPU); None on older runs
    processes_per_host: str | None
    params: dict[str, str]  # only the hyperparameters that vary across the runs
    metrics: dict[str, float]
    start_time: float | None  # seconds since the epoch
    duration_s: float | None
    instance_hours: float | None
    parent_run_id: str | None = None  # a study's trial: its parent run
    trial: int | None = None
    study: bool = False  # a study's parent run (its metric is the best trial's)
    trial_state: str | None = None  # a trial's end: complete, pruned, failed, cancelled (running while it runs)

    @property
    def partial(self) -> bool:
        """A pruned trial: its metrics stop at the step it was stopped at."""
        return self.trial_state == "pruned"

    @property
    def comparable(self) -> bool:
        """A run, or a trial that completed (a pruned, failed or running trial's score is not final)."""
        return self.trial is None or self.trial_state in (None, "complete")

    @property
    def instances(self) -> str:
        return f"{self.instance_type or '?'} × {self.instance_count}"

    @property
    def process_count(self) -> str:
        """`4 (2 × 2)`: all ranks, then hosts × ranks per host; `2 × auto` when one per GPU."""
        if self.processes is None:
            return "—"
        if AUTO_PROCESSES in (self.processes, self.processes_per_host):
            return f"{self.instance_count} × {AUTO_PROCESSES}"
        return f"{self.processes} ({self.instance_count} × {self.processes_per_host or '?'})"


@dataclass
class Leaderboard:
    experiment: str
    experiment_id: str
    metric: str | None  # the sort key (first chosen metric), None: newest first
    mode: str
    metrics: list[str]
    varied_params: list[str]
    rows: list[Row] = field(default_factory=list)
    study: str | None = None  # the parent run when the board is one study's trials
    # How each tuned hyperparameter was sampled (linear or log), from the studies' Tuning.Ranges:
    # the plot's axis for it follows this, not the spread of the values.
    scales: dict[str, str] = field(default_factory=dict)

    def best(self) -> Row | None:
        """The first run that has the sort metric (runs without it sort last), neither a study's parent
        nor a trial that did not complete (a pruned trial's score is partial)."""
        for row in self.rows:
            if row.study or not row.comparable:
                continue
            if self.metric is None or self.metric in row.metrics:
                return row
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, raw in zip(self.rows, data["rows"]):
            raw["instances"] = row.instances
            raw["process_count"] = row.process_count
            raw["partial"] = row.partial
        return data


def order_by(metric: str | None, mode: str) -> list[str]:
    """MLflow `order_by` clauses: best metric first (MLflow puts runs lacking it last), newest next."""
    if mode not in MODES:
        raise CompareError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    clauses = [f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}"] if metric else []
    return clauses + ["attributes.start_time DESC"]


def _count(value: str | None) -> int:
    try:
        return max(int(value or 1), 1)
    except ValueError:
        return 1


def varied_params(runs: Sequence["Run"]) -> list[str]:
    """Parameter names whose value is not the same on every run (missing counts as a value)."""
    keys = sorted({k for run in runs for k in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def to_rows(runs: Sequence["Run"], metrics: Sequence[str], varied: Sequence[str],
            now: float | None = None) -> list[Row]:
    now = time.time() if now is None else now
    rows = []
    for rank, run in enumerate(runs, start=1):
        info, data = run.info, run.data
        start = info.start_time / 1000 if info.start_time else None
        end = info.end_time / 1000 if info.end_time else (now if info.status == "RUNNING" else None)
        duration = max(end - start, 0.0) if start is not None and end is not None else None
        count = _count(data.tags.get(TAG_INSTANCE_COUNT))
        rows.append(Row(
            rank=rank, run_id=info.run_id, run_name=info.run_name or "", status=info.status,
            commit=data.tags.get(TAG_COMMIT), platform=data.tags.get(TAG_PLATFORM),
            instance_type=data.tags.get(TAG_INSTANCE_TYPE), instance_count=count,
            processes=data.tags.get(TAG_PROCESSES), processes_per_host=data.tags.get(TAG_PROCESSES_PER_HOST),
            params={k: data.params[k] for k in varied if k in data.params},
            metrics={m: data.metrics[m] for m in metrics if m in data.metrics},
            start_time=start, duration_s=duration,
            instance_hours=None if duration is None else duration / 3600 * count,
            parent_run_id=data.tags.get(TAG_PARENT), study=data.tags.get(TAG_STUDY) == "true",
            trial=int(data.tags[TAG_TRIAL]) if data.tags.get(TAG_TRIAL, "").isdigit() else None,
            trial_state=data.tags.get(TAG_TRIAL_STATE),
        ))
    return rows


def trials_first_by_state(rows: list[Row]) -> list[Row]:
    """Completed trials first, then running, pruned, failed (each group in the board's metric order):
    a pruned trial's partial score must not rank it above one that finished. Runs that are not trials keep
    their place relative to each other, ahead of unfinished trials."""
    def key(row: Row) -> int:
        if row.trial is None:
            return 0
        return TRIAL_STATE_ORDER.get(row.trial_state or "", len(TRIAL_STATE_ORDER))

    return sorted(rows, key=key)  # stable: the metric order holds within each group


def group_studies(rows: list[Row]) -> list[Row]:
    """Each study's trials right under its parent (in the board's order), ranks renumbered."""
    shown = {row.run_id for row in rows}
    trials: dict[str, list[Row]] = {}
    for row in rows:
        if row.parent_run_id in shown:
            trials.setdefault(row.parent_run_id, []).append(row)
    grouped: list[Row] = []
    for row in rows:
        if row.parent_run_id not in shown:
            grouped.append(row)
            grouped.extend(trials_first_by_state(trials.get(row.run_id, [])))
    for rank, row in enumerate(grouped, start=1):
        row.rank = rank
    return grouped


def leaderboard(experiment: str, metrics: Sequence[str] | str | None = None, *, mode: str | None = "max",
                limit: int | None = None, client: "MlflowClient | None" = None,
                tracking_uri: str | None = None, study: str | None = None) -> Leaderboard:
    """The experiment's runs, best first by the first metric (newest first when none is chosen).

    With no metrics chosen, every metric any run logged is shown. A study's trials are
    listed under its parent run; `study` (a parent run id or prefix) shows that study's
    trials alone, ranked by its objective unless a metric is given.
    """
    chosen = [metrics] if isinstance(metrics, str) else [m for m in (metrics or []) if m]
    client = client or make_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    filter_string, parent_id, scales = "", None, {}
    if study:
        parent = find_study(client, experiment, study)
        parent_id = parent.info.run_id
        filter_string = f"tags.`{TAG_PARENT}` = '{parent_id}'"
        study_metric, study_mode = objective(parent)
        scales = sampling_scales(parent)
        chosen = chosen or [study_metric]
        mode = mode or study_mode
    mode = mode or "max"
    sort_metric = chosen[0] if chosen else None
    clauses = order_by(sort_metric, mode)
    runs = search_all(client, [exp_id], filter_string=filter_string, order=clauses, limit=limit)
    shown = chosen or sorted({k for run in runs for k in run.data.metrics})
    varied = varied_params(runs)
    rows = to_rows(runs, shown, varied)
    rows = trials_first_by_state(rows) if study else group_studies(rows)
    for run in runs:  # a board of whole studies: each parent says how its trials were sampled
        if run.data.tags.get(TAG_STUDY) == "true":
            scales = {**sampling_scales(run), **scales}
    if study:
        for rank, row in enumerate(rows, start=1):
            row.rank = rank
    return Leaderboard(experiment=experiment, experiment_id=exp_id, metric=sort_metric, mode=mode,
                       metrics=shown, varied_params=varied, rows=rows, study=parent_id, scales=scales)


# -- presentation ------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


STATUS_STYLE = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}


def _status(row: Row):
    """MLflow's status, and for a trial how it ended when that says more (KILLED: pruned or cancelled)."""
    from rich.text import Text

    text = row.status
    if row.trial_state in ("pruned", "cancelled", "failed") and row.trial_state.upper() != row.status:
        text = f"{row.status} ({row.trial_state})"
    return Text(text, style=STATUS_STYLE.get(row.status, "white"))


def table(board: Leaderboard, *, max_rows: int | None = None):
    """A rich Table of the leaderboard (the best row in bold); run data is shown as text, never as markup."""
    from rich.table import Table
    from rich.text import Text

    shown = board.rows if max_rows is None else board.rows[:max_rows]
    sort = f", best by {board.metric} ({board.mode})" if board.metric else ", newest first"
    notes = [f"the best {len(shown)} of {len(board.rows)} runs; --limit N or --json for more"
             if len(shown) < len(board.rows) else None,
             PARTIAL_NOTE if any(row.partial for row in shown) else None]
    caption = "\n".join(n for n in notes if n) or None
    t = Table(title=Text(f"{board.experiment}: {len(board.rows)} runs{sort}"), caption=caption)
    for name in ("#", "run", "status", "commit", "platform", "instances", "processes"):
        t.add_column(name, no_wrap=True)
    for name in board.varied_params:
        t.add_column(name, style="magenta")
    for name in board.metrics:
        t.add_column(name, justify="right", style="bold" if name == board.metric else None)
    t.add_column("duration", justify="right")
    t.add_column("inst-h", justify="right")
    best = board.best()
    for row in shown:
        name = row.run_id[:8]
        if row.study:
            name += " (study)"
        elif row.trial is not None:
            name = f"{'' if board.study else '└ '}{name} #{row.trial}"
        t.add_row(
            str(row.rank), name, _status(row),
            Text((row.commit or "—")[:7]), Text(row.platform or "—"), Text(row.instances), Text(row.process_count),
            *(Text(row.params.get(p, "—")) for p in board.varied_params),
            *(_number(row.metrics.get(m)) + (PARTIAL_MARK if row.partial and m in row.metrics else "")
              for m in board.metrics),
            _duration(row.duration_s), "—" if row.instance_hours is None else f"{row.instance_hours:.3f}",
            style="bold" if best is not None and row is best and board.metric else None,
        )
    return t
