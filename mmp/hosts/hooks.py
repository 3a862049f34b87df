"""`mmp hook install`: make commits in a local repository post signed push events to the webhook.

A working repository gets a post-commit hook, a bare one a post-receive hook. Either
builds a GitHub-shaped push event (real before/after shas, the ref, each commit's
added/modified/removed files, `repository.clone_url` = the repository's path), signs
it with the local webhook secret and POSTs it with `X-GitHub-Event`,
`X-GitHub-Delivery` (a fresh uuid) and `X-Hub-Signature-256`, exactly as GitHub
would. A down server never blocks or fails a commit: short timeout, one warning line.
A busy one (429/503) gets the same delivery again a few times, seconds apart, and the
hook says so on each retry.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from mmp import config
from mmp.hosts import localgit as gitutil
from mmp.hosts.localgit import ZERO_SHA

DEFAULT_URL = "http://127.0.0.1:8080/webhook"
MARKER = "# installed by mmp hook install"
MAX_COMMITS = 20  # as in GitHub's payloads; the webhook asks git for the rest
TIMEOUT_S = 3.0
BUSY_STATUSES = (429, 503)  # the webhook's "too many at once": worth another try
BUSY_RETRIES = 4
BUSY_WAIT_CAP_S = 2.0  # the most the hook waits between tries, whatever Retry-After says


class HookError(RuntimeError):
    pass


def webhook_url() -> str:
    """Where a firing hook posts: MMP_WEBHOOK_URL (set by `--url` at install), else the webhook of
    the `mmp up` running on MMP_HOME (its stack.json, read now, so `mmp up --port P` is found),
    else the default :8080."""
    return os.environ.get("MMP_WEBHOOK_URL") or (config.running_stack() or {}).get("webhook_url") or DEFAULT_URL


# -- the event ------------------------------------------------------------------------
def repo_info(repo: str | Path) -> tuple[Path, bool]:
    """(the repository's path as clone_url, whether it is bare)."""
    bare = gitutil.git(repo, "rev-parse", "--is-bare-repository").decode().strip() == "true"
    top = "--absolute-git-dir" if bare else "--show-toplevel"
    return Path(gitutil.git(repo, "rev-parse", top).decode().strip()), bare


def _commit(repo: Path, sha: str) -> dict[str, Any]:
    raw = gitutil.git(repo, "show", "-s", "--format=%H%x1f%an%x1f%ae%x1f%aI%x1f%cn%x1f%ce%x1f%B", sha).decode()
    full, an, ae, date, cn, ce, message = raw.split("\x1f", 6)
    files = gitutil.commit_files(repo, full)
    return {"id": full, "tree_id": gitutil.git(repo, "rev-parse", f"{full}^{{tree}}").decode().strip(),
            "distinct": True, "message": message.strip(), "timestamp": date, "url": f"{repo.as_uri()}#{full}",
            "author": {"name": an, "email": ae}, "committer": {"name": cn, "email": ce}, **files}


def pushed_commits(repo: Path, before: str, after: str, ref: str) -> list[str]:
    """Commits new with this push, oldest first (for a new ref: those no other ref has)."""
    if after == ZERO_SHA:
        return []
    if before != ZERO_SHA:
        spec = [f"{before}..{after}"]
    else:
        others = [r for r in gitutil.git(repo, "for-each-ref", "--format=%(refname)").decode().split() if r != ref]
        spec = [after, *(f"^{r}" for r in others)]
    return gitutil.git(repo, "rev-list", "--reverse", *spec).decode().split()


def push_event(repo: str | Path, before: str, after: str, ref: str) -> dict[str, Any]:
    path, bare = repo_info(repo)
    name = gitutil.repository_name(path)
    shas = pushed_commits(path, before, after, ref)
    commits = [_commit(path, sha) for sha in shas[-MAX_COMMITS:]]
    try:
        default = gitutil.git(path, "symbolic-ref", "--short", "HEAD").decode().strip()
    except gitutil.GitError:
        default = "main"
    return {
        "ref": ref, "before": before, "after": after,
        "created": before == ZERO_SHA, "deleted": after == ZERO_SHA, "forced": False,
        "base_ref": None, "compare": f"{path.as_uri()}#{before[:12]}...{after[:12]}",
        "commits": commits, "head_commit": commits[-1] if commits else None,
        "repository": {"name": name, "full_name": name, "clone_url": str(path), "url": path.as_uri(),
                       "default_branch": default, "master_branch": default, "private": True},
        "pusher": {"name": os.environ.get("USER") or "local"},
        "sender": {"login": os.environ.get("USER") or "local"},
    }


def post_event(payload: dict[str, Any], *, url: str | None = None, secret: str | None = None,
               timeout: float = TIMEOUT_S, delivery: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST a signed push event the way GitHub does; returns (HTTP status, JSON answer).
    A 429/503 answer carries its Retry-After seconds as `retry_after` in the answer."""
    from mmp.hosts.github import sign

    body = json.dumps(payload).encode()
    req = urllib.request.Request(url or webhook_url(), data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "mmp-hook", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(secret or config.webhook_secret(), body),
    })
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read() or b"{}")
        except ValueError:
            answer = {}
        retry_after = (exc.headers.get("Retry-After") or "").strip()
        if exc.code in BUSY_STATUSES and retry_after.isdigit():
            answer["retry_after"] = int(retry_after)
        return exc.code, answer


def post_with_retries(payload: dict[str, Any], *, url: str, timeout: float,
                      retries: int = BUSY_RETRIES) -> tuple[int, dict[str, Any]]:
    """post_event, sent again (same delivery id, as a GitHub redelivery) while the webhook answers busy
    (429/503), at most `retries` times, each wait capped: a commit waits seconds, never minutes. Each
    retry is said on stderr."""
    delivery = str(uuid.uuid4())
    for attempt in range(retries + 1):
        status, answer = post_event(payload, url=url, timeout=timeout, delivery=delivery)
        if status not in BUSY_STATUSES or attempt == retries:
            return status, answer
        wait = min(float(answer.get("retry_after") or 1), BUSY_WAIT_CAP_S)
        print(f"mmp: webhook busy ({status}: {answer.get('error') or 'no reason given'}); "
              f"retrying in {wait:g} s (retry {attempt + 1} of {retries})", file=sys.stderr)
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _send(repo: Path, before: str, after: str, ref: str) -> None:
    url = webhook_url()
    try:
        payload = push_event(repo, before, after, ref)
        status, answer = post_with_retries(payload, url=url,
                                           timeout=float(os.environ.get("MMP_HOOK_TIMEOUT", TIMEOUT_S)))
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"mmp: warning: could not reach the webhook at {url} ({reason}); the commit is kept, "
              f"nothing was queued. Start `mmp up`, or train it with `mmp run --commit {after[:12]}`.",
              file=sys.stderr)
        return
    what = answer.get("status", "")
    detail = answer.get("reason") or answer.get("error") or ""
    short = ref.removeprefix("refs/heads/")
    print(f"mmp: {short}@{after[:7]} → webhook {status} {what}{': ' + detail if detail else ''}", file=sys.stderr)


def run_hook(kind: str, stdin_lines: list[str] | None = None, cwd: str | Path = ".") -> int:
    """The hook body; never raises, never fails the git operation."""
    try:
        repo, _ = repo_info(cwd)
        if kind == "post-commit":
            after = gitutil.resolve(repo, "HEAD")
            try:
                ref = gitutil.git(repo, "symbolic-ref", "-q", "HEAD").decode().strip()
            except gitutil.GitError:
                print("mmp: detached HEAD; no push event sent", file=sys.stderr)
                return 0
            parents = gitutil.git(repo, "rev-list", "--parents", "-n", "1", after).decode().split()[1:]
            _send(repo, parents[0] if parents else ZERO_SHA, after, ref)
        elif kind == "post-receive":
            for line in stdin_lines or []:
                parts = line.split()
                if len(parts) == 3:
                    _send(repo, parts[0], parts[1], parts[2])
        else:
            print(f"mmp: unknown hook {kind!r}", file=sys.stderr)
    except Exception as exc:  # a hook must never break git
        print(f"mmp: warning: push event not sent ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 0


# -- installing -------------------------------------------------------------------------
def hook_script(kind: str, url: str | None) -> str:
    """The hook: plain assignments of single-quoted values (shlex.quote), so no path or URL,
    whatever characters it holds (`$(...)`, quotes, spaces, newlines), is ever run or split.
    Without `--url` it names no URL: the hook finds the running stack when it fires."""
    package_root = str(Path(__file__).resolve().parents[2])
    lines = [
        "#!/bin/sh",
        f"{MARKER}: sends a signed GitHub-style push event to the local MMP webhook.",
        f'if [ -z "${{MMP_HOME:-}}" ]; then MMP_HOME={shlex.quote(str(config.home_path()))}; fi',
        "export MMP_HOME",
    ]
    if url:
        lines += [f'if [ -z "${{MMP_WEBHOOK_URL:-}}" ]; then MMP_WEBHOOK_URL={shlex.quote(url)}; fi',
                  "export MMP_WEBHOOK_URL"]
    lines += [
        f'PYTHONPATH={shlex.quote(package_root)}${{PYTHONPATH:+:"$PYTHONPATH"}}; export PYTHONPATH',
        f"exec {shlex.quote(sys.executable)} -m mmp.hosts.hooks {shlex.quote(kind)}",
        "",
    ]
    return "\n".join(lines)


def check_url(url: str) -> None:
    """An http(s) URL with a host and no whitespace or control characters, or HookError."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() or ord(c) < 32 for c in url):
        raise HookError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8080/webhook")


def install(repo: str | Path, *, url: str | None = None, force: bool = False) -> Path:
    """Install post-commit (working repository) or post-receive (bare); returns the hook's path."""
    try:
        path, bare = repo_info(repo)
    except gitutil.GitError as exc:
        raise HookError(f"{repo} is not a git repository ({exc})") from None
    if url is not None:
        check_url(url)
    kind = "post-receive" if bare else "post-commit"
    hooks_dir = Path(gitutil.git(path, "rev-parse", "--git-path", "hooks").decode().strip())
    if not hooks_dir.is_absolute():
        hooks_dir = path / hooks_dir
    hooks_dir.mkdir(parents=True, exist_ok=True)
    target = hooks_dir / kind
    if target.exists() and MARKER not in target.read_text(errors="replace"):
        if not force:
            raise HookError(f"{target} exists and was not installed by mmp; use --force to replace it "
                            f"(the old one is kept as {target.name}.bak)")
        target.replace(target.with_name(f"{kind}.bak.{int(time.time())}"))
    target.write_text(hook_script(kind, url))
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    kind = args[0] if args else ""
    lines = sys.stdin.read().splitlines() if kind == "post-receive" else None
    return run_hook(kind, lines)


if __name__ == "__main__":
    sys.exit(main())
