"""Prepare's part for the image platforms: the code archive, the image tag, build or not.

Why here and not in CodeBuild: deciding costs two API calls (ECR DescribeImages, S3
ListObjectsV2), while a build costs minutes, so the state machine starts CodeBuild only
for a dependency set ECR has not seen (mmp.contract.image). The commit's code goes to the
artifacts bucket as the git host's archive of the commit (the tree at that sha), for the
job to unpack at start; the image never holds it. `mmp run` and the local worker take
the same step (`plan_run_image`), with `git archive` of a local commit, and no build:
there a missing image stops the run before anything starts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from mmp import aws
from mmp.hosts.base import host_for
from mmp.contract.image import ImageError, code_key, image_tag, requirements_key, requirements_text

if TYPE_CHECKING:
    from mmp.pipeline.sources import Trigger

log = logging.getLogger("mmp.pipeline.image")


@dataclass(frozen=True)
class ImagePlan:
    """What Prepare hands the state machine (`$.image`) and Launch (the LaunchRequest)."""

    tag: str
    build: bool  # no image with this tag in ECR yet: the BuildImage state runs
    code_uri: str  # s3://<artifacts>/code/<owner>/<name>/<sha>.tar.gz
    requirements_uri: str  # what CodeBuild installs (written only when it builds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _missing(exc: Exception, codes: tuple[str, ...]) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in codes


def image_exists(ecr: Any, repository_name: str, tag: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        ecr.describe_images(repositoryName=repository_name, imageIds=[{"imageTag": tag}])
    except ClientError as exc:
        if _missing(exc, ("ImageNotFoundException",)):
            return False
        raise
    return True


def object_exists(s3: Any, bucket: str, key: str) -> bool:
    """Listed, not HeadObject: the stage role lists only under code/ (see mmp.aws.s3_keys)."""
    return key in aws.s3_keys(s3, bucket, key, limit=1)  # the key itself sorts first under its own prefix


def plan_image(*, read: Callable[[str], bytes | None], tarball: Callable[[], bytes], repository: str,
               commit: str, bucket: str, ecr_repository_uri: str, context: str,
               clients: Callable[[str], Any] = aws.client) -> ImagePlan:
    """Upload the commit's code (once per commit), decide the image tag and whether to build it.

    Raises mmp.contract.image.ImageError for dependency files the build cannot use (a bad-input answer)."""
    requirements = requirements_text(read)
    tag = image_tag(requirements, context)
    s3 = clients("s3")
    key = code_key(repository, commit)
    if not object_exists(s3, bucket, key):
        s3.put_object(Bucket=bucket, Key=key, Body=tarball(), ContentType="application/gzip")
    repository_name = ecr_repository_uri.split("/", 1)[-1]
    pinned = ":" in repository_name or "@" in repository_name  # the operator pinned an image: never build
    build = not pinned and not image_exists(clients("ecr"), repository_name, tag)
    req_key = requirements_key(tag)
    if build:
        s3.put_object(Bucket=bucket, Key=req_key, Body=requirements, ContentType="text/plain")
    log.info("%s@%s: image %s (%s), code s3://%s/%s", repository, commit[:12], tag,
             "to build" if build else "built", bucket, key)
    return ImagePlan(tag=tag, build=build, code_uri=f"s3://{bucket}/{key}",
                     requirements_uri=f"s3://{bucket}/{req_key}")


class ImageNotBuilt(RuntimeError):
    """A launch outside the state machine found no image for the commit's dependency set."""


def commit_archive(trigger: "Trigger") -> bytes:
    """The tree at the trigger's commit as a .tar.gz, from its host: `git archive` of a local repository
    (committed files only, never the working tree), else the host's archive of the commit."""
    return host_for(trigger.host, trigger.clone_url).archive(trigger.repository, trigger.clone_url, trigger.commit)


def plan_run_image(trigger: "Trigger", *, bucket: str | None, ecr_repository_uri: str | None,
                   context: str | None, clients: Callable[[str], Any] = aws.client) -> ImagePlan:
    """Prepare's image step for a launch the state machine does not drive (`mmp run`, the local worker).

    Stages the commit's code like Prepare; an image that does not exist yet is an error, since
    only the stack's BuildImage state builds one. Raises ImageError (bad dependency files or
    missing settings, named) or ImageNotBuilt."""
    missing = [f"{var} is not set ({what})" for var, value, what in (
        ("MMP_ARTIFACTS_BUCKET", bucket, "the bucket the commit's code archive goes to"),
        ("MMP_ECR_REPOSITORY_URI", ecr_repository_uri, "the ECR repository of the training image"),
        ("MMP_IMAGE_CONTEXT_DIGEST", context, "the stack's image build context digest, part of the image tag"),
    ) if not value]
    if missing:
        raise ImageError("stack configuration: " + "; ".join(missing)
                         + " (the stack's `pulumi stack output backendEnv` holds them)")
    # code_key wants owner/name; a local folder has only a name
    repository = trigger.repository if "/" in trigger.repository else f"local/{trigger.repository}"
    plan = plan_image(read=trigger.source.read_file, tarball=lambda: commit_archive(trigger), repository=repository,
                      commit=trigger.commit, bucket=bucket, ecr_repository_uri=ecr_repository_uri, context=context,
                      clients=clients)
    if plan.build:
        raise ImageNotBuilt(
            f"the training image for this commit's dependencies ({ecr_repository_uri}:{plan.tag}) has not been "
            "built yet: push the commit to the repository the stack watches (its pipeline builds the image once "
            "per dependency set, in CodeBuild), then run again once that build has finished")
    return plan
