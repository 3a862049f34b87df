"""The webhook on AWS: API Gateway HTTP API (payload v2) → Lambda → DynamoDB + Step Functions.

The Lambda verifies and filters with the shared core, claims the delivery with a
DynamoDB conditional write (delivery id and body digest, each expiring through the
`expires_at` TTL attribute), then starts a Step Functions execution named after the
delivery id (a second line of dedupe: names are unique per state machine) whose
input is the job JSON. If the start fails the claim is released and the host gets a
503, so a redelivery can still launch. The route picks the host: `POST /webhook` is GitHub's,
`POST /webhook/<host>` another host's (mmp.hosts.base.HOSTS), each with its own secret. Light on purpose: stdlib + boto3 (lazily) +
mmp's light modules; a test keeps mlflow, torch, pulumi, paramiko, typer and rich out.

Environment: MMP_WEBHOOK_SECRET or MMP_WEBHOOK_SECRET_ARN (Secrets Manager id) for GitHub,
MMP_<HOST>_WEBHOOK_SECRET(_ARN) for another host (MMP_GITLAB_WEBHOOK_SECRET_ARN),
MMP_DELIVERIES_TABLE (hash key `delivery_id`, string; TTL attribute `expires_at`),
MMP_STATE_MACHINE_ARN, MMP_DELIVERY_TTL_DAYS (default 7), and for long pushes each host's
token (GitHub: GITHUB_TOKEN or MMP_GITHUB_TOKEN_SECRET_ARN) to call its compare API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import time
from typing import Any

from mmp import aws
from mmp.hosts.base import DEFAULT_HOST, HOSTS, get_host
from mmp.webhook.core import HandoffError, Job, Response, WebhookHandler

log = logging.getLogger("mmp.webhook")

_NAME_OK = re.compile(r"^[A-Za-z0-9_-]{1,76}$")


def execution_name(delivery_id: str, prefix: str = "gh-") -> str:
    """A Step Functions execution name (≤ 80 chars, no special characters) for a delivery;
    the prefix is the host's (GitHost.execution_prefix: "gh-" for GitHub)."""
    if _NAME_OK.match(delivery_id):
        return f"{prefix}{delivery_id}"
    return prefix + hashlib.sha256(delivery_id.encode()).hexdigest()[:60]


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class StepFunctionsSink:
    """Idempotent, durable hand-off on AWS."""

    def __init__(self, table: str, state_machine_arn: str, ttl_days: float = 7):
        self.table = table
        self.state_machine_arn = state_machine_arn
        self.ttl_seconds = int(ttl_days * 86400)

    def _items(self, job: Job, digest: str) -> list[dict[str, Any]]:
        expires = str(int(time.time()) + self.ttl_seconds)
        common = {"expires_at": {"N": expires}, "repository": {"S": job.repository}, "after": {"S": job.after}}
        return [{"delivery_id": {"S": job.delivery_id}, **common},
                {"delivery_id": {"S": f"body:{digest}"}, "for_delivery": {"S": job.delivery_id}, **common}]

    def submit(self, job: Job, body_digest: str) -> bool:
        ddb = aws.client("dynamodb")
        items = self._items(job, body_digest)
        try:
            ddb.transact_write_items(TransactItems=[
                {"Put": {"TableName": self.table, "Item": item, "ConditionExpression": "attribute_not_exists(delivery_id)"}}
                for item in items
            ])
        except Exception as exc:
            if _error_code(exc) == "TransactionCanceledException":
                reasons = [r.get("Code") for r in getattr(exc, "response", {}).get("CancellationReasons", [])]
                if not reasons or "ConditionalCheckFailed" in reasons:
                    return False
            raise
        try:
            aws.client("stepfunctions").start_execution(
                stateMachineArn=self.state_machine_arn,
                name=execution_name(job.delivery_id, get_host(job.host).execution_prefix),
                input=json.dumps(job.to_dict()),
            )
        except Exception as exc:
            if _error_code(exc) == "ExecutionAlreadyExists":
                return False
            for item in items:  # release the claim so a redelivery can start it
                try:
                    ddb.delete_item(TableName=self.table, Key={"delivery_id": item["delivery_id"]})
                except Exception as cleanup:
                    log.error("could not release delivery claim %s: %s", item["delivery_id"]["S"], cleanup)
            raise HandoffError(f"could not start the pipeline execution: {_error_code(exc) or type(exc).__name__}") from None
        return True


# API Gateway gives the Lambda 9 s (mmp.infra.webhook_api): the compare call, retries included, must
# end well inside that, after the secret and before DynamoDB and Step Functions, or the host gets a
# gateway timeout instead of the handler's own "redeliver later".
COMPARE_BUDGET_S = 4.0


def budget_compare(host_name: str):
    """The host's compare API within COMPARE_BUDGET_S in all (a socket timeout bounds each read, not a
    slow answer as a whole, hence the worker thread); past it, raise TimeoutError."""
    def compare(full_name: str, clone_url: str, base: str, head: str):
        from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

        host = get_host(host_name, retries=1, timeout=COMPARE_BUDGET_S / 2, max_wait=0.5)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmp-compare")
        try:
            return pool.submit(host.compare, full_name, clone_url, base, head).result(timeout=COMPARE_BUDGET_S)
        except FutureTimeout:
            raise TimeoutError(f"{host.title} compare did not answer within {COMPARE_BUDGET_S:.0f} s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    return compare


def _secret(host_name: str = DEFAULT_HOST) -> str | None:
    """The host's webhook secret from its environment variables: the value, or its Secrets Manager id."""
    return aws.secret_from_env(*get_host(host_name).webhook_secret_env)


def host_of_path(path: str) -> str | None:
    """`/webhook` → "github", `/webhook/<host>` → that host's name; None for any other path."""
    path = path.rstrip("/") or "/"
    if path == "/webhook":
        return DEFAULT_HOST
    name = path.removeprefix("/webhook/")
    return name if name != path and name in HOSTS and name not in (DEFAULT_HOST, "local") else None


def _handler(host_name: str = DEFAULT_HOST) -> WebhookHandler:
    table, arn = os.environ.get("MMP_DELIVERIES_TABLE"), os.environ.get("MMP_STATE_MACHINE_ARN")
    if not table or not arn:
        raise HandoffError("MMP_DELIVERIES_TABLE and MMP_STATE_MACHINE_ARN must be set")
    sink = StepFunctionsSink(table, arn, float(os.environ.get("MMP_DELIVERY_TTL_DAYS", 7)))
    return WebhookHandler(lambda: _secret(host_name), sink, compare=budget_compare(host_name), host=host_name)


def _reply(response: Response) -> dict[str, Any]:
    return {"statusCode": response.status, "headers": {"content-type": "application/json"},
            "body": json.dumps(response.body)}


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """API Gateway HTTP API (payload format 2.0) → the shared webhook core, for the route's host."""
    http = (event.get("requestContext") or {}).get("http") or {}
    method = http.get("method", "POST")
    if method != "POST":
        return _reply(Response(405, {"status": "rejected", "error": f"method {method} not allowed; POST only"}))
    path = event.get("rawPath") or http.get("path") or "/webhook"
    host_name = host_of_path(path)
    if host_name is None:
        return _reply(Response(404, {"status": "rejected", "error": f"no webhook at {path[:100]!r}"}))
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return _reply(Response(400, {"status": "rejected", "error": "body is not valid base64"}))
    else:
        raw = body.encode("utf-8")
    try:
        handler = _handler(host_name)
    except HandoffError as exc:
        log.error("%s", exc)
        return _reply(Response(500, {"status": "rejected", "error": str(exc)}))
    return _reply(handler.handle(event.get("headers") or {}, raw))
