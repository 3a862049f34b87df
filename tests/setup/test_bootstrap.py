"""The README's own set-up: `make test` installs the system packages the tests need, or stops at
once with the exact command; `.ci/run` only calls it. The system part of scripts/bootstrap.sh
runs here in real bash, with stand-ins for `id`, `apt-get` and `sudo`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"


def stand_ins(folder: Path, *, uid: int, apt: bool = True, sshd: bool = False) -> Path:
    """A PATH of stand-ins: `id -u` answers uid, apt-get records its arguments, sshd maybe present."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    scripts = {"id": f'#!/bin/sh\n[ "$1" = "-u" ] && echo {uid} || /usr/bin/id "$@"\n'}
    if apt:
        scripts["apt-get"] = f'#!/bin/sh\necho "$*" >> {folder / "apt.log"}\n'
    if sshd:
        scripts["sshd"] = "#!/bin/sh\nexit 0\n"
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for tool in ("dirname", "mkdir"):  # the real ones the script uses before its system part
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return bin_dir


def system_part(folder: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    """Only the stand-ins on PATH: no real apt-get, sudo or sshd can be reached."""
    env = {"PATH": str(bin_dir), "MMP_ONLY_SYSTEM": "1", "MMP_SBIN_PATH": "", "HOME": str(folder)}
    return subprocess.run([shutil.which("bash"), str(BOOTSTRAP)], capture_output=True, text=True, env=env,
                          timeout=60, cwd=ROOT)


def test_root_with_apt_installs_openssh_server(tmp_path):
    done = system_part(tmp_path, stand_ins(tmp_path, uid=0))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0] == "update -qq" and calls[1] == "install -y -qq openssh-server"


def test_a_user_gets_the_exact_command_and_nothing_else_runs(tmp_path):
    done = system_part(tmp_path, stand_ins(tmp_path, uid=1000))
    assert done.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y openssh-server" in done.stderr
    assert not (tmp_path / "apt.log").exists()


def test_without_apt_the_package_is_named(tmp_path):
    done = system_part(tmp_path, stand_ins(tmp_path, uid=0, apt=False))
    assert done.returncode == 1 and "openssh-server" in done.stderr


def test_nothing_is_installed_when_sshd_is_there(tmp_path):
    done = system_part(tmp_path, stand_ins(tmp_path, uid=0, sshd=True))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "apt.log").exists()


def test_make_test_installs_system_packages_first_and_ci_only_calls_it():
    plan = subprocess.run(["make", "-n", "test"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "MMP_HOME": "/nonexistent-mmp-home"}).stdout.splitlines()
    system = next(i for i, line in enumerate(plan) if "MMP_ONLY_SYSTEM=1 bash scripts/bootstrap.sh" in line)
    pytest_at = next(i for i, line in enumerate(plan) if "-m pytest" in line)
    assert system < pytest_at
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "make test" in ci and not any("apt-get" in line for line in ci)
