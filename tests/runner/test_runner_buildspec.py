"""The stack images' CodeBuild buildspec (mmp.infra.stack_image.BUILDSPEC; the runner's and the MLflow
server's), here with the runner's values, read and run as CodeBuild does:
PyYAML parses it, then its phase runs under bash with stand-in `aws` and `docker`, in both of
CodeBuild's shell models (tests/sagemaker/test_buildspec.py's runner)."""

from __future__ import annotations

from pathlib import Path

import iam_calls
import pytest
import yaml

from mmp.infra.stack_image import BUILDSPEC

from ..conftest import REGION
from ..sagemaker.test_buildspec import (AWS_STANDIN, REGISTRY_STANDIN, check_docker_hub_pulls, check_push_races,
                                        run_phases)

ROOT = Path(__file__).resolve().parents[2]
REPO_URI = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/acme-runner"
TAG = "0.1.0-0123456789ab"
DOCKER_STANDIN = r"""#!/bin/bash
printf 'docker %s\n' "$*" >> "$STANDIN_LOG"
""" + REGISTRY_STANDIN + r"""
case "$1" in
  login) IFS= read -r password; [ "$password" = ecr-password ] || { echo "login: wrong password" >&2; exit 1; } ;;
  build) [ -f runner_docker/Dockerfile ] || { echo "context incomplete" >&2; exit 1; }
         [ -z "${STANDIN_BUILD_FAILS:-}" ] || exit 1
         file=Dockerfile; base=; shift
         while [ $# -gt 0 ]; do
           case "$1" in
             -f) file=$2; shift ;;
             --build-arg) case "$2" in BASE_IMAGE=*) base=${2#BASE_IMAGE=} ;; esac; shift ;;
           esac
           shift
         done
         record_pulls "$file" "$base" ;;
  push) push_to_registry "$2" application/vnd.docker.distribution.manifest.v2+json ;;
  *) echo "stand-in docker: unexpected $*" >&2; exit 2 ;;
esac
"""
SHELLS = pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])


@pytest.fixture
def codebuild(tmp_path, iam_enforced):
    source = tmp_path / "src"
    (source / "runner_docker").mkdir(parents=True)
    (source / "runner_docker" / "Dockerfile").write_text((ROOT / "runner_docker" / "Dockerfile").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("aws", AWS_STANDIN), ("docker", DOCKER_STANDIN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    (tmp_path / "registry").mkdir()
    (tmp_path / "pulls.log").touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STANDIN_LOG": str(log),
           "STANDIN_REGISTRY": str(tmp_path / "registry"), "STANDIN_PULLS": str(tmp_path / "pulls.log"),
           "AWS_REGION": REGION, "IMAGE_REPOSITORY_URI": REPO_URI, "IMAGE_REPOSITORY_NAME": "acme-runner",
           "IMAGE_TAG": TAG, "IMAGE_DOCKERFILE": "runner_docker/Dockerfile"}
    iam_enforced.bind({"repository/acme-runner": "repository/RUNNER_IMAGES"})
    yield source, env, log
    # The build's `aws` and `docker` commands, judged against the build role (tests/iam_enforce).
    iam_calls.check_cli_log(log.read_text().splitlines(), ("CodeBuild: runner image", "pipeline-runner-build"), env["AWS_REGION"])


def test_the_buildspec_is_yaml_codebuild_accepts_and_never_calls_exit():
    spec = yaml.safe_load(BUILDSPEC)
    assert spec["version"] == 0.2 and spec["env"]["shell"] == "bash"
    commands = [c for body in spec["phases"].values() for c in body["commands"]]
    assert commands and all(isinstance(c, str) for c in commands)
    assert "exit" not in "\n".join(commands).split()


@SHELLS
def test_a_new_runner_version_is_built_and_pushed(codebuild, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), env, source, one_shell=one_shell)
    assert failed is None, output
    calls = log.read_text().splitlines()
    assert "docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com" in calls
    assert (f"docker build --build-arg BASE_IMAGE=python:3.11.11-slim-bookworm -f runner_docker/Dockerfile "
            f"-t {REPO_URI}:{TAG} .") in calls
    assert calls[-1] == f"docker push {REPO_URI}:{TAG}"


@SHELLS
def test_an_existing_tag_builds_nothing_and_the_phase_passes(codebuild, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), {**env, "STANDIN_IMAGE_EXISTS": "1"}, source,
                                one_shell=one_shell)
    assert failed is None and f"image acme-runner:{TAG} exists" in output, output
    assert not [c for c in log.read_text().splitlines() if c.startswith("docker")]


@pytest.mark.parametrize("change, words", [({"STANDIN_LOGIN_FAILS": "1"}, "login: wrong password"),
                                           ({"STANDIN_BUILD_FAILS": "1"}, "")])
@SHELLS
def test_a_failed_login_or_build_fails_the_phase_and_pushes_nothing(codebuild, change, words, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), {**env, **change}, source, one_shell=one_shell)
    assert failed == "build" and words in output, output
    assert not [c for c in log.read_text().splitlines() if c.startswith("docker push")]


@SHELLS
def test_a_tag_pushed_meanwhile_by_a_concurrent_build_is_a_success_and_nothing_else_is(codebuild, one_shell,
                                                                                        tmp_path):
    source, env, _ = codebuild
    check_push_races(BUILDSPEC, env, source, tmp_path / "registry", f"acme-runner:{TAG}", one_shell)


@pytest.mark.parametrize("image", ["runner_docker", "mlflow_docker"])
def test_docker_hub_is_pulled_through_the_stacks_cache_when_it_has_one(codebuild, tmp_path, image):
    source, env, _ = codebuild
    (source / image).mkdir(exist_ok=True)
    (source / image / "Dockerfile").write_text((ROOT / image / "Dockerfile").read_text())
    check_docker_hub_pulls(BUILDSPEC, {**env, "IMAGE_DOCKERFILE": f"{image}/Dockerfile"}, source,
                           tmp_path / "pulls.log", {"python:3.11.11-slim-bookworm"})
