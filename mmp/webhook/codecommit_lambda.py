"""The CodeCommit trigger on AWS: EventBridge rule → this Lambda → DynamoDB claim + Step Functions.

EventBridge invokes it asynchronously with one `CodeCommit Repository State Change` event;
mmp.webhook.codecommit decides, and the hand-off is the GitHub webhook's own
(mmp.webhook.aws_lambda.StepFunctionsSink: the event id claimed in the deliveries table, the
execution named after it). A refusal is logged and returned; a failure to read CodeCommit or to
hand off raises, so Lambda's asynchronous retries (two by default) try again, and the claim
released by the sink lets them. Light: stdlib + boto3.

Environment: MMP_CODECOMMIT_REPOSITORIES (comma-separated repository ARNs), MMP_DELIVERIES_TABLE,
MMP_STATE_MACHINE_ARN, MMP_DELIVERY_TTL_DAYS (default 7).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mmp.webhook.aws_lambda import StepFunctionsSink
from mmp.webhook.codecommit import Allowed, CodeCommitEvents
from mmp.webhook.core import HandoffError

log = logging.getLogger("mmp.webhook.codecommit")
logging.getLogger().setLevel(logging.INFO)


class RetryLater(RuntimeError):
    """Raised so that Lambda's asynchronous invocation retries the event."""


def _events() -> CodeCommitEvents:
    table, arn = os.environ.get("MMP_DELIVERIES_TABLE"), os.environ.get("MMP_STATE_MACHINE_ARN")
    allowed = Allowed.from_text(os.environ.get("MMP_CODECOMMIT_REPOSITORIES"))
    if not table or not arn or not allowed:
        raise HandoffError("MMP_DELIVERIES_TABLE, MMP_STATE_MACHINE_ARN and MMP_CODECOMMIT_REPOSITORIES must be set")
    return CodeCommitEvents(StepFunctionsSink(table, arn, float(os.environ.get("MMP_DELIVERY_TTL_DAYS", 7))), allowed)


def lambda_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    response = _events().handle(event)
    log.info("CodeCommit event %s: %s %s", (event or {}).get("id") if isinstance(event, dict) else None,
             response.status, response.body.get("status"))
    if response.status >= 500:
        raise RetryLater(response.body.get("error", "retry later"))
    return {"statusCode": response.status, **response.body}
