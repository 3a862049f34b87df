"""mmp.backends.ssh against a real OpenSSH server on 127.0.0.1: pinning, streaming, stdin, quoting."""

from __future__ import annotations

import socket
import time

import pytest

from mmp.backends.ssh import (
    HostKeyError, RemoteProcess, Session, SshUnreachable, connect_when_ready, generate_ed25519, load_private_key,
)


def session(sshd, host_keys=None) -> Session:
    keys = [sshd.host_public] if host_keys is None else host_keys
    return Session(sshd.host, sshd.port, sshd.user, load_private_key(sshd.client_private), keys, timeout=5)


def test_run_streams_both_streams_live_sends_stdin_and_returns_the_exit_status(sshd):
    s = session(sshd).connect()
    try:
        seen: list[tuple[str, str, float]] = []
        proc: RemoteProcess = s.start(
            ["sh", "-c", 'echo first; echo oops >&2; IFS= read -r x; echo "got $x"; sleep 1; echo last; exit 7'],
            stdin="from-stdin\n", on_output=lambda stream, line: seen.append((stream, line, time.time())),
        )
        deadline = time.time() + 10
        while not any(line == "got from-stdin" for _, line, _ in seen) and time.time() < deadline:
            time.sleep(0.02)
        assert not proc.done.is_set(), "output must arrive while the command still runs"
        assert proc.wait(10) == 7
        assert ("stdout", "first") in [(a, b) for a, b, _ in seen]
        assert ("stderr", "oops") in [(a, b) for a, b, _ in seen]
        assert proc.lines[-1] == "last"
        code, lines = s.run(["true"])
        assert (code, lines) == (0, [])
    finally:
        s.close()


def test_arguments_arrive_literally(sshd, tmp_path):
    canary = tmp_path / "canary"
    evil = [f"; touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "it's \"quoted\"",
            f"two\nlines && touch {canary}", "*", "~", "$HOME"]
    s = session(sshd).connect()
    try:
        code, lines = s.run(["printf", "%s\\0", *evil])
    finally:
        s.close()
    assert code == 0
    assert "\n".join(lines).split("\0")[:-1] == evil
    assert not canary.exists()


def test_a_host_presenting_another_key_is_refused(sshd):
    _, other = generate_ed25519()
    with pytest.raises(HostKeyError, match="not the pinned one"):
        session(sshd, [other]).connect()


def test_no_pinned_key_means_no_connection(sshd):
    with pytest.raises(HostKeyError, match="no host key pinned"):
        session(sshd, [])


def test_wait_gives_up_on_a_silent_host_and_fails_fast_on_a_wrong_key(sshd):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    key = load_private_key(sshd.client_private)
    started = time.time()
    try:
        with pytest.raises(SshUnreachable, match="did not answer"):
            connect_when_ready(lambda: Session("127.0.0.1", port, sshd.user, key, [sshd.host_public], timeout=0.5),
                               deadline=time.time() + 1.5, interval=0.2)
    finally:
        silent.close()
    assert time.time() - started < 6
    _, other = generate_ed25519()
    started = time.time()
    with pytest.raises(HostKeyError):
        connect_when_ready(lambda: session(sshd, [other]), deadline=time.time() + 30, interval=0.2)
    assert time.time() - started < 5  # a wrong key is an alarm, not a boot delay


def test_a_long_chatty_process_keeps_only_its_tail_and_cuts_a_line_without_newline(sshd):
    """Issue 19, defect 14: the reader keeps KEEP_LINES lines, however much the command prints,
    and a run of output with no newline (a progress bar) is cut at MAX_LINE_BYTES."""
    from mmp.backends import ssh

    s = session(sshd).connect()
    try:
        count = 0
        longest = 0

        def seen(stream, line):
            nonlocal count, longest
            count += 1
            longest = max(longest, len(line))

        code, lines = s.run(["sh", "-c", "seq 1 20000; head -c 300000 /dev/zero | tr '\\0' x; echo; echo end"],
                            on_output=seen, timeout=60)
        assert code == 0
        assert len(lines) == ssh.KEEP_LINES and lines[-1] == "end"
        assert longest == ssh.MAX_LINE_BYTES
        assert count == 20000 + 300000 // ssh.MAX_LINE_BYTES + 1 + 1  # every line still reached the sink
    finally:
        s.close()
