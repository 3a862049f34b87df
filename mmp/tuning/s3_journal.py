"""Optuna's journal storage kept in S3: the study's durable state when the study runs in the runner task.

Why S3 and not a database: the runner task (an ECS Fargate task) has no disk that
outlives it, and the stack's one database belongs to MLflow (its Alembic tables would
collide with Optuna's). Optuna's `JournalStorage` only needs an append-only log; this
backend writes each `append_logs` call as one object, `<prefix>/<seq>.json`, with
S3's conditional write `If-None-Match: *`, so two writers can never both take the same
sequence number: the loser (412 Precondition Failed, or 409 ConditionalRequestConflict
when they race) reads what it missed and tries the next number. A runner task that
starts again after a crash replays the objects in order and has the study back.

The log is small (a few entries per trial), so a study of hundreds of trials is a few
hundred objects of under a kilobyte, read once per start and then incrementally.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterable

from optuna.storages.journal import BaseJournalBackend, JournalStorage

from mmp import aws

SEQUENCE_DIGITS = 12  # zero-padded, so S3 lists the objects in append order
CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
MAX_CONFLICTS = 100


class S3JournalBackend(BaseJournalBackend):
    def __init__(self, bucket: str, prefix: str):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._s3 = aws.client("s3")
        self._lock = threading.Lock()
        self._logs: list[dict[str, Any]] = []  # every entry read so far, in order
        self._objects = 0  # how many of the prefix's objects those came from

    def _key(self, sequence: int) -> str:
        return f"{self.prefix}/{sequence:0{SEQUENCE_DIGITS}d}.json"

    def _catch_up(self) -> None:
        """Read the objects written since the last look (ours or another writer's)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        start_after = self._key(self._objects - 1) if self._objects else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/", StartAfter=start_after):
            for item in page.get("Contents", []):
                expected = self._key(self._objects)
                if item["Key"] != expected:
                    raise RuntimeError(f"study journal s3://{self.bucket}/{self.prefix}: found {item['Key']} "
                                       f"where {expected} should be")
                body = self._s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                self._logs.extend(json.loads(body))
                self._objects += 1

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        with self._lock:
            self._catch_up()
            return list(self._logs[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        from botocore.exceptions import ClientError

        body = json.dumps(logs).encode()
        with self._lock:
            for _ in range(MAX_CONFLICTS):
                try:
                    self._s3.put_object(Bucket=self.bucket, Key=self._key(self._objects), Body=body,
                                        ContentType="application/json", IfNoneMatch="*")
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in CONFLICT_CODES:
                        raise
                    self._catch_up()  # another writer took this number: read it, try the next
                    continue
                self._logs.extend(logs)
                self._objects += 1
                return
        raise RuntimeError(f"study journal s3://{self.bucket}/{self.prefix}: {MAX_CONFLICTS} write conflicts in a row")


def s3_storage(url: str) -> JournalStorage:
    """`s3://bucket/prefix` as Optuna storage."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket or not prefix.strip("/"):
        raise ValueError(f"study storage {url!r} must be s3://BUCKET/PREFIX")
    return JournalStorage(S3JournalBackend(bucket, prefix))
