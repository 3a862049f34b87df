"""Finding and stopping *our* processes only.

A saved pid alone is not an identity: after a reboot or pid wrap-around it names an
unrelated process, and signalling it kills the wrong thing. A process is named here
by pid + start time (which the kernel never repeats for a live pid), and a run's whole
tree by a cgroup v2 directory of its own where this machine lets us make one (a
directory is not reused silently and `cgroup.kill` reaches processes that left every
process group and session).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

START_TOLERANCE_S = 0.05  # /proc start times have clock-tick (10 ms) resolution
CGROUP_PREFIX = "mmp-run-"

log = logging.getLogger("mmp.system.procs")


# -- pid + start time ----------------------------------------------------------------
def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def find_process(pid: int | None, started: float | None) -> psutil.Process | None:
    """The live, non-zombie process `pid` if it is the one that started at `started`."""
    if not pid or started is None:
        return None
    try:
        proc = psutil.Process(int(pid))
        if abs(proc.create_time() - float(started)) > START_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def signal_process(proc: psutil.Process | None, sig: int) -> bool:
    """Send `sig` to an identified process (psutil re-checks its identity first)."""
    if proc is None:
        return False
    try:
        proc.send_signal(sig)
        return True
    except psutil.Error:
        return False


def wait_gone(proc: psutil.Process | None, timeout: float) -> bool:
    if proc is None:
        return True
    try:
        proc.wait(timeout=timeout)
        return True
    except psutil.TimeoutExpired:
        return False
    except psutil.Error:
        return True


def processes_with_env(name: str, value: str, *, started_after: float | None = None) -> list[psutil.Process]:
    """Live processes (not this one, no zombies) whose environment holds `name=value`: what a
    stack or a test marked at start, wherever they were reparented. `started_after` skips
    older processes, which cannot be ours (a reused mark, a pid wrap-around)."""
    found = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        if proc.pid == os.getpid():
            continue
        if started_after is not None and (proc.info["create_time"] or 0) < started_after - START_TOLERANCE_S:
            continue
        try:
            if proc.environ().get(name) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


# -- cgroup v2 -----------------------------------------------------------------------
def cgroup2_mount() -> Path | None:
    """Where the unified (v2) hierarchy is mounted, if it is."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def own_cgroup() -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def make_run_cgroup(name: str) -> Path | None:
    """A fresh cgroup for one run beside this process's own, or None where not allowed.

    Only core files are used (cgroup.procs, cgroup.kill), so no controller needs to be
    delegated; a probe move of this process's pid is not made: the run's supervisor
    joins it itself and reports when it cannot.
    """
    mount, own = cgroup2_mount(), own_cgroup()
    if mount is None or own is None or not name.replace("-", "").isalnum():
        return None
    path = mount / own.lstrip("/") / f"{CGROUP_PREFIX}{name}"
    try:
        path.mkdir()
    except FileExistsError:
        kill_cgroup(path)
        return path if path.is_dir() else None
    except OSError:
        return None
    if not (path / "cgroup.procs").exists():
        remove_cgroup(path)
        return None
    return path


def is_run_cgroup(path: str | Path | None) -> bool:
    """A directory this module made (never signal through an arbitrary saved path)."""
    if not path:
        return False
    path = Path(path)
    mount = cgroup2_mount()
    return (mount is not None and path.name.startswith(CGROUP_PREFIX) and mount in path.parents
            and (path / "cgroup.procs").is_file())


def cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_cgroup(path: str | Path | None, timeout: float = 10.0) -> bool:
    """SIGKILL everything in the run's cgroup, wait until it is empty, remove it."""
    if not is_run_cgroup(path):
        return False
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(path)
        if not pids:
            break
        if (path / "cgroup.kill").exists():
            try:
                (path / "cgroup.kill").write_text("1")
            except OSError:
                pass
        for pid in pids:  # kernels before 5.14 have no cgroup.kill
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    remove_cgroup(path)
    return True


def remove_cgroup(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def stop_process(proc: subprocess.Popen | None, name: str, grace: float = 20.0) -> None:
    """Stop a child we started in its own session: SIGTERM to its group, SIGKILL to what is left after `grace`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0fs; killing it", name, grace)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group, or itself
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
