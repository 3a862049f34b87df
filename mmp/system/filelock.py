"""One process at a time on a shared file: an flock the kernel drops when its holder dies (even kill -9).

`exclusive` waits for its turn (the store schema, studies.db); `try_lock` answers at once, for
locks a process holds for its whole life (one worker, one stack, one shared tracking server)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger("mmp.system.filelock")


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (made if missing) for the block; yields whether it is held.

    A folder where the lock file cannot be made (read-only) runs the block unlocked: the
    caller's own error then says what is wrong with the folder, not with the lock.
    """
    try:
        fh = open(path, "a")
    except OSError as exc:
        log.debug("no lock at %s (%s); going on without it", path, exc)
        yield False
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the lock file stays: deleting lock files races
        yield True


def try_lock(fh: IO) -> bool:
    """Take the exclusive flock on an open file now, or say False: another process holds it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def hold(path: str | Path, holder: str) -> IO | None:
    """Take `path`'s flock for this process's life and write `holder` (who holds it) into it; None
    when another process holds it. Closing the returned file, or dying, releases it."""
    fh = open(path, "a+")
    if not try_lock(fh):
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(holder)
    fh.flush()
    return fh


def holder(path: str | Path) -> str:
    """What the process holding `path` wrote into it (`hold`); empty when unknown."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def is_held(path: str | Path) -> bool:
    """Whether another process holds `path`'s flock now (the probe takes and drops it at once)."""
    with open(path, "a") as fh:
        if not try_lock(fh):
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False
