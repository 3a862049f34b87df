"""horovod_docker/: Docker cannot run here, so the Dockerfile is parsed and checked
against the build context CodeBuild stages (repo/requirements.txt, mmp/,
horovod_docker/), its shell steps are syntax-checked, hadolint lints it, the example's
requirements are resolved for the image's Python and platform, every module the
entrypoint runs parses as that Python, and the `train` script it installs is run for
real elsewhere (test_entrypoint.py)."""

from __future__ import annotations

import ast
import hashlib
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
# What the base image ships (horovod_docker/README.md has the evidence).
BASE_IMAGE_RE = r"pytorch/pytorch:(2\.\d+\.\d+)-cuda(12\.\d+)-cudnn\d+-devel"
IMAGE_PYTHON = (3, 11)
IMAGE_GLIBC_MINOR = 35  # Ubuntu 22.04


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
    """The build context as mmp.infra.image_build stages it: the context zip plus the
    requirements the buildspec downloads to repo/requirements.txt (no code)."""
    from mmp.contract.image import context_files

    context = tmp_path / "context"
    for path in context_files(ROOT):
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (context / "repo").mkdir()
    shutil.copy(ROOT / "examples" / "fashion" / "requirements.txt", context / "repo" / "requirements.txt")
    return context


def base_image() -> str:
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in steps if kind == "ARG" and "=" in a}
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    return args["BASE_IMAGE"]


def test_the_base_is_current_torch_2_with_cuda_12_and_pinned():
    match = re.fullmatch(BASE_IMAGE_RE, base_image())
    assert match, base_image()
    assert match.group(1).startswith("2.") and match.group(2).startswith("12.")
    assert "horovod/horovod" not in (IMAGE / "Dockerfile").read_text().split("FROM")[1]


def test_horovod_is_built_with_nccl_and_gloo_against_that_torch_with_the_cxx17_fix():
    runs = " ".join(a for kind, a in instructions() if kind == "RUN")
    for setting in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITH_GLOO=1",
                    "--no-build-isolation", "horovodrun --check-build"):
        assert setting in runs
    fix = "sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/'"
    assert fix in runs and fix in (ROOT / "scripts" / "bootstrap.sh").read_text()  # the same patch


def test_openssh_and_requirements_are_installed_at_build_time_but_no_code():
    steps = instructions()
    runs = " ".join(a for kind, a in steps if kind == "RUN")
    assert "openssh-server" in runs and "openssh-client" in runs
    assert "pip install --no-cache-dir -r /opt/requirements.txt" in runs
    sources = [a.split()[0] for kind, a in steps if kind == "COPY"]
    assert "repo/requirements.txt" in sources and "repo/" not in sources  # the code travels separately


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    proc = subprocess.run([hadolint, "--no-color", str(IMAGE / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def entrypoint_modules() -> list[Path]:
    """Every mmp module the image's `train` (and each rank's mmp.runtime.rank) imports."""
    code = ("import json, sys, mmp.runtime.sagemaker_entrypoint, mmp.runtime.rank; "
            "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) "
            "if getattr(m, '__file__', None) and m.__name__.split('.')[0] == 'mmp')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return [Path(p) for p in json.loads(out.stdout)]


def test_every_module_the_entrypoint_runs_parses_as_the_images_python():
    modules = entrypoint_modules()
    assert any(p.name == "sagemaker_entrypoint.py" for p in modules) and any(p.name == "rank.py" for p in modules)
    for path in modules + [IMAGE / "train", ROOT / "examples" / "fashion" / "train.py"]:
        ast.parse(path.read_text(), str(path), feature_version=IMAGE_PYTHON)


def pip_platforms() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


@pytest.mark.slow
def test_the_examples_requirements_resolve_for_the_images_python_and_platform():
    """pip's resolver, for CPython 3.11 on manylinux x86_64, binary wheels only (what the image's
    `pip install -r` will find). The answer is cached under build/ by the file's hash, so the
    check runs offline once it has run with PyPI reachable."""
    requirements = ROOT / "examples" / "fashion" / "requirements.txt"
    version = ".".join(map(str, IMAGE_PYTHON))
    key = hashlib.sha256(requirements.read_bytes() + f"{version} {pip_platforms()}".encode()).hexdigest()[:16]
    cache = ROOT / "build" / "image-resolve" / f"{key}.json"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        report = cache.with_suffix(".tmp")
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                "--report", str(report), "--python-version", version, "--only-binary=:all:",
                "--target", str(cache.parent / "target"), "-r", str(requirements)]
        for tag in pip_platforms():
            argv += ["--platform", tag]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report.rename(cache)
    installed = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                 for item in json.loads(cache.read_text())["install"]}
    assert int(installed["mlflow"].split(".")[0]) == 3
    assert "numpy" in installed


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
    assert "MMP_CODE_DIR" not in env  # the code is unpacked at start (/opt/ml/code), not baked in
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
    assert "from mmp.runtime.sagemaker_entrypoint import main" in text
    compile(text, str(script), "exec")


def test_the_entrypoint_imports_only_light_modules():
    code = ("import sys, mmp.runtime.sagemaker_entrypoint; "
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


def test_the_sagemaker_mlflow_plugin_is_installed_pinned_after_the_repositorys_requirements():
    """Issue 19, defect 3: train.py's client takes the managed server's ARN; without the plugin
    mlflow.start_run() fails on it. --no-deps: the repository's own mlflow pin stays as it is.
    The pin is the one the tests sign through (pyproject's dev extra) and the runner image uses."""
    import re

    runs = " && ".join(a for kind, a in instructions() if kind == "RUN")
    plugin = re.search(r"pip install --no-cache-dir --no-deps \"sagemaker-mlflow==([\d.]+)\"", runs)
    assert plugin and plugin.start() > runs.index("-r /opt/requirements.txt")
    pins = {re.search(r"sagemaker-mlflow==([\d.]+)", text).group(1) for text in (
        plugin.group(0), (ROOT / "pyproject.toml").read_text(), (ROOT / "runner_docker" / "requirements.txt").read_text())}
    assert len(pins) == 1, pins
