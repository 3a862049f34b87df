"""The runner task: the pipeline's long stages, in an ECS Fargate task the state machine waits on.

    python -m mmp.pipeline.aws_runner train     # the DLAMI cluster: provision, SSH, horovodrun, wait, teardown
    python -m mmp.pipeline.aws_runner promote   # promote.json with the MLflow client
    python -m mmp.pipeline.aws_runner study     # a Tuning block: every trial through its platform's backend

Step Functions starts it with `ecs:runTask.sync` (no polling, no history growing with
the job) and passes the key of the state Prepare left for it in S3 in MMP_RUNNER_STATE (the webhook's job
and, for training, the MLflow run Prepare made; mmp.pipeline.runner_results.hand_off). Nothing secret travels there: the
GitHub token and the MLflow password arrive through the task definition's `secrets`,
and the SSH key is read from Secrets Manager by the backend (mmp.backends.dlami).

Training runs `Pipeline.execute`, the same launch → wait → teardown that `mmp run`
and the local worker use, and leaves the result object Conclude reads
(mmp.pipeline.runner_results): Conclude ends the MLflow run, sets the commit status
and sends the e-mail, as for SageMaker. Promotion runs `run_promotion`, as the local
worker does, which reports on context mmp/promotion itself. A study runs
`StudyRunner` as the local worker does, with Optuna's state journaled in the artifacts
bucket (mmp.tuning.s3_journal): when the task dies the state machine starts it again
and the study resumes, replacing the trial that was running. It reports progress and
its end on the commit itself, and keeps `progress.json` (parent run, running trials'
jobs) for Conclude in case it dies for good. SIGTERM (the task
stopped, timed out or the execution aborted) cancels training and terminates the
instances before the task goes; the Catch path and the janitor back that up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

from mmp.backends import JobState, JobStatus
from mmp.pipeline import runner_results

log = logging.getLogger("mmp.pipeline.runner_task")

STATE_VARIABLE = "MMP_RUNNER_STATE"
STOPPED_MESSAGE = "stopped: the runner task was stopped before the job ended"
STUDY_POLL_SECONDS = 15.0  # how often a study reads its trials' objective in MLflow (the stack's mmp:pollSeconds)


def _stop_on_sigterm() -> Any:
    """ECS stops a task with SIGTERM (then SIGKILL after stopTimeout): unwind through the
    pipeline's own cancel/teardown rather than die mid-launch with instances up.
    Returns the previous handler."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def read_state(environ: dict[str, str] | None = None) -> dict[str, Any]:
    raw = (environ or os.environ).get(STATE_VARIABLE)
    if not raw:
        raise SystemExit(f"{STATE_VARIABLE} is not set: the state machine passes the job in it")
    state = json.loads(raw)
    if isinstance(state, dict):
        state = runner_results.taken_over(state)  # Prepare's hand-off in S3 (overrides stay small)
    if not isinstance(state, dict) or "job" not in state:
        raise SystemExit(f"{STATE_VARIABLE} must be a JSON object with 'job' or '{runner_results.HANDOFF_KEY}'")
    return state


def train(state: dict[str, Any]) -> dict[str, Any]:
    """Launch, follow and tear down the run Prepare started; leave the result for Conclude."""
    from mmp.tracking.client import make_tracker
    from mmp.pipeline.aws_stages import backend_for, started_from_dict, status_to_dict
    from mmp.backends.base import OutputTail
    from mmp.pipeline.runner import Pipeline

    started = started_from_dict(state["started"])
    platform = started.request.experiment.platform
    pipeline = Pipeline(tracker=make_tracker(started.request.mlflow_env["MLFLOW_TRACKING_URI"]))
    lines = OutputTail()  # bounded in lines and characters: the task has 512 MiB

    def sink(line: str) -> None:  # to the task's CloudWatch log and to the result Conclude reads
        lines.append(line)
        print(line, flush=True)

    try:
        backend = backend_for(platform)
    except Exception as exc:
        status, interrupted = JobStatus(JobState.FAILED, f"Platform: {exc}"), None
    else:
        status, interrupted = pipeline.execute(backend, started, sink)
    log_text = "\n".join(lines.lines())
    if interrupted is not None:
        status = JobStatus(JobState.CANCELLED, STOPPED_MESSAGE, status.exit_code, status.detail)
    result = {"kind": "train", "run_id": started.run_id, **status_to_dict(status)}
    runner_results.write("train", state, result, log_text)
    log.info("run %s: %s %s", started.run_id, status.state.value, status.message)
    if interrupted is not None:
        raise interrupted
    return result


def promote(state: dict[str, Any]) -> dict[str, Any]:
    """promote.json at the commit, as the local worker runs it; it reports on mmp/promotion itself."""
    from mmp.models.gitops import run_promotion
    from mmp.pipeline.aws_stages import host_of, job_of, trigger_of
    from mmp.pipeline.sns import SnsNotifier

    trigger = trigger_of(job_of(state))
    outcome = run_promotion(trigger, reporter=host_of(job_of(state)).reporter(), notifier=SnsNotifier())
    result = {"kind": "promotion", "state": outcome.state, "message": outcome.message,
              "problems": list(outcome.problems)}
    runner_results.write("promotion", state, result)
    log.info("promotion %s: %s", outcome.state, outcome.message)
    return result


def study_storage(state: dict[str, Any]) -> str:
    """The study's Optuna journal, beside its result object: a restarted task finds it from the state alone."""
    return f"s3://{runner_results.bucket()}/{runner_results.folder('study', state)}/journal"


def study(state: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the commit's study; trials use the image and code archive Prepare staged."""
    from mmp.tuning.study import StudyRunner
    from mmp.pipeline.aws_stages import host_of, job_of, make_pipeline, outcome_to_dict, trigger_of
    from mmp.pipeline.runner import Outcome

    pipeline = make_pipeline(host_of(job_of(state)))
    trigger = trigger_of(job_of(state))
    prepared = pipeline.prepare(trigger)  # read at the commit again: the state carries no experiment to trust
    if isinstance(prepared, Outcome):
        result = {"kind": "study", **outcome_to_dict(prepared)}
        runner_results.write("study", state, result)
        return result
    image = state.get("image") or {}
    if image:
        prepared.stage(image["tag"], image["code_uri"])
    poll = float(os.environ.get("MMP_STUDY_POLL_SECONDS") or STUDY_POLL_SECONDS)
    runner = StudyRunner(pipeline, trigger, prepared, poll_seconds=poll, storage=study_storage(state),
                         retried_on_error=True,
                         on_change=lambda progress: runner_results.write_progress("study", state, progress))
    try:
        outcome = runner.run()
    except SystemExit:  # stopped: the study cancelled its trials and ended its parent run on the way out
        parent = runner.parent
        result = {"kind": "study", "state": "CANCELLED", "message": STOPPED_MESSAGE, "problems": [],
                  "run_id": parent.run_id if parent else None, "run_url": parent.run_url if parent else None}
        runner_results.write("study", state, result)
        return result  # exit 0: a stopped study is over; a crash (non-zero) is what RunStudy retries
    result = {"kind": "study", **outcome_to_dict(outcome)}
    runner_results.write("study", state, result)
    log.info("study %s: %s %s", outcome.run_id, outcome.state, outcome.message)
    return result


RUNNERS = {"train": train, "promote": promote, "study": study}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in RUNNERS:
        print(f"usage: python -m mmp.pipeline.aws_runner {{{'|'.join(RUNNERS)}}}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = _stop_on_sigterm()
    try:
        state = read_state()
        RUNNERS[args[0]](state)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0  # the outcome is in the result object; a non-zero exit means the runner itself broke


if __name__ == "__main__":
    sys.exit(main())
