"""A CodeCommit stand-in that MMP owns: a real HTTP server speaking CodeCommit's JSON 1.1 protocol,
backed by real git repositories, so the real boto3 `codecommit` client (endpoint_url) talks to it.

Why: moto implements only CodeCommit's repository calls, and the service is closed to new AWS
customers, so no test account can reach the real one. What it answers, and where each shape and
error code comes from (the API reference, checked against botocore's own service model, which
lists every operation's members and errors):

| operation | answer | errors it can raise |
|---|---|---|
| GetRepository | repositoryMetadata (name, id, Arn, defaultBranch, clone URLs) | RepositoryDoesNotExistException |
| GetBranch | branch {branchName, commitId} | BranchDoesNotExistException |
| GetCommit | commit {commitId, treeId, parents, message, author, committer} | CommitIdDoesNotExistException, InvalidCommitIdException |
| GetFile | commitId, blobId, filePath, fileMode, fileSize, fileContent (base64) | FileDoesNotExistException, CommitDoesNotExistException, FileTooLargeException |
| GetFolder | commitId, folderPath, treeId, subFolders, files, symbolicLinks, subModules | FolderDoesNotExistException, CommitDoesNotExistException |
| GetBlob | content (base64) | BlobIdDoesNotExistException, InvalidBlobIdException, FileTooLargeException |
| GetDifferences | differences [{beforeBlob, afterBlob, changeType A/M/D}], NextToken | CommitDoesNotExistException, InvalidContinuationTokenException |
| PostCommentForComparedCommit | repositoryName, before/afterCommitId, comment {...} | CommitDoesNotExistException, CommentContentSizeLimitExceededException, IdempotencyParameterMismatchException |
| UpdateComment | comment {...} | CommentDoesNotExistException, CommentContentSizeLimitExceededException |
| GetCommentsForComparedCommit | commentsForComparedCommitData [{..., comments}], nextToken | CommitDoesNotExistException |

Every operation also answers RepositoryDoesNotExistException for an unknown repository and
InvalidRepositoryNameException for a name outside `[\\w.-]{1,100}`.

Assumptions (what only the real service can show; docs/gitops.md repeats them):
- GetFile of a folder or a submodule path answers FileDoesNotExistException; of a symbolic link it
  answers the link's target with fileMode SYMLINK.
- GetFolder's paths carry no leading slash (`absolutePath` "src/a.py", `relativePath` "a.py"); the
  root is asked for as "/" (or "").
- GetFile and GetBlob refuse blobs over FILE_LIMIT (6 MB) with FileTooLargeException.
- GetDifferences pages at MaxResults (default 100) with an opaque NextToken; no
  beforeCommitSpecifier lists every file of the after commit as added.
- Comments are 10,240 characters at most (CommentContentSizeLimitExceededException); a comment's
  `authorArn` is the caller (one caller here: STANDIN_CALLER).
Requests are not signature-checked: the tests judge every call against its role's IAM policy on
the client side (tests/iam_enforce), which is what IAM would decide.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

TARGET_PREFIX = "CodeCommit_20150413."
REGION = "eu-west-1"
ACCOUNT = "123456789012"
STANDIN_CALLER = f"arn:aws:sts::{ACCOUNT}:assumed-role/mmp-pipeline-stages/standin"
FILE_LIMIT = 6 * 1024 * 1024
COMMENT_LIMIT = 10240
DEFAULT_MAX_RESULTS = 100
_NAME_RE = re.compile(r"^[\w.-]{1,100}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_MODES = {"100644": "NORMAL", "100755": "EXECUTABLE", "120000": "SYMLINK"}


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Repo:
    name: str
    path: Path
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    default_branch: str = "main"

    @property
    def arn(self) -> str:
        return f"arn:aws:codecommit:{REGION}:{ACCOUNT}:{self.name}"

    _batch: subprocess.Popen | None = None
    _batch_lock: threading.Lock = field(default_factory=threading.Lock)

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace')}")
        return proc

    def object(self, sha: str) -> tuple[str, bytes] | None:
        """(type, bytes) of an object through one long-lived `git cat-file --batch`; None when missing."""
        with self._batch_lock:
            if self._batch is None:
                self._batch = subprocess.Popen(["git", "-C", str(self.path), "cat-file", "--batch"],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self._batch.stdin is not None and self._batch.stdout is not None
            self._batch.stdin.write(sha.encode() + b"\n")
            self._batch.stdin.flush()
            header = self._batch.stdout.readline().split()
            if len(header) != 3:
                return None
            data = self._batch.stdout.read(int(header[2]))
            self._batch.stdout.read(1)  # the newline after the object
            return header[1].decode(), data

    def close(self) -> None:
        if self._batch is not None:
            self._batch.stdin.close()  # type: ignore[union-attr]
            self._batch.wait(timeout=10)
            self._batch.stdout.close()  # type: ignore[union-attr]
            self._batch = None


class CodeCommitStandIn:
    """Start with `with CodeCommitStandIn() as cc:`; `cc.add(name, path)`; `cc.url` is the endpoint."""

    def __init__(self, latency: float = 0.0):
        self.repos: dict[str, Repo] = {}
        self.comments: dict[str, dict[str, Any]] = {}  # commentId -> comment + where it lives
        self.tokens: dict[str, tuple[str, str]] = {}  # clientRequestToken -> (params digest, commentId)
        self.calls: list[tuple[str, dict]] = []
        self.latency = latency  # seconds added to every answer (the bench's model of a real round trip)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.on_comment: Callable[[str, str], None] | None = None  # (commentId, repositoryName), for IAM checks

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "CodeCommitStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, payload = standin.dispatch(self.headers.get("X-Amz-Target", ""), body)
                data = json.dumps(payload).encode()
                if standin.latency:
                    time.sleep(standin.latency)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="codecommit-standin", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for repo in self.repos.values():
            repo.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the stand-in first (with CodeCommitStandIn() as cc)"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, name: str, path: Path | str, default_branch: str = "main") -> Repo:
        repo = Repo(name, Path(path), default_branch=default_branch)
        self.repos[name] = repo
        return repo

    def operations(self) -> list[str]:
        return [op for op, _ in self.calls]

    def comments_on(self, repository: str, after: str) -> list[dict[str, Any]]:
        return [c for c in self.comments.values() if c["_repository"] == repository and c["_after"] == after]

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, target: str, body: bytes) -> tuple[int, dict]:
        op = target.removeprefix(TARGET_PREFIX)
        try:
            params = json.loads(body or b"{}")
        except json.JSONDecodeError:
            return 400, {"__type": "SerializationException", "message": "body is not JSON"}
        with self._lock:
            self.calls.append((op, params))
        handler = getattr(self, f"op_{op}", None) if target.startswith(TARGET_PREFIX) else None
        if handler is None:
            return 400, {"__type": "UnknownOperationException", "message": f"unknown operation {target!r}"}
        try:
            return 200, handler(params)
        except ApiError as exc:
            return exc.status, {"__type": exc.code, "message": exc.message}

    # -- helpers -----------------------------------------------------------------------------
    def _repo(self, params: dict) -> Repo:
        name = params.get("repositoryName")
        if not name:
            raise ApiError("RepositoryNameRequiredException", "A repository name is required.")
        if not _NAME_RE.match(name):
            raise ApiError("InvalidRepositoryNameException", f"{name} is not a valid repository name.")
        if name not in self.repos:
            raise ApiError("RepositoryDoesNotExistException", f"{name} does not exist")
        return self.repos[name]

    @staticmethod
    def _commit(repo: Repo, specifier: str | None, error: str = "CommitDoesNotExistException") -> str:
        spec = specifier or "HEAD"
        if spec.startswith("-"):
            raise ApiError("InvalidCommitException", f"{spec} is not a valid commit specifier.")
        proc = repo.git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise ApiError(error, f"Could not find a commit for {spec}")
        return proc.stdout.decode().strip()

    @staticmethod
    def _entries(repo: Repo, commit: str, folder: str) -> list[tuple[str, str, str, str]]:
        """(mode, type, sha, name) of a tree's direct entries; folder '' is the root."""
        treeish = f"{commit}:{folder}" if folder else f"{commit}^{{tree}}"
        out = repo.git("ls-tree", "-z", treeish).stdout.decode()
        entries = []
        for record in filter(None, out.split("\0")):
            meta, _, name = record.partition("\t")
            mode, kind, sha = meta.split()
            entries.append((mode, kind, sha, name))
        return entries

    @staticmethod
    def _path(raw: str | None, error: str = "PathRequiredException") -> str:
        if raw is None:
            raise ApiError(error, "A path is required.")
        path = raw.strip("/")
        if any(part in ("", ".", "..") for part in path.split("/")) and path:
            raise ApiError("InvalidPathException", f"{raw} is not a valid path.")
        return path

    def _entry(self, repo: Repo, commit: str, path: str) -> tuple[str, str, str] | None:
        """(mode, type, sha) of one path at a commit, None when absent."""
        out = repo.git("ls-tree", "-z", commit, "--", path).stdout.decode()
        for record in filter(None, out.split("\0")):
            meta, _, name = record.partition("\t")
            if name == path:
                mode, kind, sha = meta.split()
                return mode, kind, sha
        return None

    def _blob(self, repo: Repo, sha: str) -> bytes:
        found = repo.object(sha)
        if found is None or found[0] != "blob":
            raise ApiError("BlobIdDoesNotExistException", f"Could not find blob {sha}")
        return found[1]

    # -- operations --------------------------------------------------------------------------
    def op_GetRepository(self, p: dict) -> dict:
        repo = self._repo(p)
        return {"repositoryMetadata": {
            "accountId": ACCOUNT, "repositoryId": repo.id, "repositoryName": repo.name,
            "defaultBranch": repo.default_branch, "lastModifiedDate": time.time(), "creationDate": time.time(),
            "cloneUrlHttp": f"https://git-codecommit.{REGION}.amazonaws.com/v1/repos/{repo.name}",
            "cloneUrlSsh": f"ssh://git-codecommit.{REGION}.amazonaws.com/v1/repos/{repo.name}", "Arn": repo.arn}}

    def op_GetBranch(self, p: dict) -> dict:
        repo = self._repo(p)
        branch = p.get("branchName")
        if not branch:
            raise ApiError("BranchNameRequiredException", "A branch name is required.")
        proc = repo.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)
        if proc.returncode != 0:
            raise ApiError("BranchDoesNotExistException", f"Could not find branch {branch}")
        return {"branch": {"branchName": branch, "commitId": proc.stdout.decode().strip()}}

    def op_GetCommit(self, p: dict) -> dict:
        repo = self._repo(p)
        commit_id = p.get("commitId")
        if not commit_id:
            raise ApiError("CommitIdRequiredException", "A commit ID is required.")
        if not _SHA_RE.match(commit_id):
            raise ApiError("InvalidCommitIdException", f"{commit_id} is not a valid full commit ID.")
        sha = self._commit(repo, commit_id, "CommitIdDoesNotExistException")
        fmt = "%T%x00%P%x00%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd%x00%B"
        fields = repo.git("show", "-s", "--date=raw", f"--format={fmt}", sha).stdout.decode().split("\0")
        tree, parents, an, ae, ad, cn, ce, cd, message = fields
        return {"commit": {"commitId": sha, "treeId": tree, "parents": parents.split(), "message": message,
                           "author": {"name": an, "email": ae, "date": ad},
                           "committer": {"name": cn, "email": ce, "date": cd}, "additionalData": ""}}

    def op_GetFile(self, p: dict) -> dict:
        repo = self._repo(p)
        path = self._path(p.get("filePath"))
        commit = self._commit(repo, p.get("commitSpecifier"))
        entry = self._entry(repo, commit, path) if path else None
        if entry is None or entry[1] != "blob":
            raise ApiError("FileDoesNotExistException", f"The file {path} does not exist at {commit}")
        mode, _, sha = entry
        data = self._blob(repo, sha)
        if len(data) > FILE_LIMIT:
            raise ApiError("FileTooLargeException", f"The file {path} is larger than {FILE_LIMIT} bytes")
        return {"commitId": commit, "blobId": sha, "filePath": path, "fileMode": _MODES.get(mode, "NORMAL"),
                "fileSize": len(data), "fileContent": base64.b64encode(data).decode()}

    def op_GetFolder(self, p: dict) -> dict:
        repo = self._repo(p)
        folder = self._path(p.get("folderPath"))
        commit = self._commit(repo, p.get("commitSpecifier"))
        if folder:
            entry = self._entry(repo, commit, folder)
            if entry is None or entry[1] != "tree":
                raise ApiError("FolderDoesNotExistException", f"The folder {folder} does not exist at {commit}")
            tree = entry[2]
        else:
            tree = repo.git("rev-parse", f"{commit}^{{tree}}").stdout.decode().strip()
        out: dict[str, Any] = {"commitId": commit, "folderPath": folder or "/", "treeId": tree, "subFolders": [],
                               "files": [], "symbolicLinks": [], "subModules": []}
        for mode, kind, sha, name in self._entries(repo, commit, folder):
            absolute = f"{folder}/{name}" if folder else name
            if kind == "tree":
                out["subFolders"].append({"treeId": sha, "absolutePath": absolute, "relativePath": name})
            elif kind == "commit":
                out["subModules"].append({"commitId": sha, "absolutePath": absolute, "relativePath": name})
            else:
                kind_key = "symbolicLinks" if mode == "120000" else "files"
                out[kind_key].append({"blobId": sha, "absolutePath": absolute, "relativePath": name,
                                      "fileMode": _MODES.get(mode, "NORMAL")})
        return out

    def op_GetBlob(self, p: dict) -> dict:
        repo = self._repo(p)
        blob = p.get("blobId")
        if not blob:
            raise ApiError("BlobIdRequiredException", "A blob ID is required.")
        if not _SHA_RE.match(blob):
            raise ApiError("InvalidBlobIdException", f"{blob} is not a valid blob ID.")
        data = self._blob(repo, blob)
        if len(data) > FILE_LIMIT:
            raise ApiError("FileTooLargeException", f"The blob {blob} is larger than {FILE_LIMIT} bytes")
        return {"content": base64.b64encode(data).decode()}

    def op_GetDifferences(self, p: dict) -> dict:
        repo = self._repo(p)
        if not p.get("afterCommitSpecifier"):
            raise ApiError("CommitRequiredException", "A commit specifier is required.")
        after = self._commit(repo, p["afterCommitSpecifier"])
        before = self._commit(repo, p["beforeCommitSpecifier"]) if p.get("beforeCommitSpecifier") else None
        if before:
            raw = repo.git("diff-tree", "-r", "-z", "--no-renames", before, after).stdout.decode()
            fields = [f for f in raw.split("\0")]
            diffs = []
            for i in range(0, len(fields) - 1, 2):
                meta, path = fields[i], fields[i + 1]
                if not meta.startswith(":"):
                    continue
                old_mode, new_mode, old_sha, new_sha, status = meta[1:].split()
                before_blob = {"blobId": old_sha, "path": path, "mode": old_mode}
                after_blob = {"blobId": new_sha, "path": path, "mode": new_mode}
                kind = status[0]
                diff: dict[str, Any] = {"changeType": kind if kind in "AMD" else "M"}
                if kind != "A":
                    diff["beforeBlob"] = before_blob
                if kind != "D":
                    diff["afterBlob"] = after_blob
                diffs.append(diff)
        else:
            raw = repo.git("ls-tree", "-r", "-z", after).stdout.decode()
            diffs = []
            for record in filter(None, raw.split("\0")):
                meta, _, path = record.partition("\t")
                mode, _, sha = meta.split()
                diffs.append({"changeType": "A", "afterBlob": {"blobId": sha, "path": path, "mode": mode}})
        limit = int(p.get("MaxResults") or DEFAULT_MAX_RESULTS)
        if limit < 1:
            raise ApiError("InvalidMaxResultsException", "MaxResults must be positive.")
        start = 0
        if p.get("NextToken"):
            try:
                start = int(base64.b64decode(p["NextToken"]).decode())
            except (ValueError, UnicodeDecodeError):
                raise ApiError("InvalidContinuationTokenException", "The continuation token is not valid.") from None
        page = {"differences": diffs[start:start + limit]}
        if start + limit < len(diffs):
            page["NextToken"] = base64.b64encode(str(start + limit).encode()).decode()
        return page

    def _comment_out(self, comment: dict) -> dict:
        return {k: v for k, v in comment.items() if not k.startswith("_")}

    def _content(self, p: dict) -> str:
        content = p.get("content")
        if not content:
            raise ApiError("CommentContentRequiredException", "Comment content is required.")
        if len(content) > COMMENT_LIMIT:
            raise ApiError("CommentContentSizeLimitExceededException",
                           f"The comment is {len(content)} characters; the limit is {COMMENT_LIMIT}.")
        return content

    def op_PostCommentForComparedCommit(self, p: dict) -> dict:
        repo = self._repo(p)
        if not p.get("afterCommitId"):
            raise ApiError("CommitIdRequiredException", "An after commit ID is required.")
        content = self._content(p)
        after = self._commit(repo, p["afterCommitId"])
        before = self._commit(repo, p["beforeCommitId"]) if p.get("beforeCommitId") else None
        if before == after:
            raise ApiError("BeforeCommitIdAndAfterCommitIdAreSameException", "The before and after commits are the same.")
        token = p.get("clientRequestToken")
        if not token:
            raise ApiError("ClientRequestTokenRequiredException", "A client request token is required.")
        digest = json.dumps([repo.name, before, after, content])
        with self._lock:
            if token in self.tokens:
                seen, comment_id = self.tokens[token]
                if seen != digest:
                    raise ApiError("IdempotencyParameterMismatchException",
                                   "The client request token was used with different parameters.")
                comment = self.comments[comment_id]
            else:
                now = time.time()
                comment_id = str(uuid.uuid4())
                comment = {"commentId": comment_id, "content": content, "creationDate": now,
                           "lastModifiedDate": now, "authorArn": STANDIN_CALLER, "deleted": False,
                           "clientRequestToken": token, "callerReactions": [], "reactionCounts": {},
                           "_repository": repo.name, "_before": before, "_after": after, "_history": [content]}
                self.comments[comment_id] = comment
                self.tokens[token] = (digest, comment_id)
        checker = sys.modules.get("iam_calls")  # tests/iam_enforce, as tests/conftest.py imports it
        if checker is not None:  # where IAM authorises a later UpdateComment of this comment
            checker.COMMENT_REPOSITORIES[comment_id] = repo.name
        if self.on_comment:
            self.on_comment(comment_id, repo.name)
        out = {"repositoryName": repo.name, "afterCommitId": after, "comment": self._comment_out(comment)}
        if before:
            out["beforeCommitId"] = before
        return out

    def op_UpdateComment(self, p: dict) -> dict:
        comment_id = p.get("commentId")
        if not comment_id:
            raise ApiError("CommentIdRequiredException", "A comment ID is required.")
        content = self._content(p)
        with self._lock:
            comment = self.comments.get(comment_id)
            if comment is None:
                raise ApiError("CommentDoesNotExistException", f"No comment exists with the ID {comment_id}.")
            if comment["deleted"]:
                raise ApiError("CommentDeletedException", "The comment was deleted.")
            comment.update(content=content, lastModifiedDate=time.time())
            comment["_history"].append(content)
        return {"comment": self._comment_out(comment)}

    def op_GetCommentsForComparedCommit(self, p: dict) -> dict:
        repo = self._repo(p)
        if not p.get("afterCommitId"):
            raise ApiError("CommitIdRequiredException", "An after commit ID is required.")
        after = self._commit(repo, p["afterCommitId"])
        before = self._commit(repo, p["beforeCommitId"]) if p.get("beforeCommitId") else None
        mine = [c for c in self.comments.values()
                if c["_repository"] == repo.name and c["_after"] == after and c["_before"] == before]
        data = []
        if mine:
            entry = {"repositoryName": repo.name, "afterCommitId": after,
                     "comments": [self._comment_out(c) for c in mine]}
            if before:
                entry["beforeCommitId"] = before
            data.append(entry)
        return {"commentsForComparedCommitData": data}
