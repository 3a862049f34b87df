"""The Step Functions stages: the pipeline's own steps, one Lambda invocation each.

The state machine (mmp/infra/pipeline.py) runs

    Prepare → [Promote: runner task] → [Build image] → Launch → Train (sagemaker .sync) → Conclude
                                     → RunTraining (runner task, dlami)               → Conclude
                                     → RunStudy (runner task, a Tuning block)         → Conclude

and carries one JSON state between them: the webhook's job, the MLflow run made
by `Pipeline.start` (`started`), the backend's `JobHandle` and CreateTrainingJob
request, and, when a task failed, Step Functions' `error`. Each handler is
`handler(event, context)` and returns the whole new state. The steps are
`Pipeline.prepare`, `Pipeline.start`, the backend's request/status/cancel/teardown/
logs and `Pipeline.conclude`, so the AWS path and `mmp run` cannot drift apart.

Nothing loops: SageMaker is waited on by Step Functions' own `.sync` integration and
the long stages (DLAMI over SSH, promotion with the MLflow client, a study's many
trials) run in the runner task (mmp.pipeline.aws_runner), so no history grows with
the job's length. A study makes its own MLflow runs there; Prepare only validates it
and stages its image.

Every path ends in Conclude: each Task's Catch routes there, and an execution that
fails anyway (timed out, aborted, Conclude itself failing) reaches Conclude through
the stack's EventBridge rule, which hands it the execution's status change;
Conclude then rebuilds the last state from the execution history. Conclude stops a
job still running, terminates every instance tagged with the run, ends the MLflow
run, sets the commit status on the job's git host (mmp.hosts) and publishes to SNS, once.

Light on purpose (Lambda): stdlib, boto3 (lazily), pydantic and mmp's light modules.
Environment: MLFLOW_TRACKING_URI (an http(s) tracking server: the REST tracker),
MLFLOW_TRACKING_USERNAME + MMP_MLFLOW_PASSWORD_SECRET_ARN, each host's settings (GitHub:
MMP_GITHUB_TOKEN_SECRET_ARN, MMP_GITHUB_API_URL; see mmp/hosts), MMP_NOTIFY_TOPIC_ARN, MMP_DATASETS, MMP_ARTIFACTS_BUCKET,
MMP_PIPELINE_PLATFORMS (default "sagemaker,sagemaker-fsx") and the backends' own MMP_* variables.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from mmp import aws
from mmp.backends import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, get_backend
from mmp.contract.datasets import Dataset
from mmp.contract.experiment import EXPERIMENT_FILES, Experiment
from mmp.contract.image import ImageError
from mmp.hosts.base import GitHost, get_host
from mmp.pipeline.job import PROMOTE_FILE
from mmp.pipeline import runner_results
from mmp.pipeline.image_stage import ImagePlan, plan_image
from mmp.pipeline.reporting import PROMOTION_CONTEXT
from mmp.pipeline.runner import Outcome, Pipeline, Prepared, Started
from mmp.pipeline.sources import Trigger

log = logging.getLogger("mmp.pipeline.aws")
logging.getLogger().setLevel(logging.INFO)

DEFAULT_PLATFORMS = ("sagemaker", "sagemaker-fsx")
IMAGE_PLATFORMS = {"sagemaker", "sagemaker-fsx", "dlami"}  # run the image CodeBuild makes from horovod_docker/
RUNNER_PLATFORMS = {"dlami"}  # trained by the runner task (SSH for the whole job outlives a Lambda)
PROVISIONING_GRACE_SECONDS = 3600  # past SageMaker's own bound: provisioning, then the Train state gives up
RUNNER_GRACE_SECONDS = 45 * 60  # past Max_Runtime: provisioning, SSH, requirements, copy-out, teardown
LOG_LINES_MAX = 100_000
LOG_PAGES_MAX = 200
STATUS_EVENT = "Step Functions Execution Status Change"

_BACKENDS: dict[str, Backend] = {}


# -- wiring ---------------------------------------------------------------------------
def pipeline_platforms() -> tuple[str, ...]:
    raw = os.environ.get("MMP_PIPELINE_PLATFORMS", "")
    return tuple(p.strip() for p in raw.split(",") if p.strip()) or DEFAULT_PLATFORMS


def backend_for(platform: str) -> Backend:
    """The backend for a platform this pipeline runs, one instance per warm Lambda."""
    allowed = pipeline_platforms()
    if platform not in allowed:
        raise BackendError(f"{platform!r} is not run by this stack's pipeline; it runs: {', '.join(allowed)}")
    if platform not in _BACKENDS:
        _BACKENDS[platform] = get_backend(platform)
    return _BACKENDS[platform]


def host_of(job: dict[str, Any]) -> GitHost:
    """The git host a job came from (job JSON without `host` is GitHub's)."""
    return get_host(job.get("host"))


def make_pipeline(host: GitHost | None = None) -> Pipeline:
    """The pipeline with AWS faces: REST MLflow, the host's commit statuses (GitHub's by default), SNS."""
    from mmp.tracking.client import make_tracker
    from mmp.pipeline.run_record import for_stack
    from mmp.pipeline.sns import SnsNotifier

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise RuntimeError("MLFLOW_TRACKING_URI must be the stack's http(s) MLflow server in the Lambda")
    return Pipeline(tracker=make_tracker(uri), reporter=(host or get_host()).reporter(),
                    notifier=SnsNotifier(), backend_factory=backend_for, record=for_stack())


def trigger_of(job: dict[str, Any]) -> Trigger:
    """The webhook's job (mmp.pipeline.job.Job as a dict) as the pipeline's Trigger."""
    host = host_of(job)
    repository, commit, clone_url = job["repository"], job["after"], job.get("clone_url") or ""
    return Trigger(repository=repository, clone_url=clone_url, commit=commit,
                   source=host.source(repository, clone_url, commit),
                   delivery_id=job.get("delivery_id"), ref=job.get("ref"),
                   changed_files=tuple(job.get("trigger_files") or ()), host=host.name)


# -- (de)serialising what the steps hand over ------------------------------------------
def started_to_dict(started: Started) -> dict[str, Any]:
    r = started.request
    return {"run_id": started.run_id, "run_url": started.run_url, "request": {
        "experiment": r.experiment.to_file_dict(), "experiment_name": r.experiment_name, "run_id": r.run_id,
        "repository": r.repository, "clone_url": r.clone_url, "commit": r.commit, "mlflow_env": r.mlflow_env,
        "dataset": asdict(r.dataset), "delivery_id": r.delivery_id, "image_tag": r.image_tag,
        "code_uri": r.code_uri, **({"host": r.host} if r.host != "github" else {})}}


def started_from_dict(raw: dict[str, Any]) -> Started:
    req = dict(raw["request"])
    request = LaunchRequest(**{**req, "experiment": Experiment.model_validate(req["experiment"]),
                               "dataset": Dataset(**req["dataset"])})
    return Started(run_id=raw["run_id"], run_url=raw["run_url"], request=request)


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    return {"state": outcome.state, "message": outcome.message, "run_id": outcome.run_id,
            "run_url": outcome.run_url, "problems": list(outcome.problems)}


def status_to_dict(status: JobStatus) -> dict[str, Any]:
    return {"state": status.state.value, "terminal": status.state.terminal, "message": status.message,
            "exit_code": status.exit_code, "detail": status.detail}


def status_from_dict(raw: dict[str, Any]) -> JobStatus:
    return JobStatus(JobState(raw["state"]), raw.get("message") or "", raw.get("exit_code"),
                     dict(raw.get("detail") or {}))


# -- the stages ---------------------------------------------------------------------
def job_of(state: dict[str, Any]) -> dict[str, Any]:
    """The webhook's job: the execution's input is the job itself; later states carry it as `job`."""
    return dict(state.get("job") or state)


def prepare(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Fetch + validate the experiment at the commit; if it may run, create the MLflow run.

    Every routing flag the state machine's Choices read is set on every path. When a runner
    task follows (training, a study, a promotion), its part of the state goes to S3 first and
    the task is handed only the key (runner_results.hand_off: ECS's 8,192-character overrides)."""
    state = _prepare(event)
    if state.get("runner") or state.get("promote"):
        state[runner_results.HANDOFF_KEY] = runner_results.hand_off(state)
    return state


def _prepare(event: dict[str, Any]) -> dict[str, Any]:
    job = job_of(event)
    files = job.get("trigger_files") or []
    state: dict[str, Any] = {"job": job, "accepted": False, "build_image": False, "runner": False,
                             "study": False, "promote": PROMOTE_FILE in files}
    pipeline = make_pipeline(host_of(job))
    trigger = trigger_of(job)
    if files and not any(name in EXPERIMENT_FILES for name in files):
        state["outcome"] = {"state": "SKIPPED", "message": f"no experiment file in this push ({', '.join(files)})"}
        return state
    prepared: Prepared | Outcome = pipeline.prepare_or_reject(trigger)
    if isinstance(prepared, Outcome):
        state["outcome"] = outcome_to_dict(prepared)
        return state
    image: ImagePlan | None = None
    if prepared.experiment.platform in IMAGE_PLATFORMS:
        try:
            image = plan_image_for(trigger)
        except Exception as exc:  # dependency files the build cannot use, or S3/ECR/the git host refused
            bad_input = isinstance(exc, ImageError)
            state["outcome"] = outcome_to_dict(pipeline.reject(
                trigger, [str(exc) if bad_input else f"could not stage the code or image: {exc}"],
                state="INVALID" if bad_input else "ERROR"))
            return state
    platform = prepared.experiment.platform
    if image is not None:
        state["image"] = image.to_dict()
        prepared.stage(image.tag, image.code_uri)
    if prepared.experiment.tuning is not None:  # many jobs: the runner task runs the study and makes its runs
        pipeline.report_status(trigger, "pending", f"study on {platform}: starting")
        state.update(accepted=True, platform=platform, build_image=bool(image and image.build), runner=True,
                     study=True, runner_timeout_seconds=runner_timeout_seconds(prepared.experiment))
        return state
    started = pipeline.start_or_reject(trigger, prepared)
    if isinstance(started, Outcome):  # claimed by another repository, or MLflow down: nothing launched
        state["outcome"] = outcome_to_dict(started)
        return state
    state.update(accepted=True, platform=platform, build_image=bool(image and image.build),
                 runner=platform in RUNNER_PLATFORMS, started=started_to_dict(started))
    if state["runner"]:  # the runner task's own bound; the backend cancels at Max_Runtime before it
        state["runner_timeout_seconds"] = runner_timeout_seconds(prepared.experiment)
    return state


def runner_timeout_seconds(experiment: Experiment) -> int:
    """The runner task's own bound (a study's too): its Max_Runtime, which the backend or the study
    enforces first, plus the grace for provisioning and teardown."""
    return experiment.runtime_minutes * 60 + RUNNER_GRACE_SECONDS


def plan_image_for(trigger: Trigger) -> ImagePlan:
    """The commit's code archive in the artifacts bucket, and the image tag of its dependencies."""
    host = get_host(trigger.host)
    return plan_image(read=trigger.source.read_file,
                      tarball=lambda: host.archive(trigger.repository, trigger.clone_url, trigger.commit),
                      repository=trigger.repository, commit=trigger.commit,
                      bucket=os.environ["MMP_ARTIFACTS_BUCKET"], ecr_repository_uri=os.environ["MMP_ECR_REPOSITORY_URI"],
                      context=os.environ["MMP_IMAGE_CONTEXT_DIGEST"])


def launch(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Build the CreateTrainingJob request the Train state's `.sync` integration sends.

    Step Functions creates the job and waits for it (no polling Lambda, no history
    growing with the job's length); SageMaker's StoppingCondition bounds the job and
    `train_timeout_seconds` (Max_Runtime plus the job's own grace) bounds the wait.
    A request that cannot be built becomes a terminal FAILED status."""
    state = dict(event)
    started = started_from_dict(state["started"])
    state.pop("error", None)
    try:
        backend = backend_for(state["platform"])
        build = getattr(backend, "training_job_request", None)
        if build is None:
            raise BackendError(f"{state['platform']!r} is not trained by the state machine's SageMaker step")
        problems = backend.check(started.request.experiment, started.request.dataset)
        if problems:
            raise BackendError("; ".join(problems))
        body = build(started.request)
    except Exception as exc:
        message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
        log.error("launch of run %s failed: %s", started.run_id, message)
        state["status"] = status_to_dict(JobStatus(JobState.FAILED, f"launch failed: {message}"))
        return state
    stopping = body["StoppingCondition"]
    name = body["TrainingJobName"]
    state["training_request"] = body
    # SageMaker bounds the job (MaxRuntime, MaxWait for spot); this is only the wait's backstop.
    state["train_timeout_seconds"] = stopping.get("MaxWaitTimeInSeconds", stopping["MaxRuntimeInSeconds"]) \
        + PROVISIONING_GRACE_SECONDS
    state["handle"] = JobHandle(platform=backend.name, job_id=name, data={
        "job_name": name, "region": aws.region(), "spot": body.get("EnableManagedSpotTraining", False),
        "launched": time.time()}).to_dict()
    state["status"] = status_to_dict(JobStatus(JobState.PENDING, "request built"))
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


def _error_status(error: dict[str, Any] | None, what_failed: str = "") -> JobStatus:
    error = error or {}
    cause = str(error.get("Cause") or "")[:1000]
    what = str(error.get("Error") or "error")
    text = f"{what}: {cause}" if cause else what
    return JobStatus(JobState.FAILED, f"{what_failed}{text}")


def _runner_status(state: dict[str, Any]) -> tuple[JobStatus, str | None]:
    """What the runner task left (runner_results), or why there is nothing."""
    try:
        result, log_text = runner_results.read("train", state)
    except Exception as exc:
        log.error("could not read the runner's result: %s", exc)
        result, log_text = None, None
    if result is None:
        return _error_status(state.get("error"), "the runner task ended without a result: "), None
    return status_from_dict({**result, "terminal": True}), log_text


def _sagemaker_status(backend: Backend, handle: JobHandle, state: dict[str, Any]) -> JobStatus:
    """The job's real state: after `.sync` it has ended; after a failed or timed-out wait it may still run."""
    try:
        status = backend.status(handle)
    except Exception as exc:
        log.warning("could not describe %s: %s", handle.job_id, exc)
        status = JobStatus(JobState.PENDING, f"could not describe the job: {exc}")
    if status.state.terminal:
        return status
    failed = _error_status(state.get("error"), "the wait for the job failed: ")
    try:
        backend.cancel(handle)
    except Exception as exc:
        log.error("cancel of %s failed: %s", handle.job_id, exc)
        failed.message += f" (cancel failed: {exc})"
    return failed


def _teardown(backend: Backend, handle: JobHandle, status: JobStatus) -> None:
    try:
        backend.teardown(handle)
    except Exception as exc:  # surfaced in the outcome, never swallowed
        log.error("teardown of %s failed: %s", handle.job_id, exc)
        status.message += f" (teardown failed: {exc})"


def conclude_training(pipeline: Pipeline, state: dict[str, Any]) -> Outcome:
    """Stop and tear down whatever runs, end the MLflow run, set the commit status, notify."""
    started = started_from_dict(state["started"])
    raw_status = state.get("status") or {}
    log_text = None
    if state.get("runner"):
        status, log_text = _runner_status(state)
        # Whatever the runner managed: no instance tagged with this run outlives Conclude.
        _teardown(backend_for(state["platform"]), JobHandle(platform=state["platform"], job_id=started.run_id),
                  status)
    elif state.get("handle"):
        backend = backend_for(state["platform"])
        handle = JobHandle.from_dict(state["handle"])
        status = status_from_dict(raw_status) if raw_status.get("terminal") else \
            _sagemaker_status(backend, handle, state)
        try:
            log_text = collect_logs(backend, handle)
        except Exception as exc:
            log.warning("could not read the logs of %s: %s", handle.job_id, exc)
        _teardown(backend, handle, status)
    elif raw_status.get("terminal"):
        status = status_from_dict(raw_status)
    elif state.get("build_image") and state.get("error"):
        status = _error_status(state.get("error"), "image build failed: ")
    else:
        status = _error_status(state.get("error"))
    return pipeline.conclude(trigger_of(state["job"]), started, status, log_text)


def conclude_promotion(pipeline: Pipeline, state: dict[str, Any]) -> dict[str, Any]:
    """The runner reported its promotion itself (status on mmp/promotion, e-mail); if it
    left no result it died first, and the commit hears that here."""
    try:
        result, _ = runner_results.read("promotion", state)
    except Exception as exc:
        log.error("could not read the promotion result: %s", exc)
        result = None
    if result is not None:
        return result
    reason = _error_status(state.get("promotion_error") or state.get("error")
                           or {"Error": "the runner task ended without a result"})
    message = f"promotion did not complete: {reason.message}"
    trigger = trigger_of(state["job"])
    pipeline.report_status(trigger, "error", message, None, context=PROMOTION_CONTEXT)
    record = {"kind": "promotion", "repository": trigger.repository, "commit": trigger.commit,
              "delivery_id": trigger.delivery_id, "state": "ERROR"}
    try:
        pipeline.notifier.notify(f"[mmp] {trigger.repository}@{trigger.commit[:7]}: promotion ERROR", message, record)
    except Exception as exc:
        log.warning("could not send notification: %s", exc)
    return {"kind": "promotion", "state": "ERROR", "message": message}


def conclude_study(pipeline: Pipeline, state: dict[str, Any]) -> dict[str, Any]:
    """The runner reported the study itself (progress and end on the commit, e-mail). If it died
    for good, stop and tear down the trials it left (progress.json), end their runs and the
    parent run, and say so; if it never started one, the commit hears why."""
    from mmp.tuning.trials import end_trial

    result = progress = None
    try:
        result, _ = runner_results.read("study", state)
    except Exception as exc:
        log.error("could not read the study's result: %s", exc)
    try:  # read on its own: a failed result read must not leave the trials running
        progress = None if result is not None else runner_results.read_progress("study", state)
    except Exception as exc:
        log.error("could not read the study's progress: %s", exc)
    if result is not None:
        return result
    before = "image build failed: " if state.get("build_image") and not progress else ""
    reason = _error_status(state.get("error") or {"Error": "the runner task ended without a result"}, before)
    message = f"study did not complete: {reason.message}"
    trigger = trigger_of(state["job"])
    if not progress:
        return outcome_to_dict(pipeline.reject(trigger, [message], state="ERROR"))
    for run_id, handle in (progress.get("trials") or {}).items():
        end_trial(run_id, handle, backend_for=backend_for, tracker=pipeline.tracker, message=message)
    return outcome_to_dict(pipeline.end_run(trigger, progress["parent_run_id"], progress.get("run_url"),
                                            JobStatus(JobState.FAILED, message), None))


def conclude(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """The last state on every path; also the target of the execution-failed EventBridge rule."""
    if event.get("detail-type") == STATUS_EVENT:
        recovered = state_from_execution(event["detail"])
        if recovered is None:
            return {"concluded": "already"}
        event = recovered
    state = dict(event)
    pipeline = make_pipeline(host_of(job_of(state)))
    ok = True
    if state.get("promote"):
        promotion = conclude_promotion(pipeline, state)
        state["promotion"] = promotion
        ok = promotion.get("state") in ("SUCCEEDED", "SKIPPED")
    if state.get("study"):
        state["outcome"] = conclude_study(pipeline, state)
        ok = ok and state["outcome"].get("state") == "SUCCEEDED"
    elif state.get("started"):
        outcome = conclude_training(pipeline, state)
        state["outcome"] = outcome_to_dict(outcome)
        ok = ok and outcome.ok
    elif state.get("error") and "outcome" not in state:  # failed before a run existed (Prepare itself)
        reason = _error_status(state["error"])
        state["outcome"] = outcome_to_dict(pipeline.reject(trigger_of(job_of(state)), [reason.message],
                                                           state="ERROR"))
        ok = False
    elif (state.get("outcome") or {}).get("state") in ("INVALID", "ERROR"):
        ok = False  # already reported by Prepare
    state["succeeded"] = ok
    return state


def state_from_execution(detail: dict[str, Any]) -> dict[str, Any] | None:
    """The last state of a failed, timed-out or aborted execution, with the reason as `error`;
    None when Conclude already ran to its end (e.g. the run failed and Fail ended it)."""
    sfn = aws.client("stepfunctions")
    latest: dict[str, Any] | None = None
    pages = sfn.get_paginator("get_execution_history").paginate(
        executionArn=detail["executionArn"], reverseOrder=True, includeExecutionData=True)
    for page in pages:
        for item in page["events"]:
            exited = item.get("stateExitedEventDetails") or {}
            if exited.get("name") == "Conclude":
                return None
            entered = item.get("stateEnteredEventDetails") or {}
            if latest is None and entered.get("input"):
                candidate = json.loads(entered["input"])
                if isinstance(candidate, dict) and ("job" in candidate or "after" in candidate):
                    latest = candidate
    if latest is None:
        latest = json.loads(detail.get("input") or "{}")
    state = dict(latest)
    if "job" not in state:
        state = {"job": state}
    status = str(detail.get("status") or "FAILED")
    cause = detail.get("cause") or detail.get("error") or f"the execution ended {status}"
    state["error"] = {"Error": f"Execution.{status}", "Cause": str(cause)}
    if state.get("promote") and "promotion_error" not in state:
        state["promotion_error"] = state["error"]
    return state
