"""Fixtures for the kubernetes backend: MMP's fake API server (fake_apiserver.py) and a kubeconfig for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .fake_apiserver import WORKSTATION_RULES, FakeCluster

TOKEN = "mmp-test-token-0123456789"
IMAGE_REPOSITORY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mmp-training"


@pytest.fixture
def cluster():
    """A cluster reached from a workstation: the runner's Role plus the code ConfigMap (docs/kubernetes.md)."""
    fake = FakeCluster(token=TOKEN, rules=WORKSTATION_RULES).start()
    try:
        yield fake
    finally:
        fake.stop()


def write_kubeconfig(path: Path, server: str, token: str, namespace: str = "mmp") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "mmp", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "mmp", "namespace": namespace}}],
    }))
    return path


@pytest.fixture
def k8s_env(cluster, tmp_path, monkeypatch) -> dict[str, str]:
    """The environment `mmp run` needs to train on the fake cluster through a kubeconfig."""
    env = {
        "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", cluster.url, TOKEN)),
        "MMP_K8S_IMAGE_REPOSITORY": IMAGE_REPOSITORY,
        "MMP_K8S_FSX_CLAIM": "fsx-claim",
        "MMP_K8S_SERVICE_ACCOUNT": "mmp-training",
        "MMP_K8S_POLL_SECONDS": "0.05",
    }
    for key in ("MMP_K8S_API_URL", "MMP_K8S_CA_DATA", "MMP_K8S_CLUSTER_NAME", "MMP_K8S_NAMESPACE",
                "MMP_K8S_NODE_SELECTOR", "MMP_K8S_TOLERATIONS", "MMP_ARTIFACTS_BUCKET"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
