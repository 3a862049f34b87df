"""Reading a commit from a local git repository: every `git` call MMP makes.

The local stack's stand-in for the GitHub contents and compare APIs, and how the
local backend gets the code at the exact commit without touching the user's tree.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

ZERO_SHA = "0" * 40


class GitError(RuntimeError):
    pass


def git(repo: str | Path, *args: str, input: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True)
    if proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def resolve(repo: str | Path, rev: str = "HEAD") -> str:
    """A full commit sha for `rev`."""
    return git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()


def read_file(repo: str | Path, commit: str, path: str) -> bytes | None:
    """A file's bytes at `commit`, or None when it does not exist there."""
    proc = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], capture_output=True)
    if proc.returncode != 0:
        if b"does not exist" in proc.stderr or b"exists on disk, but not in" in proc.stderr:
            return None
        raise GitError(f"git show {commit}:{path} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


# `git ls-tree` modes → what the entry is (a regular file may be executable or not)
_MODES = {"100644": "file", "100755": "file", "120000": "symlink", "040000": "dir", "160000": "submodule"}


def entry_type(repo: str | Path, commit: str, path: str) -> str | None:
    """"file", "symlink", "dir" or "submodule" for `path` at `commit`; None when absent."""
    out = git(repo, "ls-tree", "-z", commit, "--", path).decode(errors="replace")
    for record in out.split("\0"):
        meta, _, name = record.partition("\t")
        if name == path:
            return _MODES.get(meta.split(" ", 1)[0], "unknown entry")
    return None


def archived(repo: str | Path, commit: str, path: str) -> bool:
    """Whether `git archive` of the commit (what `export` writes) holds `path`:
    export-ignore in .gitattributes, or in $GIT_DIR/info/attributes, leaves it out."""
    # zip, not tar: Python's tarfile cannot read git's empty tar (a pax header, then EOF)
    data = git(repo, "archive", "--format=zip", "-0", commit, "--", path)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return path in archive.namelist()


def changed_files(repo: str | Path, before: str, after: str) -> dict[str, list[str]]:
    """added / modified / removed paths between two commits (before may be all zeros)."""
    out: dict[str, list[str]] = {"added": [], "modified": [], "removed": []}
    if before == ZERO_SHA:
        names = git(repo, "ls-tree", "-r", "--name-only", after).decode().splitlines()
        out["added"] = names
        return out
    kinds = {"A": "added", "M": "modified", "D": "removed"}
    raw = git(repo, "diff", "--name-status", "--no-renames", before, after).decode().splitlines()
    for line in raw:
        status, _, name = line.partition("\t")
        out[kinds.get(status[:1], "modified")].append(name)
    return out


def commit_files(repo: str | Path, commit: str) -> dict[str, list[str]]:
    """What one commit added / modified / removed relative to its first parent."""
    parents = git(repo, "rev-list", "--parents", "-n", "1", commit).decode().split()[1:]
    return changed_files(repo, parents[0] if parents else ZERO_SHA, commit)


def export(repo: str | Path, commit: str, dest: Path) -> Path:
    """Write the tree at `commit` into `dest` (git archive: no .git, no user edits)."""
    dest.mkdir(parents=True, exist_ok=True)
    data = git(repo, "archive", "--format=tar", commit)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def repository_name(repo: str | Path) -> str:
    """A repository's name from its folder (`demo.git` → `demo`)."""
    name = Path(repo).resolve().name
    return name[:-4] if name.endswith(".git") else name
