"""Docker Hub through an ECR pull-through cache: where the image builds pull their Docker Hub images.

Why: each build pulled the Dockerfile's base and BuildKit's own image (moby/buildkit) anonymously
from Docker Hub, whose rate limit counts CodeBuild's shared addresses, so builds failed with
`toomanyrequests`. With `mmp:dockerHubSecretArn` the stack makes an ECR pull-through cache rule
for Docker Hub (`registry-1.docker.io`) under `<prefix>-hub/`, authenticated with that secret,
and every build pulls `<account>.dkr.ecr.<region>.amazonaws.com/<prefix>-hub/<image>` instead
(official images under `library/`). AWS requires the secret's name to begin with
`ecr-pullthroughcache/`, to hold `username` and `accessToken`, and to be in the rule's account and
Region (Amazon ECR user guide: "Creating a pull through cache rule", "Storing your upstream
repository credentials in an AWS Secrets Manager secret"). Pulling through it takes
`ecr:BatchImportUpstreamImage` and, for a first pull, `ecr:CreateRepository` ("IAM permissions
required to sync an upstream registry").
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from mmp.infra import iam
from mmp.infra.settings import Settings

UPSTREAM = "registry-1.docker.io"
CACHE_VARIABLE = "DOCKER_HUB_CACHE"  # what the buildspecs' `from_hub` reads (mmp.infra.image_build)


def cache_prefix(settings: Settings) -> str:
    return f"{settings.prefix}-hub"


class DockerHubCache(pulumi.ComponentResource):
    """The stack's pull-through cache rule for Docker Hub (`rule`)."""

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:DockerHubCache", name, None, opts)
        self.rule = aws.ecr.PullThroughCacheRule(name, ecr_repository_prefix=cache_prefix(settings),
                                                 upstream_registry_url=UPSTREAM,
                                                 credential_arn=settings.docker_hub_secret_arn,
                                                 opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"prefix": self.rule.ecr_repository_prefix})


def cache_rule(name: str, settings: Settings) -> aws.ecr.PullThroughCacheRule | None:
    """The stack's pull-through cache rule, or None without `mmp:dockerHubSecretArn`."""
    return DockerHubCache(name, settings).rule if settings.docker_hub_secret_arn else None


def build_variables(settings: Settings, account: pulumi.Input[str]) -> list[dict]:
    """A CodeBuild project's environment variable naming the cache (none: pull from Docker Hub)."""
    if not settings.docker_hub_secret_arn:
        return []
    uri = pulumi.Output.concat(account, ".dkr.ecr.", settings.region, ".amazonaws.com/", cache_prefix(settings))
    return [{"name": CACHE_VARIABLE, "value": uri}]


def build_statements(settings: Settings, account: pulumi.Input[str]) -> list[dict]:
    """What a build role needs to pull through the cache: only the cache's repositories."""
    if not settings.docker_hub_secret_arn:
        return []
    cached = pulumi.Output.concat("arn:aws:ecr:", settings.region, ":", account, ":repository/",
                                  cache_prefix(settings), "/*")
    return [iam.statement([*iam.ECR_PULL_ACTIONS, "ecr:BatchImportUpstreamImage", "ecr:CreateRepository"], [cached])]
