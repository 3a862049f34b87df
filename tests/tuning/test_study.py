"""Real studies on the local platform: real git, real horovodrun, real MLflow, Optuna's SQLite storage.

The tiny train.py logs the objective `score` per step. Where a test needs trials to
overlap or to be caught mid-flight, train.py waits for a file the test writes (with a
deadline of its own), so nothing depends on timing luck.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.pipeline.queue import JobQueue
from mmp.pipeline.reporting import LocalStatusReporter
from mmp.pipeline.runs import local_trigger, run_trigger
from mmp.contract.tuning import Tuning
from mmp.tuning.study import distributions, make_sampler
from mmp.pipeline.job import Job

pytestmark = [pytest.mark.horovod, pytest.mark.timeout(900)]  # several trials each: slow on a loaded machine

TRAIN = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset", "--opt", "--marks", "--gate"):
    p.add_argument(flag, default="")
p.add_argument("--units", type=int, default=1)
p.add_argument("--shift", type=float, default=0.0)
p.add_argument("--steps", type=int, default=2)
p.add_argument("--together", type=int, default=0)
p.add_argument("--first-step", type=int, default=0)
a = p.parse_args()
run_id = os.environ["MLFLOW_RUN_ID"]

def wait_for(test, seconds=240):
    deadline = time.time() + seconds
    while not test():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True

if a.marks:  # one file per run; O_EXCL: a run started twice would crash here
    fd = os.open(os.path.join(a.marks, run_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, json.dumps({"pid": os.getpid(), "units": a.units, "opt": a.opt, "shift": a.shift}).encode()); os.close(fd)
if a.opt == "crash":
    sys.exit("error: this configuration always fails")
overlap = 1.0
if a.together:  # wait until that many trials have started: only true if they run at once
    overlap = float(wait_for(lambda: len(os.listdir(a.marks)) >= a.together, 120))
import mlflow
score = float("nan") if a.opt == "nan" else a.units + (10 if a.opt == "b" else 0) - abs(a.shift - 0.3)
with mlflow.start_run():
    for step in range(a.first_step, a.first_step + a.steps):
        mlflow.log_metric("score", score, step=step)
        mlflow.log_metric("overlap", overlap, step=step)
        if a.gate and step == 0:  # hold here until the test lets this run finish
            wait_for(lambda: os.path.exists(os.path.join(a.gate, run_id)), 300)
'''

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}


@pytest.fixture
def study_repo(make_repo, tmp_path, digits):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    gate.mkdir()

    def _make(tuning: dict, hyperparameters: dict | None = None) -> Path:
        experiment = {**LOCAL, "Hyperparameters": {"marks": str(marks), **(hyperparameters or {})},
                      "Tuning": tuning}
        return make_repo(name=f"study-{len(list(tmp_path.glob('study-*')))}", experiment=experiment,
                         files={"train.py": TRAIN}, drop=("requirements.txt",))

    _make.marks, _make.gate = marks, gate
    return _make


def mmp(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


def client() -> MlflowClient:
    return MlflowClient(config.tracking_uri())


def study_runs(parent_id: str):
    parent = client().get_run(parent_id)
    children = client().search_runs([parent.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, sorted(children, key=lambda r: int(r.data.tags["mmp.trial.number"]))


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def wait_until(test, seconds: float = 240, what: str = "condition"):
    deadline = time.time() + seconds
    while not test():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def marked(marks: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text() or "{}") for p in marks.iterdir() if p.stat().st_size}


def no_process_from(marks: Path) -> bool:
    pids = {m["pid"] for m in marked(marks).values()}
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


# -- sampling: no training needed ----------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_random_and_tpe_sample_inside_the_ranges(strategy):
    tuning = Tuning.model_validate({
        "Objective_Metric": "score", "Strategy": strategy, "Max_Runs": 40, "Seed": 7,
        "Ranges": {"lr": {"Min": 1e-4, "Max": 1e-1, "Scale": "log"}, "layers": {"Min": 2, "Max": 9, "Step": 7},
                   "width": {"Min": 8, "Max": 512, "Scale": "log"}, "opt": {"Values": ["sgd", "adam", True]},
                   "momentum": {"Min": 0.5, "Max": 0.99}}})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(tuning))
    dists = distributions(tuning)
    seen = []
    for _ in range(40):
        trial = study.ask(dists)
        params = trial.params
        seen.append(params)
        for name, value in params.items():
            assert tuning.ranges[name].contains(value), (name, value)
        assert isinstance(params["layers"], int) and params["layers"] in (2, 9)
        assert isinstance(params["width"], int)
        study.tell(trial, -abs(params["lr"] - 0.01))
    lrs = sorted(p["lr"] for p in seen)
    assert lrs[0] < 1e-3 < lrs[-1]  # log scale: small values are drawn as often as large ones
    assert {p["opt"] for p in seen} == {"sgd", "adam", True}


# -- real studies ---------------------------------------------------------------------
def test_grid_over_2x2_runs_exactly_4_trials_under_one_parent(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid",
                       "Ranges": {"units": {"Min": 1, "Max": 2}, "opt": {"Values": ["a", "b"]}}})
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "SUCCEEDED", outcome.message
    parent, trials = study_runs(outcome.run_id)
    assert len(trials) == 4
    assert sorted((t.data.params["units"], t.data.params["opt"]) for t in trials) == [
        ("1", "a"), ("1", "b"), ("2", "a"), ("2", "b")]
    assert {t.data.tags["mmp.trial.state"] for t in trials} == {"complete"}
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.tags["mmp.study"] == "true"
    assert parent.data.tags["mmp.tuning.strategy"] == "grid"
    assert json.loads(parent.data.tags["mmp.tuning.best_params"]) == {"units": 2, "opt": "b"}
    best = next(t for t in trials if t.info.run_id == parent.data.tags["mmp.tuning.best_run_id"])
    assert best.data.metrics["score"] == parent.data.metrics["score"] == 11.7
    assert "4/4 trials (4 complete), best score 11.7" in outcome.message
    history = LocalStatusReporter().history(repo.name, head(repo))
    descriptions = [h["description"] for h in history]
    assert "2/4 trials, best score " in " ".join(descriptions)
    assert history[-1]["state"] == "success" and "best score 11.7" in history[-1]["description"]

    # mmp compare groups the trials under their parent; --study shows one study by its objective
    experiment = parent.data.tags["mlflow.source.name"]
    board = json.loads(mmp("compare", experiment, "--json"))
    order = [(r["study"], r["parent_run_id"]) for r in board["rows"]]
    assert order == [(True, None)] + [(False, parent.info.run_id)] * 4
    png = Path(parent.info.artifact_uri.removeprefix("file://")).parent / "study.png"
    board = json.loads(mmp("compare", experiment, "--study", parent.info.run_id[:10], "--plot", str(png), "--json"))
    assert board["metric"] == "score" and board["study"] == parent.info.run_id
    assert board["rows"][0]["trial"] == int(best.data.tags["mmp.trial.number"]) and len(board["rows"]) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # mmp promote --study takes the best trial (this train.py logs no model, so it says which run it chose)
    out = subprocess.run([sys.executable, "-m", "mmp", "promote", experiment, "--study", parent.info.run_id[:10]],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1 and f"run {best.info.run_id} logged no model" in out.stderr


def test_early_stopping_prunes_a_trial_with_a_bad_intermediate_value(study_repo):
    # Grid order is the Values order: two good trials, then one that logs a bad first value
    # and holds; the median pruner must stop it through the backend's cancel.
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Early_Stopping": True,
                       "Ranges": {"shift": {"Values": [0.3, 0.4, 9.0]}}},
                      {"gate": str(study_repo.gate), "units": 1})

    def release_good():
        for run_id, mark in marked(study_repo.marks).items():
            if mark["shift"] != 9.0:
                (study_repo.gate / run_id).touch()
        return False

    stop = threading.Event()
    releaser = threading.Thread(target=lambda: [release_good() or stop.wait(0.2) for _ in iter(stop.is_set, True)],
                                daemon=True)
    releaser.start()
    try:
        outcome = run_trigger(local_trigger(repo, head(repo)))
    finally:
        stop.set()
    assert outcome.state == "SUCCEEDED", outcome.message
    parent, trials = study_runs(outcome.run_id)
    states = {float(t.data.params["shift"]): (t.data.tags["mmp.trial.state"], t.info.status) for t in trials}
    assert states == {0.3: ("complete", "FINISHED"), 0.4: ("complete", "FINISHED"), 9.0: ("pruned", "KILLED")}
    pruned = next(t for t in trials if t.data.tags["mmp.trial.state"] == "pruned")
    assert "pruned at step 0" in pruned.data.tags["mmp.outcome"]
    assert "1 pruned" in outcome.message
    assert no_process_from(study_repo.marks)


def test_parallel_2_runs_two_trials_at_once(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "random", "Max_Runs": 2, "Parallel": 2, "Seed": 1,
                       "Ranges": {"shift": {"Min": 0.0, "Max": 1.0}}}, {"together": 2})
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "SUCCEEDED", outcome.message
    _, trials = study_runs(outcome.run_id)
    assert len(trials) == 2
    assert [t.data.metrics["overlap"] for t in trials] == [1.0, 1.0]  # each saw the other start first
    for t in trials:
        assert 0.0 <= float(t.data.params["shift"]) <= 1.0


def test_a_failing_trial_is_recorded_and_the_study_goes_on(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"opt": {"Values": ["crash", "a"]}}})
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "SUCCEEDED", outcome.message
    _, trials = study_runs(outcome.run_id)
    assert [(t.data.params["opt"], t.data.tags["mmp.trial.state"]) for t in trials] == [
        ("crash", "failed"), ("a", "complete")]
    assert "1 complete, 1 failed" in outcome.message


def test_failures_past_max_failures_end_the_study(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Max_Failures": 1,
                       "Ranges": {"opt": {"Values": ["crash", "a", "b"]}}})
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "FAILED"
    assert "1 trials failed (Max_Failures 1)" in outcome.message
    parent, trials = study_runs(outcome.run_id)
    assert len(trials) == 1 and parent.info.status == "FAILED"


def test_cancelling_the_parent_stops_every_trial(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "random", "Max_Runs": 6, "Parallel": 2,
                       "Ranges": {"shift": {"Min": 0.0, "Max": 1.0}}}, {"gate": str(study_repo.gate)})
    result = {}
    runner = threading.Thread(target=lambda: result.update(outcome=run_trigger(local_trigger(repo, head(repo)))))
    runner.start()
    try:
        wait_until(lambda: len(marked(study_repo.marks)) >= 2, what="two trials running")
        parent_id = json.loads(subprocess.run([sys.executable, "-m", "mmp", "runs", "--json"], capture_output=True,
                                              text=True, check=True).stdout)
        parent_id = next(r["run_id"] for r in parent_id if r["state"] == "RUNNING" and r["run_id"] not in
                         {t for t in marked(study_repo.marks)})
        out = subprocess.run([sys.executable, "-m", "mmp", "cancel", parent_id[:12]], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "cancel sent to study" in out.stdout
    finally:
        runner.join(timeout=240)
        if runner.is_alive():  # never leave trials behind: open every gate
            for run_id in marked(study_repo.marks):
                (study_repo.gate / run_id).touch()
            runner.join(timeout=120)
    outcome = result["outcome"]
    assert outcome.state == "CANCELLED" and outcome.message.startswith("cancelled after")
    parent, trials = study_runs(outcome.run_id)
    assert parent.info.status == "KILLED"
    assert len(trials) == 2 and {t.data.tags["mmp.trial.state"] for t in trials} == {"cancelled"}
    assert {t.info.status for t in trials} == {"KILLED"}
    assert no_process_from(study_repo.marks)


def test_a_worker_killed_mid_study_resumes_without_running_a_trial_twice(study_repo, tmp_path):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"units": {"Values": [1, 2]}}},
                      {"gate": str(study_repo.gate)})
    sha = head(repo)
    JobQueue().submit(Job(repository=repo.name, clone_url=str(repo), before="0" * 40, after=sha,
                          ref="refs/heads/main", delivery_id="study-delivery-1", trigger_files=["experiment.json"]),
                      "digest-1")
    logs = tmp_path / "worker.log"

    def start_worker():
        with open(logs, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "mmp.pipeline.worker", "--poll", "0.2"], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    first = start_worker()
    second = None
    try:
        # Trial 0 (n=1) finishes; trial 1 (n=2) is caught holding at its gate when the worker dies.
        def release(n):
            for run_id, mark in marked(study_repo.marks).items():
                if mark["units"] == n:
                    (study_repo.gate / run_id).touch()
        wait_until(lambda: release(1) or any(m["units"] == 2 for m in marked(study_repo.marks).values()),
                   what="trial 1 to start")
        interrupted = next(r for r, m in marked(study_repo.marks).items() if m["units"] == 2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)

        second = start_worker()
        wait_until(lambda: len(marked(study_repo.marks)) == 3, what="the replacement trial to start")
        replacement = next(r for r in marked(study_repo.marks) if r != interrupted and marked(study_repo.marks)[r]
                           ["units"] == 2)
        (study_repo.gate / replacement).touch()
        wait_until(lambda: (JobQueue().get("study-delivery-1").state in ("done", "failed")), what="the study to end")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    job = JobQueue().get("study-delivery-1")
    assert job.state == "done", (job.message, logs.read_text()[-3000:])
    parent_id = job.run_id
    parent, trials = study_runs(parent_id)
    assert [(t.data.params["units"], t.data.tags["mmp.trial.state"]) for t in trials] == [
        ("1", "complete"), ("2", "failed"), ("2", "complete")]
    assert trials[1].info.run_id == interrupted and "interrupted" in trials[1].data.tags["mmp.outcome"]
    assert len(marked(study_repo.marks)) == 3  # three runs, each started once (O_EXCL marks)
    assert "2/2 trials" in parent.data.tags["mmp.outcome"]
    assert no_process_from(study_repo.marks)


# -- a study always ends: a final parent run, commit status and notification (issue 20.2) ----------
def notification(key: str) -> dict | None:
    path = config.mmp_home() / "notifications" / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def delivery_runs(delivery: str):
    """Every MLflow run this delivery made, parents, trials and runs no trial recorded alike."""
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client().search_experiments(view_type=ViewType.ALL)]
    return client().search_runs(ids, f"tags.`mmp.delivery_id` = '{delivery}'", run_view_type=ViewType.ALL) \
        if ids else []


def assert_study_ended(repo: Path, delivery: str, outcome_state: str | None, commit_states: tuple[str, ...]):
    """Nothing of the study is left RUNNING or pending, and the team heard of its end."""
    from mmp.tuning import control

    assert control.state(delivery) != "running"  # `mmp cancel` would say "cancel sent" to nobody
    assert [r.info.run_id for r in delivery_runs(delivery) if r.info.status == "RUNNING"] == []
    history = LocalStatusReporter().history(repo.name, head(repo))
    assert history and history[-1]["state"] in commit_states, history[-1:]
    parents = [r for r in delivery_runs(delivery) if r.data.tags.get("mmp.study") == "true"]
    note = notification(parents[0].info.run_id if parents else delivery)
    assert note is not None and (outcome_state is None or note["state"] == outcome_state), note
    if parents:  # `mmp cancel` tells the truth instead of "cancel sent"
        from typer.testing import CliRunner

        from mmp.cli import app

        cancel = CliRunner().invoke(app, ["cancel", parents[0].info.run_id])
        assert cancel.exit_code == 1 and "is already" in cancel.output, cancel.output


def test_a_nan_objective_fails_that_trial_and_the_study_goes_on(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"opt": {"Values": ["nan", "a"]}}})
    outcome = run_trigger(local_trigger(repo, head(repo), delivery_id="nan-study"))
    assert outcome.state == "SUCCEEDED", outcome.message
    _, trials = study_runs(outcome.run_id)
    assert [(t.data.params["opt"], t.data.tags["mmp.trial.state"], t.info.status) for t in trials] == [
        ("nan", "failed", "FAILED"), ("a", "complete", "FINISHED")]
    assert "score = NaN" in trials[0].data.tags["mmp.outcome"]
    assert "1 complete, 1 failed" in outcome.message
    assert_study_ended(repo, "nan-study", "SUCCEEDED", ("success",))


def test_an_objective_logged_at_step_minus_1_with_early_stopping_is_skipped(study_repo):
    # train.py logs steps -1 and 0, then holds at its gate until the study has reported step 0 to Optuna.
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Early_Stopping": True,
                       "Ranges": {"units": {"Values": [1, 2]}}}, {"gate": str(study_repo.gate), "first-step": -1})
    from mmp.tuning.study import storage_url

    def release_reported():
        try:
            study = optuna.load_study(study_name="mmp-minus-one", storage=storage_url())
        except KeyError:
            return False
        for t in study.get_trials(deepcopy=False):
            if 0 in t.intermediate_values and "mmp.run_id" in t.user_attrs:
                (study_repo.gate / t.user_attrs["mmp.run_id"]).touch()
        return False

    result = {}
    runner = threading.Thread(target=lambda: result.update(
        outcome=run_trigger(local_trigger(repo, head(repo), delivery_id="minus-one"))))
    runner.start()
    try:
        wait_until(lambda: release_reported() or not runner.is_alive(), what="the study to end")
    finally:
        for run_id in marked(study_repo.marks):  # never leave a trial holding at its gate
            (study_repo.gate / run_id).touch()
        runner.join(timeout=240)
    outcome = result["outcome"]
    assert outcome.state == "SUCCEEDED", outcome.message
    study = optuna.load_study(study_name="mmp-minus-one", storage=storage_url())
    assert [sorted(t.intermediate_values) for t in study.trials] == [[0], [0]]  # step -1 never reached Optuna
    assert_study_ended(repo, "minus-one", "SUCCEEDED", ("success",))


@pytest.mark.parametrize("bounds", [{"Min": -1e308, "Max": 1e308}, {"Min": 0, "Max": "1e309"}])
def test_a_range_that_overflows_ends_the_study_with_a_final_status(study_repo, bounds):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "random", "Max_Runs": 2,
                       "Ranges": {"shift": bounds}})
    outcome = run_trigger(local_trigger(repo, head(repo), delivery_id="overflow"))
    assert outcome.state == "INVALID", outcome.message  # refused before any trial (mmp.contract.tuning._bounds_problem)
    assert "Ranges" in outcome.message or "shift" in outcome.message, outcome.message
    assert marked(study_repo.marks) == {}  # no trial ran
    assert_study_ended(repo, "overflow", outcome.state, ("failure", "error"))


def study_with_a_file_made_immutable(study_repo, repo: Path, delivery: str, path: Path, started, release):
    """Run the study in a thread; once `started()` holds, make `path` immutable (chattr +i: writes fail)
    and call `release()`. On the way out, whatever happened, the file is writable and every gate open."""
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        outcome=run_trigger(local_trigger(repo, head(repo), delivery_id=delivery))))
    runner.start()
    locked = False
    try:
        wait_until(lambda: started() or not runner.is_alive(), what="the trials to start")
        subprocess.run(["chattr", "+i", str(path)], check=True)
        locked = True
        release()
        runner.join(timeout=240)
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        for run_id in marked(study_repo.marks):
            (study_repo.gate / run_id).touch()
        runner.join(timeout=240)
    return result["outcome"]


def test_an_mlflow_store_fault_mid_study_still_ends_it(study_repo):
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"opt": {"Values": ["a", "b"]}}},
                      {"gate": str(study_repo.gate)})
    db = Path(config.tracking_uri().removeprefix("sqlite:///"))  # the MLflow store refuses every write

    def release():
        for run_id in marked(study_repo.marks):
            (study_repo.gate / run_id).touch()

    outcome = study_with_a_file_made_immutable(study_repo, repo, "store-fault", db,
                                               lambda: marked(study_repo.marks), release)
    assert outcome.state in ("SUCCEEDED", "FAILED"), outcome.message
    assert any("MLflow not updated" in p for p in outcome.problems), outcome.problems
    note = notification(outcome.run_id)
    assert note is not None and note["state"] == outcome.state
    history = LocalStatusReporter().history(repo.name, head(repo))
    assert history[-1]["state"] in ("success", "failure")
    from mmp.tuning import control

    assert control.state("store-fault") != "running"
    assert no_process_from(study_repo.marks)


# -- kill -9 at any point, and `mmp up` dying, resume the study (issue 20.3, 20.4) -------------------
GRID_1_2 = {"Objective_Metric": "score", "Strategy": "grid", "Ranges": {"units": {"Values": [1, 2]}}}


def submit_study(repo: Path, delivery: str) -> None:
    JobQueue().submit(Job(repository=repo.name, clone_url=str(repo), before="0" * 40, after=head(repo),
                          ref="refs/heads/main", delivery_id=delivery, trigger_files=["experiment.json"]), delivery)


def assert_each_point_ran_once(repo: Path, delivery: str, points: list[str], interrupted: int) -> None:
    """One parent, FINISHED; exactly one complete trial per grid point; only interrupted trials failed;
    no run of the delivery left RUNNING; the commit's last status is success, and the team was told."""
    job = JobQueue().get(delivery)
    assert job.state == "done", job.message
    (parent,) = [r for r in delivery_runs(delivery) if r.data.tags.get("mmp.study") == "true"]
    _, trials = study_runs(parent.info.run_id)
    assert sorted(t.data.params["units"] for t in trials if t.data.tags["mmp.trial.state"] == "complete") == points
    failed = [t for t in trials if t.data.tags["mmp.trial.state"] != "complete"]
    assert len(failed) == interrupted and all("interrupted" in t.data.tags["mmp.outcome"] for t in failed)
    assert parent.info.status == "FINISHED" and f"{len(points)}/{len(points)} trials" in parent.data.tags["mmp.outcome"]
    assert_study_ended(repo, delivery, "SUCCEEDED", ("success",))


@pytest.mark.parametrize("point, interrupted, launched", [
    ("after-create-run", 0, 2),         # the parent run exists, the study does not know it yet
    ("study-trial-run-created", 1, 2),  # a trial's run exists (never launched), its Optuna trial does not know it
    ("study-trial-recorded", 1, 3),     # a trial's job is running
    ("study-trial-told", 0, 2),         # Optuna has a trial's result, MLflow still says RUNNING
    ("study-concluded", 0, 2),          # the study has reported its end, its state says running
])
def test_a_worker_killed_at_each_point_resumes_the_study_running_each_point_once(study_repo, start_worker, point,
                                                                                  interrupted, launched):
    repo = study_repo(GRID_1_2)
    submit_study(repo, "killed")
    crashed = start_worker("--once", "--poll", "0.2", MMP_CRASH_AT=point)
    assert crashed.wait(timeout=400) == -signal.SIGKILL, start_worker.log.read_text()[-3000:]
    assert JobQueue().get("killed").state == "running"
    resumed = start_worker("--once", "--poll", "0.2")
    assert resumed.wait(timeout=400) == 0, start_worker.log.read_text()[-3000:]
    assert_each_point_ran_once(repo, "killed", ["1", "2"], interrupted)
    assert len(marked(study_repo.marks)) == launched  # train.py started once per run (O_EXCL marks)
    assert no_process_from(study_repo.marks)


def test_a_second_crash_while_replacing_an_interrupted_trial_loses_no_point(study_repo, start_worker):
    repo = study_repo(GRID_1_2)
    submit_study(repo, "twice")
    for point in ("study-trial-recorded", "study-replacement-enqueued"):
        crashed = start_worker("--once", "--poll", "0.2", MMP_CRASH_AT=point)
        assert crashed.wait(timeout=400) == -signal.SIGKILL, start_worker.log.read_text()[-3000:]
    resumed = start_worker("--once", "--poll", "0.2")
    assert resumed.wait(timeout=400) == 0, start_worker.log.read_text()[-3000:]
    assert_each_point_ran_once(repo, "twice", ["1", "2"], interrupted=1)
    assert len(marked(study_repo.marks)) == 3
    assert no_process_from(study_repo.marks)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_mmp_up_dying_mid_study_leaves_it_to_resume(study_repo, start_worker, tmp_path, how):
    """kill -9 of `mmp up` (its guard SIGTERMs the worker) or Ctrl-C: the trial stops, the study resumes."""
    from mmp.tuning import control

    repo = study_repo(GRID_1_2, {"gate": str(study_repo.gate)})
    submit_study(repo, "up-died")
    with open(tmp_path / "up.log", "ab") as out:
        up = subprocess.Popen([sys.executable, "-m", "mmp", "up", "--no-ui", "--port", "0"], stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: marked(study_repo.marks), what="trial 0 to start")
        guard = psutil.Process(json.loads(config.local_stack_file().read_text())["children"]["worker"]["pid"])
        if how == signal.SIGINT:
            os.killpg(up.pid, how)  # a terminal's Ctrl-C: the foreground process group
        else:
            os.kill(up.pid, how)
        up.wait(timeout=120)
        wait_until(lambda: not guard.is_running() or guard.status() == psutil.STATUS_ZOMBIE,
                   what="the worker to stop")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=60)
    assert JobQueue().get("up-died").state == "running" and control.state("up-died") == "running"
    assert no_process_from(study_repo.marks)  # the trial's job was stopped, not left behind
    if how == signal.SIGINT:  # `mmp up` says the study is not cancelled, and how it resumes
        said = (tmp_path / "up.log").read_text()
        assert "study of delivery up-died (parent run " in said and "stopped after 0/2 trials done" in said, said[-3000:]
        assert "it resumes when `mmp up` starts again" in said

    resumed = start_worker("--once", "--poll", "0.2")
    wait_until(lambda: [(study_repo.gate / r).touch() for r in marked(study_repo.marks)] and False
               or resumed.poll() is not None, seconds=400, what="the resumed study to end")
    assert resumed.returncode == 0, start_worker.log.read_text()[-3000:]
    assert_each_point_ran_once(repo, "up-died", ["1", "2"], interrupted=1)
    assert len(marked(study_repo.marks)) == 3


def test_a_study_storage_fault_stops_the_sibling_trials_and_ends_the_study(study_repo):
    """Two trials run; Optuna's storage refuses writes; the first trial's end cannot be recorded. The study
    stops its sibling (no process left), ends every run and itself, reports and notifies."""
    from mmp.tuning.study import STUDIES_DB

    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Parallel": 2,
                       "Ranges": {"opt": {"Values": ["a", "b"]}}}, {"gate": str(study_repo.gate)})

    def release_the_first():  # only the first may finish; its sibling holds at its gate
        first = next(r for r, m in marked(study_repo.marks).items() if m["opt"] == "a")
        (study_repo.gate / first).touch()

    outcome = study_with_a_file_made_immutable(study_repo, repo, "optuna-fault", config.mmp_home() / STUDIES_DB,
                                               lambda: len(marked(study_repo.marks)) == 2, release_the_first)
    assert outcome.state == "FAILED" and "the study stopped on an error" in outcome.message, outcome.message
    assert no_process_from(study_repo.marks)  # the sibling was stopped, not left to run
    _, trials = study_runs(outcome.run_id)
    assert {t.data.params["opt"]: t.info.status for t in trials} == {"a": "FINISHED", "b": "KILLED"}
    assert_study_ended(repo, "optuna-fault", "FAILED", ("failure",))


PER_BATCH_TRAIN = r'''
import argparse, os, time
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset"):
    p.add_argument(flag)
p.add_argument("--shift", type=float)
a = p.parse_args()
client, run_id, now = MlflowClient(), os.environ["MLFLOW_RUN_ID"], int(time.time() * 1000)
for start in range(0, 20000, 1000):  # 20 000 per-batch values of the objective
    client.log_batch(run_id, metrics=[Metric("score", -abs(a.shift - 0.3), now + s, s)
                                      for s in range(start, start + 1000)])
deadline = time.time() + 300
while a.shift > 5 and time.time() < deadline:  # the bad trial holds until the pruner stops it
    time.sleep(0.2)
'''


def test_early_stopping_on_a_per_batch_metric_reports_only_checkpoints(make_repo, digits):
    """Issue 20, finding 11: 20 000 logged steps make 290 Optuna reports per trial (0-99, then two
    significant digits), not 20 000 transactions, and the pruner still stops the bad trial."""
    from mmp.tuning.study import storage_url, study_name

    repo = make_repo(name="per-batch", files={"train.py": PER_BATCH_TRAIN}, drop=("requirements.txt",),
                     experiment={**LOCAL, "Tuning": {"Objective_Metric": "score", "Strategy": "grid",
                                                     "Early_Stopping": True,
                                                     "Ranges": {"shift": {"Values": [0.3, 0.4, 9.0]}}}})
    trigger = local_trigger(repo, head(repo))
    outcome = run_trigger(trigger)
    assert outcome.state == "SUCCEEDED", outcome.message
    _, trials = study_runs(outcome.run_id)
    assert [t.data.tags["mmp.trial.state"] for t in trials] == ["complete", "complete", "pruned"]
    assert "is worse than the median" in trials[2].data.tags["mmp.outcome"]
    study = optuna.load_study(study_name=study_name(trigger), storage=storage_url())
    reported = [sorted(t.intermediate_values) for t in study.trials]
    expected = list(range(100)) + list(range(100, 1000, 10)) + list(range(1000, 10000, 100)) + list(
        range(10000, 20000, 1000))
    assert reported[0] == reported[1] == expected and len(expected) == 290
    assert set(reported[2]) <= set(expected)  # pruned part-way: only checkpoints


# -- Ctrl-C of `mmp run` leaves the study to resume; running it again resumes it (issue 24, gap 5) ----------
def start_mmp_run(repo: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mmp run` as a terminal starts it: its own process group, which a Ctrl-C signals whole. With
    faulthandler on, a SIGABRT writes every thread's stack into its log (`stopped_by_ctrl_c`)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mmp", "run", "--repo", str(repo), *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                                     "PYTHONFAULTHANDLER": "1", **(env or {})})


def stopped_by_ctrl_c(proc: subprocess.Popen, log: Path) -> str:
    """Wait for `mmp run` to end after a Ctrl-C and return its log; if it still runs after 180 s, fail
    with the log and the stack of each of its threads."""
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler (start_mmp_run) dumps its threads into the log
        proc.wait(timeout=60)
        pytest.fail(f"mmp run still runs 180 s after Ctrl-C:\n{log.read_text()[-6000:]}")
    said = log.read_text()
    assert code == 130, said[-3000:]
    return said


def stop_group(proc: subprocess.Popen) -> None:
    """Whatever a failed test left of an `mmp run`: its whole group, and trials in sessions of their own."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def test_ctrl_c_of_mmp_run_says_what_happened_and_a_second_run_resumes_the_study(study_repo, tmp_path):
    repo = study_repo(GRID_1_2, {"gate": str(study_repo.gate)})
    first = start_mmp_run(repo, tmp_path / "first.log")
    try:
        wait_until(lambda: marked(study_repo.marks), what="trial 0 to start")
        os.killpg(first.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
        said = stopped_by_ctrl_c(first, tmp_path / "first.log")
    finally:
        stop_group(first)
    assert "interrupted: study" in said and "stopped after 0/2 trials done (none finished)" in said, said[-3000:]
    assert f"`mmp run` again on commit {head(repo)[:7]} resumes it (or `mmp run --resume`)" in said
    assert "`mmp run --fresh` starts over" in said
    assert no_process_from(study_repo.marks)  # the trial's job was stopped, not left behind
    (parent,) = client().search_runs([client().get_experiment_by_name(repo.name).experiment_id],
                                     filter_string="tags.`mmp.study` = 'true'")
    assert parent.info.status == "RUNNING"  # not ended as cancelled: left to resume
    from mmp.tuning.study import ATTR_ELAPSED, make_storage

    (summary,) = optuna.get_all_study_summaries(make_storage())
    ran = summary.user_attrs[ATTR_ELAPSED]  # Max_Runtime will count the time it ran, not the time it is stopped
    assert 0 < ran < time.time() - parent.info.start_time / 1000 + 1

    second = start_mmp_run(repo, tmp_path / "second.log")
    try:
        wait_until(lambda: [(study_repo.gate / r).touch() for r in marked(study_repo.marks)] and False
                   or second.poll() is not None, seconds=400, what="the resumed study to end")
    finally:
        stop_group(second)
    said = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, said[-3000:]
    assert f"resuming the interrupted study of commit {head(repo)[:7]} (parent run {parent.info.run_id}): " \
           "0/2 trials done" in said, said[-3000:]
    parent, trials = study_runs(parent.info.run_id)  # the same parent run, now finished
    assert parent.info.status == "FINISHED" and "2/2 trials" in parent.data.tags["mmp.outcome"]
    assert sorted(t.data.params["units"] for t in trials if t.data.tags["mmp.trial.state"] == "complete") == ["1", "2"]
    assert [t.data.tags["mmp.trial.state"] for t in trials].count("failed") == 1  # the interrupted one, replaced
    assert len(marked(study_repo.marks)) == 3  # train.py ran once per trial run, the replaced one included

    out = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "--resume"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "no interrupted study of commit" in out.stderr, out.stderr


def test_a_grid_of_a_conditional_stepped_float_range_runs_each_point_once(study_repo):
    """Issue 24: `shift` (0.1 to 0.3 in steps of 0.1) is tuned only for opt a; opt b's trial has no --shift."""
    repo = study_repo({"Objective_Metric": "score", "Strategy": "grid", "Ranges": {
        "opt": {"Values": ["a", "b"]}, "shift": {"Min": 0.1, "Max": 0.3, "Step": 0.1, "When": {"opt": "a"}}}})
    outcome = run_trigger(local_trigger(repo, head(repo)))
    assert outcome.state == "SUCCEEDED", outcome.message
    parent, trials = study_runs(outcome.run_id)
    assert "4/4 trials (4 complete)" in parent.data.tags["mmp.outcome"]
    assert [(t.data.params["opt"], t.data.params.get("shift")) for t in trials] == [
        ("a", "0.1"), ("a", "0.2"), ("a", "0.3"), ("b", None)]
    got = sorted((m["opt"], m["shift"]) for m in marked(study_repo.marks).values())
    assert got == [("a", 0.1), ("a", 0.2), ("a", 0.3), ("b", 0.0)]  # b: train.py's own default, no --shift
    assert json.loads(parent.data.tags["mmp.tuning.best_params"]) == {"opt": "b"}  # 11 - 0.3 beats a's best, 1


def test_ctrl_c_as_a_trial_is_launched_stops_mmp_run_and_the_study_resumes(study_repo, tmp_path):
    """The Ctrl-C lands where the trial is counted as running but no thread follows it yet: held until the
    loop's next turn (mmp.system.interrupts), it stops the trial that then runs instead of waiting forever."""
    repo = study_repo(GRID_1_2)
    first = start_mmp_run(repo, tmp_path / "first.log", env={"MMP_INTERRUPT_AT": "study-trial-registered"})
    try:
        said = stopped_by_ctrl_c(first, tmp_path / "first.log")
    finally:
        stop_group(first)
    assert "interrupted: study" in said and "stopped after 0/2 trials done (none finished)" in said, said[-3000:]
    wait_until(lambda: no_process_from(study_repo.marks), seconds=30, what="the trial's job to be gone")

    second = start_mmp_run(repo, tmp_path / "second.log")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        stop_group(second)
    said = (tmp_path / "second.log").read_text()
    assert f"resuming the interrupted study of commit {head(repo)[:7]}" in said, said[-3000:]
    (parent,) = client().search_runs([client().get_experiment_by_name(repo.name).experiment_id],
                                     filter_string="tags.`mmp.study` = 'true'")
    parent, trials = study_runs(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "2/2 trials" in parent.data.tags["mmp.outcome"]
    assert sorted(t.data.params["units"] for t in trials if t.data.tags["mmp.trial.state"] == "complete") == ["1", "2"]
