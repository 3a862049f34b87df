"""The Python environment a local run's train.py gets: the repository's
requirements.txt / setup.py / pyproject.toml installed over the base environment.

The seed's contract says the training environment installs those files on every
platform. Locally, reinstalling torch and Horovod per repository would cost minutes
and gigabytes, so each set of dependency files gets a small venv *layered* over the
base one (a .pth file adds the base site-packages after the venv's own), keyed by a
hash of the files: built once under a file lock, reused by every later run, and a
file that asks for nothing the base lacks costs nothing at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mmp.backends.base import BackendError

DEPENDENCY_FILES = ("requirements.txt", "setup.py", "pyproject.toml")
READY = "mmp-env-ready.json"  # written last: an env without it is a crashed build
INSTALL_TIMEOUT_S = 30 * 60


@dataclass(frozen=True)
class TrainingPython:
    """Which interpreter runs train.py, and what providing it cost this time."""

    python: str
    env_dir: Path | None = None  # None: the base environment
    built: bool = False
    seconds: float = 0.0


def dependency_files(code: Path) -> list[Path]:
    """The files that declare what train.py needs (a pyproject.toml that only configures
    tools, with neither [project] nor [build-system], declares nothing)."""
    found = []
    for name in DEPENDENCY_FILES:
        path = code / name
        if path.is_file() and (name != "pyproject.toml" or _pyproject(path).keys() & {"project", "build-system"}):
            found.append(path)
    return found


def _pyproject(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(errors="replace"))
    except tomllib.TOMLDecodeError as exc:
        raise BackendError(f"pyproject.toml: not valid TOML ({exc})") from None


def static_dependencies(pyproject: Path) -> list[str] | None:
    """[project].dependencies when written out in the file; None when only a build can tell."""
    project = _pyproject(pyproject).get("project")
    if not isinstance(project, dict) or "dependencies" in project.get("dynamic", []):
        return None
    deps = project.get("dependencies", [])
    return [str(d) for d in deps] if isinstance(deps, list) else None


def declared_requirements(files: list[Path]) -> list[str] | None:
    """Every requirement the files declare, or None when a build is needed to know (setup.py)."""
    lines: list[str] = []
    for path in files:
        if path.name == "requirements.txt":
            lines += [ln.split(" #", 1)[0].strip() for ln in path.read_text(errors="replace").splitlines()]
        elif path.name == "pyproject.toml" and static_dependencies(path) is not None:
            lines += static_dependencies(path)
        else:
            return None
    return [ln for ln in lines if ln and not ln.startswith("#")]


def environment_key(files: list[Path], base_python: str) -> str:
    """Same files over the same base interpreter → same environment."""
    digest = hashlib.sha256(os.path.abspath(base_python).encode())
    for path in files:
        digest.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def satisfied_by_base(requirements: list[str]) -> bool:
    """True when every line is a plain requirement this interpreter already meets.

    Anything pip would have to interpret (options, URLs, paths, extras, includes)
    answers False, so such files always get a real install.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            return False
        if req.url or req.extras:
            return False
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            return False
    return True


def training_python(code: Path, base_python: str, envs_root: Path, log) -> TrainingPython:
    """The interpreter for train.py in the export `code`; builds its environment if needed.

    Raises BackendError naming the file and the package pip could not install.
    """
    files = dependency_files(code)
    if not files:
        return TrainingPython(base_python)
    declared = declared_requirements(files)
    if declared is not None and _is_this_python(base_python) and satisfied_by_base(declared):
        return TrainingPython(base_python)
    env_dir = envs_root / environment_key(files, base_python)
    python = env_dir / "bin" / "python"
    if (env_dir / READY).exists():
        return TrainingPython(str(python), env_dir)
    envs_root.mkdir(parents=True, exist_ok=True)
    with open(envs_root / f"{env_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run with the same files waits here, then reuses
        if (env_dir / READY).exists():
            return TrainingPython(str(python), env_dir)
        started = time.monotonic()
        shutil.rmtree(env_dir, ignore_errors=True)
        try:
            _build(env_dir, files, code, base_python, log)
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
        (env_dir / READY).write_text(json.dumps({"files": [f.name for f in files], "base": base_python}))
        return TrainingPython(str(python), env_dir, built=True, seconds=time.monotonic() - started)


def _is_this_python(python: str) -> bool:
    return os.path.abspath(python) == os.path.abspath(sys.executable)


def _build(env_dir: Path, files: list[Path], code: Path, base_python: str, log) -> None:
    log(f"mmp: installing {', '.join(f.name for f in files)} into {env_dir}")
    _run([base_python, "-m", "venv", "--without-pip", str(env_dir)], "venv", log)
    python = str(env_dir / "bin" / "python")
    base_sites = json.loads(_run([base_python, "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
                                 "venv", log))
    own_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "venv", log).strip()
    # addsitedir (not a bare path line) so the base's own .pth files (editable installs) apply too
    lines = "".join(f"import site; site.addsitedir({site!r})\n" for site in base_sites)
    Path(own_site, "_mmp_base_environment.pth").write_text(lines)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    for path in files:
        if path.name == "requirements.txt":
            _run([*pip, "-r", str(path)], path.name, log, cwd=code)
    project = [f for f in files if f.name in ("setup.py", "pyproject.toml")]
    listed = static_dependencies(code / "pyproject.toml") if [f.name for f in project] == ["pyproject.toml"] else None
    if listed:
        _run([*pip, *listed], "pyproject.toml", log, cwd=code)
    elif project and listed is None:
        _install_project_dependencies(pip, code, log)


def _install_project_dependencies(pip: list[str], code: Path, log) -> None:
    """Install the project for its dependencies (setup.py, or dependencies only a build
    knows), then remove the project itself: train.py always runs the commit's own code
    from the export, never a copy frozen in the cache."""
    name = "setup.py" if (code / "setup.py").is_file() else "pyproject.toml"
    report = code.parent / "pip-report.json"
    _run([*pip, "--report", str(report), str(code)], name, log, cwd=code)
    try:
        installed = json.loads(report.read_text()).get("install", [])
    finally:
        report.unlink(missing_ok=True)
    own = [item["metadata"]["name"] for item in installed
           if item.get("download_info", {}).get("url", "").rstrip("/") == code.resolve().as_uri()]
    if own:
        _run([pip[0], "-m", "pip", "uninstall", "--yes", *own], name, log, cwd=code)


def _run(argv: list[str], source: str, log, cwd: Path | None = None) -> str:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendError(f"{source}: installing dependencies took over {INSTALL_TIMEOUT_S // 60} minutes") from None
    for line in (proc.stdout + proc.stderr).splitlines():
        log(line)
    if proc.returncode != 0:
        raise BackendError(f"{source}: {pip_error(proc.stdout + proc.stderr) or f'exit {proc.returncode}'}")
    return proc.stdout


def pip_error(output: str) -> str:
    """pip's own reason, naming the package (`No matching distribution found for x==9`)."""
    errors = [ln.strip()[len("ERROR: "):] for ln in output.splitlines() if ln.strip().startswith("ERROR: ")]
    for wanted in ("No matching distribution", "Could not find a version", "Could not install", "Invalid requirement"):
        for line in reversed(errors):
            if line.startswith(wanted):
                return line[:300]
    if errors:
        return errors[-1][:300]
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
