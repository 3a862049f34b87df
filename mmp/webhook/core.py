"""GitHub event handling shared by the Lambda and the local server: verify, filter, hand off.

Order matters: the body size is checked first, then the HMAC signature over the raw
bytes (constant-time), and only then is anything parsed. A push becomes a `Job`
when a commit added or modified a trigger file at the repository root; everything
else gets a reason. The hand-off (`JobSink.submit`) is idempotent on the delivery
id and on the body digest, so a redelivery or a replayed body never launches twice.
Stdlib only: the Lambda imports this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from mmp import config
from mmp.pipeline.job import PROMOTE_FILE, Job

log = logging.getLogger("mmp.webhook")

MAX_BODY_BYTES = 25 * 1024 * 1024  # GitHub caps payloads at 25 MB
ZERO_SHA = "0" * 40
EXPERIMENT_FILES = config.EXPERIMENT_FILES  # from config, not mmp.contract.experiment: no pydantic on a cold start
TRIGGER_FILES = (*EXPERIMENT_FILES, PROMOTE_FILE)
MAX_LISTED_COMMITS = 20  # a push payload may stop listing commits here: ask the compare API
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SIGNATURE_RE = re.compile(r"^sha256=[0-9a-fA-F]{64}$")
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$")  # never an option to git
MAX_REF_CHARS = 1024
MAX_JSON_DEPTH = 64  # GitHub's push payloads nest about 5 deep; a deeper body is not GitHub's
# what `git check-ref-format` refuses anywhere in a ref: control characters, space, ~ ^ : ? * [ \ and "@{"
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|@\{")


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
    """The job could not be handed off; GitHub should see a 5xx so it can be redelivered."""


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Constant-time check of `X-Hub-Signature-256` against the raw body."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


class Headers:
    """Case-insensitive header lookup (API Gateway lower-cases, http.server does not)."""

    def __init__(self, raw: Mapping[str, str] | None):
        self._h = {str(k).lower(): str(v) for k, v in (raw or {}).items()}

    def get(self, name: str) -> str | None:
        return self._h.get(name.lower())


def _ignored(reason: str, **extra: Any) -> Response:
    return Response(202, {"status": "ignored", "reason": reason, **extra})


def _bad(status: int, message: str) -> Response:
    return Response(status, {"status": "rejected", "error": message})


def decode_body(body: bytes, content_type: str | None) -> Any:
    """JSON from a `application/json` or form-encoded (`payload=`) body; ValueError says why."""
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=1000)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"form body could not be decoded: {exc}") from None
        if "payload" not in form:
            raise ValueError("form-encoded body has no 'payload' field")
        text = form["payload"][0]
    elif kind == "application/json" or kind.endswith("+json"):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("body is not UTF-8") from None
    else:
        raise TypeError(f"Content-Type {kind!r} is not supported: use application/json "
                        "or application/x-www-form-urlencoded")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # the C parser recurses once per nesting level
        raise ValueError(f"body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(payload) > MAX_JSON_DEPTH:
        raise ValueError(f"body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return payload


def ref_problem(ref: str) -> str | None:
    """Why git would refuse `ref` (git check-ref-format's rules, and --branch's for refs/heads/), else None.

    Checked in Python so a hostile ref such as `refs/heads/--upload-pack=x` never reaches a queue
    or a git command line, without spawning git per delivery.
    """
    if not ref or len(ref) > MAX_REF_CHARS:
        return f"must be 1 to {MAX_REF_CHARS} characters"
    if not ref.startswith("refs/"):
        return "must start with 'refs/'"
    bad = _REF_FORBIDDEN_RE.search(ref)
    if bad:
        return f"contains {bad.group()!r} (git refuses control characters, space, ~ ^ : ? * [ \\ and @{{)"
    if ".." in ref:
        return "contains '..'"
    if ref.endswith("/") or ref.endswith("."):
        return "ends with '/' or '.'"
    for part in ref.split("/"):
        if not part:
            return "has an empty path component ('//' or a trailing '/')"
        if part.startswith("."):
            return f"has a component starting with '.' ({part!r})"
        if part.endswith(".lock"):
            return f"has a component ending with '.lock' ({part!r})"
    if ref.startswith("refs/heads/"):
        branch = ref.removeprefix("refs/heads/")
        if branch.startswith("-"):
            return "names a branch starting with '-' (git reads it as an option)"
        if branch == "HEAD":
            return "names the branch 'HEAD'"
    return None


def json_depth(value: Any) -> int:
    """How deep objects and arrays nest in parsed JSON (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def net_changes(commits: list[Mapping[str, Any]]) -> dict[str, str]:
    """Each path's last action across the pushed commits, oldest first: added/modified/removed."""
    last: dict[str, str] = {}
    for commit in commits:
        for kind in ("added", "modified", "removed"):
            for path in commit.get(kind) or []:
                last[str(path)] = kind
    return last


def _push_problems(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return ["the payload must be a JSON object"]
    problems = []
    for key in ("ref", "before", "after"):
        if not isinstance(payload.get(key), str):
            problems.append(f"'{key}' is missing or not a string")
    if isinstance(payload.get("ref"), str):
        why = ref_problem(payload["ref"])
        if why:
            problems.append(f"'ref' {why}")
    for key in ("before", "after"):
        if isinstance(payload.get(key), str) and not _SHA_RE.match(payload[key]):
            problems.append(f"'{key}' must be a 40-character hex commit sha")
    repo = payload.get("repository")
    if not isinstance(repo, dict):
        problems.append("'repository' is missing or not an object")
    else:
        for key in ("full_name", "clone_url"):
            if not isinstance(repo.get(key), str) or not repo.get(key):
                problems.append(f"'repository.{key}' is missing or not a string")
    commits = payload.get("commits")
    if not isinstance(commits, list) or not all(isinstance(c, dict) for c in commits):
        problems.append("'commits' is missing or not a list of objects")
    else:
        for i, commit in enumerate(commits):
            for kind in ("added", "modified", "removed"):
                value = commit.get(kind, [])
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                    problems.append(f"'commits[{i}].{kind}' must be a list of paths")
    return problems


class WebhookHandler:
    """One delivery in, one `Response` out; never waits for training."""

    def __init__(self, secret: str | bytes | Callable[[], str | bytes | None], sink: JobSink,
                 compare: CompareFn | None = None):
        self._secret = secret
        self.sink = sink
        self.compare = compare

    def __repr__(self) -> str:  # never show the secret
        return f"WebhookHandler(sink={type(self.sink).__name__})"

    def secret(self) -> str | bytes | None:
        return self._secret() if callable(self._secret) else self._secret

    def check_headers(self, headers: Mapping[str, str] | Headers) -> Response | None:
        """The refusals that need no body: a server calls this before reading one (so an unsigned
        25 MB request costs nothing), and `handle` calls it again."""
        h = headers if isinstance(headers, Headers) else Headers(headers)
        if not self.secret():
            log.error("no webhook secret configured; refusing every delivery")
            return _bad(500, "the webhook secret is not configured")
        signature = h.get("X-Hub-Signature-256")
        if not signature:
            return _bad(401, "X-Hub-Signature-256 header is missing")
        if not _SIGNATURE_RE.match(signature.strip()):
            return _bad(401, "X-Hub-Signature-256 must be 'sha256=' and 64 hex digits")
        return None

    def handle(self, headers: Mapping[str, str] | Headers, body: bytes) -> Response:
        h = headers if isinstance(headers, Headers) else Headers(headers)
        if len(body) > MAX_BODY_BYTES:
            return _bad(413, f"body is {len(body)} bytes; GitHub sends at most {MAX_BODY_BYTES}")
        refused = self.check_headers(h)
        if refused is not None:
            return refused
        secret, signature = self.secret(), h.get("X-Hub-Signature-256")
        if not verify_signature(secret, body, signature):
            return _bad(401, "X-Hub-Signature-256 does not match the body (wrong secret or altered body)")
        event = h.get("X-GitHub-Event")
        if not event:
            return _bad(400, "X-GitHub-Event header is missing")
        delivery = h.get("X-GitHub-Delivery")
        if event == "ping":
            return Response(200, {"status": "pong", "delivery_id": delivery})
        if event != "push":
            return _ignored(f"event {event!r} does not trigger training (only push does)")
        if not delivery or not _DELIVERY_RE.match(delivery):
            return _bad(400, "X-GitHub-Delivery header is missing or malformed")
        try:
            payload = decode_body(body, h.get("Content-Type"))
        except TypeError as exc:
            return _bad(415, str(exc))
        except ValueError as exc:
            return _bad(400, str(exc))
        problems = _push_problems(payload)
        if problems:
            return _bad(400, "push payload: " + "; ".join(problems))
        return self._push(payload, delivery, hashlib.sha256(body).hexdigest())

    def _push(self, payload: dict, delivery: str, digest: str) -> Response:
        ref, before, after = payload["ref"], payload["before"], payload["after"]
        repo = payload["repository"]
        if payload.get("deleted") is True or after == ZERO_SHA:
            return _ignored(f"{ref} was deleted")
        if ref.startswith("refs/tags/"):
            return _ignored(f"tag push ({ref}); only branch pushes train")
        if not ref.startswith("refs/heads/"):
            return _ignored(f"{ref} is not a branch")
        commits = payload["commits"]
        if len(commits) >= MAX_LISTED_COMMITS and self.compare is not None:
            base = before if before != ZERO_SHA else (repo.get("default_branch") or repo.get("master_branch"))
            if isinstance(base, str) and _BRANCH_RE.match(base) and ".." not in base:
                try:
                    changes = self.compare(repo["full_name"], repo["clone_url"], base, after)
                except Exception as exc:
                    log.warning("compare %s...%s for %s failed: %s", base, after[:12], repo["full_name"], exc)
                    return _bad(503, f"the push lists {len(commits)} commits and the changed files could not "
                                     f"be listed ({type(exc).__name__}); redeliver later")
                commits = [changes]
        last = net_changes(commits)
        wanted = [name for name in TRIGGER_FILES if last.get(name) in ("added", "modified")]
        if not wanted:
            removed = [name for name in TRIGGER_FILES if last.get(name) == "removed"]
            if removed:
                return _ignored(f"{' and '.join(removed)} removed in this push; nothing to train")
            return _ignored(f"no commit added or modified {' or '.join(EXPERIMENT_FILES)} "
                            f"(or {PROMOTE_FILE}) at the repository root")
        job = Job(repository=repo["full_name"], clone_url=repo["clone_url"], before=before, after=after, ref=ref,
                  delivery_id=delivery, trigger_files=wanted)
        try:
            fresh = self.sink.submit(job, digest)
        except Exception as exc:
            log.error("hand-off of delivery %s failed: %s", delivery, exc)
            return _bad(503, f"the job could not be queued ({type(exc).__name__}); redeliver later")
        if not fresh:
            return Response(200, {"status": "duplicate", "delivery_id": delivery,
                                  "reason": "this delivery (or an identical body) was already accepted"})
        log.info("queued delivery %s: %s@%s (%s)", delivery, job.repository, after[:12], ", ".join(wanted))
        return Response(202, {"status": "queued", "delivery_id": delivery, "job": job.to_dict()})
