"""GitLab test helpers: real push payloads from GitLab's docs, and a GitLab stand-in owned by MMP.

The stand-in is a real HTTP server answering the REST API v4 calls MMP makes, from a real git
repository: repository files (raw), tree (with GitLab's type/mode and x-next-page pagination),
archive.tar.gz (git archive under GitLab's `<project>-<sha>-<sha>/` folder), compare (git diff with
renames), and commit statuses (recorded; a repeated state answers 400 "Cannot transition status"
as GitLab does). It checks PRIVATE-TOKEN and the project path, as GitLab does. What it cannot show
(GitLab's exact error bodies, rate limits, keyset pagination) is an assumption named in docs/gitops.md.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import subprocess
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab"
SECRET = "gitlab-test-secret-token-7c2d"
SIGNING_TOKEN = "whsec_" + base64.b64encode(b"k" * 32).decode()
TOKEN = "glpat-test-token-9f8e7d"
PROJECT = "ml-team/vision/fashion"


def git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], input=input, check=True, capture_output=True).stdout


def payload(name: str = "push.json") -> dict:
    return json.loads((FIXTURES / name).read_bytes())


def push_for(*, before: str, after: str, added=(), modified=(), removed=(), commits: int = 1,
             project: str = PROJECT, url: str | None = None, ref: str = "refs/heads/main", name="push.json") -> dict:
    """GitLab's documented push payload, pointed at our repository and touching the given files."""
    body = payload(name)
    template = body["commits"][0]
    body["commits"] = []
    for i in range(commits):
        commit = copy.deepcopy(template)
        commit["added"], commit["modified"], commit["removed"] = list(added), list(modified), list(removed)
        commit["id"] = after if i == commits - 1 else f"{i:040x}"
        body["commits"].append(commit)
    body.update(before=before, after=after, checkout_sha=after, ref=ref, total_commits_count=commits)
    body["project"].update(path_with_namespace=project, default_branch="main",
                           git_http_url=url or f"https://gitlab.example.com/{project}.git")
    return body


def token_headers(body: bytes, *, token: str = SECRET, event: str = "Push Hook", key: str | None = None) -> dict:
    """The headers GitLab sends with a secret token (GitLab 17.4+: Idempotency-Key)."""
    return {"Content-Type": "application/json", "X-Gitlab-Event": event, "X-Gitlab-Token": token,
            "Idempotency-Key": key or str(uuid.uuid4()), "X-Gitlab-Event-UUID": str(uuid.uuid4()),
            "X-Gitlab-Webhook-UUID": str(uuid.uuid4()), "User-Agent": "GitLab/17.6.0"}


def signed_headers(body: bytes, *, signing_token: str = SIGNING_TOKEN, key: str | None = None,
                   timestamp: int | None = None, event: str = "Push Hook") -> dict:
    """The Standard Webhooks headers GitLab sends with a signing token (computed here independently of mmp)."""
    webhook_id = key or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    secret = base64.b64decode(signing_token.removeprefix("whsec_"))
    signature = base64.b64encode(hmac.new(secret, f"{webhook_id}.{stamp}.".encode() + body,
                                          hashlib.sha256).digest()).decode()
    return {"Content-Type": "application/json", "X-Gitlab-Event": event, "Idempotency-Key": webhook_id,
            "webhook-id": webhook_id, "webhook-timestamp": stamp, "webhook-signature": f"v1,{signature}"}


class _Handler(BaseHTTPRequestHandler):
    server: "GitLabStandIn"

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _bytes(self, data: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[list[str], dict[str, str]] | None:
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        self.server.calls.append((self.command, parsed.path, query))
        if self.headers.get("PRIVATE-TOKEN") != self.server.token:
            self._json(401, {"message": "401 Unauthorized"})
            return None
        raw = parsed.path.split("/")  # ['', 'api', 'v4', 'projects', '<id>', ...] with the id still encoded
        if raw[:4] != ["", "api", "v4", "projects"] or len(raw) < 6:
            self._json(404, {"error": "404 Not Found"})
            return None
        if urllib.parse.unquote(raw[4]) != self.server.project or "/" in raw[4]:
            self._json(404, {"message": "404 Project Not Found"})
            return None
        return raw[5:], query

    def do_GET(self) -> None:
        routed = self._route()
        if routed is None:
            return
        parts, query = routed
        repo, ref = self.server.repo, query.get("ref") or query.get("sha") or "HEAD"
        if parts[:2] == ["repository", "files"] and len(parts) == 4 and parts[3] == "raw":
            path = urllib.parse.unquote(parts[2])
            try:
                kind = git(repo, "cat-file", "-t", f"{ref}:{path}").strip()
            except subprocess.CalledProcessError:
                kind = b""
            if kind != b"blob":
                self._json(404, {"message": "404 File Not Found"})
                return
            self._bytes(git(repo, "cat-file", "blob", f"{ref}:{path}"), "text/plain")
        elif parts == ["repository", "tree"]:
            folder = query.get("path", "").strip("/")
            try:
                listing = git(repo, "ls-tree", "-z", ref + (f":{folder}" if folder else "^{tree}"))
            except subprocess.CalledProcessError:
                self._json(404, {"message": "404 Tree Not Found"})
                return
            entries = []
            for line in listing.decode().split("\0"):
                if not line:
                    continue
                meta, name = line.split("\t", 1)
                mode, kind, sha = meta.split()
                entries.append({"id": sha, "name": name, "type": kind, "path": f"{folder}/{name}".lstrip("/"),
                                "mode": mode})
            per_page, page = int(query.get("per_page", 20)), int(query.get("page", 1))
            chunk = entries[(page - 1) * per_page: page * per_page]
            more = page * per_page < len(entries)
            self._json(200, chunk, {"X-Next-Page": str(page + 1) if more else "", "X-Page": str(page)})
        elif parts == ["repository", "archive.tar.gz"]:
            sha = git(repo, "rev-parse", query["sha"]).decode().strip()
            name = self.server.project.rsplit("/", 1)[-1]
            self._bytes(git(repo, "archive", "--format=tar.gz", f"--prefix={name}-{sha}-{sha}/", sha),
                        "application/octet-stream")
        elif parts == ["repository", "compare"]:
            out = git(repo, "diff", "--name-status", "-M", f"{query['from']}...{query['to']}").decode()
            diffs = []
            for line in out.splitlines():
                status, *paths = line.split("\t")
                diffs.append({"old_path": paths[0], "new_path": paths[-1], "new_file": status == "A",
                              "renamed_file": status.startswith("R"), "deleted_file": status == "D",
                              "a_mode": "100644", "b_mode": "100644", "diff": ""})
            self._json(200, {"commit": None, "commits": [], "diffs": diffs, "compare_timeout": False,
                             "compare_same_ref": False})
        else:
            self._json(404, {"error": "404 Not Found"})

    def do_POST(self) -> None:
        routed = self._route()
        if routed is None:
            return
        parts, _ = routed
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if len(parts) == 2 and parts[0] == "statuses":
            sha, name = parts[1], body.get("name", "default")
            current = self.server.current.get((sha, name))
            if current == body.get("state"):
                self._json(400, {"message": f"Cannot transition status via :enqueue from :{current}"})
                return
            self.server.current[(sha, name)] = body.get("state")
            self.server.statuses.append({"sha": sha, **body})
            self._json(201, {"id": len(self.server.statuses), "sha": sha, "ref": None, "status": body.get("state"),
                             "name": name, "target_url": body.get("target_url"),
                             "description": body.get("description")})
        else:
            self._json(404, {"error": "404 Not Found"})


class GitLabStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repo: Path, project: str = PROJECT, token: str = TOKEN):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo, self.project, self.token = repo, project, token
        self.calls: list[tuple[str, str, dict]] = []
        self.statuses: list[dict] = []
        self.current: dict[tuple[str, str], str] = {}
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "GitLabStandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def states(self, sha: str, name: str = "mmp/training") -> list[str]:
        return [s["state"] for s in self.statuses if s["sha"] == sha and s.get("name") == name]


@pytest.fixture
def gitlab(make_repo, monkeypatch):
    """A GitLab stand-in over a fresh example repository; the environment points MMP at it."""
    repo = make_repo()
    server = GitLabStandIn(repo).start()
    monkeypatch.setenv("MMP_GITLAB_URL", server.url)
    monkeypatch.setenv("GITLAB_TOKEN", TOKEN)
    yield server
    server.stop()


class _Helpers:
    SECRET, SIGNING_TOKEN, TOKEN, PROJECT, FIXTURES = SECRET, SIGNING_TOKEN, TOKEN, PROJECT, FIXTURES
    payload = staticmethod(payload)
    push_for = staticmethod(push_for)
    token_headers = staticmethod(token_headers)
    signed_headers = staticmethod(signed_headers)
    git = staticmethod(git)


@pytest.fixture
def gl():
    return _Helpers
