"""The training image's CodeBuild build: its buildspec and its source (the build context).

One image per dependency set (mmp.contract.image): the state machine starts this build only
when Prepare found no image tagged with the dependency key in ECR. The build reads
no repository and holds no GitHub token: Prepare put the requirements it derived at
`$MMP_REQUIREMENTS_S3_URI`, and the context zip (horovod_docker/ and mmp/) is the
project's S3 source. The commit's code never enters the image.

CodeBuild semantics the buildspec is written for (tests/sagemaker/test_buildspec.py
runs it so): every command must be a YAML *string*; any command's non-zero exit
fails the phase; a command never relies on shell state (variables, `set` options)
from an earlier one, and none calls `exit`, so it behaves the same whether CodeBuild
runs the phase in one shell or one per command.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from mmp.contract.image import context_files

CODEBUILD_IMAGE = "aws/codebuild/standard:7.0"
# SageMaker refuses OCI manifests and indexes ("Unsupported manifest media type
# application/vnd.oci.image.manifest.v1+json", moby/buildkit#5480, aws/amazon-sagemaker-feedback#180),
# and buildx with the docker-container driver adds a provenance attestation by default, which makes
# the pushed tag an OCI index. So: no attestations, and the image exporter's `oci-mediatypes=false`
# (https://docs.docker.com/build/exporters/image-registry/): a Docker v2 schema 2 manifest.
DOCKER_V2_OUTPUT = "--provenance=false --sbom=false --output type=image,push=true,oci-mediatypes=false"
# ECR's answer to a push onto an existing immutable tag (moby/buildkit#3776, aws/containers-roadmap#862):
# "tag invalid: The image tag 'T' already exists in the 'R' repository and cannot be overwritten because
# the repository is immutable" (newer registries say "... because the tag is immutable").
TAG_EXISTS_PATTERN = "The image tag '[^']+' already exists in the '[^']+' repository and cannot be overwritten"
# A bash function both image buildspecs define, then run their push through. Two executions needing the
# same new image both build it; the second push of the content-hashed tag finds it there, made from the
# same sources, and that is a success. Any other failure keeps its exit status. The output streams to
# the build log as it comes (a long build shows its progress), and `if` keeps `set -e` from cutting the
# status capture short.
PUSH_ONCE = r"""push_once() {
  local log rc
  log=$(mktemp)
  { if "$@"; then echo 0 > "$log.rc"; else echo "$?" > "$log.rc"; fi; } 2>&1 | tee "$log"
  rc=$(cat "$log.rc")
  if [ "$rc" != 0 ] && grep -Eq "__PATTERN__" "$log"; then
    echo "the tag was pushed meanwhile by a concurrent build of the same sources; using that image"
    rc=0
  fi
  rm -f "$log" "$log.rc"
  return "$rc"
}""".replace("__PATTERN__", TAG_EXISTS_PATTERN)
# Where a build pulls a Docker Hub image: as is, or through the stack's ECR pull-through cache when the
# project names one in $DOCKER_HUB_CACHE (mmp.infra.docker_hub; official images live under `library/`).
# `base_image FILE` is the Dockerfile's `ARG BASE_IMAGE=` default, which the builds pass back that way.
FROM_HUB = r"""from_hub() {
  if [ -z "${DOCKER_HUB_CACHE:-}" ]; then echo "$1"
  else case "$1" in */*) echo "$DOCKER_HUB_CACHE/$1" ;; *) echo "$DOCKER_HUB_CACHE/library/$1" ;; esac
  fi
}
base_image() { sed -n 's/^ARG BASE_IMAGE=//p' "$1"; }"""
BUILD_FUNCTIONS = PUSH_ONCE + "\n" + FROM_HUB
BUILDKIT_IMAGE = "moby/buildkit:buildx-stable-1"  # buildx's default for its docker-container driver

BUILD_CACHE_TAG = "buildcache"
# Set per build by the state machine's BuildImage state (EnvironmentVariablesOverride).
PER_BUILD_VARIABLES = ("MMP_IMAGE_TAG", "MMP_REQUIREMENTS_S3_URI")

BUILDSPEC = r"""version: 0.2
env:
  shell: bash
phases:
  pre_build:
    commands:
      - '[[ "$MMP_IMAGE_TAG" =~ ^deps-[0-9a-f]{32}$ ]] || { echo "MMP_IMAGE_TAG must be deps-<32 hex>, got: $MMP_IMAGE_TAG" >&2; false; }'
      - '[[ "$MMP_REQUIREMENTS_S3_URI" =~ ^s3://[^/]+/.+ ]] || { echo "MMP_REQUIREMENTS_S3_URI must be an s3:// object" >&2; false; }'
      - 'mkdir -p repo && aws s3 cp --only-show-errors "$MMP_REQUIREMENTS_S3_URI" repo/requirements.txt'
      - 'set -o pipefail; aws ecr get-login-password --region "$AWS_REGION" | docker login --username AWS --password-stdin "${ECR_REPOSITORY_URI%%/*}"'
  build:
    commands:
      - |
__PUSH_ONCE__
        if aws ecr describe-images --repository-name "$ECR_REPOSITORY_NAME" --image-ids imageTag="$MMP_IMAGE_TAG" >/dev/null 2>&1; then
          echo "image $MMP_IMAGE_TAG exists (a concurrent build made it); nothing to build"
        else
          docker buildx create --use --name mmp --driver-opt "image=$(from_hub __BUILDKIT_IMAGE__)" >/dev/null \
          && push_once docker buildx build -f horovod_docker/Dockerfile __DOCKER_V2_OUTPUT__ \
            --build-arg BASE_IMAGE="$(from_hub "$(base_image horovod_docker/Dockerfile)")" \
            --cache-from "type=registry,ref=$ECR_REPOSITORY_URI:$BUILD_CACHE_TAG" \
            --cache-to "type=registry,ref=$ECR_REPOSITORY_URI:$BUILD_CACHE_TAG,mode=max,image-manifest=true,oci-mediatypes=true" \
            --label "mmp.contract.image-tag=$MMP_IMAGE_TAG" \
            -t "$ECR_REPOSITORY_URI:$MMP_IMAGE_TAG" .
        fi
""".replace("__PUSH_ONCE__", textwrap.indent(BUILD_FUNCTIONS, " " * 8)).replace(
    "__DOCKER_V2_OUTPUT__", DOCKER_V2_OUTPUT).replace("__BUILDKIT_IMAGE__", BUILDKIT_IMAGE)


def image_context(root: Path) -> Any:
    """What CodeBuild builds in (a pulumi.AssetArchive): horovod_docker/ and the mmp package,
    exactly the files mmp.contract.image.context_digest hashes."""
    import pulumi

    if not (root / "horovod_docker" / "Dockerfile").is_file():
        raise pulumi.RunError(f"{root}/horovod_docker/Dockerfile not found: the training image cannot be built")
    return pulumi.AssetArchive({str(path.relative_to(root)): pulumi.FileAsset(str(path))
                                for path in context_files(root)})


def build_environment_overrides() -> list[dict[str, str]]:
    """The BuildImage state's EnvironmentVariablesOverride: read from Prepare's `image` output."""
    return [
        {"Name": "MMP_IMAGE_TAG", "Type": "PLAINTEXT", "Value.$": "$.image.tag"},
        {"Name": "MMP_REQUIREMENTS_S3_URI", "Type": "PLAINTEXT", "Value.$": "$.image.requirements_uri"},
    ]
