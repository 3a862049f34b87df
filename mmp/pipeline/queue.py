"""The local stack's durable job queue: a SQLite table in `$MMP_HOME/mmp.db`.

Why SQLite: an accepted delivery is committed (WAL) before the webhook answers, so
it survives a crash or `kill -9`; the delivery id is the primary key and the body
digest is unique, so the same delivery (or a replayed body) is queued at most once.
A job moves queued → running → done/failed; `claim` is one IMMEDIATE transaction,
so two workers can never take the same job.

Restart policy (documented in docs/gitops.md): queued jobs run exactly once after a
restart; a job found `running` with no live worker was interrupted mid-flight, and
is marked failed (never re-run: it may have launched training already). The worker
then fails its MLflow run and kills whatever it left running.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmp import config
from mmp.pipeline.store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    delivery_id TEXT PRIMARY KEY,
    body_sha    TEXT UNIQUE,
    repository  TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    state       TEXT NOT NULL,
    worker      TEXT,
    run_id      TEXT,
    message     TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""

STATES = ("queued", "running", "done", "failed")


@dataclass
class QueuedJob:
    delivery_id: str
    repository: str
    commit_sha: str
    payload: dict[str, Any]
    state: str
    worker: str | None
    run_id: str | None
    message: str
    created_at: float
    started_at: float | None
    finished_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _row(row: sqlite3.Row) -> QueuedJob:
    data = {k: row[k] for k in row.keys() if k != "body_sha"}
    data["payload"] = json.loads(data["payload"])
    return QueuedJob(**data)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobQueue:
    """Durable, idempotent queue; also the webhook's local `JobSink`."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or config.mmp_home() / "mmp.db")
        self._local = threading.local()
        with closing(connect(self.path)) as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """One connection per thread, kept: the webhook answers hundreds of deliveries a second."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path)
        return db

    # -- the webhook side ------------------------------------------------------
    def submit(self, job, body_digest: str | None = None) -> bool:
        """Queue `job` (a mmp.webhook.core.Job); False if its delivery id or body was seen."""
        cur = self._db().execute(
            "INSERT OR IGNORE INTO jobs (delivery_id, body_sha, repository, commit_sha, payload, state, created_at)"
            " VALUES (?,?,?,?,?,'queued',?)",
            (job.delivery_id, body_digest, job.repository, job.after, json.dumps(job.to_dict()), time.time()),
        )
        return cur.rowcount == 1

    # -- the worker side -------------------------------------------------------
    def claim(self, worker: str | None = None) -> QueuedJob | None:
        """Take the oldest queued job atomically (state → running)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', worker = ?, started_at = ? WHERE delivery_id = ?",
                       (worker or worker_id(), now, row["delivery_id"]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        job = _row(row)
        job.state, job.worker, job.started_at = "running", worker or worker_id(), now
        return job

    def set_run(self, delivery_id: str, run_id: str) -> None:
        self._db().execute("UPDATE jobs SET run_id = ? WHERE delivery_id = ?", (run_id, delivery_id))

    def finish(self, delivery_id: str, state: str, message: str = "") -> None:
        if state not in ("done", "failed"):
            raise ValueError(f"a job finishes as done or failed, not {state!r}")
        self._db().execute("UPDATE jobs SET state = ?, message = ?, finished_at = ? WHERE delivery_id = ?",
                           (state, message[:2000], time.time(), delivery_id))

    def requeue(self, delivery_id: str) -> None:
        """Put a job a dead worker left running back in line (a study resumes; it re-runs no trial)."""
        self._db().execute("UPDATE jobs SET state = 'queued', worker = NULL, started_at = NULL "
                           "WHERE delivery_id = ? AND state = 'running'", (delivery_id,))

    def running(self) -> list[QueuedJob]:
        rows = self._db().execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at").fetchall()
        return [_row(r) for r in rows]

    # -- reading -----------------------------------------------------------------
    def get(self, delivery_id: str) -> QueuedJob | None:
        row = self._db().execute("SELECT * FROM jobs WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return _row(row) if row else None

    def list(self, limit: int = 50, state: str | None = None, commit: str | None = None) -> list[QueuedJob]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if state:
            query += " AND state = ?"; args.append(state)
        if commit:
            query += " AND commit_sha = ?"; args.append(commit)
        query += " ORDER BY created_at DESC LIMIT ?"; args.append(limit)
        return [_row(r) for r in self._db().execute(query, args).fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
