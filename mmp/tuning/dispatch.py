"""A commit's flow, one level above the pipeline: one run, or a study of many when the experiment
has a Tuning block. The pipeline itself knows nothing of studies; Optuna loads only for a study."""

from __future__ import annotations

from mmp.pipeline.runner import Outcome, Pipeline
from mmp.pipeline.sources import Trigger


def run_commit(pipeline: Pipeline, trigger: Trigger) -> Outcome:
    """`mmp run`'s and the local worker's path: prepare, then train once or run the study."""
    prepared = pipeline.prepare_or_reject(trigger)
    if isinstance(prepared, Outcome):
        return prepared
    if prepared.experiment.tuning is not None:
        from mmp.tuning.study import run_study

        return run_study(pipeline, trigger, prepared)
    return pipeline.run_prepared(trigger, prepared)
