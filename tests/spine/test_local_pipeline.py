"""The spine end to end on the local platform: real git, real horovodrun, real MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.backends import JobState, get_backend
from mmp.pipeline.runs import local_trigger, run_trigger
from mmp.pipeline.store import RunStore

pytestmark = pytest.mark.horovod

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}

ARGV_TRAIN = """
import json, os, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
rank = os.environ.get("HOROVOD_RANK", "0")
print(f"rank {rank} says hello", flush=True)
with open(os.path.join(out, f"argv-{rank}.json"), "w") as fh:
    json.dump(sys.argv[1:], fh)
"""

CRASH_ON_RANK_1 = """
import os, sys, time
rank = int(os.environ["HOROVOD_RANK"])
print(f"rank {rank} starting", flush=True)
if rank == 1:
    print("rank 1: something broke", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(1)
print("rank 0 done", flush=True)
"""

SLEEPER = """
import time
print("sleeping", flush=True)
time.sleep(600)
"""


def mmp(*args, cwd=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def client() -> MlflowClient:
    return MlflowClient(config.tracking_uri())


def all_runs():
    return client().search_runs([e.experiment_id for e in client().search_experiments()])


def no_process_left(run_id: str) -> bool:
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("MMP_RUN_ID") == run_id:
                return False
        except (psutil.Error, OSError):
            continue
    return True


def test_example_trains_on_two_ranks_and_the_run_holds_everything(make_repo, digits):
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": "2",
                                 "Hyperparameters": "{'epochs': '2', 'batch-size': '64'}"})
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    proc = mmp("run", "--repo", str(repo))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1]<stdout>" in proc.stdout or "[0]<stdout>" in proc.stdout  # per-rank lines streamed
    assert "SUCCEEDED" in proc.stdout

    runs = all_runs()
    assert len(runs) == 1, "train.py must continue the pipeline's run, not make a second one"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.git.commit"] == sha
    assert run.data.tags["mlflow.source.name"] == "fashion-demo"
    assert run.data.tags["mmp.platform"] == "local"
    assert run.data.tags["mmp.instance_count"] == "1"
    assert run.data.tags["mmp.dataset"] == "digits"
    assert run.data.params["epochs"] == "2" and run.data.params["batch-size"] == "64"
    assert run.data.params["world_size"] == "2"
    history = client().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    models = client().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id, "logs")}
    assert "logs/train.log" in artifacts

    listed = json.loads(mmp("runs", "--json").stdout)
    assert listed[0]["run_id"] == run.info.run_id and listed[0]["state"] == "SUCCEEDED"
    status = json.loads(mmp("status", run.info.run_id[:10], "--json").stdout)
    assert status["commit_sha"] == sha
    assert "epoch 2/2" in mmp("logs", run.info.run_id).stdout


def test_crash_on_rank_1_fails_the_run_and_keeps_the_log(make_repo, digits):
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2}, files={"train.py": CRASH_ON_RANK_1})
    proc = mmp("run", "--repo", str(repo))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    tail = client().download_artifacts(run.info.run_id, "logs/log-tail.txt")
    text = open(tail).read()
    assert "[1]<stderr>:rank 1: something broke" in text
    record = RunStore().get(run.info.run_id)
    assert record.state == "FAILED"
    assert os.path.exists(record.handle["data"]["log"])
    assert no_process_left(run.info.run_id)


def test_hyperparameters_with_shell_metacharacters_reach_train_py_literally(make_repo, digits, tmp_path):
    canary = tmp_path / "pwned"
    hyper = {"sub": f"$(touch {canary})", "semi": "x;touch " + str(canary), "tick": f"`touch {canary}`",
             "quote": "it's \"quoted\"", "nl": "two\nlines", "flag": "--lr", "verbose": "--verbose"}
    repo = make_repo(experiment={**LOCAL, "Hyperparameters": hyper}, files={"train.py": ARGV_TRAIN})
    # an uncommitted edit in the user's tree must not be what runs
    (repo / "train.py").write_text("raise SystemExit('working tree used')\n")
    outcome = run_trigger(local_trigger(repo, "HEAD"))
    assert outcome.state == "SUCCEEDED", outcome.message
    run_dir = config.runs_root() / "fashion-demo" / outcome.run_id
    argv = json.loads((run_dir / "output" / "argv-0.json").read_text())
    expected = ["--dataset-path", str(digits), "--output-path", str(run_dir / "output"), "--dataset", "digits"]
    for key, value in hyper.items():
        expected += [f"--{key}", value]
    assert argv == expected
    assert not canary.exists()


def test_missing_train_py_is_an_error_before_launch_and_nothing_reaches_mlflow(make_repo, digits):
    repo = make_repo(experiment=LOCAL, drop=("train.py",))
    proc = mmp("run", "--repo", str(repo))
    assert proc.returncode == 2
    assert "train.py: not found at the repository root" in proc.stderr
    assert not (config.home_path() / "mlflow.db").exists()
    assert RunStore().list() == []


def test_invalid_experiment_launches_nothing_and_writes_nothing_to_mlflow(make_repo, digits):
    repo = make_repo(experiment={**LOCAL, "Instance_Count": "0", "Dataset_Name": "../etc"})
    proc = mmp("run", "--repo", str(repo))
    assert proc.returncode == 2
    assert "Instance_Count" in proc.stderr and "Dataset_Name" in proc.stderr
    assert not (config.home_path() / "mlflow.db").exists()
    assert not config.runs_root().exists()


def test_missing_dataset_folder_is_a_clear_error(make_repo):
    repo = make_repo(experiment=LOCAL)
    proc = mmp("run", "--repo", str(repo))
    assert proc.returncode == 2
    assert "mmp datasets prepare digits" in proc.stderr


def test_cancel_kills_every_process_and_marks_the_run_killed(make_repo, digits):
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2}, files={"train.py": SLEEPER})
    proc = subprocess.Popen([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        record = None
        while time.time() < deadline:
            running = RunStore().list(state="RUNNING")
            if running and running[0].handle:
                record = running[0]
                log = open(record.handle["data"]["log"]).read() if os.path.exists(record.handle["data"]["log"]) else ""
                if log.count("sleeping") == 2:
                    break
            time.sleep(0.3)
        assert record is not None, "the run never started"
        cancel = mmp("cancel", record.run_id)
        assert cancel.returncode == 0, cancel.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert client().get_run(record.run_id).info.status == "KILLED"
    assert RunStore().get(record.run_id).state == "CANCELLED"
    assert no_process_left(record.run_id)


def test_max_runtime_stops_the_whole_process_group(make_repo, digits):
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2}, files={"train.py": SLEEPER})
    from mmp.pipeline.runner import Pipeline

    pipeline = Pipeline()
    trigger = local_trigger(repo, "HEAD")
    prepared = pipeline.prepare(trigger)
    started = pipeline.start(trigger, prepared)
    backend = get_backend("local")
    handle = backend.launch(started.request)
    try:
        status = backend.wait(handle, deadline=time.time() + 3)
    finally:
        backend.teardown(handle)
    assert status.state == JobState.FAILED
    assert "Max_Runtime" in status.message
    assert no_process_left(started.run_id)


def test_run_is_detachable(make_repo, digits):
    repo = make_repo(experiment=LOCAL, files={"train.py": ARGV_TRAIN})
    proc = mmp("run", "--repo", str(repo), "--detach", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    deadline = time.time() + 60
    while time.time() < deadline:
        done = RunStore().list(state="SUCCEEDED")
        if done:
            break
        time.sleep(0.5)
    assert done, open(info["log"]).read()
    # The detached child writes the run's end, then exits: wait for that too, so nothing outlives the test.
    try:
        psutil.Process(info["pid"]).wait(timeout=max(deadline - time.time(), 5))
    except psutil.NoSuchProcess:
        pass
