"""Ctrl-C and SIGTERM held until a safe point (mmp.system.interrupts), with real signals to this process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mmp.system.interrupts import HeldSignals


def send(signum: int, held) -> None:
    """Signal this process and wait until its handler has run (Python runs it in the main thread between
    statements): until `held.pending` is set, or the handler's exception ends the wait."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 30
    while held.pending is None and time.monotonic() < deadline:
        time.sleep(0.01)


class Stop(Exception):
    pass


def raise_stop(signum, frame):
    raise Stop(signum)


@pytest.fixture
def sigterm_raises():
    before = signal.signal(signal.SIGTERM, raise_stop)
    yield
    signal.signal(signal.SIGTERM, before)


def test_a_ctrl_c_is_held_until_the_checkpoint_and_the_handler_comes_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with HeldSignals() as interrupts:
            send(signal.SIGINT, interrupts)
            reached = True  # no KeyboardInterrupt between the signal and here
            assert interrupts.pending is not None and interrupts.pending[0] == signal.SIGINT
            interrupts.checkpoint()
            reached = False
    assert reached
    assert signal.getsignal(signal.SIGINT) is before


def test_a_checkpoint_with_nothing_held_goes_on():
    with HeldSignals() as interrupts:
        interrupts.checkpoint()
        assert interrupts.pending is None


def test_a_second_signal_acts_at_once(sigterm_raises):
    with pytest.raises(Stop):
        with HeldSignals() as interrupts:
            send(signal.SIGTERM, interrupts)
            assert interrupts.pending is not None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler's exception ends it at once
            pytest.fail("the second SIGTERM was held too")
    assert signal.getsignal(signal.SIGTERM) is raise_stop


def test_a_signal_still_held_at_the_end_is_acted_on_then(sigterm_raises):
    with pytest.raises(Stop):
        with HeldSignals() as interrupts:
            send(signal.SIGTERM, interrupts)
    assert signal.getsignal(signal.SIGTERM) is raise_stop


def test_a_signal_the_os_handles_is_left_to_the_os():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with HeldSignals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_outside_the_main_thread_nothing_is_held():
    seen: list = []

    def body():
        with HeldSignals() as interrupts:  # signal.signal would raise here: it must not be called
            seen.append(interrupts.previous)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=30)
    assert seen == [{}]
