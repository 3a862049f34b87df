"""Backends by platform name: the built-ins, plus any a package adds through the
`mmp.backends` entry-point group (`myplatform = "mypkg.backend:MyBackend"`).

Built-ins are named as strings and imported only when asked for, so looking up
`local` never imports boto3 and the Lambda never imports paramiko.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from mmp.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, Paths

ENTRY_POINT_GROUP = "mmp.backends"
BUILTIN = {
    "local": "mmp.backends.local:LocalBackend",
    "sagemaker": "mmp.backends.sagemaker:SageMakerBackend",
    "sagemaker-fsx": "mmp.backends.sagemaker:SageMakerFsxBackend",
    "dlami": "mmp.backends.dlami:DlamiBackend",
    "kubernetes": "mmp.backends.kubernetes.backend:KubernetesBackend",
}

__all__ = [
    "Backend", "BackendError", "JobHandle", "JobState", "JobStatus", "LaunchRequest", "Paths",
    "available_platforms", "backend_class", "get_backend",
]


@lru_cache(maxsize=1)
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_platforms() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN, *_plugins()]))


def backend_class(platform: str) -> type[Backend]:
    target = _plugins().get(platform) or BUILTIN.get(platform)
    if target is None:
        raise BackendError(f"no backend for platform {platform!r}; known: {', '.join(available_platforms())}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"{target} (platform {platform!r}) is not an mmp Backend")
    return cls


def get_backend(platform: str, **options: Any) -> Backend:
    return backend_class(platform)(**options)
