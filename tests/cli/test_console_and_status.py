"""What the CLI prints: user text is never read as rich markup, links only to an MLflow that
answers, `mmp status RUN` shows the commit's statuses, `compare --help` claims no default,
and MMP's experiments open in MLflow's model-training view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmp import config

from ..conftest import free_port, mlflow_server

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}
QUICK_TRAIN = 'print("trained", flush=True)\n'
MARKUP = "[/x] [bold]b[/bold] [/]"


def mmp(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240, env={**os.environ, **(env or {})})


def test_markup_in_an_experiment_file_is_printed_not_parsed(tmp_path, make_repo, digits):
    folder = tmp_path / "[bold]exp [red]"  # a path with markup in it, as well as the values
    folder.mkdir()
    bad = folder / "exp.json"
    bad.write_text(json.dumps({**LOCAL, "Training_Instance": MARKUP, "Hyperparameters": {MARKUP: "1"}}))
    for args in (["validate", str(bad)], ["run", str(bad), "--repo", str(make_repo())]):
        done = mmp(*args)
        assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr, done.stderr
        assert done.returncode in (1, 2) and "[/x]" in done.stderr, (args, done.stderr)
    missing = mmp("validate", str(folder / "missing.json"))  # an error message that quotes a path
    assert missing.returncode == 1 and "[bold]exp [red]/missing.json" in missing.stderr, missing.stderr


@pytest.mark.horovod
def test_run_links_status_and_experiment_kind(make_repo, digits, tmp_path):
    repo = make_repo(experiment=LOCAL, files={"train.py": QUICK_TRAIN})
    dead_ui = f"http://127.0.0.1:{free_port()}"
    done = mmp("run", "--repo", str(repo), env={"MMP_MLFLOW_UI_URL": dead_ui})
    assert done.returncode == 0, done.stderr
    assert f"MLflow run: {dead_ui}" not in done.stdout  # nothing answers there: no dead link
    assert f"no UI answers at {dead_ui}" in done.stdout and "mmp up" in done.stdout
    run_id = json.loads(mmp("runs", "--json").stdout)[0]["run_id"]
    status = mmp("status", run_id, env={"MMP_MLFLOW_UI_URL": dead_ui})
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "statuses" in line)
    shown = "\n".join(lines[at:])
    assert "mmp/training pending" in shown and "mmp/training success" in shown, status.stdout
    as_json = json.loads(mmp("status", run_id, "--json").stdout)
    assert [s["state"] for s in as_json["statuses"]] == ["pending", "success"]
    kind = MlflowClient(config.tracking_uri()).get_experiment_by_name(repo.name).tags
    assert kind["mlflow.experimentKind"] == "custom_model_development"

    with mlflow_server(tmp_path / "server") as url:  # a UI that answers gets a link; REST tracking tags too
        (repo / "experiment.json").write_text(json.dumps({**LOCAL, "Experiment_Name": "served"}))
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", "served"], check=True)
        done = mmp("run", "--repo", str(repo), env={"MLFLOW_TRACKING_URI": url, "MMP_MLFLOW_UI_URL": url})
        assert done.returncode == 0, done.stderr
        assert f"MLflow run: {url}/#/experiments/" in done.stdout
        tags = MlflowClient(url).get_experiment_by_name("served").tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_compare_help_claims_no_default():
    done = mmp("compare", "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0
    assert "by default" not in done.stdout and "required" in done.stdout.lower()
