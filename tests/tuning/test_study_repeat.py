"""Issue 24, gaps 1 and 2: a Seed repeats a study, and pruning happens at the step where Optuna's would.

Real studies on the local platform: real git, real horovodrun, real MLflow, Optuna's SQLite storage.
train.py here does what examples/fashion/train.py does for a study: after logging each step it
waits for the study's verdict (the run's `mmp.trial.judged` tag) and stops where it was pruned.
Its values depend on its hyperparameters alone; its timing is random on purpose (a random sleep
per step), so two studies differ in when each trial reports and ends, never in what it reports.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.pipeline.runs import local_trigger, run_trigger
from mmp.tuning.study import storage_url, study_name

pytestmark = [pytest.mark.horovod, pytest.mark.timeout(900)]

TRAIN = r'''
import argparse, json, os, random, sys, time
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset", "--marks"):
    p.add_argument(flag, default="")
p.add_argument("--x", type=float, default=0.5)
p.add_argument("--case", default="curve")
p.add_argument("--steps", type=int, default=4)
a = p.parse_args()
run_id = os.environ["MLFLOW_RUN_ID"]
mark = os.path.join(a.marks, run_id)
import psutil
with open(mark, "w") as fh:  # its ancestors: the job (supervisor, horovodrun) it runs in
    json.dump({"pid": os.getpid(), "case": a.case, "job": [q.pid for q in psutil.Process().parents()]}, fh)
import mlflow
from mlflow import MlflowClient

def value(step):
    if a.case in ("flat", "late"):  # level: good at first, overtaken at step 2 by the curves
        return 1.0
    if a.case == "slower":
        return 0.95 * step
    if a.case == "curve":
        return step * (1.0 - abs(a.x - 0.3))
    return 2 * step - 10 * abs(a.x - 0.3)  # "pair": a worse x is worse at every step

client = MlflowClient()
with mlflow.start_run() as run:
    waits = run.data.tags.get("mmp.trial.pruning") == "wait" and a.case != "late"
    for step in range(a.steps):
        time.sleep(random.random() * 0.4)  # when a step lands differs between runs; its value does not
        mlflow.log_metric("score", value(step), step=step)
        while waits:  # the study's verdict on this step (examples/fashion/train.py: StudyTrial.pruned)
            judged = client.get_run(run_id).data.tags.get("mmp.trial.judged", "")
            if judged.startswith("pruned:"):
                sys.exit(f"train.py: pruned at step {step}")
            if judged and int(judged) >= step:
                break
            time.sleep(0.05)
os.rename(mark, mark + ".done")
'''

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}


@pytest.fixture
def repeat_repo(make_repo, tmp_path, digits):
    marks = tmp_path / "marks"
    marks.mkdir()

    def _make(tuning: dict, hyperparameters: dict | None = None) -> Path:
        experiment = {**LOCAL, "Hyperparameters": {"marks": str(marks), **(hyperparameters or {})}, "Tuning": tuning}
        return make_repo(name="repeat", experiment=experiment, files={"train.py": TRAIN}, drop=("requirements.txt",))

    _make.marks = marks
    return _make


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def trial_runs(parent_id: str) -> dict[int, object]:
    client = MlflowClient(config.tracking_uri())
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {int(r.data.tags["mmp.trial.number"]): r for r in children}


def logged_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(config.tracking_uri()).get_metric_history(run_id, "score"))


def no_process_left(marks: Path) -> bool:
    pids = [json.loads(p.read_text())["pid"] for p in marks.iterdir()]
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def record(repo: Path, trigger) -> tuple[list[tuple], object]:
    """Run a study; what it did, trial by trial in Optuna's storage: number, params, state, the steps reported
    and their values, the final value."""
    outcome = run_trigger(trigger)
    assert outcome.state == "SUCCEEDED", outcome.message
    study = optuna.load_study(study_name=study_name(trigger), storage=storage_url())
    trials = [(t.number, t.params, t.state.name, sorted(t.intermediate_values.items()), t.value)
              for t in study.get_trials(deepcopy=False)]
    return trials, outcome


def test_two_studies_with_the_same_seed_make_the_same_trials_prunes_and_best(repeat_repo):
    """Bayesian (TPE), Parallel 2, Early_Stopping, Seed: trials end in a different order each time (random
    sleeps), yet both studies suggest the same values, prune the same trials at the same steps, pick the
    same best. The second study runs in the same process after the first: per-trial seeds, not a sampler
    that was seeded once."""
    tuning = {"Objective_Metric": "score", "Strategy": "bayesian", "Max_Runs": 8, "Parallel": 2, "Seed": 11,
              "Early_Stopping": True,
              "Ranges": {"x": {"Min": 0.0, "Max": 1.0}, "case": {"Values": ["curve", "pair"]}}}
    repo = repeat_repo(tuning)
    first, first_outcome = record(repo, local_trigger(repo, head(repo), delivery_id="seed-first"))
    second, second_outcome = record(repo, local_trigger(repo, head(repo), delivery_id="seed-second"))
    assert first == second
    states = [state for _, _, state, _, _ in first]
    assert len(first) == 8 and "PRUNED" in states and "COMPLETE" in states, states
    assert len({json.dumps(params, sort_keys=True) for _, params, _, _, _ in first}) == 8  # eight distinct draws

    for outcome in (first_outcome, second_outcome):
        parent = MlflowClient(config.tracking_uri()).get_run(outcome.run_id)
        assert parent.data.tags["mmp.tuning.best_params"] == json.dumps(
            max((t for t in first if t[2] == "COMPLETE"), key=lambda t: t[4])[1])
        runs = trial_runs(outcome.run_id)
        for number, _, state, reported, _ in first:
            run = runs[number]
            assert run.data.tags["mmp.trial.state"] == state.lower()
            if state == "PRUNED":  # train.py stopped at the pruned step: nothing logged after it
                assert logged_steps(run.info.run_id) == [step for step, _ in reported]
                assert run.info.status == "KILLED"
    assert first_outcome.message == second_outcome.message
    assert no_process_left(repeat_repo.marks)


def optunas_own_prune_step(completed: list[list[float]], candidate: list[float]) -> int | None:
    """Where Optuna's own loop, with the pruner MMP uses, prunes `candidate` after the `completed` trials."""
    from mmp.tuning.study import PRUNER_STARTUP_TRIALS

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0))
    for values in completed:
        trial = study.ask()
        for step, value in enumerate(values):
            trial.report(value, step)
        study.tell(trial, values[-1])
    trial = study.ask()
    for step, value in enumerate(candidate):
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def test_a_pruned_trial_stops_at_optunas_step_and_a_finished_one_is_never_pruned(repeat_repo, monkeypatch):
    """Grid in order: two learning curves complete, then two level trials that the curves overtake at step 2.
    `flat` waits for each verdict: pruned at step 2, as Optuna's own loop prunes it, and it logs nothing after.
    `late` does not wait, and the study reads its steps only once its process has ended (a poll that
    happened to come late): it finished, so it is complete, never pruned."""
    from mmp.tuning import study as study_module

    read = study_module.IntermediateValues.read

    def alive(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    ours = {psutil.Process().pid, *(q.pid for q in psutil.Process().parents())}

    def late_read(self):
        """For `late`, a poll that comes only once its whole job (train.py, horovodrun, supervisor) has exited."""
        mark = repeat_repo.marks / self.run_id
        if mark.exists() and json.loads(mark.read_text())["case"] == "late":
            job = set(json.loads(mark.read_text())["job"]) - ours
            deadline = time.time() + 240
            while any(alive(pid) for pid in job) and time.time() < deadline:
                time.sleep(0.1)
        return read(self)

    monkeypatch.setattr(study_module.IntermediateValues, "read", late_read)
    repo = repeat_repo({"Objective_Metric": "score", "Strategy": "grid", "Early_Stopping": True,
                        "Ranges": {"case": {"Values": ["curve", "slower", "flat", "late"]}}}, {"x": 0.3})
    trials, outcome = record(repo, local_trigger(repo, head(repo), delivery_id="prune-step"))
    curve, slower, level = [0.0, 1.0, 2.0, 3.0], [0.0, 0.95, 1.9, 2.85], [1.0] * 4
    expected = optunas_own_prune_step([curve, slower], level)
    assert expected == 2
    by_case = {params["case"]: (state, reported) for _, params, state, reported, _ in trials}
    assert by_case["curve"] == ("COMPLETE", list(enumerate(curve)))
    assert by_case["flat"] == ("PRUNED", [(0, 1.0), (1, 1.0), (2, 1.0)])  # reported up to Optuna's step, no further
    assert by_case["late"] == ("COMPLETE", list(enumerate(level)))

    runs = {r.data.params["case"]: r for r in trial_runs(outcome.run_id).values()}
    flat, late = runs["flat"], runs["late"]
    assert flat.data.tags["mmp.trial.state"] == "pruned" and flat.info.status == "KILLED"
    assert "pruned at step 2" in flat.data.tags["mmp.outcome"]
    assert logged_steps(flat.info.run_id) == [0, 1, 2]  # train.py stopped at the pruned step
    assert late.data.tags["mmp.trial.state"] == "complete" and late.info.status == "FINISHED"
    assert logged_steps(late.info.run_id) == [0, 1, 2, 3]
    assert (repeat_repo.marks / f"{late.info.run_id}.done").exists()  # it ran to its end
    assert "3 complete, 1 pruned" in outcome.message
    assert no_process_left(repeat_repo.marks)
