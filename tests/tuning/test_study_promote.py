"""`mmp promote --study` under "log a model only when leading" (issue 24): a real study on the local platform
(real git, horovodrun, MLflow), whose trials log a model only when they beat the study's best so far
(`mmp.trial.best_before`, as examples/fashion/train.py's StudyTrial.wants_model does). The best trial always
leads when it ends, so promoting the study registers its model, while a trial that trailed logged none."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.pipeline.runs import local_trigger, run_trigger

from .test_study import LOCAL, head, study_runs

pytestmark = [pytest.mark.horovod, pytest.mark.timeout(600)]

# The objective is --units itself; the model is a trivial pyfunc (no torch: this test is about which run holds one).
TRAIN = r'''
import argparse
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset"):
    p.add_argument(flag)
p.add_argument("--units", type=float, default=0.0)
a = p.parse_args()
import mlflow
import mlflow.pyfunc


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


with mlflow.start_run() as run:
    mlflow.log_metric("score", a.units, step=1)
    best = run.data.tags.get("mmp.trial.best_before")  # absent: nothing to beat yet
    if best is None or a.units >= float(best):  # the study maximizes score
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        print("logged the model", flush=True)
    else:
        print(f"trails the best so far ({best}): no model", flush=True)
'''


def test_promote_study_registers_the_best_trials_model_when_only_leaders_log_one(make_repo, digits):
    # Grid order is the Values order, one at a time: trial 0 (1) leads with nothing to beat, trial 1 (3) beats
    # it, trial 2 (2) trails trial 1 and logs no model. The best trial is trial 1.
    tuning = {"Objective_Metric": "score", "Direction": "maximize", "Strategy": "grid", "Parallel": 1,
              "Ranges": {"units": {"Values": [1, 3, 2]}}}
    repo = make_repo(name="study-promote", experiment={**LOCAL, "Tuning": tuning}, files={"train.py": TRAIN},
                     drop=("requirements.txt",))
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "SUCCEEDED", outcome.message
    parent, trials = study_runs(outcome.run_id)
    assert [t.data.params["units"] for t in trials] == ["1", "3", "2"]
    assert [t.data.tags.get("mmp.trial.best_before") for t in trials] == [None, "1.0", "3.0"]
    client = MlflowClient(config.tracking_uri())
    with_model = [bool(client.search_logged_models([t.info.experiment_id],
                                                   filter_string=f"source_run_id = '{t.info.run_id}'"))
                  for t in trials]
    assert with_model == [True, True, False]
    best = trials[1]
    assert parent.data.tags["mmp.tuning.best_run_id"] == best.info.run_id

    experiment = parent.data.tags["mlflow.source.name"]
    out = subprocess.run([sys.executable, "-m", "mmp", "promote", experiment, "--study", parent.info.run_id[:10],
                          "--json", "--no-deploy"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["run_id"] == best.info.run_id and result["action"] == "promoted", result
    version = client.get_model_version_by_alias(result["model_name"], "production")
    assert version.run_id == best.info.run_id
    logged = client.search_logged_models([best.info.experiment_id], filter_string=f"source_run_id = '{best.info.run_id}'")
    assert version.source == logged[0].artifact_location
