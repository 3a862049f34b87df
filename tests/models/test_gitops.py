"""A committed promote.json promotes through run_promotion, with a commit status and a notification."""

from __future__ import annotations

import json

import pytest

from mmp.models.gitops import PromoteSpec, SpecError, parse_spec, run_promotion
from mmp.pipeline.reporting import LocalNotifier, LocalStatusReporter
from mmp.pipeline.runs import local_trigger

from .conftest import _git


def _commit_promote(make_repo, spec) -> tuple:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    repo = make_repo(files={"promote.json": text})
    sha = _git(repo, "rev-parse", "HEAD")
    return local_trigger(repo, sha, delivery_id="d-1"), repo


def _statuses(trigger):
    return [(s["state"], s["description"]) for s in LocalStatusReporter().history(trigger.repository, trigger.commit)]


def _notification(mmp_home):
    files = list((mmp_home / "notifications").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_promote_json_promotes_reports_success_and_notifies(make_repo, synthetic, client, mmp_home):
    synthetic.run(metrics={"acc": 0.6})
    best = synthetic.run(metrics={"acc": 0.9}, commit="c" * 40)
    trigger, _ = _commit_promote(make_repo, {"Experiment": "synthetic", "Metric": "acc", "Mode": "max",
                                             "Alias": "production"})
    outcome = run_promotion(trigger, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.ok and outcome.state == "SUCCEEDED"
    assert outcome.promotion.run_id == best and "promoted synthetic v1 @production" in outcome.message
    assert str(client.get_registered_model("synthetic").aliases["production"]) == "1"
    states = _statuses(trigger)
    assert [s for s, _ in states] == ["pending", "success"]
    assert "promoting the best acc run to @production" in states[0][1]
    record = LocalStatusReporter().history(trigger.repository, trigger.commit)[-1]
    assert record["target_url"].endswith("/#/models/synthetic/versions/1")
    assert record["context"] == "mmp/promotion"  # never overwrites the training status on the same commit
    note = _notification(mmp_home)
    assert note["kind"] == "promotion" and note["state"] == "SUCCEEDED" and note["promotion"]["run_id"] == best
    assert note["commit"] == trigger.commit and note["delivery_id"] == "d-1"


def test_invalid_promote_json_names_every_field_and_writes_nothing(make_repo, synthetic, client):
    synthetic.run(metrics={"acc": 0.9})
    trigger, _ = _commit_promote(make_repo, {"Experiment": "../etc", "Mode": "best", "Colour": "blue",
                                             "Alias": "prod uction"})
    outcome = run_promotion(trigger, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.state == "INVALID" and not outcome.ok
    text = " | ".join(outcome.problems)
    for field in ("Experiment:", "Mode:", "Colour: unknown field; allowed: Experiment, Metric, Mode, Alias",
                  "Alias:"):
        assert field in text
    assert "'max' or 'min'" in text
    assert [s for s, _ in _statuses(trigger)] == ["failure"]
    assert client.search_registered_models() == []


def test_spec_parsing_edge_cases():
    assert parse_spec(b'{"Experiment": "e", "Metric": "acc"}') == PromoteSpec(Experiment="e", Metric="acc")
    assert parse_spec('{"Experiment": "e", "Metric": "loss", "Mode": "min", "Require": "0.2"}').require == 0.2
    assert parse_spec('{"Experiment": "e", "Rollback": true}').rollback is True
    for raw, message in (('{"Experiment": "e"}', "Metric is required"), ("[1]", "expected a JSON object"),
                         ("{nope", "not valid JSON"), ('{"Metric": "acc"}', "Experiment: required")):
        with pytest.raises(SpecError, match=message):
            parse_spec(raw)


def test_refusal_and_missing_file_and_rollback(make_repo, synthetic, client, mmp_home):
    synthetic.run(metrics={"acc": 0.5})
    trigger, repo = _commit_promote(make_repo, {"Experiment": "synthetic", "Metric": "acc", "Require": 0.9})
    outcome = run_promotion(trigger, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.state == "REFUSED" and "below the required 0.9" in outcome.message
    assert [s for s, _ in _statuses(trigger)] == ["pending", "failure"]

    (repo / "promote.json").unlink()
    _git(repo, "commit", "-qam", "drop promote.json")
    gone = local_trigger(repo, _git(repo, "rev-parse", "HEAD"))
    assert run_promotion(gone, LocalStatusReporter(), LocalNotifier(), deployer=None).state == "SKIPPED"
    assert _statuses(gone) == []

    synthetic.run(metrics={"acc": 0.95})
    from mmp.models.promote import promote

    promote("synthetic", "acc", deployer=None)  # v1: 0.95
    synthetic.run(metrics={"acc": 0.97})
    promote("synthetic", "acc", deployer=None)  # v2: 0.97, v1 recorded as the previous holder
    (repo / "promote.json").write_text(json.dumps({"Experiment": "synthetic", "Rollback": True}))
    _git(repo, "add", "promote.json")
    _git(repo, "commit", "-qm", "roll back production")
    back = local_trigger(repo, _git(repo, "rev-parse", "HEAD"))
    outcome = run_promotion(back, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.ok and outcome.promotion.version == "1" and "rolled back" in outcome.message
    assert str(client.get_registered_model("synthetic").aliases["production"]) == "1"
    assert [s for s, _ in _statuses(back)] == ["pending", "success"]


def test_promote_json_from_another_repository_is_refused(make_repo, synthetic, client, mmp_home):
    """Issue 11.10: a promote.json cannot move an alias of a model another repository owns."""
    client.set_experiment_tag(synthetic.experiment_id, "mmp.owner", "acme/fashion")
    owned = synthetic.run(metrics={"acc": 0.7})
    client.set_tag(owned, "mlflow.source.name", "acme/fashion")
    from mmp.models.promote import promote

    promote("synthetic", "acc", deployer=None)  # the owner's own promotion: v1 @production
    trigger, _ = _commit_promote(make_repo, {"Experiment": "synthetic", "Metric": "acc"})
    assert trigger.repository == "fashion-demo"
    outcome = run_promotion(trigger, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.state == "REFUSED"
    assert f"experiment 'synthetic' belongs to repository 'acme/fashion', not {trigger.identity!r}" in outcome.message
    assert _statuses(trigger)[-1][0] == "failure"
    assert _notification(mmp_home)["state"] == "REFUSED"
    assert {k: str(v) for k, v in client.get_registered_model("synthetic").aliases.items()} == {"production": "1"}
    repo = make_repo(name="other-team", files={"promote.json": json.dumps({"Experiment": "synthetic",
                                                                          "Rollback": True})})
    rollback = local_trigger(repo, _git(repo, "rev-parse", "HEAD"), delivery_id="d-2")
    outcome = run_promotion(rollback, LocalStatusReporter(), LocalNotifier(), deployer=None)
    assert outcome.state == "REFUSED" and f"{rollback.identity!r}" in outcome.message
