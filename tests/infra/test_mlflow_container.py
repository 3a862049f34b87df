"""The MLflow task's start-up, run for real: the container command of mmp.infra.mlflow_server
under /bin/sh, in a venv holding exactly the server image's packages (mlflow_docker/requirements.txt,
installed as its Dockerfile does, on the image's Python minor version), against a real PostgreSQL
whose password is full of punctuation, with basic auth. It must answer /health (the load
balancer's check, no credentials) and a logged-in create-run, and keep passwords off argv.

The venv is cached under build/venvs/, keyed by the requirements file and the host Python, so
re-runs cost only the server start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ..conftest import REGION

from mmp.infra.mlflow_server import IMAGE_DOCKERFILE, REQUEST_TIMEOUT_S, STARTUP

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "mlflow_docker" / "requirements.txt"
DB_PASSWORD = "p%4a:s@s/w#o?r&d=1+2;'\"\\$`!%%x"
ADMIN_PASSWORD = "a%dm;in #pa:ss@%%x"
TEST_REQUEST_TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run builds the venv


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def image_venv() -> Path:
    """The image's packages, installed as mlflow_docker/Dockerfile installs them (--no-deps, pip check)."""
    base = re.search(r"^ARG BASE_IMAGE=python:(\d+)\.(\d+)\.", (ROOT / IMAGE_DOCKERFILE).read_text(), re.M)
    assert base, "mlflow_docker/Dockerfile must say ARG BASE_IMAGE=python:X.Y.Z-..."
    minor = f"{base.group(1)}.{base.group(2)}"
    python = shutil.which(f"python{minor}") or (sys.executable if f"{sys.version_info[0]}.{sys.version_info[1]}" == minor
                                                 else None)
    if python is None:
        pytest.fail(f"the image's Python {minor} is not installed here")
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + minor.encode())
    venv = ROOT / "build" / "venvs" / f"mlflow-image-{key.hexdigest()[:12]}"
    if (venv / ".complete").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    _run([python, "-m", "venv", "--upgrade-deps", str(venv)], timeout=600)
    _run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-r", str(REQUIREMENTS)], timeout=1200)
    _run([str(venv / "bin" / "pip"), "check"], timeout=300)
    (venv / ".complete").write_text(f"{REQUIREMENTS.name} on Python {minor}\n")
    return venv


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL (run as the postgres user: it refuses root) with an `mlflow` role."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    base = Path(tempfile.mkdtemp(prefix="mmp-pg-"))
    port = _free_port()
    as_pg = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        os.chmod(base, 0o755)
        shutil.chown(base, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    try:
        _run([*as_pg, "initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
              "--auth-host=scram-sha-256"], timeout=120)
        _run([*as_pg, "pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "start", "-o",
              f"-p {port} -k {base} -c listen_addresses=127.0.0.1"], timeout=120)
        # As RDS makes its master user: it may create databases (the auth app gets its own).
        sql = "CREATE ROLE mlflow LOGIN CREATEDB PASSWORD :'pw';\nCREATE DATABASE mlflow OWNER mlflow;\n"
        _run([*as_pg, "psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(base), "-p", str(port), "-U", "postgres",
              "-v", f"pw={DB_PASSWORD}"], input=sql, timeout=60)
        yield {"port": port, "socket": base, "as_pg": as_pg}
    finally:
        subprocess.run([*as_pg, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _request(url: str, *, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        # Bounded by the server's own request timeout (a worker past it is killed and the socket reset).
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                    timeout=TEST_REQUEST_TIMEOUT_S + 30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_container_command_serves_with_basic_auth_and_a_punctuated_password(image_venv, postgres, tmp_path):
    port = _free_port()
    env = {
        "PATH": f"{image_venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
        "PIP_NO_INDEX": "1",  # the start-up installs nothing; should it try, no index answers
        "MLFLOW_PORT": str(port), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # A worker's first request imports MLflow's handlers: on a loaded 2-core machine that can pass the
        # task's 120 s, and gunicorn would kill the worker mid-request. The test waits longer instead.
        "MLFLOW_REQUEST_TIMEOUT": str(TEST_REQUEST_TIMEOUT_S),
        # what the task definition gives the container (mmp.infra.mlflow_server), secrets included
        "DB_HOST": "127.0.0.1", "DB_PORT": str(postgres["port"]), "DB_NAME": "mlflow", "DB_USER": "mlflow",
        "DB_PASSWORD": DB_PASSWORD, "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "ARTIFACTS_DESTINATION": "s3://mmp-test-artifacts/mlflow", "AWS_DEFAULT_REGION": REGION,
    }
    log = tmp_path / "mlflow.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["/bin/sh", "-c", STARTUP], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                status, body = _request(f"{url}/health")
                if status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the MLflow task exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /health answer:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        assert body.strip() == b"OK"

        def call(path: str, **kwargs) -> tuple[int, bytes]:
            try:
                return _request(f"{url}{path}", **kwargs)
            except OSError as exc:  # say why, from the server's side
                pytest.fail(f"{path}: {exc!r}; the server said:\n{log.read_text()[-4000:]}")

        admin = ("admin", ADMIN_PASSWORD)
        status, _ = call("/api/2.0/mlflow/experiments/search", body={"max_results": 1}, auth=("admin", "wrong"))
        assert status == 401
        status, body = call("/api/2.0/mlflow/experiments/create", body={"name": "container-check"}, auth=admin)
        assert status == 200, body
        experiment_id = json.loads(body)["experiment_id"]
        status, body = call("/api/2.0/mlflow/runs/create", auth=admin,
                            body={"experiment_id": experiment_id, "start_time": int(time.time() * 1000)})
        assert status == 200, body
        run_id = json.loads(body)["run"]["info"]["run_id"]

        # The run is in PostgreSQL (not a fallback store), and no password is on any command line.
        rows = _run([*postgres["as_pg"], "psql", "-tA", "-h", str(postgres["socket"]), "-p", str(postgres["port"]),
                     "-U", "postgres", "-d", "mlflow", "-c", f"SELECT count(*) FROM runs WHERE run_uuid = '{run_id}'"],
                    timeout=60).stdout.strip()
        assert rows == "1"
        group = os.getpgid(proc.pid)
        argvs = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if os.getpgid(int(pid)) != group:
                    continue
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            assert DB_PASSWORD not in argv and ADMIN_PASSWORD not in argv and "p%254a" not in argv, argv
            argvs.append(argv)
        assert any("gunicorn" in a and f"--timeout {TEST_REQUEST_TIMEOUT_S}" in a for a in argvs), argvs
        assert f'--timeout ${{MLFLOW_REQUEST_TIMEOUT:-{REQUEST_TIMEOUT_S}}}' in STARTUP  # the task's default
        assert DB_PASSWORD not in log.read_text() and ADMIN_PASSWORD not in log.read_text()
        # The auth database was migrated once before the workers came: none of them raced it and died.
        assert "exited with code" not in log.read_text() and "Worker failed to boot" not in log.read_text()
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the start-up's whole process group (sh → mlflow → gunicorn workers); SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
