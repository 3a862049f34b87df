"""MLflow run ownership: the pipeline makes the run, train.py continues it.

The pipeline creates (or reuses) the experiment and creates the run before launch,
with the commit, repository, platform and hyperparameters on it; train.py reaches
the same run through MLFLOW_RUN_ID. When the backend is done the pipeline sets the
final state from the backend's outcome, whatever train.py did. MLflow is imported
lazily: it is heavy, and the webhook/Lambda path must never load it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Mapping

from mmp import config
from mmp.tracking import store as mlflow_store
from mmp.contract.argv import hyperparameter_text
from mmp.tracking.base import PAGE_SIZE, TrackerBase, ui_url
from mmp.tracking.store import sqlite_path

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

_SQLITE_FILES: dict[str, tuple[int, int] | None] = {}  # SQLite store path → the file MLflow's cached store opened


def fresh_store(tracking_uri: str) -> None:
    """Make MLflow reopen a SQLite store: it must not stay broken after the file was.

    MLflow keeps one store and one SQLAlchemy engine per URI for the life of the
    process. A connection pooled while `mlflow.db` was read-only stays read-only after
    the file is writable again; once the file is deleted, the cached store writes into
    the unlinked file, or into a new, empty one without tables. Either way every later
    job would fail until a restart. So each new tracker drops the pooled connections,
    and when the file was replaced or deleted also the cached stores (a new store
    creates the schema in a new file).
    """
    path = sqlite_path(tracking_uri)
    if path is None:
        return
    try:
        st = os.stat(path)
        now: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        now = None
    replaced = now is None or _SQLITE_FILES.get(path, now) != now
    _SQLITE_FILES[path] = now
    if "mlflow" in sys.modules:  # nothing is cached before MLflow's first use
        _reopen_mlflow_store(tracking_uri, forget_stores=replaced)


def _reopen_mlflow_store(tracking_uri: str, *, forget_stores: bool) -> None:
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Only SQL stores MLflow has loaded can hold engines; looking them up in sys.modules keeps
    # SQLAlchemy out of processes that never open a SQL store (the runner image has no SQLAlchemy).
    for module in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store"):
        store_class = getattr(sys.modules.get(module), "SqlAlchemyStore", None)
        engine = getattr(store_class, "_engine_map", {}).get(tracking_uri)
        if engine is not None:
            engine.dispose()  # pooled connections go; the next one opens the path afresh
    if not forget_stores:
        return
    for registry in (getattr(tracking_utils, "_tracking_store_registry", None),
                     getattr(registry_utils, "_model_registry_store_registry", None)):
        cached = getattr(registry, "_get_store_with_resolved_uri", None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()  # a new store checks the schema again and creates it in a new file


def make_tracker(tracking_uri: str | None = None):
    """The REST tracker (stdlib, light) for a tracking server, MLflow's client otherwise."""
    uri = tracking_uri or config.tracking_uri()
    if uri.startswith(("http://", "https://")):
        from mmp.tracking.rest import RestRunTracker

        return RestRunTracker(uri)
    return RunTracker(uri)


class RunTracker(TrackerBase):
    """MLflow's own client: any tracking URI, including the local SQLite store."""

    def __init__(self, tracking_uri: str | None = None):
        super().__init__(tracking_uri or config.tracking_uri())
        self._client: MlflowClient | None = None

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            from mlflow.tracking import MlflowClient

            fresh_store(self.tracking_uri)
            mlflow_store.prepare(self.tracking_uri, config.artifact_root())  # never migrated by two at once
            self._client = mlflow_store.RetryingClient(MlflowClient(tracking_uri=self.tracking_uri),
                                                       before_retry=lambda: fresh_store(self.tracking_uri))
        return self._client

    def _find(self, name: str) -> tuple[str, dict[str, str], bool] | None:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return None
        return found.experiment_id, dict(found.tags), found.lifecycle_stage == "deleted"

    def _create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        location = None
        if self.tracking_uri.startswith("sqlite:") or "://" not in self.tracking_uri:
            location = f"{config.artifact_root()}/{name}"
        return self.client.create_experiment(name, artifact_location=location, tags=dict(tags))

    def _restore_experiment(self, experiment_id: str) -> None:
        self.client.restore_experiment(experiment_id)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.client.set_experiment_tag(experiment_id, key, value)

    def start(
        self,
        experiment_name: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        owner: str | None = None,
    ) -> str:
        """Create the run (status RUNNING) with tags and params; return its id.

        With `owner` (the repository), the experiment must be that repository's or shared
        with it (mmp.tracking.ownership); a new experiment is tagged as its.
        """
        from mlflow.entities import Param

        exp_id = self.experiment_id(experiment_name, owner)
        run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        run_id = self._remember(run.info.run_id, exp_id)
        if params:
            self.client.log_batch(run_id, params=[Param(k, hyperparameter_text(v)) for k, v in params.items()])
        return run_id

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str:
        experiment_id = experiment_id or self._known_experiment(run_id) or self.client.get_run(run_id).info.experiment_id
        return f"{ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def _terminate(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def metric_page(self, run_id: str, key: str, *, max_results: int, page_token: str | None
                    ) -> tuple[list[tuple[int, float]], str | None]:
        # MlflowClient.get_metric_history reads every page before it returns; the store's own
        # get_metric_history(max_results, page_token) (mlflow's AbstractStore) is the bounded read
        page = self.client._tracking_client.store.get_metric_history(run_id, key, max_results=max_results,
                                                                     page_token=page_token)
        return [(m.step, m.value) for m in page], getattr(page, "token", None) or None

    def latest_metric(self, run_id: str, key: str) -> float | None:
        return self.client.get_run(run_id).data.metrics.get(key)

    def _experiment_page(self, token: str | None) -> tuple[list[str], str | None]:
        from mlflow.entities import ViewType

        page = self.client.search_experiments(view_type=ViewType.ALL, max_results=PAGE_SIZE, page_token=token)
        return [e.experiment_id for e in page], page.token

    def _run_page(self, experiment_ids: list[str], filter_string: str, token: str | None
                  ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        from mlflow.entities import ViewType

        page = self.client.search_runs(experiment_ids, filter_string, run_view_type=ViewType.ALL,
                                       max_results=PAGE_SIZE, page_token=token)
        return [(r.info.run_id, r.data.tags) for r in page], page.token
