"""WebhookApi: GitHub (and GitLab) → API Gateway HTTP API → the webhook Lambda → Step Functions.

`POST /webhook` takes GitHub's deliveries; with the GitLab secrets set, `POST /webhook/gitlab` takes
GitLab's with their own secret (mmp:gitlabWebhookSecret). Both routes are (throttled on the stage: `mmp:apiRateLimit`/`mmp:apiBurstLimit`)
invokes `mmp.webhook.lambda_handler`, packaged from the mmp package with only what
it imports. The Lambda verifies the signature with the webhook secret (Secrets
Manager), claims the delivery id in DynamoDB (TTL attribute `expires_at`) and
starts the pipeline's state machine. The GitHub token secret belongs to the
pipeline (it reads commits and sets statuses); the webhook only reads it for the
compare API on long pushes.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from mmp.infra import iam
from mmp.infra.lambda_package import HANDLERS, LambdaPackage
from mmp.infra.settings import Settings

ROUTE = "POST /webhook"
GITLAB_ROUTE = "POST /webhook/gitlab"


class WebhookApi(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, name: str, settings: Settings, *, account: pulumi.Input[str], package: LambdaPackage,
                 webhook_secret: pulumi.Input[str], github_token_secret_arn: pulumi.Input[str],
                 state_machine_arn: pulumi.Input[str], gitlab_webhook_secret: pulumi.Input[str] | None = None,
                 gitlab_token_secret_arn: pulumi.Input[str] | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:WebhookApi", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region

        self.webhook_secret = aws.secretsmanager.Secret(
            f"{name}-secret", description="GitHub webhook secret (mmp:webhookSecret); paste it into GitHub",
            recovery_window_in_days=7 if settings.production else 0, tags=tags, opts=child)
        aws.secretsmanager.SecretVersion(f"{name}-secret", secret_id=self.webhook_secret.id,
                                         secret_string=webhook_secret, opts=child)

        self.gitlab_secret = None
        if gitlab_webhook_secret is not None:
            self.gitlab_secret = aws.secretsmanager.Secret(
                f"{name}-gitlab-secret", description="GitLab webhook secret or signing token (mmp:gitlabWebhookSecret)",
                recovery_window_in_days=7 if settings.production else 0, tags=tags, opts=child)
            aws.secretsmanager.SecretVersion(f"{name}-gitlab-secret", secret_id=self.gitlab_secret.id,
                                             secret_string=gitlab_webhook_secret, opts=child)
        gitlab_arns = [self.gitlab_secret.arn, gitlab_token_secret_arn] if self.gitlab_secret is not None else []
        routes = [ROUTE] + ([GITLAB_ROUTE] if self.gitlab_secret is not None else [])

        self.table = aws.dynamodb.Table(
            f"{name}-deliveries", billing_mode="PAY_PER_REQUEST", hash_key="delivery_id",
            attributes=[{"name": "delivery_id", "type": "S"}], ttl={"attribute_name": "expires_at", "enabled": True},
            server_side_encryption={"enabled": True}, point_in_time_recovery={"enabled": settings.production},
            deletion_protection_enabled=settings.production, tags=tags, opts=child)

        function_name = f"{settings.prefix}-webhook"
        log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/aws/lambda/{function_name}",
                                            retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        role = iam.service_role(f"{name}-lambda", "lambda.amazonaws.com", [
            iam.logs_statement(region, account, [log_group.name]),
            iam.statement(["dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:GetItem"], [self.table.arn]),
            iam.statement(["states:StartExecution"], [state_machine_arn]),
            iam.statement(["secretsmanager:GetSecretValue"],
                          [self.webhook_secret.arn, github_token_secret_arn, *[a for a in gitlab_arns if a is not None]]),
        ], self, description="the GitHub webhook Lambda")
        self.function = aws.lambda_.Function(
            f"{name}-handler", name=function_name, role=role.arn, runtime="python3.11", architectures=["x86_64"],
            handler=HANDLERS["webhook"], code=pulumi.FileArchive(str(package.path)),
            source_code_hash=package.source_code_hash, memory_size=256, timeout=10,
            environment={"variables": {
                "MMP_HOME": "/tmp/mmp",
                "MMP_WEBHOOK_SECRET_ARN": self.webhook_secret.arn,
                "MMP_DELIVERIES_TABLE": self.table.name,
                "MMP_DELIVERY_TTL_DAYS": str(settings.delivery_ttl_days),
                "MMP_STATE_MACHINE_ARN": state_machine_arn,
                "MMP_GITHUB_TOKEN_SECRET_ARN": github_token_secret_arn,
                "MMP_GITHUB_API_URL": settings.github_api_url,
                **({"MMP_GITLAB_WEBHOOK_SECRET_ARN": self.gitlab_secret.arn,
                    "MMP_GITLAB_TOKEN_SECRET_ARN": gitlab_token_secret_arn, "MMP_GITLAB_URL": settings.gitlab_url}
                   if self.gitlab_secret is not None else {}),
            }},
            logging_config={"log_format": "Text", "log_group": log_group.name}, tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group]))

        self.api = aws.apigatewayv2.Api(f"{name}-api", protocol_type="HTTP", description="MMP GitHub webhook",
                                        tags=tags, opts=child)
        integration = aws.apigatewayv2.Integration(
            f"{name}-integration", api_id=self.api.id, integration_type="AWS_PROXY",
            integration_uri=self.function.invoke_arn, integration_method="POST", payload_format_version="2.0",
            timeout_milliseconds=9000, opts=child)
        route_resources = [
            aws.apigatewayv2.Route(f"{name}-route" if key == ROUTE else f"{name}-gitlab-route", api_id=self.api.id,
                                   route_key=key, target=pulumi.Output.concat("integrations/", integration.id),
                                   opts=child)
            for key in routes]
        access_logs = aws.cloudwatch.LogGroup(f"{name}-access-logs", name=f"/mmp/{settings.prefix}/webhook-access",
                                              retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        self.stage = aws.apigatewayv2.Stage(
            f"{name}-stage", api_id=self.api.id, name="$default", auto_deploy=True,
            default_route_settings={"throttling_rate_limit": settings.api_rate_limit,
                                    "throttling_burst_limit": settings.api_burst_limit},
            route_settings=[{"route_key": key, "throttling_rate_limit": settings.api_rate_limit,
                             "throttling_burst_limit": settings.api_burst_limit} for key in routes],
            access_log_settings={"destination_arn": access_logs.arn, "format": (
                '{"requestId":"$context.requestId","ip":"$context.identity.sourceIp","status":"$context.status",'
                '"route":"$context.routeKey","latency":"$context.integrationLatency"}')},
            tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=route_resources))
        aws.lambda_.Permission(f"{name}-invoke", action="lambda:InvokeFunction", function=self.function.name,
                               principal="apigateway.amazonaws.com",
                               source_arn=pulumi.Output.concat(self.api.execution_arn, "/*/*/webhook"), opts=child)

        if self.gitlab_secret is not None:
            aws.lambda_.Permission(f"{name}-invoke-gitlab", action="lambda:InvokeFunction",
                                   function=self.function.name, principal="apigateway.amazonaws.com",
                                   source_arn=pulumi.Output.concat(self.api.execution_arn, "/*/*/webhook/gitlab"),
                                   opts=child)
        self.url = pulumi.Output.concat(self.api.api_endpoint, "/webhook")
        self.gitlab_url = pulumi.Output.concat(self.api.api_endpoint, "/webhook/gitlab") \
            if self.gitlab_secret is not None else None
        self.register_outputs({"url": self.url, "deliveriesTable": self.table.name,
                               "webhookSecretArn": self.webhook_secret.arn})
