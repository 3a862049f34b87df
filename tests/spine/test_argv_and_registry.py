"""The one argv builder, and backends found by platform name (entry points included)."""

from __future__ import annotations

import json
import shlex
import sys
import textwrap

import pytest

from mmp import backends
from mmp.contract.argv import horovodrun_argv, mlflow_env, shell_join, train_args
from mmp.contract.experiment import parse_experiment


def test_train_args_follow_the_contract_in_order():
    argv = train_args("/data/fashion", "/out", "fashion", {"epochs": "40", "batch-size": 32, "lr": 0.5, "aug": True})
    assert argv == ["--dataset-path", "/data/fashion", "--output-path", "/out", "--dataset", "fashion",
                    "--epochs", "40", "--batch-size", "32", "--lr", "0.5", "--aug"]


def test_horovodrun_argv_is_a_list_with_hosts_and_slots():
    argv = horovodrun_argv([("10.0.0.1", 8), ("10.0.0.2", 8)], ["--dataset", "x"], python="python3")
    assert argv[:6] == ["horovodrun", "-np", "16", "-H", "10.0.0.1:8,10.0.0.2:8", "--gloo"]
    assert argv[-4:] == ["python3", "train.py", "--dataset", "x"]


def test_shell_join_keeps_metacharacters_literal():
    values = ["$(touch /tmp/x)", "a;b", "`id`", "it's", 'say "hi"', "new\nline", ""]
    argv = train_args("/d", "/o", "n", {f"k{i}": v for i, v in enumerate(values)})
    assert shlex.split(shell_join(argv)) == argv


def test_mlflow_env_names():
    assert mlflow_env("sqlite:///x.db", "exp", "abc") == {
        "MLFLOW_TRACKING_URI": "sqlite:///x.db", "MLFLOW_EXPERIMENT_NAME": "exp", "MLFLOW_RUN_ID": "abc"}


def test_builtin_platforms_resolve():
    assert set(backends.available_platforms()) >= {"local", "sagemaker", "sagemaker-fsx", "dlami"}
    assert backends.backend_class("local").name == "local"
    with pytest.raises(backends.BackendError, match="no backend for platform 'azure'"):
        backends.get_backend("azure")


def test_third_party_backend_through_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "mmp_toy").mkdir(parents=True)
    (pkg / "mmp_toy" / "__init__.py").write_text(textwrap.dedent('''
        from mmp.backends.base import Backend, JobHandle, JobState, JobStatus, Paths
        class ToyBackend(Backend):
            name = "toy"
            def paths(self, request): return Paths("/toy/data", "/toy/out")
            def launch(self, request): return JobHandle("toy", "job-1")
            def status(self, handle): return JobStatus(JobState.SUCCEEDED)
            def logs(self, handle, cursor=None): return [], cursor
            def cancel(self, handle): pass
    '''))
    dist = pkg / "mmp_toy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmp-toy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mmp.backends]\ntoy = mmp_toy:ToyBackend\n")
    monkeypatch.syspath_prepend(str(pkg))
    backends._plugins.cache_clear()
    try:
        assert "toy" in backends.available_platforms()
        assert backends.get_backend("toy").paths(None).dataset == "/toy/data"
        exp = parse_experiment(json.dumps({"Platform": "toy", "Dataset_Name": "d", "Training_Instance": "t"}),
                               platforms=backends.available_platforms())
        assert exp.platform == "toy"
    finally:
        sys.modules.pop("mmp_toy", None)
        backends._plugins.cache_clear()


@pytest.mark.parametrize("name", ["a", "log", "autotune-", "min", "no-"])
def test_names_horovodrun_would_reject_as_ambiguous_are_refused_at_validation(name):
    from mmp.contract.experiment import ExperimentError

    with pytest.raises(ExperimentError, match="ambiguous abbreviation to horovodrun"):
        parse_experiment(json.dumps({"Dataset_Name": "d", "Training_Instance": "t", "Hyperparameters": {name: "1"}}))


def test_unambiguous_names_pass_even_when_horovodrun_has_them():
    exp = parse_experiment(json.dumps({"Dataset_Name": "d", "Training_Instance": "t",
                                       "Hyperparameters": {"verbose": "1", "lr": "0.1", "output-filename": "x"}}))
    assert list(exp.hyperparameters) == ["verbose", "lr", "output-filename"]


@pytest.mark.horovod
def test_option_list_matches_the_installed_horovodrun():
    import argparse

    from horovod.runner import launch

    from mmp.contract.argv import HOROVODRUN_OPTIONS

    seen = {}

    def grab(self, *args, **kwargs):
        seen["options"] = {o for action in self._actions for o in action.option_strings}
        raise SystemExit

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            launch.parse_args()
    finally:
        argparse.ArgumentParser.parse_args = original
    assert seen["options"] == set(HOROVODRUN_OPTIONS)
