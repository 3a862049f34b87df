"""What every host of a multi-host training job does alike, whatever started it: the SageMaker
entrypoint (mmp.runtime.sagemaker_entrypoint) and the Kubernetes launcher (mmp.runtime.kubernetes_launcher).
Unpack the commit's archive, find horovodrun, wait for the peers' sshd. Stdlib only: it runs in the
training image.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from mmp.contract.argv import shell_join
from mmp.runtime.horovod import find_horovodrun
from mmp.runtime.rank import PASSWORD_VAR, CredentialsError, load_mlflow_password


class EntrypointError(RuntimeError):
    """The job cannot start training; the message becomes the job's FailureReason."""


def unpack_archive(archive: Path, dest: Path) -> Path:
    """Unpack a commit's archive into `dest` (GitHub's single top folder stripped), refusing members
    that would land outside it; return `dest`, which must then hold train.py."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.removeprefix("./") not in ("", ".")]
            tops = {m.name.removeprefix("./").split("/", 1)[0] for m in members}
            strip = len(tops) == 1 and all(m.isdir() for m in members if m.name.removeprefix("./") in tops)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in members:
                name = member.name.removeprefix("./").rstrip("/")
                if strip:
                    name = name.split("/", 1)[1] if "/" in name else ""
                if not name:
                    continue
                target = (dest / name).resolve()
                if dest.resolve() not in target.parents or member.issym() or member.islnk() or member.isdev():
                    raise EntrypointError(f"code archive member {member.name!r} is a link, a device or leaves "
                                          "the code folder")
                member.name = name
                tar.extract(member, dest, set_attrs=False, **safe)
    except (tarfile.TarError, OSError) as exc:
        raise EntrypointError(f"could not unpack the code archive {archive.name}: {exc}") from None
    if not (dest / "train.py").is_file():
        raise EntrypointError("train.py not found at the root of the commit's code")
    return dest


def without_password(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for horovodrun (and so every rank): never the MLflow password's value.

    horovodrun puts its whole environment on each rank's command line (`env K=V … python`, and
    `ssh host '…'` for other hosts), so each rank reads the password from its secret itself
    (mmp.runtime.rank). Here the secret is read once, into a throwaway copy, so a role without
    access fails the job at once with a clear reason."""
    env = {key: value for key, value in environ.items() if key != PASSWORD_VAR}
    try:
        load_mlflow_password(dict(env))
    except CredentialsError as exc:
        raise EntrypointError(str(exc)) from None
    return env


def run_streamed(argv: list[str], cwd: Path | str, env: Mapping[str, str], *, log: IO[bytes] | None = None,
                 tail: int = 0, own_session: bool = False) -> tuple[int, list[str]]:
    """Run horovodrun with its output streamed to stdout (the job's log) and to `log`; keep the last
    `tail` lines for a failure summary. `own_session`: horovodrun leads its own session, and a
    SIGTERM to this process (a pod being deleted) is passed on to it."""
    proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=own_session)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if own_session else None
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for chunk in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if log is not None:
                log.write(chunk)
            if tail:
                lines.append(chunk.decode(errors="replace"))
                del lines[:-tail]
        return proc.wait(), lines
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def announce(argv: list[str], where: str = "") -> None:
    print(f"mmp: {where}{shell_join(argv)}", flush=True)


def require_horovodrun() -> str:
    found = find_horovodrun()
    if not found:
        raise EntrypointError("horovodrun is not installed in the training image")
    return found


# -- SSH between hosts ----------------------------------------------------------
def ssh_answers(address: str, port: int, timeout: float = 2.0) -> bool:
    """True when something at address:port speaks SSH (sends an `SSH-` banner)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(hosts: Sequence[str], *, port: int = 22, timeout: float = 600, interval: float = 1.0,
                 address: Callable[[str], str] = lambda host: host) -> None:
    """Block until every host answers on SSH; raise EntrypointError naming the silent ones."""
    waiting = list(hosts)
    deadline = time.monotonic() + timeout
    while True:
        waiting = [host for host in waiting if not ssh_answers(address(host), port)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise EntrypointError(f"host(s) {', '.join(waiting)} did not answer on SSH port {port} "
                                  f"within {timeout:.0f} s")
        time.sleep(interval)


def wait_for_leader(leader: str, *, port: int = 22, start_timeout: float = 600, interval: float = 5.0,
                    gone_after: int = 3, address: Callable[[str], str] = lambda host: host) -> None:
    """A worker's life: wait for the leader's sshd, then until it has stopped answering
    `gone_after` times in a row (the leader's container ends when training does)."""
    wait_for_ssh([leader], port=port, timeout=start_timeout, interval=interval, address=address)
    misses = 0
    while misses < gone_after:
        time.sleep(interval)
        misses = 0 if ssh_answers(address(leader), port) else misses + 1
