"""The local record of runs (`mmp runs`, `status`, `logs`, `cancel`): SQLite under MMP_HOME.

One row per launch, keyed by the MLflow run id, holding the backend's handle so any
process can follow or cancel the job. WAL mode lets the worker write while the CLI
reads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mmp import config

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    experiment  TEXT NOT NULL,
    repository  TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    platform    TEXT NOT NULL,
    state       TEXT NOT NULL,
    message     TEXT NOT NULL DEFAULT '',
    handle      TEXT,
    delivery_id TEXT,
    run_url     TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
"""


@dataclass
class RunRecord:
    run_id: str
    experiment: str
    repository: str
    commit_sha: str
    platform: str
    state: str
    message: str
    handle: dict[str, Any] | None
    delivery_id: str | None
    run_url: str | None
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def connect(path: Path | None = None) -> sqlite3.Connection:
    """A connection to the local state DB (shared with the job queue)."""
    db = sqlite3.connect(str(path or config.mmp_home() / "mmp.db"), timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.row_factory = sqlite3.Row
    return db


def like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with `text` literally (escape char: backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class RunStore:
    def __init__(self, path: Path | None = None):
        self.path = Path(path or config.mmp_home() / "mmp.db")
        with closing(connect(self.path)) as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        return connect(self.path)

    def add(self, *, run_id: str, experiment: str, repository: str, commit_sha: str, platform: str,
            delivery_id: str | None = None, run_url: str | None = None, state: str = "PENDING") -> None:
        now = time.time()
        with closing(self._db()) as db:
            db.execute(
                "INSERT INTO runs (run_id, experiment, repository, commit_sha, platform, state, delivery_id,"
                " run_url, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, experiment, repository, commit_sha, platform, state, delivery_id, run_url, now, now),
            )

    def update(self, run_id: str, *, state: str | None = None, message: str | None = None,
               handle: dict[str, Any] | None = None) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if state is not None:
            sets.append("state = ?"); args.append(state)
        if message is not None:
            sets.append("message = ?"); args.append(message)
        if handle is not None:
            sets.append("handle = ?"); args.append(json.dumps(handle))
        with closing(self._db()) as db:
            db.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", (*args, run_id))

    def get(self, run_id: str) -> RunRecord | None:
        """A run by full id or unique prefix (as people type them); `%` and `_` match only themselves."""
        with closing(self._db()) as db:
            rows = db.execute("SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 2",
                              (like_prefix(run_id),)).fetchall()
        if len(rows) != 1:
            return None
        return _record(rows[0])

    def has(self, run_id: str) -> bool:
        """Whether the pipeline recorded exactly this run (no prefix matching: promotion asks)."""
        with closing(self._db()) as db:
            return db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def list(self, limit: int = 50, state: str | None = None) -> list[RunRecord]:
        query, args = "SELECT * FROM runs", []
        if state:
            query += " WHERE state = ?"; args.append(state)
        query += " ORDER BY created_at DESC LIMIT ?"; args.append(limit)
        with closing(self._db()) as db:
            return [_record(r) for r in db.execute(query, args).fetchall()]

    def active(self) -> Iterator[RunRecord]:
        with closing(self._db()) as db:
            rows = db.execute("SELECT * FROM runs WHERE state IN ('PENDING', 'RUNNING')").fetchall()
        return iter([_record(r) for r in rows])


def _record(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    data["handle"] = json.loads(data["handle"]) if data["handle"] else None
    return RunRecord(**data)
