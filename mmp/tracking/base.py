"""What both MLflow trackers share: the tags the pipeline sets, the UI link, and the experiment and run
flow over a tracker's primitives. Below both trackers, so neither imports the other."""

from __future__ import annotations

import os
from typing import Iterator, Mapping

from mmp.backends.base import JobState
from mmp.tracking import ownership

FINAL_STATUS = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED", JobState.CANCELLED: "KILLED"}
LOG_TAIL_LINES = 200
# MLflow 3's UI opens an experiment without a kind in its GenAI view (traces, no runs table):
# MMP's experiments are model training, so they are tagged to open on their runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Set by the pipeline alone, when it ends a run: the output is copied and the hosts are released.
# The run's status is no such sign: train.py's mlflow.start_run() sets FINISHED on its own exit.
CONCLUDED_TAG = "mmp.concluded"
OPEN_RUNS_CHUNK = 100  # experiment ids per run search
PAGE_SIZE = 1000

def ui_url() -> str:
    """Where people open the MLflow UI (the local `mmp up` one unless configured)."""
    return os.environ.get("MMP_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


class TrackerBase:
    """What both trackers share: finding, making and claiming an experiment, and ending a run from the
    backend's outcome. A tracker supplies the primitives (`_find`, `_create_experiment`, ...) over its
    transport: MLflow's client (mmp.tracking.client) or REST (mmp.tracking.rest)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._run_experiments: dict[str, str] = {}  # runs made here → experiment id (saves a lookup)
        self._experiment_ids: dict[str, str] = {}  # experiment names resolved here → id

    def experiment_id(self, name: str, owner: str | None = None) -> str:
        """The experiment's id, made (tagged with its `owner` repository) if missing; a foreign owner is
        refused (mmp.tracking.ownership); a deleted one is restored."""
        if owner is None and name in self._experiment_ids:
            return self._experiment_ids[name]
        found = self._find(name)
        if found is None:
            tags = {**EXPERIMENT_TAGS, **({ownership.OWNER_TAG: owner} if owner else {})}
            try:
                exp_id = self._create_experiment(name, tags)
            except Exception:  # created concurrently by another worker, or a real refusal
                found = self._find(name)
                if found is None:
                    raise
            else:
                self._experiment_ids[name] = exp_id
                return exp_id
        exp_id, tags, deleted = found
        if owner is not None:
            self.claim(name, exp_id, tags, owner)
        if deleted:
            self._restore_experiment(exp_id)
        for key, value in EXPERIMENT_TAGS.items():
            if key not in tags:  # made by train.py or an older MMP
                self.set_experiment_tag(exp_id, key, value)
        self._experiment_ids[name] = exp_id
        return exp_id

    def _find(self, name: str) -> tuple[str, dict[str, str], bool] | None:
        """(id, tags, deleted) of the experiment called `name`; None if there is none."""
        raise NotImplementedError

    def _create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        raise NotImplementedError

    def _restore_experiment(self, experiment_id: str) -> None:
        raise NotImplementedError

    def _remember(self, run_id: str, experiment_id: str) -> str:
        self._run_experiments[run_id] = experiment_id
        return run_id

    def _known_experiment(self, run_id: str) -> str | None:
        return self._run_experiments.get(run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def run_tags(self, run_id: str) -> dict[str, str]:
        raise NotImplementedError

    def metric_page(self, run_id: str, key: str, *, max_results: int, page_token: str | None
                    ) -> tuple[list[tuple[int, float]], str | None]:
        """One bounded page of a metric's history as (step, value) in log order, and the next page's token
        (None at the end): a study reads a trial's objective with it, a tick at a time."""
        raise NotImplementedError

    def latest_metric(self, run_id: str, key: str) -> float | None:
        """The metric's value at its latest step (one row, however many were logged); None if never logged."""
        raise NotImplementedError

    def concluded(self, run_id: str) -> str | None:
        """The final status the pipeline gave the run (CONCLUDED_TAG); None while it has not ended it."""
        return self.run_tags(run_id).get(CONCLUDED_TAG)

    def find_experiment(self, name: str) -> tuple[str, dict[str, str]] | None:
        """(id, tags) of the experiment called `name`, deleted ones included; None if there is none."""
        found = self._find(name)
        return None if found is None else found[:2]

    def _experiment_page(self, token: str | None) -> tuple[list[str], str | None]:
        """One page of experiment ids (deleted ones too) and the next page's token."""
        raise NotImplementedError

    def _run_page(self, experiment_ids: list[str], filter_string: str, token: str | None
                  ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        """One page of (run id, tags) and the next page's token."""
        raise NotImplementedError

    def _runs(self, experiment_ids: list[str], filter_string: str = "") -> Iterator[tuple[str, dict[str, str]]]:
        token = None
        while True:
            runs, token = self._run_page(experiment_ids, filter_string, token)
            yield from runs
            if not token:
                return

    def run_sources(self, experiment_id: str) -> set[str | None]:
        """The repositories the experiment's runs came from (ownership.run_source)."""
        return {ownership.run_source(tags) for _, tags in self._runs([experiment_id])}

    def open_runs(self, tag: str) -> list[tuple[str, str]]:
        """(run id, value of `tag`) for every RUNNING run that carries `tag`, in every experiment."""
        ids, token = [], None
        while True:
            page, token = self._experiment_page(token)
            ids += page
            if not token:
                break
        found = []
        for start in range(0, len(ids), OPEN_RUNS_CHUNK):
            found += [(run_id, tags[tag]) for run_id, tags in
                      self._runs(ids[start:start + OPEN_RUNS_CHUNK], "attributes.status = 'RUNNING'") if tags.get(tag)]
        return found

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        raise NotImplementedError

    def ownership_problem(self, name: str, repository: str) -> str | None:
        """Why `repository` may not train into experiment `name` (see mmp.tracking.ownership), or None."""
        found = self.find_experiment(name)
        if found is None:
            return None
        experiment_id, tags = found
        sources = () if ownership.OWNER_TAG in tags else self.run_sources(experiment_id)
        return ownership.check(name, tags, sources, repository)

    def claim(self, name: str, experiment_id: str, tags: Mapping[str, str], repository: str) -> None:
        """Refuse a foreign repository; an experiment nobody owns yet becomes `repository`'s."""
        if ownership.OWNER_TAG in tags:
            problem = ownership.check(name, dict(tags), (), repository)
        else:
            sources = self.run_sources(experiment_id)
            problem = ownership.check(name, dict(tags), sources, repository)
            if problem is None and ownership.claimable(sources, repository):
                self.set_experiment_tag(experiment_id, ownership.OWNER_TAG, repository)
        if problem:
            raise ownership.OwnershipError(problem)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        raise NotImplementedError

    def _terminate(self, run_id: str, status: str) -> None:
        raise NotImplementedError

    def finish(self, run_id: str, state: JobState, *, message: str = "", log_text: str | None = None) -> str:
        """End the run from the backend's outcome; keep the log (tail too on failure)."""
        status = FINAL_STATUS.get(state, "FAILED")
        self.set_tags(run_id, {CONCLUDED_TAG: status, **({"mmp.outcome": message[:5000]} if message else {})})
        if log_text is not None:
            self.log_text(run_id, log_text, "logs/train.log")
            if status != "FINISHED":
                tail = "\n".join(log_text.splitlines()[-LOG_TAIL_LINES:])
                self.log_text(run_id, tail, "logs/log-tail.txt")
        self._terminate(run_id, status)
        return status
