"""Ending a trial whose study loop is gone: the worker that resumes a study and Conclude on AWS
(after the runner task died for good) both stop its job, tear it down and end its MLflow run.
Light on purpose: Conclude is a Lambda."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from mmp.backends import Backend, JobHandle, JobState
from mmp.tuning.tags import TAG_TRIAL_STATE

log = logging.getLogger("mmp.tuning")


def release_warm(backend: Backend, handles: Iterable[JobHandle]) -> None:
    """No trial of the study follows: give back what its jobs keep warm (SageMaker's warm pools).
    Never fails the study's end: a pool not given back ends by its own keep-alive."""
    try:
        backend.release_warm(list(handles))
    except Exception as exc:
        log.error("could not give back the warm pools of the study's trials: %s", exc)


def end_trial(run_id: str, handle: dict | None, *, backend_for: Callable[[str], Backend], tracker: Any,
              message: str, state: JobState = JobState.FAILED, tag: str = "failed", release: bool = False) -> None:
    """Cancel and tear down the trial's job (it may still run, or hold machines), tag it (failed unless
    the study recorded another end) and end its run; each step is tried even if one before it failed,
    and failures are logged. `release`: no trial follows it (the study is over), so its warm pool goes too."""
    if handle:
        job = JobHandle.from_dict(handle)
        for step in ("cancel", "teardown", "release_warm") if release else ("cancel", "teardown"):
            try:
                backend = backend_for(job.platform)
                backend.release_warm([job]) if step == "release_warm" else getattr(backend, step)(job)
            except Exception as exc:
                log.error("could not %s trial run %s: %s", step, run_id, exc)
    try:
        tracker.set_tags(run_id, {TAG_TRIAL_STATE: tag})
        tracker.finish(run_id, state, message=message)
    except Exception as exc:
        log.error("could not end trial run %s: %s", run_id, exc)
