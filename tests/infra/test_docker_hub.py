"""Docker Hub through the stack's ECR pull-through cache (issue 19 defect 8), in the Pulumi program.

The buildspecs' side (every pull goes through the cache when the project names it) runs under bash in
tests/sagemaker/test_buildspec.py and tests/runner/test_runner_buildspec.py; here: the rule, the variable
each image build gets, the build roles' permissions, and the settings AWS would refuse, refused at preview.
"""

from __future__ import annotations

import json

import pytest

from mmp.infra.docker_hub import CACHE_VARIABLE

from .conftest import ACCOUNT, REGION

SECRET = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:ecr-pullthroughcache/docker-hub-AbCdEf"
CACHE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/acme-ml-dev-hub"


@pytest.fixture(scope="module")
def cached(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:dockerHubSecretArn": SECRET})


def build_variables(project) -> dict:
    return {v["name"]: v["value"] for v in project.inputs["environment"]["environmentVariables"]}


def test_every_image_build_pulls_through_the_cache_rule(cached):
    rule = cached.one("aws:ecr/pullThroughCacheRule:PullThroughCacheRule")
    assert rule.inputs == {"ecrRepositoryPrefix": "acme-ml-dev-hub", "upstreamRegistryUrl": "registry-1.docker.io",
                           "credentialArn": SECRET}
    projects = cached.of_type("aws:codebuild/project:Project")
    assert len(projects) == 3 and all(build_variables(p)[CACHE_VARIABLE] == CACHE for p in projects)
    assert rule.parent and rule.parent == cached.one("mmp:infra:DockerHubCache").urn
    # The MLflow image is built during the deploy: after the rule exists.
    assert rule.urn in cached.one("pulumi-python:dynamic:Resource", "mlflow-server-image").dependencies


def test_build_roles_may_pull_through_only_the_caches_repositories(cached):
    cache_arn = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/acme-ml-dev-hub/*"
    build_policies = [r for r in cached.of_type("aws:iam/rolePolicy:RolePolicy") if r.name.endswith("-build")]
    assert len(build_policies) == 3
    for policy in build_policies:
        grants = [s for s in json.loads(policy.inputs["policy"])["Statement"]
                  if "ecr:BatchImportUpstreamImage" in s["Action"]]
        assert len(grants) == 1 and grants[0]["Resource"] == [cache_arn], policy.name
        assert {"ecr:CreateRepository", "ecr:BatchGetImage"} <= set(grants[0]["Action"])


def test_without_the_setting_there_is_no_rule_and_no_variable(dev):
    assert not dev.of_type("aws:ecr/pullThroughCacheRule:PullThroughCacheRule")
    assert not [p for p in dev.of_type("aws:codebuild/project:Project") if CACHE_VARIABLE in build_variables(p)]


@pytest.mark.parametrize("arn, words", [
    (f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:docker-hub-AbCdEf", "begins with ecr-pullthroughcache/"),
    (f"arn:aws:secretsmanager:us-west-2:{ACCOUNT}:secret:ecr-pullthroughcache/hub-AbCdEf",
     f"the secret is in us-west-2; ECR's pull-through cache needs it in the stack's region {REGION}"),
])
def test_a_secret_ecr_would_refuse_is_refused_at_preview(h, arn, words):
    with pytest.raises(Exception) as info:
        h.run_stack("dev", {**h.DEV_CONFIG, "mmp:dockerHubSecretArn": arn})
    assert "dockerHubSecretArn" in str(info.value) and words in str(info.value)


def test_parliament_finds_nothing_in_the_build_roles_and_the_mlflow_execution_role(cached):
    from .iam_lint import parliament

    linter = parliament()
    names = ("pipeline-build", "pipeline-runner-build", "mlflow-server-build", "mlflow-execution")
    policies = {p.name: p.inputs["policy"] for p in cached.of_type("aws:iam/rolePolicy:RolePolicy") if p.name in names}
    assert set(policies) == set(names)
    for name, policy in policies.items():
        findings = linter.analyze_policy_string(policy.replace(f"arn:aws:iam:{REGION}:", "arn:aws:iam::")).findings
        # parliament's bundled action table predates resource-level ecr:BatchImportUpstreamImage; AWS's Service
        # Authorization Reference ("Actions, resources, and condition keys for Amazon ECR") lists it on
        # `repository*`, so the cache's repositories are its resource. Only that finding is excused.
        findings = [f for f in findings if not (f.issue == "RESOURCE_MISMATCH" and f.detail == [
            {"action": "ecr:BatchImportUpstreamImage", "required_format": "*"}])]
        assert not findings, (name, [(f.issue, f.detail) for f in findings])
