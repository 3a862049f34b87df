"""GitLab behind the host seam (mmp.hosts.base): webhook deliveries, a REST API v4 client and its pipeline faces.

Deliveries. GitLab authenticates a webhook in one of two ways, and the secret configured for the
`/webhook/gitlab` route says which this one expects:

- a **secret token** (any other value): GitLab sends it as is in `X-Gitlab-Token`. It is the shared
  secret itself, not a signature over the body: anyone who sees one delivery (a proxy's log) can
  forge others, and a captured delivery can be replayed. It is compared in constant time, and the
  delivery dedupe below stops a replay from launching twice;
- a **signing token** (`whsec_<base64 of the key>`): GitLab signs each delivery the Standard Webhooks
  way: `webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>`
  (several space-separated signatures may come during a key rotation), with `webhook-id` and
  `webhook-timestamp` (Unix seconds). The signature is checked in constant time and the timestamp
  must be within TIMESTAMP_TOLERANCE_S of now (the Standard Webhooks reference libraries' 5 minutes),
  so a captured delivery cannot be replayed later.

The delivery id is `Idempotency-Key` (GitLab 17.4 and later; the same on every retry of one event,
and equal to `webhook-id`); an older GitLab has none, and then `X-Gitlab-Event-UUID` is used (the body
digest dedupe still stops a retry). `X-Gitlab-Event: Push Hook` and `Tag Push Hook` are read as pushes,
so the shared core answers tag pushes and branch deletions as it does GitHub's.

Reading and reporting go through the REST API v4 at `MMP_GITLAB_URL` (default https://gitlab.com; a
self-managed instance's URL) with a project access token (`GITLAB_TOKEN`, or the Secrets Manager id in
`MMP_GITLAB_TOKEN_SECRET_ARN`) sent only in `PRIVATE-TOKEN`, never logged, never in an exception or a
repr. The project is addressed by its URL-encoded full path (`group%2Fsubgroup%2Fproject`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import posixpath
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mmp.hosts.base import ClientSource, Event, GitHost, Headers, HostError, Push, Refusal, push_payload_problems
from mmp.hosts.rest import RateLimited as RestRateLimited, RestClient

log = logging.getLogger("mmp.hosts.gitlab")

DEFAULT_URL = "https://gitlab.com"
TIMESTAMP_TOLERANCE_S = 300
SIGNING_PREFIX = "whsec_"
STATUS_CONTEXT = "mmp/training"
# the pipeline's states → GitLab's commit status states (pending, running, success, failed, canceled)
STATE_NAMES = {"pending": "pending", "success": "success", "failure": "failed", "error": "failed"}
DESCRIPTION_LIMIT = 255  # GitLab keeps a commit status description to 255 characters
GIT_USERNAME = "oauth2"  # any non-blank user name goes with a project access token over HTTPS
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,12}$")
PUSH_EVENTS = {"Push Hook", "Tag Push Hook", "System Hook"}  # a system hook's push has the same payload


class GitLabError(HostError):
    """A GitLab API call that failed; the message names the call and GitLab's reason, never the token."""


class RateLimited(GitLabError, RestRateLimited):
    pass


def base_url() -> str:
    return (os.environ.get("MMP_GITLAB_URL") or DEFAULT_URL).rstrip("/")


def token_from_env() -> str | None:
    from mmp.aws import secret_from_env

    return secret_from_env("GITLAB_TOKEN", "MMP_GITLAB_TOKEN_SECRET_ARN")


def project_id(full_path: str) -> str:
    """The API's id for a project: its full path, URL-encoded (`group/sub/project` → `group%2Fsub%2Fproject`)."""
    parts = full_path.split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"repository must be GitLab's full path 'group/project', got {full_path!r}")
    return urllib.parse.quote(full_path, safe="")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


# -- deliveries -------------------------------------------------------------------------------
def signing_key(secret: str | bytes) -> bytes | None:
    """The HMAC key of a `whsec_<base64>` signing token; None when the secret is a plain secret token."""
    text = secret.decode() if isinstance(secret, bytes) else secret
    if not text.startswith(SIGNING_PREFIX):
        return None
    try:
        return base64.b64decode(text[len(SIGNING_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the GitLab signing token must be 'whsec_' and base64") from None


def sign(secret: str | bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` value GitLab sends for this delivery (`v1,<base64>`)."""
    key = signing_key(secret)
    if key is None:
        raise ValueError("a signing token starts with 'whsec_'")
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def push_problems(payload: Any) -> list[str]:
    """Every problem with a GitLab push (or tag push) payload, each naming its field."""
    if not isinstance(payload, dict):
        return ["the payload must be a JSON object"]
    problems = []
    if payload.get("object_kind") not in ("push", "tag_push"):
        problems.append(f"'object_kind' must be 'push' or 'tag_push', got {payload.get('object_kind')!r}")
    return problems + push_payload_problems(payload, "project", ("path_with_namespace", "git_http_url"))


class GitLabClient(RestClient):
    title = "GitLab"
    error = GitLabError
    rate_limited_error = RateLimited

    def __init__(self, token: str | None = None, url: str | None = None, **kwargs: Any):
        super().__init__(token, (url or base_url()).rstrip("/") + "/api/v4", **kwargs)

    @classmethod
    def from_env(cls, **kwargs: Any) -> "GitLabClient":
        return cls(token=token_from_env(), **kwargs)

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"PRIVATE-TOKEN": token}

    def _repo(self, repository: str) -> str:
        return f"/projects/{project_id(repository)}/repository"

    def get_file(self, repository: str, path: str, ref: str) -> bytes | None:
        """A file's bytes at `ref` (a sha); None when GitLab says 404."""
        api_path = f"{self._repo(repository)}/files/{urllib.parse.quote(path.lstrip('/'), safe='')}/raw"
        try:
            _, data, _ = self.request("GET", api_path, query={"ref": ref}, raw=True)
        except GitLabError as exc:
            if exc.status == 404:
                return None
            raise
        return data

    def tree(self, repository: str, folder: str, ref: str) -> list[dict[str, Any]]:
        """Every entry of one folder at `ref` (all pages); [] when the folder is absent (GitLab 17.7+ answers 404)."""
        entries: list[dict[str, Any]] = []
        page = "1"
        while page:
            query = {"ref": ref, "per_page": "100", "page": page}
            if folder:
                query["path"] = folder
            try:
                _, data, headers = self.request("GET", f"{self._repo(repository)}/tree", query=query)
            except GitLabError as exc:
                if exc.status == 404:
                    return []
                raise
            entries.extend(e for e in (data or []) if isinstance(e, dict))
            page = headers.get("x-next-page", "")
        return entries

    def entry_type(self, repository: str, path: str, ref: str) -> str | None:
        """"file", "symlink", "dir" or "submodule" at `ref`; None when absent (from the parent folder's tree:
        type blob/tree/commit, and mode 120000 for a symbolic link)."""
        path = path.strip("/")
        folder, name = posixpath.split(path)
        for entry in self.tree(repository, folder, ref):
            if entry.get("name") == name:
                kind, mode = entry.get("type"), str(entry.get("mode") or "")
                if kind == "blob":
                    return "symlink" if mode == "120000" else "file"
                return {"tree": "dir", "commit": "submodule"}.get(kind, str(kind or "unknown entry"))
        return None

    def archive(self, repository: str, sha: str) -> bytes:
        """The tree at `sha` as GitLab's tar.gz (one top folder `<project>-<sha>-<sha>/`)."""
        _, data, _ = self.request("GET", f"{self._repo(repository)}/archive.tar.gz", query={"sha": sha}, raw=True)
        if not isinstance(data, bytes) or data[:2] != b"\x1f\x8b":
            raise GitLabError(f"GitLab archive of {repository}@{sha[:12]} is not a gzip archive")
        return data

    def compare(self, repository: str, base: str, head: str) -> dict[str, list[str]]:
        """added / modified / removed paths between two commits (a rename counts as both)."""
        _, data, _ = self.request("GET", f"{self._repo(repository)}/compare", query={"from": base, "to": head})
        out: dict[str, list[str]] = {"added": [], "modified": [], "removed": []}
        for diff in (data or {}).get("diffs") or []:
            if diff.get("deleted_file"):
                out["removed"].append(diff.get("old_path"))
            elif diff.get("new_file"):
                out["added"].append(diff.get("new_path"))
            elif diff.get("renamed_file"):
                out["added"].append(diff.get("new_path"))
                out["removed"].append(diff.get("old_path"))
            else:
                out["modified"].append(diff.get("new_path"))
        return out

    def create_status(self, repository: str, sha: str, state: str, description: str = "",
                      target_url: str | None = None, context: str = STATUS_CONTEXT) -> Any:
        """POST /projects/:id/statuses/:sha with one of GitLab's states."""
        if state not in ("pending", "running", "success", "failed", "canceled"):
            raise ValueError(f"state must be one of pending, running, success, failed, canceled, got {state!r}")
        body: dict[str, Any] = {"state": state, "name": context, "description": _short(description)}
        if target_url:
            body["target_url"] = target_url
        try:
            _, data, _ = self.request("POST", f"/projects/{project_id(repository)}/statuses/{sha}", body=body)
        except GitLabError as exc:
            # GitLab refuses to set a status to the state it already has ("Cannot transition status via
            # :enqueue from :pending"): the commit already shows it
            if exc.status == 400 and "Cannot transition status" in str(exc):
                log.info("GitLab status of %s@%s is already %s", repository, sha[:12], state)
                return None
            raise
        return data


class GitLabSource(ClientSource):
    """The pipeline's CommitSource over the repository files and tree APIs."""


@dataclass
class GitLabStatusReporter:
    """The pipeline's StatusReporter as GitLab commit statuses: its states mapped to GitLab's
    (failure and error → failed; an error that says it was cancelled → canceled)."""

    client: GitLabClient
    context: str = STATUS_CONTEXT

    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str | None = None) -> None:
        if state not in STATE_NAMES:
            raise ValueError(f"state must be one of {', '.join(STATE_NAMES)}, got {state!r}")
        name = "canceled" if state == "error" and description.lower().startswith("cancelled") else STATE_NAMES[state]
        self.client.create_status(repository, commit, name, description, target_url, context or self.context)


class GitLabHost(GitHost):
    """gitlab.com or a self-managed GitLab (`MMP_GITLAB_URL`)."""

    name = "gitlab"
    title = "GitLab"
    max_body_bytes = 25 * 1024 * 1024
    single_headers = ("X-Gitlab-Token", "X-Gitlab-Event", "Idempotency-Key", "webhook-id", "webhook-timestamp",
                      "webhook-signature")
    execution_prefix = "gl-"

    def __init__(self, client: GitLabClient | None = None, *, clock: Callable[[], float] = time.time,
                 **client_kwargs: Any):
        self._client = client
        self._client_kwargs = client_kwargs
        self.clock = clock

    def __repr__(self) -> str:
        return f"GitLabHost({self._client!r})"

    @property
    def client(self) -> GitLabClient:
        if self._client is None:
            self._client = GitLabClient.from_env(**self._client_kwargs)
        return self._client

    # -- deliveries ---------------------------------------------------------------------
    def check_headers(self, headers: Headers, secret: str | bytes | None) -> Refusal | None:
        try:
            key = signing_key(secret or "")
        except ValueError as exc:
            log.error("%s", exc)
            return Refusal(500, "the GitLab signing token is not configured correctly")
        if key is None:
            token = headers.get("X-Gitlab-Token")
            if not token:
                return Refusal(401, "X-Gitlab-Token header is missing")
            expected = secret.encode() if isinstance(secret, str) else (secret or b"")
            if not hmac.compare_digest(token.encode(), expected):
                return Refusal(401, "X-Gitlab-Token does not match the webhook's secret token")
            return None
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            if not headers.get(name):
                return Refusal(401, f"{name} header is missing (a signing token is configured for GitLab)")
        stamp = (headers.get("webhook-timestamp") or "").strip()
        if not _TIMESTAMP_RE.match(stamp):
            return Refusal(401, "webhook-timestamp must be Unix seconds")
        skew = abs(int(self.clock()) - int(stamp))
        if skew > TIMESTAMP_TOLERANCE_S:
            return Refusal(401, f"webhook-timestamp is {skew} s from now; a signed delivery is accepted within "
                                f"{TIMESTAMP_TOLERANCE_S} s (a replayed or delayed delivery)")
        return None

    def verify(self, headers: Headers, body: bytes, secret: str | bytes | None) -> Refusal | None:
        key = signing_key(secret or "")
        if key is None:
            return None  # the secret token was compared before the body was read
        message = f"{headers.get('webhook-id')}.{(headers.get('webhook-timestamp') or '').strip()}.".encode() + body
        expected = base64.b64encode(hmac.new(key, message, hashlib.sha256).digest())
        for candidate in (headers.get("webhook-signature") or "").split():
            version, _, value = candidate.partition(",")
            if version == "v1" and hmac.compare_digest(value.encode(), expected):
                return None
        return Refusal(401, "webhook-signature does not match the body (wrong signing token or altered body)")

    def event(self, headers: Headers) -> Event | Refusal:
        event = headers.get("X-Gitlab-Event")
        if not event:
            return Refusal(400, "X-Gitlab-Event header is missing")
        if event not in PUSH_EVENTS:
            return Event(event, None)
        delivery = headers.get("Idempotency-Key") or headers.get("webhook-id") or headers.get("X-Gitlab-Event-UUID")
        if not delivery or not _DELIVERY_RE.match(delivery):
            return Refusal(400, "Idempotency-Key header is missing or malformed (GitLab 17.4 and later send it; "
                                "older ones send X-Gitlab-Event-UUID)")
        return Event("push", delivery)

    def parse_push(self, payload: Any) -> Push | list[str]:
        problems = push_problems(payload)
        if problems:
            return problems
        project = payload["project"]
        return Push(ref=payload["ref"], before=payload["before"], after=payload["after"],
                    repository=project["path_with_namespace"], clone_url=project["git_http_url"],
                    default_branch=project.get("default_branch"), commits=payload["commits"],
                    deleted=payload.get("checkout_sha", "") is None and payload["after"] == "0" * 40)

    # -- reading and reporting ------------------------------------------------------------
    def compare(self, repository: str, clone_url: str, base: str, head: str) -> Mapping[str, list[str]]:
        return self.client.compare(repository, base, head)

    def source(self, repository: str, clone_url: str, commit: str) -> GitLabSource:
        return GitLabSource(self.client, repository, commit)

    def archive(self, repository: str, clone_url: str, commit: str) -> bytes:
        client = self._client or GitLabClient.from_env(**{**self._client_kwargs, "timeout": 60})
        return client.archive(repository, commit)

    def reporter(self) -> GitLabStatusReporter:
        return GitLabStatusReporter(self.client)

    def git_credentials(self) -> tuple[str, str] | None:
        token = token_from_env()
        return (GIT_USERNAME, token) if token else None

    def configured(self) -> bool:
        return bool(os.environ.get("GITLAB_TOKEN"))

    def ready(self) -> "GitLabHost":
        self.client  # noqa: B018 - reads the token now
        return self
