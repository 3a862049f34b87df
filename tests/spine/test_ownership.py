"""An experiment belongs to the repository that created it (issue 11.10): the pipeline refuses
runs from any other repository before anything is launched, unless the stack shares it."""

from __future__ import annotations

import json
import subprocess

import pytest

from mmp.backends import JobState
from mmp.pipeline.reporting import LocalStatusReporter
from mmp.pipeline.runs import local_trigger
from mmp.pipeline.runner import Pipeline
from mmp.pipeline.store import RunStore
from mmp.tracking.client import RunTracker

QUICK_TRAIN = "print('quick run', flush=True)\n"
LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local",
         "Experiment_Name": "team-a-model"}


def head(repo) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def intruder_trigger(make_repo, name="intruder"):
    repo = make_repo(name=name, experiment=LOCAL, files={"train.py": QUICK_TRAIN})
    return local_trigger(repo, head(repo))


@pytest.fixture
def owned(mmp_home):
    """Experiment `team-a-model`, made by the pipeline's tracker for repository team-a."""
    tracker = RunTracker()
    run_id = tracker.start("team-a-model", run_name="a-1", tags={"mlflow.source.name": "team-a"}, params={},
                           owner="team-a")
    tracker.finish(run_id, JobState.SUCCEEDED)
    return tracker


def test_the_creating_repository_is_recorded_as_owner(owned):
    experiment_id, tags = owned.find_experiment("team-a-model")
    assert tags["mmp.owner"] == "team-a"


def test_another_repository_is_refused_before_any_run(owned, make_repo, digits, mmp_home):
    trigger = intruder_trigger(make_repo)
    outcome = Pipeline(store=RunStore()).run(trigger)
    assert outcome.state == "INVALID" and outcome.run_id is None
    assert f"Experiment_Name: experiment 'team-a-model' belongs to repository 'team-a', not {trigger.identity!r}" \
        in outcome.message
    (status,) = LocalStatusReporter().history("intruder", trigger.commit)
    assert status["state"] == "failure" and "belongs to repository 'team-a'" in status["description"]
    assert len(owned.client.search_runs([owned.find_experiment("team-a-model")[0]])) == 1  # nothing written
    assert RunStore().list() == []
    with pytest.raises(PermissionError, match="belongs to repository 'team-a'"):  # and the tracker itself refuses
        owned.start("team-a-model", run_name="x", tags={}, params={}, owner="intruder")


@pytest.mark.horovod
def test_a_shared_experiment_takes_the_other_repositorys_runs(owned, make_repo, digits, mmp_home, monkeypatch):
    trigger = intruder_trigger(make_repo)
    monkeypatch.setenv("MMP_SHARED_EXPERIMENTS", json.dumps({"team-a-model": [trigger.identity]}))  # by path
    outcome = Pipeline(store=RunStore()).run(trigger)
    assert outcome.state == "SUCCEEDED", outcome.message
    assert owned.find_experiment("team-a-model")[1]["mmp.owner"] == "team-a"  # sharing does not move ownership


def test_an_untagged_experiment_is_claimed_only_if_no_other_repository_used_it(mmp_home, make_repo, digits):
    tracker = RunTracker()
    legacy = tracker.client.create_experiment("team-a-model")
    tracker.client.create_run(legacy, tags={"mlflow.source.name": "team-a"})
    assert tracker.ownership_problem("team-a-model", "team-a") is None
    problem = tracker.ownership_problem("team-a-model", "intruder")
    assert "has no mmp.owner tag and holds runs from other repositories" in problem
    outcome = Pipeline(store=RunStore()).run(intruder_trigger(make_repo))
    assert outcome.state == "INVALID" and "cannot claim it" in outcome.message
    tracker.experiment_id("team-a-model", owner="team-a")  # the repository that used it claims it
    assert tracker.find_experiment("team-a-model")[1]["mmp.owner"] == "team-a"


@pytest.mark.horovod
def test_two_local_folders_of_one_name_are_two_repositories(make_repo, digits, mmp_home):
    """Issue 20, finding 7: teamB/alpha neither trains into nor promotes over teamA/alpha (before, both
    were the repository 'alpha'); people still see the name 'alpha'."""
    from mmp.models.gitops import run_promotion
    from mmp.pipeline.reporting import LocalNotifier

    alpha = {k: v for k, v in LOCAL.items() if k != "Experiment_Name"}  # the experiment is named after the repo
    files = {"train.py": QUICK_TRAIN, "promote.json": json.dumps({"Experiment": "alpha", "Metric": "acc"})}
    team_a, team_b = (make_repo(name=f"{team}/alpha", experiment=alpha, files=files) for team in ("teamA", "teamB"))
    a, b = (local_trigger(repo, head(repo)) for repo in (team_a, team_b))
    assert a.repository == b.repository == "alpha" and a.identity == str(team_a.resolve()) != b.identity

    first = Pipeline(store=RunStore()).run(a)
    assert first.state == "SUCCEEDED", first.message
    tracker = RunTracker()
    experiment_id, tags = tracker.find_experiment("alpha")
    assert tags["mmp.owner"] == a.identity
    run = tracker.client.get_run(first.run_id)
    assert run.data.tags["mlflow.source.name"] == "alpha" and run.data.tags["mmp.repository"] == a.identity

    second = Pipeline(store=RunStore()).run(b)
    assert second.state == "INVALID" and second.run_id is None
    assert f"belongs to repository {a.identity!r}, not {b.identity!r}" in second.message
    assert len(tracker.client.search_runs([experiment_id])) == 1  # nothing of teamB's in teamA's experiment
    refused = run_promotion(b, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert refused.state == "REFUSED" and f"belongs to repository {a.identity!r}" in refused.message
