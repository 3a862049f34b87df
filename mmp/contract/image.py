"""The training image's identity: one image per dependency set, the commit's code beside it.

Why: a Docker build per commit put minutes of CodeBuild in front of every experiment,
though most GitOps pushes change only experiment.json. The image holds the base
(horovod_docker/), mmp's entrypoint and the repository's *dependencies*; the code
travels as the commit's archive (an input channel on SageMaker, a download on DLAMI).
The image tag is a hash of exactly what the build reads, so it changes only when a
dependency file, horovod_docker/ or mmp's shipped modules change.

Pure Python (stdlib only): the Prepare Lambda, the Pulumi program and the tests share it.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Callable, Iterable, Mapping

# The repository files the image build depends on (read at the commit by Prepare).
DEPENDENCY_FILES = ("requirements.txt", "pyproject.toml", "setup.py", "setup.cfg")
# What the build context holds besides the requirements (see mmp.infra.image_build).
CONTEXT_FOLDERS = ("horovod_docker", "mmp")
TAG_PREFIX = "deps-"
TAG_RE = re.compile(r"^deps-[0-9a-f]{32}$")
CODE_CHANNEL = "mmp-code"  # SageMaker input channel holding the commit's archive
CODE_PREFIX = "code"  # s3://<artifacts>/code/<owner>/<name>/<sha>.tar.gz
REQUIREMENTS_PREFIX = "images"  # s3://<artifacts>/images/<tag>/requirements.txt
# requirements.txt lines that make pip read more than the file itself: the build could not see them.
_OUTSIDE_REFERENCE = re.compile(r"^\s*(-r|--requirement|-c|--constraint|-e|--editable|\.|/|file:)", re.I)


class ImageError(ValueError):
    """The repository's dependencies cannot be built into an image; the message names the file."""


def requirements_text(read: Callable[[str], bytes | None]) -> bytes:
    """The requirements the image installs, from the repository's dependency files.

    requirements.txt wins (as is); else pyproject.toml's static `[project] dependencies`;
    a setup.py alone is a program, not a list, so it is refused with what to do instead."""
    requirements = read("requirements.txt")
    if requirements is not None:
        for number, line in enumerate(requirements.decode("utf-8", "replace").splitlines(), 1):
            if _OUTSIDE_REFERENCE.match(line):
                raise ImageError(f"requirements.txt line {number} ({line.strip()[:60]!r}) refers to other files; "
                                 "the image build reads requirements.txt alone: list the packages themselves")
        return requirements
    pyproject = read("pyproject.toml")
    if pyproject is not None:
        try:
            project = tomllib.loads(pyproject.decode("utf-8")).get("project") or {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ImageError(f"pyproject.toml is not valid TOML: {exc}") from None
        if "dependencies" in (project.get("dynamic") or []):
            raise ImageError("pyproject.toml declares its dependencies dynamic; list them in [project] "
                             "dependencies or in requirements.txt")
        deps = project.get("dependencies") or []
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise ImageError("pyproject.toml [project] dependencies must be a list of strings")
        if deps or read("setup.py") is None:
            return "".join(f"{d}\n" for d in deps).encode()
    if read("setup.py") is not None:
        raise ImageError("setup.py without requirements.txt: the training image installs requirements.txt or "
                         "pyproject.toml [project] dependencies; add one of them")
    return b""


def context_digest(root: Path, folders: Iterable[str] = CONTEXT_FOLDERS) -> str:
    """sha256 over the build context's files (path and bytes), caches excluded."""
    digest = hashlib.sha256()
    for path in context_files(root, folders):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def context_files(root: Path, folders: Iterable[str] = CONTEXT_FOLDERS) -> list[Path]:
    """The files CodeBuild's context holds (what the Pulumi program zips), sorted; `folders` may
    name single files too (the runner image's context)."""
    found = []
    for name in folders:
        path = root / name
        for item in [path] if path.is_file() else sorted(path.rglob("*")):
            if item.is_file() and "__pycache__" not in item.parts and item.suffix != ".pyc":
                found.append(item)
    return found


def image_tag(requirements: bytes, context: str) -> str:
    """`deps-<32 hex>`: the same requirements and build context give the same tag."""
    normalised = b"\n".join(line.rstrip() for line in requirements.replace(b"\r\n", b"\n").split(b"\n")).strip()
    digest = hashlib.sha256(b"mmp-image-v1\0" + context.encode() + b"\0" + normalised).hexdigest()
    return TAG_PREFIX + digest[:32]


_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")  # one path segment of a repository's full name


def code_key(repository: str, commit: str) -> str:
    """Where the commit's archive lives in the artifacts bucket."""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ImageError(f"commit must be a 40-character sha, got {commit!r}")
    parts = repository.split("/")  # owner/name, GitLab's group/subgroup/project, a CodeCommit repository's name
    if not all(_SEGMENT_RE.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ImageError(f"repository must be 'owner/name' (GitLab: 'group/subgroup/project', CodeCommit: a name), "
                         f"got {repository!r}")
    return f"{CODE_PREFIX}/{repository}/{commit}.tar.gz"


def requirements_key(tag: str) -> str:
    return f"{REQUIREMENTS_PREFIX}/{tag}/requirements.txt"


def dependency_files(read: Callable[[str], bytes | None]) -> Mapping[str, bytes]:
    """The dependency files present at the commit (for reports and tests)."""
    return {name: data for name in DEPENDENCY_FILES if (data := read(name)) is not None}
