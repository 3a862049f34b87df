"""An image the stack builds from its own sources: the runner task's and the MLflow server's.

CodeBuild builds it into the stack's own ECR repository, so the deploying machine needs no
Docker engine (a Pulumi Docker image asset would). The tag is mmp's version plus a hash of
the image's sources and the repository's tags are immutable: a changed image gets a new tag,
an unchanged one is never rebuilt, and what runs is exactly what was built from those sources.

The buildspec is one command with no `exit` and no shell state from an earlier command, so it
behaves the same whether CodeBuild runs a phase in one shell or one per command
(mmp.infra.image_build's rules); a build that finds its tag already there does nothing, and a
push refused because a concurrent build pushed the tag meanwhile is a success (PUSH_ONCE).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pulumi
import pulumi_aws as aws

from mmp import __version__
from mmp.contract.image import context_digest, context_files
from mmp.infra import docker_hub, iam
from mmp.infra.image_build import BUILD_FUNCTIONS, CODEBUILD_IMAGE
from mmp.infra.settings import Settings

# Set on the project for each image: IMAGE_REPOSITORY_URI, IMAGE_REPOSITORY_NAME, IMAGE_TAG, IMAGE_DOCKERFILE.
BUILDSPEC = r"""version: 0.2
env:
  shell: bash
phases:
  build:
    commands:
      - |
        set -euo pipefail
__PUSH_ONCE__
        if aws ecr describe-images --repository-name "$IMAGE_REPOSITORY_NAME" --image-ids imageTag="$IMAGE_TAG" >/dev/null 2>&1; then
          echo "image $IMAGE_REPOSITORY_NAME:$IMAGE_TAG exists; nothing to build"
        else
          aws ecr get-login-password --region "$AWS_REGION" | docker login --username AWS --password-stdin "${IMAGE_REPOSITORY_URI%%/*}"
          docker build --build-arg BASE_IMAGE="$(from_hub "$(base_image "$IMAGE_DOCKERFILE")")" \
            -f "$IMAGE_DOCKERFILE" -t "$IMAGE_REPOSITORY_URI:$IMAGE_TAG" .
          push_once docker push "$IMAGE_REPOSITORY_URI:$IMAGE_TAG"
        fi
""".replace("__PUSH_ONCE__", textwrap.indent(BUILD_FUNCTIONS, " " * 8))


def image_tag(root: Path, paths: Sequence[str]) -> str:
    """mmp's version plus a hash of the image's sources (the same hash as the training image's context)."""
    return f"{__version__}-{context_digest(root, paths)[:12]}"


@dataclass
class StackImage:
    repository: aws.ecr.Repository
    build_project: aws.codebuild.Project
    tag: str

    @property
    def uri(self) -> pulumi.Output[str]:
        return pulumi.Output.concat(self.repository.repository_url, ":", self.tag)


def stack_image(name: str, kind: str, settings: Settings, *, account: pulumi.Input[str],
                artifacts_bucket: aws.s3.Bucket, project_root: Path, context_paths: Sequence[str],
                dockerfile: str, parent: pulumi.Resource) -> StackImage:
    """The ECR repository `<prefix>-<kind>`, the build context in the artifacts bucket, and the
    CodeBuild project `<prefix>-<kind>-image` that builds `dockerfile` into it (children of `parent`)."""
    child = pulumi.ResourceOptions(parent=parent)
    tags = {"mmp:deployment": settings.prefix}
    tag = image_tag(project_root, context_paths)
    repository = aws.ecr.Repository(
        f"{name}-images", name=f"{settings.prefix}-{kind}", image_tag_mutability="IMMUTABLE",
        image_scanning_configuration={"scan_on_push": True}, encryption_configurations=[{"encryption_type": "AES256"}],
        force_delete=not settings.production, tags=tags, opts=child)
    context = aws.s3.BucketObjectv2(f"{name}-context", bucket=artifacts_bucket.id,
                                    key=f"codebuild/{kind}-context-{tag}.zip",
                                    source=pulumi.AssetArchive({
                                        str(p.relative_to(project_root)): pulumi.FileAsset(str(p))
                                        for p in context_files(project_root, context_paths)}), opts=child)
    build_logs = aws.cloudwatch.LogGroup(f"{name}-build-logs", name=f"/aws/vendedlogs/mmp/{settings.prefix}/{kind}-build",
                                         retention_in_days=settings.log_retention_days, tags=tags, opts=child)
    build_role = iam.service_role(f"{name}-build", "codebuild.amazonaws.com", [
        iam.logs_statement(settings.region, account, [build_logs.name]),
        iam.statement(["s3:GetObject", "s3:GetObjectVersion"],
                      [pulumi.Output.concat(artifacts_bucket.arn, "/codebuild/*")]),
        iam.statement(["s3:GetBucketAcl", "s3:GetBucketLocation"], [artifacts_bucket.arn]),
        *iam.ecr_statements(repository.arn, push=True),
        *docker_hub.build_statements(settings, account),
    ], parent, description=f"CodeBuild: build the {kind} image into ECR")
    project = aws.codebuild.Project(
        f"{name}-build", name=f"{settings.prefix}-{kind}-image", service_role=build_role.arn, build_timeout=30,
        source={"type": "S3", "location": pulumi.Output.concat(artifacts_bucket.bucket, "/", context.key),
                "buildspec": BUILDSPEC},
        artifacts={"type": "NO_ARTIFACTS"},
        environment={"type": "LINUX_CONTAINER", "compute_type": "BUILD_GENERAL1_SMALL",
                     "image": CODEBUILD_IMAGE, "privileged_mode": True,
                     "image_pull_credentials_type": "CODEBUILD", "environment_variables": [
                         {"name": "IMAGE_REPOSITORY_URI", "value": repository.repository_url},
                         {"name": "IMAGE_REPOSITORY_NAME", "value": repository.name},
                         {"name": "IMAGE_TAG", "value": tag},
                         {"name": "IMAGE_DOCKERFILE", "value": dockerfile},
                         *docker_hub.build_variables(settings, account)]},
        logs_config={"cloudwatch_logs": {"group_name": build_logs.name, "status": "ENABLED"}},
        tags=tags, opts=child)
    return StackImage(repository, project, tag)
