"""MLflow run ownership: the pipeline makes the run, train.py continues it.

The pipeline creates (or reuses) the experiment and creates the run before launch,
with the commit, repository, platform and hyperparameters on it; train.py reaches
the same run through MLFLOW_RUN_ID. When the backend is done the pipeline sets the
final state from the backend's outcome, whatever train.py did. MLflow is imported
lazily: it is heavy, and the webhook/Lambda path must never load it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from . import config
from .argv import hyperparameter_text
from .backends.base import JobState

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

FINAL_STATUS = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED", JobState.CANCELLED: "KILLED"}
LOG_TAIL_LINES = 200
# MLflow 3's UI opens an experiment without a kind in its GenAI view (traces, no runs table):
# MMP's experiments are model training, so they are tagged to open on their runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ui_url() -> str:
    """Where people open the MLflow UI (the local `mmp up` one unless configured)."""
    return os.environ.get("MMP_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def make_tracker(tracking_uri: str | None = None):
    """The REST tracker (stdlib, light) for a tracking server, MLflow's client otherwise."""
    uri = tracking_uri or config.tracking_uri()
    if uri.startswith(("http://", "https://")):
        from .tracking_rest import RestRunTracker

        return RestRunTracker(uri)
    return RunTracker(uri)


class TrackerBase:
    """What both trackers share: how a run is ended from the backend's outcome."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._run_experiments: dict[str, str] = {}  # runs made here → experiment id (saves a lookup)

    def _remember(self, run_id: str, experiment_id: str) -> str:
        self._run_experiments[run_id] = experiment_id
        return run_id

    def _known_experiment(self, run_id: str) -> str | None:
        return self._run_experiments.get(run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        raise NotImplementedError

    def _terminate(self, run_id: str, status: str) -> None:
        raise NotImplementedError

    def finish(self, run_id: str, state: JobState, *, message: str = "", log_text: str | None = None) -> str:
        """End the run from the backend's outcome; keep the log (tail too on failure)."""
        status = FINAL_STATUS.get(state, "FAILED")
        if message:
            self.set_tags(run_id, {"mmp.outcome": message[:5000]})
        if log_text is not None:
            self.log_text(run_id, log_text, "logs/train.log")
            if status != "FINISHED":
                tail = "\n".join(log_text.splitlines()[-LOG_TAIL_LINES:])
                self.log_text(run_id, tail, "logs/log-tail.txt")
        self._terminate(run_id, status)
        return status


class RunTracker(TrackerBase):
    """MLflow's own client: any tracking URI, including the local SQLite store."""

    def __init__(self, tracking_uri: str | None = None):
        super().__init__(tracking_uri or config.tracking_uri())
        self._client: MlflowClient | None = None

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            for key, value in EXPERIMENT_TAGS.items():
                if key not in existing.tags:  # made by train.py or an older MMP
                    self.client.set_experiment_tag(existing.experiment_id, key, value)
            return existing.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:") or "://" not in self.tracking_uri:
            location = f"{config.artifact_root()}/{name}"
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another worker
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start(
        self,
        experiment_name: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
    ) -> str:
        """Create the run (status RUNNING) with tags and params; return its id."""
        from mlflow.entities import Param

        exp_id = self.experiment_id(experiment_name)
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
