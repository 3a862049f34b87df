"""`mmp run` as documented: FILE, --repo, --commit, --detach and --json, alone and together,
through the real CLI, git, horovodrun and MLflow; a detached launch that dies early is reported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.pipeline.store import RunStore

pytestmark = pytest.mark.horovod

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}
QUICK_TRAIN = """
import sys
print("train.py ran with", " ".join(sys.argv[1:]), flush=True)
"""
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def mmp(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, **(env or {})})


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def wait_final(run_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        record = RunStore().get(run_id)
        if record is not None and record.state in FINAL:
            return record
        assert time.monotonic() < deadline, f"run {run_id} still {record and record.state}"
        time.sleep(0.2)


@pytest.fixture
def two_commits(make_repo, digits):
    """A repository whose HEAD~1 trains epochs 1 and HEAD epochs 2, with a quick train.py."""
    repo = make_repo(experiment={**LOCAL, "Hyperparameters": {"epochs": "1"}}, files={"train.py": QUICK_TRAIN})
    first = git(repo, "rev-parse", "HEAD")
    (repo / "experiment.json").write_text(json.dumps({**LOCAL, "Hyperparameters": {"epochs": "2"}}))
    git(repo, "commit", "-qam", "two epochs")
    return repo, first, git(repo, "rev-parse", "HEAD")


# FILE, --repo, --commit, --detach, --json as columns of a 6-row covering array (columns are distinct
# weight-3 vectors, so every pair of arguments appears in all four on/off combinations), then all at once.
_COLUMNS = ("011100", "010011", "001011", "011010", "000111")
COMBOS = [tuple(int(col[row]) for col in _COLUMNS) for row in range(6)] + [(1, 1, 1, 1, 1)]


@pytest.mark.slow
@pytest.mark.timeout(900)  # seven real launches through horovodrun and MLflow
def test_every_documented_combination_trains_what_it_names(two_commits, tmp_path):
    repo, first, head = two_commits
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "exps").mkdir(parents=True)
    (elsewhere / "exps" / "seven.json").write_text(json.dumps({**LOCAL, "Hyperparameters": {"epochs": "7"}}))
    (repo / "exps").mkdir()
    (repo / "exps" / "seven.json").write_text(json.dumps({**LOCAL, "Hyperparameters": {"epochs": "7"}}))
    client = MlflowClient(config.tracking_uri())
    for use_file, use_repo, use_commit, detach, as_json in COMBOS:
        args = ["run"] + (["exps/seven.json"] if use_file else [])
        args += ["--repo", str(repo)] if use_repo else []
        args += ["--commit", first[:10]] if use_commit else []
        args += ["--detach"] if detach else []
        args += ["--json"] if as_json else []
        done = mmp(*args, cwd=elsewhere if use_repo else repo)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        if as_json:
            answer = json.loads(done.stdout)
            run_id, pid = answer["run_id"], answer.get("pid")
            assert answer.get("detached", False) == bool(detach)
        else:
            (record,) = RunStore().list(limit=1)
            run_id = record.run_id
            expected = f"run {run_id} launched in the background" if detach else f"SUCCEEDED run {run_id}"
            assert expected in done.stdout, (args, done.stdout)
            pid = int(re.search(r"\(pid (\d+)", done.stdout).group(1)) if detach else None
        record = wait_final(run_id)
        if pid is not None:  # the background `mmp run` ends by itself once its run has
            try:
                psutil.Process(pid).wait(timeout=120)
            except psutil.NoSuchProcess:
                pass
        assert record.state == "SUCCEEDED", (args, record.message)
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.source.git.commit"] == (first if use_commit else head), args
        assert run.data.params["epochs"] == ("7" if use_file else "1" if use_commit else "2"), args
    logs = list((config.mmp_home() / "detached").glob("*.log"))
    assert len(logs) == sum(c[3] for c in COMBOS)


@pytest.mark.parametrize("as_json", [False, True])
def test_a_detached_launch_that_dies_before_its_run_is_reported(two_commits, tmp_path, as_json):
    repo, _, _ = two_commits
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**LOCAL, "Instance_Count": "0"}))
    done = mmp("run", str(bad), "--repo", str(repo), "--detach", *(["--json"] if as_json else []), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    if as_json:
        answer = json.loads(done.stdout)
        assert answer["run_id"] is None and answer["exit_code"] == 2 and "Instance_Count" in answer["output"]
    else:
        assert "exited (2) before launching" in done.stderr and "Instance_Count" in done.stderr
    assert RunStore().list() == []


def test_a_missing_experiment_file_is_refused_up_front(two_commits, tmp_path):
    repo, _, _ = two_commits
    done = mmp("run", "nope.json", "--repo", str(repo), "--detach", cwd=tmp_path)
    assert done.returncode == 2 and "nope.json: no such experiment file" in done.stderr
    assert "Traceback" not in done.stderr and RunStore().list() == []
