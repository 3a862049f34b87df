"""The DLAMI user data as cloud-init runs it: the cloud-config parsed by PyYAML, each
`runcmd` entry executed as an argv (cloud-init's list form; a failed entry does not stop
the next) with stand-ins on PATH for everything that would touch the machine (`shutdown`,
`modinfo`, `curl`, `gpg`, `tee`, `lsb_release`, `apt-get`, `uname`, `mkdir`, `mount`,
`mountpoint`, `install`, `aws`, `docker`, `nvidia-smi`), so each call is recorded instead.
The Lustre client comes from AWS's FSx repository, a failed install or mount stops the
host with its reason in the marker the backend reads, and the training container gets the
GPUs, the host's network, a mounted /fsx and its own sshd port; a failed pull fails the step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from mmp import aws
from mmp.backends.dlami import READY_SCRIPT, DlamiBackend, DlamiConfig
from mmp.backends.dlami_fsx import HOST_FAILED_MARKER

from ..conftest import REGION

IMAGE = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mmp-training:deps-" + "ab" * 16
KERNEL = "6.8.0-1021-aws"
MOUNT = f"mount -t lustre -o relatime,flock fs-0abc.fsx.{REGION}.amazonaws.com@tcp:/abcdefgh /fsx"

RECORD = '#!/bin/bash\nprintf "%s %s\\n" "$(basename "$0")" "$*" >> "$STANDIN_LOG"\n'
STANDINS = {
    "shutdown": RECORD,
    "mkdir": RECORD,
    "install": RECORD,
    "modinfo": RECORD + '[ -n "${STANDIN_HAS_LUSTRE:-}" ]\n',
    "curl": RECORD + 'echo PUBLIC-KEY\n',
    "gpg": RECORD + 'cat\n',
    "tee": '#!/bin/bash\nin=$(cat)\nprintf "tee %s <<< %s\\n" "$*" "$in" >> "$STANDIN_LOG"\nprintf "%s\\n" "$in"\n',
    "lsb_release": RECORD + 'echo jammy\n',
    "uname": RECORD + f'echo {KERNEL}\n',
    "apt-get": RECORD + '[ "${*: -1}" != lustre-client-modules-%s ] || [ -z "${STANDIN_NO_MODULE:-}" ]\n' % KERNEL,
    "mount": RECORD + '[ -z "${STANDIN_MOUNT_FAILS:-}" ] || exit 32\ntouch "$HOME/mounted"\n',
    "mountpoint": RECORD + '[ -e "$HOME/mounted" ]\n',
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


def test_user_data_installs_the_client_from_the_fsx_repository_mounts_then_runs_the_training_image(machine):
    env, log = machine
    doc = cloud_config(container_ssh_port=2222)
    assert run_cmds(doc, env) == [0, 0, 0]
    calls = log.read_text().splitlines()
    assert calls[:2] == ["shutdown -h +45", "modinfo lustre"]
    # AWS's client repository for Ubuntu, as the FSx guide installs it ("Installing the Lustre client")
    assert "curl -fsSL https://fsx-lustre-client-repo-public-keys.s3.amazonaws.com/fsx-ubuntu-public-key.asc" in calls
    assert "tee /usr/share/keyrings/fsx-ubuntu-public-key.gpg <<< PUBLIC-KEY" in calls
    assert ("tee /etc/apt/sources.list.d/fsxlustreclientrepo.list <<< deb [signed-by=/usr/share/keyrings/"
            "fsx-ubuntu-public-key.gpg] https://fsx-lustre-client-repo.s3.amazonaws.com/ubuntu jammy main") in calls
    install = f"apt-get -o DPkg::Lock::Timeout=300 install -y -q lustre-client-modules-{KERNEL}"
    assert calls.index("apt-get -o DPkg::Lock::Timeout=300 update -q") < calls.index(install) < calls.index(MOUNT)
    # the run area belongs to the SSH user, who makes the run folders in it over SSH
    assert "install -d -o ubuntu -g ubuntu -m 0755 /fsx/mmp /fsx/output" in calls
    assert f"aws ecr get-login-password --region {aws.region()}" in calls  # the stack's region, whichever
    assert f"docker login --username AWS --password-stdin 123456789012.dkr.ecr.{REGION}.amazonaws.com" in calls
    assert f"docker pull {IMAGE}" in calls and "nvidia-smi -L" in calls
    run = next(c for c in calls if c.startswith("docker run"))
    for part in ("--name mmp-train", "--gpus all", "--network host", "-v /fsx:/fsx",
                 "-v /etc/mmp:/etc/mmp:ro", f"--entrypoint /usr/sbin/sshd {IMAGE} -D -e -p 2222",
                 "-o AuthorizedKeysFile=/etc/mmp/authorized_keys"):
        assert part in run, part
    assert calls.index(MOUNT) < calls.index(run)  # /fsx is mounted before the container binds it
    assert not [c for c in calls if c.startswith("tee " + HOST_FAILED_MARKER)]
    assert "mounts" not in doc  # cloud-init's mount -a would run before the client exists
    assert doc["write_files"] == [{"path": "/etc/mmp/authorized_keys", "permissions": "0644",
                                   "content": "ssh-ed25519 CLUSTERKEY\n"}]
    assert doc["ssh_authorized_keys"] == ["ssh-ed25519 MMPKEY"]
    assert not any("/opt/pytorch" in " ".join(argv) for argv in doc["runcmd"])


def test_a_host_with_the_client_skips_the_install(machine):
    env, log = machine
    assert run_cmds(cloud_config(), {**env, "STANDIN_HAS_LUSTRE": "1"}) == [0, 0, 0]
    calls = log.read_text().splitlines()
    assert MOUNT in calls and not [c for c in calls if c.startswith(("apt-get", "curl"))]


@pytest.mark.parametrize("fault, reason", [
    ("STANDIN_MOUNT_FAILS", f"mount -t lustre fs-0abc.fsx.{REGION}.amazonaws.com@tcp:/abcdefgh failed"),
    ("STANDIN_NO_MODULE", f"has no lustre-client-modules-{KERNEL} for this AMI's kernel (jammy)"),
])
def test_a_failed_client_install_or_mount_stops_the_host_loudly(machine, fault, reason):
    """cloud-init goes on to the next entry after a failure: the container step must refuse
    an unmounted /fsx itself, and the reason lands in the marker the backend reports."""
    env, log = machine
    codes = run_cmds(cloud_config(), {**env, fault: "1"})
    assert codes[0] == 0 and codes[1] != 0 and codes[2] != 0
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith(("docker", "install "))]  # nothing runs on the root disk
    marker = [c for c in calls if c.startswith(f"tee {HOST_FAILED_MARKER} <<< ")]
    assert len(marker) == 1 and reason in marker[0], calls
    assert "mmp host setup: FSx for Lustre at /fsx: " in marker[0]


@pytest.mark.parametrize("fault", [None, "STANDIN_MOUNT_FAILS"])
def test_the_launch_templates_user_data_runs_the_same_fsx_step(machine, fault):
    """Instances started from the stack's template by hand: watchdog, then the backend's FSx step."""
    from mmp.infra.dlami import user_data

    env, log = machine
    script = user_data(fsx_dns=f"fs-0abc.fsx.{REGION}.amazonaws.com", fsx_mount="abcdefgh", default_minutes=240,
                       owner="ubuntu")
    done = subprocess.run(["bash", "-c", script], env={**env, **({fault: "1"} if fault else {})},
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("curl ") and any(c.startswith("shutdown -h +240") for c in calls)
    assert f"apt-get -o DPkg::Lock::Timeout=300 install -y -q lustre-client-modules-{KERNEL}" in calls
    assert MOUNT in calls
    if fault:
        assert done.returncode != 0 and "failed" in done.stderr
        assert any(c.startswith(f"tee {HOST_FAILED_MARKER} <<< ") for c in calls)
        assert not [c for c in calls if c.startswith("install ")]
    else:
        assert done.returncode == 0, done.stderr
        assert "install -d -o ubuntu -g ubuntu -m 0755 /fsx/mmp /fsx/output" in calls


def test_the_readiness_check_reports_a_failed_host_at_once(tmp_path):
    """The backend's wait for the container ends with the host's reason, not a 10-minute timeout."""
    marker = tmp_path / "failed"
    marker.write_text("mmp host setup: FSx for Lustre at /fsx: mount failed\n")
    done = subprocess.run(["sh", "-c", READY_SCRIPT, "mmp-ready", str(marker), "false"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "mount failed" in done.stderr
    ok = subprocess.run(["sh", "-c", READY_SCRIPT, "mmp-ready", str(tmp_path / "absent"), "true"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr


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
