"""A study `mmp run` was interrupted in (Ctrl-C, a closed terminal, kill -9), and running it again.

`mmp run` of a study remembers, per repository, commit and experiment file, which delivery it ran
and which process ran it (pid + start time). A later `mmp run` of the same commit and file finds a
study that has not ended and whose process is gone, and resumes it under the same delivery id: the
study's Optuna storage and parent run are found again, the trials that were running are replaced
(mmp.tuning.study), and finished trials are not run twice. `--fresh` starts a new study instead.
The counts shown come from Optuna's storage, without MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from contextlib import closing
from pathlib import Path

from mmp.system import procs
from mmp.pipeline.store import connect
from mmp.tuning import control

SCHEMA = """
CREATE TABLE IF NOT EXISTS run_studies (
    resume_key   TEXT PRIMARY KEY,
    delivery_id  TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    pid_started  REAL,
    updated_at   REAL NOT NULL
);
"""


def _db():
    db = connect()
    db.executescript(SCHEMA)
    return db


def resume_key(repo: Path, commit: str, experiment_file: Path | None) -> str:
    """The same repository, commit and experiment (the committed file, or a given file's exact bytes)."""
    source = "committed" if experiment_file is None else hashlib.sha256(Path(experiment_file).read_bytes()).hexdigest()
    return f"{Path(repo).resolve()}@{commit}:{source}"


def remember(key: str, delivery_id: str) -> None:
    """This process runs the study of `key` under `delivery_id`."""
    with closing(_db()) as db:
        db.execute("INSERT INTO run_studies (resume_key, delivery_id, pid, pid_started, updated_at) "
                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT(resume_key) DO UPDATE SET delivery_id = excluded.delivery_id, "
                   "pid = excluded.pid, pid_started = excluded.pid_started, updated_at = excluded.updated_at",
                   (key, delivery_id, os.getpid(), procs.start_time(os.getpid()), time.time()))


@dataclasses.dataclass
class Found:
    delivery_id: str
    running_pid: int | None  # the process running it now; None: nobody, it can be resumed


def find(key: str) -> Found | None:
    """The study of `key` that has not ended (None when there is none, or it finished, failed or was cancelled)."""
    with closing(_db()) as db:
        row = db.execute("SELECT * FROM run_studies WHERE resume_key = ?", (key,)).fetchone()
    if row is None or control.state(row["delivery_id"]) != "running":
        return None
    alive = row["pid"] != os.getpid() and procs.find_process(row["pid"], row["pid_started"]) is not None
    return Found(row["delivery_id"], row["pid"] if alive else None)


@dataclasses.dataclass
class Progress:
    parent_run_id: str | None
    total: int | None
    counts: dict[str, int]  # finished trials by state (complete, pruned, failed), replaced ones left out

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{n} {state}" for state, n in self.counts.items() if n) or "none finished"
        return f"{self.done}/{self.total if self.total is not None else '?'} trials done ({parts})"


def progress(delivery_id: str, storage: str | None = None) -> Progress | None:
    """Where the study of `delivery_id` stands in Optuna's storage; None if it has no study there."""
    import optuna

    from mmp.tuning.study import ATTR_INTERRUPTED, ATTR_PARENT, ATTR_TOTAL, make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=f"mmp-{delivery_id}", storage=make_storage(storage))
    except KeyError:
        return None
    attrs = study.user_attrs
    skip = set(attrs.get(ATTR_INTERRUPTED, []))
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in skip:
            key = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, "failed")
            counts[key] += 1
    return Progress(attrs.get(ATTR_PARENT), attrs.get(ATTR_TOTAL), counts)


def studies_left_by(deliveries: list[str]) -> list[tuple[str, Progress | None]]:
    """Of these deliveries, the studies that have not ended (`mmp up` says so as it stops)."""
    return [(d, progress(d)) for d in deliveries if control.state(d) == "running"]
