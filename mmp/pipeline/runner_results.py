"""The result object the runner task leaves for Conclude, in the stack's artifacts bucket.

The runner (mmp.pipeline.aws_runner, an ECS task) cannot hand a value back through
`ecs:runTask.sync`: Step Functions returns only the task description. So it writes
one small JSON object (state, message, run id) and, for training, the log text next
to it; Conclude (a Lambda) reads them. A missing object means the runner died before
it could write one, and Conclude says so. Nothing secret is ever written here.

The other way, Prepare leaves what the runner needs (the job, the started run, the image)
at `runner/state/<sha-256 of it>.json` and the task's overrides carry only that key:
ECS allows 8,192 characters of overrides in all, JSON included (RunTask's `overrides`,
ECS API reference), and an experiment's hyperparameters alone can pass that.

Keys: `runner/<run id>/result.json` (+ `log.txt`) for training,
`runner/promotion/<delivery id or commit>/result.json` for a promotion,
`runner/study/<delivery id or commit>/result.json` for a study, with `progress.json`
beside it while the study runs (its parent run and the trials' jobs: what Conclude
stops if the runner dies).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mmp import aws

PREFIX = "runner"
RESULT = "result.json"
LOG = "log.txt"
PROGRESS = "progress.json"
KINDS = ("train", "promotion", "study")
HANDOFF_KEY = "runner_state_key"  # the one field the RunTask overrides carry (mmp.infra.pipeline)
HANDOFF_FIELDS = ("job", "started", "image")  # what the runner's kinds read from the state
ECS_OVERRIDES_LIMIT = 8192  # characters, JSON formatting included


def bucket() -> str:
    name = (os.environ.get("MMP_ARTIFACTS_BUCKET") or "").removeprefix("s3://").strip("/")
    if not name:
        raise RuntimeError("MMP_ARTIFACTS_BUCKET is not set: where the runner leaves its result for Conclude")
    return name


def folder(kind: str, state: dict[str, Any]) -> str:
    """Where one execution's runner result lives; both sides derive it from the state alone."""
    if kind not in KINDS:
        raise ValueError(f"runner result kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "train":
        return f"{PREFIX}/{state['started']['run_id']}"
    job = state["job"]
    return f"{PREFIX}/{kind}/{job.get('delivery_id') or job['after']}"


def write(kind: str, state: dict[str, Any], result: dict[str, Any], log_text: str | None = None) -> None:
    s3, base = aws.client("s3"), folder(kind, state)
    if log_text:
        s3.put_object(Bucket=bucket(), Key=f"{base}/{LOG}", Body=log_text.encode(), ContentType="text/plain")
    s3.put_object(Bucket=bucket(), Key=f"{base}/{RESULT}", Body=json.dumps(result).encode(),
                  ContentType="application/json")


def write_progress(kind: str, state: dict[str, Any], progress: dict[str, Any]) -> None:
    aws.client("s3").put_object(Bucket=bucket(), Key=f"{folder(kind, state)}/{PROGRESS}",
                                Body=json.dumps(progress).encode(), ContentType="application/json")


def _read(kind: str, state: dict[str, Any], *names: str) -> dict[str, bytes | None]:
    """The named objects of one runner folder, None for those the runner never wrote: listed first
    (mmp.aws.s3_keys), since a GetObject of a missing key answers 403 to Conclude's role."""
    s3, base = aws.client("s3"), f"{folder(kind, state)}/"
    present = {key[len(base):] for key in aws.s3_keys(s3, bucket(), base)}
    return {name: s3.get_object(Bucket=bucket(), Key=base + name)["Body"].read() if name in present else None
            for name in names}


def read(kind: str, state: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(result, log text); (None, None) when the runner never wrote one."""
    found = _read(kind, state, RESULT, LOG)
    if found[RESULT] is None:
        return None, None
    text = found[LOG]
    return json.loads(found[RESULT]), text.decode(errors="replace") if text is not None else None


def read_progress(kind: str, state: dict[str, Any]) -> dict[str, Any] | None:
    raw = _read(kind, state, PROGRESS)[PROGRESS]
    return json.loads(raw) if raw is not None else None


def hand_off(state: dict[str, Any]) -> str:
    """Leave the runner's part of `state` in S3 (content-addressed: a retried Prepare writes the
    same key) and return its key, which is all the task's overrides carry."""
    body = json.dumps({k: state[k] for k in HANDOFF_FIELDS if k in state}, sort_keys=True).encode()
    key = f"{PREFIX}/state/{hashlib.sha256(body).hexdigest()}.json"
    aws.client("s3").put_object(Bucket=bucket(), Key=key, Body=body, ContentType="application/json")
    return key


def taken_over(state: dict[str, Any]) -> dict[str, Any]:
    """The state the runner task works from: what Prepare left at HANDOFF_KEY, plus what came inline."""
    if HANDOFF_KEY not in state:
        return state
    raw = aws.client("s3").get_object(Bucket=bucket(), Key=state[HANDOFF_KEY])["Body"].read()
    return {**json.loads(raw), **{k: v for k, v in state.items() if k != HANDOFF_KEY}}
