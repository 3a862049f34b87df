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
BUCKET_ENV = "MMP_ARTIFACTS_BUCKET"  # read by runner_results.bucket()


class RecordError(RuntimeError):
    """The record could not be read or written."""


class RunRecord(Protocol):
    """What promotion reads; the pipeline also calls `add(run_id, experiment=, repository=)`."""

    def has(self, run_id: str) -> bool: ...


class LocalRunRecord:
    """The local run store, read: `Pipeline.start` writes its row (store.add) for every run it makes."""

    def has(self, run_id: str) -> bool:
        from mmp.pipeline.store import RunStore

        return RunStore().has(run_id)


class S3RunRecord:
    """One object per run under PREFIX in the stack's artifacts bucket."""

    def __init__(self, bucket: str):
        self.bucket = bucket

    def key(self, run_id: str) -> str:
        if not run_id or "/" in run_id:
            raise RecordError(f"run id {run_id!r} cannot name a record")
        return f"{PREFIX}/{run_id}"

    def add(self, run_id: str, *, experiment: str, repository: str) -> None:
        from mmp import aws

        aws.client("s3").put_object(Bucket=self.bucket, Key=self.key(run_id), ContentType="application/json",
                                    Body=json.dumps({"experiment": experiment, "repository": repository}).encode())

    def has(self, run_id: str) -> bool:
        """Listed, not HEAD: the runner task may list this prefix only (mmp.aws.s3_keys says why)."""
        from mmp import aws

        key = self.key(run_id)
        try:
            return key in aws.s3_keys(aws.client("s3"), self.bucket, key, limit=1)
        except Exception as exc:
            raise RecordError(f"could not read the pipeline's record of run {run_id} in s3://{self.bucket}/"
                              f"{PREFIX}: {exc}") from None


class EitherRecord:
    """Promotion's view: a run counts when either record holds it (the local one first, no AWS call)."""

    def __init__(self, *records: RunRecord):
        self.records = records

    def has(self, run_id: str) -> bool:
        return any(record.has(run_id) for record in self.records)


def for_stack() -> S3RunRecord:
    """The record the AWS stages and the runner task write, in the stack's artifacts bucket."""
    from mmp.pipeline.runner_results import bucket

    return S3RunRecord(bucket())


def for_promotion() -> RunRecord:
    """What promotion checks: the local run store, and the stack's record when MMP_ARTIFACTS_BUCKET is set."""
    if not os.environ.get(BUCKET_ENV):
        return LocalRunRecord()
    return EitherRecord(LocalRunRecord(), for_stack())
