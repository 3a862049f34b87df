"""The local MLflow SQLite store: its schema made once, under a lock, before anything else opens it.

MLflow creates and migrates an empty SQLite store in whichever process opens it first. Two at once
(`mmp up`'s UI server and the worker's first job) race: the UI dies, the job fails, or the file is
left half-migrated and every later job fails. So MMP makes the schema while holding `<db>.lock`:
`mmp up` before it starts the UI server and the worker (as the ECS container migrates its auth
database before its workers), and every tracker before its first call (`mmp run`, a worker
restarted after the store was deleted). Checking costs one stdlib SQLite query; MLflow is
imported only when the schema is missing.

A store error MLflow marks TEMPORARILY_UNAVAILABLE (SQLite's locked, read-only and I/O errors:
the transaction was rolled back) is retried a few times, with backoff, before it becomes a job's
outcome.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
import urllib.request
from contextlib import closing
from typing import Any, Callable

from mmp.system.filelock import exclusive

log = logging.getLogger("mmp.tracking.store")

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # then the error stands (SQLite itself waits 20 s on a lock first)
TRANSIENT_CODE = "TEMPORARILY_UNAVAILABLE"  # MLflow's code for SQLAlchemy's OperationalError


def sqlite_path(tracking_uri: str) -> str | None:
    """The file behind a `sqlite:///` URI (None for other stores and in-memory DBs)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]  # sqlite:////abs keeps its leading /
    return path if path and path != ":memory:" else None


def has_schema(path: str) -> bool:
    """Whether MLflow's migrations have run on the SQLite file (alembic's version row exists)."""
    try:
        with closing(sqlite3.connect(f"file:{urllib.request.pathname2url(path)}?mode=ro", uri=True,
                                     timeout=30)) as db:
            return db.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    except sqlite3.Error:  # no file, no table, or not a database: MLflow makes or reports it
        return False


def prepare(tracking_uri: str, artifact_root: str) -> bool:
    """Make a local store's schema once, under `<db>.lock`; True if this call made it.

    Other stores (a tracking server, PostgreSQL) are migrated by their own server."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return False
    with exclusive(f"{path}.lock"):
        if has_schema(path):
            return False
        log.info("creating the MLflow store's schema in %s", path)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(tracking_uri, artifact_root)  # creates and migrates the tables, checks them
        store.engine.dispose()
        return True


def is_transient(exc: BaseException) -> bool:
    """A store error worth another try: MLflow's TEMPORARILY_UNAVAILABLE, or SQLAlchemy's OperationalError
    raised while a store opens (before MLflow wraps it)."""
    if getattr(exc, "error_code", None) == TRANSIENT_CODE:
        return True
    errors = sys.modules.get("sqlalchemy.exc")  # never imported here: the runner image has no SQLAlchemy
    return errors is not None and isinstance(exc, errors.OperationalError)


def retrying(call: Callable[..., Any], what: str, delays: tuple[float, ...] = RETRY_DELAYS_S,
             before_retry: Callable[[], None] | None = None) -> Callable[..., Any]:
    """`call`, tried again after each delay while it fails with a transient store error; logs each retry.
    `before_retry` runs before each new try (a connection pooled while the file was read-only stays so)."""

    def attempt(*args: Any, **kwargs: Any) -> Any:
        for delay in (*delays, None):
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                if delay is None or not is_transient(exc):
                    raise
                log.warning("MLflow store busy or unavailable in %s (%s); retrying in %.1f s",
                            what, str(exc).splitlines()[0][:200], delay)
                time.sleep(delay)
                if before_retry is not None:
                    before_retry()

    return attempt


class RetryingClient:
    """An MlflowClient whose calls retry transient store errors (each call is one store transaction)."""

    def __init__(self, client: Any, before_retry: Callable[[], None] | None = None):
        self._client = client
        self._before_retry = before_retry

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        return retrying(value, name, before_retry=self._before_retry) if callable(value) else value
