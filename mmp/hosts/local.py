"""A repository on this machine behind the host seam: what the local hook's pushes read.

The local hook (mmp.hosts.hooks) posts GitHub-shaped deliveries whose clone URL is the
repository's folder; whatever host a job names, a clone URL that is a folder here is read
with git (`mmp.hosts.base.host_for`), and statuses are the local record only.
"""

from __future__ import annotations

from typing import Mapping

from mmp.hosts import localgit as gitutil
from mmp.hosts.base import GitHost, local_repository


class LocalHost(GitHost):
    name = "local"
    title = "local git"

    def _path(self, clone_url: str) -> str:
        path = local_repository(clone_url)
        if path is None:
            raise ValueError(f"clone_url must be a repository folder on this machine, got {clone_url!r}")
        return str(path)

    def compare(self, repository: str, clone_url: str, base: str, head: str) -> Mapping[str, list[str]]:
        return gitutil.changed_files(self._path(clone_url), base, head)

    def source(self, repository: str, clone_url: str, commit: str):
        from mmp.pipeline.sources import LocalGitSource

        return LocalGitSource(self._path(clone_url), commit)

    def archive(self, repository: str, clone_url: str, commit: str) -> bytes:
        """`git archive` of the commit: committed files only, never the working tree."""
        return gitutil.git(self._path(clone_url), "archive", "--format=tar.gz", commit)

    def reporter(self):
        from mmp.pipeline.reporting import LocalStatusReporter

        return LocalStatusReporter()
