"""Where the pipeline reads the commit from: a local git repository or GitHub.

A source answers one question, a file's bytes at the trigger's commit (None when
the file is absent), so the pipeline's fetch and validate steps are the same for
the local stack and for AWS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import gitutil


class CommitSource(Protocol):
    def read_file(self, path: str) -> bytes | None: ...


@dataclass
class LocalGitSource:
    repo: str | Path
    commit: str

    def read_file(self, path: str) -> bytes | None:
        return gitutil.read_file(self.repo, self.commit, path)


@dataclass
class Trigger:
    """One request to train: a repository at a commit, and where it came from."""

    repository: str  # display name, e.g. owner/repo
    clone_url: str  # local path or https URL of the repository
    commit: str
    source: CommitSource
    delivery_id: str | None = None
    ref: str | None = None
    changed_files: tuple[str, ...] = ()  # trigger files the push said it added or modified
