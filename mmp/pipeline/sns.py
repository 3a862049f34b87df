"""The AWS Notifier: one SNS message per outcome (the stack subscribes the team's e-mail).

SNS subjects must be ASCII, one line, under 100 characters; the body is the
message and the run record as JSON. Secrets never reach a record (the pipeline
puts none in it), so the body is safe to e-mail.
"""

from __future__ import annotations

import json
import os

from mmp import aws

SUBJECT_LIMIT = 100


def sns_subject(text: str) -> str:
    ascii_text = " ".join(text.encode("ascii", "replace").decode().split())
    return ascii_text if len(ascii_text) < SUBJECT_LIMIT else ascii_text[: SUBJECT_LIMIT - 4] + "..."


class SnsNotifier:
    def __init__(self, topic_arn: str | None = None):
        self.topic_arn = topic_arn or os.environ.get("MMP_NOTIFY_TOPIC_ARN")
        if not self.topic_arn:
            raise ValueError("MMP_NOTIFY_TOPIC_ARN is not set: the SNS topic to notify")

    def notify(self, subject: str, message: str, record: dict) -> None:
        body = f"{message}\n\n{json.dumps(record, indent=2, default=str, sort_keys=True)}\n"
        attributes = {"state": {"DataType": "String", "StringValue": str(record.get("state") or "UNKNOWN")}}
        aws.client("sns").publish(TopicArn=self.topic_arn, Subject=sns_subject(subject), Message=body,
                                  MessageAttributes=attributes)
