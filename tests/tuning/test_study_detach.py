"""Issue 20.13: `mmp run --detach` on a study returns once the study's parent run exists, while its
trials run; real CLI, real horovodrun, real MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.tuning.tags import TAG_STUDY

pytestmark = pytest.mark.horovod
ROOT = Path(__file__).resolve().parents[2]

GATED_TRAIN = r'''
import argparse, os, time
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset", "--gate", "--units"):
    p.add_argument(flag, default="")
a = p.parse_args()
deadline = time.time() + 300
while not os.path.exists(a.gate) and time.time() < deadline:
    time.sleep(0.1)
'''


def test_detach_on_a_study_returns_with_its_parent_run(make_repo, digits, tmp_path):
    gate = tmp_path / "gate"
    repo = make_repo(experiment={
        "Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1",
        "Hyperparameters": {"gate": str(gate)},
        "Tuning": {"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"units": {"Values": [1]}}}},
        files={"train.py": GATED_TRAIN}, drop=("requirements.txt",))
    child = None
    try:
        # before the fix this blocked until the study ended (never, with the gate shut): the timeout fails it
        out = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "--detach", "--json"],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        answer = json.loads(out.stdout)
        child = psutil.Process(answer["pid"])
        assert answer["detached"] and answer["run_id"], answer
        parent = MlflowClient(config.tracking_uri()).get_run(answer["run_id"])
        assert parent.data.tags[TAG_STUDY] == "true" and parent.info.status == "RUNNING"
        assert child.is_running() and not gate.exists()  # returned while the study runs
    finally:
        gate.touch()  # let the trial end, so the study (and its process) ends too
        if child is not None:
            try:
                child.wait(timeout=240)
            except psutil.TimeoutExpired:
                child.kill()
