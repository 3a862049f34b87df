"""The training image's CodeBuild build: its buildspec and its source (the build context).

One image per dependency set (mmp.image): the state machine starts this build only
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

from pathlib import Path
from typing import Any

from ..image import context_files

CODEBUILD_IMAGE = "aws/codebuild/standard:7.0"
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
        if aws ecr describe-images --repository-name "$ECR_REPOSITORY_NAME" --image-ids imageTag="$MMP_IMAGE_TAG" >/dev/null 2>&1; then
          echo "image $MMP_IMAGE_TAG exists (a concurrent build made it); nothing to build"
        else
          docker buildx create --use --name mmp >/dev/null \
          && docker buildx build --push -f horovod_docker/Dockerfile \
            --cache-from "type=registry,ref=$ECR_REPOSITORY_URI:$BUILD_CACHE_TAG" \
            --cache-to "type=registry,ref=$ECR_REPOSITORY_URI:$BUILD_CACHE_TAG,mode=max,image-manifest=true,oci-mediatypes=true" \
            --label "mmp.image-tag=$MMP_IMAGE_TAG" \
            -t "$ECR_REPOSITORY_URI:$MMP_IMAGE_TAG" .
        fi
"""


def image_context(root: Path) -> Any:
    """What CodeBuild builds in (a pulumi.AssetArchive): horovod_docker/ and the mmp package,
    exactly the files mmp.image.context_digest hashes."""
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
