"""Pulumi ComponentResources for MMP's AWS side, composed by the root `__main__.py`.

Importing this package imports pulumi; nothing on the Lambda or local path does.
"""
