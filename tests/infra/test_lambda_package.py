"""The Lambda zip: only the light modules, and they import without the rest of the venv."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmp.infra import lambda_package

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
                   "mmp/github.py", "mmp/tracking_rest.py", "mmp/pipeline/sns.py"):
        assert module in names
    for heavy in ("mmp/infra/", "mmp/commands/", "mmp/cli.py", "mmp/backends/local.py", "mmp/backends/dlami.py"):
        assert not any(n.startswith(heavy) for n in names), heavy
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_zip_is_deterministic(package, tmp_path):
    again = lambda_package.build(tmp_path / "again.zip")
    assert again.sha256 == package.sha256 and again.source_code_hash == package.source_code_hash


def test_handlers_import_from_the_zip_alone(package, tmp_path):
    """A clean interpreter with only the unpacked zip (Lambda unpacks it to /var/task) and boto3,
    as Lambda has: every handler imports, and nothing heavy gets loaded on the way."""
    task = tmp_path / "task"
    zipfile.ZipFile(package.path).extractall(task)
    site = Path(__import__("boto3").__file__).parents[1]
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for name in ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six.py"):
        (runtime / name).symlink_to(site / name)
    code = f"""
import sys, importlib
sys.path[:0] = [{str(task)!r}, {str(runtime)!r}]
for handler in {list(lambda_package.HANDLERS.values())!r}:
    module, _, attr = handler.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr)), handler
importlib.import_module("mmp.backends.sagemaker")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {list(FORBIDDEN)!r})
print("HEAVY", heavy)
print("FROM", importlib.import_module("mmp").__file__)
"""
    out = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert f"FROM {task}/mmp/__init__.py" in out.stdout  # mmp came from the zip, not the checkout


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
