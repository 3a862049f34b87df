"""The environment train.py runs with: an allow-list, not MMP's own environment.

train.py is code from a repository, run as the same user as MMP. Whatever it finds in
its environment it can print into a log that is uploaded to MLflow, so it gets only
what training needs: the basics of a login (PATH, HOME, locale, TMPDIR), the
variables of the libraries horovodrun and PyTorch read (HOROVOD_*, OMP_*, GLOO_*,
NCCL_*, ...), the MLflow variables of its own run (given by the pipeline, never
inherited) plus MLflow's credential variables where the server needs them, and the names the operator lists in MMP_TRAIN_ENV. Never MMP_HOME (where
the queue, the MLflow store and the webhook secret live) nor any other MMP_ variable.
"""

from __future__ import annotations

import os
from typing import Mapping

BASICS = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",  # a private CA in front of MLflow
)
# how train.py reaches an MLflow server that asks for credentials (the URI itself comes from the run)
MLFLOW_CONNECTION = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
LIBRARY_PREFIXES = ("LC_", "HOROVOD_", "OMP_", "GLOO_", "NCCL_", "MKL_", "KMP_", "OPENBLAS_", "TORCH_")
DECLARED = "MMP_TRAIN_ENV"  # operator's comma-separated list of extra names to pass
NEVER_PREFIXES = ("MMP_", "MLFLOW_")  # MMP's state; MLflow's come from the run (or MLFLOW_CONNECTION)


def declared_names(environ: Mapping[str, str]) -> list[str]:
    return [n.strip() for n in environ.get(DECLARED, "").split(",") if n.strip()]


def allowed(name: str, declared: list[str]) -> bool:
    if name in MLFLOW_CONNECTION:
        return True
    if name.startswith(NEVER_PREFIXES):
        return False
    return name in BASICS or name.startswith(LIBRARY_PREFIXES) or name in declared


def training_environ(run: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `environ` (this process's by default), plus `run`'s
    own variables (MLFLOW_*, MMP_RUN_ID), which win."""
    environ = os.environ if environ is None else environ
    declared = declared_names(environ)
    env = {k: v for k, v in environ.items() if allowed(k, declared)}
    env.update(run)
    return env


def cluster_rank_environ(mlflow_env: Mapping[str, str], run_id: str, region: str, *, username: str | None = None,
                         password_secret_arn: str | None = None, tracking_server_arn: str | None = None) -> dict[str, str]:
    """What every rank on a cluster of the training image gets (dlami, kubernetes): the run's MLflow
    variables, the region (a container started without one makes boto3 fall back to us-east-1), the
    MLflow user and the password secret's ARN, never its value (each rank reads it: mmp.runtime.rank)."""
    from mmp import aws
    from mmp.runtime.rank import SECRET_ARN_VAR
    from mmp.tracking.sigv4 import client_uri

    env = {**aws.region_env(region), **mlflow_env, "MMP_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    if "MLFLOW_TRACKING_URI" in env:  # the image's sagemaker-mlflow plugin signs with the hosts' role
        env["MLFLOW_TRACKING_URI"] = client_uri(env["MLFLOW_TRACKING_URI"], tracking_server_arn)
    if username:
        env["MLFLOW_TRACKING_USERNAME"] = username
    if password_secret_arn:
        env[SECRET_ARN_VAR] = password_secret_arn
    return env
