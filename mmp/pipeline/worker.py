"""The local worker: takes jobs from the durable queue and runs the pipeline for each.

One worker at a time holds `$MMP_HOME/worker.lock` (an flock, released by the kernel
even on `kill -9`). So when a worker starts, any job still marked `running` lost its
worker mid-flight: it is marked failed (never re-run, since training may already
have started), its MLflow runs are set FAILED (found by their `mmp.delivery_id` tag
too, so a run created just before the crash is not left RUNNING), whatever it left
running is killed, and the commit gets an `error` status and a notification. Queued
jobs then run exactly once, oldest first. A study (an experiment with a Tuning block)
is the exception: it is put back in the queue and resumes, replacing the trials that
were running (mmp.tuning.study), whether the worker was killed or stopped (SIGTERM,
Ctrl-C, or `mmp up` gone); one that had already ended and reported only has its job closed. While idle the worker retries ending runs the MLflow
store refused to end (read-only, deleted, down), so it recovers without a restart.
A push that changed `promote.json` is handed to
`mmp.models.gitops.run_promotion`; one that changed an experiment file trains.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from mmp import config
from mmp.system.filelock import hold, holder
from mmp.tuning import control as study_control
from mmp.tuning.dispatch import run_commit
from mmp.hosts.base import local_repository
from mmp.pipeline.job import Job
from mmp.pipeline.queue import JobQueue, QueuedJob, worker_id
from mmp.pipeline.reporting import TRAINING_CONTEXT, LocalNotifier, LocalStatusReporter, Notifier, StatusReporter
from mmp.pipeline.sources import LocalGitSource, Trigger

log = logging.getLogger("mmp.worker")

RECONCILE_SECONDS = 30.0  # how often an idle worker retries ending runs the MLflow store refused to end
INTERRUPTED = "interrupted: the worker stopped (crash or kill -9) while this job was in flight; not re-run"
SECRET_ENV = config.SECRET_ENV_VARS


class WorkerBusy(RuntimeError):
    pass


class CompositeReporter:
    """The local status record, plus the host's commit statuses for a hosted repository."""

    def __init__(self, *reporters: StatusReporter):
        self.reporters = reporters

    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str = TRAINING_CONTEXT) -> None:
        errors = []
        for reporter in self.reporters:
            try:
                reporter.report(repository, commit, state, description, target_url, context)
            except Exception as exc:
                errors.append(f"{type(reporter).__name__}: {exc}")
        if errors:
            raise RuntimeError("; ".join(errors))


class Worker:
    def __init__(self, queue: JobQueue | None = None, *, poll_seconds: float = 0.5,
                 hosts: dict[str, Any] | None = None, notifier: Notifier | None = None, pipeline_factory: Callable[..., Any] | None = None,
                 reconcile_seconds: float | None = None):
        self.queue = queue or JobQueue()
        self.poll_seconds = poll_seconds
        self.reconcile_seconds = RECONCILE_SECONDS if reconcile_seconds is None else reconcile_seconds
        self._hosts: dict[str, Any] = dict(hosts or {})  # name → mmp.hosts.base.GitHost, made on first use
        self.notifier = notifier or LocalNotifier()
        self.pipeline_factory = pipeline_factory
        self.id = worker_id()
        self._lock_fh = None

    # -- one worker at a time ------------------------------------------------------
    def acquire(self) -> None:
        path = config.mmp_home() / "worker.lock"
        fh = hold(path, self.id)
        if fh is None:
            raise WorkerBusy(f"another worker is running ({holder(path) or '?'}); one worker per MMP_HOME")
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    # -- wiring ----------------------------------------------------------------------
    def host(self, name: str):
        if name not in self._hosts:
            from mmp.hosts.base import get_host

            self._hosts[name] = get_host(name)
        return self._hosts[name]

    def trigger_for(self, job: Job) -> tuple[Trigger, StatusReporter]:
        path = local_repository(job.clone_url)
        if path is not None:
            source = LocalGitSource(path, job.after)
            trigger = Trigger(repository=job.repository, clone_url=str(path), commit=job.after, source=source,
                              delivery_id=job.delivery_id, ref=job.ref, changed_files=tuple(job.trigger_files),
                              local_root=str(path.resolve()), host="local")
            return trigger, LocalStatusReporter()
        host = self.host(job.host)
        trigger = Trigger(repository=job.repository, clone_url=job.clone_url, commit=job.after,
                          source=host.source(job.repository, job.clone_url, job.after), delivery_id=job.delivery_id,
                          ref=job.ref, changed_files=tuple(job.trigger_files), host=host.name)
        return trigger, CompositeReporter(LocalStatusReporter(), host.reporter())

    def pipeline(self, reporter: StatusReporter, delivery_id: str):
        from mmp.pipeline.store import RunStore

        def on_launch(run_id: str, handle: Any) -> None:
            self.queue.set_run(delivery_id, run_id)

        if self.pipeline_factory is not None:
            pipeline = self.pipeline_factory(reporter=reporter, notifier=self.notifier, on_launch=on_launch)
        else:
            from mmp.pipeline.runs import LocalPipeline  # SageMaker platforms: Prepare's image step, as for mmp run

            pipeline = LocalPipeline(store=RunStore(), reporter=reporter, notifier=self.notifier, on_launch=on_launch)
        pipeline.resume_studies = True  # this queue brings a stopped study back: recover() requeues it
        return pipeline

    # -- the work ----------------------------------------------------------------------
    def process(self, queued: QueuedJob) -> str:
        """Run one claimed job; its final queue state is done (all ok) or failed."""
        job = Job.from_dict(queued.payload)
        results, ok = [], True
        try:
            trigger, reporter = self.trigger_for(job)
            if job.trains:
                outcome = run_commit(self.pipeline(reporter, job.delivery_id), trigger)
                if outcome.run_id:
                    self.queue.set_run(job.delivery_id, outcome.run_id)
                ok = ok and outcome.ok
                results.append(f"train {outcome.state}" + (f" run {outcome.run_id}" if outcome.run_id else "")
                               + f": {outcome.message}")
            if job.promotes:
                state, message = self.promote(trigger, reporter)
                ok = ok and state.upper() not in ("FAILED", "FAILURE", "ERROR", "INVALID")
                results.append(f"promote {state}: {message}")
        except (KeyboardInterrupt, SystemExit):
            if not (job.trains and study_control.resumable(job.delivery_id)):  # a study stays running: it resumes
                self.queue.finish(job.delivery_id, "failed", "cancelled: the worker was stopped during this job")
            raise
        except Exception as exc:
            log.exception("job %s failed", job.delivery_id)
            self.queue.finish(job.delivery_id, "failed", f"{type(exc).__name__}: {exc}")
            return "failed"
        state = "done" if ok else "failed"
        self.queue.finish(job.delivery_id, state, " | ".join(results))
        return state

    def promote(self, trigger: Trigger, reporter: StatusReporter) -> tuple[str, str]:
        try:
            from mmp.models.gitops import run_promotion
        except ImportError as exc:
            message = f"promote.json changed but promotion is not available here ({exc})"
            reporter.report(trigger.repository, trigger.commit, "error", message, None)
            return "ERROR", message
        result = run_promotion(trigger, reporter=reporter, notifier=self.notifier)
        return str(result.state), str(result.message)

    def recover(self) -> list[str]:
        """Fail jobs a dead worker left `running`, with their MLflow runs and processes.

        The MLflow side is reconciled from the runs' delivery tags as well as from the
        local record, so a run created just before the crash (and never recorded) is
        ended too. Each interrupted job then gets an error status and a notification.
        """
        interrupted = []
        for queued in self.queue.running():
            job = Job.from_dict(queued.payload)
            study_state = study_control.state(job.delivery_id) if job.trains else None
            if study_state == "running":
                log.warning("job %s is a study; it resumes where it was", job.delivery_id)
                self.queue.requeue(job.delivery_id)
                continue
            if study_state is not None:  # it ended, reported and notified; the worker died before closing its job
                self.queue.finish(job.delivery_id, "done" if study_state == "finished" else "failed",
                                  f"study {study_state} (its job closed by recovery)")
                continue
            log.warning("job %s (%s@%s) was interrupted; marking it failed", job.delivery_id, job.repository,
                        job.after[:12])
            run_ids = self._fail_runs(job.delivery_id, queued.run_id)
            self.queue.finish(job.delivery_id, "failed", INTERRUPTED)
            interrupted.append((job, run_ids))
        ended = self.reconcile()
        for job, run_ids in interrupted:
            run_ids += [run_id for run_id, delivery in ended if delivery == job.delivery_id and run_id not in run_ids]
            try:
                reporter = LocalStatusReporter() if local_repository(job.clone_url) else self.trigger_for(job)[1]
                reporter.report(job.repository, job.after, "error", INTERRUPTED, None)
            except Exception as exc:
                log.warning("could not set the interrupted status for %s: %s", job.after[:12], exc)
            try:
                self.notifier.notify(f"[mmp] {job.repository}@{job.after[:7]}: INTERRUPTED", INTERRUPTED,
                                     {"delivery_id": job.delivery_id, "repository": job.repository,
                                      "commit": job.after, "state": "INTERRUPTED", "run_ids": run_ids})
            except Exception as exc:
                log.warning("could not notify: %s", exc)
        return [job.delivery_id for job, _ in interrupted]

    def reconcile(self) -> list[tuple[str, str]]:
        """End MLflow runs left RUNNING by a job that is over; returns (run id, delivery id) of each.

        Two ways a run outlives its job: the worker died between MLflow's create_run and
        the local record (so only the run's `mmp.delivery_id` tag knows it), or the
        MLflow store refused the final write (read-only, deleted, down). The run's end
        comes from the local record when it has one (SUCCEEDED → FINISHED, ...), else
        FAILED with the job's reason. A run whose delivery is not in the queue (`mmp run`)
        is ended only once its local record says it ended. Failures are retried on the
        next pass, so a store that comes back gets its runs ended without a restart.
        """
        from mmp.backends import JobState
        from mmp.tracking.client import make_tracker, sqlite_path
        from mmp.pipeline.runner import DELIVERY_TAG
        from mmp.pipeline.store import RunStore

        path = sqlite_path(config.tracking_uri())
        if path is not None and not os.path.exists(path):
            return []  # no store yet (or it was deleted): no run to end, and no need to create it here
        try:
            tracker = make_tracker()
            open_runs = tracker.open_runs(DELIVERY_TAG)
        except Exception as exc:
            log.warning("could not look for unfinished MLflow runs (retried later): %s", exc)
            return []
        store, ended = RunStore(), []
        for run_id, delivery_id in open_runs:
            job = self.queue.get(delivery_id)
            record = store.get(run_id)
            if job is not None and job.state in ("queued", "running"):
                continue  # live (recover() has already failed what a dead worker left running)
            if record is not None and JobState(record.state) in (JobState.PENDING, JobState.RUNNING):
                continue  # its record says it runs: whoever launched it still follows it
            if job is None and record is None:
                continue  # not ours to judge: `mmp run` in another process may be recording it now
            if record is not None:
                state, message = JobState(record.state), record.message
            else:
                state = JobState.FAILED
                message = f"{job.message or INTERRUPTED} (ended by recovery: the run was never recorded locally)"
            try:
                tracker.finish(run_id, state, message=message)
            except Exception as exc:
                log.warning("could not end MLflow run %s (retried later): %s", run_id, exc)
                continue
            log.warning("ended MLflow run %s of delivery %s as %s: %s", run_id, delivery_id, state.value, message)
            ended.append((run_id, delivery_id))
        return ended

    def _fail_runs(self, delivery_id: str, run_id: str | None) -> list[str]:
        from mmp.backends import JobHandle, JobState, get_backend
        from mmp.tracking.client import make_tracker
        from mmp.pipeline.store import RunStore

        store = RunStore()
        records = [r for r in store.active() if r.delivery_id == delivery_id or r.run_id == run_id]
        tracker = make_tracker() if records else None
        for record in records:
            if record.handle:
                try:
                    handle = JobHandle.from_dict(record.handle)
                    get_backend(handle.platform).teardown(handle)  # kills what the dead worker left running
                except Exception as exc:
                    log.error("could not tear down %s: %s", record.run_id, exc)
            try:
                tracker.finish(record.run_id, JobState.FAILED, message=INTERRUPTED)
            except Exception as exc:
                log.error("could not mark MLflow run %s failed: %s", record.run_id, exc)
            store.update(record.run_id, state="FAILED", message=INTERRUPTED)
        return [r.run_id for r in records]

    def run_once(self) -> bool:
        queued = self.queue.claim(self.id)
        if queued is None:
            return False
        log.info("job %s: %s@%s", queued.delivery_id, queued.repository, queued.commit_sha[:12])
        self.process(queued)
        return True

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> int:
        """Hold the lock, recover, then work until stopped (or the queue is empty with once)."""
        self.acquire()
        done = 0
        try:
            self.recover()
            next_reconcile = time.monotonic() + self.reconcile_seconds
            while stop is None or not stop.is_set():
                if self.run_once():
                    done += 1
                    continue
                if once:
                    break
                if time.monotonic() >= next_reconcile:  # idle: end runs a failing store left RUNNING
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.reconcile_seconds
                if stop is not None:
                    stop.wait(self.poll_seconds)
                else:
                    time.sleep(self.poll_seconds)
        finally:
            self.release()
        return done


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """`python -m mmp.pipeline.worker [--once]`: what `mmp up` runs as its worker process."""
    parser = argparse.ArgumentParser(prog="mmp worker", description=__doc__.split("\n")[0])
    parser.add_argument("--once", action="store_true", help="run what is queued, then exit")
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--reconcile", type=float, default=RECONCILE_SECONDS,
                        help="seconds between idle passes that end MLflow runs the store refused to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MMP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mmp.hosts.base import configured_hosts

    hosts = configured_hosts()  # each reads its token now: the environment loses it next
    for name in SECRET_ENV:  # training subprocesses inherit the environment: keep secrets out of it
        os.environ.pop(name, None)
    signal.signal(signal.SIGTERM, _raise_exit)
    worker = Worker(poll_seconds=args.poll, hosts=hosts, reconcile_seconds=args.reconcile)
    try:
        worker.run(once=args.once)
    except WorkerBusy as exc:
        print(f"mmp worker: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        log.info("worker stopped")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
