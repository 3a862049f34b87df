"""One process at a time on a shared file: an flock the kernel drops when its holder dies (even kill -9).

`exclusive` waits for its turn (the store schema, studies.db); `try_lock` answers at once, for
locks a process holds for its whole life (one worker, one stack, one shared tracking server)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger("mmp.local.filelock")


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
