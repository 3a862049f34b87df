"""mmp.runtime.kubernetes_launcher for real: real horovodrun with 2 ranks, one here (the launcher, `localhost`)
and one over a real sshd on 127.0.0.2 (the node), with Trainer's hostfile format and key files at Trainer's
modes (an ECDSA P-521 `EC PRIVATE KEY` as id_rsa 0640, authorized_keys 0644)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mmp.runtime import kubernetes_launcher as kl

from ..conftest import ROOT, free_port

pytestmark = pytest.mark.horovod

TRAIN = """
import argparse, os
import horovod.torch as hvd
p = argparse.ArgumentParser(); p.add_argument("--dataset-path"); p.add_argument("--output-path"); p.add_argument("--dataset")
p.add_argument("--epochs"); p.add_argument("--fail", action="store_true")
a = p.parse_args(); hvd.init()
print(f"rank {hvd.rank()} of {hvd.size()} epochs {a.epochs}", flush=True)
if a.fail and hvd.rank() == 1:
    raise ValueError("loss is NaN")
if hvd.rank() == 0:
    open(os.path.join(a.output_path, "model.txt"), "w").write("ok")
"""


def trainer_keys(folder: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP521R1())
    folder.mkdir(parents=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for name, data, mode in (("id_rsa", pem, 0o640), ("id_rsa.pub", public + b"\n", 0o644),
                             ("authorized_keys", public + b"\n", 0o644)):
        (folder / name).write_bytes(data)
        (folder / name).chmod(mode)
    return folder


@pytest.fixture
def node_sshd(tmp_path):
    """A real sshd on 127.0.0.2 trusting Trainer's key: the `node` pod."""
    from mmp.backends.ssh import generate_ed25519

    keys = trainer_keys(tmp_path / "ssh")
    host_private, _ = generate_ed25519()
    (tmp_path / "host_key").write_text(host_private)
    (tmp_path / "host_key").chmod(0o600)
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.2\nHostKey {tmp_path / 'host_key'}\n"
                      f"PidFile {tmp_path / 'sshd.pid'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
                      "StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n"
                      f"LogLevel ERROR\nSetEnv PYTHONPATH={ROOT}\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kl.wait_for_ssh(["127.0.0.2"], port=port, timeout=15, interval=0.1)
        yield keys, port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def archive(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_launcher(tmp_path, node_sshd, *extra):
    keys, port = node_sshd
    (tmp_path / "code.tar.gz").write_bytes(archive({"train.py": TRAIN}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-launcher-0-0.job slots=1\n127.0.0.2 slots=1\n")
    output = tmp_path / "fsx" / "output" / "e" / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMP_CODE_ARCHIVE": str(tmp_path / "code.tar.gz"),
           "MMP_WORK_DIR": str(tmp_path / "fsx" / "mmp" / "e" / "r"), "MMP_HOSTFILE": str(hostfile),
           "MMP_HOSTNAME": "job-launcher-0-0.job", "MMP_SSH_PORT": str(port), "MMP_SSH_KEY_DIR": str(keys),
           "MMP_TERMINATION_LOG": str(tmp_path / "termination-log"), "MMP_SSH_WAIT_SECONDS": "20"}
    done = subprocess.run([sys.executable, "-m", "mmp.runtime.kubernetes_launcher", "--dataset-path", "/fsx/d",
                           "--output-path", str(output), "--dataset", "digits", "--epochs", "2", *extra],
                          capture_output=True, text=True, env=env, timeout=240)
    return done, output


def test_two_ranks_over_real_sshd(tmp_path, node_sshd):
    done, output = run_launcher(tmp_path, node_sshd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 of 2 epochs 2" in done.stdout and "rank 1 of 2 epochs 2" in done.stdout
    assert (output / "model.txt").read_text() == "ok"
    key = tmp_path / "fsx" / "mmp" / "e" / "r" / ".ssh" / "id_mmp"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "-H localhost:1,127.0.0.2:1" in done.stdout


def test_a_failing_rank_writes_the_summary_to_the_termination_log(tmp_path, node_sshd):
    done, _ = run_launcher(tmp_path, node_sshd, "--fail")
    assert done.returncode != 0
    assert (tmp_path / "termination-log").read_text().startswith("horovodrun exited 1: rank 1: ValueError: loss is NaN")


def test_hostfile_and_bad_input(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("a-launcher-0-0.a slots=4\na-node-0-0.a slots=4\n")
    assert kl.order_hosts(kl.read_hostfile(path), ["a-launcher-0-0"]) == [("localhost", 4), ("a-node-0-0.a", 4)]
    with pytest.raises(kl.EntrypointError, match="appears 0 times"):
        kl.order_hosts(kl.read_hostfile(path), ["elsewhere"])
    path.write_text("a slots=x\n")
    with pytest.raises(kl.EntrypointError, match="slots must be"):
        kl.read_hostfile(path)
    rc = kl.main(["--output-path", str(tmp_path / "o")], {"MMP_TERMINATION_LOG": str(tmp_path / "t"),
                                                         "MMP_WORK_DIR": str(tmp_path / "w")})
    assert rc == 2 and "MMP_CODE_ARCHIVE" in (tmp_path / "t").read_text()


def test_the_launcher_is_light_and_in_the_image():
    """The image copies mmp/ whole and runs `python -m mmp.runtime.kubernetes_launcher` on Python 3.11:
    the launcher imports no heavy package and parses as that Python."""
    import ast
    import json

    code = ("import json, sys, mmp.runtime.kubernetes_launcher; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"mlflow", "paramiko", "torch", "boto3", "yaml", "pydantic"}
    assert "COPY mmp/ /opt/mmp/mmp/" in (ROOT / "horovod_docker" / "Dockerfile").read_text()
    for name in sorted(m for m in loaded if m.startswith("mmp.")):
        path = ROOT / (name.replace(".", "/") + ".py")
        if path.exists():
            ast.parse(path.read_text(), str(path), feature_version=(3, 11))


def test_a_password_secret_the_pod_cannot_read_fails_before_training(tmp_path, monkeypatch):
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                       "AWS_MAX_ATTEMPTS": "1", "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)  # nothing answers there: the secret cannot be read
    (tmp_path / "code.tar.gz").write_bytes(archive({"train.py": TRAIN}))
    (tmp_path / "hostfile").write_text("me slots=1\n")
    rc = kl.main(["--output-path", str(tmp_path / "o")], {
        "MMP_TERMINATION_LOG": str(tmp_path / "t"), "MMP_WORK_DIR": str(tmp_path / "w"),
        "MMP_CODE_ARCHIVE": str(tmp_path / "code.tar.gz"), "MMP_HOSTFILE": str(tmp_path / "hostfile"),
        "MMP_HOSTNAME": "me", "MMP_HOROVODRUN": "/bin/false",
        "MMP_MLFLOW_PASSWORD_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mlflow"})
    assert rc == 2
    text = (tmp_path / "t").read_text()
    assert text.startswith("could not read the MLflow password secret arn:aws:secretsmanager")
