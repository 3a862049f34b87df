"""The git-host seam: what the webhook and the pipeline need from wherever a repository lives.

One `GitHost` per host, one module each (github, gitlab, codecommit, and `local` for a
repository on this machine), found by name in `HOSTS` and imported on demand, so the Lambda
loads only the host it serves. A host does two jobs:

- deliveries: refuse a request before its body is read (`check_headers`), verify it
  (`verify`), say what event it is and its delivery id (`event`), and turn its payload into
  a `Push` (`parse_push`); the shared core (mmp.webhook.core) then applies the rules that are
  the same everywhere: branch pushes only, trigger files at the root, the compare call for a
  long push, the idempotent hand-off;
- reading and reporting at a commit: the changed files between two commits (`compare`), a
  `CommitSource` (`source`: a file's bytes, an entry's type), the commit's tree as a .tar.gz
  (`archive`), commit statuses (`reporter`), and the credentials a plain `git fetch` over
  HTTPS needs (`git_credentials`, for the DLAMI fetch).

The pipeline's vocabulary is host-neutral: a `Job` names its host (`host`, default "github",
so job JSON written before the seam still parses), statuses are mmp.pipeline.reporting.STATES (each host
maps them to its own names), and `Job.repository` is the host's full name for the repository.
Stdlib only: the Lambda imports this module.
"""

from __future__ import annotations

import importlib
import json
import re
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

DEFAULT_HOST = "github"
# name → "module:class"; a host module is imported only when its name is asked for
HOSTS = {
    "github": "mmp.hosts.github:GitHubHost",
    "gitlab": "mmp.hosts.gitlab:GitLabHost",
    "codecommit": "mmp.hosts.codecommit:CodeCommitHost",
    "local": "mmp.hosts.local:LocalHost",
}
ZERO_SHA = "0" * 40
MAX_JSON_DEPTH = 64  # push payloads nest about 5 deep; a deeper body is nobody's push event
MAX_REF_CHARS = 1024
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# what `git check-ref-format` refuses anywhere in a ref: control characters, space, ~ ^ : ? * [ \ and "@{"
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|@\{")


class HostError(RuntimeError):
    """A host API call that failed; the message names the call and the host's reason, never a token."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Headers:
    """Case-insensitive header lookup (API Gateway lower-cases, http.server does not)."""

    def __init__(self, raw: Mapping[str, str] | None):
        self._h = {str(k).lower(): str(v) for k, v in (raw or {}).items()}

    def get(self, name: str) -> str | None:
        return self._h.get(name.lower())


@dataclass(frozen=True)
class Refusal:
    """Why a delivery is refused: the HTTP status the host should see and a message naming the header."""

    status: int
    message: str


@dataclass(frozen=True)
class Event:
    """What a verified delivery is. `kind` is "push", "ping" or the host's own event name (ignored)."""

    kind: str
    delivery_id: str | None


@dataclass
class Push:
    """A push event in the host-neutral shape the core filters: each commit lists its
    added/modified/removed paths, as GitHub's and GitLab's payloads both do."""

    ref: str
    before: str
    after: str
    repository: str  # the host's full name: owner/name, group/subgroup/project, a CodeCommit name
    clone_url: str
    default_branch: str | None = None
    commits: list[Mapping[str, Any]] = field(default_factory=list)
    deleted: bool = False


class GitHost(ABC):
    """One git host. Subclasses set `name` and `title` and implement the abstract methods.

    A host's constructor takes keyword arguments only, all optional, and accepts the transport
    settings callers pass for a tight budget (`retries`, `timeout`, `max_wait`: the webhook's compare
    call); it reads its settings and token from the environment on first use, never at import."""

    name: ClassVar[str]
    title: ClassVar[str]  # in messages: "GitHub", "GitLab"
    max_body_bytes: ClassVar[int] = 25 * 1024 * 1024
    single_headers: ClassVar[tuple[str, ...]] = ()  # headers a server must refuse when sent twice
    execution_prefix: ClassVar[str] = "x-"  # Step Functions execution names: <prefix><delivery id>

    @property
    def webhook_secret_env(self) -> tuple[str, str]:
        """The environment variables holding this host's webhook secret: the value, or its Secrets Manager id."""
        return f"MMP_{self.name.upper()}_WEBHOOK_SECRET", f"MMP_{self.name.upper()}_WEBHOOK_SECRET_ARN"

    # -- deliveries ---------------------------------------------------------------------
    def check_headers(self, headers: Headers, secret: str | bytes | None) -> Refusal | None:
        """The refusals that need no body (a missing or malformed credential header)."""
        return None

    def verify(self, headers: Headers, body: bytes, secret: str | bytes | None) -> Refusal | None:
        """Is this delivery from the host? None to accept; constant-time wherever a secret is compared."""
        raise NotImplementedError(f"{self.title} does not deliver webhooks")

    def event(self, headers: Headers) -> Event | Refusal:
        raise NotImplementedError(f"{self.title} does not deliver webhooks")

    def parse_push(self, payload: Any) -> Push | list[str]:
        """The push in the neutral shape, or every problem with the payload (each naming its field)."""
        raise NotImplementedError(f"{self.title} does not deliver webhooks")

    # -- reading and reporting ------------------------------------------------------------
    @abstractmethod
    def compare(self, repository: str, clone_url: str, base: str, head: str) -> Mapping[str, list[str]]:
        """added / modified / removed paths between two commits (base may be a branch name)."""

    @abstractmethod
    def source(self, repository: str, clone_url: str, commit: str) -> Any:
        """The commit's files as the pipeline reads them (a mmp.pipeline.sources.CommitSource)."""

    @abstractmethod
    def archive(self, repository: str, clone_url: str, commit: str) -> bytes:
        """The tree at `commit` as a .tar.gz (committed files only, as `git archive` makes them)."""

    @abstractmethod
    def reporter(self) -> Any:
        """Commit statuses on the host (a mmp.pipeline.reporting.StatusReporter): it takes the pipeline's
        states (pending, success, failure, error) and maps them to the host's own names."""

    def git_credentials(self) -> tuple[str, str] | None:
        """(username, password) for `git fetch` over HTTPS, or None for an anonymous fetch."""
        return None

    def configured(self) -> bool:
        """Whether this process's environment holds the host's token (the local worker reads it early)."""
        return False

    def ready(self) -> "GitHost":
        """Read the host's settings and secrets now (before a worker drops secrets from its environment)."""
        return self


def get_host(name: str | None = None, **kwargs: Any) -> GitHost:
    """The host named `name` ("github" when empty), made with `kwargs`; a clear error for an unknown one."""
    name = name or DEFAULT_HOST
    if name not in HOSTS:
        raise ValueError(f"host must be one of {', '.join(sorted(HOSTS))}, got {name!r}")
    module, _, cls = HOSTS[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ValueError(f"host {name!r} is not available in this installation ({module} is missing)") from None
        raise
    return getattr(mod, cls)(**kwargs)


def configured_hosts() -> dict[str, GitHost]:
    """Every installed host whose token is in the environment, its secrets read now."""
    found = {}
    for name in HOSTS:
        try:
            host = get_host(name)
        except ValueError:  # a host module this installation lacks
            continue
        if host.configured():
            found[name] = host.ready()
    return found


def local_repository(clone_url: str) -> Path | None:
    """A clone URL that is a repository folder on this machine (the local hook's pushes), else None."""
    path = Path(clone_url.removeprefix("file://")) if clone_url else None
    return path if path is not None and path.is_absolute() and path.is_dir() else None


def host_for(name: str | None, clone_url: str, **kwargs: Any) -> GitHost:
    """The host that reads a job's commit: `local` when its clone URL is a folder here, else `name`'s."""
    if local_repository(clone_url) is not None:
        return get_host("local")
    return get_host(name, **kwargs)


# -- helpers every host's payload parsing uses -----------------------------------------------
def is_sha(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA_RE.match(value))


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


def decode_body(body: bytes, content_type: str | None) -> Any:
    """JSON from a `application/json` or form-encoded (`payload=`) body; ValueError says why,
    TypeError for a content type no host sends."""
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


def push_payload_problems(payload: Any, repository_key: str, repository_fields: tuple[str, ...]) -> list[str]:
    """Every problem with a push payload's fields that GitHub and GitLab share (ref, before, after, the
    repository object under its host's key, the commit lists), each naming its field."""
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
        if isinstance(payload.get(key), str) and not is_sha(payload[key]):
            problems.append(f"'{key}' must be a 40-character hex commit sha")
    repo = payload.get(repository_key)
    if not isinstance(repo, dict):
        problems.append(f"'{repository_key}' is missing or not an object")
    else:
        for key in repository_fields:
            if not isinstance(repo.get(key), str) or not repo.get(key):
                problems.append(f"'{repository_key}.{key}' is missing or not a string")
    return problems + commit_lists_problems(payload.get("commits"))


def commit_lists_problems(commits: Any) -> list[str]:
    """Problems with a payload's `commits` (each an object with added/modified/removed path lists)."""
    if not isinstance(commits, list) or not all(isinstance(c, dict) for c in commits):
        return ["'commits' is missing or not a list of objects"]
    problems = []
    for i, commit in enumerate(commits):
        for kind in ("added", "modified", "removed"):
            value = commit.get(kind, [])
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                problems.append(f"'commits[{i}].{kind}' must be a list of paths")
    return problems


@dataclass
class ClientSource:
    """A CommitSource over a host's API client (`get_file` and `entry_type` of repository, path, commit):
    each file read once. A host whose entry types need more (CodeCommit's export-ignore) subclasses it."""

    client: Any
    repository: str
    commit: str
    _cache: dict[str, bytes | None] = field(default_factory=dict, repr=False)

    def read_file(self, path: str) -> bytes | None:
        if path not in self._cache:
            self._cache[path] = self.client.get_file(self.repository, path, self.commit)
        return self._cache[path]

    def entry_type(self, path: str) -> str | None:
        return self.client.entry_type(self.repository, path, self.commit)
