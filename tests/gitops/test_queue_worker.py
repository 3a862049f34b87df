"""The durable queue and the worker: idempotent, atomic claims, kill -9 and restart, promotions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from mmp.pipeline.queue import JobQueue
from mmp.pipeline.worker import Worker, WorkerBusy
from mmp.pipeline.job import Job

ROOT = Path(__file__).resolve().parents[2]
SLOW_TRAIN = "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n"
QUICK_TRAIN = "print('quick run', flush=True)\n"


def job(n: int, after: str | None = None, clone_url: str = "/nonexistent", files=("experiment.json",)) -> Job:
    return Job(repository="demo", clone_url=clone_url, before="0" * 40, after=after or f"{n:040x}",
               ref="refs/heads/main", delivery_id=f"delivery-{n}", trigger_files=list(files))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_submit_is_idempotent_on_delivery_and_body(queue):
    assert queue.submit(job(1), "body-a") is True
    assert queue.submit(job(1), "body-b") is False  # same delivery
    assert queue.submit(job(2), "body-a") is False  # same body, new delivery id
    assert queue.submit(job(3), None) and queue.submit(job(4), None)  # no digest: delivery id only
    assert queue.counts()["queued"] == 3


def test_jobs_survive_a_new_connection_and_are_claimed_oldest_first(queue):
    for n in (1, 2, 3):
        queue.submit(job(n), f"b{n}")
    other = JobQueue()  # another process would open the file afresh
    assert [other.claim("w").delivery_id for _ in range(3)] == ["delivery-1", "delivery-2", "delivery-3"]
    assert other.claim("w") is None
    assert queue.counts()["running"] == 3


def test_concurrent_claims_take_each_job_once(queue):
    for n in range(40):
        queue.submit(job(n + 1), f"b{n}")
    taken: list[str] = []
    lock = threading.Lock()

    def grab():
        q = JobQueue()
        while (j := q.claim()) is not None:
            with lock:
                taken.append(j.delivery_id)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(f"delivery-{n + 1}" for n in range(40))


def test_one_worker_per_home(queue):
    first = Worker(queue)
    first.acquire()
    try:
        with pytest.raises(WorkerBusy, match="another worker is running"):
            Worker(queue).acquire()
    finally:
        first.release()
    Worker(queue).acquire()


def test_promote_json_dispatches_to_run_promotion(queue, make_repo, monkeypatch):
    calls = []
    fake = types.ModuleType("mmp.models.gitops")
    fake.run_promotion = lambda trigger, reporter, notifier: calls.append((trigger, reporter, notifier)) or \
        types.SimpleNamespace(state="PROMOTED", message="fashion-demo v3 is production")
    monkeypatch.setitem(sys.modules, "mmp.models.gitops", fake)
    repo = make_repo()
    sha = git(repo, "rev-parse", "HEAD")
    queue.submit(job(1, sha, str(repo), files=("promote.json",)), "b")
    assert Worker(queue).run_once()
    (trigger, reporter, notifier), = calls
    assert trigger.commit == sha and trigger.clone_url == str(repo) and trigger.delivery_id == "delivery-1"
    assert hasattr(reporter, "report") and hasattr(notifier, "notify")
    done = queue.get("delivery-1")
    assert done.state == "done" and "PROMOTED" in done.message


def test_promotion_unavailable_is_an_error_status(queue, make_repo, monkeypatch):
    from mmp.pipeline.reporting import LocalStatusReporter

    monkeypatch.setitem(sys.modules, "mmp.models.gitops", None)  # import fails
    repo = make_repo()
    sha = git(repo, "rev-parse", "HEAD")
    queue.submit(job(1, sha, str(repo), files=("promote.json",)), "b")
    Worker(queue).run_once()
    assert queue.get("delivery-1").state == "failed"
    (status,) = LocalStatusReporter().history("demo", sha)
    assert status["state"] == "error" and "promotion is not available" in status["description"]


@pytest.mark.horovod
@pytest.mark.slow
def test_kill_9_then_restart_runs_queued_work_exactly_once(queue, make_repo, digits, mmp_home):
    """A worker killed mid-job: the job is marked failed with its MLflow run and process; the rest runs once."""
    from mlflow.tracking import MlflowClient

    from mmp import config
    from mmp.pipeline.store import RunStore

    repo = make_repo(files={"train.py": SLOW_TRAIN})
    slow = git(repo, "rev-parse", "HEAD")
    (repo / "train.py").write_text(QUICK_TRAIN)
    git(repo, "commit", "-qam", "quick")
    quick = git(repo, "rev-parse", "HEAD")
    queue.submit(job(1, slow, str(repo)), "b1")
    queue.submit(job(2, quick, str(repo)), "b2")
    queue.submit(job(3, quick, str(repo)), "b3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = mmp_home / "worker-test.log"
    with open(log_path, "ab") as out:
        first = subprocess.Popen([sys.executable, "-m", "mmp.pipeline.worker", "--poll", "0.2"], env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    store = RunStore()
    deadline = time.time() + 90
    while time.time() < deadline:
        running = [r for r in store.list() if r.state == "RUNNING" and r.handle]
        if running and "sleeping" in Path(running[0].handle["data"]["log"]).read_text(errors="replace"):
            break
        assert first.poll() is None, log_path.read_text()
        time.sleep(0.2)
    else:
        pytest.fail("the slow job never started: " + log_path.read_text())
    (interrupted,) = running
    orphan_pid = interrupted.handle["data"]["pid"]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert queue.get("delivery-1").state == "running"  # nobody cleaned up: it was kill -9
    assert queue.submit(job(2, quick, str(repo)), "b2") is False  # still deduped after the crash

    second = subprocess.run([sys.executable, "-m", "mmp.pipeline.worker", "--once"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    jobs = {n: queue.get(f"delivery-{n}") for n in (1, 2, 3)}
    assert jobs[1].state == "failed" and "interrupted" in jobs[1].message
    assert jobs[2].state == jobs[3].state == "done"
    records = store.list()
    assert len(records) == 3  # the interrupted job was not re-run; 2 and 3 ran once each
    states = {r.delivery_id: r.state for r in records}
    assert states == {"delivery-1": "FAILED", "delivery-2": "SUCCEEDED", "delivery-3": "SUCCEEDED"}
    client = MlflowClient(config.tracking_uri())
    assert client.get_run(interrupted.run_id).info.status == "FAILED"
    assert "interrupted" in client.get_run(interrupted.run_id).data.tags["mmp.outcome"]
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(orphan_pid, 0)
    # a third start finds nothing to do
    third = subprocess.run([sys.executable, "-m", "mmp.pipeline.worker", "--once"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and len(store.list()) == 3
