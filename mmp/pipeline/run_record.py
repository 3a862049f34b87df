"""The pipeline's own record of the MLflow runs it created: the only runs promotion trusts.

train.py holds MLflow credentials to log its own run, so it can also create runs in any
experiment and tag them as any repository: a run's tags prove nothing. So the pipeline
records the id of each run it creates (a study's parent and trials included, all made by
`Pipeline.start`) where train.py cannot write, and `mmp promote`, promote.json and the
runner task's promotion consider only recorded runs.

- Local: the run store under MMP_HOME (mmp.pipeline.store), one row per run.
- AWS: one S3 object per run, `s3://<artifacts bucket>/pipeline-runs/<run id>`. Only the
  stage Lambdas (Prepare) and the runner task (a study's trials) may put it; the training
  roles, which may write the rest of the bucket, are denied this prefix (mmp.infra).

Stdlib and boto3 (lazily): the stages import it in Lambda.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

PREFIX = "pipeline-runs"
BUCKET_ENV = "MMP_ARTIFACTS_BUCKET"


class RecordError(RuntimeError):
    """The record could not be read or written."""


class RunRecord(Protocol):
    def add(self, run_id: str, *, experiment: str, repository: str) -> None: ...

    def has(self, run_id: str) -> bool: ...


class LocalRunRecord:
    """The local run store: `Pipeline.start` adds its row itself (store.add), so `add` has nothing to do."""

    def add(self, run_id: str, *, experiment: str, repository: str) -> None:
        pass

    def has(self, run_id: str) -> bool:
        from .store import RunStore

        return RunStore().has(run_id)


class S3RunRecord:
    """One object per run under PREFIX in the stack's artifacts bucket."""

    def __init__(self, bucket: str):
        self.bucket = bucket.removeprefix("s3://").strip("/")

    def key(self, run_id: str) -> str:
        if not run_id or "/" in run_id:
            raise RecordError(f"run id {run_id!r} cannot name a record")
        return f"{PREFIX}/{run_id}"

    def add(self, run_id: str, *, experiment: str, repository: str) -> None:
        from .. import aws

        aws.client("s3").put_object(Bucket=self.bucket, Key=self.key(run_id), ContentType="application/json",
                                    Body=json.dumps({"experiment": experiment, "repository": repository}).encode())

    def has(self, run_id: str) -> bool:
        from botocore.exceptions import ClientError

        from .. import aws

        try:
            aws.client("s3").head_object(Bucket=self.bucket, Key=self.key(run_id))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise RecordError(f"could not read the pipeline's record of run {run_id} in s3://{self.bucket}/"
                              f"{PREFIX}: {exc}") from None
        return True


class EitherRecord:
    """Promotion's view: a run counts when either record holds it (the local one first, no AWS call)."""

    def __init__(self, *records: RunRecord):
        self.records = records

    def add(self, run_id: str, *, experiment: str, repository: str) -> None:
        raise RecordError("promotion only reads the record")

    def has(self, run_id: str) -> bool:
        return any(record.has(run_id) for record in self.records)


def stack_bucket() -> str | None:
    return (os.environ.get(BUCKET_ENV) or "").removeprefix("s3://").strip("/") or None


def for_stack() -> S3RunRecord:
    """The record the AWS stages and the runner task write (MMP_ARTIFACTS_BUCKET)."""
    bucket = stack_bucket()
    if bucket is None:
        raise RecordError(f"{BUCKET_ENV} is not set: the pipeline records its runs in the stack's artifacts bucket")
    return S3RunRecord(bucket)


def for_promotion() -> RunRecord:
    """What promotion checks: the local run store, and the stack's record when MMP_ARTIFACTS_BUCKET is set."""
    bucket = stack_bucket()
    return EitherRecord(LocalRunRecord(), S3RunRecord(bucket)) if bucket else LocalRunRecord()
