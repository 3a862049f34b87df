"""The DLAMI user data as cloud-init runs it: the cloud-config parsed by PyYAML, each
`runcmd` entry executed as an argv (cloud-init's list form) with stand-in `shutdown`,
`mkdir`, `mount`, `aws`, `docker` and `nvidia-smi` on PATH, so what would touch the
machine is recorded instead. The training container gets the GPUs, the host's network,
/fsx and its own sshd port; a failed pull fails the step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from mmp.backends.dlami import DlamiBackend, DlamiConfig

from ..conftest import REGION

IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mmp-training:deps-" + "ab" * 16

RECORD = '#!/bin/bash\nprintf "%s %s\\n" "$(basename "$0")" "$*" >> "$STANDIN_LOG"\n'
STANDINS = {
    "shutdown": RECORD,
    "mkdir": RECORD,
    "mount": RECORD,
    "nvidia-smi": RECORD + 'echo "GPU 0: NVIDIA A10G (UUID: GPU-0)"\n',
    "aws": RECORD + '[ "$1 $2" = "ecr get-login-password" ] && echo ecr-password\n',
    "docker": RECORD + '''case "$1" in
  login) IFS= read -r pw; [ "$pw" = ecr-password ] ;;
  pull) [ -z "${STANDIN_PULL_FAILS:-}" ] || { echo "manifest unknown" >&2; exit 1; } ;;
  run) ;;
  *) exit 2 ;;
esac
''',
}


@pytest.fixture
def machine(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)  # the runner task's region, as ECS sets it
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "STANDIN_LOG": str(log), "HOME": str(tmp_path)}, log


def cloud_config(**overrides) -> dict:
    config = DlamiConfig(fsx_dns_name="fs-0abc.fsx.eu-west-1.amazonaws.com", fsx_mount_name="abcdefgh",
                         image_repository_uri=IMAGE.rsplit(":", 1)[0], **overrides)
    text = DlamiBackend(config).user_data(("PRIVATE", "ssh-ed25519 HOSTKEY"), ["ssh-ed25519 MMPKEY"], 45,
                                          image=IMAGE, cluster_public="ssh-ed25519 CLUSTERKEY")
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def run_cmds(doc: dict, env: dict) -> list[int]:
    codes = []
    for argv in doc["runcmd"]:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
        codes.append(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60).returncode)
    return codes


def test_user_data_mounts_fsx_then_runs_the_training_image_with_gpus_host_network_and_its_sshd(machine):
    env, log = machine
    doc = cloud_config(container_ssh_port=2222)
    assert run_cmds(doc, env) == [0, 0, 0, 0]
    calls = log.read_text().splitlines()
    assert calls[:3] == ["shutdown -h +45", "mkdir -p /fsx",
                         "mount -t lustre -o relatime,flock fs-0abc.fsx.eu-west-1.amazonaws.com@tcp:/abcdefgh /fsx"]
    assert "aws ecr get-login-password --region eu-west-1" in calls
    assert "docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com" in calls
    assert f"docker pull {IMAGE}" in calls and "nvidia-smi -L" in calls
    run = next(c for c in calls if c.startswith("docker run"))
    for part in ("--name mmp-train", "--gpus all", "--network host", "-v /fsx:/fsx",
                 "-v /etc/mmp:/etc/mmp:ro", f"--entrypoint /usr/sbin/sshd {IMAGE} -D -e -p 2222",
                 "-o AuthorizedKeysFile=/etc/mmp/authorized_keys"):
        assert part in run, part
    assert calls.index("mount -t lustre -o relatime,flock fs-0abc.fsx.eu-west-1.amazonaws.com@tcp:/abcdefgh /fsx") \
        < calls.index(run)  # /fsx is mounted before the container binds it
    assert doc["write_files"] == [{"path": "/etc/mmp/authorized_keys", "permissions": "0644",
                                   "content": "ssh-ed25519 CLUSTERKEY\n"}]
    assert doc["ssh_authorized_keys"] == ["ssh-ed25519 MMPKEY"]
    assert not any("/opt/pytorch" in " ".join(argv) for argv in doc["runcmd"])


def test_a_failed_pull_fails_the_step_and_nothing_runs(machine):
    env, log = machine
    codes = run_cmds(cloud_config(), {**env, "STANDIN_PULL_FAILS": "1"})
    assert codes[-1] != 0
    assert not [c for c in log.read_text().splitlines() if c.startswith("docker run")]


def test_the_launch_commands_go_through_docker_exec_by_default(tmp_path):
    """The default container runtime wraps each command MMP sends: `sudo docker exec -i mmp-train …`."""
    backend = DlamiBackend(DlamiConfig())
    assert backend.in_container(["sh", "-c", "x"]) == ["sudo", "docker", "exec", "-i", "mmp-train", "sh", "-c", "x"]
    assert DlamiConfig.from_env({"MMP_DLAMI_CONTAINER_EXEC": "/x/docker exec -i mmp-train"}).container_exec == (
        "/x/docker", "exec", "-i", "mmp-train")
    assert DlamiConfig().python == "python" and "/opt/pytorch" not in str(DlamiConfig())


def test_the_same_port_for_host_and_container_sshd_is_refused():
    config = DlamiConfig(ssh_port=2222, container_ssh_port=2222)
    assert any("MMP_DLAMI_CONTAINER_SSH_PORT" in p for p in config.problems())
    assert any("MMP_ECR_REPOSITORY_URI" in p for p in DlamiConfig().problems())
