"""Promotion: the best FINISHED run with a model, alias moves, history, rollback, refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmp.cli import app
from mmp.models.promote import PromotionError, current, history_tag, promote, rollback

from .conftest import Synthetic

runner = CliRunner()


def _alias(client, name="synthetic", alias="production"):
    value = client.get_registered_model(name).aliases.get(alias)
    return None if value is None else str(value)


def test_promote_moves_the_alias_tags_the_version_and_rolls_back(synthetic, client):
    first = synthetic.run(metrics={"acc": 0.7}, commit="1" * 40)
    p1 = promote("synthetic", "acc", deployer=None)
    assert (p1.action, p1.version, p1.run_id, p1.previous_version) == ("promoted", "1", first, None)
    assert _alias(client) == "1"
    tags = client.get_model_version("synthetic", "1").tags
    assert tags["mmp.commit"] == "1" * 40 and tags["mmp.metric"] == "acc" and float(tags["mmp.metric.acc"]) == 0.7
    assert tags["mmp.run_id"] == first

    better = synthetic.run(metrics={"acc": 0.9}, commit="2" * 40)
    p2 = promote("synthetic", "acc", deployer=None)
    assert (p2.version, p2.run_id, p2.previous_version) == ("2", better, "1")
    assert _alias(client) == "2"
    assert json.loads(client.get_registered_model("synthetic").tags[history_tag("production")]) == ["1"]
    assert "promoted synthetic v2 @production" in p2.summary() and "was v1" in p2.summary()

    again = promote("synthetic", "acc", deployer=None)  # same best run: no new version, nothing moves
    assert again.action == "unchanged" and again.version == "2"
    assert len(client.search_model_versions("name = 'synthetic'")) == 2

    back = rollback("synthetic", deployer=None)
    assert (back.action, back.version, back.run_id, back.previous_version) == ("rolled back", "1", first, "2")
    assert back.commit == "1" * 40 and back.value == pytest.approx(0.7)
    assert str(current("synthetic", client=client).version) == "1"
    with pytest.raises(PromotionError, match="no earlier holder"):
        rollback("synthetic", deployer=None)

    forward = promote("synthetic", "acc", deployer=None)  # the best run takes the alias back, same version
    assert (forward.action, forward.version, forward.previous_version) == ("promoted", "2", "1")
    assert len(client.search_model_versions("name = 'synthetic'")) == 2


def test_aliases_are_independent_and_model_name_comes_from_config(synthetic, client, monkeypatch):
    synthetic.run(metrics={"loss": 0.3})
    best = synthetic.run(metrics={"loss": 0.1})
    monkeypatch.setenv("MMP_MODEL_NAME", "digits-classifier")
    p = promote("synthetic", "loss", mode="min", alias="staging", deployer=None)
    assert (p.model_name, p.run_id) == ("digits-classifier", best)
    model = client.get_registered_model("digits-classifier")
    assert {k: str(v) for k, v in model.aliases.items()} == {"staging": "1"}


def test_skips_better_runs_without_a_model_and_ignores_unfinished(synthetic):
    with_model = synthetic.run(metrics={"acc": 0.6})
    no_model = synthetic.run(metrics={"acc": 0.95}, model=False)
    synthetic.run(metrics={"acc": 0.99}, status="FAILED")
    synthetic.run(metrics={"acc": 0.98}, status="RUNNING")
    p = promote("synthetic", "acc", deployer=None)
    assert p.run_id == with_model and p.skipped == [no_model]


def test_refusals_are_clear_and_write_nothing(synthetic, client):
    lonely = synthetic.run(metrics={"acc": 0.95}, model=False)
    with pytest.raises(PromotionError, match="none of the 1 FINISHED run.* logged a model"):
        promote("synthetic", "acc", deployer=None)
    with pytest.raises(PromotionError, match=f"run {lonely} logged no model"):
        promote("synthetic", "acc", run_id=lonely, deployer=None)
    synthetic.run(metrics={"acc": 0.8})
    with pytest.raises(PromotionError, match=r"acc=0.8, below the required 0.9; nothing promoted"):
        promote("synthetic", "acc", require=0.9, deployer=None)
    synthetic.run(metrics={"loss": 0.5})
    with pytest.raises(PromotionError, match=r"loss=0.5, above the required 0.2"):
        promote("synthetic", "loss", mode="min", require=0.2, deployer=None)
    with pytest.raises(PromotionError, match="logged the metric 'f1'"):
        promote("synthetic", "f1", deployer=None)
    with pytest.raises(PromotionError, match="no MLflow experiment named 'ghost'"):
        promote("ghost", "acc", deployer=None)
    with pytest.raises(PromotionError, match="--mode must be one of max, min"):
        promote("synthetic", "acc", mode="up", deployer=None)
    other = Synthetic(client, "other").run(metrics={"acc": 1.0})
    with pytest.raises(PromotionError, match=f"run {other} belongs to another experiment"):
        promote("synthetic", "acc", run_id=other, deployer=None)
    with pytest.raises(PromotionError, match="model name \"it's\" is not allowed"):
        promote("synthetic", "acc", model_name="it's", deployer=None)
    assert client.search_registered_models() == []
    with pytest.raises(PromotionError, match="no registered model 'synthetic'"):
        rollback("synthetic", deployer=None)


def test_reaching_the_threshold_promotes(synthetic):
    synthetic.run(metrics={"acc": 0.9})
    assert promote("synthetic", "acc", require=0.9, deployer=None).action == "promoted"


def test_cli_promote_and_rollback(synthetic, client):
    synthetic.run(metrics={"acc": 0.5})
    result = runner.invoke(app, ["promote", "synthetic", "--metric", "acc", "--require", "0.9"])
    assert result.exit_code == 1 and "below the required 0.9" in result.output
    result = runner.invoke(app, ["promote", "synthetic"])
    assert result.exit_code == 1 and "--metric is required" in result.output
    result = runner.invoke(app, ["promote", "synthetic", "--metric", "acc"])
    assert result.exit_code == 0, result.output
    assert "promoted synthetic v1 @production" in result.output
    best = synthetic.run(metrics={"acc": 0.7})
    synthetic.run(metrics={"acc": 0.8}, model=False)
    result = runner.invoke(app, ["promote", "synthetic", "--metric", "acc", "--json"])
    data = json.loads(result.stdout)
    assert (data["version"], data["run_id"], data["previous_version"]) == ("2", best, "1")
    result = runner.invoke(app, ["promote", "synthetic", "--metric", "acc"])
    assert "already holds" in result.output and "logged no model; skipped" in result.output
    result = runner.invoke(app, ["promote", "synthetic", "--rollback"])
    assert result.exit_code == 0 and "rolled back to synthetic v1 @production" in result.output
    assert _alias(client) == "1"


def test_promote_a_real_run_registers_its_logged_model(real_runs, client):
    from mlflow.tracking import MlflowClient

    best = max(real_runs["run_ids"], key=lambda r: client.get_run(r).data.metrics["val_accuracy"])
    p = promote("digits-demo", "val_accuracy", deployer=None)
    assert p.run_id == best and p.model_name == "digits-demo" and p.commit == client.get_run(best).data.tags[
        "mlflow.source.git.commit"]
    mv = client.get_model_version_by_alias("digits-demo", "production")
    logged = MlflowClient(client.tracking_uri).search_logged_models(
        [client.get_run(best).info.experiment_id], filter_string=f"source_run_id = '{best}'")
    assert mv.run_id == best and mv.source == logged[0].artifact_location
    assert mv.tags["mmp.model_id"] == logged[0].model_id


def _owned(client, synthetic, owner="acme/fashion"):
    client.set_experiment_tag(synthetic.experiment_id, "mmp.owner", owner)


def _from(client, run_id, repository):
    client.set_tag(run_id, "mlflow.source.name", repository)
    return run_id


def test_an_intruders_better_run_is_never_promoted(synthetic, client):
    """Issue 11.10: a run another repository logged into this one's experiment is not a candidate."""
    _owned(client, synthetic)
    own = _from(client, synthetic.run(metrics={"acc": 0.8}), "acme/fashion")
    intruder = _from(client, synthetic.run(metrics={"acc": 0.99}), "evil/intruder")
    result = runner.invoke(app, ["promote", "synthetic", "--metric", "acc"])
    assert result.exit_code == 0, result.output
    assert f"run {intruder} ranks higher but came from another repository; skipped" in result.output
    assert _alias(client) == "1" and client.get_model_version("synthetic", "1").run_id == own
    assert client.get_registered_model("synthetic").tags["mmp.owner"] == "acme/fashion"
    with pytest.raises(PromotionError, match="came from repository 'evil/intruder'"):
        promote("synthetic", "acc", run_id=intruder, deployer=None)


def test_sharing_lets_another_repository_in(synthetic, client, monkeypatch, mmp_home):
    _owned(client, synthetic)
    _from(client, synthetic.run(metrics={"acc": 0.8}), "acme/fashion")
    tuner = _from(client, synthetic.run(metrics={"acc": 0.99}), "acme/tuning")
    (mmp_home / "shared-experiments.json").write_text(json.dumps({"synthetic": ["acme/tuning"]}))
    assert promote("synthetic", "acc", deployer=None).run_id == tuner
    monkeypatch.setenv("MMP_SHARED_EXPERIMENTS", "{not json")  # the variable wins, and a bad one is named
    with pytest.raises(PromotionError, match="MMP_SHARED_EXPERIMENTS: not valid JSON"):
        promote("synthetic", "acc", deployer=None)


def test_a_model_owned_by_another_repository_is_refused(synthetic, client):
    _owned(client, synthetic)
    _from(client, synthetic.run(metrics={"acc": 0.8}), "acme/fashion")
    client.create_registered_model("synthetic", tags={"mmp.owner": "other/team"})
    with pytest.raises(PromotionError, match="registered model 'synthetic' belongs to repository 'other/team'"):
        promote("synthetic", "acc", deployer=None)
    assert client.get_registered_model("synthetic").aliases == {}
    assert client.search_model_versions("name = 'synthetic'") == []


# A real train.py that, besides its own run, makes a better run with a READY model in another
# repository's experiment, tagged exactly as the pipeline tags that repository's runs.
FORGER = '''
import argparse, time
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

argparse.ArgumentParser().parse_known_args()
client = MlflowClient()  # MLFLOW_TRACKING_URI: the pipeline's own store
victim = client.get_experiment_by_name({experiment!r})
run = client.create_run(victim.experiment_id, tags={{"mmp.repository": {identity!r},
                                                     "mlflow.source.name": {name!r}}})
now = int(time.time() * 1000)
client.log_batch(run.info.run_id, metrics=[Metric("val_accuracy", 1.0, now, 0)])
model = client.create_logged_model(victim.experiment_id, name="model", source_run_id=run.info.run_id)
client.finalize_logged_model(model.model_id, "READY")
client.set_terminated(run.info.run_id, "FINISHED")
print("forged", run.info.run_id, flush=True)
'''


def test_a_run_another_train_py_forged_in_this_experiment_is_never_promoted(real_runs, client, make_repo, digits):
    """Issue 20.7: any train.py can create a run in another repository's experiment, tagged as that
    repository; only runs the pipeline recorded as its own are promoted."""
    from mlflow.tracking import MlflowClient

    from mmp.hosts import localgit as gitutil
    from mmp.pipeline.runs import local_trigger, run_trigger

    owner = real_runs["repo"].resolve()
    forger = make_repo("forger", files={"train.py": FORGER.format(
        experiment="digits-demo", identity=str(owner), name=gitutil.repository_name(owner))})
    outcome = run_trigger(local_trigger(forger, gitutil.resolve(forger)))
    assert outcome.state == "SUCCEEDED", outcome.message
    exp = client.get_experiment_by_name("digits-demo")
    forged = [r.info.run_id for r in MlflowClient(client.tracking_uri).search_runs([exp.experiment_id])
              if r.info.run_id not in real_runs["run_ids"]]
    assert len(forged) == 1 and client.get_run(forged[0]).data.metrics["val_accuracy"] == 1.0

    result = runner.invoke(app, ["promote", "digits-demo", "--metric", "val_accuracy", "--no-deploy"])
    assert result.exit_code == 0, result.output
    assert f"run {forged[0]} ranks higher but was not created by the pipeline; skipped" in result.output
    mv = client.get_model_version_by_alias("digits-demo", "production")
    assert mv.run_id in real_runs["run_ids"]
    assert client.search_model_versions(f"name = 'digits-demo' AND run_id = '{forged[0]}'") == []
    with pytest.raises(PromotionError, match=f"run {forged[0]} was not created by the pipeline"):
        promote("digits-demo", "val_accuracy", run_id=forged[0], deployer=None)
