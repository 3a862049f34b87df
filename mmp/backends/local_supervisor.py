"""The small process between the local backend and horovodrun that owns a run's tree.

It makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so whatever
train.py starts stays its descendant even after a double fork and setsid, and
(where the backend made one) joins the run's cgroup v2 directory before starting
anything. When horovodrun ends, or on SIGTERM/SIGINT/SIGHUP (graceful: TERM, then
KILL after the grace period) or SIGUSR1 (KILL now), every remaining descendant is
killed and reaped; only then is the exit code written, so a recorded end means
nothing of the run is left. Once every rank has exited, a leftover that keeps their
output open (horovodrun waits for it) is stopped after a few seconds: a finished run
ends when train.py does, not at Max_Runtime.

Run by path with `python -I` (stdlib + psutil only): it must not import mmp, whose
environment train.py does not get.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import psutil

if not __package__:  # run as a script (python -I local_supervisor.py): mmp is this file's tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mmp.system.childguard import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl  # noqa: E402

KILL_DEADLINE_S = 30
POLL_S = 0.1  # the longest wait for a child's end when no SIGCHLD comes (it wakes the wait at once)
SCAN_S = 0.5  # how often the tree is read for leftovers of finished ranks (psutil reads /proc: not every tick)
LINGER_S = 3.0  # leftovers of finished ranks may exit on their own this long before they are stopped
RESOURCE_TRACKER = "multiprocessing.resource_tracker"  # horovodrun's own helper, not a rank


def descendants() -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def signal_descendants(sig: int) -> None:
    for proc in descendants():
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_everything() -> None:
    """SIGKILL every descendant until none is left (orphans re-parent to us meanwhile)."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        left = descendants()
        if not left:
            break
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        time.sleep(0.02)
        reap()
    reap()


def write_exit_code(path: str, code: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(code))
    os.replace(tmp, path)


def holders_of_finished_ranks(launcher: psutil.Process) -> list[psutil.Process]:
    """Processes keeping a finished run open: none of horovodrun's own descendants is left (every rank
    exited), yet it is still alive, and orphans of the ranks (re-parented to this subreaper) are. horovodrun
    reads its ranks' output until every writer closes it, so a helper that inherited stdout holds it up
    to Max_Runtime. [] while any rank runs."""
    try:
        below = [p for p in launcher.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        if any(RESOURCE_TRACKER not in " ".join(p.cmdline()) for p in below):
            return []
        return [p for p in psutil.Process().children() if p.pid != launcher.pid and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def kill_trees(roots: list[psutil.Process]) -> None:
    for root in roots:
        try:
            for proc in [*root.children(recursive=True), root]:
                proc.kill()
        except psutil.Error:
            pass


def wait_for_launcher(child: subprocess.Popen) -> int:
    """horovodrun's exit code, reaping orphans meanwhile; leftovers that hold a finished run open
    (see holders_of_finished_ranks) are killed after LINGER_S, so the run ends when train.py does."""
    launcher = psutil.Process(child.pid)
    lingering_since, next_scan = None, 0.0
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return -signal.SIGKILL
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode
        if pid:
            continue  # an orphan reaped: look for more before sleeping
        if time.monotonic() >= next_scan:
            next_scan = time.monotonic() + SCAN_S
            holders = holders_of_finished_ranks(launcher)
            if not holders:
                lingering_since = None
            elif lingering_since is None:
                lingering_since = time.monotonic()
            elif time.monotonic() - lingering_since > LINGER_S:
                names = ", ".join(f"{_name(p)} (pid {p.pid})" for p in holders)
                print(f"mmp: train.py has ended, but {names} still held its output open; stopped so the run can end",
                      flush=True)
                kill_trees(holders)
                lingering_since = None
        signal.sigtimedwait([signal.SIGCHLD], POLL_S)  # SIGCHLD is blocked here (main): a child's end wakes it


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exit-file", required=True)
    parser.add_argument("--cgroup")
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    if args.cgroup:
        try:
            with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
        except OSError as exc:
            print(f"mmp: could not join cgroup {args.cgroup} ({exc}); tracking descendants instead", flush=True)
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):
        print("mmp: could not become a child subreaper; escaped processes are found by the backend", flush=True)

    stopping = []

    def on_stop(signum, _frame):
        if not stopping:
            stopping.append(signum)
            signal_descendants(signal.SIGTERM)
            signal.setitimer(signal.ITIMER_REAL, max(args.grace, 0.01))

    def on_kill_now(signum, _frame):
        stopping.append(signum)
        signal_descendants(signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGUSR1, on_kill_now)
    signal.signal(signal.SIGALRM, lambda *_: signal_descendants(signal.SIGKILL))

    def in_child():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # the mask is inherited: horovodrun's own

    code = -signal.SIGTERM
    child = None
    # Blocked, SIGCHLD stays pending until wait_for_launcher's sigtimedwait takes it: the run's end is heard
    # at once rather than at the next poll.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    if not stopping:
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=in_child)
        except OSError as exc:
            print(f"mmp: could not start {command[0]}: {exc}", flush=True)
            code = 127
    if child is not None:
        code = wait_for_launcher(child)
    signal.setitimer(signal.ITIMER_REAL, 0)
    kill_everything()
    write_exit_code(args.exit_file, code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
