"""CodeCommit pushes: an EventBridge `CodeCommit Repository State Change` event in, a `Job` handed off.

Shared by the Lambda the stack's EventBridge rule targets (mmp.webhook.codecommit_lambda) and the
local server's `POST /events/codecommit`. There is no shared secret: on AWS only the rule may
invoke the Lambda (its resource policy) and IAM scopes every CodeCommit action to the listed
repositories. The event is only a pointer, so before anything starts:

1. the event must be a branch's referenceCreated/referenceUpdated (anything else: ignored);
2. its repository (the ARN in `resources`, the name in `detail`) must be one the stack lists;
3. the commit must exist in that repository (GetCommit);
4. GetDifferences must show a root trigger file added or modified: against `oldCommitId` for an
   update, against the default branch for a new branch (as the GitHub path compares a new
   branch), every file for the first branch of an empty repository;
5. the event id is claimed in the deliveries table (EventBridge delivers at least once), and the
   state machine gets the same job JSON as GitHub's (host "codecommit").
Stdlib + boto3 (through mmp.hosts.codecommit): the Lambda imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Callable, Iterable

from mmp.pipeline.job import Job
from mmp.hosts.base import ZERO_SHA, Headers, is_sha, ref_problem
from mmp.webhook.core import (EXPERIMENT_FILES, PROMOTE_FILE, JobSink, Response, decoded, hand_off, ignored,
                              net_changes, rejected, trigger_files)

log = logging.getLogger("mmp.webhook.codecommit")

SOURCE = "aws.codecommit"
DETAIL_TYPE = "CodeCommit Repository State Change"
PUSH_EVENTS = ("referenceCreated", "referenceUpdated")
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Allowed:
    """The repositories a stack listens to: ARNs (what the Lambda is given) or, locally, bare names."""

    def __init__(self, entries: Iterable[str]):
        from mmp.hosts.codecommit import check_name, parse_arn

        self.arns: set[str] = set()
        self.names: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry.startswith("arn:"):
                parse_arn(entry)
                self.arns.add(entry)
            else:
                self.names.add(check_name(entry))

    @classmethod
    def from_text(cls, text: str | None) -> "Allowed":
        return cls((text or "").replace("\n", ",").split(","))

    def __bool__(self) -> bool:
        return bool(self.arns or self.names)

    def admits(self, arn: str, name: str) -> bool:
        return arn in self.arns or name in self.names


def event_problems(event: Any) -> list[str]:
    if not isinstance(event, dict):
        return ["the event must be a JSON object"]
    problems = []
    if not isinstance(event.get("id"), str) or not _ID_RE.match(event["id"]):
        problems.append("'id' is missing or not an event id")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return problems + ["'detail' is missing or not an object"]
    resources = event.get("resources")
    if not isinstance(resources, list) or len(resources) != 1 or not isinstance(resources[0], str):
        problems.append("'resources' must hold the repository's ARN")
    for key in ("event", "repositoryName", "referenceType", "referenceFullName", "commitId"):
        if not isinstance(detail.get(key), str):
            problems.append(f"'detail.{key}' is missing or not a string")
    if isinstance(detail.get("commitId"), str) and not is_sha(detail["commitId"]):
        problems.append("'detail.commitId' must be a 40-character hex commit id")
    old = detail.get("oldCommitId")
    if old is not None and not is_sha(old):
        problems.append("'detail.oldCommitId' must be a 40-character hex commit id")
    if isinstance(detail.get("referenceFullName"), str):
        why = ref_problem(detail["referenceFullName"])
        if why:
            problems.append(f"'detail.referenceFullName' {why}")
    return problems


class CodeCommitEvents:
    """One EventBridge event in, one `Response` out (202 queued/ignored, 200 duplicate, 4xx refused,
    503 when the hand-off failed: the Lambda raises so EventBridge's async invoke retries)."""

    def __init__(self, sink: JobSink, allowed: Allowed, client: Callable[[str], Any] | None = None):
        self.sink = sink
        self.allowed = allowed
        self._client = client  # region -> CodeCommitClient; tests and the local stack pass their own

    def client(self, region: str):
        if self._client is not None:
            return self._client(region)
        from mmp.hosts.codecommit import CodeCommitClient

        return CodeCommitClient(region=region)

    def handle(self, event: Any) -> Response:
        if isinstance(event, dict) and (event.get("source") != SOURCE or event.get("detail-type") != DETAIL_TYPE):
            return ignored(f"not a {DETAIL_TYPE} event from {SOURCE}")
        detail = event.get("detail") if isinstance(event, dict) else None
        kind = detail.get("event") if isinstance(detail, dict) else None
        if isinstance(kind, str) and kind not in PUSH_EVENTS:
            return ignored(f"{kind} on {detail.get('referenceFullName')} does not train "
                            f"(only {' and '.join(PUSH_EVENTS)} do)")
        problems = event_problems(event)
        if problems:
            return rejected(400, "CodeCommit event: " + "; ".join(problems))
        ref = detail["referenceFullName"]
        if detail["referenceType"] != "branch" or not ref.startswith("refs/heads/"):
            return ignored(f"{ref} is not a branch; only branch pushes train")
        from mmp.hosts.codecommit import clone_url, parse_arn

        arn, name = event["resources"][0], detail["repositoryName"]
        try:
            region, _, arn_name = parse_arn(arn)
        except ValueError as exc:
            return rejected(400, f"CodeCommit event: 'resources' {exc}")
        if not self.allowed.admits(arn, arn_name):
            log.warning("event %s names repository %s, which this stack does not list", event["id"], arn)
            return rejected(403, f"repository {arn} is not one this stack listens to")
        if arn_name != name:
            return rejected(400, f"CodeCommit event: repository {name!r} is not the one its ARN names ({arn})")
        commit = detail["commitId"]
        try:
            client = self.client(region)
            if not client.commit_exists(name, commit):
                return rejected(404, f"commit {commit} does not exist in {name}; the event is not CodeCommit's")
            before = detail.get("oldCommitId") if kind == "referenceUpdated" else None
            base = before
            if base is None:
                default = client.default_branch(name)
                base = default if default and f"refs/heads/{default}" != ref else None
            changes = client.compare(name, base, commit)
        except Exception as exc:
            log.error("reading %s@%s for event %s failed: %s", name, commit[:12], event["id"], exc)
            return rejected(503, f"CodeCommit could not be read ({type(exc).__name__}); retry later")
        wanted = trigger_files(net_changes([changes]))
        if not wanted:
            return ignored(f"no change to {' or '.join(EXPERIMENT_FILES)} (or {PROMOTE_FILE}) at the repository "
                            f"root in {ref}")
        job = Job(repository=name, clone_url=clone_url(name, region), before=before or ZERO_SHA, after=commit,
                  ref=ref, delivery_id=event["id"], trigger_files=wanted, host="codecommit")
        digest = hashlib.sha256(json.dumps(event, sort_keys=True).encode()).hexdigest()
        return hand_off(self.sink, job, digest)

class CodeCommitEndpoint:
    """`POST /events/codecommit` on the local stack: the EventBridge event as the body, from loopback only
    (the server checks `loopback_only`): on this machine nothing signs the event, so only local
    processes may hand one in. Answers as the Lambda decides."""

    loopback_only = True

    def __init__(self, events: CodeCommitEvents):
        from mmp.hosts.base import get_host

        self.events = events
        self.host = get_host("codecommit")

    def check_headers(self, headers: Headers) -> Response | None:
        return None

    def handle(self, headers: Headers, body: bytes) -> Response:
        payload = decoded(body, headers.get("Content-Type"))
        return payload if isinstance(payload, Response) else self.events.handle(payload)


def local_endpoint(queue) -> CodeCommitEndpoint | None:
    """The local stack's CodeCommit route when MMP_CODECOMMIT_REPOSITORIES lists repositories (CodeCommit
    is read through AWS_ENDPOINT_URL_CODECOMMIT, the tests' stand-in, or AWS with your credentials)."""
    import os

    allowed = Allowed.from_text(os.environ.get("MMP_CODECOMMIT_REPOSITORIES"))
    return CodeCommitEndpoint(CodeCommitEvents(queue, allowed)) if allowed else None
