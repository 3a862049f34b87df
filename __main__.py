"""The Pulumi program: one stack per environment (dev, prod) of MMP's AWS side.

It reads the stack's `mmp:*` config (validated up front by mmp.infra.settings),
builds the Lambda zip, composes the components in mmp/infra/ and exports the URLs
and names people and the backends need (`pulumi stack output`). docs/infra.md
walks through `pulumi up` for a new environment; Pulumi.dev.yaml.example lists
every config key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pulumi
import pulumi_aws as aws
from pulumi.runtime import config as runtime_config

from mmp.infra import docker_hub, lambda_package
from mmp.infra.codecommit import CodeCommitTrigger
from mmp.infra.datastore import DataStore
from mmp.infra.dlami import DlamiResources
from mmp.infra.kubernetes import KubernetesCluster
from mmp.infra.mlflow_server import MlflowServer
from mmp.infra.network import Network
from mmp.infra.pipeline import TrainingPipeline
from mmp.infra.settings import KEYS, NAMESPACE, SECRET_KEYS, SettingsError, parse_settings
from mmp.infra.webhook_api import WebhookApi

ROOT = Path(__file__).resolve().parent


def _configured_keys() -> set[str]:
    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env() or {})
    return {k.split(":", 1)[1] for k in keys if k.startswith(f"{NAMESPACE}:")}


def read_settings():
    cfg = pulumi.Config(NAMESPACE)
    unknown = sorted(_configured_keys() - set(KEYS) - set(SECRET_KEYS))
    if unknown:
        raise SettingsError(f"unknown config key(s) {', '.join(f'mmp:{k}' for k in unknown)}; "
                            f"known: {', '.join(KEYS + SECRET_KEYS)}")
    values = {}
    for key in KEYS:
        raw = cfg.get(key)
        if raw is not None:
            values[key] = json.loads(raw) if raw.lstrip()[:1] in "[{" else raw
    present = tuple(k for k in SECRET_KEYS if runtime_config.get_config(f"{NAMESPACE}:{k}") is not None)
    region = pulumi.Config("aws").get("region")
    if not region:
        raise SettingsError("aws:region: required (pulumi config set aws:region us-east-1)")
    return parse_settings(pulumi.get_stack(), values, region=region, secret_keys=present), cfg


settings, cfg = read_settings()
account = aws.get_caller_identity_output().account_id
package = lambda_package.build(ROOT / "build" / "lambda" / f"mmp-lambda-{pulumi.get_stack()}.zip")

network = Network("network", settings)
data = DataStore("data", settings, network)
docker_hub_rule = docker_hub.cache_rule("docker-hub", settings)  # the image builds' Docker Hub, when configured
mlflow = MlflowServer("mlflow", settings, network, data, account=account,
                      admin_password=cfg.get_secret("mlflowAdminPassword"), project_root=ROOT,
                      docker_hub_rule=docker_hub_rule)
dlami = None
if settings.dlami:
    dlami = DlamiResources("dlami", settings, network, data, ssh_private_key=cfg.require_secret("sshPrivateKey"),
                           mlflow_password_secret_arn=mlflow.password_secret.arn if mlflow.password_secret else None,
                           mlflow_tracking_server_arn=mlflow.tracking_server_arn or None)
kubernetes = None
if settings.kubernetes:
    kubernetes = KubernetesCluster("kubernetes", settings, network, data, account=account,
                                   mlflow_password_secret_arn=mlflow.password_secret.arn if mlflow.password_secret else None,
                                   mlflow_tracking_server_arn=mlflow.tracking_server_arn or None)
pipeline = TrainingPipeline("pipeline", settings, network, data, mlflow, account=account, package=package,
                            github_token=cfg.require_secret("githubToken"), project_root=ROOT, dlami=dlami,
                            kubernetes=kubernetes,
                            gitlab_token=cfg.require_secret("gitlabToken") if settings.gitlab else None)
webhook = WebhookApi("webhook", settings, account=account, package=package,
                     webhook_secret=cfg.require_secret("webhookSecret"),
                     github_token_secret_arn=pipeline.github_token_secret.arn,
                     state_machine_arn=pipeline.state_machine.arn,
                     gitlab_webhook_secret=cfg.require_secret("gitlabWebhookSecret") if settings.gitlab else None,
                     gitlab_token_secret_arn=pipeline.gitlab_token_secret.arn if pipeline.gitlab_token_secret else None)
codecommit = None
if settings.codecommit_repositories:  # CodeCommit pushes arrive through EventBridge, not the webhook
    codecommit = CodeCommitTrigger("codecommit", settings, account=account, package=package,
                                   deliveries_table=webhook.table, state_machine_arn=pipeline.state_machine.arn)
# -- what people need -------------------------------------------------------------------
pulumi.export("webhookUrl", webhook.url)
if webhook.gitlab_url is not None:
    pulumi.export("gitlabWebhookUrl", webhook.gitlab_url)  # GitLab → Settings → Webhooks: this URL, Push events
pulumi.export("webhookSecret", pulumi.Output.secret(cfg.require_secret("webhookSecret")))
pulumi.export("mlflowUrl", mlflow.url)
pulumi.export("mlflowUsername", mlflow.username)
pulumi.export("mlflowLoadBalancerDnsName", mlflow.load_balancer_dns_name)  # CNAME target for mlflowDomainName
pulumi.export("datasetsBucket", data.datasets_bucket.bucket)
pulumi.export("artifactsBucket", data.artifacts_bucket.bucket)
pulumi.export("fsxMountName", data.fsx_mount_name)
pulumi.export("notificationTopicArn", pipeline.topic.arn)
pulumi.export("stateMachineArn", pipeline.state_machine.arn)
pulumi.export("deliveriesTable", webhook.table.name)
pulumi.export("codecommitRuleName", codecommit.rule.name if codecommit else "")

# -- what the backends read (`mmp run` from an operator's machine uses these too) -----------
backend_env = pipeline.environment.apply(lambda env: {k: v for k, v in env.items() if k != "MMP_HOME"})
extra = {"MMP_WEBHOOK_SECRET_ARN": webhook.webhook_secret.arn, "MMP_DELIVERIES_TABLE": webhook.table.name,
         "MMP_STATE_MACHINE_ARN": pipeline.state_machine.arn, "MMP_FSX_DNS_NAME": data.fsx_dns_name}
if kubernetes is not None:  # `mmp run` from a machine that reaches the endpoint trains on the stack's cluster
    backend_env = pulumi.Output.all(backend_env, kubernetes.environment(pipeline.repository.repository_url)).apply(
        lambda a: {**a[0], **a[1]})
pulumi.export("backendEnv", pulumi.Output.all(backend_env, extra).apply(lambda a: {**a[0], **a[1]}))
for key, value in {
    "ecrRepositoryUri": pipeline.repository.repository_url, "sagemakerRoleArn": pipeline.sagemaker_role.arn,
    "jobNamePrefix": settings.job_prefix, "githubTokenSecretArn": pipeline.github_token_secret.arn,
    "webhookSecretArn": webhook.webhook_secret.arn,
    "mlflowPasswordSecretArn": mlflow.password_secret.arn if mlflow.password_secret else "",
    "fsxFileSystemId": data.fsx_id, "fsxDnsName": data.fsx_dns_name, "datasetsCatalogue": data.catalogue_json,
    "privateSubnetIds": network.private_subnet_ids, "trainingSecurityGroupId": network.training_sg.id,
    "launchTemplateId": dlami.launch_template.id if dlami else "",
    "placementGroup": dlami.placement_group.name if dlami else "",
    "sshKeySecretArn": dlami.ssh_key_secret.arn if dlami else "",
    "kubernetesClusterName": kubernetes.cluster.name if kubernetes else "",
}.items():
    pulumi.export(key, value)
