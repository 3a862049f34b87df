"""GitHub behind the host seam (mmp.hosts.base): its webhook deliveries, a small REST client
(stdlib urllib, so the Lambda can use it) and its pipeline faces.

Deliveries: `X-Hub-Signature-256` is an HMAC-SHA256 of the raw body with the webhook secret,
checked in constant time before anything is parsed; `X-GitHub-Event` names the event and
`X-GitHub-Delivery` is the delivery id (unchanged on a redelivery: the dedupe key).

It reads a file at a commit (contents API, `ref=<sha>`), downloads the commit's tree
as a tarball (what `git archive` makes; the code the training job runs), lists the files changed
between two commits (compare API) and sets commit statuses. 5xx answers, network
errors and rate limits (403/429 with `x-ratelimit-remaining: 0` or `retry-after`)
are retried with backoff; other 4xx are not. The token comes from `GITHUB_TOKEN` or
the Secrets Manager id in `MMP_GITHUB_TOKEN_SECRET_ARN`, is only ever put in the
Authorization header, and never appears in an exception, a log line or a repr.
`MMP_GITHUB_API_URL` points the client at GitHub Enterprise (`https://HOST/api/v3`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mmp.hosts.rest import RateLimited as RestRateLimited, RestClient
from mmp.hosts.base import ClientSource, Event, GitHost, Headers, HostError, Push, Refusal, push_payload_problems

log = logging.getLogger("mmp.hosts.github")

DEFAULT_API_URL = "https://api.github.com"
STATUS_CONTEXT = "mmp/training"
STATUS_STATES = ("pending", "success", "failure", "error")
DESCRIPTION_LIMIT = 140
API_VERSION = "2022-11-28"
_SIGNATURE_RE = re.compile(r"^sha256=[0-9a-fA-F]{64}$")
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class GitHubError(HostError):
    """A GitHub API call that failed; the message names the call and GitHub's reason, never the token."""


class RateLimited(GitHubError, RestRateLimited):
    pass


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Constant-time check of `X-Hub-Signature-256` against the raw body."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def api_url() -> str:
    return (os.environ.get("MMP_GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")


def token_from_env() -> str | None:
    from mmp.aws import secret_from_env

    return secret_from_env("GITHUB_TOKEN", "MMP_GITHUB_TOKEN_SECRET_ARN")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def _split(full_name: str) -> str:
    owner, _, name = full_name.partition("/")
    if not owner or not name or "/" in name:
        raise ValueError(f"repository must be 'owner/name', got {full_name!r}")
    return f"{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}"


class GitHubClient(RestClient):
    title = "GitHub"
    error = GitHubError
    rate_limited_error = RateLimited
    default_accept = "application/vnd.github+json"

    def __init__(self, token: str | None = None, base_url: str | None = None, *, retries: int = 4,
                 backoff: float = 0.5, max_wait: float | None = None, timeout: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(token, base_url or api_url(), retries=retries, backoff=backoff,
                         max_wait=float(os.environ.get("MMP_GITHUB_MAX_WAIT", 60)) if max_wait is None else max_wait,
                         timeout=timeout, sleep=sleep)

    @classmethod
    def from_env(cls, **kwargs: Any) -> "GitHubClient":
        return cls(token=token_from_env(), **kwargs)

    def extra_headers(self) -> dict[str, str]:
        return {"X-GitHub-Api-Version": API_VERSION}

    # -- calls ---------------------------------------------------------------------
    def _contents(self, repository: str, path: str, ref: str) -> tuple[str, Any]:
        """(API path, the contents API's answer for `path` at `ref`), answer None on a 404."""
        api_path = f"/repos/{_split(repository)}/contents/{urllib.parse.quote(path.lstrip('/'), safe='/')}"
        try:
            _, data, _ = self.request("GET", api_path, query={"ref": ref})
        except GitHubError as exc:
            if exc.status == 404:
                return api_path, None
            raise
        return api_path, data

    def entry_type(self, repository: str, path: str, ref: str) -> str | None:
        """"file", "symlink", "dir" or "submodule" at `ref`; None when absent.

        The contents API answers a symlink whose target is a regular file in the
        repository with that file, under the target's own `path`: a path that differs
        from the one asked for is a symlink too.
        """
        _, data = self._contents(repository, path, ref)
        if data is None:
            return None
        if isinstance(data, list):
            return "dir"
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "file" and data.get("path") not in (None, path.lstrip("/")):
            return "symlink"
        return kind or "unknown entry"

    def get_file(self, repository: str, path: str, ref: str) -> bytes | None:
        """A file's bytes at `ref` (a sha), None when GitHub says 404."""
        api_path, data = self._contents(repository, path, ref)
        if data is None:
            return None
        if isinstance(data, list) or not isinstance(data, dict) or data.get("type") not in (None, "file"):
            raise GitHubError(f"GitHub GET {api_path}: {path} is not a file at {ref[:12]}")
        if data.get("encoding") == "base64":
            return base64.b64decode(data.get("content") or "")  # b64decode skips the embedded newlines
        # files over 1 MB come back with encoding "none": ask for the raw bytes
        _, raw, _ = self.request("GET", api_path, query={"ref": ref}, accept="application/vnd.github.raw")
        return raw

    def tarball(self, repository: str, ref: str) -> bytes:
        """The tree at `ref` (a sha) as a gzipped tarball under one top folder (GitHub's
        `owner-repo-sha7/`): the commit's files only, never a working tree."""
        _, data, _ = self.request("GET", f"/repos/{_split(repository)}/tarball/{urllib.parse.quote(ref, safe='')}",
                                  raw=True)
        if not isinstance(data, bytes) or data[:2] != b"\x1f\x8b":
            raise GitHubError(f"GitHub tarball of {repository}@{ref[:12]} is not a gzip archive")
        return data

    def compare(self, repository: str, base: str, head: str) -> dict[str, list[str]]:
        """added / modified / removed paths between two commits (a rename counts as both)."""
        api_path = f"/repos/{_split(repository)}/compare/{urllib.parse.quote(base, safe='')}...{urllib.parse.quote(head, safe='')}"
        _, data, _ = self.request("GET", api_path)
        out: dict[str, list[str]] = {"added": [], "modified": [], "removed": []}
        for entry in (data or {}).get("files") or []:
            status, name = entry.get("status"), entry.get("filename")
            if status in ("added", "copied"):
                out["added"].append(name)
            elif status == "removed":
                out["removed"].append(name)
            elif status == "renamed":
                out["added"].append(name)
                if entry.get("previous_filename"):
                    out["removed"].append(entry["previous_filename"])
            elif status != "unchanged":
                out["modified"].append(name)
        return out

    def create_status(self, repository: str, sha: str, state: str, description: str = "",
                      target_url: str | None = None, context: str = STATUS_CONTEXT) -> dict:
        if state not in STATUS_STATES:
            raise ValueError(f"state must be one of {', '.join(STATUS_STATES)}, got {state!r}")
        body: dict[str, Any] = {"state": state, "description": _short(description), "context": context}
        if target_url:
            body["target_url"] = target_url
        _, data, _ = self.request("POST", f"/repos/{_split(repository)}/statuses/{sha}", body=body)
        return data


class GitHubSource(ClientSource):
    """The pipeline's CommitSource over the contents API."""


@dataclass
class GitHubStatusReporter:
    """The pipeline's StatusReporter as GitHub commit statuses (context mmp/training)."""

    client: GitHubClient
    context: str = STATUS_CONTEXT

    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str | None = None) -> None:
        self.client.create_status(repository, commit, state, description, target_url, context or self.context)


def push_problems(payload: Any) -> list[str]:
    """Every problem with a GitHub push payload, each naming its field."""
    return push_payload_problems(payload, "repository", ("full_name", "clone_url"))


class GitHubHost(GitHost):
    """github.com or GitHub Enterprise (`MMP_GITHUB_API_URL`); the token from `GITHUB_TOKEN` or
    `MMP_GITHUB_TOKEN_SECRET_ARN`. The client is made on first use, or given."""

    name = "github"
    title = "GitHub"
    max_body_bytes = 25 * 1024 * 1024  # GitHub caps payloads at 25 MB
    single_headers = ("X-Hub-Signature-256", "X-GitHub-Event", "X-GitHub-Delivery")
    execution_prefix = "gh-"
    webhook_secret_env = ("MMP_WEBHOOK_SECRET", "MMP_WEBHOOK_SECRET_ARN")  # the first host's names, kept

    def __init__(self, client: "GitHubClient | None" = None, **client_kwargs: Any):
        self._client = client
        self._client_kwargs = client_kwargs

    def __repr__(self) -> str:
        return f"GitHubHost({self._client!r})"

    @property
    def client(self) -> "GitHubClient":
        if self._client is None:
            self._client = GitHubClient.from_env(**self._client_kwargs)
        return self._client

    # -- deliveries ---------------------------------------------------------------------
    def check_headers(self, headers: Headers, secret: str | bytes | None) -> Refusal | None:
        signature = headers.get("X-Hub-Signature-256")
        if not signature:
            return Refusal(401, "X-Hub-Signature-256 header is missing")
        if not _SIGNATURE_RE.match(signature.strip()):
            return Refusal(401, "X-Hub-Signature-256 must be 'sha256=' and 64 hex digits")
        return None

    def verify(self, headers: Headers, body: bytes, secret: str | bytes | None) -> Refusal | None:
        if not verify_signature(secret or b"", body, headers.get("X-Hub-Signature-256")):
            return Refusal(401, "X-Hub-Signature-256 does not match the body (wrong secret or altered body)")
        return None

    def event(self, headers: Headers) -> Event | Refusal:
        event = headers.get("X-GitHub-Event")
        if not event:
            return Refusal(400, "X-GitHub-Event header is missing")
        delivery = headers.get("X-GitHub-Delivery")
        if event == "push" and (not delivery or not _DELIVERY_RE.match(delivery)):
            return Refusal(400, "X-GitHub-Delivery header is missing or malformed")
        return Event(event, delivery)

    def parse_push(self, payload: Any) -> Push | list[str]:
        problems = push_problems(payload)
        if problems:
            return problems
        repo = payload["repository"]
        return Push(ref=payload["ref"], before=payload["before"], after=payload["after"],
                    repository=repo["full_name"], clone_url=repo["clone_url"],
                    default_branch=repo.get("default_branch") or repo.get("master_branch"),
                    commits=payload["commits"], deleted=payload.get("deleted") is True)

    # -- reading and reporting ------------------------------------------------------------
    def compare(self, repository: str, clone_url: str, base: str, head: str) -> Mapping[str, list[str]]:
        return self.client.compare(repository, base, head)

    def source(self, repository: str, clone_url: str, commit: str) -> GitHubSource:
        return GitHubSource(self.client, repository, commit)

    def archive(self, repository: str, clone_url: str, commit: str) -> bytes:
        """GitHub's tarball of the commit (one top folder `owner-repo-sha7/`); a minute to answer."""
        client = self._client or GitHubClient.from_env(**{**self._client_kwargs, "timeout": 60})
        return client.tarball(repository, commit)

    def reporter(self) -> GitHubStatusReporter:
        return GitHubStatusReporter(self.client)

    def git_credentials(self) -> tuple[str, str] | None:
        token = token_from_env()
        return ("x-access-token", token) if token else None

    def configured(self) -> bool:
        return bool(os.environ.get("GITHUB_TOKEN"))

    def ready(self) -> "GitHubHost":
        self.client  # noqa: B018 - reads the token now
        return self
