"""The pipeline: fetch → validate → create the MLflow run → launch → wait → finish → notify.

The same code runs for `mmp run`, the local worker and the AWS stages. Nothing is
launched and nothing is written to MLflow until the experiment file, train.py and
the backend's own preflight checks all pass.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mmp.contract.argv import mlflow_env
from mmp.backends import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, available_platforms, get_backend
from mmp.backends.base import OutputTail
from mmp.contract.datasets import load_catalogue
from mmp.contract.experiment import EXPERIMENT_FILES, Experiment, ExperimentError, FieldProblem, parse_experiment
from mmp.tracking.ownership import REPOSITORY_TAG, SOURCE_TAG, OwnershipError
from mmp.tracking.base import FINAL_STATUS
from mmp.pipeline.reporting import TRAINING_CONTEXT, LocalNotifier, LocalStatusReporter, Notifier, StatusReporter, short_description
from mmp.pipeline.sources import Trigger, train_script_problem

HOST_TAG = "mmp.host"  # the git host the commit came from: github, gitlab, codecommit, local
DELIVERY_TAG = "mmp.delivery_id"  # on every run a delivery creates: the worker's recovery finds them by it

log = logging.getLogger("mmp.pipeline")


@dataclass
class Outcome:
    state: str  # INVALID, SUCCEEDED, FAILED, CANCELLED, ERROR
    message: str
    run_id: str | None = None
    run_url: str | None = None
    experiment: Experiment | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"


@dataclass
class Prepared:
    """A validated experiment, the backend that will run it and its dataset entry."""

    experiment: Experiment
    backend: Backend
    dataset: Any
    # The dependency set's training image and the commit's code archive, where Prepare staged them
    # (mmp.pipeline.image_stage): every launch of this commit, a study's trials included, runs them.
    image_tag: str | None = None
    code_uri: str | None = None

    def stage(self, image_tag: str, code_uri: str) -> None:
        self.image_tag, self.code_uri = image_tag, code_uri


@dataclass
class Started:
    """The MLflow run made for a launch, and the request the backend gets."""

    run_id: str
    run_url: str
    request: LaunchRequest


def crash_point(name: str) -> None:
    """Fault injection for the recovery tests: `MMP_CRASH_AT=<name>` SIGKILLs this process here,
    `MMP_INTERRUPT_AT=<name>` sends it a Ctrl-C (SIGINT) here."""
    if os.environ.get("MMP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MMP_INTERRUPT_AT") == name:
        os.kill(os.getpid(), signal.SIGINT)


class MissingExperimentFile(ExperimentError):
    """Neither experiment file exists at the commit."""


def read_experiment(trigger: Trigger) -> tuple[Experiment, str]:
    """The experiment file at the commit, validated against the catalogue and platforms."""
    for name in EXPERIMENT_FILES:
        raw = trigger.source.read_file(name)
        if raw is not None:
            experiment = parse_experiment(
                raw, datasets=load_catalogue().keys(), platforms=available_platforms(), source=name
            )
            return experiment, name
    raise MissingExperimentFile(
        [FieldProblem(field="(file)", message=f"no {' or '.join(EXPERIMENT_FILES)} at the repository root")]
    )


class Pipeline:
    # A study this pipeline runs, stopped by Ctrl-C or SIGTERM, is left for the next run to resume
    # (the local worker sets it: its queue brings the study back); otherwise it ends as cancelled.
    resume_studies = False

    def __init__(
        self,
        *,
        tracker: Any = None,
        store: Any = None,
        reporter: StatusReporter | None = None,
        notifier: Notifier | None = None,
        backend_factory: Callable[[str], Backend] = get_backend,
        on_log: Callable[[str], None] | None = None,
        on_launch: Callable[[str, JobHandle | None], None] | None = None,  # None: a study's parent run
        record: Any = None,
    ):
        """`record`: where the pipeline notes each run it creates (mmp.pipeline.run_record), beyond `store`."""
        if tracker is None:
            from mmp.tracking.client import make_tracker

            tracker = make_tracker()
        self.tracker = tracker
        self.store = store
        self.reporter = reporter or LocalStatusReporter()
        self.notifier = notifier or LocalNotifier()
        self.backend_factory = backend_factory
        self.on_log = on_log
        self.on_launch = on_launch
        self.record = record

    # -- reporting helpers ---------------------------------------------------
    def report_status(self, trigger: Trigger, state: str, description: str, url: str | None = None,
                      context: str = TRAINING_CONTEXT) -> None:
        """Set a commit status; one that cannot be set is logged and never stops the pipeline."""
        try:
            self.reporter.report(trigger.repository, trigger.commit, state, short_description(description), url,
                                 context=context)
        except Exception as exc:  # a status we cannot set must not stop training
            log.warning("could not set commit status %s: %s", state, exc)

    def _notify(self, trigger: Trigger, outcome: Outcome) -> None:
        subject = f"[mmp] {trigger.repository}@{trigger.commit[:7]}: {outcome.state}"
        record = {"repository": trigger.repository, "commit": trigger.commit, "delivery_id": trigger.delivery_id,
                  "state": outcome.state, "run_id": outcome.run_id, "run_url": outcome.run_url,
                  "problems": outcome.problems}
        try:
            self.notifier.notify(subject, outcome.message, record)
        except Exception as exc:
            log.warning("could not send notification: %s", exc)

    def reject(self, trigger: Trigger, problems: list[str], state: str = "INVALID") -> Outcome:
        """Stop before launch: failure (invalid input) or error status, and a notification."""
        message = "; ".join(problems)
        outcome = Outcome(state=state, message=message, problems=problems)
        self.report_status(trigger, "failure" if state == "INVALID" else "error", message)
        self._notify(trigger, outcome)
        return outcome

    # -- the flow, as steps the AWS state machine can also call one by one ------
    def prepare(self, trigger: Trigger) -> Prepared | Outcome:
        """Fetch and validate; an Outcome means stop here (nothing launched or written)."""
        try:
            experiment, _ = read_experiment(trigger)
        except ExperimentError as exc:
            listed = [name for name in EXPERIMENT_FILES if name in trigger.changed_files]
            if listed and isinstance(exc, MissingExperimentFile):
                # the push said it changed the file, yet the source says it is not there
                return self.reject(trigger, [f"{listed[0]}: listed in the push but not found at "
                                              f"{trigger.commit[:12]} (404 from the source)"], state="ERROR")
            return self.reject(trigger, [str(p) for p in exc.problems])
        script_problem = train_script_problem(trigger.source)
        if script_problem:
            return self.reject(trigger, [script_problem])
        dataset = load_catalogue()[experiment.dataset_name]
        try:
            backend = self.backend_factory(experiment.platform)
        except BackendError as exc:
            return self.reject(trigger, [f"Platform: {exc}"])
        problems = backend.check(experiment, dataset)
        if problems:
            return self.reject(trigger, problems)
        try:
            problem = self.tracker.ownership_problem(experiment.resolved_name(trigger.repository), trigger.identity)
        except OwnershipError as exc:  # the sharing setting itself is bad
            return self.reject(trigger, [str(exc)], state="ERROR")
        except Exception as exc:
            return self.reject(trigger, [f"could not check the experiment's owner in MLflow: {exc}"], state="ERROR")
        if problem:
            return self.reject(trigger, [f"Experiment_Name: {problem}"])
        return Prepared(experiment=experiment, backend=backend, dataset=dataset)

    def start(self, trigger: Trigger, prepared: Prepared) -> Started:
        """Create the MLflow run (tags, params), record it, and set the pending status."""
        experiment = prepared.experiment
        name = experiment.resolved_name(trigger.repository)
        tags = {
            "mlflow.source.git.commit": trigger.commit,
            SOURCE_TAG: trigger.repository,
            REPOSITORY_TAG: trigger.identity,
            "mlflow.source.type": "PROJECT",
            HOST_TAG: trigger.host,
            "mmp.platform": experiment.platform,
            "mmp.instance_type": experiment.training_instance,
            "mmp.instance_count": str(experiment.instance_count),
            "mmp.dataset": experiment.dataset_name,
            **experiment.process_tags(),
        }
        if trigger.delivery_id:
            tags[DELIVERY_TAG] = trigger.delivery_id
        if trigger.ref:
            tags["mmp.ref"] = trigger.ref
        run_id = self.tracker.start(
            name, run_name=f"{name}-{trigger.commit[:7]}", tags=tags, params=experiment.hyperparameters,
            owner=trigger.identity,
        )
        crash_point("after-create-run")
        try:
            run_url = self.tracker.run_url(run_id)
            if self.store is not None:
                self.store.add(run_id=run_id, experiment=name, repository=trigger.repository,
                               commit_sha=trigger.commit, platform=experiment.platform,
                               delivery_id=trigger.delivery_id, run_url=run_url)
            if self.record is not None:  # promotion trusts only recorded runs (mmp.pipeline.run_record)
                self.record.add(run_id, experiment=name, repository=trigger.identity)
        except Exception as exc:  # a run nobody records would stay RUNNING: end it now (recovery retries)
            try:
                self.tracker.finish(run_id, JobState.FAILED, message=f"could not record the run: {exc}")
            except Exception as finish_exc:
                log.warning("could not end MLflow run %s: %s", run_id, finish_exc)
            raise
        request = self.launch_request(trigger, prepared, name, run_id)
        self.report_status(trigger, "pending", f"training on {experiment.platform}", run_url)
        return Started(run_id=run_id, run_url=run_url, request=request)

    def launch_request(self, trigger: Trigger, prepared: Prepared, experiment_name: str, run_id: str) -> LaunchRequest:
        """What the backend gets to run `prepared` as the MLflow run `run_id`."""
        return LaunchRequest(
            experiment=prepared.experiment, experiment_name=experiment_name, run_id=run_id,
            repository=trigger.repository, clone_url=trigger.clone_url, commit=trigger.commit,
            mlflow_env=mlflow_env(self.tracker.tracking_uri, experiment_name, run_id), dataset=prepared.dataset,
            delivery_id=trigger.delivery_id, image_tag=prepared.image_tag, code_uri=prepared.code_uri,
            host=trigger.host,
        )

    def conclude(self, trigger: Trigger, started: Started, status: JobStatus, log_text: str | None) -> Outcome:
        """End the MLflow run from the backend's outcome, then report and notify."""
        return self.end_run(trigger, started.run_id, started.run_url, status, log_text,
                            experiment=started.request.experiment)

    def end_run(self, trigger: Trigger, run_id: str, run_url: str | None, status: JobStatus, log_text: str | None,
                *, experiment: Experiment | None = None) -> Outcome:
        """`conclude` for a run known only by id (a study's parent run, ended by Conclude on AWS)."""
        metrics = status.detail.get("metrics") if status.detail else None
        if metrics:
            try:
                self.tracker.log_metrics(run_id, metrics)
            except Exception as exc:
                log.warning("could not log platform metrics for %s: %s", run_id, exc)
        tracking_problem = None
        try:
            final = self.tracker.finish(run_id, status.state, message=status.message, log_text=log_text)
        except Exception as exc:  # the store is down or read-only: report anyway, the worker ends the run later
            log.error("could not end MLflow run %s: %s", run_id, exc)
            final = FINAL_STATUS.get(status.state, "FAILED")
            tracking_problem = f"MLflow not updated ({type(exc).__name__}: {exc}); ended later by the worker"
        state = {"FINISHED": "SUCCEEDED", "KILLED": "CANCELLED"}.get(final, "FAILED")
        if self.store is not None:
            try:
                self.store.update(run_id, state=state, message=status.message)
            except Exception as exc:
                log.error("could not record the end of run %s: %s", run_id, exc)
        outcome = Outcome(state=state, message=status.message, run_id=run_id, run_url=run_url, experiment=experiment,
                          problems=[tracking_problem] if tracking_problem else [])
        status_state = {"SUCCEEDED": "success", "CANCELLED": "error"}.get(state, "failure")
        self.report_status(trigger, status_state, f"{state.lower()}: {status.message}", run_url)
        self._notify(trigger, outcome)
        return outcome

    def prepare_or_reject(self, trigger: Trigger) -> Prepared | Outcome:
        """`prepare`, with a source that could not be read (GitHub down, bad token) as an error outcome."""
        try:
            return self.prepare(trigger)
        except Exception as exc:
            log.warning("could not read %s@%s: %s", trigger.repository, trigger.commit[:12], exc)
            return self.reject(trigger, [f"could not read the commit: {exc}"], state="ERROR")

    def start_or_reject(self, trigger: Trigger, prepared: Prepared) -> Started | Outcome:
        """`start`, with a refusal as an outcome: the experiment claimed by another repository since
        `prepare` is invalid input (as `prepare` says it); MLflow or the run record refusing is an error."""
        try:
            return self.start(trigger, prepared)
        except OwnershipError as exc:
            return self.reject(trigger, [f"Experiment_Name: {exc}"])
        except Exception as exc:  # nothing launched
            log.exception("could not start a run for %s@%s", trigger.repository, trigger.commit[:12])
            return self.reject(trigger, [f"could not start the MLflow run: {type(exc).__name__}: {exc}"],
                               state="ERROR")

    def run(self, trigger: Trigger) -> Outcome:
        """One training run, the whole flow in this process. A commit whose experiment has a Tuning
        block is many runs: `mmp.tuning.dispatch.run_commit` routes it to the study instead."""
        prepared = self.prepare_or_reject(trigger)
        if isinstance(prepared, Outcome):
            return prepared
        return self.run_prepared(trigger, prepared)

    def run_prepared(self, trigger: Trigger, prepared: Prepared) -> Outcome:
        """Start, execute and conclude one run of a prepared experiment."""
        started = self.start_or_reject(trigger, prepared)
        if isinstance(started, Outcome):
            return started
        lines = OutputTail()  # bounded in lines and characters, however long the run talks

        def sink(line: str) -> None:
            lines.append(line)
            if self.on_log:
                self.on_log(line)

        status, interrupted = self.execute(prepared.backend, started, sink)
        outcome = self.conclude(trigger, started, status, "\n".join(lines.lines()))
        if interrupted is not None:
            raise interrupted
        return outcome

    def execute(self, backend: Backend, started: Started, sink: Callable[[str], None],
                deadline: float | None = None) -> tuple[JobStatus, BaseException | None]:
        """Launch, follow to the end (Max_Runtime or `deadline`, whichever comes first), always tear down.

        Returns the final status, and the Ctrl-C/SystemExit that interrupted it (for the caller to
        re-raise once the run is concluded)."""
        handle: JobHandle | None = None
        status = JobStatus(JobState.FAILED, "did not start")
        interrupted: BaseException | None = None
        try:
            handle = backend.launch(started.request)
            if self.store is not None:
                self.store.update(started.run_id, state="RUNNING", handle=handle.to_dict())
            if self.on_launch:
                self.on_launch(started.run_id, handle)
            limit = time.time() + started.request.experiment.runtime_minutes * 60
            status = backend.wait(handle, on_log=sink, deadline=limit if deadline is None else min(limit, deadline))
        except (KeyboardInterrupt, SystemExit) as exc:
            interrupted = exc
            if handle is not None:
                backend.cancel(handle)
            status = JobStatus(JobState.CANCELLED, "interrupted")
        except BackendError as exc:
            status = JobStatus(JobState.FAILED, str(exc))
        except Exception as exc:
            log.exception("run %s failed in the backend", started.run_id)
            status = JobStatus(JobState.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            if handle is not None:
                try:
                    backend.teardown(handle)
                except Exception as exc:  # surfaced, never swallowed silently
                    log.error("teardown of %s failed: %s", handle.job_id, exc)
                    status.message += f" (teardown failed: {exc})"
        return status, interrupted
