"""Fixtures for the dlami backend: a real sshd on 127.0.0.1, and moto in server mode.

The sshd stands in for the EC2 instances: every instance's SSH address resolves to
it, and the host key the backend "installs through user data" is the sshd's own, so
the pinning is real. moto (ThreadedMotoServer) answers EC2, SSM and Secrets
Manager over HTTP through AWS_ENDPOINT_URL; placement groups, which moto lacks,
are answered by a botocore Stubber.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmp.backends.dlami import DEFAULT_SSM_PARAMETER

from ..conftest import ACCOUNT, REGION, free_port, iam_pythonpath

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MOTO_AMI = "ami-12c6146b"
ECR_URI = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mmp-training"
CONTAINER_STANDIN = Path(__file__).resolve().parent / "bin" / "docker"


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


@dataclass
class Sshd:
    host: str
    port: int
    user: str
    host_private: str
    host_public: str
    client_private: str
    client_public: str
    log: Path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory, iam_state_path) -> Sshd:
    """A real OpenSSH server on 127.0.0.1 with its own host key and authorized key."""
    from mmp.backends.ssh import generate_ed25519

    exe = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(exe):
        pytest.fail("sshd is missing: apt-get install -y openssh-server (CI's .ci/run does)")
    folder = tmp_path_factory.mktemp("sshd")
    host_private, host_public = generate_ed25519()
    client_private, client_public = generate_ed25519()
    (folder / "host_key").write_text(host_private)
    (folder / "host_key").chmod(0o600)
    (folder / "authorized_keys").write_text(client_public + "\n")
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {folder / 'authorized_keys'}
StrictModes no
UsePAM no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxSessions 64
MaxStartups 64
PrintMotd no
LogLevel ERROR
SetEnv PYTHONPATH={iam_pythonpath(str(ROOT))} MMP_IAM_STATE={iam_state_path}
""")
    os.makedirs("/run/sshd", exist_ok=True)
    log = folder / "sshd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([exe, "-D", "-e", "-f", str(config)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, "sshd")
        yield Sshd("127.0.0.1", port, getpass.getuser(), host_private, host_public, client_private,
                   client_public, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class PlacementStub:
    """An EC2 client on moto whose describe_placement_groups goes to a botocore Stubber
    (moto has no placement groups). Every other call is moto's."""

    def __init__(self, real: Any, groups: list[dict], launched: list[dict] | None = None):
        import boto3
        from botocore.stub import Stubber

        self._real = real
        self.stubbed = boto3.client("ec2", region_name=REGION)
        self.stubber = Stubber(self.stubbed)
        self.groups = groups
        self.launched = launched if launched is not None else []
        self.stubber.activate()

    def run_instances(self, **kwargs):
        self.launched.append(kwargs)
        return self._real.run_instances(**kwargs)

    def describe_placement_groups(self, **kwargs):
        self.stubber.add_response("describe_placement_groups", {"PlacementGroups": self.groups}, kwargs)
        return self.stubbed.describe_placement_groups(**kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@dataclass
class Cloud:
    """The AWS side of one test: subnet, launch template, image parameter, SSH key secret."""

    subnet_id: str
    launch_template_id: str
    image_id: str
    key_secret_arn: str
    token_secret_arn: str
    placement_groups: list[dict]
    launched: list[dict] = field(default_factory=list)  # RunInstances requests, as sent

    def client(self, service: str, region: str | None = None):
        from mmp import aws

        real = aws.client(service, region)
        if service == "ec2":
            return PlacementStub(real, self.placement_groups, self.launched)
        return real

    def instances(self, states=("pending", "running", "stopping", "stopped"), region: str | None = None) -> list[dict]:
        from mmp import aws

        ec2 = aws.client("ec2", region)
        out = []
        for r in ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": ["mmp:managed"]},
                                                 {"Name": "instance-state-name", "Values": list(states)}])[
                "Reservations"]:
            out += r["Instances"]
        return out


GITHUB_TOKEN = "ghp_TESTTOKEN0123456789abcdefSECRET"


@pytest.fixture
def cloud(aws_env, sshd, monkeypatch, tmp_path, iam_enforced) -> Cloud:
    from mmp import aws

    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images(ImageIds=[MOTO_AMI])["Images"][0]["ImageId"]  # one of moto's default AMIs
    lt = ec2.create_launch_template(
        LaunchTemplateName="mmp-training",
        LaunchTemplateData={"IamInstanceProfile": {"Name": "mmp-training"}, "EbsOptimized": True},
    )["LaunchTemplate"]["LaunchTemplateId"]
    aws.client("ssm").put_parameter(Name="/mmp/test/dlami/ami-id", Value=image, Type="String")
    sm = aws.client("secretsmanager")
    key_arn = sm.create_secret(Name="mmp/ssh-key", SecretString=sshd.client_private)["ARN"]
    token_arn = sm.create_secret(Name="mmp/github-token", SecretString=GITHUB_TOKEN)["ARN"]
    secrets = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"
    iam_enforced.bind({  # this fixture's names are the stack's (IAM checks: tests/iam_enforce)
        f"launch-template/{lt}": "launch-template/LAUNCH_TEMPLATE", key_arn: secrets + "SSH_KEY",
        token_arn: secrets + "GITHUB_TOKEN", "arn:aws:s3:::mmp-artifacts": "arn:aws:s3:::ARTIFACTS",
        "repository/mmp-training": "repository/TRAINING_IMAGES",
        "parameter/mmp/test/dlami/ami-id": "parameter" + DEFAULT_SSM_PARAMETER})
    out = tmp_path / "fsx"
    env = {
        "MMP_DLAMI_SSM_PARAMETER": "/mmp/test/dlami/ami-id",
        "MMP_LAUNCH_TEMPLATE_ID": lt,
        "MMP_PLACEMENT_GROUP": "mmp-cluster",
        "MMP_SUBNET_IDS": subnet,
        "MMP_SSH_KEY_SECRET_ARN": key_arn,
        "MMP_SSH_USER": sshd.user,
        "MMP_FSX_DNS_NAME": f"fs-0123456789abcdef0.fsx.{REGION}.amazonaws.com",
        "MMP_FSX_MOUNT_NAME": "abcdefgh",
        "MMP_DLAMI_DATASET_ROOT": str(out / "datasets"),
        "MMP_DLAMI_OUTPUT_ROOT": str(out / "output"),
        "MMP_DLAMI_WORK_ROOT": str(out / "mmp"),
        "MMP_DLAMI_PYTHON": str(VENV_BIN / "python"),
        "MMP_DLAMI_HOROVODRUN": str(VENV_BIN / "horovodrun"),
        "MMP_DLAMI_PATH": str(VENV_BIN),
        "MMP_DLAMI_SSH_TIMEOUT": "3",
        "MMP_DLAMI_INSTALL_REQUIREMENTS": "0",
        "MMP_ECR_REPOSITORY_URI": ECR_URI,
        # the launch commands run as written, through a stand-in `docker exec -i mmp-train`
        "MMP_DLAMI_CONTAINER_EXEC": f"{CONTAINER_STANDIN} exec -i mmp-train",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("MMP_DLAMI_AMI_ID", "MMP_SSH_KEY_SSM_PARAMETER", "MMP_ARTIFACTS_BUCKET",
                "MMP_GITHUB_TOKEN_SECRET_ARN", "MMP_DLAMI_SSH_ADDRESS", "MMP_MLFLOW_USERNAME",
                "MMP_MLFLOW_PASSWORD_SECRET_ARN", "MMP_DLAMI_CONTAINER_SSH_PORT"):
        monkeypatch.delenv(key, raising=False)
    return Cloud(subnet, lt, image, key_arn, token_arn,
                 [{"GroupName": "mmp-cluster", "Strategy": "cluster", "State": "available",
                   "GroupId": "pg-0123456789abcdef0"}])


@pytest.fixture
def make_backend(cloud, sshd):
    """A DlamiBackend on moto whose instances all resolve to the local sshd."""
    from mmp.backends.dlami import DlamiBackend, DlamiConfig

    def _make(address=None, host_keys=None, **kwargs):
        return DlamiBackend(
            DlamiConfig.from_env(), clients=cloud.client,
            ssh_address=address or (lambda instance: (sshd.host, sshd.port)),
            host_keys=host_keys or (lambda: (sshd.host_private, sshd.host_public)),
            ssh_retry_seconds=0.2, **kwargs,
        )

    return _make


ARGV_TRAIN = """\
import json, os, sys
print("ARGV " + json.dumps(sys.argv[1:]), flush=True)
print("ENV " + json.dumps({k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MMP_RUN_ID", "HOROVOD_RANK")}), flush=True)
"""
FAIL_TRAIN = """\
import sys
print("train.py: about to fail", flush=True)
print("train.py: some detail on stderr", file=sys.stderr, flush=True)
sys.exit(3)
"""
SLEEP_TRAIN = """\
import time
print("train.py: sleeping", flush=True)
time.sleep(120)
"""


@pytest.fixture
def fsx_datasets(cloud, digits) -> Path:
    """The digits IDX files where the backend's dataset root says /fsx/datasets/digits is."""
    root = Path(os.environ["MMP_DLAMI_DATASET_ROOT"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "digits").symlink_to(digits, target_is_directory=True)
    return root


@pytest.fixture
def request_for(make_repo, fsx_datasets):
    """Factory: a LaunchRequest for a committed repo with the given train.py / experiment fields."""
    import uuid

    from mmp.hosts import localgit as gitutil
    from mmp.backends import LaunchRequest
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    def _make(train: str | None = None, name: str = "dl-repo", **fields):
        experiment = {"Platform": "dlami", "Dataset_Name": "digits", "Training_Instance": "p3.2xlarge",
                      "Instance_Count": "1", "Hyperparameters": {"epochs": "1"}}
        experiment.update(fields)
        repo = make_repo(name, experiment=experiment, files={"train.py": train} if train else None)
        exp = parse_experiment(experiment)
        run_id = uuid.uuid4().hex
        return LaunchRequest(
            experiment=exp, experiment_name="dl-test", run_id=run_id, repository="acme/fashion",
            clone_url=str(repo), commit=gitutil.resolve(repo),
            mlflow_env={"MLFLOW_EXPERIMENT_NAME": "dl-test", "MLFLOW_RUN_ID": run_id},
            dataset=Dataset("digits"),
        )

    return _make


def tagged_processes(run_id: str) -> list:
    """Processes on this machine whose environment carries MMP_RUN_ID=run_id."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("MMP_RUN_ID") == run_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found
