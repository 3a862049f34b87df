"""Running one trigger on this machine with the local record and reporters wired in."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import config, gitutil
from .sources import LocalGitSource, Trigger



@dataclass
class OverrideSource:
    """A commit, except for the experiment file, which comes from the user's disk."""

    base: LocalGitSource
    experiment_text: bytes

    def read_file(self, path: str) -> bytes | None:
        if path in config.EXPERIMENT_FILES:
            return self.experiment_text if path == config.EXPERIMENT_FILES[0] else None
        return self.base.read_file(path)

    def entry_type(self, path: str) -> str | None:
        return self.base.entry_type(path)


def local_trigger(repo: str | Path, commit: str, *, experiment_file: Path | None = None,
                  delivery_id: str | None = None, ref: str | None = None) -> Trigger:
    """A trigger for `mmp run`: the repository at `commit`, optionally another experiment file.

    Each manual launch gets its own id (`manual-…`), so backends that derive job
    names from the delivery (SageMaker) train again instead of following an old job.
    """
    repo_path = Path(repo).resolve()
    source = LocalGitSource(repo_path, commit)
    if experiment_file is not None:
        source = OverrideSource(source, Path(experiment_file).read_bytes())
    return Trigger(repository=gitutil.repository_name(repo_path), clone_url=str(repo_path), commit=commit,
                   source=source, delivery_id=delivery_id or f"manual-{uuid.uuid4().hex[:12]}", ref=ref)


def local_stack_tracking_uri() -> str | None:
    """The MLflow server of a running `mmp up`, so `mmp run` need not load MLflow itself."""
    path = config.local_stack_file()
    try:
        stack = json.loads(path.read_text())
        os.kill(int(stack["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stack.get("mlflow_url")


def run_trigger(trigger: Trigger, *, on_log: Callable[[str], None] | None = None, on_launch=None):
    """The pipeline with the local run record, status reporter and notifier."""
    from .runner import Pipeline
    from .store import RunStore

    return Pipeline(store=RunStore(), on_log=on_log, on_launch=on_launch).run(trigger)
