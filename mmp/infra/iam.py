"""IAM helpers: inline least-privilege roles built from statements.

Every role MMP makes goes through `service_role`, so the rule "no `*` action on a
`*` resource" is enforced in one place (`check_document` raises before the role is
declared). Resources are the stack's own ARNs: its buckets, tables, topics,
secrets, log groups and the training-job name prefix.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import pulumi
import pulumi_aws as aws

from mmp.pipeline import run_record


def statement(actions: Sequence[str], resources: Sequence[Any], condition: dict | None = None) -> dict:
    st: dict[str, Any] = {"Effect": "Allow", "Action": list(actions), "Resource": list(resources)}
    if condition:
        st["Condition"] = condition
    return st


def deny(actions: Sequence[str], resources: Sequence[Any]) -> dict:
    """An explicit Deny: it wins over any Allow in the role's policies (IAM policy evaluation logic)."""
    return {**statement(actions, resources), "Effect": "Deny"}


def run_record_arn(artifacts_arn: pulumi.Input[str]) -> pulumi.Output[str]:
    """The pipeline's record of the runs it created (mmp.pipeline.run_record), in the artifacts bucket."""
    return pulumi.Output.concat(artifacts_arn, f"/{run_record.PREFIX}/*")


def run_record_writer(artifacts_arn: pulumi.Input[str]) -> dict:
    """Record a run the pipeline created (Prepare in the stages, a study's trials in the runner task)."""
    return statement(["s3:PutObject"], [run_record_arn(artifacts_arn)])


def run_record_reader(artifacts_arn: pulumi.Input[str]) -> dict:
    """Ask whether a run is recorded (promotion lists the one key: ListBucket on that prefix only)."""
    return statement(["s3:ListBucket"], [artifacts_arn],
                     {"StringLike": {"s3:prefix": f"{run_record.PREFIX}/*"}})


def run_record_guard(artifacts_arn: pulumi.Input[str]) -> dict:
    """For roles that run train.py and may write the rest of the artifacts bucket: never the record,
    or any train.py could make its forged runs promotable."""
    return deny(["s3:PutObject", "s3:DeleteObject"], [run_record_arn(artifacts_arn)])


def check_document(doc: dict) -> dict:
    """Refuse a document that allows every action, or a service's every action, on every resource."""
    for st in doc.get("Statement", []):
        actions = st.get("Action", [])
        resources = st.get("Resource", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        if st.get("Effect") == "Allow" and "*" in resources and any(a == "*" or a.endswith(":*") for a in actions):
            raise ValueError(f"IAM statement allows {actions} on every resource: {st}")
        if any(a == "*" for a in actions):
            raise ValueError(f"IAM statement allows every action: {st}")
    return doc


def document(statements: Sequence[dict]) -> pulumi.Output[str]:
    """A policy JSON from statements whose resources may be Outputs."""
    resolved = pulumi.Output.from_input(list(statements))
    return resolved.apply(lambda sts: json.dumps(check_document({"Version": "2012-10-17", "Statement": sts})))


ASSUME_ACTIONS = ("sts:AssumeRole",)
# EKS Pod Identity's trust: pods.eks.amazonaws.com assumes the role and tags the session (EKS user guide,
# "Create IAM role with trust policy required by EKS Pod Identity").
POD_IDENTITY_SERVICE = "pods.eks.amazonaws.com"
POD_IDENTITY_ACTIONS = ("sts:AssumeRole", "sts:TagSession")


def assume_policy(service: str, actions: Sequence[str] = ASSUME_ACTIONS) -> str:
    action: Any = actions[0] if len(actions) == 1 else list(actions)
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": service}, "Action": action}]})


def service_role(name: str, service: str, statements: Sequence[dict], parent: pulumi.Resource,
                 *, description: str = "", assume_actions: Sequence[str] = ASSUME_ACTIONS) -> aws.iam.Role:
    """A role `service` may assume, with one inline policy made of `statements`."""
    opts = pulumi.ResourceOptions(parent=parent)
    role = aws.iam.Role(name, assume_role_policy=assume_policy(service, assume_actions), description=description,
                        opts=opts)
    role.mmp_policy = aws.iam.RolePolicy(name, role=role.id, policy=document(statements), opts=opts)
    return role


def pod_identity_role(name: str, statements: Sequence[dict], parent: pulumi.Resource, *,
                      description: str = "") -> aws.iam.Role:
    """A role pods of one service account assume through an EKS Pod Identity association."""
    return service_role(name, POD_IDENTITY_SERVICE, statements, parent, description=description,
                        assume_actions=POD_IDENTITY_ACTIONS)


def managed_role(name: str, service: str, policy_arns: Sequence[str], parent: pulumi.Resource, *,
                 description: str = "", assume_actions: Sequence[str] = ASSUME_ACTIONS) -> aws.iam.Role:
    """A role made of AWS managed policies only, where AWS documents exactly those for the service
    (EKS's cluster and node roles: their actions change with EKS, and AWS keeps the policies current)."""
    opts = pulumi.ResourceOptions(parent=parent)
    role = aws.iam.Role(name, assume_role_policy=assume_policy(service, assume_actions), description=description,
                        opts=opts)
    role.mmp_attachments = [aws.iam.RolePolicyAttachment(f"{name}-{arn.rsplit('/', 1)[1]}", role=role.name,
                                                         policy_arn=arn, opts=opts) for arn in policy_arns]
    return role


def training_statements(datasets_arn: pulumi.Input[str], artifacts_arn: pulumi.Input[str], *,
                        mlflow_password_secret_arn: pulumi.Input[str] | None,
                        mlflow_tracking_server_arn: pulumi.Input[str] | None) -> list[dict]:
    """What train.py's ranks call wherever the stack runs them itself (DLAMI hosts, Kubernetes pods): read
    the datasets, read and write artifacts (never the run record), read the MLflow password, sign MLflow."""
    statements = [
        statement(["s3:ListBucket", "s3:GetBucketLocation"], [datasets_arn, artifacts_arn]),
        statement(["s3:GetObject"], [pulumi.Output.concat(datasets_arn, "/*")]),
        statement(["s3:GetObject", "s3:PutObject"], [pulumi.Output.concat(artifacts_arn, "/*")]),
        run_record_guard(artifacts_arn),
    ]
    if mlflow_password_secret_arn:
        statements.append(statement(["secretsmanager:GetSecretValue"], [mlflow_password_secret_arn]))
    if mlflow_tracking_server_arn:  # train.py's MLflow client, signed by the sagemaker-mlflow plugin
        statements.append(mlflow_statement(mlflow_tracking_server_arn, MLFLOW_TRAINING_ACTIONS))
    return statements


def policy_of(role: aws.iam.Role) -> aws.iam.RolePolicy:
    """The inline policy `service_role` attached: depend on it, not on the role, before a service
    first uses the role (the role alone exists before its permissions do)."""
    return role.mmp_policy


def log_group_arns(region: str, account: pulumi.Input[str], group: pulumi.Input[str]) -> list[pulumi.Output[str]]:
    """The log group and its streams (CreateLogStream/PutLogEvents need the `:*` form)."""
    arn = pulumi.Output.concat("arn:aws:logs:", region, ":", account, ":log-group:", group)
    return [arn, pulumi.Output.concat(arn, ":*")]


def logs_statement(region: str, account: pulumi.Input[str], groups: Sequence[pulumi.Input[str]]) -> dict:
    resources = [arn for g in groups for arn in log_group_arns(region, account, g)]
    return statement(["logs:CreateLogStream", "logs:PutLogEvents"], resources)


def sync_rule_statement(region: str, account: pulumi.Input[str], rule: str) -> dict:
    """The managed EventBridge rule through which a Step Functions `.sync` integration hears its job end."""
    return statement(["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                     [pulumi.Output.concat("arn:aws:events:", region, ":", account, ":rule/", rule)])


ECR_PULL_ACTIONS = ("ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
ECR_PUSH_ACTIONS = ("ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage",
                    "ecr:DescribeImages")


def ecr_statements(repository_arn: pulumi.Input[str], *, push: bool = False) -> list[dict]:
    """Log in to ECR (account-wide by design: GetAuthorizationToken has no resource form) and pull
    from one repository, or also push to it (the image builds)."""
    actions = [*ECR_PULL_ACTIONS, *(ECR_PUSH_ACTIONS if push else ())]
    return [statement(["ecr:GetAuthorizationToken"], ["*"]), statement(actions, [repository_arn])]


# SageMaker managed MLflow authorises each REST call as an action on the tracking server's ARN,
# named as the MLflow API call (AWS's Service Authorization Reference, "Amazon SageMaker with MLflow").
MLFLOW_PIPELINE_ACTIONS = ("GetExperimentByName", "CreateExperiment", "CreateRun", "GetRun", "LogBatch",
                           "UpdateRun", "SearchExperiments", "SearchRuns",
                           "SetExperimentTag",  # what mmp.tracking.rest calls (the ownership check included)
                           "RestoreExperiment")  # an experiment deleted in the UI comes back on the next run
# The runner task: promotion's MLflow client (through the sagemaker-mlflow plugin) and a study's pruning reads
# (GetMetricHistory, over mmp.tracking.rest).
MLFLOW_RUNNER_ACTIONS = (*MLFLOW_PIPELINE_ACTIONS, "GetMetricHistory", "ListArtifacts", "SearchLoggedModels",
                         "GetRegisteredModel", "CreateRegisteredModel", "SetRegisteredModelTag", "SearchModelVersions",
                         "CreateModelVersion", "GetModelVersion", "SetModelVersionTag", "SetRegisteredModelAlias",
                         "GetModelVersionByAlias")
MLFLOW_TRAINING_ACTIONS = ("Get*", "Search*", "List*", "Log*", "Set*", "Create*", "Update*", "StartTrace",
                           "EndTrace")  # train.py's MLflow client; not AccessUI (people, "*" only) nor Delete*


def mlflow_statement(tracking_server_arn: pulumi.Input[str], actions: Sequence[str] = MLFLOW_PIPELINE_ACTIONS) -> dict:
    """Call one SageMaker managed MLflow tracking server, and no other."""
    return statement([f"sagemaker-mlflow:{a}" for a in actions], [tracking_server_arn])


def eni_statements(region: str, account: pulumi.Input[str], actions: Sequence[str]) -> list[dict]:
    """Network interfaces in this account and region (VPC mode of SageMaker jobs and Lambdas): the
    changing actions on their ARNs, the Describe* ones on "*" (EC2 has no resource form for those)."""
    base = pulumi.Output.concat("arn:aws:ec2:", region, ":", account, ":")
    arns = [pulumi.Output.concat(base, kind, "/*") for kind in ("network-interface", "subnet", "security-group")]
    change = [a for a in actions if not a.startswith("ec2:Describe")]
    describe = [a for a in actions if a.startswith("ec2:Describe")]
    return [statement(change, arns), statement(describe, ["*"])]


# AWSLambdaVPCAccessExecutionRole's actions: a Lambda in a VPC manages its own ENIs.
LAMBDA_VPC_ACTIONS = ("ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface", "ec2:AssignPrivateIpAddresses",
                      "ec2:UnassignPrivateIpAddresses", "ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets")
# SageMaker training in VPC mode (AWS's "Give SageMaker training jobs access to resources in your VPC").
SAGEMAKER_VPC_ACTIONS = ("ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission",
                         "ec2:DeleteNetworkInterface", "ec2:DeleteNetworkInterfacePermission",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups")
