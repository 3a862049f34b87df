"""RunnerTask: the ECS Fargate task that runs the pipeline's long stages (mmp.pipeline.aws_runner).

Step Functions starts it with `ecs:runTask.sync` in the stack's private subnets (the
public ones with a public IP when a stack-made VPC has no NAT gateway) for
a `Platform: dlami` push (provision, SSH, horovodrun, teardown) and for a
promote.json push (the MLflow client). Why a Fargate task: both outlive a Lambda
and need libraries a Lambda zip should not carry (paramiko, mlflow); a task costs
only while it runs (0.25 vCPU + 0.5 GiB is about $0.012 an hour) and Step Functions
waits on it for free.

The image (runner_docker/Dockerfile: mmp and its runtime dependencies, no torch) is
built by CodeBuild from the stack's own sources, tagged with mmp's version (plus a
hash of those sources); the
state machine's RunnerImage step starts that build before each runner task and the
build skips at once when the tag exists, so a new mmp version is built on its first
use without anything on the deploying machine (a Pulumi image asset would need
Docker there). Secrets (GitHub token, MLflow password, the DLAMI SSH private key)
reach the container only through the task definition's `secrets`: ECS reads them
with the execution role, allowed exactly those secrets, when the task starts (the
task role has no read of the SSH key's secret). Never through overrides, state or logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws

from mmp.aws import region_env
from mmp.backends.dlami import SSH_KEY_VAR
from mmp.infra import iam
from mmp.infra.settings import Settings
from mmp.infra.stack_image import stack_image

CONTAINER = "runner"
CPU, MEMORY = 256, 512  # the runner only waits on SSH and HTTP
STOP_TIMEOUT = 120  # Fargate's maximum: time for the runner to terminate its instances on SIGTERM
CONTEXT_PATHS = ("runner_docker", "mmp", "pyproject.toml", "README.md")

def ec2_statements(region: str, account: pulumi.Input[str], launch_template_arn: pulumi.Input[str],
                   host_role_arn: pulumi.Input[str], ssm_parameter: str) -> list[dict]:
    """What the DLAMI backend calls: RunInstances only through the stack's launch template,
    tags only at launch, terminate only MMP-managed instances."""
    ec2 = pulumi.Output.concat("arn:aws:ec2:", region, ":", account, ":")
    launched = [pulumi.Output.concat(ec2, kind, "/*") for kind in ("instance", "volume", "network-interface")]
    used = [pulumi.Output.concat(ec2, kind, "/*") for kind in ("subnet", "security-group", "placement-group",
                                                                "key-pair")]
    image = pulumi.Output.concat("arn:aws:ec2:", region, "::image/*")
    return [
        # AWS's "launch only from this launch template" pattern: every resource the call touches,
        # on the condition that the request names the stack's template.
        iam.statement(["ec2:RunInstances"], [*launched, *used, image, launch_template_arn],
                      {"ArnLike": {"ec2:LaunchTemplate": launch_template_arn}}),
        iam.statement(["ec2:CreateTags"], launched[:2], {"StringEquals": {"ec2:CreateAction": "RunInstances"}}),
        iam.statement(["ec2:TerminateInstances"], [launched[0]],
                      {"StringEquals": {"aws:ResourceTag/mmp:managed": "true"}}),
        # EC2's Describe* calls have no resource-level form (AWS documents "*").
        iam.statement(["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribePlacementGroups"], ["*"]),
        iam.statement(["iam:PassRole"], [host_role_arn], {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}),
        # AWS's public parameters have no account in their ARN; `*` matches that empty field.
        iam.statement(["ssm:GetParameter"], [f"arn:aws:ssm:{region}:*:parameter{ssm_parameter}"]),
    ]


class RunnerTask(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, *, account: pulumi.Input[str], subnets: pulumi.Input[list[str]],
                 public_ip: bool, vpc_id: pulumi.Input[str], artifacts_bucket: aws.s3.Bucket, environment: pulumi.Input[dict],
                 secrets: dict[str, pulumi.Input[str]], task_statements: list[dict], project_root: Path,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:RunnerTask", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region
        # -- the image (mmp.infra.stack_image) ------------------------------------------------
        image = stack_image(name, "runner", settings, account=account, artifacts_bucket=artifacts_bucket,
                            project_root=project_root, context_paths=CONTEXT_PATHS,
                            dockerfile="runner_docker/Dockerfile", parent=self)
        self.repository, self.build_project, self.tag = image.repository, image.build_project, image.tag

        # -- the task -----------------------------------------------------------------------
        self.log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/aws/vendedlogs/mmp/{settings.prefix}/runner",
                                                 retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        self.cluster = aws.ecs.Cluster(f"{name}-cluster", name=f"{settings.prefix}-runner", tags=tags, opts=child)
        self.execution_role = iam.service_role(f"{name}-execution", "ecs-tasks.amazonaws.com", [
            *iam.ecr_statements(self.repository.arn),
            iam.logs_statement(region, account, [self.log_group.name]),
            iam.statement(["secretsmanager:GetSecretValue"], list(secrets.values())),  # exactly those injected
        ], self, description="ECS: pull the runner image, write its logs, inject its secrets")
        self.task_role = iam.service_role(f"{name}-task", "ecs-tasks.amazonaws.com", [
            iam.statement(["s3:PutObject"], [pulumi.Output.concat(artifacts_bucket.arn, "/runner/*")]),
            *task_statements,
        ], self, description="The runner task: DLAMI instances of this stack, promotion, its result object")
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg", vpc_id=vpc_id, description="MMP runner task: egress only (SSH, MLflow, AWS APIs)",
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],
            tags=tags, opts=child)
        container = pulumi.Output.all(image=self.repository.repository_url, env=environment, secrets=secrets,
                                      logs=self.log_group.name).apply(lambda a: json.dumps([{
                                          "name": CONTAINER, "image": f"{a['image']}:{self.tag}", "essential": True,
                                          "stopTimeout": STOP_TIMEOUT,
                                          # ECS sets AWS_REGION on Fargate too (its "Amazon ECS environment
                                          # variables" page); stated here so the runner and all it starts
                                          # never depend on that (the stages' Lambdas may not set it: reserved).
                                          "environment": [{"name": k, "value": v} for k, v in sorted(
                                              {**a["env"], **region_env(region)}.items())],
                                          "secrets": [{"name": k, "valueFrom": v} for k, v in sorted(a["secrets"].items())],
                                          "logConfiguration": {"logDriver": "awslogs", "options": {
                                              "awslogs-group": a["logs"], "awslogs-region": region,
                                              "awslogs-stream-prefix": "runner"}},
                                      }]))
        family = f"{settings.prefix}-runner"
        # The family's ARN: RunTask takes its latest revision, and IAM grants `family:*`.
        self.task_definition_family_arn = pulumi.Output.concat("arn:aws:ecs:", region, ":", account,
                                                               ":task-definition/", family)
        self.task_definition = aws.ecs.TaskDefinition(
            f"{name}-task", family=family, requires_compatibilities=["FARGATE"],
            network_mode="awsvpc", cpu=str(CPU), memory=str(MEMORY), execution_role_arn=self.execution_role.arn,
            task_role_arn=self.task_role.arn, container_definitions=container,
            runtime_platform={"operating_system_family": "LINUX", "cpu_architecture": "X86_64"}, tags=tags, opts=child)
        # After the task definition: a run must never start an older revision than this deployment's.
        self.target = pulumi.Output.all(cluster=self.cluster.arn, task_definition=self.task_definition_family_arn,
                                        subnets=subnets, security_groups=[self.security_group.id],
                                        assign_public_ip="ENABLED" if public_ip else "DISABLED",
                                        _revision=self.task_definition.revision).apply(
            lambda a: {k: v for k, v in a.items() if k != "_revision"})
        self.register_outputs({"cluster": self.cluster.arn, "taskDefinition": self.task_definition.arn,
                               "repository": self.repository.repository_url, "imageTag": self.tag})

    def state_machine_statements(self, region: str, account: pulumi.Input[str]) -> list[dict]:
        """What Step Functions needs for `ecs:runTask.sync` of this task and the image build."""
        return [
            iam.statement(["ecs:RunTask"], [pulumi.Output.concat(self.task_definition_family_arn, ":*")],
                          {"ArnEquals": {"ecs:cluster": self.cluster.arn}}),
            iam.statement(["ecs:StopTask", "ecs:DescribeTasks"], [pulumi.Output.concat(
                "arn:aws:ecs:", region, ":", account, ":task/", self.cluster.name, "/*")]),
            iam.statement(["iam:PassRole"], [self.execution_role.arn, self.task_role.arn],
                          {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}),
            iam.sync_rule_statement(region, account, "StepFunctionsGetEventsForECSTaskRule"),
            iam.statement(["codebuild:StartBuild", "codebuild:StopBuild", "codebuild:BatchGetBuilds"],
                          [self.build_project.arn]),
        ]


def runner_secrets(github_token_arn: pulumi.Input[str], mlflow_password_arn: pulumi.Input[str] | None,
                   ssh_key_arn: pulumi.Input[str] | None = None, gitlab_token_arn: pulumi.Input[str] | None = None) -> dict:
    """Environment name → Secrets Manager ARN, injected by ECS (the git hosts' clients, MLflow and the
    dlami backend read these names)."""
    out: dict[str, Any] = {"GITHUB_TOKEN": github_token_arn}
    if gitlab_token_arn is not None:
        out["GITLAB_TOKEN"] = gitlab_token_arn
    if mlflow_password_arn is not None:
        out["MLFLOW_TRACKING_PASSWORD"] = mlflow_password_arn
    if ssh_key_arn is not None:
        out[SSH_KEY_VAR] = ssh_key_arn
    return out
