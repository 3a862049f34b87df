"""Ending a trial whose study loop is gone: the worker that resumes a study and Conclude on AWS
(after the runner task died for good) both stop its job, tear it down and end its MLflow run.
Light on purpose: Conclude is a Lambda."""

from __future__ import annotations

import logging
from typing import Any, Callable

from mmp.backends import Backend, JobHandle, JobState
from mmp.tuning.tags import TAG_TRIAL_STATE

log = logging.getLogger("mmp.tuning")


def end_trial(run_id: str, handle: dict | None, *, backend_for: Callable[[str], Backend], tracker: Any,
              message: str, state: JobState = JobState.FAILED, tag: str = "failed") -> None:
    """Cancel and tear down the trial's job (it may still run, or hold machines), tag it (failed unless
    the study recorded another end) and end its run; each step is tried even if one before it failed,
    and failures are logged."""
    if handle:
        job = JobHandle.from_dict(handle)
        for step in ("cancel", "teardown"):
            try:
                getattr(backend_for(job.platform), step)(job)
            except Exception as exc:
                log.error("could not %s trial run %s: %s", step, run_id, exc)
    try:
        tracker.set_tags(run_id, {TAG_TRIAL_STATE: tag})
        tracker.finish(run_id, state, message=message)
    except Exception as exc:
        log.error("could not end trial run %s: %s", run_id, exc)
