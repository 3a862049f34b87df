"""Pipeline overhead: `mmp run` → train.py's first line, minus a bare horovodrun's.

Both are measured side by side, interleaved, in one run, with a train.py whose
first statement records the time. `mmp run` is measured twice: against the local
SQLite store (it then imports MLflow's client before launching) and against an
MLflow tracking server (the light REST tracker, what `mmp up` and AWS use).

    .venv/bin/python bench/pipeline_overhead.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FIRST_LINE = """import time, sys, os
t = time.time()
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "first-line"), "w").write(repr(t))
print("first line", flush=True)
"""
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})


def first_line_after(cmd: list[str], out_dir: Path, env: dict, cwd: Path) -> float:
    marker = out_dir / "first-line"
    marker.unlink(missing_ok=True)
    start = time.time()
    subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return float(marker.read_text()) - start


def newest_output(home: Path) -> Path:
    runs = sorted((home / "runs").glob("*/*/output"), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmp-bench-"))
    home = work / "home"
    repo = work / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(FIRST_LINE)
    (repo / "experiment.json").write_text(json.dumps({
        "Platform": "local", "Dataset_Name": "bench", "Training_Instance": "local", "Instance_Count": "1",
        "Hyperparameters": "{'epochs': '1', 'batch-size': '32'}"}))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "bench")
    data = work / "data"
    data.mkdir()
    env = {**os.environ, "MMP_HOME": str(home), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-m", "mmp", "datasets", "add", "bench", "--local", str(data)], env=env,
                   check=True, capture_output=True)

    bare_out = work / "bare-out"
    bare = [str(VENV_BIN / "horovodrun"), "-np", "1", "-H", "localhost:1", "--gloo", sys.executable, "train.py",
            "--dataset-path", str(data), "--output-path", str(bare_out), "--dataset", "bench",
            "--epochs", "1", "--batch-size", "32"]
    mmp_run = [str(VENV_BIN / "mmp"), "run", "--repo", str(repo), "-q"]

    port = free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
         "--artifacts-destination", str(work / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("mlflow server did not start")
                time.sleep(0.3)
        server_env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        # warm-up (first MLflow DB creation, page cache)
        first_line_after(bare, bare_out, env, repo)
        subprocess.run(mmp_run, env=env, check=True, capture_output=True)
        subprocess.run(mmp_run, env=server_env, check=True, capture_output=True)

        results: dict[str, list[float]] = {"bare horovodrun": [], "mmp run (sqlite)": [], "mmp run (server)": []}
        for _ in range(args.rounds):
            results["bare horovodrun"].append(first_line_after(bare, bare_out, env, repo))
            start = time.time()
            subprocess.run(mmp_run, env=env, check=True, capture_output=True)
            results["mmp run (sqlite)"].append(float((newest_output(home) / "first-line").read_text()) - start)
            start = time.time()
            subprocess.run(mmp_run, env=server_env, check=True, capture_output=True)
            results["mmp run (server)"].append(float((newest_output(home) / "first-line").read_text()) - start)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    bare_median = statistics.median(results["bare horovodrun"])
    print(f"pipeline overhead, {args.rounds} interleaved rounds, median time to train.py's first line")
    for name, values in results.items():
        med = statistics.median(values)
        extra = "" if name.startswith("bare") else f"   overhead {1000 * (med - bare_median):6.0f} ms"
        print(f"  {name:<18} {1000 * med:7.0f} ms{extra}")


if __name__ == "__main__":
    main()
