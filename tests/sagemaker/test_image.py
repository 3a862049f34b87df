"""horovod_docker/: Docker cannot run here, so the Dockerfile is parsed and checked
against the build context CodeBuild stages (repo/, mmp/, horovod_docker/), its shell
steps are syntax-checked, and the `train` script it installs is run for real elsewhere
(test_entrypoint.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "horovod_docker"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in (IMAGE / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    result = []
    for line in lines:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def staged_context(tmp_path: Path) -> Path:
    """The build context as horovod_docker/README.md tells CodeBuild to stage it."""
    context = tmp_path / "context"
    shutil.copytree(ROOT / "examples" / "fashion", context / "repo")
    shutil.copytree(ROOT / "mmp", context / "mmp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(IMAGE, context / "horovod_docker")
    return context


def test_base_image_is_pinned_and_maintained():
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in steps if kind == "ARG" and "=" in a}
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    assert re.fullmatch(r"horovod/horovod:\d+\.\d+\.\d+", args["BASE_IMAGE"])  # PyTorch + Horovod, pinned


def test_openssh_and_requirements_are_installed_at_build_time():
    runs = " ".join(a for kind, a in instructions() if kind == "RUN")
    assert "openssh-server" in runs and "openssh-client" in runs
    assert "pip install --no-cache-dir -r requirements.txt" in runs
    assert "setup.py" in runs and "test -f train.py" in runs


def test_every_copy_source_exists_in_the_staged_context(tmp_path):
    context = staged_context(tmp_path)
    copies = [a.split() for kind, a in instructions() if kind == "COPY"]
    assert copies, "no COPY"
    for source, _dest in copies:
        assert (context / source).exists(), source
    dest = {source: target for source, target in copies}
    assert dest["horovod_docker/train"] == "/usr/local/bin/train"
    assert dest["mmp/"] == "/opt/mmp/mmp/"


def test_entrypoint_env_and_workdir_agree_with_the_copies():
    steps = instructions()
    entry = json.loads(next(a for kind, a in steps if kind == "ENTRYPOINT"))
    copies = dict(a.split() for kind, a in steps if kind == "COPY")
    assert entry == [copies["horovod_docker/train"]]
    env = " ".join(a for kind, a in steps if kind == "ENV")
    workdir = next(a for kind, a in steps if kind == "WORKDIR")
    assert f"MMP_CODE_DIR={workdir}" in env
    assert copies["repo/"].rstrip("/") == workdir
    assert "PYTHONPATH=/opt/mmp" in env and copies["mmp/"].startswith("/opt/mmp/")


def test_run_steps_are_valid_shell():
    for kind, arguments in instructions():
        if kind == "RUN":
            check = subprocess.run(["bash", "-n", "-c", arguments], capture_output=True, text=True)
            assert check.returncode == 0, (arguments, check.stderr)


def test_the_train_script_is_executable_and_thin():
    script = IMAGE / "train"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env python3")
    assert "from mmp.sagemaker_entrypoint import main" in text
    compile(text, str(script), "exec")


def test_the_entrypoint_imports_only_light_modules():
    code = ("import sys, mmp.sagemaker_entrypoint; "
            "print(','.join(m for m in ('mlflow','torch','paramiko','sagemaker','typer','rich','boto3') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("module", ["mmp.backends.sagemaker"])
def test_the_backend_stays_lambda_light(module):
    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('mlflow','torch','paramiko','sagemaker','typer','rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
