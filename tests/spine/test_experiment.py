"""The experiment.json model: the seed format as users write it, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmp.contract.experiment import ExperimentError, find_experiment_file, json_schema, load_experiment, parse_experiment

SEED = {
    "Platform": "sagemaker",
    "Dataset_Name": "fashion",
    "Training_Instance": "ml.p3.16xlarge",
    "Instance_Count": "1",
    "Hyperparameters": "{'epochs': '40', 'batch-size': '32'}",
}
CATALOGUE = {"fashion", "digits"}


def problems(data, **kwargs) -> dict[str, str]:
    with pytest.raises(ExperimentError) as info:
        parse_experiment(data if isinstance(data, (str, bytes)) else json.dumps(data), **kwargs)
    return {p.field: p.message for p in info.value.problems}


def test_seed_format_exactly_as_written():
    exp = parse_experiment(json.dumps(SEED), datasets=CATALOGUE)
    assert exp.platform == "sagemaker"
    assert exp.instance_count == 1
    assert exp.hyperparameters == {"epochs": "40", "batch-size": "32"}
    assert list(exp.hyperparameters) == ["epochs", "batch-size"]  # order kept for the argv
    assert exp.training_instance == "ml.p3.16xlarge"
    assert exp.experiment_name is None and exp.resolved_name("acme/fashion-mnist") == "fashion-mnist"


@pytest.mark.parametrize("hyper", [
    '{"epochs": "40", "batch-size": "32"}',
    {"epochs": 40, "batch-size": 32},
    "{'epochs': 40, 'batch-size': 32}",
])
def test_hyperparameters_as_json_string_object_or_python_literal(hyper):
    exp = parse_experiment(json.dumps({**SEED, "Hyperparameters": hyper}), datasets=CATALOGUE)
    assert {k: str(v) for k, v in exp.hyperparameters.items()} == {"epochs": "40", "batch-size": "32"}


def test_platform_default_comes_from_configuration(monkeypatch):
    data = {k: v for k, v in SEED.items() if k != "Platform"}
    assert parse_experiment(json.dumps(data)).platform == "sagemaker"
    monkeypatch.setenv("MMP_DEFAULT_PLATFORM", "local")
    assert parse_experiment(json.dumps(data)).platform == "local"


def test_optional_fields():
    exp = parse_experiment(json.dumps({**SEED, "Experiment_Name": "fmnist", "Max_Runtime": "90",
                                       "Processes_Per_Host": 8, "Use_Spot": True}))
    assert (exp.experiment_name, exp.max_runtime, exp.processes_per_host, exp.use_spot) == ("fmnist", 90, 8, True)
    assert exp.total_processes == 8 and exp.runtime_minutes == 90


@pytest.mark.parametrize(("given", "read"), [(True, True), (False, False), ("true", True), (" False ", False)])
def test_use_spot_takes_json_booleans_and_their_words(given, read):
    assert parse_experiment(json.dumps({**SEED, "Use_Spot": given})).use_spot is read


@pytest.mark.parametrize("given", ["yes", "on", "1", 1, 0, 0.0, "", None])
def test_use_spot_refuses_what_is_not_plainly_true_or_false(given):
    assert "must be true or false" in problems({**SEED, "Use_Spot": given})["Use_Spot"]


def test_the_schema_and_the_model_agree_on_flags():
    import re

    (boolean, text) = json_schema()["properties"]["Use_Spot"]["anyOf"]
    assert boolean == {"type": "boolean"}
    pattern = re.compile(text["pattern"])
    assert all(pattern.search(w) for w in ("true", "False", " TRUE ")) and not pattern.search("yes")


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "abc", 0, 1.5, True, ""])
def test_bad_instance_count(count):
    found = problems({**SEED, "Instance_Count": count})
    assert "Instance_Count" in found


def test_every_problem_is_reported_at_once_naming_field_and_what_is_allowed():
    found = problems({
        "Platform": "azure",
        "Dataset_Name": "../etc",
        "Instance_Count": "abc",
        "Hyperparameters": {"learning rate": "1", "--epochs": "2", "ok": [1, 2]},
        "Colour": "blue",
    }, datasets=CATALOGUE)
    assert set(found) >= {"Platform", "Dataset_Name", "Instance_Count", "Training_Instance", "Colour"}
    assert "sagemaker, sagemaker-fsx, dlami, kubernetes, local" in found["Platform"]
    assert "not a safe name" in found["Dataset_Name"]
    assert "is required" in found["Training_Instance"]
    assert "unknown field" in found["Colour"] and "Dataset_Name" in found["Colour"]
    hyper = [msg for field, msg in found.items() if field.startswith("Hyperparameters")]
    assert hyper, found


@pytest.mark.parametrize("name", ["../etc", "a;rm -rf /", "a b", "$(id)", "..", "-x", ""])
def test_unsafe_dataset_names(name):
    assert "Dataset_Name" in problems({**SEED, "Dataset_Name": name})


def test_unknown_dataset_lists_the_catalogue():
    found = problems({**SEED, "Dataset_Name": "cifar"}, datasets=CATALOGUE)
    assert "digits, fashion" in found["Dataset_Name"]


@pytest.mark.parametrize("hyper", [
    {"learning rate": 1},
    {"--epochs": 1},
    {"-e": 1},
    {"epochs": [1, 2]},
    {"epochs": {"a": 1}},
    {"epochs": None},
    "epochs=40",
    "{'epochs': 40",
    "[1, 2]",
    "__import__('os').system('echo pwned')",
])
def test_bad_hyperparameters(hyper):
    found = problems({**SEED, "Hyperparameters": hyper})
    assert any(field.startswith("Hyperparameters") for field in found), found


def test_python_literal_is_never_evaluated(tmp_path):
    canary = tmp_path / "pwned"
    found = problems({**SEED, "Hyperparameters": f"__import__('pathlib').Path({str(canary)!r}).touch()"})
    assert "Hyperparameters" in found
    assert not canary.exists()


def test_reserved_names_cannot_be_hyperparameters():
    found = problems({**SEED, "Hyperparameters": {"dataset-path": "/etc"}})
    assert "which the pipeline sets" in found["Hyperparameters.dataset-path (name)"]


def test_file_of_several_megabytes_is_refused_before_parsing(tmp_path):
    big = tmp_path / "experiment.json"
    big.write_text(json.dumps({**SEED, "Hyperparameters": {"x": "y" * 3_000_000}}))
    with pytest.raises(ExperimentError) as info:
        load_experiment(big)
    assert "limit" in str(info.value)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", "null", '{"Platform": "local",'])
def test_not_a_json_object(text):
    assert "(file)" in problems(text)


def test_experiment_json_wins_over_experiment_config_json(tmp_path):
    (tmp_path / "experiment_config.json").write_text(json.dumps({**SEED, "Instance_Count": "2"}))
    assert find_experiment_file(tmp_path).name == "experiment_config.json"
    assert load_experiment(tmp_path).instance_count == 2
    (tmp_path / "experiment.json").write_text(json.dumps({**SEED, "Instance_Count": "3"}))
    assert load_experiment(tmp_path).instance_count == 3


def test_max_runtime_is_capped():
    assert "Max_Runtime" in problems({**SEED, "Max_Runtime": 10**6})


def test_summary_fits_a_github_status():
    with pytest.raises(ExperimentError) as info:
        parse_experiment(json.dumps({"Platform": "x" * 300, "Instance_Count": "abc"}))
    assert len(info.value.summary()) <= 140


def test_schema_names_every_field():
    schema = json_schema()
    assert set(schema["properties"]) >= {"Platform", "Dataset_Name", "Training_Instance", "Instance_Count",
                                         "Hyperparameters", "Experiment_Name", "Max_Runtime", "Processes_Per_Host"}
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"Dataset_Name", "Training_Instance"}


def _mmp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_lists_every_error_and_exits_1(tmp_path):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**SEED, "Instance_Count": "0", "Dataset_Name": "a;rm -rf /"}))
    proc = _mmp("validate", str(path))
    assert proc.returncode == 1
    assert "Instance_Count" in proc.stderr and "Dataset_Name" in proc.stderr
    proc = _mmp("validate", str(path), "--json")
    assert proc.returncode == 1
    assert {p["field"] for p in json.loads(proc.stdout)["problems"]} == {"Instance_Count", "Dataset_Name"}


def test_cli_validate_ok_and_schema(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps(SEED))
    proc = _mmp("validate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(_mmp("validate", "--schema").stdout)
    assert schema["title"] == "MMP experiment.json"
