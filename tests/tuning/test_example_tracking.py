"""examples/fashion/train.py as a study's trial against a real MLflow server (issue 24, trial cost): rank 0 tracks
over MLflow's REST API with the standard library, reads what the study asks from its run's tags, and imports the
mlflow package only to log the model of a trial that leads. Run for real under horovodrun, 1 rank, on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmp.contract.argv import horovodrun_argv, train_args
from mmp.runtime.horovod import find_horovodrun

from ..conftest import EXAMPLE, mlflow_server

pytestmark = [pytest.mark.horovod, pytest.mark.timeout(600)]

# Runs train.py as __main__ (as horovodrun would) and, at exit, writes whether the mlflow package was ever imported.
RECORD_IMPORTS = ("import atexit, json, os, runpy, sys; sys.argv = sys.argv[1:]; "
                  "atexit.register(lambda: open(os.environ['IMPORTS_FILE'], 'w').write("
                  "json.dumps({'mlflow': 'mlflow' in sys.modules}))); "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
STUDY_TAGS = {"mmp.trial.objective": "val_accuracy", "mmp.trial.direction": "maximize"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("example-tracking")) as url:
        yield url


def run_trial(tmp_path: Path, server: str, digits: Path, tags: dict[str, str]):
    """One trial of the example: a run made as the study makes it (tags included), then train.py under horovodrun."""
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("example") or client.get_experiment(client.create_experiment("example"))
    run_id = client.create_run(experiment.experiment_id, tags=tags).info.run_id
    imports = tmp_path / f"imports-{run_id}.json"
    argv = horovodrun_argv([("localhost", 1)], train_args(str(digits), str(tmp_path / "out"), "digits",
                                                          {"epochs": 2, "lr": 0.05}),
                           python=sys.executable, horovodrun=find_horovodrun() or "horovodrun",
                           launcher=("-c", RECORD_IMPORTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server, MLFLOW_EXPERIMENT_NAME="example", MLFLOW_RUN_ID=run_id,
               IMPORTS_FILE=str(imports), OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    return client, run_id, proc, json.loads(imports.read_text())


def test_a_trailing_trial_tracks_over_rest_and_never_imports_mlflow(tmp_path, server, digits):
    client, run_id, proc, imports = run_trial(tmp_path, server, digits, {
        **STUDY_TAGS, "mmp.trial.best_before": "1.0", "mmp.trial.pruning": "wait", "mmp.trial.judged": "99"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert imports == {"mlflow": False}
    assert "model not logged to MLflow (val_accuracy" in proc.stdout
    run = client.get_run(run_id)
    assert run.data.params["world_size"] == "1" and run.data.params["image_shape"] == "1x8x8"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert set(run.data.metrics) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"}
    assert client.list_artifacts(run_id) == [] and not client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")


def test_a_leading_trial_logs_a_model_that_loads_and_predicts(tmp_path, server, digits):
    import mlflow.pyfunc
    import numpy as np

    client, run_id, proc, imports = run_trial(tmp_path, server, digits, STUDY_TAGS)  # nothing to beat yet
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert imports == {"mlflow": True}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.predict(np.zeros((3, 1, 8, 8), dtype=np.float32)).shape == (3, 10)


def test_a_pruned_trial_stops_at_the_verdicts_epoch(tmp_path, server, digits):
    client, run_id, proc, imports = run_trial(tmp_path, server, digits, {
        **STUDY_TAGS, "mmp.trial.pruning": "wait", "mmp.trial.judged": "pruned:1"})
    assert proc.returncode != 0 and "pruned by the study at epoch 1" in proc.stdout + proc.stderr
    assert imports == {"mlflow": False}
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]


def test_a_refused_call_names_the_endpoint_and_never_the_password(tmp_path, server, digits):
    """A run id the server does not know: MLflow's own message, through the REST path, with no credential in it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server, MLFLOW_RUN_ID="0" * 32, MLFLOW_TRACKING_USERNAME="mmp",
               MLFLOW_TRACKING_PASSWORD="s3cret-pw")
    code = ("import sys; sys.argv = ['train.py']; import runpy; ns = runpy.run_path('train.py');"
            "t = ns['Tracking'](); assert t.rest; t.log_params({'a': 1})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLE, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: MLflow runs/log-batch: HTTP 404") and "s3cret-pw" not in proc.stderr
