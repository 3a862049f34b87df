"""boto3 clients and secrets, made in one place with one retry policy.

Every AWS call in MMP goes through `client()`, so throttling and transient errors
get botocore's adaptive retries everywhere, and tests point all of them at moto by
setting `AWS_ENDPOINT_URL` (botocore reads it natively). boto3 is imported lazily:
the local stack never needs it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Mapping

RETRY_CONFIG = {"mode": "adaptive", "max_attempts": 10}


REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def region(environ: Mapping[str, str] | None = None) -> str:
    """The region `environ` (this process's by default) names; us-east-1 only when none does.

    Each process MMP starts gets its region handed to it (Lambda's and ECS's own AWS_REGION,
    the SageMaker job's Environment, the DLAMI ranks' environment): see `region_env`."""
    env = os.environ if environ is None else environ
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def region_env(name: str) -> dict[str, str]:
    """Both region variables set to `name`: boto3/botocore read AWS_DEFAULT_REGION, others AWS_REGION."""
    return {variable: name for variable in REGION_VARIABLES}


@lru_cache(maxsize=None)
def _config():
    from botocore.config import Config

    return Config(retries=dict(RETRY_CONFIG), connect_timeout=5, read_timeout=60,
                  user_agent_extra="mmp")


def client(service: str, region_name: str | None = None) -> Any:
    """A boto3 client with MMP's retry configuration (not cached: tests switch endpoints)."""
    import boto3

    return boto3.client(service, region_name=region_name or region(), config=_config())


def s3_keys(s3: Any, bucket: str, prefix: str, limit: int = 1000) -> list[str]:
    """The keys under `prefix` (one page, at most `limit`), to learn that an object is missing.

    Why not GetObject/HeadObject and a 404: without s3:ListBucket on the bucket, S3 answers a
    missing key with 403 (S3 API reference, GetObject "Permissions"), and a role should not list
    the whole bucket. A listing needs s3:ListBucket, which a policy scopes to a prefix with the
    s3:prefix condition key (S3 user guide, "Allowing each IAM user access to a folder in a bucket")."""
    page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
    return [item["Key"] for item in page.get("Contents", [])]


def arn_region(arn: str) -> str | None:
    """The region a full ARN names (arn:PARTITION:SERVICE:REGION:ACCOUNT:...), None for a bare name:
    a secret handed over by ARN lives where the ARN says, whatever this process's region."""
    parts = arn.split(":", 5)
    return parts[3] or None if len(parts) == 6 and parts[0] == "arn" else None


_SECRETS: dict[str, str] = {}


def secret(secret_id: str, *, cache: bool = True) -> str:
    """A Secrets Manager string secret; kept in memory only, never logged."""
    if cache and secret_id in _SECRETS:
        return _SECRETS[secret_id]
    value = client("secretsmanager", arn_region(secret_id)).get_secret_value(SecretId=secret_id)["SecretString"]
    if cache:
        _SECRETS[secret_id] = value
    return value


def secret_from_env(value_var: str, arn_var: str) -> str | None:
    """A secret given directly in `value_var`, or by Secrets Manager id in `arn_var`."""
    if os.environ.get(value_var):
        return os.environ[value_var]
    if os.environ.get(arn_var):
        return secret(os.environ[arn_var])
    return None
