"""Run one command that must not outlive the process that started it (`mmp up`'s worker, MLflow).

Run as `python -I -S childguard.py PARENT_PID GRACE_S -- COMMAND...`, in a new session, so the
guard leads the command's process group. On Linux the guard asks the kernel for SIGTERM
when its parent dies (prctl PR_SET_PDEATHSIG), so a `kill -9` or an OOM kill of `mmp up`
still stops everything it started: the group gets SIGTERM once (the worker cancels its
job, MLflow's server and its own children stop), and whatever is left after a grace
period gets SIGKILL. A SIGTERM while the parent lives is `mmp up` stopping the group
itself: the guard then just waits for the command and exits with its code.

Why a guard rather than prctl in the command itself: the kernel sends the signal when
the *thread* that forked dies, `mmp up` forks from a threaded process (unsafe for code
between fork and exec), and `mlflow server` starts children of its own. The guard is
single-threaded and stdlib-only, so fork + prctl + exec is safe here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None


# Looked up once, at import: `prctl` is then safe between fork and exec (a preexec_fn), where
# loading a library could deadlock on a lock another thread held at fork.
_PRCTL = _load_prctl()


def prctl(option: int, value: int) -> bool:
    """Linux's prctl(2) with one argument; False where there is none or it refused."""
    return _PRCTL is not None and _PRCTL(option, value, 0, 0, 0) == 0


def ask_for_signal_on_parent_death(sig: int) -> None:
    """Get `sig` when the parent dies, even by SIGKILL (Linux; a no-op elsewhere)."""
    if _PRCTL is not None and not prctl(PR_SET_PDEATHSIG, sig):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def guarded_argv(parent_pid: int, grace_s: float, command: list[str]) -> list[str]:
    """The command line that runs `command` under this guard (start it in a new session)."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), str(parent_pid), str(int(grace_s)), "--", *command]


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: childguard.py PARENT_PID GRACE_S -- COMMAND...", file=sys.stderr)
        return 2
    parent, grace, command = int(argv[0]), max(1, int(argv[1])), argv[3:]
    ask_for_signal_on_parent_death(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the kernel was asked
        return 1
    guard = os.getpid()
    orphaned = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal orphaned
        if orphaned or os.getppid() == parent:
            return  # the parent is stopping the group itself; wait for the command
        orphaned = True
        signal.alarm(grace)
        os.killpg(0, signal.SIGTERM)  # once, to the whole group (this handler ignores its own copy)

    def on_alarm(signum: int, frame: object) -> None:
        os.killpg(0, signal.SIGKILL)  # the grace period is over: everything left, the guard included

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            ask_for_signal_on_parent_death(signal.SIGTERM)  # should the guard itself be killed
            if os.getppid() == guard:
                os.execvp(command[0], command)
        except OSError as exc:
            print(f"childguard: cannot run {command[0]}: {exc}", file=sys.stderr)
        os._exit(127)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 1
    if orphaned:
        os.killpg(0, signal.SIGKILL)  # the command is done; nothing else of the group may stay
    return _exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
