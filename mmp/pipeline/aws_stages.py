"""The Step Functions stages: the pipeline's own steps, one Lambda invocation each.

The state machine (mmp/infra/pipeline.py) runs

    Prepare → [Build image (CodeBuild .sync)] → Launch → (Wait → Poll)* → Conclude

and carries one JSON state between them: the webhook's job, the MLflow run made
by `Pipeline.start` (`started`), the backend's `JobHandle`, the last status and,
when a task failed, Step Functions' `error`. Each handler is `handler(event,
context)` and returns the whole new state. The steps are `Pipeline.prepare`,
`Pipeline.start`, `backend.launch/status/cancel/teardown/logs` and
`Pipeline.conclude`, so the AWS path and `mmp run` cannot drift apart.

Every path ends in Conclude: a failed build, launch or poll is caught (here, or by
the state machine's Catch) and Conclude cancels a job still running, tears it
down, ends the MLflow run, sets the GitHub commit status and publishes to SNS.

Light on purpose (Lambda): stdlib, boto3 (lazily), pydantic and mmp's light modules.
Environment: MLFLOW_TRACKING_URI (an http(s) tracking server: the REST tracker),
MLFLOW_TRACKING_USERNAME + MMP_MLFLOW_PASSWORD_SECRET_ARN, MMP_GITHUB_TOKEN_SECRET_ARN,
MMP_GITHUB_API_URL, MMP_NOTIFY_TOPIC_ARN, MMP_DATASETS, MMP_PIPELINE_PLATFORMS
(default "sagemaker,sagemaker-fsx") and the backends' own MMP_* variables.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

from ..backends import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, get_backend
from ..backends.base import MAX_RUNTIME_MESSAGE
from ..datasets import Dataset
from ..experiment import EXPERIMENT_FILES, Experiment
from ..image import ImageError
from ..webhook.core import PROMOTE_FILE
from .image_stage import ImagePlan, plan_image
from .reporting import PROMOTION_CONTEXT
from .runner import Outcome, Pipeline, Prepared, Started
from .sources import Trigger

log = logging.getLogger("mmp.pipeline.aws")
logging.getLogger().setLevel(logging.INFO)

DEFAULT_PLATFORMS = ("sagemaker", "sagemaker-fsx")
IMAGE_PLATFORMS = {"sagemaker", "sagemaker-fsx"}  # run the image CodeBuild makes from horovod_docker/
LOG_LINES_MAX = 100_000
LOG_PAGES_MAX = 200
PROMOTION_MESSAGE = ("promote.json is not run by the AWS pipeline (promotion needs the MLflow client, too heavy "
                     "for Lambda); run `mmp promote` against the stack's MLflow (docs/models.md)")
DLAMI_MESSAGE = ("Platform: dlami drives training over SSH for the whole job, longer than a Lambda may run; "
                 "this stack does not run it from a push. Start it with `mmp run` on a machine that can reach "
                 "the cluster (docs/infra.md, 'DLAMI'), or use sagemaker / sagemaker-fsx")

_BACKENDS: dict[str, Backend] = {}


# -- wiring ---------------------------------------------------------------------------
STUDY_MESSAGE = ("Tuning: hyperparameter studies run on the local stack and with `mmp run` for now; on AWS "
                 "they need the pipeline's runner task (not deployed yet)")


def pipeline_platforms() -> tuple[str, ...]:
    raw = os.environ.get("MMP_PIPELINE_PLATFORMS", "")
    return tuple(p.strip() for p in raw.split(",") if p.strip()) or DEFAULT_PLATFORMS


def backend_for(platform: str) -> Backend:
    """The backend for a platform this pipeline runs, one instance per warm Lambda."""
    allowed = pipeline_platforms()
    if platform not in allowed:
        if platform == "dlami":
            raise BackendError(DLAMI_MESSAGE.removeprefix("Platform: "))
        raise BackendError(f"{platform!r} is not run by this stack's pipeline; it runs: {', '.join(allowed)}")
    if platform not in _BACKENDS:
        _BACKENDS[platform] = get_backend(platform)
    return _BACKENDS[platform]


def make_pipeline() -> Pipeline:
    """The pipeline with AWS faces: REST MLflow, GitHub commit statuses, SNS."""
    from ..github import GitHubClient, GitHubStatusReporter
    from ..tracking import make_tracker
    from .sns import SnsNotifier

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise RuntimeError("MLFLOW_TRACKING_URI must be the stack's http(s) MLflow server in the Lambda")
    return Pipeline(tracker=make_tracker(uri), reporter=GitHubStatusReporter(GitHubClient.from_env()),
                    notifier=SnsNotifier(), backend_factory=backend_for)


def trigger_of(job: dict[str, Any]) -> Trigger:
    """The webhook's job (mmp.webhook.core.Job as a dict) as the pipeline's Trigger."""
    from ..github import GitHubClient, GitHubSource

    repository, commit = job["repository"], job["after"]
    return Trigger(repository=repository, clone_url=job.get("clone_url") or "", commit=commit,
                   source=GitHubSource(GitHubClient.from_env(), repository, commit),
                   delivery_id=job.get("delivery_id"), ref=job.get("ref"),
                   changed_files=tuple(job.get("trigger_files") or ()))


# -- (de)serialising what the steps hand over ------------------------------------------
def started_to_dict(started: Started) -> dict[str, Any]:
    r = started.request
    return {"run_id": started.run_id, "run_url": started.run_url, "request": {
        "experiment": r.experiment.to_file_dict(), "experiment_name": r.experiment_name, "run_id": r.run_id,
        "repository": r.repository, "clone_url": r.clone_url, "commit": r.commit, "mlflow_env": r.mlflow_env,
        "dataset": asdict(r.dataset), "delivery_id": r.delivery_id, "image_tag": r.image_tag,
        "code_uri": r.code_uri}}


def started_from_dict(raw: dict[str, Any]) -> Started:
    req = dict(raw["request"])
    request = LaunchRequest(**{**req, "experiment": Experiment.model_validate(req["experiment"]),
                               "dataset": Dataset(**req["dataset"])})
    return Started(run_id=raw["run_id"], run_url=raw["run_url"], request=request)


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    return {"state": outcome.state, "message": outcome.message, "run_id": outcome.run_id,
            "run_url": outcome.run_url, "problems": list(outcome.problems)}


def status_to_dict(status: JobStatus, **extra: Any) -> dict[str, Any]:
    return {"state": status.state.value, "terminal": status.state.terminal, "message": status.message,
            "exit_code": status.exit_code, "detail": status.detail, **extra}


def status_from_dict(raw: dict[str, Any]) -> JobStatus:
    return JobStatus(JobState(raw["state"]), raw.get("message") or "", raw.get("exit_code"),
                     dict(raw.get("detail") or {}))


# -- the stages ---------------------------------------------------------------------
def prepare(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Fetch + validate the experiment at the commit; if it may run, create the MLflow run."""
    job = dict(event.get("job") or event)
    state: dict[str, Any] = {"job": job, "accepted": False, "build_image": False}
    files = job.get("trigger_files") or []
    pipeline = make_pipeline()
    trigger = trigger_of(job)
    if PROMOTE_FILE in files:  # say so on the commit rather than leave the push unanswered
        pipeline.report_status(trigger, "error", PROMOTION_MESSAGE, None, context=PROMOTION_CONTEXT)
    if files and not any(name in EXPERIMENT_FILES for name in files):
        state["outcome"] = {"state": "SKIPPED", "message": f"no experiment file in this push ({', '.join(files)})"}
        return state
    try:
        prepared: Prepared | Outcome = pipeline.prepare(trigger)
    except Exception as exc:  # GitHub unreachable, bad token, ...: the same answer as Pipeline.run
        log.warning("could not read %s@%s: %s", trigger.repository, trigger.commit[:12], exc)
        prepared = pipeline.reject(trigger, [f"could not read the commit: {exc}"], state="ERROR")
    if not isinstance(prepared, Outcome) and prepared.experiment.tuning is not None:
        prepared = pipeline.reject(trigger, [STUDY_MESSAGE])  # a study is many jobs: not one Lambda-driven job
    if isinstance(prepared, Outcome):
        state["outcome"] = outcome_to_dict(prepared)
        return state
    image: ImagePlan | None = None
    if prepared.experiment.platform in IMAGE_PLATFORMS:
        try:
            image = plan_image_for(trigger)
        except Exception as exc:  # dependency files the build cannot use, or S3/ECR/GitHub refused
            bad_input = isinstance(exc, ImageError)
            state["outcome"] = outcome_to_dict(pipeline.reject(
                trigger, [str(exc) if bad_input else f"could not stage the code or image: {exc}"],
                state="INVALID" if bad_input else "ERROR"))
            return state
    try:
        started = pipeline.start(trigger, prepared)
    except Exception as exc:  # MLflow down: nothing launched, say so
        log.error("could not create the MLflow run: %s", exc)
        state["outcome"] = outcome_to_dict(
            pipeline.reject(trigger, [f"could not create the MLflow run: {exc}"], state="ERROR"))
        return state
    platform = prepared.experiment.platform
    if image is not None:
        started.request.image_tag, started.request.code_uri = image.tag, image.code_uri
        state["image"] = image.to_dict()
    state.update(accepted=True, platform=platform, build_image=bool(image and image.build),
                 started=started_to_dict(started))
    return state


def plan_image_for(trigger: Trigger) -> ImagePlan:
    """The commit's code archive in the artifacts bucket, and the image tag of its dependencies."""
    from ..github import GitHubClient

    return plan_image(read=trigger.source.read_file,
                      tarball=lambda: GitHubClient.from_env(timeout=60).tarball(trigger.repository, trigger.commit),
                      repository=trigger.repository, commit=trigger.commit,
                      bucket=os.environ["MMP_ARTIFACTS_BUCKET"], ecr_repository_uri=os.environ["MMP_ECR_REPOSITORY_URI"],
                      context=os.environ["MMP_IMAGE_CONTEXT_DIGEST"])


def launch(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Start the training job; a launch that fails becomes a terminal FAILED status."""
    state = dict(event)
    started = started_from_dict(state["started"])
    state.pop("error", None)
    try:
        backend = backend_for(state["platform"])
        handle = backend.launch(started.request)
    except Exception as exc:
        message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
        log.error("launch of run %s failed: %s", started.run_id, message)
        state["status"] = status_to_dict(JobStatus(JobState.FAILED, f"launch failed: {message}"))
        return state
    state["handle"] = handle.to_dict()
    state["deadline"] = time.time() + started.request.experiment.runtime_minutes * 60
    state["status"] = status_to_dict(JobStatus(JobState.PENDING, "launched"), timed_out=False)
    return state


def poll(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """The job's status now; past Max_Runtime, cancel it once (reported as a failure)."""
    state = dict(event)
    backend = backend_for(state["platform"])
    handle = JobHandle.from_dict(state["handle"])
    timed_out = bool((state.get("status") or {}).get("timed_out"))
    status = backend.status(handle)
    if not status.state.terminal and not timed_out and time.time() > float(state.get("deadline") or "inf"):
        log.warning("run %s passed Max_Runtime; cancelling", handle.job_id)
        backend.cancel(handle)
        timed_out = True
        status = backend.status(handle)
    if status.state.terminal and timed_out:
        status = JobStatus(JobState.FAILED, MAX_RUNTIME_MESSAGE, status.exit_code, status.detail)
    state["status"] = status_to_dict(status, timed_out=timed_out)
    state["polls"] = int(state.get("polls") or 0) + 1
    return state


def collect_logs(backend: Backend, handle: JobHandle) -> str:
    lines: list[str] = []
    cursor = None
    for _ in range(LOG_PAGES_MAX):
        page, cursor = backend.logs(handle, cursor)
        if not page:
            break
        lines.extend(page)
    return "\n".join(lines[-LOG_LINES_MAX:])


def _error_status(error: dict[str, Any] | None) -> JobStatus:
    error = error or {}
    cause = str(error.get("Cause") or "")[:1000]
    what = str(error.get("Error") or "error")
    return JobStatus(JobState.FAILED, f"{what}: {cause}" if cause else what)


def conclude(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Stop and tear down whatever runs, end the MLflow run, set the commit status, notify."""
    state = dict(event)
    if not state.get("started"):
        return state
    started = started_from_dict(state["started"])
    raw_status = state.get("status") or {}
    status = status_from_dict(raw_status) if raw_status.get("terminal") else _error_status(state.get("error"))
    if state.get("build") is None and state.get("error") and not state.get("handle") and state.get("build_image"):
        status = JobStatus(JobState.FAILED, f"image build failed: {status.message}")
    log_text = None
    if state.get("handle"):
        backend = backend_for(state["platform"])
        handle = JobHandle.from_dict(state["handle"])
        if not raw_status.get("terminal"):  # a poll or the state machine failed with the job still running
            try:
                backend.cancel(handle)
            except Exception as exc:
                log.error("cancel of %s failed: %s", handle.job_id, exc)
                status.message += f" (cancel failed: {exc})"
        try:
            log_text = collect_logs(backend, handle)
        except Exception as exc:
            log.warning("could not read the logs of %s: %s", handle.job_id, exc)
        try:
            backend.teardown(handle)
        except Exception as exc:  # surfaced in the outcome, never swallowed
            log.error("teardown of %s failed: %s", handle.job_id, exc)
            status.message += f" (teardown failed: {exc})"
    outcome = make_pipeline().conclude(trigger_of(state["job"]), started, status, log_text)
    state["outcome"] = outcome_to_dict(outcome)
    state["succeeded"] = outcome.ok
    return state
