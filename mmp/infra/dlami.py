"""DlamiResources: what the `dlami` backend launches into (config `mmp:dlami`).

A cluster placement group (low-latency Horovod traffic), an instance profile that
reads datasets, writes artifacts, pulls the training image and reads the MLflow
password (each rank fetches it, mmp.runtime.rank), the SSH key (the public half as an EC2 key
pair, the private half as a Secrets Manager secret the backend connects with),
and a launch template: DLAMI from its public SSM parameter, IMDSv2 only,
encrypted root volume, the training security group, `terminate` on shutdown, and
user data that installs the Lustre client, mounts FSx at /fsx (failing loudly, as the
backend's user data does: mmp.backends.dlami_fsx) and schedules `shutdown -h` after
the run's max runtime (the instance's `mmp:max-runtime-minutes` tag, read from
instance metadata; the stack default otherwise), so an instance dies on time even
if nothing is left to stop it. The backend sends its own user data per launch
(pinned host key, authorized keys); the template's is the same watchdog and mount
for instances started from it by hand.
"""

from __future__ import annotations

import shlex

import pulumi
import pulumi_aws as aws

from mmp.backends.dlami_fsx import fsx_argv
from mmp.infra import iam
from mmp.infra.datastore import FSX_MOUNT_POINT, DataStore
from mmp.infra.network import Network
from mmp.infra.settings import Settings

MAX_RUNTIME_TAG = "mmp:max-runtime-minutes"

USER_DATA = r"""#!/bin/bash
# MMP training host: the max-runtime watchdog first, then FSx (client, mount, run area).
set -u
TOKEN=$(curl -s -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
MINUTES=$(curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" \
  http://169.254.169.254/latest/meta-data/tags/instance/__TAG__ || true)
case "$MINUTES" in ''|*[!0-9]*) MINUTES=__DEFAULT__ ;; esac
shutdown -h +"$MINUTES" "mmp: max runtime ($MINUTES min) reached"
__FSX__
"""


def user_data(*, fsx_dns: str, fsx_mount: str, default_minutes: int, owner: str) -> str:
    """The template's script; its FSx step is the backend's own (mmp.backends.dlami_fsx)."""
    fsx = (shlex.join(fsx_argv(fsx_dns, fsx_mount, FSX_MOUNT_POINT, owner,
                               [f"{FSX_MOUNT_POINT}/mmp", f"{FSX_MOUNT_POINT}/output"])) if fsx_dns else "")
    return (USER_DATA.replace("__TAG__", MAX_RUNTIME_TAG).replace("__DEFAULT__", str(int(default_minutes)))
            .replace("__FSX__", fsx))


class DlamiResources(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, network: Network, data: DataStore, *,
                 ssh_private_key: pulumi.Input[str] | None, mlflow_password_secret_arn: pulumi.Input[str] | None,
                 mlflow_tracking_server_arn: pulumi.Input[str] | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:DlamiResources", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}

        self.placement_group = aws.ec2.PlacementGroup(f"{name}-cluster", strategy="cluster", tags=tags, opts=child)

        datasets, artifacts = data.datasets_bucket.arn, data.artifacts_bucket.arn
        # The training image (TrainingPipeline's ECR repository, named by the prefix): user data pulls it.
        training_images = pulumi.Output.concat("arn:aws:ecr:", settings.region, ":",
                                               aws.get_caller_identity_output().account_id, ":repository/",
                                               f"{settings.prefix}-training")
        statements = [
            *iam.training_statements(datasets, artifacts, mlflow_password_secret_arn=mlflow_password_secret_arn,
                                     mlflow_tracking_server_arn=mlflow_tracking_server_arn),
            *iam.ecr_statements(training_images),  # user data pulls the image itself
        ]
        self.role = iam.service_role(f"{name}-host", "ec2.amazonaws.com", statements, self,
                                     description="DLAMI training hosts: datasets, artifacts, MLflow password, image")
        self.instance_profile = aws.iam.InstanceProfile(f"{name}-host", role=self.role.name, opts=child)

        self.key_pair = aws.ec2.KeyPair(f"{name}-key", public_key=settings.ssh_public_key, tags=tags, opts=child)
        self.ssh_key_secret = aws.secretsmanager.Secret(
            f"{name}-ssh-key", description="SSH private key the dlami backend connects with (mmp:sshPrivateKey)",
            recovery_window_in_days=0 if not settings.production else 7, tags=tags, opts=child)
        aws.secretsmanager.SecretVersion(f"{name}-ssh-key", secret_id=self.ssh_key_secret.id,
                                         secret_string=ssh_private_key, opts=child)

        image = f"resolve:ssm:{settings.dlami_ssm_parameter}" if not settings.dlami_ami_id else settings.dlami_ami_id
        script = pulumi.Output.all(data.fsx_dns_name, data.fsx_mount_name).apply(
            lambda a: user_data(fsx_dns=a[0] or "", fsx_mount=a[1] or "",
                                default_minutes=settings.dlami_max_runtime_minutes, owner=settings.ssh_user))
        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-template", description="MMP DLAMI training host", image_id=image,
            key_name=self.key_pair.key_name, iam_instance_profile={"arn": self.instance_profile.arn},
            vpc_security_group_ids=[network.training_sg.id], instance_initiated_shutdown_behavior="terminate",
            metadata_options={"http_tokens": "required", "http_endpoint": "enabled",
                              "instance_metadata_tags": "enabled", "http_put_response_hop_limit": 2},
            block_device_mappings=[{"device_name": "/dev/sda1", "ebs": {
                "volume_size": settings.dlami_volume_gb, "volume_type": "gp3", "encrypted": "true",
                "delete_on_termination": "true"}}],
            user_data=script.apply(lambda text: __import__("base64").b64encode(text.encode()).decode()),
            tag_specifications=[{"resource_type": "instance", "tags": {**tags, "mmp:managed": "true"}}],
            update_default_version=True, tags=tags, opts=child)

        self.register_outputs({
            "placementGroup": self.placement_group.name, "launchTemplateId": self.launch_template.id,
            "instanceProfileArn": self.instance_profile.arn, "sshKeySecretArn": self.ssh_key_secret.arn,
        })
