"""Where a study stands, in the local state DB: found by delivery (recovery) or parent run (cancel).

A small table beside the job queue rather than Optuna's own tables: `mmp cancel` and
the worker's recovery read it with sqlite3 alone, without importing Optuna.
States: running → finished | failed | cancelled.
"""

from __future__ import annotations

import time
from contextlib import closing

from mmp.pipeline.store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    delivery_id      TEXT PRIMARY KEY,
    study_name       TEXT NOT NULL,
    parent_run_id    TEXT,
    state            TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    updated_at       REAL NOT NULL
);
"""


def _db():
    db = connect()
    db.executescript(SCHEMA)
    return db


def register(delivery_id: str, study_name: str) -> None:
    """Record a study as running (again, after a restart: a pending cancel still stands)."""
    with closing(_db()) as db:
        db.execute("INSERT INTO studies (delivery_id, study_name, state, updated_at) VALUES (?, ?, 'running', ?) "
                   "ON CONFLICT(delivery_id) DO UPDATE SET state = 'running', updated_at = excluded.updated_at",
                   (delivery_id, study_name, time.time()))


def set_parent(delivery_id: str, run_id: str) -> None:
    with closing(_db()) as db:
        db.execute("UPDATE studies SET parent_run_id = ?, updated_at = ? WHERE delivery_id = ?",
                   (run_id, time.time(), delivery_id))


def finish(delivery_id: str, state: str) -> None:
    with closing(_db()) as db:
        db.execute("UPDATE studies SET state = ?, updated_at = ? WHERE delivery_id = ?",
                   (state, time.time(), delivery_id))


def state(delivery_id: str) -> str | None:
    """running, finished, failed or cancelled; None if this delivery started no study."""
    with closing(_db()) as db:
        row = db.execute("SELECT state FROM studies WHERE delivery_id = ?", (delivery_id,)).fetchone()
    return row["state"] if row is not None else None


def resumable(delivery_id: str) -> bool:
    """A study this delivery started and that has not ended: recovery resumes it instead of failing it."""
    return state(delivery_id) == "running"


def request_cancel(parent_run_id: str) -> bool:
    """Ask the running study whose parent run this is to stop; False if there is none."""
    with closing(_db()) as db:
        cur = db.execute("UPDATE studies SET cancel_requested = 1, updated_at = ? "
                         "WHERE parent_run_id = ? AND state = 'running'", (time.time(), parent_run_id))
        return cur.rowcount > 0


def cancel_requested(delivery_id: str) -> bool:
    with closing(_db()) as db:
        row = db.execute("SELECT cancel_requested FROM studies WHERE delivery_id = ?", (delivery_id,)).fetchone()
    return bool(row and row["cancel_requested"])
