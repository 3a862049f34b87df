"""The experiment-file contract: booleans on the command line, process counts, the JSON
Schema, and input refused before any MLflow run exists (issues 10 and 11).

Real consumers: train.py's own argparse, the installed jsonschema's metaschema, real git
(symlinks, directories, export-ignore), /bin/sh for the OS argument limit, MLflow's SQLite
store for "no run was created", and a local HTTP server for GitHub's contents API.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import REGION

from mmp import config
from mmp.contract.argv import (
    COMMAND_LINE_BUDGET,
    MAX_ARG_STRLEN,
    boolean_names,
    hyperparameter_text,
    shell_join,
    train_args,
)
from mmp.contract.experiment import ExperimentError, json_schema, parse_experiment

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fashion"
BASE = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local"}
SEED = {"Platform": "sagemaker", "Dataset_Name": "fashion", "Training_Instance": "ml.p3.16xlarge",
        "Instance_Count": "1", "Hyperparameters": "{'epochs': '40', 'batch-size': '32'}"}

# A train.py written to the seed's rules plus Horovod's own store_true options
# (examples/pytorch/pytorch_mnist.py: --fp16-allreduce, --use-adasum, --no-cuda).
ARGPARSE_TRAIN = textwrap.dedent("""
    import argparse, json, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-path", required=True)
    parser.add_argument("--output-path", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fp16-allreduce", action="store_true")
    parser.add_argument("--use-adasum", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--name", default="")
    print(json.dumps(vars(parser.parse_args())))
""")


def problems(data) -> dict[str, str]:
    with pytest.raises(ExperimentError) as info:
        parse_experiment(data if isinstance(data, (str, bytes)) else json.dumps(data))
    return {p.field: p.message for p in info.value.problems}


def run_argparse(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(ARGPARSE_TRAIN)
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=60)


def _mmp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- 10.7 booleans ------------------------------------------------------------------
def test_booleans_follow_store_true_and_strings_pass_as_written(tmp_path):
    exp = parse_experiment(json.dumps({**BASE, "Hyperparameters": {
        "epochs": "2", "fp16-allreduce": True, "use-adasum": False, "no-cuda": True, "name": "true"}}))
    argv = train_args("/d", "/o", "digits", exp.hyperparameters)
    assert argv[6:] == ["--epochs", "2", "--fp16-allreduce", "--no-cuda", "--name", "true"]
    proc = run_argparse(tmp_path, argv)  # the consumer: train.py's own argparse
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"dataset_path": "/d", "output_path": "/o", "dataset": "digits", "epochs": 2,
                                       "fp16_allreduce": True, "use_adasum": False, "no_cuda": True, "name": "true"}
    # MLflow params still record every value, false included
    assert {k: hyperparameter_text(v) for k, v in exp.hyperparameters.items()}["use-adasum"] == "false"


def test_seed_python_literal_true_is_a_flag_and_quoted_true_a_string(tmp_path):
    exp = parse_experiment(json.dumps({**BASE, "Hyperparameters": "{'fp16-allreduce': True, 'use-adasum': False, "
                                                                  "'name': 'True'}"}))
    assert exp.hyperparameters == {"fp16-allreduce": True, "use-adasum": False, "name": "True"}
    assert train_args("/d", "/o", "x", exp.hyperparameters)[6:] == ["--fp16-allreduce", "--name", "True"]
    assert exp.notes() == ["Hyperparameters.name: the string 'True' passes '--name True'; for an on/off flag "
                           "write true (JSON) or True (Python literal) without quotes"]
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**BASE, "Hyperparameters": "{'use-adasum': 'True'}"}))
    proc = _mmp("validate", str(path), "--no-catalogue")
    assert proc.returncode == 0, proc.stderr
    assert "note: Hyperparameters.use-adasum: the string 'True' passes '--use-adasum True'" in proc.stdout


def test_booleans_survive_sagemakers_text_only_hyperparameters(tmp_path, monkeypatch):
    """Backend request → hyperparameters.json + Environment → the image's entrypoint → argv."""
    from mmp.runtime import sagemaker_entrypoint as ep
    from mmp.backends.base import LaunchRequest
    from mmp.backends.sagemaker import SageMakerBackend

    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    exp = parse_experiment(json.dumps({**SEED, "Hyperparameters": {"epochs": 3, "fp16-allreduce": True,
                                                                    "use-adasum": False, "name": "true"}}))
    request = LaunchRequest(experiment=exp, experiment_name="e", run_id="r" * 32, repository="o/r",
                            clone_url="https://example.com/o/r", commit="c" * 40,
                            mlflow_env={"MLFLOW_TRACKING_URI": "http://mlflow"}, dataset=None, delivery_id="d")
    backend = SageMakerBackend(sagemaker_client=object())
    environment = backend.environment(request, checkpoints=False)
    assert environment["MMP_BOOLEAN_HYPERPARAMETERS"] == boolean_names(exp.hyperparameters) == "fp16-allreduce,use-adasum"
    root = tmp_path / "opt-ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: hyperparameter_text(v) for k, v in exp.hyperparameters.items()}))  # what SageMaker writes
    (root / "input" / "config" / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (root / "input" / "config" / "inputdataconfig.json").write_text(json.dumps({"fashion": {}}))
    plan = ep.build_plan({**environment, "MMP_SM_ROOT": str(root), "MMP_DATASET": "fashion"},
                         horovodrun="horovodrun", python="python")
    assert plan.argv[plan.argv.index("train.py") + 7:] == ["--epochs", "3", "--fp16-allreduce", "--name", "true"]


# -- 10.10 processes ----------------------------------------------------------------
def test_process_tags_and_description():
    two = parse_experiment(json.dumps({**BASE, "Instance_Count": "1", "Processes_Per_Host": "2"}))
    assert two.process_tags() == {"mmp.processes": "2", "mmp.processes_per_host": "2"}
    assert "2 processes (1 × 2 per host)" in two.describe()
    assert parse_experiment(json.dumps(BASE)).process_tags() == {"mmp.processes": "1", "mmp.processes_per_host": "1"}
    cloud = parse_experiment(json.dumps({**SEED, "Instance_Count": "3", "Processes_Per_Host": 8}))
    assert cloud.process_tags() == {"mmp.processes": "24", "mmp.processes_per_host": "8"}
    per_gpu = parse_experiment(json.dumps(SEED))  # the instance decides: one per GPU
    assert per_gpu.process_tags() == {"mmp.processes": "auto", "mmp.processes_per_host": "auto"}


def test_validate_names_the_processes(tmp_path):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**BASE, "Processes_Per_Host": 2}))
    proc = _mmp("validate", str(path), "--no-catalogue")
    assert proc.returncode == 0, proc.stderr
    assert "2 processes (1 × 2 per host)" in proc.stdout


def test_a_two_process_run_is_tagged_and_compare_shows_it(make_repo, digits):
    from rich.console import Console

    from mmp.models.compare import leaderboard, table
    from mmp.pipeline.runner import Pipeline
    from mmp.pipeline.runs import local_trigger

    repo = make_repo(experiment={**BASE, "Processes_Per_Host": "2"})
    pipeline = Pipeline()
    trigger = local_trigger(repo, _head(repo))
    prepared = pipeline.prepare(trigger)
    started = pipeline.start(trigger, prepared)
    run = pipeline.tracker.client.get_run(started.run_id)
    assert run.data.tags["mmp.processes"] == "2" and run.data.tags["mmp.processes_per_host"] == "2"
    pipeline.tracker.finish(started.run_id, "SUCCEEDED", message="ok")

    board = leaderboard("fashion-demo")
    assert board.rows[0].process_count == "2 (1 × 2)"
    assert board.to_dict()["rows"][0]["process_count"] == "2 (1 × 2)"
    out = Console(record=True, width=200)
    out.print(table(board))
    text = out.export_text()
    assert "processes" in text and "2 (1 × 2)" in text


# -- 10.11 the JSON Schema ------------------------------------------------------------
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$defs", "deprecated"}


def _keywords(schema, found=None) -> set[str]:
    """Every keyword used anywhere in a schema (walking its subschemas, not property names)."""
    found = set() if found is None else found
    if isinstance(schema, dict):
        found.update(schema)
        for key, value in schema.items():
            if key in ("properties", "$defs", "patternProperties"):
                for sub in value.values():
                    _keywords(sub, found)
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                for sub in value:
                    _keywords(sub, found)
            elif key in ("additionalProperties", "items", "propertyNames", "not", "contains"):
                _keywords(value, found)
    return found


def test_schema_passes_the_metaschema_and_uses_only_json_schema_keywords():
    from jsonschema import Draft202012Validator

    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    unknown = _keywords(schema) - set(Draft202012Validator.VALIDATORS) - ANNOTATIONS
    assert not unknown, f"not JSON Schema keywords: {unknown}"
    count = schema["properties"]["Processes_Per_Host"]["anyOf"][0]
    assert (count["minimum"], count["maximum"]) == (1, 64)


def test_schema_accepts_what_validation_accepts_and_refuses_what_it_refuses():
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json_schema())
    good = [SEED, json.loads((EXAMPLE / "experiment.json").read_text()),
            {**BASE, "Instance_Count": 2, "Max_Runtime": "90", "Processes_Per_Host": "8",
             "Hyperparameters": {"epochs": 3, "lr": 0.1, "fp16-allreduce": True, "name": "x"}}]
    for data in good:
        parse_experiment(json.dumps(data))
        assert not list(validator.iter_errors(data)), data
    bad = [{**BASE, "Processes_Per_Host": 0}, {**BASE, "Processes_Per_Host": 65}, {**BASE, "Instance_Count": "0"},
           {**BASE, "Instance_Count": "٣"}, {**BASE, "Instance_Count": 257}, {**BASE, "Hyperparameters": {"a b": 1}},
           {**BASE, "Hyperparameters": {"x": [1]}}, {**BASE, "Colour": "blue"}]
    for data in bad:
        with pytest.raises(ExperimentError):
            parse_experiment(json.dumps(data))
        assert list(validator.iter_errors(data)), data


# -- 11.14 contract flags through argparse prefix matching -------------------------------
@pytest.mark.parametrize("name", ["output", "o", "output-", "output-pat", "dataset-p", "dataset-", "data", "d",
                                  "dataset", "dataset-path", "output-path"])
def test_names_that_are_a_prefix_of_a_contract_flag_are_refused(name):
    found = problems({**BASE, "Hyperparameters": {name: "/tmp/elsewhere"}})
    assert "which the pipeline sets" in found[f"Hyperparameters.{name} (name)"]


@pytest.mark.parametrize("value", ["--output=/tmp/x", "--dataset-p", "--output-path", "--d"])
def test_values_that_would_be_read_as_a_contract_flag_are_refused(value):
    found = problems({**BASE, "Hyperparameters": {"fp16-allreduce": value}})
    assert "which the pipeline sets" in found["Hyperparameters.fp16-allreduce"]


def test_the_refused_names_really_override_paths_in_plain_argparse_and_longer_names_pass(tmp_path):
    proc = run_argparse(tmp_path, ["--dataset-path", "/d", "--output-path", "/o", "--dataset", "x",
                                   "--output", "/tmp/evil"])
    assert json.loads(proc.stdout)["output_path"] == "/tmp/evil"  # why the rule exists
    exp = parse_experiment(json.dumps({**BASE, "Hyperparameters": {"output-dir": "/x", "dataset-name": "y",
                                                                   "outputs": "3", "lr": "-0.5"}}))
    assert list(exp.hyperparameters) == ["output-dir", "dataset-name", "outputs", "lr"]


# -- 11.15 / 11.16 hostile JSON ------------------------------------------------------------
def test_deep_nesting_is_a_field_error_not_a_recursion_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    assert "nested more than" in problems('{"Hyperparameters": {"lr": ' + deep + "}}")["Hyperparameters.lr"]
    assert "nested more than" in problems('{"Colour": ' + deep + "}")["Colour"]
    assert "nested more than" in problems({**BASE, "Hyperparameters": deep})["Hyperparameters"]
    assert "nested more than" in problems({**BASE, "Hyperparameters": "{'a': " + "(" * 5000 + ")" * 5000 + "}"})[
        "Hyperparameters"]
    path = tmp_path / "experiment.json"
    path.write_text('{"Platform": "local", "Hyperparameters": {"lr": ' + deep + "}}")
    proc = _mmp("validate", str(path), "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert {p["field"] for p in json.loads(proc.stdout)["problems"]} >= {"Hyperparameters.lr"}


@pytest.mark.parametrize("field", ["Instance_Count", "Processes_Per_Host", "Max_Runtime"])
@pytest.mark.parametrize("digits_text", ["٣", "３", "1٣", "²"])
def test_numbers_take_ascii_digits_only(field, digits_text):
    assert "digits 0-9" in problems({**BASE, field: digits_text})[field]


def test_duplicate_keys_are_refused_naming_the_key():
    found = problems('{"Platform": "local", "Platform": "sagemaker", "Dataset_Name": "digits", '
                     '"Training_Instance": "local", "Hyperparameters": {"epochs": "1", "epochs": "9"}}')
    assert "more than once" in found["Platform"] and "more than once" in found["Hyperparameters.epochs"]
    assert "'epochs' is given twice" in problems({**BASE, "Hyperparameters": '{"epochs": 1, "epochs": 2}'})[
        "Hyperparameters"]
    assert "'epochs' is given twice" in problems({**BASE, "Hyperparameters": "{'epochs': 1, 'epochs': 2}"})[
        "Hyperparameters"]


def test_nul_byte_and_argv_budget_are_field_errors():
    assert "NUL byte" in problems({**BASE, "Hyperparameters": {"name": "a\x00b"}})["Hyperparameters.name"]
    assert "NUL byte" in problems({**BASE, "Hyperparameters": "{'name': 'a\\x00b'}"})["Hyperparameters.name"]
    big = {f"p{i}": "x" * 2000 for i in range(100)}  # ~200 KB, each value under the per-value cap
    assert "Argument list too long" in problems({**BASE, "Hyperparameters": big})["Hyperparameters"]


def test_the_argv_budget_matches_the_os_limit(tmp_path):
    """Linux refuses one argument over MAX_ARG_STRLEN (E2BIG), the way horovodrun passes a
    rank's command to `sh -c`; a command at the budget, with this environment, still runs."""
    with pytest.raises(OSError) as info:
        subprocess.run(["/bin/sh", "-c", "true " + "x" * (MAX_ARG_STRLEN + 1)], timeout=30)
    assert info.value.errno == errno.E2BIG
    values = {f"p{i}": "y" * 2400 for i in range(100)}
    while len(shell_join(train_args("/d", "/o", "x", values)).encode()) > COMMAND_LINE_BUDGET:
        values.popitem()
    exp = parse_experiment(json.dumps({**BASE, "Hyperparameters": values}))  # at the budget: accepted
    env = " ".join(f"{k}={shlex_quote(v)}" for k, v in os.environ.items())
    command = f"{env} true {shell_join(train_args('/d', '/o', 'x', exp.hyperparameters))}"
    assert subprocess.run(["/bin/sh", "-c", command], timeout=30).returncode == 0


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# -- 11.13 refused before any MLflow run exists ----------------------------------------------
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _head(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD")


def _recommit(repo: Path) -> str:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    return _head(repo)


def _runs_in_mlflow() -> int:
    db = config.home_path() / "mlflow.db"
    if not db.exists():
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri())
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids)) if ids else 0


def _refused_locally(repo: Path, expected: str) -> None:
    from mmp.pipeline.runs import local_trigger, run_trigger
    from mmp.pipeline.store import RunStore

    outcome = run_trigger(local_trigger(repo, _head(repo)))
    assert outcome.state == "INVALID", (outcome.state, outcome.message)
    assert expected in outcome.message
    assert outcome.run_id is None and _runs_in_mlflow() == 0
    assert RunStore().list() == []


def test_train_py_as_a_symlink_is_refused(make_repo, digits):
    repo = make_repo(drop=("train.py",))
    shutil.copy(EXAMPLE / "train.py", repo / "real_train.py")
    (repo / "train.py").symlink_to("real_train.py")
    _recommit(repo)
    _refused_locally(repo, "train.py: is a symbolic link")


def test_train_py_as_a_directory_is_refused(make_repo, digits):
    repo = make_repo()
    (repo / "train.py").unlink()
    (repo / "train.py").mkdir()
    (repo / "train.py" / "__main__.py").write_text("print('hi')\n")
    _recommit(repo)
    _refused_locally(repo, "train.py: is a directory")


def test_train_py_left_out_by_export_ignore_is_refused(make_repo, digits):
    repo = make_repo(files={".gitattributes": "train.py export-ignore\n"})
    _refused_locally(repo, "train.py: is excluded by export-ignore")


@pytest.mark.parametrize("hyper, expected", [
    ({"name": "a\x00b"}, "NUL byte"),
    ({f"p{i}": "x" * 2000 for i in range(100)}, "Argument list too long"),
    ({"output": "/tmp/elsewhere"}, "--output-path"),
])
def test_hyperparameters_that_cannot_launch_create_no_run(make_repo, digits, hyper, expected):
    repo = make_repo(experiment={**BASE, "Hyperparameters": hyper})
    _refused_locally(repo, expected)


def test_deep_nesting_in_the_pipeline_is_invalid_not_a_read_error(make_repo, digits):
    repo = make_repo()
    (repo / "experiment.json").write_text(
        '{"Platform": "local", "Hyperparameters": {"lr": ' + "[" * 50_000 + "]" * 50_000 + "}}")
    _recommit(repo)
    _refused_locally(repo, "Hyperparameters.lr: is nested more than")


# -- 11.13 on AWS: what GitHub's contents API says -------------------------------------------
def _contents(path: str, kind: str, **extra) -> dict:
    return {"type": kind, "name": path.rsplit("/", 1)[-1], "path": path, "sha": "0" * 40, "size": 10,
            "url": f"https://api.github.com/repos/o/r/contents/{path}", **extra}


@pytest.mark.parametrize("answer, expected", [
    (_contents("train.py", "symlink", target="/etc/passwd"), "symlink"),
    (_contents("src/real_train.py", "file", encoding="base64", content="cHJpbnQoKQ=="), "symlink"),  # dereferenced
    ([_contents("train.py/a.py", "file")], "dir"),
    (_contents("train.py", "submodule", submodule_git_url="https://github.com/o/x.git"), "submodule"),
    (_contents("train.py", "file", encoding="base64", content="cHJpbnQoKQ=="), "file"),
])
def test_github_source_entry_types(httpserver, answer, expected):
    from mmp.hosts.github import GitHubClient, GitHubSource

    httpserver.expect_request("/repos/o/r/contents/train.py").respond_with_json(answer)
    client = GitHubClient("t0ken", httpserver.url_for("").rstrip("/"), retries=0)
    assert GitHubSource(client, "o/r", "a" * 40).entry_type("train.py") == expected


def test_github_symlinked_train_py_creates_no_run(httpserver, digits):
    from mmp.hosts.github import GitHubClient, GitHubSource
    from mmp.pipeline.runner import Pipeline
    from mmp.pipeline.sources import Trigger

    experiment = json.dumps(BASE).encode()
    import base64

    httpserver.expect_request("/repos/o/r/contents/experiment.json").respond_with_json(
        _contents("experiment.json", "file", encoding="base64", content=base64.b64encode(experiment).decode()))
    httpserver.expect_request("/repos/o/r/contents/train.py").respond_with_json(
        _contents("train.py", "symlink", target="../../etc/passwd"))
    client = GitHubClient("t0ken", httpserver.url_for("").rstrip("/"), retries=0)
    trigger = Trigger(repository="o/r", clone_url="https://github.com/o/r", commit="a" * 40,
                      source=GitHubSource(client, "o/r", "a" * 40), delivery_id="d-1")
    outcome = Pipeline().run(trigger)
    assert outcome.state == "INVALID" and "train.py: is a symbolic link" in outcome.message
    assert _runs_in_mlflow() == 0


# -- end to end through real horovodrun ----------------------------------------------------
@pytest.mark.horovod
def test_flags_and_a_command_line_at_the_budget_run_through_horovodrun(make_repo, digits):
    """Two ranks of a store_true train.py with hyperparameters filling the argv budget:
    horovodrun's `sh -c` takes it (environment included) and argparse sees bare flags."""
    from mmp.pipeline.runs import local_trigger, run_trigger

    script = ARGPARSE_TRAIN.replace("print(json.dumps(vars(parser.parse_args())))",
                                    "known, _ = parser.parse_known_args()\n"
                                    "print('ARGS ' + json.dumps(vars(known)), flush=True)")
    padding = {f"p{i}": "y" * 2400 for i in range(100)}
    hyper = {"fp16-allreduce": True, "use-adasum": False, "name": "True", **padding}
    while len(shell_join(train_args("/d", "/o", "x", hyper)).encode()) > COMMAND_LINE_BUDGET - 512:
        hyper.popitem()
    repo = make_repo(experiment={**BASE, "Processes_Per_Host": 2, "Hyperparameters": hyper},
                     files={"train.py": script})
    lines: list[str] = []
    outcome = run_trigger(local_trigger(repo, _head(repo)), on_log=lines.append)
    assert outcome.state == "SUCCEEDED", (outcome.message, lines[-20:])
    parsed = [json.loads(line.split("ARGS ", 1)[1]) for line in lines if "ARGS " in line]
    assert len(parsed) == 2  # both ranks
    assert all(p["fp16_allreduce"] is True and p["use_adasum"] is False and p["name"] == "True" for p in parsed)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(config.tracking_uri()).get_run(outcome.run_id).data.tags
    assert (tags["mmp.processes"], tags["mmp.processes_per_host"]) == ("2", "2")
