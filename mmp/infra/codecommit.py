"""CodeCommitTrigger: CodeCommit branch pushes → EventBridge rule → a small Lambda → Step Functions.

Made only when `mmp:codecommitRepositories` lists repositories. Security is IAM, not a secret:

- the rule matches `CodeCommit Repository State Change` events (referenceCreated and
  referenceUpdated on branches) whose `resources` is one of the listed repository ARNs;
- the Lambda's resource policy lets only that rule invoke it (`events.amazonaws.com` with the
  rule's ARN as the source);
- its role reads only those repositories (GetCommit, GetRepository, GetDifferences), claims
  event ids in the webhook's deliveries table and starts the pipeline's state machine;
- the pipeline's stage and runner roles get `read_statements` (files, folders, blobs, commit,
  differences, comments) on the same ARNs, nothing account-wide.
EventBridge invokes the Lambda asynchronously: Lambda retries a failed invocation twice
(mmp.webhook.codecommit_lambda raises when CodeCommit or the hand-off failed).
"""

from __future__ import annotations

import json
from typing import Sequence

import pulumi
import pulumi_aws as aws

from mmp.infra import iam
from mmp.infra.lambda_package import HANDLERS, LambdaPackage
from mmp.infra.settings import CODECOMMIT_ARN_RE, Settings

DETAIL_TYPE = "CodeCommit Repository State Change"
# what the trigger Lambda calls (mmp.webhook.codecommit) and what the pipeline calls (mmp.hosts.codecommit)
TRIGGER_ACTIONS = ("codecommit:GetCommit", "codecommit:GetRepository", "codecommit:GetDifferences")
PIPELINE_ACTIONS = ("codecommit:GetFile", "codecommit:GetFolder", "codecommit:GetBlob", "codecommit:GetCommit",
                    "codecommit:GetDifferences", "codecommit:GetCommentsForComparedCommit",
                    "codecommit:PostCommentForComparedCommit", "codecommit:UpdateComment")


def repository_arns(settings: Settings, account: pulumi.Input[str]) -> list[pulumi.Output[str]]:
    """The listed repositories as ARNs: a bare name is in the stack's own account and region."""
    out = []
    for entry in settings.codecommit_repositories:
        if CODECOMMIT_ARN_RE.fullmatch(entry):
            out.append(pulumi.Output.from_input(entry))
        else:
            out.append(pulumi.Output.concat("arn:aws:codecommit:", settings.region, ":", account, ":", entry))
    return out


def read_statements(arns: Sequence[pulumi.Input[str]]) -> list[dict]:
    """What the pipeline's roles need to read a CodeCommit commit and keep its status comment."""
    return [iam.statement(list(PIPELINE_ACTIONS), list(arns))] if arns else []


def event_pattern(arns: Sequence[str]) -> str:
    return json.dumps({"source": ["aws.codecommit"], "detail-type": [DETAIL_TYPE], "resources": list(arns),
                       "detail": {"event": ["referenceCreated", "referenceUpdated"], "referenceType": ["branch"]}})


class CodeCommitTrigger(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, *, account: pulumi.Input[str], package: LambdaPackage,
                 deliveries_table: aws.dynamodb.Table, state_machine_arn: pulumi.Input[str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:CodeCommitTrigger", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region
        arns = repository_arns(settings, account)
        self.repository_arns = pulumi.Output.all(*arns)

        function_name = f"{settings.prefix}-codecommit"
        log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/aws/lambda/{function_name}",
                                            retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        role = iam.service_role(f"{name}-trigger", "lambda.amazonaws.com", [
            iam.logs_statement(region, account, [log_group.name]),
            iam.statement(["dynamodb:PutItem", "dynamodb:DeleteItem"], [deliveries_table.arn]),
            iam.statement(["states:StartExecution"], [state_machine_arn]),
            iam.statement(list(TRIGGER_ACTIONS), arns),
        ], self, description="the CodeCommit trigger Lambda")
        self.function = aws.lambda_.Function(
            f"{name}-handler", name=function_name, role=role.arn, runtime="python3.11", architectures=["x86_64"],
            handler=HANDLERS["codecommit"], code=pulumi.FileArchive(str(package.path)),
            source_code_hash=package.source_code_hash, memory_size=256, timeout=60,
            environment={"variables": {
                "MMP_HOME": "/tmp/mmp",
                "MMP_CODECOMMIT_REPOSITORIES": self.repository_arns.apply(",".join),
                "MMP_DELIVERIES_TABLE": deliveries_table.name,
                "MMP_DELIVERY_TTL_DAYS": str(settings.delivery_ttl_days),
                "MMP_STATE_MACHINE_ARN": state_machine_arn,
            }},
            logging_config={"log_format": "Text", "log_group": log_group.name}, tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group, iam.policy_of(role)]))
        self.rule = aws.cloudwatch.EventRule(
            f"{name}-rule", name=f"{settings.prefix}-codecommit-push",
            description="CodeCommit branch pushes to the repositories MMP listens to",
            event_pattern=self.repository_arns.apply(event_pattern), tags=tags, opts=child)
        permission = aws.lambda_.Permission(f"{name}-invoke", action="lambda:InvokeFunction",
                                            function=self.function.name, principal="events.amazonaws.com",
                                            source_arn=self.rule.arn, opts=child)
        aws.cloudwatch.EventTarget(f"{name}-target", rule=self.rule.name, arn=self.function.arn,
                                   retry_policy={"maximum_event_age_in_seconds": 3600, "maximum_retry_attempts": 8},
                                   opts=pulumi.ResourceOptions(parent=self, depends_on=[permission]))
        self.register_outputs({"functionName": self.function.name, "ruleName": self.rule.name,
                               "repositoryArns": self.repository_arns})
