"""Issue 20.5: studies opening a new studies.db at once all start, and a study that cannot open its
storage still ends with a commit status and a notification. Real Optuna, real SQLite, real processes."""

from __future__ import annotations

import json
import subprocess

import optuna

from mmp import config
from mmp.pipeline.reporting import LocalStatusReporter
from mmp.pipeline.runs import local_trigger, run_trigger
from mmp.tuning.study import STUDIES_DB, storage_url

from ..conftest import run_at_once

TUNING = {"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"units": {"Min": 1, "Max": 2}}}

OPEN_AT_ONCE = """
import pathlib, sys, time
from mmp.contract.tuning import Tuning
from mmp.tuning.study import open_study
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
study = open_study("study-" + sys.argv[2], Tuning.model_validate(%r))
print(len(study.get_trials()))
""" % TUNING


def test_studies_opening_a_new_storage_at_once_all_open_it(mmp_home, tmp_path):
    """Before: Optuna's table creation raced, and one study died before any commit status."""
    results = run_at_once(OPEN_AT_ONCE, 4, tmp_path / "go")
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    names = {s.study_name for s in optuna.get_all_study_summaries(storage_url())}
    assert names == {f"study-{i}" for i in range(4)}
    for name in names:  # each grid enqueued once, in full
        assert len(optuna.load_study(study_name=name, storage=storage_url()).get_trials()) == 2


def test_a_study_that_cannot_open_its_storage_ends_with_an_error_status(make_repo, digits, mmp_home):
    (config.mmp_home() / STUDIES_DB).mkdir()  # SQLite cannot open a folder: the storage refuses
    repo = make_repo(experiment={"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local",
                                 "Instance_Count": "1", "Tuning": TUNING})
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    trigger = local_trigger(repo, sha)
    outcome = run_trigger(trigger)
    assert outcome.state == "ERROR" and "could not start" in outcome.message, outcome.message
    (status,) = LocalStatusReporter().history(trigger.repository, sha)
    assert status["state"] == "error" and "could not start" in status["description"]
    note = json.loads((mmp_home / "notifications" / f"{trigger.delivery_id}.json").read_text())
    assert note["state"] == "ERROR"
