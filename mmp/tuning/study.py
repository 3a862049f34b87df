"""Run a study: Optuna asks for hyperparameters, each trial is an ordinary MMP run, Optuna is told how it did.

Why ask/tell and not `study.optimize`: a trial is a backend job (minutes to hours,
maybe on another machine). This loop launches up to `Parallel` of them through the
same `Pipeline.execute` a single run uses, follows each in a thread, feeds the
objective's intermediate values from MLflow to the pruner, stops pruned trials with
the backend's `cancel`, and tells Optuna each final value. So every platform,
plugins included, can be tuned without backend code.

Optuna's state lives in SQLite (`$MMP_HOME/studies.db`) on the local stack and in
the artifacts bucket (mmp.tuning.s3_journal) in the runner task on AWS, so a restarted
worker or runner resumes the same study: a trial that was running when the worker died is failed
(processes torn down, MLflow run ended) and replaced by a new trial with the same
hyperparameters; it is never continued and never counted twice. The local worker resumes a
study it was stopped in (SIGTERM, Ctrl-C) the same way. Each step writes Optuna before MLflow
and the study's end before its state, so a `kill -9` anywhere (`MMP_CRASH_AT` names the points
the tests use) leaves what resuming repairs: an open MLflow run is ended as Optuna recorded it.
Any other error ends the study as failed, with a final parent run, commit status and notice.

In MLflow the study is one parent run (strategy, ranges, best trial, value and
parameters) with each trial a child run (`mlflow.parentRunId`), tagged with its
number and state.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from mmp import config
from mmp.backends import JobHandle, JobState, JobStatus
from mmp.system.filelock import exclusive
from mmp.system.interrupts import HeldSignals
from mmp.tracking.store import sqlite_path
from mmp.backends.base import OutputTail
from mmp.pipeline.runner import DELIVERY_TAG, Outcome, Pipeline, Prepared, Started, crash_point
from mmp.pipeline.sources import Trigger
from mmp.tuning import control
from mmp.tuning.space import ask, distributions
from mmp.tuning.intermediate import DRAIN_PAGES, IntermediateValues, checkpoints
from mmp.tuning.pace import StepPace
from mmp.contract.tuning import Tuning
from mmp.tuning.tags import (TAG_PARENT, TAG_STUDY, TAG_TRIAL, TAG_TRIAL_BEST_BEFORE, TAG_TRIAL_DIRECTION,
                             TAG_TRIAL_JUDGED, TAG_TRIAL_OBJECTIVE, TAG_TRIAL_PRUNING, TAG_TRIAL_STATE)
from mmp.tuning.trials import end_trial, release_warm

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger("mmp.tuning")

STUDIES_DB = "studies.db"
PRUNER_STARTUP_TRIALS = 2  # the median needs a few finished trials before it may prune
POLL_SECONDS = 1.0
INTERRUPT_SECONDS = 0.5  # how soon a held Ctrl-C or SIGTERM ends the loop's wait for a trial
# With Early_Stopping a train.py may wait at each step for the pruner's verdict (TAG_TRIAL_JUDGED): the loop
# ticks faster, and reads a trial each tick until its steps show a pace (mmp.tuning.pace), then when they are due.
PRUNING_POLL_SECONDS = 0.1
INTERRUPTED_TRIAL = "interrupted: the worker stopped while this trial ran; replaced by a new trial"
ATTR_PARENT = "mmp.parent_run_id"
ATTR_STARTED = "mmp.started_at"
ATTR_INTERRUPTED = "mmp.interrupted_trials"
ATTR_RUN = "mmp.run_id"
ATTR_HANDLE = "mmp.handle"  # the trial's backend job, so a restart can tear it down without the local job store
ATTR_TOTAL = "mmp.total_runs"  # the study's budget, for `mmp run` to say how far a resumable study got
ATTR_ELAPSED = "mmp.elapsed_s"  # running time before the last stop: Max_Runtime counts running time only
ATTR_REPLACES = "mmp.replaces"  # on a trial enqueued for an interrupted one: a second recovery never enqueues twice
ATTR_SEES = "mmp.pruner_sees_below"  # seeded study: the pruner compares this trial with complete trials numbered below
SUSPENDED = "interrupted: the worker stopped; the study resumes when a worker starts again"
# A trial Optuna has recorded whose MLflow run a crash left open is ended as Optuna says it ended.
ENDED_AS = {"COMPLETE": (JobState.SUCCEEDED, "complete"), "PRUNED": (JobState.CANCELLED, "pruned"),
            "FAIL": (JobState.FAILED, "failed")}


def storage_url() -> str:
    return f"sqlite:///{config.mmp_home() / STUDIES_DB}"


def make_storage(url: str | None = None) -> Any:
    """Optuna storage for a URL: SQLAlchemy URLs as they are, `s3://bucket/prefix` as an S3 journal.

    A SQLite file is opened under `<file>.lock`: Optuna creates its tables on open, and two studies
    opening a new studies.db at once raced there (one died before it had set any commit status)."""
    url = url or storage_url()
    if url.startswith("s3://"):
        from mmp.tuning.s3_journal import s3_storage

        return s3_storage(url)
    path = sqlite_path(url)
    if path is None:
        return url
    import optuna

    with exclusive(f"{path}.lock"):
        return optuna.storages.RDBStorage(url)


def study_name(trigger: Trigger) -> str:
    return f"mmp-{trigger.delivery_id or trigger.commit}"


def make_sampler(tuning: Tuning, seed: int | None = None):
    """TPE for bayesian; random otherwise (a grid study enqueues every point, so its sampler never picks).
    `seed`: this draw's seed (trial_seed), else Tuning.Seed. constant_liar (Optuna's default since 4.x, named
    here on purpose): TPE counts running trials as bad, so trials drawn while others run spread out."""
    import optuna

    seed = tuning.seed if seed is None else seed
    if tuning.strategy == "bayesian":
        startup = max(2, min(10, tuning.total_runs // 4))  # TPE models once a quarter of the budget is random
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_seed(seed: int, index: int) -> int:
    """The sampler's seed for a study's `index`-th trial: a function of Tuning.Seed and the trial alone.
    A sampler seeded once draws from one generator, so a study resumed in a new process (a fresh sampler)
    would draw trial 0's values again; seeded per trial, trial n draws the same values in any process."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_pruner(tuning: Tuning):
    import optuna

    if not tuning.early_stopping:
        return optuna.pruners.NopPruner()
    return seen_pruner(optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0))


class _StudyBelow:
    """A study as a trial's pruner sees it: only trials numbered below `cutoff` (Optuna's pruners read the
    study through get_trials and direction; everything else is the study's own)."""

    def __init__(self, study: Any, cutoff: int):
        self._study, self._cutoff = study, cutoff

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.number < self._cutoff]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def seen_pruner(inner: Any) -> Any:
    """`inner` (an Optuna pruner) judging each trial against the trials it was started after.

    In a seeded study a trial's user attribute ATTR_SEES names the first trial it may not see: trials
    numbered below it had all been told when it started, later ones run beside it and end at moments
    that depend on timing. Left to see them, the median at a step would differ from one run to the next."""
    from optuna.pruners import BasePruner

    class SeenPruner(BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            cutoff = trial.user_attrs.get(ATTR_SEES)
            return inner.prune(study if cutoff is None else _StudyBelow(study, int(cutoff)), trial)

    return SeenPruner()


def open_study(name: str, tuning: Tuning, storage: str | None = None) -> "optuna.Study":
    """Create the study, or load it after a restart; a grid's points are enqueued once, in order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=make_storage(storage), load_if_exists=True,
                                direction=tuning.direction, sampler=make_sampler(tuning), pruner=make_pruner(tuning))
    if tuning.strategy == "grid":
        for params in tuning.grid():
            study.enqueue_trial(params, skip_if_exists=True)
    return study


class SamplingError(RuntimeError):
    """Optuna could not draw a trial from the ranges (one too wide for a float, say)."""


@dataclasses.dataclass
class TrialRun:
    """One trial in flight: its Optuna trial, MLflow run, log and outcome."""

    trial: Any  # optuna.Trial
    started: Started
    lines: OutputTail
    status: JobStatus | None = None
    intermediate: IntermediateValues | None = None  # its objective's history, read a page per tick
    reported_step: int | None = None
    reported_value: float | None = None
    judged_step: int | None = None  # every logged step up to this one was judged (TAG_TRIAL_JUDGED)
    told_judged: str | None = None  # the TAG_TRIAL_JUDGED value last written on its run
    pruned: str | None = None  # why, once the pruner said stop
    cancelled: bool = False
    waits: bool = False  # train.py was told to wait for the verdict at each step (TAG_TRIAL_PRUNING)
    pace: StepPace = dataclasses.field(default_factory=lambda: StepPace(PRUNING_POLL_SECONDS))  # its steps' pace
    next_read: float = 0.0  # monotonic time of its next MLflow read
    thread: threading.Thread | None = None  # the thread that follows its job (`_follow`)


class _Quiet:
    """Trials report nothing to the commit or by e-mail: the study reports progress instead."""

    def report(self, *args: Any, **kwargs: Any) -> None:
        pass

    def notify(self, *args: Any, **kwargs: Any) -> None:
        pass


class StudyRunner:
    def __init__(self, pipeline: Pipeline, trigger: Trigger, prepared: Prepared, *, poll_seconds: float | None = None,
                 storage: str | None = None,
                 on_change: Callable[[dict[str, Any]], None] | None = None, resume_on_stop: bool = False,
                 retried_on_error: bool = False):
        """Every trial runs the image and code archive staged on `prepared`; `on_change`: told the
        parent run and every trial's job as they appear, so whoever outlives this process (Conclude
        on AWS) can stop them; `resume_on_stop`:
        a Ctrl-C or SIGTERM stops the trials' jobs but leaves the study to be resumed (the local
        worker, whose queue brings it back) instead of ending it as cancelled; `retried_on_error`: an
        error crashes this process, whose caller starts it again to resume the study and ends it after
        its last try (RunStudy and Conclude on AWS); otherwise an error ends the study as failed.

        With a Seed, trials are told to Optuna in trial order and trial n starts once every trial before
        n - Parallel + 1 has been told (`ordered`): the sampler and the pruner see the same history whatever
        the timing (README, Hyperparameter search: what a Seed repeats)."""
        assert prepared.experiment.tuning is not None
        self.pipeline = pipeline
        self.trigger = trigger
        self.prepared = prepared
        self.tuning: Tuning = prepared.experiment.tuning
        self.backend = prepared.backend
        self.tracker = pipeline.tracker
        if poll_seconds is None:
            poll_seconds = PRUNING_POLL_SECONDS if self.tuning.early_stopping else POLL_SECONDS
        self.poll_seconds = poll_seconds
        self.ordered = self.tuning.seed is not None
        self.arrived: dict[int, TrialRun] = {}  # ordered: trials whose job ended, told once those before are
        self.storage = storage
        self.on_change = on_change
        self.resume_on_stop = resume_on_stop
        self.retried_on_error = retried_on_error
        self._recorded: dict[str, dict] = {}  # trial run → its handle, once in the study's storage
        self.key = trigger.delivery_id or trigger.commit
        self.name = study_name(trigger)
        self.handles: dict[str, JobHandle] = {}
        self.running: dict[int, TrialRun] = {}
        self._finished_counts: collections.Counter | None = None  # _counts, until the next tell
        self._first_step_s: float | None = None  # the quickest start-up to a first step seen (mmp.tuning.pace)
        self.finished: queue.Queue[TrialRun] = queue.Queue()
        self.trials = Pipeline(tracker=pipeline.tracker, store=pipeline.store, reporter=_Quiet(), notifier=_Quiet(),
                               backend_factory=pipeline.backend_factory, on_launch=self._on_launch,
                               record=pipeline.record)
        self.deadline = 0.0
        self.since = time.time()  # when the study's running time began, as Max_Runtime counts it
        self.parent: Started | None = None

    def final_value(self, run_id: str) -> float | None:
        """The objective's value at its last step (MLflow's latest metric: one row, however many were logged)."""
        return self.tracker.latest_metric(run_id, self.tuning.objective_metric)

    # -- the study's parent run ------------------------------------------------------
    def _open_parent(self, study) -> Started:
        """The parent run: made with the study, found again after a restart."""
        run_id = study.user_attrs.get(ATTR_PARENT)
        if run_id:
            name = self.prepared.experiment.resolved_name(self.trigger.repository)
            request = self.pipeline.launch_request(self.trigger, self.prepared, name, run_id)
            return Started(run_id=run_id, run_url=self.tracker.run_url(run_id), request=request)
        if ATTR_STARTED not in study.user_attrs:
            study.set_user_attr(ATTR_STARTED, time.time())  # Max_Runtime counts from the first start
            study.set_user_attr(ATTR_TOTAL, self.tuning.total_runs)
        started = self.parent = self.pipeline.start(self.trigger, self.prepared)
        name = started.request.experiment_name
        self.tracker.set_tags(started.run_id, {
            TAG_STUDY: "true", "mlflow.runName": f"{name}-{self.trigger.commit[:7]}-study",
            "mmp.tuning.objective": self.tuning.objective_metric, "mmp.tuning.direction": self.tuning.direction,
            "mmp.tuning.strategy": self.tuning.strategy, "mmp.tuning.max_runs": str(self.tuning.total_runs),
            "mmp.tuning.parallel": str(self.tuning.parallel),
            "mmp.tuning.early_stopping": str(self.tuning.early_stopping).lower(),
            "mmp.tuning.ranges": json.dumps(self.tuning.describe()["Ranges"]),
        })
        study.set_user_attr(ATTR_PARENT, started.run_id)
        if self.pipeline.store is not None:
            self.pipeline.store.update(started.run_id, state="RUNNING")
        return started

    # -- trials -----------------------------------------------------------------------
    def _on_launch(self, run_id: str, handle: JobHandle) -> None:
        self.handles[run_id] = handle  # called from the trial's thread; read by cancel in the loop

    def _interrupted(self, study) -> set[int]:
        return set(study.user_attrs.get(ATTR_INTERRUPTED, []))

    def _replace_interrupted(self, study) -> None:
        """Trials left running by a dead worker: tear down, enqueue the same parameters again, then fail.

        Each step is safe to repeat, so a second crash in the middle loses no point and queues none
        twice: the replacement is enqueued before the trial is failed, and never for a trial that
        already has one (`mmp.replaces`)."""
        from optuna.trial import TrialState

        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not stale:
            return
        study.set_user_attr(ATTR_INTERRUPTED, sorted(self._interrupted(study) | {t.number for t in stale}))
        replaced = {t.user_attrs.get(ATTR_REPLACES) for t in study.get_trials(deepcopy=False)}
        for t in stale:
            run_id = t.user_attrs.get(ATTR_RUN)
            if run_id:
                self._end_interrupted_run(run_id, t.user_attrs.get(ATTR_HANDLE))
            if t.number not in replaced:
                # a trial caught inside ask() may lack some params; the queued point it took has them all
                params = {**t.system_attrs.get("fixed_params", {}), **t.params}
                study.enqueue_trial(params, user_attrs={ATTR_REPLACES: t.number})
                crash_point("study-replacement-enqueued")
            self._tell(study, t.number, state=TrialState.FAIL)
            log.warning("study %s: trial %d was interrupted; replaced", self.name, t.number)

    def _end_strays(self, study) -> None:
        """End this delivery's MLflow runs that a crash left open with no trial in flight: one made just
        before its trial recorded it (ended as interrupted), or one whose trial Optuna had already
        recorded as ended (ended as Optuna says: a complete trial stays complete)."""
        if not self.trigger.delivery_id:
            return
        skip = self._interrupted(study)
        by_run = {t.user_attrs[ATTR_RUN]: t for t in study.get_trials(deepcopy=False) if ATTR_RUN in t.user_attrs}
        for run_id, delivery_id in self.tracker.open_runs(DELIVERY_TAG):
            if delivery_id != self.trigger.delivery_id or run_id == self.parent.run_id:
                continue
            t = by_run.get(run_id)
            if t is not None and t.state.name in ENDED_AS and t.number not in skip:
                state, tag = ENDED_AS[t.state.name]
                self._end_interrupted_run(run_id, t.user_attrs.get(ATTR_HANDLE), state=state, tag=tag,
                                          message=f"{tag} (ended on resume: the worker stopped before ending this run)")
            else:
                self._end_interrupted_run(run_id, t.user_attrs.get(ATTR_HANDLE) if t is not None else None)
            log.warning("study %s: ended MLflow run %s that a stopped worker left open", self.name, run_id)

    def _end_interrupted_run(self, run_id: str, recorded: dict | None = None, *, state: JobState = JobState.FAILED,
                             tag: str = "failed", message: str = INTERRUPTED_TRIAL) -> None:
        """Stop and tear down its job (from the local job store, or the handle the study recorded), end its run."""
        store = self.pipeline.store
        record = store.get(run_id) if store is not None else None
        end_trial(run_id, record.handle if record is not None and record.handle else recorded,
                  backend_for=self.pipeline.backend_factory, tracker=self.tracker, message=message,
                  state=state, tag=tag)
        if store is not None:
            store.update(run_id, state=state.value, message=message)

    def _counts(self, study) -> collections.Counter:
        """Finished trials by state (interrupted ones were replaced and do not count). Every tick asks (stop
        reason, free slots) and each asking read every trial from the storage: CPU the trials need. They
        change only when this study tells Optuna (`_tell`), so they are kept until it does."""
        if self._finished_counts is None:
            skip = self._interrupted(study)
            self._finished_counts = collections.Counter(
                t.state.name for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number not in skip)
        return collections.Counter(self._finished_counts)

    def _tell(self, study, trial, *args, **kwargs) -> None:
        """Optuna's tell; the finished counts are read again after it (even when it fails half way)."""
        self._finished_counts = None
        study.tell(trial, *args, **kwargs)

    def _remaining(self, study) -> int:
        return max(self.tuning.total_runs - sum(self._counts(study).values()) - len(self.running), 0)

    def _launch_one(self, study, dists: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        if self.ordered:  # this draw's seed depends on the trial alone, not on what this process drew before
            study.sampler = make_sampler(self.tuning, seed=trial_seed(self.tuning.seed,
                                                                     len(study.get_trials(deepcopy=False))))
        try:
            trial = ask(study, self.tuning, dists)  # conditional ranges: drawn define-by-run
        except Exception as exc:  # every later draw would fail the same way: the study ends, saying why
            self._finished_counts = None  # ask() failed the trial it made (mmp.tuning.space)
            raise SamplingError(f"could not draw the next trial's values from Tuning.Ranges "
                                f"({type(exc).__name__}: {exc})") from exc
        try:
            prepared = dataclasses.replace(self.prepared, experiment=self.prepared.experiment.for_trial(trial.params),
                                           backend=self.backend)  # the staged image and code too
            sees = None
            if self.ordered:  # every trial below the oldest still running has been told
                sees = min(self.running, default=trial.number)
                trial.set_user_attr(ATTR_SEES, sees)
            started = self.trials.start(self.trigger, prepared)
            asks = self._trial_tags(study, sees)
            self.tracker.set_tags(started.run_id, {
                TAG_PARENT: self.parent.run_id, TAG_TRIAL: str(trial.number), TAG_TRIAL_STATE: "running",
                "mlflow.runName": f"{started.request.experiment_name}-{self.trigger.commit[:7]}-trial-{trial.number}",
                **asks,
            })
        except Exception as exc:  # a refused value or MLflow: the trial fails, the study goes on (or stops)
            log.error("study %s: could not create the run of trial %d: %s", self.name, trial.number, exc)
            self._tell(study, trial, state=TrialState.FAIL)
            return
        crash_point("study-trial-run-created")
        trial.set_user_attr(ATTR_RUN, started.run_id)
        # Each trial is its own job on platforms that name jobs after the delivery (SageMaker).
        started.request = dataclasses.replace(started.request, delivery_id=f"{self.key}-trial-{trial.number}",
                                              study=self.name)
        tr = TrialRun(trial=trial, started=started, lines=OutputTail(), waits=TAG_TRIAL_PRUNING in asks,
                      pace=StepPace(self.poll_seconds, time.monotonic(), self._first_step_s))
        tr.thread = threading.Thread(target=self._follow, args=(tr,), name=f"trial-{trial.number}", daemon=True)
        self.running[trial.number] = tr
        crash_point("study-trial-registered")  # running, but not yet followed: a stop here must wait for nothing
        tr.thread.start()

    def _trial_tags(self, study, sees: int | None) -> dict[str, str]:
        """What train.py may read from its run (mmp.tuning.tags): the objective and direction, the best
        value so far (a trial that does not beat it need not log its model), and with Early_Stopping that
        it may wait for the pruner's verdict at each step: not when the pruner will never stop it (seeded:
        fewer complete trials than the pruner's start-up below `sees`, and that set cannot grow)."""
        from optuna.trial import TrialState

        tags = {TAG_TRIAL_OBJECTIVE: self.tuning.objective_metric, TAG_TRIAL_DIRECTION: self.tuning.direction}
        best = self._best(study)
        if best is not None:
            tags[TAG_TRIAL_BEST_BEFORE] = repr(best.value)
        if self.tuning.early_stopping:
            complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if sees is None or t.number < sees]
            if sees is None or len(complete) >= PRUNER_STARTUP_TRIALS:
                tags[TAG_TRIAL_PRUNING] = "wait"
        return tags

    def _follow(self, tr: TrialRun) -> None:
        """In the trial's thread: the same launch → wait → teardown as a single run."""
        prefix = f"[trial {tr.trial.number}] "

        def sink(line: str) -> None:
            tr.lines.append(line)
            if self.pipeline.on_log:
                self.pipeline.on_log(prefix + line)

        try:
            tr.status, _ = self.trials.execute(self.backend, tr.started, sink, deadline=self.deadline)
        except BaseException as exc:  # never lose a trial: the loop must hear of it
            tr.status = JobStatus(JobState.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            self.finished.put(tr)

    def _cancel(self, tr: TrialRun) -> None:
        handle = self.handles.get(tr.started.run_id)
        if handle is None or tr.cancelled or tr.status is not None:
            return  # not launched yet (the next tick tries again), or its job has ended
        tr.cancelled = True
        try:
            self.backend.cancel(handle)
        except Exception as exc:
            log.error("could not cancel trial %d: %s", tr.trial.number, exc)

    def _record_handles(self) -> None:
        """Put each newly launched trial's job in the study's storage (a restart tears it down from
        there) and tell `on_change`; from the loop's thread, as Optuna's storage wants."""
        fresh = False
        for tr in list(self.running.values()):
            run_id = tr.started.run_id
            handle = self.handles.get(run_id)
            if handle is not None and run_id not in self._recorded:
                self._recorded[run_id] = handle.to_dict()
                tr.trial.set_user_attr(ATTR_HANDLE, self._recorded[run_id])
                crash_point("study-trial-recorded")
                fresh = True
        if fresh:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change({"parent_run_id": self.parent.run_id, "run_url": self.parent.run_url,
                            "trials": dict(self._recorded)})
        except Exception as exc:  # a missed snapshot costs only the backstop, never the study
            log.warning("study %s: could not record its progress: %s", self.name, exc)

    def _prune(self) -> None:
        """Judge the new steps of running trials, in step order, as Optuna's own loop would: report a step,
        ask should_prune, and at the first step where the pruner says stop, stop the trial there (its later
        steps are never reported). A trial whose job has ended is not judged: it finished, and a finished
        trial is complete, never pruned. Each trial is read when due (`_judgeable`, mmp.tuning.pace): a trial
        told to wait for its verdicts at the pace of its steps; one that the pruner can never stop (seeded,
        `_trial_tags`) only to keep its backlog short, since its values are all reported when it ends."""
        if not self.tuning.early_stopping:
            return
        now = time.monotonic()
        for tr in self._judgeable():
            if now < tr.next_read:
                continue
            judged = tr.judged_step
            read = self._report_intermediate(tr, 1, judge=True)
            now = time.monotonic()
            if tr.judged_step != judged:
                tr.pace.saw_step(now)
                if tr.pace.steps == 1:  # its start-up: how soon the next trial's first step may come
                    self._first_step_s = min(self._first_step_s or math.inf, tr.pace.startup)
            tr.next_read = tr.pace.next_read(now) if tr.waits else now + max(self.poll_seconds, POLL_SECONDS)
            if not read:
                continue
            self._tell_train_py(tr)
            if tr.pruned:
                self._cancel(tr)

    def _judgeable(self) -> list[TrialRun]:
        """Running trials whose steps `_prune` still judges: launched, not ended, not pruned."""
        return [tr for tr in self.running.values()
                if not tr.pruned and tr.status is None and tr.started.run_id in self.handles]

    def _tick_seconds(self) -> float:
        """How long the loop may wait for a trial to end: until the next trial read is due, and no longer than
        without Early_Stopping (cancel requests, Max_Runtime and new trials' jobs are looked at each tick)."""
        longest = max(self.poll_seconds, POLL_SECONDS)
        due = min((tr.next_read for tr in self._judgeable()), default=None) if self.tuning.early_stopping else None
        if due is None:
            return self.poll_seconds
        return min(longest, max(0.0, due - time.monotonic()))

    def _report_intermediate(self, tr: TrialRun, pages: int, *, judge: bool = False) -> bool:
        """Tell Optuna the objective's new checkpoint values in step order, read `pages` pages at most (a
        bounded tick however much train.py logs); `judge`: ask the pruner after each and stop at the first
        step it rejects. False when MLflow could not be read."""
        metric = self.tuning.objective_metric
        try:
            if tr.intermediate is None:
                tr.intermediate = IntermediateValues(self.tracker, tr.started.run_id, metric)
            for _ in range(pages):
                rows = tr.intermediate.read()
                for step, value in checkpoints(rows, tr.reported_step):
                    tr.trial.report(value, step)
                    tr.reported_step, tr.reported_value = step, value
                    if judge and tr.trial.should_prune():
                        tr.pruned = (f"pruned at step {step}: {metric} {value:.4g} is worse than the median of "
                                     "earlier trials")
                        tr.judged_step = step
                        return True
                if rows:  # every step read passed, checkpoint or not: a waiting train.py goes on
                    newest = max(step for step, _ in rows)
                    tr.judged_step = newest if tr.judged_step is None else max(tr.judged_step, newest)
                if tr.intermediate.caught_up:
                    break
        except Exception as exc:
            log.warning("could not read %s of trial %d: %s", metric, tr.trial.number, exc)
            return False
        return True

    def _tell_train_py(self, tr: TrialRun) -> None:
        """Write the verdict where a waiting train.py reads it (TAG_TRIAL_JUDGED): once per tick, not per step."""
        if tr.judged_step is None:
            return
        verdict = f"pruned:{tr.judged_step}" if tr.pruned else str(tr.judged_step)
        if verdict == tr.told_judged:
            return
        try:
            self.tracker.set_tags(tr.started.run_id, {TAG_TRIAL_JUDGED: verdict})
            tr.told_judged = verdict
        except Exception as exc:  # train.py waits on; the next tick writes it again
            log.warning("could not tell trial %d its verdict: %s", tr.trial.number, exc)

    def _conclude_trial(self, study, tr: TrialRun) -> None:
        """End the trial's MLflow run and tell Optuna: complete (with the final value), pruned or failed.
        A trial whose job succeeded is complete even if the pruner rejected a step as it was ending: it
        finished, and its final value is its objective."""
        from optuna.trial import TrialState

        del self.running[tr.trial.number]
        if self._recorded.pop(tr.started.run_id, None) is not None:
            self._changed()  # its job has ended: nothing of it left for Conclude to stop
        status = tr.status or JobStatus(JobState.FAILED, "no outcome")
        if tr.pruned and status.state == JobState.CANCELLED and status.exit_code == 0:
            status = JobStatus(JobState.SUCCEEDED, "train.py exited 0 before the pruner's stop reached it", 0)
        metric = self.tuning.objective_metric
        value = None
        pruned = tr.pruned if status.state != JobState.SUCCEEDED else None
        if pruned:
            status, state, tag = JobStatus(JobState.CANCELLED, pruned), TrialState.PRUNED, "pruned"
        elif status.state == JobState.SUCCEEDED:
            try:
                value = self.final_value(tr.started.run_id)
            except Exception as exc:
                status = JobStatus(JobState.FAILED, f"could not read {metric}: {exc}")
            if value is not None and math.isnan(value):  # Optuna refuses NaN: this trial fails, the study goes on
                value = None
                status = JobStatus(JobState.FAILED, f"train.py logged {metric} = NaN (the study's objective)")
            elif value is not None:
                state, tag = TrialState.COMPLETE, "complete"
                if self.tuning.early_stopping:  # later trials are compared with its values at their steps
                    if tr.pruned:  # judging stopped part-way through a page: read again, from the start
                        tr.intermediate = None
                    self._report_intermediate(tr, DRAIN_PAGES)
            else:
                status = JobStatus(JobState.FAILED, f"train.py logged no {metric!r} metric (the study's objective)")
        if value is None and not pruned:
            state, tag = TrialState.FAIL, ("cancelled" if tr.cancelled else "failed")
        try:
            self.tracker.set_tags(tr.started.run_id, {TAG_TRIAL_STATE: tag})
        except Exception as exc:
            log.warning("could not tag trial %d: %s", tr.trial.number, exc)
        try:  # Optuna first: a crash after it leaves a run that resuming ends as Optuna recorded
            self._tell(study, tr.trial, value if state == TrialState.COMPLETE else None, state=state)
            crash_point("study-trial-told")
        finally:  # even when Optuna's storage refused: the run ends, the study's error path does the rest
            self.trials.conclude(self.trigger, tr.started, status, "\n".join(tr.lines.lines()))
        self._report_progress(study)

    # -- progress and the end ----------------------------------------------------------
    def _best(self, study):
        try:
            return study.best_trial
        except ValueError:  # no complete trial yet
            return None

    def _report_progress(self, study) -> None:
        done = sum(self._counts(study).values())
        best = self._best(study)
        text = f"{done}/{self.tuning.total_runs} trials"
        if best is not None:
            text += f", best {self.tuning.objective_metric} {best.value:.4g}"
        self.pipeline.report_status(self.trigger, "pending", text, self.parent.run_url)

    def _stop_reason(self, study) -> str | None:
        if control.cancel_requested(self.key):
            return "cancelled"
        if time.time() > self.deadline:
            return "stopped: Max_Runtime reached"
        failed = self._counts(study).get("FAIL", 0)
        if self.tuning.max_failures is not None and failed >= self.tuning.max_failures:
            return f"{failed} trials failed (Max_Failures {self.tuning.max_failures})"
        return None

    def _summary(self, study) -> str:
        counts = self._counts(study)
        parts = [f"{counts.get(k, 0)} {word}" for k, word in
                 (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed")) if counts.get(k)]
        return f"{sum(counts.values())}/{self.tuning.total_runs} trials ({', '.join(parts) or 'none finished'})"

    def _tag_parent(self, tags: dict[str, str]) -> None:
        try:
            self.tracker.set_tags(self.parent.run_id, tags)
        except Exception as exc:  # MLflow down: the study still ends, reports and notifies
            log.warning("study %s: could not tag its parent run: %s", self.name, exc)

    def _final_status(self, study, stop: str | None) -> JobStatus:
        summary = self._summary(study)
        best = self._best(study)
        detail: dict[str, Any] = {}
        if best is not None:
            metric = self.tuning.objective_metric
            summary += f", best {metric} {best.value:.4g} (trial {best.number})"
            detail["metrics"] = {metric: best.value}
            self._tag_parent({
                "mmp.tuning.best_trial": str(best.number), "mmp.tuning.best_value": repr(best.value),
                "mmp.tuning.best_run_id": best.user_attrs.get(ATTR_RUN, ""),
                "mmp.tuning.best_params": json.dumps(best.params),
            })
        self._tag_parent({f"mmp.tuning.trials_{k.lower()}": str(v) for k, v in self._counts(study).items()})
        if stop in ("cancelled", "stopped: Max_Runtime reached"):
            return JobStatus(JobState.CANCELLED, f"{stop} after {summary}", detail=detail)
        if stop is not None:
            return JobStatus(JobState.FAILED, f"{stop}; {summary}", detail=detail)
        if best is None:
            return JobStatus(JobState.FAILED, f"no trial completed: {summary}", detail=detail)
        return JobStatus(JobState.SUCCEEDED, summary, detail=detail)

    def _loop(self, study, interrupts: HeldSignals) -> str | None:
        """Launch, follow and conclude trials until the budget is spent or a stop reason comes; returns it.
        A Ctrl-C or SIGTERM is held (`interrupts`) and raised at the top of an iteration, where every
        running trial has its thread and every ended one is on the queue or concluded: `_stop_trials`
        then hears of each."""
        dists = distributions(self.tuning)
        stop: str | None = None
        self._report_progress(study)
        while True:
            interrupts.checkpoint()
            while not self.finished.empty():
                self._arrive(study, self.finished.get())
            stop = stop or self._stop_reason(study)
            if stop:
                for tr in self.running.values():
                    self._cancel(tr)
            self._advance(study, dists, launch=not stop)
            if not stop:
                self._prune()
            self._record_handles()
            if not self.running and (stop or self._remaining(study) == 0):
                return stop
            ended = self._wait_for_a_trial(self._tick_seconds(), interrupts)
            if ended is not None:
                self._arrive(study, ended)

    def _wait_for_a_trial(self, seconds: float, interrupts: HeldSignals) -> TrialRun | None:
        """The next trial to end within `seconds`, or None; a held signal cuts the wait short (within
        INTERRUPT_SECONDS) so a stop is not kept waiting for a long tick (15 s on AWS)."""
        until = time.monotonic() + seconds
        while True:
            try:
                return self.finished.get(timeout=max(0.0, min(until - time.monotonic(), INTERRUPT_SECONDS)))
            except queue.Empty:
                if interrupts.pending or time.monotonic() >= until:
                    return None

    def _arrive(self, study, tr: TrialRun) -> None:
        """A trial's job ended: conclude it now, or (seeded) hold it for `_advance` to conclude in turn."""
        if self.ordered:
            self.arrived[tr.trial.number] = tr
        else:
            self._conclude_trial(study, tr)

    def _advance(self, study, dists: dict[str, Any], *, launch: bool) -> None:
        """Fill the free slots (`launch`); seeded, conclude the oldest running trial once it has ended, then
        fill the slot it frees before the next is concluded. So trial n is asked exactly when trials up to
        n - Parallel have been told, whichever ended first: a trial that ended early keeps its slot until
        those before it are told."""
        while True:
            while launch and len(self.running) < self.tuning.parallel and self._remaining(study) > 0:
                self._launch_one(study, dists)
            oldest = min(self.running, default=None)
            if oldest is None or oldest not in self.arrived:
                return
            self._conclude_trial(study, self.arrived.pop(oldest))

    def _stop_trials(self, conclude: Callable[[TrialRun], bool]) -> None:
        """Cancel every running trial and wait for each; `conclude(trial)` says whether to record it now."""
        for tr in self.arrived.values():  # ended, waiting for their turn: they come out of the queue again
            self.finished.put(tr)
        self.arrived.clear()
        while self.running:
            for tr in self.running.values():
                self._cancel(tr)
            try:
                tr = self.finished.get(timeout=self.poll_seconds)
            except queue.Empty:
                tr = self._lost_trial()
                if tr is None:
                    continue
            if not conclude(tr):
                del self.running[tr.trial.number]

    def _lost_trial(self) -> TrialRun | None:
        """A running trial that will never come out of the queue: its thread never started or has ended
        and the queue is empty (what it put there was taken by a loop that was stopped before recording
        it). A backstop: `_loop` holds signals so that this should not happen; if it does, waiting for
        the trial would wait forever."""
        for tr in self.running.values():
            if (tr.thread is None or not tr.thread.is_alive()) and self.finished.empty():
                if tr.status is None:
                    tr.status = JobStatus(JobState.FAILED, "its job was never followed (the study was stopped "
                                                           "as it launched)")
                return tr
        return None

    def _fail_after_error(self, study) -> None:
        """The loop failed: stop every trial, record each as it ended, and fail any trial Optuna still holds
        as running (one caught inside ask()), so nothing of the study goes on or waits for a resume."""
        from optuna.trial import TrialState

        def conclude(tr: TrialRun) -> bool:
            try:
                self._conclude_trial(study, tr)
            except Exception as exc:
                log.error("study %s: could not record trial %d: %s", self.name, tr.trial.number, exc)
                self.running.pop(tr.trial.number, None)
            return True

        self._stop_trials(conclude)
        try:
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self._tell(study, t.number, state=TrialState.FAIL)
        except Exception as exc:
            log.error("study %s: could not fail its unfinished trials: %s", self.name, exc)

    def _suspend(self, study) -> None:
        """The worker is stopping (Ctrl-C, SIGTERM, `mmp up` gone): stop the trials' jobs, keep what
        succeeded, and leave the rest as a kill -9 would, for the next worker to replace and resume."""

        def conclude(tr: TrialRun) -> bool:
            if tr.status is not None and tr.status.state == JobState.SUCCEEDED:  # it ended before the cancel
                self._conclude_trial(study, tr)
                return True
            return False

        self._stop_trials(conclude)
        release_warm(self.backend, self.handles.values())  # resuming may be far off: no idle warm pool waits for it
        study.set_user_attr(ATTR_ELAPSED, time.time() - self.since)  # the time away does not count
        self.pipeline.report_status(self.trigger, "pending", SUSPENDED, self.parent.run_url)

    def _end(self, status: JobStatus) -> Outcome:
        """End the parent run, report and notify; only then is the study recorded as over (a crash in
        between resumes it and ends it again, never leaves it looking unfinished or failed)."""
        release_warm(self.backend, self.handles.values())  # no trial follows: no warm pool left to bill
        outcome = self.pipeline.conclude(self.trigger, self.parent, status, None)
        crash_point("study-concluded")
        control.finish(self.key, {JobState.SUCCEEDED: "finished", JobState.CANCELLED: "cancelled"}
                       .get(status.state, "failed"))
        return outcome

    def run(self) -> Outcome:
        control.register(self.key, self.name)
        try:
            study = open_study(self.name, self.tuning, self.storage)
            self.parent = self._open_parent(study)
        except Exception as exc:  # Optuna's storage or MLflow refused: the study ends before any trial
            if self.retried_on_error or self.parent is None:
                raise  # with no parent run, run_study rejects the commit (error status and notification)
            log.exception("study %s could not start", self.name)
            return self._end(JobStatus(JobState.FAILED, f"the study could not start: {type(exc).__name__}: {exc}"))
        control.set_parent(self.key, self.parent.run_id)
        self._changed()
        try:
            self._replace_interrupted(study)
            self._end_strays(study)
            # Max_Runtime counts from the first start; after a stop (Ctrl-C, SIGTERM) only the time it ran
            elapsed = study.user_attrs.get(ATTR_ELAPSED)
            self.since = (time.time() - float(elapsed) if elapsed is not None
                          else float(study.user_attrs.get(ATTR_STARTED, time.time())))
            self.deadline = self.since + self.prepared.experiment.runtime_minutes * 60
            with HeldSignals() as interrupts:
                stop = self._loop(study, interrupts)
            status = self._final_status(study, stop)
        except (KeyboardInterrupt, SystemExit):
            if self.resume_on_stop:
                self._suspend(study)
                raise
            # The process is stopping for good: stop every trial, record each, end the study as cancelled.
            self._stop_trials(lambda tr: self._conclude_trial(study, tr) or True)
            self._end(JobStatus(JobState.CANCELLED, "interrupted"))
            raise
        except Exception as exc:  # Optuna, MLflow or a sampler failed: a final status all the same
            if self.retried_on_error:
                raise
            log.exception("study %s stopped on an error", self.name)
            self._fail_after_error(study)
            try:
                summary = self._summary(study)
            except Exception:
                summary = "trial counts unavailable"
            reason = str(exc) if isinstance(exc, SamplingError) else f"{type(exc).__name__}: {exc}"
            status = JobStatus(JobState.FAILED, f"the study stopped on an error ({reason}); {summary}")
        return self._end(status)


def run_study(pipeline: Pipeline, trigger: Trigger, prepared: Prepared) -> Outcome:
    """`tuning.dispatch.run_commit`'s path for an experiment with a Tuning block.

    A study that cannot start (its storage or its parent run refused) ends with an error status and a
    notification, like any run that could not start; never with no commit status at all.
    The pipeline's `on_launch` hears of the parent run once it exists (the study's run: `mmp run --detach`
    returns with it), with no job handle: a study is many jobs."""
    announced: list[str] = []

    def announce_parent(progress: dict[str, Any]) -> None:
        if pipeline.on_launch is not None and not announced:
            announced.append(progress["parent_run_id"])
            pipeline.on_launch(progress["parent_run_id"], None)

    runner = StudyRunner(pipeline, trigger, prepared, on_change=announce_parent,
                         resume_on_stop=pipeline.resume_studies)
    try:
        return runner.run()
    except Exception as exc:
        if runner.parent is not None:
            raise
        log.exception("study %s could not start", runner.name)
        control.finish(runner.key, "failed")
        return pipeline.reject(trigger, [f"the study could not start: {type(exc).__name__}: {exc}"], state="ERROR")
