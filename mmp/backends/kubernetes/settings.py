"""What the `kubernetes` backend reads from the environment.

On AWS the runner task sets the MMP_K8S_* variables (the Pulumi stack knows the EKS cluster);
elsewhere `mmp run` reaches any cluster with Trainer installed through KUBECONFIG (or
~/.kube/config) and its current context, and only the MMP_K8S_* variables it sets override it.
Stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from mmp import aws

DEFAULT_NAMESPACE = "default"
FSX_MOUNT = "/fsx"
SSH_PORT = 2222  # the nodes' sshd, in the pod network (any port the image's sshd may bind)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def _json(env: Mapping[str, str], name: str, kind: type) -> Any:
    raw = (env.get(name) or "").strip()
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise SettingsError(f"{name} must be a JSON {'object' if kind is dict else 'array'}, got {raw[:80]!r}")
    return value


@dataclass(frozen=True)
class KubernetesSettings:
    api_url: str | None = None  # MMP_K8S_API_URL; None: the kubeconfig's current context
    ca_data: str | None = field(default=None, repr=False)  # MMP_K8S_CA_DATA: base64 PEM
    cluster_name: str | None = None  # MMP_K8S_CLUSTER_NAME: EKS; the bearer token is a presigned STS URL
    namespace: str | None = None  # MMP_K8S_NAMESPACE; None: the context's, else "default"
    service_account: str | None = None  # MMP_K8S_SERVICE_ACCOUNT: the training pods' (Pod Identity on EKS)
    fsx_claim: str | None = None  # MMP_K8S_FSX_CLAIM: the PVC mounted at /fsx
    image_repository: str | None = None  # MMP_K8S_IMAGE_REPOSITORY: the training image's repository
    node_selector: dict[str, str] = field(default_factory=dict)  # MMP_K8S_NODE_SELECTOR (JSON object)
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # MMP_K8S_TOLERATIONS (JSON array)
    kubeconfig: str | None = None  # KUBECONFIG (first file), else ~/.kube/config
    artifacts_bucket: str | None = None  # MMP_ARTIFACTS_BUCKET: where the launcher copies the output (as dlami)
    mlflow_username: str | None = None
    mlflow_password_secret_arn: str | None = None
    mlflow_tracking_server_arn: str | None = None
    deadline_slack_minutes: int = 30  # activeDeadlineSeconds = Max_Runtime + this (node start-up, image pull)
    region: str = field(default_factory=aws.region)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "KubernetesSettings":
        env = os.environ if env is None else env
        get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731

        def minutes(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            if not raw.isdigit():
                raise SettingsError(f"{name} must be a whole number of minutes, got {raw!r}")
            return int(raw)

        selector = _json(env, "MMP_K8S_NODE_SELECTOR", dict)
        bad = [k for k, v in selector.items() if not isinstance(v, str)]
        if bad:
            raise SettingsError(f"MMP_K8S_NODE_SELECTOR: values must be strings ({', '.join(bad)})")
        tolerations = _json(env, "MMP_K8S_TOLERATIONS", list)
        if not all(isinstance(t, dict) for t in tolerations):
            raise SettingsError("MMP_K8S_TOLERATIONS must be a JSON array of toleration objects")
        kubeconfig = (get("KUBECONFIG") or "").split(os.pathsep)[0] or None
        return cls(
            api_url=(get("MMP_K8S_API_URL") or "").rstrip("/") or None,
            ca_data=get("MMP_K8S_CA_DATA"),
            cluster_name=get("MMP_K8S_CLUSTER_NAME"),
            namespace=get("MMP_K8S_NAMESPACE"),
            service_account=get("MMP_K8S_SERVICE_ACCOUNT"),
            fsx_claim=get("MMP_K8S_FSX_CLAIM"),
            image_repository=get("MMP_K8S_IMAGE_REPOSITORY"),
            node_selector=selector,
            tolerations=tolerations,
            kubeconfig=kubeconfig,
            artifacts_bucket=(get("MMP_ARTIFACTS_BUCKET") or "").removeprefix("s3://").strip("/") or None,
            mlflow_username=get("MMP_MLFLOW_USERNAME"),
            mlflow_password_secret_arn=get("MMP_MLFLOW_PASSWORD_SECRET_ARN"),
            mlflow_tracking_server_arn=get("MMP_MLFLOW_TRACKING_SERVER_ARN"),
            deadline_slack_minutes=minutes("MMP_K8S_DEADLINE_SLACK_MINUTES", 30),
            region=aws.region(env),
        )

    def problems(self) -> list[str]:
        """Missing settings, each naming its variable (the cluster connection is checked by the client)."""
        out = []
        if not self.image_repository:
            out.append("MMP_K8S_IMAGE_REPOSITORY is not set (the repository of the training image every pod runs)")
        if not self.fsx_claim:
            out.append("MMP_K8S_FSX_CLAIM is not set (the PersistentVolumeClaim mounted at /fsx: datasets and output)")
        return out
