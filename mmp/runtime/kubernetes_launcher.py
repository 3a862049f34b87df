"""The launcher pod's entrypoint on the `kubernetes` platform (Kubeflow Trainer, MPI policy, runLauncherAsNode).

    python -m mmp.runtime.kubernetes_launcher <train.py arguments…>

The counterpart of mmp.runtime.sagemaker_entrypoint, sharing its code where the logic is the same
(unpacking the archive, waiting for sshd, the failure summary):
1. unpack the commit's archive (MMP_CODE_ARCHIVE, a mounted ConfigMap; or MMP_CODE_URI, s3://) into
   MMP_WORK_DIR/code on FSx, which every node mounts at the same path (horovodrun `cd`s there);
2. copy the mounted SSH key (Trainer mounts it 0640, which OpenSSH refuses) to a 0600 file;
3. read Trainer's hostfile (`<pod>.<subdomain> slots=N` per line; MMP_HOSTFILE, default
   /etc/mpi/hostfile), put this host first as `localhost` (the launcher runs no sshd);
4. wait, bounded (MMP_SSH_WAIT_SECONDS), for every peer's sshd on MMP_SSH_PORT;
5. run horovodrun through mmp.contract.argv, forwarding SIGTERM (pod deletion) to it;
6. on failure write the summary to the termination log (MMP_TERMINATION_LOG, default
   /dev/termination-log), which the backend reports; on success copy the output to MMP_OUTPUT_S3
   when set, as dlami does.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from mmp.contract.argv import horovodrun_argv
from mmp.runtime.horovod import failure_summary
from mmp.runtime.rank import LAUNCHER, SECRET_ARN_VAR
from mmp.runtime.cluster import (EntrypointError, announce, require_horovodrun, run_streamed, unpack_archive,
                                 wait_for_ssh, without_password)

DEFAULT_HOSTFILE = "/etc/mpi/hostfile"
TRAINER_HOSTFILE_VAR = "OMPI_MCA_orte_default_hostfile"  # Trainer sets it to the hostfile it mounts
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # the kubelet keeps at most 4096 bytes of a termination message


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """Trainer's OpenMPI hostfile: one `host slots=N` per line."""
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        slots = 1
        for word in words[1:]:
            if word.startswith("slots="):
                value = word.removeprefix("slots=")
                if not value.isdigit() or int(value) < 1:
                    raise EntrypointError(f"{path} line {number}: slots must be a whole number ≥ 1, got {value!r}")
                slots = int(value)
        hosts.append((words[0], slots))
    if not hosts:
        raise EntrypointError(f"{path} lists no hosts")
    return hosts


def is_this_host(host: str, names: Sequence[str]) -> bool:
    short = host.split(".", 1)[0]
    return host in names or short in {n.split(".", 1)[0] for n in names}


def order_hosts(hosts: list[tuple[str, int]], names: Sequence[str]) -> list[tuple[str, int]]:
    """This host first, as `localhost` (horovodrun runs its ranks without SSH), then the peers."""
    mine = [h for h in hosts if is_this_host(h[0], names)]
    if len(mine) != 1:
        raise EntrypointError(f"this host ({', '.join(names)}) appears {len(mine)} times in the hostfile "
                              f"({', '.join(h for h, _ in hosts)})")
    return [("localhost", mine[0][1])] + [h for h in hosts if h is not mine[0]]


def private_key(key_dir: Path, dest: Path) -> Path:
    """Trainer's private key (id_rsa, mode 0640) copied to a 0600 file OpenSSH accepts."""
    source = key_dir / "id_rsa"
    if not source.is_file():
        raise EntrypointError(f"{source} is missing: is this a TrainJob with an MPI runtime?")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(source.read_bytes())
    os.chmod(dest, 0o600)
    return dest


def fetch_code(environ: Mapping[str, str], dest: Path) -> Path:
    archive = environ.get("MMP_CODE_ARCHIVE")
    if archive:
        return unpack_archive(Path(archive), dest)
    uri = environ.get("MMP_CODE_URI") or ""
    if not uri.startswith("s3://"):
        raise EntrypointError("neither MMP_CODE_ARCHIVE nor an s3:// MMP_CODE_URI says where the commit's code is")
    from mmp import aws

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "code.tar.gz"
        aws.client("s3").download_file(bucket, key, str(local))
        return unpack_archive(local, dest)


def run_horovodrun(argv: list[str], cwd: Path, env: Mapping[str, str]) -> tuple[int, list[str]]:
    """horovodrun with its output streamed to stdout (the pod's log); SIGTERM is passed on to it."""
    announce(argv)
    return run_streamed(argv, cwd, env, tail=2000, own_session=True)  # the summary needs the tail only


def copy_output(output: str, target: str) -> None:
    from mmp import aws

    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    s3 = aws.client("s3")
    for path in sorted(Path(output).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, prefix + str(path.relative_to(output)))


def write_termination(path: Path, text: str) -> None:
    try:
        path.write_text(text[:TERMINATION_LIMIT])
    except OSError as exc:
        print(f"mmp: could not write {path}: {exc}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    termination = Path(environ.get("MMP_TERMINATION_LOG") or TERMINATION_LOG)
    try:
        work = Path(environ.get("MMP_WORK_DIR") or tempfile.mkdtemp(prefix="mmp-"))
        code = fetch_code(environ, work / "code")
        hostfile = environ.get("MMP_HOSTFILE") or environ.get(TRAINER_HOSTFILE_VAR) or DEFAULT_HOSTFILE
        hosts = order_hosts(read_hostfile(Path(hostfile)),
                            [socket.gethostname(), socket.getfqdn(), *filter(None, [environ.get("MMP_HOSTNAME")])])
        port = int(environ.get("MMP_SSH_PORT") or 22)
        extra = ["-p", str(port)]
        if len(hosts) > 1:
            key = private_key(Path(environ.get("MMP_SSH_KEY_DIR") or "/root/.ssh"), work / ".ssh" / "id_mmp")
            extra = ["--ssh-identity-file", str(key), *extra]
            wait_for_ssh([h for h, _ in hosts[1:]], port=port, timeout=float(environ.get("MMP_SSH_WAIT_SECONDS") or 600))
        output = args[args.index("--output-path") + 1] if "--output-path" in args else None
        if output:
            Path(output).mkdir(parents=True, exist_ok=True)
        command = horovodrun_argv(hosts, args, python=environ.get("MMP_PYTHON") or sys.executable,
                                  horovodrun=environ.get("MMP_HOROVODRUN") or require_horovodrun(), extra=extra,
                                  launcher=LAUNCHER)
        # horovodrun puts its environment on every rank's command line: MMP's own settings stay out,
        # and the MLflow password is read by each rank from its secret (mmp.runtime.rank), never here.
        env = without_password({k: v for k, v in environ.items()
                                if not k.startswith("MMP_") or k in ("MMP_RUN_ID", SECRET_ARN_VAR)})
        code_rc, lines = run_horovodrun(command, code, env)
    except EntrypointError as exc:
        print(f"mmp: {exc}", file=sys.stderr, flush=True)
        write_termination(termination, str(exc))
        return 2
    except Exception as exc:  # still leave the backend a reason
        print(f"mmp: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        write_termination(termination, f"launcher error: {type(exc).__name__}: {exc}")
        return 1
    if code_rc != 0:
        write_termination(termination, failure_summary(lines, code_rc))
        return code_rc
    target = environ.get("MMP_OUTPUT_S3")
    if target and output:
        try:
            copy_output(output, target)
        except Exception as exc:
            write_termination(termination, f"training succeeded but copying the output to {target} failed: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
