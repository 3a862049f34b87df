"""`mmp demo`, the newcomer's first contact, end to end (about a minute on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mmp import config

pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def test_demo_trains_two_commits_promotes_the_best_and_predicts(mmp_home, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmp", "demo", "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("statuses: pending → success") == 2
    assert "promoted fashion-demo v1 @production" in out
    assert "/invocations answered" in out

    client = MlflowClient(config.tracking_uri())
    exp = client.get_experiment_by_name("fashion-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["lr"] for r in runs} == {"0.01", "0.05"}  # the two commits' hyperparameters
    for run in runs:
        assert client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    best = max(runs, key=lambda r: r.data.metrics["val_accuracy"])
    assert client.get_model_version_by_alias("fashion-demo", "production").run_id == best.info.run_id

    listed = json.loads(subprocess.run([sys.executable, "-m", "mmp", "runs", "--json"], capture_output=True,
                                       text=True, check=True).stdout)
    assert sorted(r["run_id"] for r in listed) == sorted(r.info.run_id for r in runs)
    assert not config.local_stack_file().exists(), "the demo's stack must be stopped"
