"""SigV4 for SageMaker managed MLflow, so the light REST tracker can reach it.

A SageMaker MLflow tracking server authorises every REST call with IAM: the request
is signed with SigV4 for the service `sagemaker-mlflow`, carries the SHA-256 of its
body, and names the server in `x-mlflow-sm-tracking-server-arn` (what the
sagemaker-mlflow plugin does for the MLflow client). botocore does the signing with
the caller's own credentials (the Lambda's role); no secret is stored anywhere.
Stdlib + botocore only (the Lambda runtime has botocore); `mlflow_client`, for the runner,
imports MLflow when called.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

SERVICE = "sagemaker-mlflow"
ARN_ENV = "MMP_MLFLOW_TRACKING_SERVER_ARN"
ARN_HEADER = "x-mlflow-sm-tracking-server-arn"


def tracking_server_arn() -> str | None:
    """The managed server this process talks to, when it talks to one."""
    return os.environ.get(ARN_ENV) or None


def client_uri(tracking_uri: str, arn: str | None = None) -> str:
    """The tracking URI MLflow's own client must use for a server at `tracking_uri`: the managed
    server's ARN (`arn`, else MMP_MLFLOW_TRACKING_SERVER_ARN) when there is one, so the
    sagemaker-mlflow plugin signs each call with the caller's role (the URL alone reaches the
    server unsigned, and it refuses); `tracking_uri` otherwise, and for local stores always."""
    arn = arn or tracking_server_arn()
    return arn if arn and tracking_uri.startswith(("http://", "https://")) else tracking_uri


def mlflow_client(tracking_uri: str):
    """MLflow's own client (promotion, compare) on `client_uri(tracking_uri)`."""
    from mlflow.tracking import MlflowClient

    uri = client_uri(tracking_uri)
    if uri.startswith("arn:"):  # the plugin's signer reads the process's tracking URI, not the client's
        import mlflow           # (sagemaker_mlflow.auth_provider.AuthProvider.get_auth)

        mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def endpoint(arn: str) -> str:
    """The regional API endpoint the plugin uses for a tracking server ARN."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[2] != "sagemaker" or not parts[5].startswith("mlflow-tracking-server/"):
        raise ValueError(f"{ARN_ENV} is not a SageMaker MLflow tracking server ARN: {arn!r}")
    return f"https://{parts[3]}.experiments.sagemaker.aws"


def sign(method: str, url: str, body: bytes | None, headers: Mapping[str, str], arn: str) -> dict[str, str]:
    """`headers` plus the routing header and SigV4 (Authorization, X-Amz-Date, token, body hash)."""
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise RuntimeError("no AWS credentials to sign the SageMaker MLflow request with")
    region = arn.split(":")[3]
    out = {**headers, ARN_HEADER: arn,
           "X-Amz-Content-SHA256": hashlib.sha256(body or b"").hexdigest()}
    request = AWSRequest(method=method, url=url, data=body or b"", headers=out)
    SigV4Auth(credentials.get_frozen_credentials(), SERVICE, region).add_auth(request)
    return dict(request.headers.items())
