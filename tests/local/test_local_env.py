"""The repository's dependency files on the local platform: real pip, real venvs,
offline (a tiny package built in the test, PIP_NO_INDEX so nothing reaches PyPI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.backends.base import BackendError
from mmp.backends.local_env import dependency_files, training_python
from mmp.pipeline.runs import local_trigger, run_trigger

sys.path.insert(0, str(Path(__file__).parent))
from tiny_package import VALUE, build_tiny_wheel  # noqa: E402

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}

# Proves the layering: its own package from the run's env, torch/Horovod found (not
# imported: too slow here) in the base environment, not reinstalled.
USES_DEPENDENCY = r"""
import importlib.util, json, os, sys
import mmp_tiny_dep
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "deps.json"), "w") as fh:
    json.dump({"value": mmp_tiny_dep.VALUE, "executable": sys.executable, "prefix": sys.prefix,
               "dep": mmp_tiny_dep.__file__, "torch": importlib.util.find_spec("torch").origin,
               "horovod": importlib.util.find_spec("horovod").origin}, fh)
"""


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")


@pytest.fixture(scope="session")
def tiny_wheel(tmp_path_factory) -> Path:
    return build_tiny_wheel(tmp_path_factory.mktemp("wheels"))


def dependency_repo(make_repo, wheel: Path, *, requirements: str | None = None, train: str = USES_DEPENDENCY,
                    extra: dict | None = None) -> Path:
    """A repo whose requirements.txt names the wheel it carries (./wheels/...), committed."""
    reqs = f"# what train.py needs\n./wheels/{wheel.name}\n" if requirements is None else requirements
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2},
                     files={"train.py": train, "requirements.txt": reqs, **(extra or {})})
    (repo / "wheels").mkdir()
    shutil.copy(wheel, repo / "wheels" / wheel.name)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "add the wheel"], check=True)
    return repo


def envs() -> list[Path]:
    root = config.home_path() / "envs"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def run_log(run_id: str) -> str:
    return (config.runs_root() / "fashion-demo" / run_id / "train.log").read_text()


@pytest.mark.horovod
def test_requirements_are_installed_over_the_base_once_then_reused(make_repo, digits, tiny_wheel, offline):
    repo = dependency_repo(make_repo, tiny_wheel)
    first = run_trigger(local_trigger(repo, "HEAD"))
    assert first.state == "SUCCEEDED", first.message + run_log(first.run_id)
    (env,) = envs()
    deps = json.loads((config.runs_root() / "fashion-demo" / first.run_id / "output" / "deps.json").read_text())
    assert deps["value"] == VALUE
    assert Path(deps["prefix"]) == env and Path(deps["dep"]).is_relative_to(env)
    base = Path(sys.prefix)
    assert Path(deps["torch"]).is_relative_to(base) and Path(deps["horovod"]).is_relative_to(base), \
        "torch and Horovod come from the base environment, not a reinstall"
    assert "mmp: installing requirements.txt" in run_log(first.run_id)
    ready = (env / "mmp-env-ready.json").stat().st_mtime_ns

    second = run_trigger(local_trigger(repo, "HEAD"))
    assert second.state == "SUCCEEDED", second.message
    assert envs() == [env] and (env / "mmp-env-ready.json").stat().st_mtime_ns == ready
    assert "mmp: installing" not in run_log(second.run_id), "a second run with the same files installs nothing"


@pytest.mark.horovod
def test_a_failed_install_is_a_clear_error_before_train_py_starts(make_repo, digits, tiny_wheel, offline):
    repo = dependency_repo(make_repo, tiny_wheel, requirements=f"./wheels/{tiny_wheel.name}\nmmp-no-such-package==9.9\n")
    outcome = run_trigger(local_trigger(repo, "HEAD"))
    assert outcome.state == "FAILED"
    assert outcome.message.startswith("requirements.txt: ") and "mmp-no-such-package==9.9" in outcome.message
    run = MlflowClient(config.tracking_uri()).get_run(outcome.run_id)
    assert run.info.status == "FAILED", "no MLflow run is left RUNNING for a failed install"
    assert not (config.runs_root() / "fashion-demo" / outcome.run_id / "output" / "deps.json").exists()
    assert envs() == [], "a failed build is not kept as a usable environment"


def test_no_dependency_files_or_nothing_missing_costs_nothing(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train.py").write_text("")
    assert dependency_files(bare) == []
    picked = training_python(bare, sys.executable, tmp_path / "envs", print)
    assert picked.python == sys.executable and not picked.built and picked.seconds == 0
    met = tmp_path / "met"
    met.mkdir()
    (met / "requirements.txt").write_text("# the example's\nmlflow>=3.1,<4\nnumpy\npsutil ; python_version >= '3'\n")
    picked = training_python(met, sys.executable, tmp_path / "envs", print)
    assert picked.python == sys.executable and not (tmp_path / "envs").exists()


def test_two_runs_with_the_same_files_build_once(tmp_path, tiny_wheel, offline):
    codes = []
    for n in range(2):  # two exports of the same commit, as two concurrent runs have
        code = tmp_path / f"run{n}" / "code"
        (code / "wheels").mkdir(parents=True)
        shutil.copy(tiny_wheel, code / "wheels" / tiny_wheel.name)
        (code / "requirements.txt").write_text(f"./wheels/{tiny_wheel.name}\n")
        codes.append(code)
    results, errors = [], []

    def build(code):
        try:
            results.append(training_python(code, sys.executable, tmp_path / "envs", lambda line: None))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(code,)) for code in codes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].python == results[1].python
    out = subprocess.run([results[0].python, "-c", "import mmp_tiny_dep, horovod; print(mmp_tiny_dep.VALUE)"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == VALUE, out.stderr


def test_a_pyproject_installs_its_listed_dependencies(tmp_path, tiny_wheel, monkeypatch, offline):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tiny_wheel.parent))
    code = tmp_path / "code"
    code.mkdir()
    (code / "pyproject.toml").write_text('[project]\nname = "teamlib"\nversion = "0.1"\n'
                                         'dependencies = ["mmp-tiny-dep==1.0"]\n[tool.ruff]\nline-length = 120\n')
    picked = training_python(code, sys.executable, tmp_path / "envs", lambda line: None)
    assert picked.built
    out = subprocess.run([picked.python, "-c", "import mmp_tiny_dep; print(mmp_tiny_dep.VALUE)"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == VALUE, out.stderr


def test_a_pyproject_that_only_configures_tools_declares_nothing(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "pyproject.toml").write_text("[tool.ruff]\nline-length = 120\n")
    assert dependency_files(code) == []
    assert training_python(code, sys.executable, tmp_path / "envs", print).python == sys.executable


def test_a_setup_py_installs_its_dependencies_but_never_a_frozen_copy_of_the_project(tmp_path, tiny_wheel,
                                                                                     monkeypatch, offline):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tiny_wheel.parent))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's spelling of --no-build-isolation: offline here
    code = tmp_path / "code"
    (code / "teamlib").mkdir(parents=True)
    (code / "teamlib" / "__init__.py").write_text("")
    (code / "setup.py").write_text('from setuptools import setup\n'
                                   'setup(name="teamlib", version="0.1", packages=["teamlib"], '
                                   'install_requires=["mmp-tiny-dep==1.0"])\n')
    picked = training_python(code, sys.executable, tmp_path / "envs", lambda line: None)
    assert picked.built
    probe = ("import importlib.util, mmp_tiny_dep; "
             "print(mmp_tiny_dep.VALUE, importlib.util.find_spec('teamlib') is None)")
    out = subprocess.run([picked.python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == [VALUE, "True"], out.stderr
def test_a_broken_pyproject_names_the_file(tmp_path, offline):
    code = tmp_path / "code"
    code.mkdir()
    (code / "pyproject.toml").write_text('[project]\nname = "teamlib"\nversion = "0.1"\n'
                                         'dependencies = ["mmp-no-such-package>=2"]\n')
    with pytest.raises(BackendError, match=r"^pyproject.toml: .*mmp-no-such-package"):
        training_python(code, sys.executable, tmp_path / "envs", lambda line: None)
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
