"""Webhook deliveries from any git host, shared by the Lambda and the local server: verify, filter, hand off.

The host (mmp.hosts.base.GitHost: GitHub by default, GitLab, ...) says how a delivery is
authenticated, what event it is, its delivery id and how its push payload reads; the rules
here are the same for every host. Order matters: the body size is checked first, then the
host's credential over the raw bytes (constant-time), and only then is anything parsed. A
branch push becomes a `Job` when a commit added or modified a trigger file at the repository
root; everything else (tag pushes, branch deletions, other events) gets a reason. The hand-off
(`JobSink.submit`) is idempotent on the delivery id and on the body digest, so a redelivery
or a replayed body never launches twice. Stdlib only: the Lambda imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from mmp import config
from mmp.hosts.base import (MAX_JSON_DEPTH, MAX_REF_CHARS, ZERO_SHA, GitHost, Headers, Push, Refusal, decode_body,
                            get_host, json_depth, ref_problem)
from mmp.pipeline.job import PROMOTE_FILE, Job

log = logging.getLogger("mmp.webhook")

MAX_BODY_BYTES = 25 * 1024 * 1024  # the largest body any host sends (GitHub's cap); each host has its own
EXPERIMENT_FILES = config.EXPERIMENT_FILES  # from config, not mmp.contract.experiment: no pydantic on a cold start
TRIGGER_FILES = (*EXPERIMENT_FILES, PROMOTE_FILE)
MAX_LISTED_COMMITS = 20  # a push payload may stop listing commits here (GitHub 20, GitLab 20): ask the compare API
_BRANCH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$")  # never an option to git

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "MAX_REF_CHARS", "ZERO_SHA", "Headers", "Job", "JobSink",
           "Response", "WebhookHandler", "decode_body", "json_depth", "net_changes", "ref_problem"]


@dataclass
class Response:
    status: int
    body: dict[str, Any]

    def json(self) -> bytes:
        return json.dumps(self.body).encode()


class JobSink(Protocol):
    def submit(self, job: Job, body_digest: str) -> bool:
        """Hand the job off durably; False when this delivery (or body) was seen before."""


# changed files between two commits: (repository full name, clone_url, base, head) -> added/modified/removed
CompareFn = Callable[[str, str, str, str], Mapping[str, list[str]]]


class HandoffError(RuntimeError):
    """The job could not be handed off; the host should see a 5xx so it can redeliver."""


def ignored(reason: str, **extra: Any) -> Response:
    """Accepted and dropped on purpose (2xx: the host must not redeliver it), saying why."""
    return Response(202, {"status": "ignored", "reason": reason, **extra})


def rejected(status: int, message: str) -> Response:
    """Refused, saying why (the field or header and what is allowed)."""
    return Response(status, {"status": "rejected", "error": message})


def decoded(body: bytes, content_type: str | None) -> Any:
    """The delivery's JSON, or the 415/400 Response that refuses it."""
    try:
        return decode_body(body, content_type)
    except TypeError as exc:
        return rejected(415, str(exc))
    except ValueError as exc:
        return rejected(400, str(exc))


def _refused(refusal: Refusal | None) -> Response | None:
    return None if refusal is None else rejected(refusal.status, refusal.message)


def net_changes(commits: list[Mapping[str, Any]]) -> dict[str, str]:
    """Each path's last action across the pushed commits, oldest first: added/modified/removed."""
    last: dict[str, str] = {}
    for commit in commits:
        for kind in ("added", "modified", "removed"):
            for path in commit.get(kind) or []:
                last[str(path)] = kind
    return last


def trigger_files(last: Mapping[str, str]) -> list[str]:
    """The root trigger files a push added or modified, from each path's last action (net_changes)."""
    return [name for name in TRIGGER_FILES if last.get(name) in ("added", "modified")]


class WebhookHandler:
    """One delivery from one host in, one `Response` out; never waits for training."""

    def __init__(self, secret: str | bytes | Callable[[], str | bytes | None], sink: JobSink,
                 compare: CompareFn | None = None, host: str | GitHost = "github"):
        self._secret = secret
        self.sink = sink
        self.compare = compare
        self.host = get_host(host) if isinstance(host, str) else host

    def __repr__(self) -> str:  # never show the secret
        return f"WebhookHandler(host={self.host.name}, sink={type(self.sink).__name__})"

    def secret(self) -> str | bytes | None:
        return self._secret() if callable(self._secret) else self._secret

    def check_headers(self, headers: Mapping[str, str] | Headers) -> Response | None:
        """The refusals that need no body: a server calls this before reading one (so an unsigned
        25 MB request costs nothing), and `handle` calls it again."""
        h = headers if isinstance(headers, Headers) else Headers(headers)
        secret = self.secret()
        if not secret:
            log.error("no %s webhook secret configured; refusing every delivery", self.host.title)
            return rejected(500, "the webhook secret is not configured")
        return _refused(self.host.check_headers(h, secret))

    def handle(self, headers: Mapping[str, str] | Headers, body: bytes) -> Response:
        h = headers if isinstance(headers, Headers) else Headers(headers)
        if len(body) > self.host.max_body_bytes:
            return rejected(413, f"body is {len(body)} bytes; {self.host.title} sends at most {self.host.max_body_bytes}")
        refused = self.check_headers(h)
        if refused is not None:
            return refused
        refused = _refused(self.host.verify(h, body, self.secret()))
        if refused is not None:
            return refused
        event = self.host.event(h)
        if isinstance(event, Refusal):
            return _refused(event)
        if event.kind == "ping":
            return Response(200, {"status": "pong", "delivery_id": event.delivery_id})
        if event.kind != "push":
            return ignored(f"event {event.kind!r} does not trigger training (only push does)")
        payload = decoded(body, h.get("Content-Type"))
        if isinstance(payload, Response):
            return payload
        push = self.host.parse_push(payload)
        if isinstance(push, list):
            return rejected(400, "push payload: " + "; ".join(push))
        return self._push(push, event.delivery_id or "", hashlib.sha256(body).hexdigest())

    def _push(self, push: Push, delivery: str, digest: str) -> Response:
        ref, before, after = push.ref, push.before, push.after
        if push.deleted or after == ZERO_SHA:
            return ignored(f"{ref} was deleted")
        if ref.startswith("refs/tags/"):
            return ignored(f"tag push ({ref}); only branch pushes train")
        if not ref.startswith("refs/heads/"):
            return ignored(f"{ref} is not a branch")
        commits = push.commits
        if len(commits) >= MAX_LISTED_COMMITS and self.compare is not None:
            base = before if before != ZERO_SHA else push.default_branch
            if isinstance(base, str) and _BRANCH_RE.match(base) and ".." not in base:
                try:
                    changes = self.compare(push.repository, push.clone_url, base, after)
                except Exception as exc:
                    log.warning("compare %s...%s for %s failed: %s", base, after[:12], push.repository, exc)
                    return rejected(503, f"the push lists {len(commits)} commits and the changed files could not "
                                     f"be listed ({type(exc).__name__}); redeliver later")
                commits = [changes]
        last = net_changes(commits)
        wanted = trigger_files(last)
        if not wanted:
            removed = [name for name in TRIGGER_FILES if last.get(name) == "removed"]
            if removed:
                return ignored(f"{' and '.join(removed)} removed in this push; nothing to train")
            return ignored(f"no commit added or modified {' or '.join(EXPERIMENT_FILES)} "
                            f"(or {PROMOTE_FILE}) at the repository root")
        job = Job(repository=push.repository, clone_url=push.clone_url, before=before, after=after, ref=ref,
                  delivery_id=delivery, trigger_files=wanted, host=self.host.name)
        return hand_off(self.sink, job, digest)


def hand_off(sink: JobSink, job: Job, digest: str) -> Response:
    """Queue an accepted job once: 202 queued, 200 for a delivery (or body) seen before, 503 when the
    sink failed (the host redelivers, or Lambda retries an EventBridge event)."""
    try:
        fresh = sink.submit(job, digest)
    except Exception as exc:
        log.error("hand-off of delivery %s failed: %s", job.delivery_id, exc)
        return rejected(503, f"the job could not be queued ({type(exc).__name__}); redeliver later")
    if not fresh:
        return Response(200, {"status": "duplicate", "delivery_id": job.delivery_id,
                              "reason": "this delivery (or an identical body) was already accepted"})
    log.info("queued %s delivery %s: %s@%s (%s)", job.host, job.delivery_id, job.repository, job.after[:12],
             ", ".join(job.trigger_files))
    return Response(202, {"status": "queued", "delivery_id": job.delivery_id, "job": job.to_dict()})
