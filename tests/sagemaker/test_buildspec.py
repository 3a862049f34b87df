"""The CodeBuild buildspec, read and run the way CodeBuild does.

PyYAML parses it (CodeBuild rejects a command that YAML reads as a mapping:
`YAML_FILE_ERROR: Expected Commands[N] to be of string type`). Its phases then run
under bash with stand-in `aws`, `docker` and `git` on PATH, with CodeBuild's rule
that any command's non-zero exit fails the phase (and skips the later phases). The
CodeBuild docs say buildspec 0.2 keeps one shell's state across commands while 0.1
ran each in its own; the buildspec relies on neither, so both models must agree.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import iam_calls
import pytest
import yaml

from ..conftest import REGION
from mmp.contract.image import requirements_key
from mmp.infra.image_build import BUILDSPEC, PER_BUILD_VARIABLES, build_environment_overrides

ROOT = Path(__file__).resolve().parents[2]
TAG = "deps-" + "0123456789abcdef" * 2
REPO_URI = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/acme-training"

AWS_STANDIN = r"""#!/bin/bash
printf 'aws %s\n' "$*" >> "$STANDIN_LOG"
case "$1 $2" in
  "ecr get-login-password") [ -z "${STANDIN_LOGIN_FAILS:-}" ] || { echo "Unable to locate credentials" >&2; exit 253; }
                            echo "ecr-password" ;;
  "ecr describe-images") [ -n "${STANDIN_IMAGE_EXISTS:-}" ] && { echo '{"imageDetails": [{}]}'; exit 0; }
                         echo "An error occurred (ImageNotFoundException)" >&2; exit 254 ;;
  "s3 cp") src="${@: -2:1}"; dst="${@: -1}"
           [ -f "$STANDIN_S3/${src#s3://}" ] || { echo "fatal error: (404) Not Found" >&2; exit 1; }
           cp "$STANDIN_S3/${src#s3://}" "$dst" ;;
  *) echo "stand-in aws: unexpected $*" >&2; exit 2 ;;
esac
"""
# ECR with immutable tags, as a folder: one file per pushed tag, holding its manifest's media type.
# A second push of a tag gets ECR's own refusal (moby/buildkit#3776, aws/containers-roadmap#862).
REGISTRY_STANDIN = r"""
push_to_registry() {  # $1 repository-uri:tag, $2 the manifest's media type
  local repo_tag=${1##*/} stored
  stored="$STANDIN_REGISTRY/$repo_tag"
  [ -z "${STANDIN_PUSH_DENIED:-}" ] || { echo "denied: not authorized to perform: ecr:PutImage" >&2; exit 1; }
  if [ -e "$stored" ]; then
    echo "tag invalid: The image tag '${repo_tag#*:}' already exists in the '${repo_tag%%:*}' repository and cannot be overwritten because the repository is immutable." >&2
    exit 1
  fi
  echo "$2" > "$stored"
}
# What Docker pulls for a build, one reference a line in $STANDIN_PULLS: a `# syntax=` frontend, then the
# base (the BASE_IMAGE build argument, else the Dockerfile's default for it, else its FROM).
record_pulls() {  # $1 the Dockerfile, $2 the BASE_IMAGE build argument or ""
  local syntax base
  syntax=$(sed -n '1s/^# syntax=//p' "$1")
  [ -z "$syntax" ] || echo "$syntax" >> "$STANDIN_PULLS"
  base=${2:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$1")}
  [ -n "$base" ] || base=$(sed -n 's/^FROM //p' "$1" | head -1)
  echo "$base" >> "$STANDIN_PULLS"
}
"""
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"  # the one SageMaker accepts
DOCKER_STANDIN = r"""#!/bin/bash
printf 'docker %s\n' "$*" >> "$STANDIN_LOG"
""" + REGISTRY_STANDIN + r"""
case "$1" in
  login) IFS= read -r password; [ "$password" = ecr-password ] || { echo "login: wrong password" >&2; exit 1; } ;;
  buildx) if [ "$2" = create ]; then  # the docker-container driver runs BuildKit from this image
            image=moby/buildkit:buildx-stable-1
            for arg; do case "$arg" in image=*) image=${arg#image=} ;; esac; done
            echo "$image" >> "$STANDIN_PULLS"
          fi
          if [ "$2" = build ]; then
            [ -f repo/requirements.txt ] && [ -f horovod_docker/Dockerfile ] || { echo "context incomplete" >&2; exit 1; }
            [ -z "${STANDIN_BUILD_FAILS:-}" ] || exit 1
            # What buildx with the docker-container driver pushes: a provenance attestation unless
            # --provenance=false (an SBOM too with --sbom=true), either of which makes the tag an OCI
            # index; without them the image exporter's oci-mediatypes picks OCI or Docker v2 types.
            shift 2; attest=provenance; output=; tag=; file=Dockerfile; base=
            while [ $# -gt 0 ]; do
              case "$1" in
                -f|--file) file=$2; shift ;;
                --build-arg) case "$2" in BASE_IMAGE=*) base=${2#BASE_IMAGE=} ;; esac; shift ;;
                --provenance=false) attest= ;;
                --provenance=*) attest=provenance ;;
                --sbom=true) attest="$attest sbom" ;;
                --push) output=type=registry ;;
                --output|-o) output=$2; shift ;;
                --output=*) output=${1#--output=} ;;
                -t|--tag) tag=$2; shift ;;
                --cache-from|--cache-to|--label) shift ;;
              esac
              shift
            done
            record_pulls "$file" "$base"
            case ",$output," in *,type=registry,*|*,push=true,*) ;; *) echo "built, not pushed"; exit 0 ;; esac
            if [ -n "$attest" ]; then media=application/vnd.oci.image.index.v1+json
            elif [[ ",$output," == *,oci-mediatypes=true,* ]]; then media=application/vnd.oci.image.manifest.v1+json
            else media=application/vnd.docker.distribution.manifest.v2+json; fi
            push_to_registry "$tag" "$media"
          fi ;;
  *) echo "stand-in docker: unexpected $*" >&2; exit 2 ;;
esac
"""
GIT_STANDIN = "#!/bin/bash\nprintf 'git %s\\n' \"$*\" >> \"$STANDIN_LOG\"\n"


def commands(spec: dict, phase: str) -> list:
    return spec["phases"][phase]["commands"]


def run_phases(spec: dict, env: dict, cwd: Path, *, one_shell: bool) -> tuple[str | None, str]:
    """Run pre_build then build as CodeBuild would: (the failed phase or None, output)."""
    output = ""
    for phase in ("install", "pre_build", "build"):
        if phase not in spec["phases"]:
            continue
        if one_shell:
            script = "".join(f"{c}\nrc=$?; [ $rc -eq 0 ] || exit $rc\n" for c in commands(spec, phase))
            proc = subprocess.run(["bash"], input=script, env=env, cwd=cwd, capture_output=True, text=True,
                                  timeout=60)
            output += proc.stdout + proc.stderr
            if proc.returncode != 0:
                return phase, output
        else:
            for command in commands(spec, phase):
                proc = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True,
                                      timeout=60)
                output += proc.stdout + proc.stderr
                if proc.returncode != 0:
                    return phase, output
    return None, output


@pytest.fixture
def codebuild(tmp_path, iam_enforced):
    """The build's source folder (the context zip), stand-in tools, and a fake S3."""
    source = tmp_path / "src"
    (source / "horovod_docker").mkdir(parents=True)
    (source / "horovod_docker" / "Dockerfile").write_text((ROOT / "horovod_docker" / "Dockerfile").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("aws", AWS_STANDIN), ("docker", DOCKER_STANDIN), ("git", GIT_STANDIN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    s3 = tmp_path / "s3"
    requirements = s3 / "acme-artifacts" / requirements_key(TAG)
    requirements.parent.mkdir(parents=True)
    requirements.write_text("mlflow>=3.1,<4\nnumpy\n")
    log = tmp_path / "calls.log"
    log.touch()
    (tmp_path / "registry").mkdir()
    (tmp_path / "pulls.log").touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STANDIN_LOG": str(log),
           "STANDIN_S3": str(s3), "STANDIN_REGISTRY": str(tmp_path / "registry"),
           "STANDIN_PULLS": str(tmp_path / "pulls.log"), "AWS_REGION": REGION, "ECR_REPOSITORY_URI": REPO_URI,
           "ECR_REPOSITORY_NAME": "acme-training", "BUILD_CACHE_TAG": "buildcache",
           "MMP_IMAGE_TAG": TAG, "MMP_REQUIREMENTS_S3_URI": f"s3://acme-artifacts/{requirements_key(TAG)}"}
    iam_enforced.bind({"arn:aws:s3:::acme-artifacts": "arn:aws:s3:::ARTIFACTS", "repository/acme-training": "repository/TRAINING_IMAGES",
                       "repository/acme-dev-hub/": "repository/DOCKER_HUB_CACHE/"})
    yield source, env, log
    # The build's `aws` and `docker` commands, judged against the build role (tests/iam_enforce).
    iam_calls.check_cli_log(log.read_text().splitlines(), ("CodeBuild: training image", "pipeline-build"), env["AWS_REGION"])


def test_the_buildspec_is_yaml_codebuild_accepts():
    spec = yaml.safe_load(BUILDSPEC)
    assert spec["version"] == 0.2 and spec["env"]["shell"] == "bash"
    for phase, body in spec["phases"].items():
        assert all(isinstance(c, str) for c in body["commands"]), phase  # never a mapping
    assert "secrets-manager" not in spec["env"]  # the build reads no repository: no GitHub token
    text = "\n".join(c for body in spec["phases"].values() for c in body["commands"])
    assert "exit" not in text.split() and "git" not in text.split()


def test_the_build_variables_are_the_ones_the_state_machine_sets():
    spec_text = BUILDSPEC
    overrides = build_environment_overrides()
    assert [o["Name"] for o in overrides] == list(PER_BUILD_VARIABLES)
    assert all(o["Type"] == "PLAINTEXT" and o["Value.$"].startswith("$.image.") for o in overrides)
    for name in PER_BUILD_VARIABLES:
        assert f"${name}" in spec_text or f"${{{name}}}" in spec_text


@pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])
def test_a_new_dependency_set_is_built_and_pushed_with_its_tag(codebuild, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), env, source, one_shell=one_shell)
    assert failed is None, output
    calls = log.read_text().splitlines()
    assert (source / "repo" / "requirements.txt").read_text() == "mlflow>=3.1,<4\nnumpy\n"
    assert "docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com" in calls
    build = [c for c in calls if c.startswith("docker buildx build")]
    assert len(build) == 1 and f"-t {REPO_URI}:{TAG} ." in build[0]
    assert not [c for c in calls if c.startswith("git")]


@pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])
def test_the_image_is_pushed_as_a_docker_v2_manifest_sagemaker_accepts(codebuild, one_shell, tmp_path):
    """Issue 19 defect 6: buildx's default pushed an OCI index (provenance attestation), which SageMaker
    refuses; with the stand-in modelling buildx's rules, the tag must hold a Docker v2 manifest."""
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), env, source, one_shell=one_shell)
    assert failed is None, output
    assert (tmp_path / "registry" / f"acme-training:{TAG}").read_text().strip() == DOCKER_V2


def test_the_stand_in_pushes_what_buildx_pushes_by_default(codebuild, tmp_path):
    """The stand-in is not built to pass: the old command line (`--push`, attestations on) gives an index."""
    source, env, _ = codebuild
    old = f"docker buildx build --push -f horovod_docker/Dockerfile -t {REPO_URI}:{TAG} ."
    (source / "repo").mkdir()
    (source / "repo" / "requirements.txt").write_text("numpy\n")
    failed, output = run_phases({"phases": {"build": {"commands": [old]}}}, env, source, one_shell=False)
    assert failed is None, output
    assert (tmp_path / "registry" / f"acme-training:{TAG}").read_text().strip() == \
        "application/vnd.oci.image.index.v1+json"


CACHE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/acme-dev-hub"


def check_docker_hub_pulls(buildspec: str, env: dict, source: Path, pulls: Path, expected: set[str]) -> None:
    """Issue 19 defect 8, for any image buildspec: without a cache the build pulls from Docker Hub (the
    references have no registry host); with the stack's pull-through cache every pull goes through ECR."""
    failed, output = run_phases(yaml.safe_load(buildspec), env, source, one_shell=False)
    assert failed is None, output
    assert set(pulls.read_text().split()) == expected
    assert all("/" not in p or "." not in p.split("/")[0] for p in expected)  # no registry host: Docker Hub
    pulls.write_text("")
    failed, output = run_phases(yaml.safe_load(buildspec), {**env, "DOCKER_HUB_CACHE": CACHE}, source,
                                one_shell=False)
    assert failed is None, output
    assert set(pulls.read_text().split()) == {f"{CACHE}/{p if '/' in p else 'library/' + p}" for p in expected}


def test_docker_hub_is_pulled_through_the_stacks_cache_when_it_has_one(codebuild, tmp_path):
    source, env, _ = codebuild
    check_docker_hub_pulls(BUILDSPEC, env, source, tmp_path / "pulls.log",
                           {"moby/buildkit:buildx-stable-1", "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel"})


def check_push_races(buildspec: str, env: dict, source: Path, registry: Path, stored: str, one_shell: bool) -> None:
    """Issue 19 defect 11, for any image buildspec: two executions both found no image and built it; ECR
    refuses the second push of the content-hashed tag (same sources) and that build passes, saying why.
    Any other push failure still fails the phase."""
    (registry / stored).write_text(DOCKER_V2 + "\n")
    failed, output = run_phases(yaml.safe_load(buildspec), env, source, one_shell=one_shell)
    assert failed is None, output
    assert f"already exists in the '{stored.split(':')[0]}' repository" in output
    assert "pushed meanwhile by a concurrent build" in output
    (registry / stored).unlink()
    failed, output = run_phases(yaml.safe_load(buildspec), {**env, "STANDIN_PUSH_DENIED": "1"}, source,
                                one_shell=one_shell)
    assert failed == "build" and "not authorized" in output and "concurrent build" not in output, output


@pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])
def test_a_tag_pushed_meanwhile_by_a_concurrent_build_is_a_success_and_nothing_else_is(codebuild, one_shell,
                                                                                        tmp_path):
    source, env, _ = codebuild
    check_push_races(BUILDSPEC, env, source, tmp_path / "registry", f"acme-training:{TAG}", one_shell)


@pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])
def test_an_image_made_meanwhile_is_not_built_again_and_the_phase_passes(codebuild, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), {**env, "STANDIN_IMAGE_EXISTS": "1"}, source,
                                one_shell=one_shell)
    assert failed is None, output
    assert f"image {TAG} exists" in output
    assert not [c for c in log.read_text().splitlines() if c.startswith("docker buildx")]


@pytest.mark.parametrize("change, phase, words", [
    ({"MMP_IMAGE_TAG": "0" * 40}, "pre_build", "MMP_IMAGE_TAG must be deps-"),
    ({"MMP_REQUIREMENTS_S3_URI": "https://example.com/r.txt"}, "pre_build", "must be an s3:// object"),
    ({"MMP_REQUIREMENTS_S3_URI": "s3://acme-artifacts/images/other/requirements.txt"}, "pre_build", "404"),
    ({"STANDIN_LOGIN_FAILS": "1"}, "pre_build", "login: wrong password"),  # pipefail: the login sees no password
    ({"STANDIN_BUILD_FAILS": "1"}, "build", ""),
])
@pytest.mark.parametrize("one_shell", [False, True], ids=["shell-per-command", "one-shell"])
def test_every_failure_fails_its_phase(codebuild, change, phase, words, one_shell):
    source, env, log = codebuild
    failed, output = run_phases(yaml.safe_load(BUILDSPEC), {**env, **change}, source, one_shell=one_shell)
    assert failed == phase, output
    assert words in output
    if phase == "pre_build":
        assert not [c for c in log.read_text().splitlines() if c.startswith("docker buildx")]


def test_the_runner_has_codebuilds_semantics_on_the_old_defects(codebuild):
    """The two commands issue 13 names, as CodeBuild treats them (the runner above is faithful)."""
    old = ("phases:\n  build:\n    commands:\n"
           "      - git -C repo -c http.extraHeader=\"Authorization: Basic $AUTH\" fetch -q x y\n")
    assert not isinstance(commands(yaml.safe_load(old), "build")[0], str)  # a mapping: YAML_FILE_ERROR
    source, env, _ = codebuild
    skip = {"phases": {"build": {"commands": ["[ -e .mmp-skip ] && exit 0", "echo built"]}}}
    for one_shell in (False, True):
        failed, _ = run_phases(skip, env, source, one_shell=one_shell)
        assert failed == "build"  # the file is absent: `[ -e ]` exits 1, and the phase fails
    assert not (source / ".mmp-skip").exists() and os.path.isdir(source)


def test_the_state_machine_hands_codebuild_prepares_image_fields():
    from mmp.infra.pipeline import state_machine_definition

    runner = {"cluster": "arn:cluster", "task_definition": "arn:task", "subnets": ["subnet-1"],
              "security_groups": ["sg-1"], "build_project": "acme-runner-image"}
    definition = state_machine_definition({s: f"arn:{s}" for s in ("prepare", "launch", "conclude")},
                                          "acme-image", runner, timeout_seconds=3600)
    build = definition["States"]["BuildImage"]
    assert build["Parameters"] == {"ProjectName": "acme-image",
                                   "EnvironmentVariablesOverride": build_environment_overrides()}
    choice = definition["States"]["Accepted?"]["Choices"]
    assert {"Variable": "$.build_image", "BooleanEquals": True, "Next": "BuildImage"} in choice
