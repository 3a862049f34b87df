"""Finding runs in MLflow: the client, an experiment by name, and every matching run page by page.

Below both the leaderboard (compare) and a study's parent (studies), which each need it.
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Iterator, Sequence

from mmp import config

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PAGE_SIZE = 5000  # runs per search page; MLflow caps a page at 50,000


class CompareError(ValueError):
    """A leaderboard that cannot be made (unknown experiment, bad mode); the message says why."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while MLflow builds many short-lived objects."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_client(tracking_uri: str | None = None) -> "MlflowClient":
    from mmp.tracking.sigv4 import mlflow_client

    return mlflow_client(tracking_uri or config.tracking_uri())


def experiment_id(client: "MlflowClient", name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments(max_results=200))
        hint = f"; known experiments: {', '.join(known)}" if known else "; no experiments yet"
        raise CompareError(f"no MLflow experiment named {name!r}{hint}")
    return experiment.experiment_id


def search_all(client: "MlflowClient", experiment_ids: Sequence[str], *, filter_string: str = "",
               order: Sequence[str] = (), limit: int | None = None, page_size: int = PAGE_SIZE) -> list["Run"]:
    """Every matching run, page by page (MLflow's page tokens), in `order`."""
    runs: list[Run] = []
    token = None
    with gc_paused():
        while True:
            want = page_size if limit is None else min(page_size, limit - len(runs))
            page = client.search_runs(list(experiment_ids), filter_string=filter_string, order_by=list(order),
                                      max_results=want, page_token=token)
            runs.extend(page)
            token = page.token
            if not token or not page or (limit is not None and len(runs) >= limit):
                return runs
