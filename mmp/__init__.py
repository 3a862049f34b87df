"""MMP: a Managed MLOps Pipeline with GitOps integration.

Kept import-free on purpose: the Lambda handler imports `mmp.webhook`, and every
module reached from there must stay light (stdlib, pydantic, boto3).
"""

__version__ = "0.1.0"
