"""The result object the runner task leaves for Conclude, in the stack's artifacts bucket.

The runner (mmp.pipeline.aws_runner, an ECS task) cannot hand a value back through
`ecs:runTask.sync`: Step Functions returns only the task description. So it writes
one small JSON object (state, message, run id) and, for training, the log text next
to it; Conclude (a Lambda) reads them. A missing object means the runner died before
it could write one, and Conclude says so. Nothing secret is ever written here.

Keys: `runner/<run id>/result.json` (+ `log.txt`) for training,
`runner/promotion/<delivery id or commit>/result.json` for a promotion.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import aws

PREFIX = "runner"
RESULT = "result.json"
LOG = "log.txt"


def bucket() -> str:
    name = (os.environ.get("MMP_ARTIFACTS_BUCKET") or "").removeprefix("s3://").strip("/")
    if not name:
        raise RuntimeError("MMP_ARTIFACTS_BUCKET is not set: where the runner leaves its result for Conclude")
    return name


def folder(kind: str, state: dict[str, Any]) -> str:
    """Where one execution's runner result lives; both sides derive it from the state alone."""
    if kind == "train":
        return f"{PREFIX}/{state['started']['run_id']}"
    job = state["job"]
    return f"{PREFIX}/promotion/{job.get('delivery_id') or job['after']}"


def write(kind: str, state: dict[str, Any], result: dict[str, Any], log_text: str | None = None) -> None:
    s3, base = aws.client("s3"), folder(kind, state)
    if log_text:
        s3.put_object(Bucket=bucket(), Key=f"{base}/{LOG}", Body=log_text.encode(), ContentType="text/plain")
    s3.put_object(Bucket=bucket(), Key=f"{base}/{RESULT}", Body=json.dumps(result).encode(),
                  ContentType="application/json")


def read(kind: str, state: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(result, log text); (None, None) when the runner never wrote one."""
    from botocore.exceptions import ClientError

    s3, base = aws.client("s3"), folder(kind, state)

    def get(key: str) -> bytes | None:
        try:
            return s3.get_object(Bucket=bucket(), Key=f"{base}/{key}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    raw = get(RESULT)
    if raw is None:
        return None, None
    text = get(LOG)
    return json.loads(raw), text.decode(errors="replace") if text is not None else None
