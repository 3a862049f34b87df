"""Loaded at start-up by a Python subprocess that has this folder on PYTHONPATH: when the
test that started it enforces IAM (MMP_IAM_STATE is set), check its AWS calls too."""

import os

if os.environ.get("MMP_IAM_STATE") and os.path.exists(os.environ["MMP_IAM_STATE"]):
    import iam_calls

    iam_calls.install()
