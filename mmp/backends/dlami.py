"""The `dlami` backend: a cluster of EC2 Deep Learning AMI instances on FSx, driven over SSH.

Every host runs the same training image as SageMaker (horovod_docker/: Python, torch,
Horovod, the repository's dependencies), started by user data on an AMI that ships
Docker and the NVIDIA container toolkit (the DLAMI Base OSS Nvidia driver AMIs):
`docker run --gpus all --network host -v /fsx:/fsx`, its sshd on a port of its own
(MMP_DLAMI_CONTAINER_SSH_PORT) for horovodrun between the hosts' containers. No AMI
Python is used. MMP's own commands reach the container through `docker exec`
(MMP_DLAMI_CONTAINER_EXEC; tests put a stand-in container runtime there).

Launch: the AMI comes from its public SSM parameter (or a configured AMI id); one
instance per RunInstances call from the stack's launch template, in its cluster
placement group and private subnet, tagged with the run, experiment and commit.
Each instance gets its own ed25519 host key through cloud-init user data, and that
key is the only one MMP accepts (never AutoAddPolicy). User data also mounts FSx
for Lustre on /fsx and schedules `shutdown -h +<max runtime>` with
InstanceInitiatedShutdownBehavior=terminate, so an instance dies even if MMP does.

Run: on the leader, unpack the commit's archive that Prepare staged in S3 (or, for a
run started outside the AWS pipeline, fetch the repository at the commit: the git host's
token travels on the SSH channel's stdin, never on a command line), hand the leader a
per-run cluster key for horovodrun's own SSH, then run, in the leader's container,
`horovodrun -np N -H localhost:s,ip2:s,… python -m mmp.runtime.rank train.py …` built by
mmp.contract.argv and quoted by mmp.backends.ssh, with the MLflow environment sent on stdin; each rank
reads the MLflow password from Secrets Manager with the instance's role (mmp.runtime.rank),
so it is on no command line. Output streams live;
the exit status decides the state. Every failure path terminates the instances.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mmp import aws
from mmp.contract.argv import horovodrun_argv, train_args
from mmp.contract.experiment import Experiment
from mmp.runtime.horovod import failure_summary
from mmp.runtime.rank import LAUNCHER, SECRET_ARN_VAR
from mmp.tracking.sigv4 import client_uri
from mmp.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, OutputTail, Paths
from mmp.backends.dlami_fsx import HOST_FAILED_MARKER, fsx_argv

log = logging.getLogger("mmp.dlami")

# Docker + NVIDIA container toolkit, no framework: the training image brings its own.
DEFAULT_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
CONTAINER_NAME = "mmp-train"
DEFAULT_CONTAINER_EXEC = ("sudo", "docker", "exec", "-i", CONTAINER_NAME)

# Tags every instance carries; `mmp janitor` finds strays by them.
TAG_MANAGED = "mmp:managed"
TAG_RUN = "mmp:run-id"
TAG_EXPERIMENT = "mmp:experiment"
TAG_COMMIT = "mmp:commit"
TAG_REPOSITORY = "mmp:repository"
TAG_MAX_RUNTIME = "mmp:max-runtime-minutes"
LIVE_STATES = ("pending", "running", "stopping", "stopped")

# The SSH private key's text itself, where the platform injects it (the runner task's
# `secrets`, filled by ECS from Secrets Manager); otherwise MMP reads it by ARN or SSM name.
SSH_KEY_VAR = "MMP_DLAMI_SSH_KEY"

# GPUs per instance type = horovodrun slots per host; DescribeInstanceTypes answers the rest.
GPU_SLOTS = {
    "p2.xlarge": 1, "p2.8xlarge": 8, "p2.16xlarge": 16,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.8xlarge": 1, "g4dn.16xlarge": 1,
    "g4dn.12xlarge": 4, "g4dn.metal": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1, "g6.16xlarge": 1,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
}

# Remote steps: fixed scripts, run as `sh -c SCRIPT NAME ARG…`, with every argument
# passed positionally and the whole list quoted by mmp.backends.ssh (mmp.contract.argv.shell_join).
FETCH_SCRIPT = r"""set -eu
IFS= read -r token || token=""
IFS= read -r username || username=""
GIT_TERMINAL_PROMPT=0
export GIT_TERMINAL_PROMPT
rm -rf "$3"
mkdir -p "$3"
cd "$3"
git init -q .
if [ -n "$token" ]; then
  MMP_GIT_TOKEN=$token
  MMP_GIT_USER=${username:-git}
  export MMP_GIT_TOKEN MMP_GIT_USER
  git -c credential.helper= -c 'credential.helper=!f() { test "$1" = get || exit 0; echo "username=$MMP_GIT_USER"; echo "password=$MMP_GIT_TOKEN"; }; f' fetch -q --depth 1 "$1" "$2"
else
  git fetch -q --depth 1 "$1" "$2"
fi
git -c advice.detachedHead=false checkout -q FETCH_HEAD
echo "fetched $2"
"""
CODE_SCRIPT = r"""set -eu
rm -rf "$3"
mkdir -p "$3"
"$1" s3 cp --only-show-errors "$2" - | tar -xz --strip-components=1 -C "$3"
test -f "$3/train.py" || { echo "train.py not found at the root of $2" >&2; exit 1; }
echo "unpacked $2"
"""
# User data, as root: log in to ECR, pull the image, run it with the GPUs, the host's
# network and /fsx; its sshd (the container's main process) listens on its own port and
# trusts only the run's cluster key. Arguments: image, sshd port, region.
CONTAINER_SCRIPT = r"""set -euo pipefail
image=$1 port=$2 region=$3
mountpoint -q /fsx || { echo "mmp: /fsx is not mounted; the training container does not start on the root disk" >&2; exit 1; }
for attempt in 1 2 3 4 5 6; do
  if aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "${image%%/*}"; then
    break
  fi
  [ "$attempt" -lt 6 ] || exit 1
  sleep 10
done
docker pull "$image"
nvidia-smi -L
docker run -d --name mmp-train --gpus all --network host --ipc host --ulimit memlock=-1   -v /fsx:/fsx -v /etc/mmp:/etc/mmp:ro --entrypoint /usr/sbin/sshd "$image"   -D -e -p "$port" -o AuthorizedKeysFile=/etc/mmp/authorized_keys -o PermitRootLogin=prohibit-password
"""
READY_SCRIPT = r"""set -eu
marker=$1
shift
i=0
until "$@" true 2>/dev/null; do
  if [ -s "$marker" ]; then cat "$marker" >&2; exit 1; fi
  i=$((i+1))
  [ "$i" -lt 300 ] || { echo "the training container did not start" >&2; exit 1; }
  sleep 2
done
"""
INSTALL_SCRIPT = r"""set -eu
cd "$1"
if [ -f requirements.txt ]; then
  exec "$2" -m pip install --quiet --disable-pip-version-check -r requirements.txt
elif [ -f setup.py ] || [ -f pyproject.toml ]; then
  exec "$2" -m pip install --quiet --disable-pip-version-check .
fi
echo "no requirements.txt or setup.py: nothing to install"
"""
KEY_SCRIPT = r"""set -eu
umask 077
mkdir -p "$(dirname "$1")"
cat > "$1"
"""
TRAIN_SCRIPT = r"""set -eu
while IFS= read -r line; do
  [ -n "$line" ] || break
  export "$line"
done
if [ -n "${MMP_PATH_PREFIX:-}" ]; then PATH="$MMP_PATH_PREFIX:$PATH"; export PATH; fi
cd "$1"
ps -o pgid= -p $$ | tr -d ' ' > "$2"
shift 2
exec "$@"
"""
KILL_SCRIPT = r"""# bash: dash's kill builtin takes no process-group argument
pgid=$(cat "$1" 2>/dev/null) || exit 0
[ -n "$pgid" ] || exit 0
kill -TERM -- "-$pgid" 2>/dev/null || exit 0
i=0
while [ $i -lt 20 ] && kill -0 -- "-$pgid" 2>/dev/null; do sleep 0.25; i=$((i+1)); done
kill -KILL -- "-$pgid" 2>/dev/null || true
"""
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class DlamiConfig:
    """Everything the backend reads from the environment (set by the Pulumi stack)."""

    ssm_parameter: str = DEFAULT_SSM_PARAMETER
    ami_id: str | None = None
    launch_template_id: str | None = None
    placement_group: str | None = None
    subnet_ids: tuple[str, ...] = ()
    ssh_key_secret_arn: str | None = None
    ssh_key_ssm_parameter: str | None = None
    ssh_private_key: str | None = field(default=None, repr=False)  # SSH_KEY_VAR: never in a repr or log
    ssh_user: str = "ubuntu"
    ssh_port: int = 22
    ssh_address: str = "private"  # or "public": which instance address MMP dials
    ssh_timeout: float = 600.0
    fsx_dns_name: str | None = None
    fsx_mount_name: str | None = None
    fsx_mount_point: str = "/fsx"
    artifacts_bucket: str | None = None
    dataset_root: str = "/fsx/datasets"
    output_root: str = "/fsx/output"
    work_root: str = "/fsx/mmp"
    python: str = "python"  # inside the training image
    horovodrun: str = "horovodrun"
    path_prefix: str = ""
    aws_cli: str = "aws"
    install_requirements: bool = False  # the image holds the dependencies
    watchdog_slack_minutes: int = 15
    image_repository_uri: str | None = None  # the training image's ECR repository (MMP_ECR_REPOSITORY_URI)
    container_exec: tuple[str, ...] = DEFAULT_CONTAINER_EXEC  # how MMP runs a command in the container
    container_ssh_port: int = 2222  # the container's sshd (host network), for horovodrun between hosts
    mlflow_username: str | None = None
    mlflow_password_secret_arn: str | None = None
    mlflow_tracking_server_arn: str | None = None  # SageMaker managed MLflow: ranks sign through the plugin
    region: str = field(default_factory=aws.region)  # the stack's: handed to the hosts and every rank

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DlamiConfig":
        env = os.environ if env is None else env
        get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731

        def number(name: str, default: float, kind: type = int) -> Any:
            raw = get(name)
            try:
                return kind(raw) if raw is not None else default
            except ValueError:
                raise BackendError(f"{name} must be a number, got {raw!r}") from None

        d = cls()
        return cls(
            ssm_parameter=get("MMP_DLAMI_SSM_PARAMETER") or d.ssm_parameter,
            ami_id=get("MMP_DLAMI_AMI_ID"),
            launch_template_id=get("MMP_LAUNCH_TEMPLATE_ID"),
            placement_group=get("MMP_PLACEMENT_GROUP"),
            subnet_ids=tuple(s.strip() for s in (get("MMP_SUBNET_IDS") or "").split(",") if s.strip()),
            ssh_key_secret_arn=get("MMP_SSH_KEY_SECRET_ARN"),
            ssh_key_ssm_parameter=get("MMP_SSH_KEY_SSM_PARAMETER"),
            ssh_private_key=get(SSH_KEY_VAR),
            ssh_user=get("MMP_SSH_USER") or d.ssh_user,
            ssh_port=number("MMP_SSH_PORT", d.ssh_port),
            ssh_address=get("MMP_DLAMI_SSH_ADDRESS") or d.ssh_address,
            ssh_timeout=number("MMP_DLAMI_SSH_TIMEOUT", d.ssh_timeout, float),
            fsx_dns_name=get("MMP_FSX_DNS_NAME"),
            fsx_mount_name=get("MMP_FSX_MOUNT_NAME"),
            fsx_mount_point=get("MMP_FSX_MOUNT_POINT") or d.fsx_mount_point,
            artifacts_bucket=get("MMP_ARTIFACTS_BUCKET"),
            dataset_root=get("MMP_DLAMI_DATASET_ROOT") or d.dataset_root,
            output_root=get("MMP_DLAMI_OUTPUT_ROOT") or d.output_root,
            work_root=get("MMP_DLAMI_WORK_ROOT") or d.work_root,
            python=get("MMP_DLAMI_PYTHON") or d.python,
            horovodrun=get("MMP_DLAMI_HOROVODRUN") or d.horovodrun,
            path_prefix=env.get("MMP_DLAMI_PATH", d.path_prefix),
            aws_cli=get("MMP_DLAMI_AWS_CLI") or d.aws_cli,
            install_requirements=_env_flag(env.get("MMP_DLAMI_INSTALL_REQUIREMENTS"), d.install_requirements),
            watchdog_slack_minutes=number("MMP_DLAMI_WATCHDOG_SLACK_MINUTES", d.watchdog_slack_minutes),
            image_repository_uri=get("MMP_ECR_REPOSITORY_URI"),
            container_exec=(tuple(shlex.split(env["MMP_DLAMI_CONTAINER_EXEC"]))
                            if "MMP_DLAMI_CONTAINER_EXEC" in env else d.container_exec),
            container_ssh_port=number("MMP_DLAMI_CONTAINER_SSH_PORT", d.container_ssh_port),
            mlflow_username=get("MMP_MLFLOW_USERNAME"),
            mlflow_password_secret_arn=get("MMP_MLFLOW_PASSWORD_SECRET_ARN"),
            mlflow_tracking_server_arn=get("MMP_MLFLOW_TRACKING_SERVER_ARN"),
            region=aws.region(env),
        )

    def problems(self) -> list[str]:
        """Missing settings, each naming its environment variable."""
        out = []
        if not self.launch_template_id:
            out.append("MMP_LAUNCH_TEMPLATE_ID is not set (the stack's launch template for training instances)")
        if not self.subnet_ids:
            out.append("MMP_SUBNET_IDS is not set (the private subnet the cluster runs in)")
        if not (self.ssh_private_key or self.ssh_key_secret_arn or self.ssh_key_ssm_parameter):
            out.append(f"{SSH_KEY_VAR} (the key), MMP_SSH_KEY_SECRET_ARN or MMP_SSH_KEY_SSM_PARAMETER "
                       "must give the SSH private key")
        if not (self.fsx_dns_name and self.fsx_mount_name):
            out.append("MMP_FSX_DNS_NAME and MMP_FSX_MOUNT_NAME must name the FSx for Lustre file system")
        if self.ssh_address not in ("private", "public"):
            out.append(f"MMP_DLAMI_SSH_ADDRESS must be 'private' or 'public', got {self.ssh_address!r}")
        if not self.image_repository_uri:
            out.append("MMP_ECR_REPOSITORY_URI is not set (the training image every host runs)")
        if self.container_ssh_port == self.ssh_port:
            out.append(f"MMP_DLAMI_CONTAINER_SSH_PORT must differ from MMP_SSH_PORT ({self.ssh_port}): "
                       "the host's sshd has that port")
        return out


@dataclass
class _Job:
    """What this process holds for one run: sessions, the training process, the tail of its output
    (bounded: the runner task has 512 MiB, and a run may print for days)."""

    run_id: str
    lines: OutputTail = field(default_factory=OutputTail)
    sessions: list[Any] = field(default_factory=list)
    process: Any = None
    cluster_key: str | None = None
    pid_file: str | None = None
    output: str | None = None
    cancelled: bool = False
    final: JobStatus | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sink(self, stream: str, line: str) -> None:
        self.lines.append(line)


class DlamiBackend(Backend):
    name = "dlami"
    poll_seconds = 1.0

    def __init__(
        self,
        config: DlamiConfig | None = None,
        *,
        clients: Callable[[str], Any] | None = None,
        ssh_address: Callable[[dict], tuple[str, int]] | None = None,
        host_keys: Callable[[], tuple[str, str]] | None = None,
        ssh_retry_seconds: float = 2.0,
    ):
        self.config = config or DlamiConfig.from_env()
        self._clients = clients or (lambda service: aws.client(service, self.config.region))
        if ssh_address is not None:
            self.ssh_address = ssh_address  # the one seam tests point at 127.0.0.1:PORT
        self._host_keys = host_keys
        self.ssh_retry_seconds = ssh_retry_seconds
        self._jobs: dict[str, _Job] = {}

    # -- seams -------------------------------------------------------------------
    def ssh_address(self, instance: dict) -> tuple[str, int]:
        """Where MMP dials an instance: its private (default) or public IP, port 22."""
        key = "PublicIpAddress" if self.config.ssh_address == "public" else "PrivateIpAddress"
        address = instance.get(key)
        if not address:
            raise BackendError(f"instance {instance.get('InstanceId')} has no {key}")
        return address, self.config.ssh_port

    def new_host_key(self) -> tuple[str, str]:
        """(private key text, public key line) installed on one instance through user data."""
        if self._host_keys is not None:
            return self._host_keys()
        from mmp.backends.ssh import generate_ed25519

        return generate_ed25519()

    # -- plan --------------------------------------------------------------------
    def paths(self, request: LaunchRequest) -> Paths:
        """The dataset where the catalogue puts it inside FSx (a shared one has its own
        association), else under the dataset root; the output under the output root."""
        fsx = getattr(request.dataset, "fsx", None)
        return Paths(
            dataset=(f"{self.config.fsx_mount_point.rstrip('/')}{fsx}" if fsx
                     else f"{self.config.dataset_root.rstrip('/')}/{request.dataset.name}"),
            output=f"{self.config.output_root.rstrip('/')}/{request.experiment_name}/{request.run_id}",
        )

    def run_dir(self, request: LaunchRequest) -> str:
        return f"{self.config.work_root.rstrip('/')}/{request.experiment_name}/{request.run_id}"

    def check(self, experiment: Experiment, dataset: Any) -> list[str]:
        problems = []
        itype = experiment.training_instance
        if itype.startswith("ml."):
            problems.append(
                f"Training_Instance: {itype!r} is a SageMaker type; dlami takes an EC2 type such as "
                f"{itype[3:]!r} (p3.2xlarge, p3.8xlarge, p4d.24xlarge, g5.12xlarge, ...)"
            )
        elif "." not in itype:
            problems.append(f"Training_Instance: {itype!r} is not an EC2 instance type (e.g. p3.8xlarge)")
        problems += [f"Platform: dlami: {p}" for p in self.config.problems()]
        return problems

    def watchdog_minutes(self, experiment: Experiment) -> int:
        return experiment.runtime_minutes + self.config.watchdog_slack_minutes

    def image(self, request: LaunchRequest) -> str:
        """The training image: Prepare's dependency-set tag, else the commit's (as SageMaker)."""
        from mmp.backends.sagemaker import image_uri

        return image_uri(self.config.image_repository_uri or "", request.image_tag or request.commit)

    def user_data(self, host_key: tuple[str, str], authorized: list[str], watchdog_minutes: int, *,
                  image: str, cluster_public: str) -> str:
        """cloud-config: pinned host key, authorized keys, watchdog, FSx (client, mount, the run
        area for the SSH user: mmp.backends.dlami_fsx), then the training container (its sshd
        trusts only the run's cluster key). cloud-init runs every `runcmd` entry even after one
        fails, so the container step itself refuses an unmounted /fsx."""
        import yaml

        cfg = self.config
        doc = {
            "ssh_deletekeys": True,
            "ssh_genkeytypes": [],
            "ssh_keys": {"ed25519_private": host_key[0], "ed25519_public": host_key[1]},
            "ssh_authorized_keys": authorized,
            "write_files": [{"path": "/etc/mmp/authorized_keys", "permissions": "0644",
                             "content": cluster_public + "\n"}],
            "runcmd": [
                ["shutdown", "-h", f"+{int(watchdog_minutes)}"],
                fsx_argv(cfg.fsx_dns_name or "", cfg.fsx_mount_name or "", cfg.fsx_mount_point, cfg.ssh_user,
                         [cfg.work_root, cfg.output_root]),
                ["bash", "-c", CONTAINER_SCRIPT, "mmp-container", image, str(cfg.container_ssh_port), cfg.region],
            ],
        }
        return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)

    def image_id(self) -> str:
        if self.config.ami_id:
            return self.config.ami_id
        try:
            return self._clients("ssm").get_parameter(Name=self.config.ssm_parameter)["Parameter"]["Value"]
        except Exception as exc:
            raise BackendError(f"could not read the DLAMI image from SSM {self.config.ssm_parameter}: {exc}") from None

    def slots(self, instance_type: str, ec2: Any = None) -> int:
        """GPUs of an instance type (horovodrun slots per host); 1 for CPU-only types."""
        if instance_type in GPU_SLOTS:
            return GPU_SLOTS[instance_type]
        ec2 = ec2 or self._clients("ec2")
        try:
            found = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
        except Exception as exc:
            raise BackendError(f"Training_Instance: {instance_type!r} is not a known EC2 instance type ({exc})") from None
        if not found:
            raise BackendError(f"Training_Instance: {instance_type!r} is not a known EC2 instance type")
        gpus = (found[0].get("GpuInfo") or {}).get("Gpus") or []
        return sum(int(g.get("Count", 0)) for g in gpus) or 1

    def verify_placement_group(self, ec2: Any) -> None:
        name = self.config.placement_group
        try:
            groups = ec2.describe_placement_groups(GroupNames=[name])["PlacementGroups"]
        except Exception as exc:
            raise BackendError(f"MMP_PLACEMENT_GROUP {name!r}: cannot be read ({exc})") from None
        if not groups:
            raise BackendError(f"MMP_PLACEMENT_GROUP {name!r} does not exist")
        group = groups[0]
        if group.get("Strategy") != "cluster":
            raise BackendError(f"MMP_PLACEMENT_GROUP {name!r} has strategy {group.get('Strategy')!r}; want 'cluster'")
        if group.get("State") not in (None, "available"):
            raise BackendError(f"MMP_PLACEMENT_GROUP {name!r} is {group.get('State')}, not available")

    def _private_key(self) -> Any:
        """The key as a paramiko object, built in memory: from SSH_KEY_VAR when the platform
        injected it (the runner task), else read by ARN or SSM name (`mmp run` on a workstation)."""
        from mmp.backends.ssh import load_private_key

        cfg = self.config
        if cfg.ssh_private_key:
            return load_private_key(cfg.ssh_private_key)
        try:
            if cfg.ssh_key_secret_arn:
                text = aws.secret(cfg.ssh_key_secret_arn)
            else:
                text = self._clients("ssm").get_parameter(Name=cfg.ssh_key_ssm_parameter, WithDecryption=True)[
                    "Parameter"]["Value"]
        except Exception as exc:
            raise BackendError(f"could not read the SSH private key: {type(exc).__name__}") from None
        return load_private_key(text)

    def _git_credentials(self, request: LaunchRequest) -> str:
        """The fetch script's stdin: the host's token, then the user name git sends with it (mmp.hosts)."""
        from mmp.hosts.base import get_host

        host = get_host(request.host)
        try:
            credentials = host.git_credentials()
        except Exception as exc:
            raise BackendError(f"could not read the {host.title} token: {type(exc).__name__}") from None
        username, token = credentials or ("", "")
        return f"{token.strip()}\n{username}\n"

    # -- launch ------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> JobHandle:
        problems = self.check(request.experiment, request.dataset)
        if problems:
            raise BackendError("; ".join(problems))
        job = _Job(run_id=request.run_id)
        self._jobs[request.run_id] = job
        handle = JobHandle(platform=self.name, job_id=request.run_id, data={
            "region": self.config.region, "instance_ids": [], "host_keys": {}, "hosts": [],
            "paths": dict(vars(self.paths(request))), "started": time.time(),
        })
        started = False
        try:
            instances = self._provision(request, job, handle)
            self._connect(job, handle, instances)
            self._prepare(request, job)
            self._start(request, job, handle, instances)
            started = True
            return handle
        finally:
            if not started:  # launch error, SSH failure, setup failure, Ctrl-C: nothing survives
                job.final = JobStatus(JobState.FAILED, "launch failed")
                try:
                    self.teardown(handle)
                except Exception as exc:  # keep the launch error; say loudly what may be left
                    log.error("teardown after a failed launch of %s failed: %s", request.run_id, exc)

    def _provision(self, request: LaunchRequest, job: _Job, handle: JobHandle) -> list[dict]:
        from mmp.backends.ssh import generate_ed25519, public_key_line

        cfg, exp = self.config, request.experiment
        ec2 = self._clients("ec2")
        image = self.image_id()
        if cfg.placement_group:
            self.verify_placement_group(ec2)
        slots = exp.processes_per_host or self.slots(exp.training_instance, ec2)
        handle.data["slots"] = slots
        job.cluster_key, cluster_public = generate_ed25519()
        mmp_public = public_key_line(self._private_key())
        watchdog = self.watchdog_minutes(exp)
        image_ref = self.image(request)
        handle.data["image"] = image_ref
        tags = [
            {"Key": "Name", "Value": f"mmp-{request.experiment_name}-{request.run_id[:8]}"[:255]},
            {"Key": TAG_MANAGED, "Value": "true"},
            {"Key": TAG_RUN, "Value": request.run_id},
            {"Key": TAG_EXPERIMENT, "Value": request.experiment_name},
            {"Key": TAG_COMMIT, "Value": request.commit},
            {"Key": TAG_REPOSITORY, "Value": request.repository[:255]},
            {"Key": TAG_MAX_RUNTIME, "Value": str(watchdog)},
        ]
        nonce = secrets.token_hex(4)
        for index in range(exp.instance_count):
            host_key = self.new_host_key()
            params: dict[str, Any] = dict(
                ImageId=image, InstanceType=exp.training_instance, MinCount=1, MaxCount=1,
                SubnetId=cfg.subnet_ids[0],
                LaunchTemplate={"LaunchTemplateId": cfg.launch_template_id, "Version": "$Default"},
                UserData=self.user_data(host_key, [mmp_public], watchdog, image=image_ref,
                                        cluster_public=cluster_public),
                InstanceInitiatedShutdownBehavior="terminate",
                TagSpecifications=[{"ResourceType": t, "Tags": tags} for t in ("instance", "volume")],
                ClientToken=f"{request.run_id[:40]}-{nonce}-{index}",  # retried calls launch once
            )
            if cfg.placement_group:
                params["Placement"] = {"GroupName": cfg.placement_group}
            try:
                instance_id = ec2.run_instances(**params)["Instances"][0]["InstanceId"]
            except Exception as exc:
                raise BackendError(
                    f"launching instance {index + 1} of {exp.instance_count} ({exp.training_instance}) failed: {exc}"
                ) from None
            handle.data["instance_ids"].append(instance_id)
            handle.data["host_keys"][instance_id] = host_key[1]
        ids = handle.data["instance_ids"]
        try:
            ec2.get_waiter("instance_running").wait(
                InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": max(1, int(cfg.ssh_timeout // 5))})
        except Exception as exc:
            raise BackendError(f"instances {', '.join(ids)} did not reach running: {exc}") from None
        found = {
            i["InstanceId"]: i
            for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]
        }
        return [found[i] for i in ids]

    def _connect(self, job: _Job, handle: JobHandle, instances: list[dict]) -> None:
        from mmp.backends.ssh import Session, SshError, connect_when_ready

        cfg = self.config
        pkey = self._private_key()
        deadline = time.time() + cfg.ssh_timeout
        for instance in instances:
            host, port = self.ssh_address(instance)
            pinned = [handle.data["host_keys"][instance["InstanceId"]]]

            def make(host=host, port=port, pinned=pinned) -> Session:
                return Session(host, port, cfg.ssh_user, pkey, pinned,
                               timeout=max(0.5, min(10.0, deadline - time.time())))

            try:
                job.sessions.append(connect_when_ready(make, deadline=deadline, interval=self.ssh_retry_seconds))
            except SshError as exc:
                raise BackendError(f"SSH to {instance['InstanceId']} failed: {exc}") from None
            handle.data["hosts"].append({"instance_id": instance["InstanceId"],
                                         "private_ip": instance.get("PrivateIpAddress"), "ssh": [host, port]})

    def _remote(self, job: _Job, session: Any, argv: list[str], what: str, *, stdin: str | None = None,
                timeout: float | None = 3600) -> None:
        job.lines.append(f"[mmp] {what} on {session.host}")
        code, lines = session.run(argv, stdin=stdin, on_output=job.sink, timeout=timeout)
        if code != 0:
            tail = " | ".join(lines[-5:])
            raise BackendError(f"{what} failed on {session.host} (exit {code})" + (f": {tail[:500]}" if tail else ""))

    def in_container(self, argv: list[str]) -> list[str]:
        """`argv` as run inside the host's training container (MMP_DLAMI_CONTAINER_EXEC)."""
        return [*self.config.container_exec, *argv]

    def _prepare(self, request: LaunchRequest, job: _Job) -> None:
        cfg = self.config
        leader = job.sessions[0]
        run_dir, paths = self.run_dir(request), self.paths(request)
        code = f"{run_dir}/code"
        if cfg.container_exec:  # user data pulls and starts it; wait until every host's runs
            argv = ["sh", "-c", READY_SCRIPT, "mmp-ready", HOST_FAILED_MARKER, *self.in_container([])]
            with ThreadPoolExecutor(max_workers=len(job.sessions)) as pool:
                for future in [pool.submit(self._remote, job, s, argv, "wait for the training container",
                                           timeout=900) for s in job.sessions]:
                    future.result()
        self._remote(job, leader, ["mkdir", "-p", run_dir, paths.output], "create the run folders")
        if request.code_uri:  # staged by Prepare: the tree at the commit, no access to the git host needed
            self._remote(job, leader, ["sh", "-c", CODE_SCRIPT, "mmp-code", cfg.aws_cli, request.code_uri, code],
                         f"unpack {request.repository}@{request.short_commit}")
        else:
            self._remote(job, leader, ["sh", "-c", FETCH_SCRIPT, "mmp-fetch", request.clone_url, request.commit,
                                       code],
                         f"fetch {request.repository}@{request.short_commit}", stdin=self._git_credentials(request))
        if cfg.install_requirements:
            argv = self.in_container(["sh", "-c", INSTALL_SCRIPT, "mmp-install", code, cfg.python])
            with ThreadPoolExecutor(max_workers=len(job.sessions)) as pool:
                for future in [pool.submit(self._remote, job, s, argv, "install requirements") for s in job.sessions]:
                    future.result()
        self._remote(job, leader, ["sh", "-c", KEY_SCRIPT, "mmp-key", f"{run_dir}/.ssh/cluster_key"],
                     "install the cluster key", stdin=job.cluster_key)

    def _start(self, request: LaunchRequest, job: _Job, handle: JobHandle, instances: list[dict]) -> None:
        cfg, exp = self.config, request.experiment
        run_dir, paths = self.run_dir(request), self.paths(request)
        slots = handle.data["slots"]
        hosts = [("localhost", slots)] + [(i["PrivateIpAddress"], slots) for i in instances[1:]]
        argv = horovodrun_argv(
            hosts, train_args(paths.dataset, paths.output, exp.dataset_name, exp.hyperparameters),
            python=cfg.python, horovodrun=cfg.horovodrun, launcher=LAUNCHER,
            extra=["--ssh-identity-file", f"{run_dir}/.ssh/cluster_key", "-p", str(cfg.container_ssh_port)],
        )
        # The region travels with the run: a rank's boto3 (its MLflow password, the sagemaker-mlflow
        # plugin) otherwise falls back to us-east-1 in a container started with no region set.
        env = {**aws.region_env(cfg.region), **request.mlflow_env, "MMP_RUN_ID": request.run_id,
               "PYTHONUNBUFFERED": "1", "MMP_PATH_PREFIX": cfg.path_prefix}
        if "MLFLOW_TRACKING_URI" in env:  # the image's sagemaker-mlflow plugin signs with the hosts' role
            env["MLFLOW_TRACKING_URI"] = client_uri(env["MLFLOW_TRACKING_URI"], cfg.mlflow_tracking_server_arn)
        if cfg.mlflow_username:
            env["MLFLOW_TRACKING_USERNAME"] = cfg.mlflow_username
        if cfg.mlflow_password_secret_arn:  # each rank reads the value itself (mmp.runtime.rank)
            env[SECRET_ARN_VAR] = cfg.mlflow_password_secret_arn
        for key, value in env.items():
            if not _ENV_KEY.fullmatch(key) or "\n" in str(value) or "\r" in str(value):
                raise BackendError(f"environment variable {key!r} cannot be sent to the hosts (name or newline)")
        stdin = "".join(f"{k}={v}\n" for k, v in env.items()) + "\n"
        job.pid_file = f"{run_dir}/horovodrun.pgid"
        job.output = paths.output
        handle.data.update(argv=argv, run_dir=run_dir, pid_file=job.pid_file)
        job.lines.append(f"[mmp] starting {exp.instance_count} host(s) x {slots} slot(s)")
        job.process = job.sessions[0].start(self.in_container(
            ["sh", "-c", TRAIN_SCRIPT, "mmp-train", f"{run_dir}/code", job.pid_file, *argv]),
            stdin=stdin, on_output=job.sink)

    # -- following -----------------------------------------------------------------
    def status(self, handle: JobHandle) -> JobStatus:
        job = self._jobs.get(handle.job_id)
        if job is None:
            return self._status_from_ec2(handle)
        with job.lock:
            if job.final is not None:
                return job.final
            if job.cancelled:
                job.final = JobStatus(JobState.CANCELLED, "cancelled", None)
                return job.final
            proc = job.process
            if proc is None:
                return JobStatus(JobState.PENDING, "provisioning")
            if not proc.done.is_set():
                return JobStatus(JobState.RUNNING, "training")
            code = proc.exit_code
            if proc.error:
                job.final = JobStatus(JobState.FAILED, f"lost the SSH connection to the leader: {proc.error}", code)
            elif code == 0:
                job.final = self._copy_output(job, handle) or JobStatus(JobState.SUCCEEDED, "horovodrun exited 0", 0)
            else:
                job.final = JobStatus(JobState.FAILED, failure_summary(job.lines.lines(), code), code)
            return job.final

    def _copy_output(self, job: _Job, handle: JobHandle) -> JobStatus | None:
        """`aws s3 sync` the output to MMP_ARTIFACTS_BUCKET; a FAILED status if that fails."""
        bucket = self.config.artifacts_bucket
        if not bucket or not job.sessions:
            return None
        experiment_run = "/".join(handle.data["paths"]["output"].rstrip("/").split("/")[-2:])
        target = f"s3://{bucket}/output/{experiment_run}/"
        try:
            self._remote(job, job.sessions[0], [self.config.aws_cli, "s3", "sync", "--only-show-errors",
                                                job.output, target], f"copy the output to {target}")
        except Exception as exc:
            return JobStatus(JobState.FAILED, f"training succeeded but {exc}", 0)
        handle.data["output_s3"] = target
        return None

    def _status_from_ec2(self, handle: JobHandle) -> JobStatus:
        """Another process launched it: all we can see is whether its instances live."""
        ids = handle.data.get("instance_ids") or []
        if not ids:
            return JobStatus(JobState.FAILED, "no instances recorded for this run")
        live = [i for i in self._describe(ids) if i["State"]["Name"] in LIVE_STATES]
        if live:
            return JobStatus(JobState.RUNNING, f"{len(live)} instance(s) up; followed by the launching process")
        return JobStatus(JobState.FAILED, "the instances are gone and this process did not follow the run")

    def logs(self, handle: JobHandle, cursor: Any = None) -> tuple[list[str], Any]:
        job = self._jobs.get(handle.job_id)
        offset = int(cursor or 0)
        if job is None:
            return [], offset
        return job.lines.since(offset)

    def cancel(self, handle: JobHandle) -> None:
        """Stop horovodrun's process group on the leader, then terminate the instances."""
        job = self._jobs.get(handle.job_id)
        if job is not None:
            job.cancelled = True
            self._stop_training(job)
        self._terminate(handle)

    def _stop_training(self, job: _Job) -> None:
        """SIGTERM, then SIGKILL, horovodrun's process group on the leader."""
        if job.process is None or job.process.done.is_set() or not job.sessions or not job.pid_file:
            return
        try:
            job.sessions[0].run(self.in_container(["bash", "-c", KILL_SCRIPT, "mmp-kill", job.pid_file]), timeout=30)
        except Exception as exc:  # the instances go anyway
            log.warning("could not stop training on the leader: %s", exc)
        job.process.wait(10)

    def teardown(self, handle: JobHandle) -> None:
        job = self._jobs.get(handle.job_id)
        if job is not None:
            self._stop_training(job)  # only if still running (an error while following it)
            if job.process is not None and not job.process.done.is_set():
                job.process.close()
            for session in job.sessions:
                session.close()
            job.sessions = []
        self._terminate(handle)

    # -- EC2 -------------------------------------------------------------------------
    def _describe(self, ids: list[str] | None = None, run_id: str | None = None) -> list[dict]:
        ec2 = self._clients("ec2")
        kwargs: dict[str, Any] = {}
        if ids:
            kwargs["InstanceIds"] = ids
        if run_id:
            kwargs["Filters"] = [{"Name": f"tag:{TAG_RUN}", "Values": [run_id]},
                                 {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
        out = []
        for page in ec2.get_paginator("describe_instances").paginate(**kwargs):
            for reservation in page["Reservations"]:
                out += reservation["Instances"]
        return out

    def _terminate(self, handle: JobHandle) -> list[str]:
        """Terminate the run's instances: those recorded plus any tagged with its run id."""
        ids = list(handle.data.get("instance_ids") or [])
        try:
            ids += [i["InstanceId"] for i in self._describe(run_id=handle.job_id) if i["InstanceId"] not in ids]
        except Exception as exc:
            log.warning("could not list instances tagged %s=%s: %s", TAG_RUN, handle.job_id, exc)
        if not ids:
            return []
        try:
            self._clients("ec2").terminate_instances(InstanceIds=ids)
        except Exception as exc:
            raise BackendError(f"could not terminate {', '.join(ids)}: {exc}") from None
        handle.data["terminated"] = ids
        return ids
