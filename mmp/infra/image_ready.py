"""ImageReady: at `pulumi up`, make sure a stack image's tag is in ECR before what runs it starts.

Why: the runner image is built by the state machine before each runner task, but the MLflow
server is an ECS service that starts at deployment, so its image (mmp.infra.stack_image) must
exist by then. This Pulumi dynamic resource runs on the deploying machine, with its AWS
credentials and boto3 (mmp's own dependency): if ECR lacks the tag it starts the image's
CodeBuild project and waits for the build, and fails `pulumi up` with the build's id and
status when the build does not succeed. An unchanged tag does nothing; a new tag (changed
sources) builds once.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ResourceProvider, UpdateResult

BUILD_DONE = {"SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT"}
POLL_SECONDS = 15
TIMEOUT_SECONDS = 45 * 60  # the project's 30-minute build timeout, plus CodeBuild's queueing


class ImageBuildError(RuntimeError):
    """The image's build did not succeed; the message names the project, build and status."""


def image_exists(ecr: Any, repository: str, tag: str) -> bool:
    try:
        ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])
        return True
    except ecr.exceptions.ImageNotFoundException:
        return False


def ensure_image(ecr: Any, codebuild: Any, *, project: str, repository: str, tag: str,
                 poll_seconds: float = POLL_SECONDS, timeout_seconds: float = TIMEOUT_SECONDS,
                 sleep: Callable[[float], None] = time.sleep) -> str:
    """The build id that made `repository:tag`, or "existing" when ECR had it already."""
    if image_exists(ecr, repository, tag):
        return "existing"
    build_id = codebuild.start_build(projectName=project)["build"]["id"]
    deadline = time.monotonic() + timeout_seconds
    while True:
        build = codebuild.batch_get_builds(ids=[build_id])["builds"][0]
        status = build["buildStatus"]
        if status == "SUCCEEDED":
            return build_id
        if status in BUILD_DONE:
            raise ImageBuildError(f"CodeBuild project {project} build {build_id} ended {status} in phase "
                                  f"{build.get('currentPhase', '?')}: {repository}:{tag} was not made; "
                                  "its log is in the project's CloudWatch log group")
        if time.monotonic() > deadline:
            raise ImageBuildError(f"CodeBuild project {project} build {build_id} still {status} after "
                                  f"{timeout_seconds:.0f} s; {repository}:{tag} is not ready")
        sleep(poll_seconds)


class _Provider(ResourceProvider):
    def _ensure(self, props: dict) -> dict:
        from mmp import aws

        build = ensure_image(aws.client("ecr", props["region"]), aws.client("codebuild", props["region"]),
                             project=props["project"], repository=props["repository"], tag=props["tag"])
        return {**props, "build": build}

    def create(self, props: dict) -> CreateResult:
        return CreateResult(id_=f"{props['repository']}:{props['tag']}", outs=self._ensure(props))

    def diff(self, _id: str, olds: dict, news: dict) -> DiffResult:
        keys = ("project", "repository", "tag", "region")
        changed = [k for k in keys if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(changed))

    def update(self, _id: str, _olds: dict, news: dict) -> UpdateResult:
        return UpdateResult(outs=self._ensure(news))


class ImageReady(pulumi.dynamic.Resource):
    """`image` resolves to `<repository uri>:<tag>` once that image is in ECR."""

    image: pulumi.Output[str]

    def __init__(self, name: str, *, project: pulumi.Input[str], repository: pulumi.Input[str],
                 repository_url: pulumi.Input[str], tag: str, region: str,
                 opts: pulumi.ResourceOptions | None = None):
        image = pulumi.Output.concat(repository_url, ":", tag)
        super().__init__(_Provider(), name, {"project": project, "repository": repository, "tag": tag,
                                             "region": region, "image": image, "build": None}, opts)
