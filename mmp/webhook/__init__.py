"""Webhook deliveries from the git hosts (mmp.hosts): the shared core, the Lambda adapter and the local server.

`lambda_handler` is the AWS entry point (`mmp.webhook.lambda_handler`). Importing
this package stays light (stdlib + boto3 + mmp's light modules).
"""

from mmp.webhook.aws_lambda import lambda_handler
from mmp.webhook.core import Job, Response, WebhookHandler

__all__ = ["lambda_handler", "Job", "Response", "WebhookHandler"]
