"""AWS CodeCommit as a git host: read a commit, list changes, build its archive, report by comment.

Everything goes through the CodeCommit API with boto3 (`mmp.aws.client`, so IAM is the only
credential and botocore's retries apply); `AWS_ENDPOINT_URL_CODECOMMIT` points it elsewhere
(the tests' stand-in, tests/codecommit_standin.py). A repository is named by its CodeCommit
name (the job's `repository`); its ARN is what IAM policies and the stack setting list.

- Reading: GetFile for bytes, GetFolder of the parent folder for the entry's type (file,
  symlink, dir, submodule), GetDifferences (paged) for what changed between two commits.
- The archive: CodeCommit has no archive API and Lambda has no git, so the commit's tree is
  walked with GetFolder and its blobs fetched with GetBlob (a small thread pool), bounded in
  files and bytes, refusing symbolic links (the training entrypoints refuse links in the code
  archive) and leaving out what `export-ignore` leaves out of `git archive`
  (mmp.hosts.gitattributes). The tar.gz has no top folder, like `git archive`.
- Reporting: CodeCommit has no commit statuses, so each (commit, context) gets one comment,
  posted once (PostCommentForComparedCommit with a client request token) and then edited
  (UpdateComment) from pending to the result; the comment carries a marker line, so a restarted
  process finds it again (GetCommentsForComparedCommit) instead of posting a second one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

from mmp import aws
from mmp.hosts.base import ClientSource, GitHost
from mmp.hosts.gitattributes import ATTRIBUTES_FILE, ExportIgnore

log = logging.getLogger("mmp.hosts.codecommit")

HOST = "codecommit"
MAX_ARCHIVE_FILES = int(os.environ.get("MMP_CODECOMMIT_MAX_FILES", 5000))
MAX_ARCHIVE_BYTES = int(os.environ.get("MMP_CODECOMMIT_MAX_BYTES", 200 * 1024 * 1024))
ARCHIVE_WORKERS = 8  # GetBlob calls in flight: a 500-file tree in ~1/8 of the serial time (bench/codecommit_archive.py)
DIFF_PAGE = 100
COMMENT_LIMIT = 10240  # CodeCommit's comment size limit (CommentContentSizeLimitExceededException)
MARKER = "mmp-status:"  # the comment's last line: `mmp-status: <context>`; how a restart finds it again
_NAME_RE = re.compile(r"^[\w.-]{1,100}$")
_ARN_RE = re.compile(r"^arn:aws[\w-]*:codecommit:([a-z0-9-]+):(\d{12}):([\w.-]{1,100})$")
_STATE_WORDS = {"pending": "⏳ pending", "success": "✅ success", "failure": "❌ failure", "error": "⚠️ error"}


class CodeCommitError(RuntimeError):
    """A CodeCommit call or a commit MMP cannot use; the message names the repository and the path."""


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def parse_arn(arn: str) -> tuple[str, str, str]:
    """(region, account, name) of a CodeCommit repository ARN; ValueError says what is expected."""
    match = _ARN_RE.match(arn)
    if not match:
        raise ValueError(f"{arn!r} is not a CodeCommit repository ARN (arn:aws:codecommit:REGION:ACCOUNT:NAME)")
    return match.group(1), match.group(2), match.group(3)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"CodeCommit repository name must be 1 to 100 of letters, digits, '_', '.', '-'; got {name!r}")
    return name


def clone_url(name: str, region: str | None = None) -> str:
    """The repository's HTTPS clone URL (what the job's clone_url holds; nothing clones it)."""
    return f"https://git-codecommit.{region or aws.region()}.amazonaws.com/v1/repos/{check_name(name)}"


@dataclass
class CodeCommitClient:
    """The CodeCommit calls MMP makes, over one boto3 client."""

    client: Any = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = aws.client("codecommit", self.region)

    # -- reading --------------------------------------------------------------------------------
    def get_file(self, repository: str, path: str, commit: str) -> bytes | None:
        """A file's bytes at `commit`, None when CodeCommit says it does not exist there."""
        try:
            got = self.client.get_file(repositoryName=repository, commitSpecifier=commit, filePath=path)
        except Exception as exc:
            if _code(exc) == "FileDoesNotExistException":
                return None
            raise CodeCommitError(f"CodeCommit GetFile {repository}:{path}@{commit[:12]}: {_code(exc) or exc}") from None
        return got["fileContent"]  # botocore decodes the base64 blob

    def folder(self, repository: str, folder: str, commit: str) -> dict[str, Any] | None:
        try:
            return self.client.get_folder(repositoryName=repository, commitSpecifier=commit,
                                          folderPath="/" + folder.strip("/"))
        except Exception as exc:
            if _code(exc) == "FolderDoesNotExistException":
                return None
            raise CodeCommitError(f"CodeCommit GetFolder {repository}:/{folder}@{commit[:12]}: "
                                  f"{_code(exc) or exc}") from None

    def entry_type(self, repository: str, path: str, commit: str) -> str | None:
        """"file", "symlink", "dir" or "submodule" at `commit`; None when absent (GetFolder of its parent)."""
        parent, _, name = path.strip("/").rpartition("/")
        listing = self.folder(repository, parent, commit)
        if listing is None:
            return None
        for key, kind in (("files", "file"), ("symbolicLinks", "symlink"), ("subFolders", "dir"),
                          ("subModules", "submodule")):
            if any(entry.get("relativePath") == name for entry in listing.get(key) or []):
                return kind
        return None

    def blob(self, repository: str, blob_id: str) -> bytes:
        return self.client.get_blob(repositoryName=repository, blobId=blob_id)["content"]

    def commit(self, repository: str, commit: str) -> dict[str, Any] | None:
        """GetCommit's commit (tree, parents, author, committer), None when the repository has no such commit."""
        try:
            return self.client.get_commit(repositoryName=repository, commitId=commit)["commit"]
        except Exception as exc:
            if _code(exc) in ("CommitIdDoesNotExistException", "CommitDoesNotExistException",
                              "InvalidCommitIdException"):
                return None
            raise

    def commit_exists(self, repository: str, commit: str) -> bool:
        """The event is a pointer, so the commit is looked up before anything starts."""
        return self.commit(repository, commit) is not None

    def default_branch(self, repository: str) -> str | None:
        return self.client.get_repository(repositoryName=repository)["repositoryMetadata"].get("defaultBranch")

    def compare(self, repository: str, base: str | None, head: str) -> dict[str, list[str]]:
        """added / modified / removed paths between two commits (GetDifferences, every page);
        `base` None lists every file of `head` as added."""
        out: dict[str, list[str]] = {"added": [], "modified": [], "removed": []}
        kinds = {"A": "added", "M": "modified", "D": "removed"}
        args: dict[str, Any] = {"repositoryName": repository, "afterCommitSpecifier": head, "MaxResults": DIFF_PAGE}
        if base:
            args["beforeCommitSpecifier"] = base
        while True:
            page = self.client.get_differences(**args)
            for diff in page.get("differences") or []:
                blob = diff.get("afterBlob") or diff.get("beforeBlob") or {}
                out[kinds.get(diff.get("changeType"), "modified")].append(blob.get("path", ""))
            if not page.get("NextToken"):
                return out
            args["NextToken"] = page["NextToken"]

    # -- the archive ------------------------------------------------------------------------------
    def archive(self, repository: str, commit: str, *, max_files: int = MAX_ARCHIVE_FILES,
                max_bytes: int = MAX_ARCHIVE_BYTES, workers: int = ARCHIVE_WORKERS) -> bytes:
        """The tree at `commit` as a .tar.gz, as `git archive` would make it (export-ignore honoured),
        built from GetFolder + GetBlob. Raises CodeCommitError for a symbolic link, or past the bounds."""
        ignore = ExportIgnore()
        files: list[tuple[str, str, str]] = []  # (path, blobId, fileMode)
        dirs: list[str] = []
        pending = [""]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmp-codecommit") as pool:
            while pending:
                listings = list(pool.map(lambda f: (f, self.folder(repository, f, commit)), pending))
                pending = []
                for folder, listing in listings:
                    if listing is None:
                        raise CodeCommitError(f"CodeCommit {repository}@{commit[:12]}: folder /{folder} vanished")
                    attrs = [f for f in listing.get("files") or [] if f.get("relativePath") == ATTRIBUTES_FILE]
                    if attrs:  # git reads a folder's .gitattributes before deciding about its entries
                        ignore.add(folder, self.blob(repository, attrs[0]["blobId"]).decode("utf-8", "replace"))
                    for link in listing.get("symbolicLinks") or []:
                        if not ignore.ignored(link["absolutePath"]):
                            raise CodeCommitError(
                                f"{repository}@{commit[:12]}: {link['absolutePath']} is a symbolic link; the training "
                                "entrypoints refuse links in the code archive (commit the file itself, or mark it "
                                "export-ignore in .gitattributes)")
                    for sub in listing.get("subFolders") or []:
                        if not ignore.ignored(sub["absolutePath"], is_dir=True):
                            pending.append(sub["absolutePath"])
                    for module in listing.get("subModules") or []:  # git archive writes an empty folder
                        if not ignore.ignored(module["absolutePath"], is_dir=True):
                            dirs.append(module["absolutePath"])
                    for entry in listing.get("files") or []:
                        if not ignore.ignored(entry["absolutePath"]):
                            files.append((entry["absolutePath"], entry["blobId"], entry.get("fileMode", "NORMAL")))
                    if len(files) > max_files:
                        raise CodeCommitError(f"{repository}@{commit[:12]} holds more than {max_files} files to archive "
                                              "(MMP_CODECOMMIT_MAX_FILES); mark data export-ignore or keep it out of git")
            total = 0
            contents: dict[str, bytes] = {}
            for (path, _, _), data in zip(files, pool.map(lambda f: self.blob(repository, f[1]), files)):
                total += len(data)
                if total > max_bytes:
                    raise CodeCommitError(f"{repository}@{commit[:12]} holds more than {max_bytes} bytes to archive "
                                          "(MMP_CODECOMMIT_MAX_BYTES); mark data export-ignore or keep it out of git")
                contents[path] = data
        mtime = self._commit_time(repository, commit)
        # git archive writes a folder only when something inside it is written (or it is a submodule)
        folders = set(dirs)
        for path in [p for p, _, _ in files] + dirs:
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folders):
                info = tarfile.TarInfo(path + "/")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o775, mtime
                tar.addfile(info)
            for path, _, mode in sorted(files):
                info = tarfile.TarInfo(path)
                info.size, info.mtime = len(contents[path]), mtime
                info.mode = 0o775 if mode == "EXECUTABLE" else 0o664  # git archive's default tar.umask 002
                tar.addfile(info, io.BytesIO(contents[path]))
        return buffer.getvalue()

    def _commit_time(self, repository: str, commit: str) -> int:
        """The committer date, as `git archive` stamps every entry."""
        got = self.commit(repository, commit) or {}
        raw = str((got.get("committer") or {}).get("date") or "").split()
        return int(raw[0]) if raw and raw[0].isdigit() else int(time.time())

    # -- comments ---------------------------------------------------------------------------------
    def find_comment(self, repository: str, commit: str, marker: str) -> str | None:
        args: dict[str, Any] = {"repositoryName": repository, "afterCommitId": commit}
        while True:
            page = self.client.get_comments_for_compared_commit(**args)
            for data in page.get("commentsForComparedCommitData") or []:
                for comment in data.get("comments") or []:
                    if not comment.get("deleted") and (comment.get("content") or "").rstrip().endswith(marker):
                        return comment["commentId"]
            if not page.get("nextToken"):
                return None
            args["nextToken"] = page["nextToken"]

    def post_or_update(self, repository: str, commit: str, marker: str, content: str) -> str:
        """Edit the commit's comment that ends with `marker`, or post it; returns its id."""
        comment_id = self.find_comment(repository, commit, marker)
        if comment_id is not None:
            try:
                self.client.update_comment(commentId=comment_id, content=content)
                return comment_id
            except Exception as exc:
                if _code(exc) not in ("CommentDoesNotExistException", "CommentDeletedException",
                                      "CommentNotCreatedByCallerException"):
                    raise
                log.warning("comment %s on %s@%s cannot be edited (%s); posting a new one", comment_id,
                            repository, commit[:12], _code(exc))
        token = hashlib.sha256(f"{repository}\0{commit}\0{content}".encode()).hexdigest()[:64]
        got = self.client.post_comment_for_compared_commit(repositoryName=repository, afterCommitId=commit,
                                                           content=content, clientRequestToken=token)
        return got["comment"]["commentId"]


def comment_text(state: str, description: str, target_url: str | None, context: str) -> str:
    lines = [f"**MMP {context}**: {_STATE_WORDS.get(state, state)}", "", description.strip() or state]
    if target_url:
        lines += ["", f"MLflow run: {target_url}"]
    lines += ["", f"{MARKER} {context}"]
    text = "\n".join(lines)
    return text if len(text) <= COMMENT_LIMIT else text[: COMMENT_LIMIT - 200] + f"…\n\n{MARKER} {context}"


class CodeCommitSource(ClientSource):
    """The pipeline's CommitSource over GetFile and GetFolder; export-ignore as `git archive` decides it."""

    client: CodeCommitClient

    def entry_type(self, path: str) -> str | None:
        kind = super().entry_type(path)
        if kind == "file" and self._export_ignored(path):
            return "export-ignored"
        return kind

    def _export_ignored(self, path: str) -> bool:
        ignore = ExportIgnore()
        parts = path.strip("/").split("/")
        for depth in range(len(parts)):
            folder = "/".join(parts[:depth])
            text = self.read_file(f"{folder}/{ATTRIBUTES_FILE}" if folder else ATTRIBUTES_FILE)
            if text is not None:
                ignore.add(folder, text.decode("utf-8", "replace"))
            if depth and ignore.ignored(folder, is_dir=True):
                return True
        return ignore.ignored(path)

    def archive(self) -> bytes:
        return self.client.archive(self.repository, self.commit)


@dataclass
class CodeCommitCommentReporter:
    """The pipeline's StatusReporter as one comment per commit and context, edited as the run moves."""

    client: CodeCommitClient

    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str = "mmp/training") -> None:
        marker = f"{MARKER} {context}"
        self.client.post_or_update(repository, commit, marker, comment_text(state, description, target_url, context))


def region_of(clone_url: str) -> str | None:
    """The region in a CodeCommit HTTPS clone URL (git-codecommit.REGION.amazonaws.com), else None."""
    match = re.match(r"^https://git-codecommit\.([a-z0-9-]+)\.amazonaws\.com/", clone_url or "")
    return match.group(1) if match else None


class CodeCommitHost(GitHost):
    """AWS CodeCommit: IAM is the credential (no token, no secret); pushes arrive as EventBridge events
    (mmp.webhook.codecommit), never as webhook deliveries. The repository's region is the clone URL's."""

    name = "codecommit"
    title = "CodeCommit"
    execution_prefix = "cc-"
    max_body_bytes = 256 * 1024  # an EventBridge event is at most 256 KB (the local server's event route)

    def __init__(self, client: CodeCommitClient | None = None, **_transport: Any):
        self._client = client
        self._clients: dict[str | None, CodeCommitClient] = {}

    def __repr__(self) -> str:
        return "CodeCommitHost()"

    def client(self, clone_url: str = "") -> CodeCommitClient:
        if self._client is not None:
            return self._client
        region = region_of(clone_url)
        if region not in self._clients:
            self._clients[region] = CodeCommitClient(region=region)
        return self._clients[region]

    def compare(self, repository: str, clone_url: str, base: str, head: str) -> Mapping[str, list[str]]:
        return self.client(clone_url).compare(repository, None if set(base) == {"0"} else base, head)

    def source(self, repository: str, clone_url: str, commit: str) -> CodeCommitSource:
        return CodeCommitSource(self.client(clone_url), repository, commit)

    def archive(self, repository: str, clone_url: str, commit: str) -> bytes:
        return self.client(clone_url).archive(repository, commit)

    def reporter(self) -> CodeCommitCommentReporter:
        return CodeCommitCommentReporter(self.client())

    def configured(self) -> bool:
        """Whether the local worker should read CodeCommit: it listens to some repositories."""
        return bool(os.environ.get("MMP_CODECOMMIT_REPOSITORIES"))

    def ready(self) -> "CodeCommitHost":
        self.client()  # the boto3 client resolves its credentials and endpoint now
        return self
