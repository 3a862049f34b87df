"""Helpers for the GitOps tests: signed deliveries, fixture bodies, a live local server."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest

from mmp.hosts.github import sign

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "github"
SECRET = "gitops-test-secret-5f1c9e"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def headers_for(body: bytes, event: str = "push", delivery: str | None = None, secret: str = SECRET,
                content_type: str = "application/json") -> dict[str, str]:
    return {"Content-Type": content_type, "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "X-Hub-Signature-256": sign(secret, body)}


def with_files(name: str, *, added=(), modified=(), removed=(), commits: int = 1, **overrides) -> dict:
    """A real push fixture whose commit(s) touch the given files (everything else as GitHub sent it)."""
    payload = json.loads(fixture_bytes(name))
    template = payload["commits"][0]
    payload["commits"] = []
    for i in range(commits):
        commit = copy.deepcopy(template)
        commit["added"], commit["modified"], commit["removed"] = list(added), list(modified), list(removed)
        commit["id"] = f"{i:040x}" if commits > 1 else template["id"]
        payload["commits"].append(commit)
    payload.update(overrides)
    return payload


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("MMP_WEBHOOK_SECRET", SECRET)
    return SECRET


@pytest.fixture
def queue(mmp_home):
    from mmp.pipeline.queue import JobQueue

    q = JobQueue()
    yield q
    q.close()


@pytest.fixture
def server(secret_env, queue):
    """The local webhook server on a free port, queueing into this test's MMP_HOME."""
    from mmp.webhook.server import local_server

    srv = local_server(port=0, queue=queue).start()
    yield srv
    srv.stop()


class _Helpers:
    SECRET = SECRET
    FIXTURES = FIXTURES
    fixture_bytes = staticmethod(fixture_bytes)
    headers_for = staticmethod(headers_for)
    with_files = staticmethod(with_files)


@pytest.fixture
def gh():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return _Helpers
