"""Where the pipeline reads the commit from: a local git repository or a git host (mmp.hosts).

A source answers two questions, a file's bytes at the trigger's commit (None when
the file is absent) and what kind of entry a path is, so the pipeline's fetch and
validate steps are the same for the local stack and for AWS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mmp.hosts import localgit as gitutil
from mmp.contract.argv import TRAIN_SCRIPT


class CommitSource(Protocol):
    def read_file(self, path: str) -> bytes | None: ...

    def entry_type(self, path: str) -> str | None:
        """One of ENTRY_PROBLEMS' kinds or "file"; None when the path is absent."""


# What train.py must not be at the commit, and why: each would fail only after launch.
ENTRY_PROBLEMS = {
    None: "not found at the repository root (the pipeline runs ./train.py)",
    "symlink": "is a symbolic link; commit the script itself (a link may point anywhere)",
    "dir": "is a directory; the pipeline runs the file ./train.py",
    "submodule": "is a git submodule; the pipeline runs the file ./train.py",
    "export-ignored": "is excluded by export-ignore in .gitattributes, and the local platform exports the commit "
                      "with git archive, which leaves it out",
}


def train_script_problem(source: CommitSource) -> str | None:
    """Why the commit's train.py cannot run, naming it; None when it is a regular file."""
    kind = source.entry_type(TRAIN_SCRIPT)
    return None if kind == "file" else f"{TRAIN_SCRIPT}: {ENTRY_PROBLEMS.get(kind, f'is a {kind}, not a file')}"


@dataclass
class LocalGitSource:
    repo: str | Path
    commit: str

    def read_file(self, path: str) -> bytes | None:
        return gitutil.read_file(self.repo, self.commit, path)

    def entry_type(self, path: str) -> str | None:
        kind = gitutil.entry_type(self.repo, self.commit, path)
        if kind == "file" and not gitutil.archived(self.repo, self.commit, path):
            return "export-ignored"
        return kind


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
    local_root: str | None = None  # a repository read with git here: its absolute path
    host: str = "github"  # where the commit lives (mmp.hosts.base.HOSTS): the runs' `mmp.host` tag

    @property
    def identity(self) -> str:
        """Who owns what this trigger makes (mmp.tracking.ownership): a local repository's absolute path,
        else the host's full name for the repository. Two local folders may share a name (teamA/alpha
        and teamB/alpha); `repository` stays the name people see."""
        return self.local_root or self.repository
