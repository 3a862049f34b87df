"""TrainingPipeline: the hand-off from the webhook, and the stages that train and report.

Step Functions (Standard) rather than SQS + Lambdas, because:
- every wait is a native `.sync` integration: SageMaker's `createTrainingJob.sync`,
  CodeBuild's `startBuild.sync` and ECS's `runTask.sync` for the runner task
  (mmp.infra.runner: DLAMI training, promotion), so no loop grows the execution's
  history (25,000 events at most) with the job's length and nothing polls;
- every run has a visible, replayable execution history (state by state), and
  Retry/Catch per state sends every failure to Conclude, which tears down;
  what ASL cannot catch (the execution's own timeout, an abort) reaches Conclude
  through an EventBridge rule on the execution's status;
- executions are named after the GitHub delivery id, a second line of dedupe.
It costs $0.025 per 1,000 state transitions: a run is about 10, whatever its length.

Stages (mmp.pipeline.aws_stages): Prepare (fetch + validate + MLflow run; upload the
commit's archive; the dependency set's image tag, mmp.contract.image) → [RunnerImage → Promote
(runner task)] → Build (CodeBuild, mmp.infra.image_build: only when that tag is not in
ECR yet) → Launch (the CreateTrainingJob request) → Train (.sync) — or RunTraining
(runner task) for dlami and kubernetes, or RunStudy (runner task) for a Tuning block — → Conclude
(teardown, MLflow, GitHub commit status, SNS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pulumi
import pulumi_aws as aws

from mmp.config import MAX_RUNTIME_CAP_MINUTES
from mmp.contract.image import CODE_PREFIX, REQUIREMENTS_PREFIX, context_digest
from mmp.infra import docker_hub, iam
from mmp.infra.codecommit import read_statements, repository_arns
from mmp.infra.image_build import (BUILD_CACHE_TAG, BUILDSPEC, CODEBUILD_IMAGE, PER_BUILD_VARIABLES,
                          build_environment_overrides, image_context)
from mmp.infra.datastore import DataStore
from mmp.infra.dlami import DlamiResources
from mmp.infra.kubernetes import KubernetesCluster
from mmp.infra.lambda_package import HANDLERS, LambdaPackage
from mmp.infra.mlflow_server import MlflowServer
from mmp.infra.network import Network
from mmp.infra.runner import CONTAINER as RUNNER_CONTAINER_NAME, RunnerTask, ec2_statements, runner_secrets
from mmp.infra.settings import Settings

STAGES = ("prepare", "launch", "conclude")
RUNNER_STATE_VARIABLE = "MMP_RUNNER_STATE"  # mmp.pipeline.aws_runner.STATE_VARIABLE
# The key of the state Prepare left in S3 for the runner (mmp.pipeline.runner_results.HANDOFF_KEY):
# ECS allows 8,192 characters of overrides, and an experiment's hyperparameters can pass that.
RUNNER_STATE_FIELDS = ("runner_state_key",)
RUNNER_STATE_FOLDER = "runner/state"
STUDY_FOLDER = "runner/study"  # mmp.pipeline.runner_results.folder("study", ...)
PROMOTION_TIMEOUT_SECONDS = 3600
# A runner task that died (its container exited non-zero: out of memory, a crash, a host
# retired under it) is started again; a study resumes from its journal in S3. Stopped,
# timed-out and aborted tasks are not retried: they end as the user or the bound wanted.
STUDY_RETRY = [{"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 30, "MaxAttempts": 2, "BackoffRate": 2.0}]
JANITOR_SCHEDULE = "rate(15 minutes)"
LAMBDA_RUNTIME = "python3.11"
SAGEMAKER_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
LAMBDA_RETRY = [{"ErrorEquals": ["Lambda.ServiceException", "Lambda.AWSLambdaException",
                                 "Lambda.SdkClientException", "Lambda.TooManyRequestsException"],
                 "IntervalSeconds": 2, "MaxAttempts": 6, "BackoffRate": 2.0}]
def lambda_task(function_arn: Any, *, next_state: str, catch_to: str | None = "Conclude",
                retry_failures: int = 0) -> dict:
    state: dict[str, Any] = {
        "Type": "Task", "Resource": "arn:aws:states:::lambda:invoke",
        "Parameters": {"FunctionName": function_arn, "Payload.$": "$"}, "OutputPath": "$.Payload",
        "Retry": list(LAMBDA_RETRY), "Next": next_state,
    }
    if retry_failures:
        state["Retry"].append({"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 15,
                               "MaxAttempts": retry_failures, "BackoffRate": 2.0})
    if catch_to:
        state["Catch"] = [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": catch_to}]
    return state


def _merge(extra: str) -> str:
    """A JSONata Output: the state as it came in, plus `extra` (a JSONata object)."""
    return "{% $merge([$states.input, " + extra + "]) %}"


def sync_task(resource: str, arguments: Any, *, timeout: Any, result: str, next_state: str, error_key: str = "error",
              catch_to: str = "Conclude", retry: list[dict] | None = None) -> dict:
    """A `.sync` Task in JSONata, so whole objects and per-run timeouts can come from the state;
    its output is the state plus `result`, and any failure (timeout included) goes on with the
    state plus `error_key`, after `retry` if given."""
    state = {
        "Type": "Task", "QueryLanguage": "JSONata", "Resource": resource, "Arguments": arguments,
        "TimeoutSeconds": timeout, "Output": _merge(result),
        "Catch": [{"ErrorEquals": ["States.ALL"], "Next": catch_to, "Output": _merge(f"{{'{error_key}': $states.errorOutput}}")}],
        "Next": next_state,
    }
    if retry:
        state["Retry"] = [dict(r) for r in retry]
    return state


def build_task(parameters: dict, *, result_path: str, next_state: str) -> dict:
    """`codebuild:startBuild.sync` of an image build: the build's id and status at `result_path`,
    CodeBuild's own throttling retried, any failure caught into Conclude."""
    return {
        "Type": "Task", "Resource": "arn:aws:states:::codebuild:startBuild.sync", "Parameters": parameters,
        "ResultSelector": {"id.$": "$.Build.Id", "status.$": "$.Build.BuildStatus"}, "ResultPath": result_path,
        "Retry": [{"ErrorEquals": ["CodeBuild.AWSCodeBuildException"], "IntervalSeconds": 30, "MaxAttempts": 2,
                   "BackoffRate": 2.0}],
        "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Conclude"}],
        "Next": next_state,
    }


def runner_task(runner: Mapping[str, Any], command: str, fields: tuple[str, ...], **kwargs: Any) -> dict:
    """`ecs:runTask.sync` of the runner task definition (mmp.infra.runner) in its subnets (private
    behind the NAT; public, with a public IP, without one), with `fields` of the state (never a
    secret; RUNNER_STATE_FIELDS: a key in S3) in MMP_RUNNER_STATE."""
    value = "{% $string({" + ", ".join(f"'{f}': $states.input.{f}" for f in fields) + "}) %}"
    arguments = {
        "Cluster": runner["cluster"], "TaskDefinition": runner["task_definition"], "LaunchType": "FARGATE",
        "NetworkConfiguration": {"AwsvpcConfiguration": {
            "Subnets": list(runner["subnets"]), "SecurityGroups": list(runner["security_groups"]),
            "AssignPublicIp": runner.get("assign_public_ip", "DISABLED")}},
        "Overrides": {"ContainerOverrides": [{"Name": RUNNER_CONTAINER_NAME, "Command": [command],
                                              "Environment": [{"Name": RUNNER_STATE_VARIABLE, "Value": value}]}]},
    }
    return sync_task("arn:aws:states:::ecs:runTask.sync", arguments, **kwargs)


def state_machine_definition(functions: Mapping[str, str], build_project: str, runner: Mapping[str, Any], *,
                             timeout_seconds: int) -> dict:
    """The Amazon States Language document (functions: stage → Lambda ARN; runner: cluster,
    task_definition, subnets, security_groups, build_project). No loop anywhere: every wait
    is a `.sync`, and every Task but Conclude catches into Conclude (or, for the promotion,
    into the training path, which ends there)."""
    return {
        "Comment": "MMP: prepare, [promote], build the image, train (SageMaker .sync or the runner task), conclude",
        "StartAt": "Prepare",
        "TimeoutSeconds": timeout_seconds,
        "States": {
            "Prepare": lambda_task(functions["prepare"], next_state="NeedsRunner?"),
            "NeedsRunner?": {"Type": "Choice", "Choices": [{"Or": [
                {"Variable": "$.promote", "BooleanEquals": True},
                {"Variable": "$.runner", "BooleanEquals": True}], "Next": "RunnerImage"}], "Default": "Accepted?"},
            "RunnerImage": build_task({"ProjectName": runner["build_project"]}, result_path="$.runner_image",
                                      next_state="Promote?"),
            "Promote?": {"Type": "Choice", "Choices": [
                {"Variable": "$.promote", "BooleanEquals": True, "Next": "Promote"}], "Default": "Accepted?"},
            "Promote": runner_task(runner, "promote", RUNNER_STATE_FIELDS, timeout=PROMOTION_TIMEOUT_SECONDS,
                                   result="{'promotion_task': $states.result.TaskArn}", next_state="Accepted?",
                                   error_key="promotion_error", catch_to="Accepted?"),
            "Accepted?": {"Type": "Choice", "Choices": [
                {"Variable": "$.accepted", "BooleanEquals": False, "Next": "Conclude"},
                {"Variable": "$.build_image", "BooleanEquals": True, "Next": "BuildImage"},
            ], "Default": "Train where?"},
            # SageMaker and the DLAMI hosts both run the dependency set's training image.
            "Train where?": {"Type": "Choice", "Choices": [
                {"Variable": "$.study", "BooleanEquals": True, "Next": "RunStudy"},
                {"Variable": "$.runner", "BooleanEquals": True, "Next": "RunTraining"}], "Default": "Launch"},
            "RunTraining": runner_task(runner, "train", RUNNER_STATE_FIELDS,
                                       timeout="{% $states.input.runner_timeout_seconds %}",
                                       result="{'runner_task': $states.result.TaskArn}", next_state="Conclude"),
            # A Tuning block: the runner runs every trial through its platform's backend and resumes after a crash.
            "RunStudy": runner_task(runner, "study", RUNNER_STATE_FIELDS,
                                    timeout="{% $states.input.runner_timeout_seconds %}",
                                    result="{'runner_task': $states.result.TaskArn}", next_state="Conclude",
                                    retry=STUDY_RETRY),
            "BuildImage": build_task({"ProjectName": build_project,
                                      "EnvironmentVariablesOverride": build_environment_overrides()},
                                     result_path="$.build", next_state="Train where?"),
            "Launch": lambda_task(functions["launch"], next_state="Launched?"),
            "Launched?": {"Type": "Choice", "Choices": [
                {"Variable": "$.status.terminal", "BooleanEquals": True, "Next": "Conclude"}], "Default": "Train"},
            "Train": sync_task("arn:aws:states:::sagemaker:createTrainingJob.sync",
                               "{% $states.input.training_request %}",
                               timeout="{% $states.input.train_timeout_seconds %}",
                               result="{'training': {'status': $states.result.TrainingJobStatus}}",
                               next_state="Conclude"),
            "Conclude": lambda_task(functions["conclude"], next_state="Succeeded?", catch_to=None, retry_failures=3),
            "Succeeded?": {"Type": "Choice", "Choices": [
                {"Variable": "$.succeeded", "BooleanEquals": True, "Next": "Done"}], "Default": "Failed"},
            "Done": {"Type": "Succeed"},
            "Failed": {"Type": "Fail", "Error": "RunFailed",
                       "Cause": "the run or the promotion failed; see the commit status, MLflow and the notification"},
        },
    }


def sagemaker_launch_statements(job_arn: pulumi.Input[str], role_arn: pulumi.Input[str]) -> list[dict]:
    """Create, follow and stop this stack's training jobs, handing them only the stack's SageMaker role."""
    return [
        iam.statement(["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
                       "sagemaker:AddTags"], [job_arn]),
        iam.statement(["iam:PassRole"], [role_arn], {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}),
    ]


def dataset_locations(settings: Settings) -> dict[str, set[str]]:
    """bucket → key prefixes of the datasets `mmp:datasets` keeps in buckets other than the stack's."""
    out: dict[str, set[str]] = {}
    for entry in settings.datasets.values():
        if entry.s3:
            bucket, _, prefix = entry.s3.removeprefix("s3://").partition("/")
            out.setdefault(bucket, set()).add(prefix)
    return out


class TrainingPipeline(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, network: Network, data: DataStore, mlflow: MlflowServer, *,
                 account: pulumi.Input[str], package: LambdaPackage, github_token: pulumi.Input[str],
                 project_root: Path, gitlab_token: pulumi.Input[str] | None = None,
                 dlami: DlamiResources | None = None, kubernetes: KubernetesCluster | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:TrainingPipeline", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region
        recovery = 7 if settings.production else 0

        # -- secrets and notification ---------------------------------------------------
        self.github_token_secret = aws.secretsmanager.Secret(
            f"{name}-github-token", description="GitHub token: read commits, set commit statuses (mmp:githubToken)",
            recovery_window_in_days=recovery, tags=tags, opts=child)
        aws.secretsmanager.SecretVersion(f"{name}-github-token", secret_id=self.github_token_secret.id,
                                         secret_string=github_token, opts=child)
        self.gitlab_token_secret = None
        if gitlab_token is not None:
            self.gitlab_token_secret = aws.secretsmanager.Secret(
                f"{name}-gitlab-token", description="GitLab project access token: read commits, set commit statuses "
                "(mmp:gitlabToken)", recovery_window_in_days=recovery, tags=tags, opts=child)
            aws.secretsmanager.SecretVersion(f"{name}-gitlab-token", secret_id=self.gitlab_token_secret.id,
                                             secret_string=gitlab_token, opts=child)
        self.topic = aws.sns.Topic(f"{name}-notify", display_name=f"MMP {settings.prefix}",
                                   kms_master_key_id="alias/aws/sns", tags=tags, opts=child)
        if settings.notify_email:
            aws.sns.TopicSubscription(f"{name}-email", topic=self.topic.arn, protocol="email",
                                      endpoint=settings.notify_email, opts=child)

        # -- the image: ECR, CodeBuild ------------------------------------------------------
        self.repository = aws.ecr.Repository(
            f"{name}-images", name=f"{settings.prefix}-training", image_tag_mutability="MUTABLE",
            image_scanning_configuration={"scan_on_push": True}, encryption_configurations=[{"encryption_type": "AES256"}],
            force_delete=not settings.production, tags=tags, opts=child)
        aws.ecr.LifecyclePolicy(f"{name}-images", repository=self.repository.name, policy=json.dumps({"rules": [
            {"rulePriority": 1, "description": "keep the layer cache",
             "selection": {"tagStatus": "tagged", "tagPrefixList": [BUILD_CACHE_TAG], "countType": "imageCountMoreThan",
                           "countNumber": 1}, "action": {"type": "expire"}},
            {"rulePriority": 2, "description": "drop untagged layers after a day",
             "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days",
                           "countNumber": 1}, "action": {"type": "expire"}},
            {"rulePriority": 3, "description": f"keep the last {settings.image_keep_count} commit images",
             "selection": {"tagStatus": "any", "countType": "imageCountMoreThan",
                           "countNumber": settings.image_keep_count}, "action": {"type": "expire"}},
        ]}), opts=child)
        source = aws.s3.BucketObjectv2(f"{name}-image-context", bucket=data.artifacts_bucket.id,
                                       key="codebuild/image-context.zip", source=image_context(project_root),
                                       opts=child)
        build_logs = aws.cloudwatch.LogGroup(f"{name}-build-logs", name=f"/mmp/{settings.prefix}/codebuild",
                                             retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        artifacts_arn = data.artifacts_bucket.arn
        build_role = iam.service_role(f"{name}-build", "codebuild.amazonaws.com", [
            iam.logs_statement(region, account, [build_logs.name]),
            # What AWS documents for an S3 source: the objects (and their versions) and the bucket's identity.
            iam.statement(["s3:GetObject", "s3:GetObjectVersion"], [pulumi.Output.concat(artifacts_arn, "/codebuild/*"),
                                                                    pulumi.Output.concat(artifacts_arn, f"/{REQUIREMENTS_PREFIX}/*")]),
            iam.statement(["s3:GetBucketAcl", "s3:GetBucketLocation"], [artifacts_arn]),
            *iam.ecr_statements(self.repository.arn, push=True),
            *docker_hub.build_statements(settings, account),
        ], self, description="CodeBuild: build the training image into ECR")
        self.build_project = aws.codebuild.Project(
            f"{name}-build", name=f"{settings.prefix}-image", service_role=build_role.arn, build_timeout=60,
            queued_timeout=60, concurrent_build_limit=settings.build_concurrency_limit,
            source={"type": "S3", "location": pulumi.Output.concat(data.artifacts_bucket.bucket, "/", source.key),
                    "buildspec": BUILDSPEC},
            artifacts={"type": "NO_ARTIFACTS"},
            cache={"type": "LOCAL", "modes": ["LOCAL_DOCKER_LAYER_CACHE", "LOCAL_SOURCE_CACHE"]},
            environment={"type": "LINUX_CONTAINER", "compute_type": settings.build_compute_type,
                         "image": CODEBUILD_IMAGE, "privileged_mode": True,
                         "image_pull_credentials_type": "CODEBUILD", "environment_variables": [
                             {"name": "ECR_REPOSITORY_URI", "value": self.repository.repository_url},
                             {"name": "ECR_REPOSITORY_NAME", "value": self.repository.name},
                             {"name": "BUILD_CACHE_TAG", "value": BUILD_CACHE_TAG},
                             *docker_hub.build_variables(settings, account)]
                         + [{"name": var, "value": "set-per-build"} for var in PER_BUILD_VARIABLES]},
            logs_config={"cloudwatch_logs": {"group_name": build_logs.name, "status": "ENABLED"}},
            tags=tags, opts=child)

        # -- SageMaker execution role ------------------------------------------------------
        datasets_arn = data.datasets_bucket.arn
        shared = dataset_locations(settings)  # datasets the catalogue names in other buckets
        sm_statements = [
            iam.statement(["s3:ListBucket", "s3:GetBucketLocation"],
                          [datasets_arn, artifacts_arn, *(f"arn:aws:s3:::{b}" for b in sorted(shared))]),
            iam.statement(["s3:GetObject"], [pulumi.Output.concat(datasets_arn, "/*"),
                                             *(f"arn:aws:s3:::{b}/{p}*" for b, ps in sorted(shared.items())
                                               for p in sorted(ps))]),
            iam.statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                          [pulumi.Output.concat(artifacts_arn, "/*")]),
            iam.run_record_guard(artifacts_arn),  # train.py runs with this role
            *iam.ecr_statements(self.repository.arn),
            iam.statement(["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                           "logs:DescribeLogStreams"], iam.log_group_arns(region, account, SAGEMAKER_LOG_GROUP)),
            iam.statement(["cloudwatch:PutMetricData"], ["*"],
                          {"StringEquals": {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"}}),
            # VPC mode (sagemaker-fsx, or every job when MLflow is narrowed): ENIs in the stack's subnets.
            *iam.eni_statements(region, account, iam.SAGEMAKER_VPC_ACTIONS),
        ]
        if mlflow.password_secret is not None:
            sm_statements.append(iam.statement(["secretsmanager:GetSecretValue"], [mlflow.password_secret.arn]))
        if mlflow.tracking_server_arn:  # train.py logs to SageMaker managed MLflow (sagemaker-mlflow plugin)
            sm_statements.append(iam.mlflow_statement(mlflow.tracking_server_arn, iam.MLFLOW_TRAINING_ACTIONS))
        if data.fsx is not None:  # DescribeFileSystems has no resource-level form: AWS evaluates it on "*"
            sm_statements.append(iam.statement(["fsx:DescribeFileSystems"], ["*"]))
        self.sagemaker_role = iam.service_role(f"{name}-sagemaker", "sagemaker.amazonaws.com", sm_statements, self,
                                               description="SageMaker training jobs of this stack")

        # -- the stage Lambdas ------------------------------------------------------------
        stages = STAGES + (("janitor",) if dlami is not None else ())  # the janitor sweeps DLAMI instances
        function_names = {stage: f"{settings.prefix}-{stage}" for stage in stages}
        log_groups = {stage: aws.cloudwatch.LogGroup(f"{name}-{stage}-logs", name=f"/aws/lambda/{fn}",
                                                     retention_in_days=settings.log_retention_days, tags=tags,
                                                     opts=child)
                      for stage, fn in function_names.items()}
        job_arn = pulumi.Output.concat("arn:aws:sagemaker:", region, ":", account, ":training-job/",
                                       settings.job_prefix, "*")
        secret_arns = [self.github_token_secret.arn] + ([mlflow.password_secret.arn] if mlflow.password_secret else []) \
            + ([self.gitlab_token_secret.arn] if self.gitlab_token_secret is not None else [])
        machine_name = f"{settings.prefix}-pipeline"
        runner_folder = pulumi.Output.concat(artifacts_arn, "/runner/*")
        stage_statements = [
            iam.logs_statement(region, account, [g.name for g in log_groups.values()]),
            # Step Functions creates the job (Train, .sync); Conclude reads, stops and tears it down, and
            # ends the warm pools of a dead study's trials (UpdateTrainingJob, KeepAlivePeriodInSeconds 0).
            iam.statement(["sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob", "sagemaker:UpdateTrainingJob"],
                          [job_arn]),
            iam.statement(["logs:GetLogEvents", "logs:FilterLogEvents", "logs:DescribeLogStreams"],
                          iam.log_group_arns(region, account, SAGEMAKER_LOG_GROUP)),
            iam.statement(["secretsmanager:GetSecretValue"], secret_arns),
            iam.statement(["sns:Publish"], [self.topic.arn]),
            iam.statement(["s3:PutObject"], [pulumi.Output.concat(artifacts_arn, "/mlflow/*")]),
            # Prepare: is the dependency set's image built? upload the commit's code and requirements
            iam.statement(["ecr:DescribeImages"], [self.repository.arn]),
            iam.statement(["s3:PutObject"], [pulumi.Output.concat(artifacts_arn, f"/{CODE_PREFIX}/*"),
                                             pulumi.Output.concat(artifacts_arn, f"/{REQUIREMENTS_PREFIX}/*")]),
            iam.statement(["s3:GetObject"], [runner_folder]),  # the runner's result object
            iam.run_record_writer(artifacts_arn),  # Prepare records the run it created
            # Prepare hands the runner task its state here (the overrides carry only the key).
            iam.statement(["s3:PutObject"], [pulumi.Output.concat(artifacts_arn, f"/{RUNNER_STATE_FOLDER}/*")]),
            # Prepare (is the commit's code staged?) and Conclude (did the runner leave a result?) list
            # those prefixes: a missing key read without s3:ListBucket answers 403 (mmp.aws.s3_keys).
            iam.statement(["s3:ListBucket"], [artifacts_arn],
                          {"StringLike": {"s3:prefix": [f"{CODE_PREFIX}/*", "runner/*"]}}),
            # Conclude from the execution-failed rule: rebuild the last state from the history.
            iam.statement(["states:GetExecutionHistory"], [pulumi.Output.concat(
                "arn:aws:states:", region, ":", account, ":execution:", machine_name, ":*")]),
        ]
        if mlflow.tracking_server_arn:  # the REST tracker signs with SigV4 (mmp.tracking.rest)
            stage_statements.append(iam.mlflow_statement(mlflow.tracking_server_arn))
        codecommit_read = read_statements(repository_arns(settings, account))  # the listed repositories only
        stage_statements += codecommit_read
        if dlami is not None:  # Conclude terminates every instance tagged with a run the runner left
            stage_statements += [
                iam.statement(["ec2:DescribeInstances"], ["*"]),  # no resource-level form
                iam.statement(["ec2:TerminateInstances"], [pulumi.Output.concat(
                    "arn:aws:ec2:", region, ":", account, ":instance/*")],
                    {"StringEquals": {"aws:ResourceTag/mmp:managed": "true"}}),
            ]
        vpc_config = None
        if settings.pipeline_in_vpc:  # MLflow admits only its NAT address: the stages leave through it
            stage_statements += iam.eni_statements(region, account, iam.LAMBDA_VPC_ACTIONS)
            vpc_config = {"subnet_ids": network.private_subnet_ids, "security_group_ids": [network.lambda_sg.id]}
        stage_role = iam.service_role(f"{name}-stages", "lambda.amazonaws.com", stage_statements, self,
                                      description="Step Functions stage Lambdas")
        stage_policy = iam.policy_of(stage_role)
        self.environment = self._environment(settings, network, data, mlflow, context_digest(project_root), dlami,
                                             kubernetes is not None)
        # Prepare checks a kubernetes experiment against the backend's settings (no cluster call): the
        # Lambdas get them, without the cluster's CA (~1.5 KB; a Lambda's environment has 4 KB).
        stage_environment = self.environment if kubernetes is None else pulumi.Output.all(
            self.environment, kubernetes.environment(self.repository.repository_url, ca=False)).apply(
            lambda a: {**a[0], **a[1]})
        self.functions: dict[str, aws.lambda_.Function] = {}
        for stage, fn in function_names.items():
            self.functions[stage] = aws.lambda_.Function(
                f"{name}-{stage}", name=fn, role=stage_role.arn, runtime=LAMBDA_RUNTIME, architectures=["x86_64"],
                handler=HANDLERS[stage], code=pulumi.FileArchive(str(package.path)),
                source_code_hash=package.source_code_hash, memory_size=512,
                timeout=900 if stage == "conclude" else 300, environment={"variables": stage_environment},
                logging_config={"log_format": "Text", "log_group": log_groups[stage].name}, vpc_config=vpc_config,
                tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[log_groups[stage], stage_policy]))

        # -- the runner task (DLAMI training, promotion, studies) -----------------------------
        task_statements = [
            iam.statement(["secretsmanager:GetSecretValue"], secret_arns),
            iam.statement(["sns:Publish"], [self.topic.arn]),
            # A study's Optuna journal and progress, beside its result (mmp.pipeline.runner_results),
            # and the state Prepare handed the task.
            iam.statement(["s3:GetObject"], [pulumi.Output.concat(artifacts_arn, f"/{STUDY_FOLDER}/*"),
                                             pulumi.Output.concat(artifacts_arn, f"/{RUNNER_STATE_FOLDER}/*")]),
            iam.statement(["s3:ListBucket"], [artifacts_arn], {"StringLike": {"s3:prefix": f"{STUDY_FOLDER}/*"}}),
            # The pipeline's record of its runs: a study's trials are recorded, promotion reads it.
            iam.run_record_writer(artifacts_arn), iam.run_record_reader(artifacts_arn),
            # Its trials on SageMaker: what the backend's launch, status, logs and cancel call.
            *sagemaker_launch_statements(job_arn, self.sagemaker_role.arn),
            # ... and the study's end gives back the warm pools its trials kept (KeepAlivePeriodInSeconds 0).
            iam.statement(["sagemaker:UpdateTrainingJob"], [job_arn]),
            iam.statement(["logs:GetLogEvents", "logs:DescribeLogStreams"],
                          iam.log_group_arns(region, account, SAGEMAKER_LOG_GROUP)),
            *codecommit_read,  # promotion and DLAMI training report on the commit's comment
        ]
        if mlflow.tracking_server_arn:  # promotion's and the study's MLflow client, signed like the stages
            task_statements.append(iam.mlflow_statement(mlflow.tracking_server_arn, iam.MLFLOW_RUNNER_ACTIONS))
        if dlami is not None:
            launch_template_arn = pulumi.Output.concat("arn:aws:ec2:", region, ":", account, ":launch-template/",
                                                       dlami.launch_template.id)
            task_statements += ec2_statements(region, account, launch_template_arn, dlami.role.arn,
                                              settings.dlami_ssm_parameter)
        # The kubernetes backend's cluster, its CA included: the runner task is the one that calls it.
        runner_environment = self.environment if kubernetes is None else pulumi.Output.all(
            self.environment, kubernetes.environment(self.repository.repository_url)).apply(lambda a: {**a[0], **a[1]})
        self.runner = RunnerTask(
            f"{name}-runner", settings, account=account, subnets=network.task_subnet_ids,
            public_ip=network.task_public_ip, vpc_id=network.vpc_id,
            artifacts_bucket=data.artifacts_bucket, environment=runner_environment,
            secrets=runner_secrets(self.github_token_secret.arn,
                                   mlflow.password_secret.arn if mlflow.password_secret else None,
                                   dlami.ssh_key_secret.arn if dlami is not None else None,
                                   self.gitlab_token_secret.arn if self.gitlab_token_secret is not None else None),
            task_statements=task_statements, project_root=project_root, opts=child)
        if dlami is not None:  # the runner dials the instances' SSH from its own security group
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-runner-ssh", security_group_id=network.training_sg.id, ip_protocol="tcp", from_port=22,
                to_port=22, referenced_security_group_id=self.runner.security_group.id,
                description="SSH from the MMP runner task", opts=child)
        if kubernetes is not None:  # the runner's role and network reach the cluster's API, namespaced
            kubernetes.admit_runner(self.runner.task_role.arn, self.runner.security_group.id)

        # -- the state machine --------------------------------------------------------------
        # Under /aws/vendedlogs/: CloudWatch Logs' resource policy for vended logs has a size limit
        # that busy accounts reach with other prefixes (AWS's Step Functions logging guide).
        sfn_logs = aws.cloudwatch.LogGroup(f"{name}-sfn-logs", name=f"/aws/vendedlogs/states/{settings.prefix}-pipeline",
                                           retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        function_arns = [self.functions[stage].arn for stage in STAGES]
        sfn_policy = [
            iam.statement(["lambda:InvokeFunction"], function_arns + [pulumi.Output.concat(a, ":*") for a in function_arns]),
            iam.statement(["codebuild:StartBuild", "codebuild:StopBuild", "codebuild:BatchGetBuilds"],
                          [self.build_project.arn]),
            iam.sync_rule_statement(region, account, "StepFunctionsGetEventForCodeBuildStartBuildRule"),
            # Train: createTrainingJob.sync (AWS's documented policy for it, scoped to the job prefix).
            *sagemaker_launch_statements(job_arn, self.sagemaker_role.arn),
            iam.statement(["sagemaker:ListTags"], ["*"]),
            iam.sync_rule_statement(region, account, "StepFunctionsGetEventsForSageMakerTrainingJobsRule"),
            *self.runner.state_machine_statements(region, account),
            # CloudWatch Logs delivery for Step Functions has no resource-level form (AWS documents "*").
            iam.statement(["logs:CreateLogDelivery", "logs:GetLogDelivery", "logs:UpdateLogDelivery",
                           "logs:DeleteLogDelivery", "logs:ListLogDeliveries", "logs:PutResourcePolicy",
                           "logs:DescribeResourcePolicies", "logs:DescribeLogGroups"], ["*"]),
        ]
        sfn_role = iam.service_role(f"{name}-sfn", "states.amazonaws.com", sfn_policy, self,
                                    description="Step Functions: the stages, the image builds, SageMaker, the runner")
        timeout = (MAX_RUNTIME_CAP_MINUTES + 3 * 60) * 60  # the longest Max_Runtime, plus build and queue
        self.definition = pulumi.Output.all(
            functions={s: self.functions[s].arn for s in STAGES}, project=self.build_project.name,
            runner=self.runner.target, runner_build=self.runner.build_project.name,
        ).apply(lambda a: json.dumps(state_machine_definition(
            a["functions"], a["project"], {**a["runner"], "build_project": a["runner_build"]},
            timeout_seconds=timeout), indent=1))
        self.state_machine = aws.sfn.StateMachine(
            f"{name}-sfn", name=machine_name, type="STANDARD", role_arn=sfn_role.arn,
            definition=self.definition, logging_configuration={
                "level": "ERROR", "include_execution_data": False,
                "log_destination": pulumi.Output.concat(sfn_logs.arn, ":*")}, tags=tags,
            # The role's inline policy must exist first, or creation races IAM and fails on the log delivery.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[iam.policy_of(sfn_role)]))

        # -- an execution that fails anyway still concludes -----------------------------------
        # ASL cannot catch the execution's own timeout, an abort, or Conclude failing: this rule
        # hands those to Conclude, which rebuilds the last state and concludes once.
        failed = aws.cloudwatch.EventRule(
            f"{name}-failed", description="MMP: conclude executions that ended without Conclude",
            event_pattern=self.state_machine.arn.apply(lambda arn: json.dumps({
                "source": ["aws.states"], "detail-type": ["Step Functions Execution Status Change"],
                "detail": {"status": ["FAILED", "TIMED_OUT", "ABORTED"], "stateMachineArn": [arn]}})),
            tags=tags, opts=child)
        aws.lambda_.Permission(f"{name}-failed", action="lambda:InvokeFunction",
                               function=self.functions["conclude"].name, principal="events.amazonaws.com",
                               source_arn=failed.arn, opts=child)
        aws.cloudwatch.EventTarget(f"{name}-failed", rule=failed.name, arn=self.functions["conclude"].arn,
                                   opts=child)
        if dlami is not None:  # instances outliving their run's Max_Runtime + slack: terminated and e-mailed
            sweep = aws.cloudwatch.EventRule(f"{name}-janitor", description="MMP: sweep stray DLAMI instances",
                                             schedule_expression=JANITOR_SCHEDULE, tags=tags, opts=child)
            aws.lambda_.Permission(f"{name}-janitor", action="lambda:InvokeFunction",
                                   function=self.functions["janitor"].name, principal="events.amazonaws.com",
                                   source_arn=sweep.arn, opts=child)
            aws.cloudwatch.EventTarget(f"{name}-janitor", rule=sweep.name, arn=self.functions["janitor"].arn,
                                       opts=child)

        self.register_outputs({
            "stateMachineArn": self.state_machine.arn, "notificationTopicArn": self.topic.arn,
            "ecrRepositoryUri": self.repository.repository_url, "buildProject": self.build_project.name,
            "sagemakerRoleArn": self.sagemaker_role.arn, "githubTokenSecretArn": self.github_token_secret.arn,
        })

    def _environment(self, settings: Settings, network: Network, data: DataStore, mlflow: MlflowServer,
                     image_context_digest: str, dlami: DlamiResources | None,
                     kubernetes: bool = False) -> pulumi.Output[dict[str, str]]:
        """What the stages and the backends they run read (see mmp.backends.sagemaker)."""
        fsx_on = data.fsx is not None
        in_vpc = fsx_on or settings.pipeline_in_vpc
        return pulumi.Output.all(
            tracking=mlflow.api_url, ui=mlflow.url, server_arn=mlflow.tracking_server_arn,
            password=mlflow.password_secret.arn if mlflow.password_secret else "",
            token=self.github_token_secret.arn, topic=self.topic.arn,
            gitlab_token=self.gitlab_token_secret.arn if self.gitlab_token_secret is not None else "", catalogue=data.catalogue_json,
            ecr=self.repository.repository_url, role=self.sagemaker_role.arn, artifacts=data.artifacts_bucket.bucket,
            subnets=network.private_subnet_ids, sgs=[network.training_sg.id], fsx_id=data.fsx_id, fsx_mount=data.fsx_mount_name,
            dlami=self._dlami_environment(settings, data, dlami),
        ).apply(lambda a: {
            **a["dlami"],
            "MMP_HOME": "/tmp/mmp",
            "MLFLOW_TRACKING_URI": a["tracking"],
            "MLFLOW_TRACKING_USERNAME": mlflow.username,
            "MMP_MLFLOW_USERNAME": mlflow.username,
            "MMP_MLFLOW_PASSWORD_SECRET_ARN": a["password"],
            "MMP_MLFLOW_UI_URL": a["ui"],
            "MMP_MLFLOW_TRACKING_SERVER_ARN": a["server_arn"] or "",
            "MMP_GITHUB_TOKEN_SECRET_ARN": a["token"],
            "MMP_GITHUB_API_URL": settings.github_api_url,
            **({"MMP_GITLAB_TOKEN_SECRET_ARN": a["gitlab_token"], "MMP_GITLAB_URL": settings.gitlab_url}
               if a["gitlab_token"] else {}),
            "MMP_NOTIFY_TOPIC_ARN": a["topic"],
            "MMP_DATASETS": a["catalogue"],
            "MMP_DEFAULT_PLATFORM": "sagemaker",
            "MMP_PIPELINE_PLATFORMS": ",".join(["sagemaker", *(["sagemaker-fsx"] if fsx_on else []),
                                                *(["dlami"] if dlami is not None else []),
                                                *(["kubernetes"] if kubernetes else [])]),
            "MMP_ECR_REPOSITORY_URI": a["ecr"],
            "MMP_IMAGE_CONTEXT_DIGEST": image_context_digest,
            "MMP_SAGEMAKER_ROLE_ARN": a["role"],
            "MMP_ARTIFACTS_BUCKET": a["artifacts"],
            "MMP_CHECKPOINT_S3_URI": f"s3://{a['artifacts']}/checkpoints",
            "MMP_SAGEMAKER_INPUT_MODE": settings.sagemaker_input_mode,
            "MMP_SAGEMAKER_VOLUME_GB": str(settings.sagemaker_volume_gb),
            "MMP_SAGEMAKER_MAX_INSTANCES": str(settings.sagemaker_max_instances),
            "MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS": str(settings.sagemaker_trial_keep_alive_seconds),
            "MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS": str(settings.sagemaker_commit_keep_alive_seconds),
            "MMP_JOB_NAME_PREFIX": settings.job_prefix,
            "MMP_STUDY_POLL_SECONDS": str(settings.poll_seconds),  # mmp.pipeline.aws_runner.study
            # VPC mode for FSx, and for every job when MLflow admits only the NAT address.
            "MMP_SUBNET_IDS": ",".join(a["subnets"]) if in_vpc else "",
            "MMP_SECURITY_GROUP_IDS": ",".join(a["sgs"]) if in_vpc else "",
            "MMP_FSX_FILE_SYSTEM_ID": a["fsx_id"] or "",
            "MMP_FSX_MOUNT_NAME": a["fsx_mount"] or "",
        })

    @staticmethod
    def _dlami_environment(settings: Settings, data: DataStore, dlami: DlamiResources | None) -> pulumi.Output[dict]:
        """What the dlami backend reads (mmp.backends.dlami.DlamiConfig), in the runner and the stages."""
        if dlami is None:
            return pulumi.Output.from_input({})
        return pulumi.Output.all(template=dlami.launch_template.id, group=dlami.placement_group.name,
                                 key=dlami.ssh_key_secret.arn, fsx=data.fsx_dns_name).apply(lambda a: {
            "MMP_DLAMI_SSM_PARAMETER": settings.dlami_ssm_parameter, "MMP_DLAMI_AMI_ID": settings.dlami_ami_id or "",
            "MMP_LAUNCH_TEMPLATE_ID": a["template"], "MMP_PLACEMENT_GROUP": a["group"],
            "MMP_SSH_KEY_SECRET_ARN": a["key"], "MMP_SSH_USER": settings.ssh_user, "MMP_FSX_DNS_NAME": a["fsx"] or "",
        })
