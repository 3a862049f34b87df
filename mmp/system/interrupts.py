"""Hold a stopping signal (Ctrl-C, SIGTERM) until the code is at a point where stopping is safe.

Why: Python runs a signal's handler between any two statements of the main thread, so the
KeyboardInterrupt or SystemExit it raises can land between two steps that must go together (a
trial registered as running but its thread not yet started, a finished trial taken off the queue
but not yet recorded) or while the main thread holds a lock the other threads need. The clean-up
that follows then waits for something that never comes. Inside `HeldSignals()`, the first such
signal is only recorded; the code raises it at its next `checkpoint()`. A second one acts at once,
as someone who presses Ctrl-C twice expects.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeldSignals:
    """A context manager; `pending` says a signal waits for `checkpoint()`."""

    def __init__(self, signums: tuple[int, ...] = STOPPING_SIGNALS):
        self.signums = signums
        self.previous: dict[int, Callable[[int, FrameType | None], Any]] = {}
        self.pending: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> HeldSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread receives signals: nothing to hold elsewhere
        for signum in self.signums:
            handler = signal.getsignal(signum)
            if callable(handler):  # a Python handler raises; SIG_DFL / SIG_IGN stay as the OS does them
                self.previous[signum] = handler
                signal.signal(signum, self._hold)
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            self.pending = (signum, frame)
            return
        self.pending = None
        self._restore()  # asked twice: stop now
        self.previous[signum](signum, frame)

    def checkpoint(self) -> None:
        """Here stopping is safe: act on a held signal as its own handler would have (usually by raising)."""
        if self.pending is None:
            return
        signum, frame = self.pending
        self.pending = None
        self.previous[signum](signum, frame)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self._hold:
                signal.signal(signum, handler)

    def __exit__(self, *exc_info: Any) -> None:
        """Put the handlers back; a signal still held is acted on now, never lost."""
        self._restore()
        self.checkpoint()
