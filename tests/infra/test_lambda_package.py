"""The Lambda zip: only the light modules, and they import without the rest of the venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from mmp.infra import lambda_package

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("pulumi", "pulumi_aws", "mlflow", "torch", "sagemaker", "paramiko", "typer", "rich", "horovod")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return lambda_package.build(tmp_path_factory.mktemp("lambda") / "mmp.zip")


def test_zip_holds_handlers_and_nothing_heavy(package):
    names = zipfile.ZipFile(package.path).namelist()
    tops = {n.split("/")[0].removesuffix(".py") for n in names}
    assert not tops & set(FORBIDDEN), tops & set(FORBIDDEN)
    assert {"mmp", "pydantic", "pydantic_core"} <= tops
    assert "boto3" not in tops and "botocore" not in tops  # the Lambda runtime has them
    for module in ("mmp/pipeline/aws_stages.py", "mmp/webhook/aws_lambda.py", "mmp/backends/sagemaker.py",
                   "mmp/hosts/github.py", "mmp/tracking/rest.py", "mmp/pipeline/sns.py",
                   "mmp/backends/dlami.py", "mmp/backends/dlami_janitor.py",  # Prepare checks dlami; Conclude, janitor terminate
                   "mmp/backends/kubernetes/backend.py",  # Prepare checks a kubernetes experiment too
                   "mmp/hosts/gitlab.py", "mmp/hosts/codecommit.py"):  # every host is named by string, as backends are
        assert module in names
    for heavy in ("mmp/infra/", "mmp/commands/", "mmp/cli.py", "mmp/backends/local.py"):
        assert not any(n.startswith(heavy) for n in names), heavy
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_zip_is_deterministic(package, tmp_path):
    again = lambda_package.build(tmp_path / "again.zip")
    assert again.sha256 == package.sha256 and again.source_code_hash == package.source_code_hash


# The oldest boto3 mmp supports (pyproject's floor): no newer than what any python3.11 Lambda runtime ships.
RUNTIME_BOTO3 = "boto3==1.34.0"


@pytest.fixture(scope="session")
def runtime_venv() -> Path:
    """A clean venv of the runtime's Python (3.11) holding only boto3, cached under build/venvs/."""
    python = shutil.which(f"python{lambda_package.TARGET.python_version}")
    if python is None:
        pytest.skip(f"no python{lambda_package.TARGET.python_version} on this machine")
    venv = ROOT / "build" / "venvs" / f"lambda-py{lambda_package.TARGET.python_version}-{RUNTIME_BOTO3.replace('==', '-')}"
    if not (venv / ".complete").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", RUNTIME_BOTO3], check=True, timeout=900)
        (venv / ".complete").write_text(RUNTIME_BOTO3 + "\n")
    return venv


def test_handlers_import_from_the_zip_in_a_clean_runtime(package, runtime_venv, tmp_path):
    """The runtime's Python with only boto3, the unpacked zip first on the path (Lambda unpacks it
    to /var/task): every handler imports, pydantic_core's native module loads, nothing heavy comes."""
    task = tmp_path / "task"
    zipfile.ZipFile(package.path).extractall(task)
    code = f"""
import sys, importlib
sys.path.insert(0, {str(task)!r})
for handler in {list(lambda_package.HANDLERS.values())!r}:
    module, _, attr = handler.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr)), handler
for module in {list(lambda_package.EXTRA_ROOTS)!r}:  # every backend and host the registries name by string
    importlib.import_module(module)
import pydantic_core._pydantic_core as native
print("NATIVE", native.__file__)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {list(FORBIDDEN)!r})
print("HEAVY", heavy)
print("FROM", importlib.import_module("mmp").__file__)
"""
    out = subprocess.run([str(runtime_venv / "bin" / "python"), "-I", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert f"FROM {task}/mmp/__init__.py" in out.stdout  # mmp came from the zip, not the checkout
    assert f"NATIVE {task}/pydantic_core/" in out.stdout


def _native_modules(names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".so")]


def test_native_wheels_are_the_runtimes_whatever_the_host(package, tmp_path):
    """The zip's native code is CPython 3.11 manylinux x86_64 (the functions' runtime). Asking for
    another target gets that target's wheels from the same host, so the choice is pip's
    --platform/--python-version, never the building interpreter's."""
    assert _native_modules(zipfile.ZipFile(package.path).namelist()) == [
        "pydantic_core/_pydantic_core.cpython-311-x86_64-linux-gnu.so"]
    site = lambda_package.site_packages()
    wheel = next(site.glob("pydantic_core-*.dist-info")) / "WHEEL"
    tags = [line.split(": ", 1)[1] for line in wheel.read_text().splitlines() if line.startswith("Tag: ")]
    assert tags and all(t.startswith("cp311-cp311-manylinux") and t.endswith("_x86_64") for t in tags), tags

    other = lambda_package.Target(python_version="3.12", platform="manylinux2014_aarch64")
    assert (sys.version_info[:2], os.uname().machine) != ((3, 12), "aarch64")  # a host that is not the target
    built = lambda_package.build(tmp_path / "other.zip", other)
    assert _native_modules(zipfile.ZipFile(built.path).namelist()) == [
        f"pydantic_core/_pydantic_core.{other.abi_tag}.so"] == [
        "pydantic_core/_pydantic_core.cpython-312-aarch64-linux-gnu.so"]


def test_a_heavy_module_level_import_fails_the_build(tmp_path, monkeypatch):
    bad = tmp_path / "mmp"
    (bad / "pipeline").mkdir(parents=True)
    (bad / "__init__.py").write_text("")
    (bad / "pipeline" / "aws_stages.py").write_text("import mlflow\n\ndef prepare(event, context):\n    import torch\n")
    monkeypatch.setattr(lambda_package, "MMP_ROOT", bad)
    with pytest.raises(lambda_package.PackageError, match="mmp.pipeline.aws_stages imports mlflow at module level"):
        lambda_package.mmp_modules(("mmp.pipeline.aws_stages",))
    (bad / "pipeline" / "aws_stages.py").write_text("def prepare(event, context):\n    import torch\n")
    assert lambda_package.mmp_modules(("mmp.pipeline.aws_stages",)) == ("mmp", "mmp.pipeline", "mmp.pipeline.aws_stages")


def test_two_builds_at_once_install_the_bundled_packages_once(tmp_path, monkeypatch):
    """Two programs (two stacks, two test workers) building at once share one pip install: the
    second waits for the first's lock, then finds the folder complete."""
    installs: list[Path] = []

    def pip(command, **kwargs):
        target = Path(command[command.index("--target") + 1])
        installs.append(target)
        (target / "pydantic").mkdir(parents=True)
        started.set()
        time.sleep(0.5)  # the other build asks meanwhile; without the lock it would install too
        return subprocess.CompletedProcess(command, 0, "", "")

    started = threading.Event()
    monkeypatch.setattr(lambda_package.subprocess, "run", pip)
    found: list[Path] = []
    first = threading.Thread(target=lambda: found.append(lambda_package.site_packages(root=tmp_path)))
    first.start()
    assert started.wait(60)
    found.append(lambda_package.site_packages(root=tmp_path))
    first.join(60)
    assert len(installs) == 1 and found[0] == found[1] and (found[0] / ".complete").is_file()
    assert (found[0] / "pydantic").is_dir() and not installs[0].exists()  # the install, moved into place
