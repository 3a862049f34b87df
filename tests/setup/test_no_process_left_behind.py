"""The suite's safety net: whatever a test started is killed after it, even a process that
left the test's process group and was reparented to init (what a failing server test leaves)."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from ..conftest import kill_left_behind


def test_an_escaped_daemon_is_found_and_killed(no_process_left_behind, tmp_path):
    pid_file = tmp_path / "pid"
    # double fork + setsid: the sleeper's parent exits at once, so init adopts it, in its own session
    subprocess.run(["bash", "-c", f"setsid sleep 600 & echo $! > {pid_file}"], check=True, timeout=30)
    pid = int(pid_file.read_text())
    daemon = psutil.Process(pid)
    deadline = time.monotonic() + 30
    while daemon.name() != "sleep":  # bash → setsid → exec sleep
        assert time.monotonic() < deadline, daemon.cmdline()
        time.sleep(0.05)
    assert daemon.ppid() != os.getpid() and os.getsid(pid) != os.getsid(0)
    killed = kill_left_behind(no_process_left_behind)
    assert any("sleep 600" in line for line in killed)
    deadline = time.monotonic() + 10
    while daemon.is_running() and daemon.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the daemon survived"
        time.sleep(0.05)
