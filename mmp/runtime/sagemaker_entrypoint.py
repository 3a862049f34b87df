"""The training image's `train` entrypoint: SageMaker's /opt/ml contract → horovodrun.

SageMaker starts the same container on every host and runs `train`. This module
reads /opt/ml/input/config/{resourceconfig,hyperparameters,inputdataconfig}.json,
unpacks the commit's code from the `mmp-code` channel (the archive Prepare staged; the
image holds only the dependencies) into /opt/ml/code, builds train.py's argv with
mmp.contract.argv (dataset `/opt/ml/input/data/<dataset>`, output `/opt/ml/model`), then:

* one host: `horovodrun -np <procs>` here;
* several hosts: the leader (first host in sorted order) starts sshd, waits until
  every peer answers on SSH and runs `horovodrun -np <total> -H algo-1:p,…`; the
  others start sshd and stay up until the leader is gone.

On any error it writes the reason to /opt/ml/output/failure (SageMaker's
FailureReason) and exits with the training status. `MMP_SM_ROOT` replaces /opt/ml
so tests run it anywhere. Stdlib + mmp.contract.argv; boto3 only to check the MLflow password
secret is readable (each rank reads it itself, mmp.runtime.rank).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from mmp.contract.argv import horovodrun_argv, restore_booleans, train_args
from mmp.runtime.cluster import (EntrypointError, announce, require_horovodrun, run_streamed,  # noqa: F401
                                 ssh_answers, unpack_archive, wait_for_leader, wait_for_ssh, without_password)
from mmp.runtime.horovod import failure_summary
from mmp.contract.image import CODE_CHANNEL
from mmp.runtime.rank import LAUNCHER

DEFAULT_ROOT = "/opt/ml"
FAILURE_LIMIT = 1024  # SageMaker keeps the first 1024 characters as FailureReason
RESERVED_PREFIXES = ("sagemaker_", "_")  # what the SageMaker SDK and tuning jobs inject


@dataclass
class JobConfig:
    root: Path
    current_host: str
    hosts: list[str]
    hyperparameters: dict[str, str]
    channels: dict[str, dict]
    network_interface: str | None = None


@dataclass
class Plan:
    """What this host does: `single` or `leader` run `argv`; a `worker` serves SSH."""

    role: str
    current_host: str
    hosts: list[str]
    leader: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added for train.py (no secrets)
    cwd: str = "."


def sm_root(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("MMP_SM_ROOT") or DEFAULT_ROOT)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EntrypointError(f"{path} is missing: is this running as a SageMaker training job?") from None
    except ValueError as exc:
        raise EntrypointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EntrypointError(f"{path} must hold a JSON object")
    return data


def read_config(root: Path) -> JobConfig:
    folder = root / "input" / "config"
    resources = _read_json(folder / "resourceconfig.json")
    hosts = resources.get("hosts") or []
    current = resources.get("current_host")
    if not hosts or current not in hosts:
        raise EntrypointError(f"{folder / 'resourceconfig.json'}: current_host {current!r} is not in hosts {hosts}")
    hps_path = folder / "hyperparameters.json"
    hyperparameters = _read_json(hps_path) if hps_path.exists() else {}
    return JobConfig(root=root, current_host=current, hosts=list(hosts),
                     hyperparameters={str(k): str(v) for k, v in hyperparameters.items()},
                     channels=_read_json(folder / "inputdataconfig.json"),
                     network_interface=resources.get("network_interface_name"))


def natural_key(host: str) -> list:
    """algo-2 before algo-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", host)]


def decode_value(raw: str) -> str:
    """SageMaker's SDK JSON-encodes values ('"us-west-2"'); boto3 callers send them plain
    ('0.001'). Only a JSON string is decoded, so '1e-3' and 'true' stay as written."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


def user_hyperparameters(raw: Mapping[str, str], order: str | None) -> dict[str, str]:
    """The experiment's hyperparameters, in the file's order when the backend passed it
    (MMP_HYPERPARAMETER_ORDER), else every key SageMaker tooling did not inject."""
    if order:
        names = [n for n in order.split(",") if n]
        missing = [n for n in names if n not in raw]
        if missing:
            raise EntrypointError(f"hyperparameters.json lacks {', '.join(missing)} (MMP_HYPERPARAMETER_ORDER)")
    else:
        names = [n for n in raw if not n.startswith(RESERVED_PREFIXES)]
    return {name: decode_value(raw[name]) for name in names}


def pick_dataset(channels: Mapping[str, dict], environ: Mapping[str, str]) -> str:
    channels = {name: c for name, c in channels.items() if name != CODE_CHANNEL}
    wanted = environ.get("MMP_DATASET")
    if wanted:
        if wanted not in channels:
            raise EntrypointError(f"dataset channel {wanted!r} is not in inputdataconfig.json ({', '.join(channels)})")
        return wanted
    if len(channels) != 1:
        raise EntrypointError(f"inputdataconfig.json has channels {', '.join(channels) or 'none'}; "
                              "set MMP_DATASET to the one train.py reads")
    return next(iter(channels))


def unpack_code(archive_dir: Path, dest: Path) -> Path:
    """Unpack the one archive in `archive_dir` into `dest` (see unpack_archive)."""
    archives = sorted(p for p in archive_dir.iterdir() if p.is_file()) if archive_dir.is_dir() else []
    if len(archives) != 1:
        raise EntrypointError(f"channel {CODE_CHANNEL} must hold one code archive, found {len(archives)}")
    return unpack_archive(archives[0], dest)


def code_dir(root: Path, channels: Mapping[str, dict], environ: Mapping[str, str]) -> str:
    """Where train.py runs: the unpacked `mmp-code` channel, else MMP_CODE_DIR, else here."""
    if CODE_CHANNEL in channels:
        return str(unpack_code(root / "input" / "data" / CODE_CHANNEL, root / "code"))
    return environ.get("MMP_CODE_DIR") or os.getcwd()


def gpu_count() -> int:
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


def processes_per_host(environ: Mapping[str, str]) -> int:
    """Processes_Per_Host from the experiment, else one per GPU, else one."""
    raw = environ.get("MMP_PROCESSES_PER_HOST")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise EntrypointError(f"MMP_PROCESSES_PER_HOST must be a whole number ≥ 1, got {raw!r}")
        return int(raw)
    return max(gpu_count(), 1)


def build_plan(environ: Mapping[str, str] = os.environ, *, horovodrun: str | None = None,
               python: str | None = None) -> Plan:
    """Everything this host will do, decided from the config files and environment alone."""
    root = sm_root(environ)
    cfg = read_config(root)
    dataset = pick_dataset(cfg.channels, environ)
    hyperparameters = restore_booleans(user_hyperparameters(cfg.hyperparameters, environ.get("MMP_HYPERPARAMETER_ORDER")),
                                       environ.get("MMP_BOOLEAN_HYPERPARAMETERS"))
    args = train_args(str(root / "input" / "data" / dataset), str(root / "model"), dataset, hyperparameters)
    procs = processes_per_host(environ)
    hosts = sorted(cfg.hosts, key=natural_key)
    leader = hosts[0]
    env = {"PYTHONUNBUFFERED": "1"}
    checkpoints = environ.get("MMP_CHECKPOINT_DIR") or (
        str(root / "checkpoints") if (root / "checkpoints").is_dir() else None)
    if checkpoints:
        env["MMP_CHECKPOINT_DIR"] = checkpoints
    cwd = code_dir(root, cfg.channels, environ)
    plan = Plan(role="single" if len(hosts) == 1 else ("leader" if cfg.current_host == leader else "worker"),
                current_host=cfg.current_host, hosts=hosts, leader=leader, env=env, cwd=cwd)
    if plan.role == "worker":
        return plan
    runner = horovodrun or require_horovodrun()
    interpreter = python or sys.executable
    if plan.role == "single":
        plan.argv = horovodrun_argv([("localhost", procs)], args, python=interpreter, horovodrun=runner,
                                    launcher=LAUNCHER)
    else:
        extra: list[str] = []
        if cfg.network_interface:
            extra += ["--network-interface", cfg.network_interface]
        if environ.get("MMP_SSH_PORT"):
            extra += ["-p", environ["MMP_SSH_PORT"]]
        plan.argv = horovodrun_argv([(host, procs) for host in hosts], args, python=interpreter,
                                    horovodrun=runner, extra=extra, launcher=LAUNCHER)
    return plan


# -- SSH between hosts (the waits live in mmp.runtime.cluster) ----------------------------
def start_sshd(environ: Mapping[str, str]) -> None:
    command = environ.get("MMP_SSHD", "/usr/sbin/sshd")
    if not Path(command).exists():
        raise EntrypointError(f"{command} not found: multi-host training needs openssh-server in the image")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    subprocess.run([command], check=True)  # daemonises; -D is not used on purpose


# -- running ------------------------------------------------------------------------
def child_env(plan: Plan, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment horovodrun (and so every rank) gets: the plan's on top, never the password."""
    return without_password({**environ, **plan.env})


def run_training(plan: Plan, env: Mapping[str, str], log_path: Path) -> int:
    """Run horovodrun, streaming its output to stdout (CloudWatch) and to `log_path`."""
    announce(plan.argv, f"{plan.role} on {plan.current_host}: ")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return run_streamed(plan.argv, plan.cwd, env, log=log)[0]


def write_failure(root: Path, reason: str) -> None:
    path = root / "output" / "failure"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason[:FAILURE_LIMIT])


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run this host's part of the job; return the exit status the container ends with."""
    environ = dict(os.environ if environ is None else environ)
    root = sm_root(environ)
    port = int(environ.get("MMP_SSH_PORT") or 22)
    ssh_timeout = float(environ.get("MMP_SSH_WAIT_SECONDS") or 600)
    try:
        plan = build_plan(environ)
        if plan.role != "single":
            start_sshd(environ)
        if plan.role == "worker":
            print(f"mmp: worker {plan.current_host} serving SSH until {plan.leader} finishes", flush=True)
            wait_for_leader(plan.leader, port=port, start_timeout=ssh_timeout)
            return 0
        if plan.role == "leader":
            wait_for_ssh([h for h in plan.hosts if h != plan.current_host], port=port, timeout=ssh_timeout)
        env = child_env(plan, environ)
        log_path = root / "output" / "data" / "train.log"
        code = run_training(plan, env, log_path)
    except EntrypointError as exc:
        print(f"mmp: {exc}", file=sys.stderr, flush=True)
        write_failure(root, str(exc))
        return 2
    except Exception as exc:  # anything else still leaves SageMaker a reason
        print(f"mmp: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        write_failure(root, f"entrypoint error: {type(exc).__name__}: {exc}")
        return 1
    if code != 0:
        write_failure(root, failure_summary(log_path.read_text(errors="replace").splitlines(), code))
    return code


if __name__ == "__main__":  # pragma: no cover - the image runs horovod_docker/train
    sys.exit(main())
