"""Pipeline overhead: `mmp run` → train.py's first line, against a bare horovodrun's.

All are measured side by side, interleaved, in one run, with a train.py whose first
statement records the time, and printed as overhead and as a ratio to the bare run:
- `mmp run` on the SQLite store without `mmp up`, as users get it: tracking through the
  server the first run left serving (mmp.tracking.server; the warm-up run starts it);
- the same with that server turned off (MMP_TRACKING_SERVER_IDLE=0): MLflow's client is
  imported and the store opened before launch (also what the very first run pays);
- `mmp run` against a running MLflow tracking server (what `mmp up` and AWS give).

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
    os.environ["MMP_HOME"] = str(home)  # for mmp.tracking.server's lookups below
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmp.tracking import server as tracking_server

    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}"), "mlflow server")
        cases = {
            "mmp run (sqlite, shared server)": env,
            "mmp run (sqlite, no server)": {**env, tracking_server.IDLE_ENV: "0"},
            "mmp run (mmp up's server)": {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        }
        # warm-up (first MLflow DB creation, page cache); the first run leaves the shared server
        first_line_after(bare, bare_out, env, repo)
        for case_env in cases.values():
            subprocess.run(mmp_run, env=case_env, check=True, capture_output=True)
        shared = wait_until(tracking_server.serving_url, "the shared tracking server")

        results: dict[str, list[float]] = {"bare horovodrun": [], **{name: [] for name in cases}}
        for _ in range(args.rounds):
            results["bare horovodrun"].append(first_line_after(bare, bare_out, env, repo))
            for name, case_env in cases.items():
                start = time.time()
                subprocess.run(mmp_run, env=case_env, check=True, capture_output=True)
                results[name].append(float((newest_output(home) / "first-line").read_text()) - start)
        assert tracking_server.serving_url() == shared, "the shared server was restarted"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        stop_shared_server(tracking_server)
        shutil.rmtree(work, ignore_errors=True)

    bare_median = statistics.median(results["bare horovodrun"])
    print(f"pipeline overhead, {args.rounds} interleaved rounds, median time to train.py's first line "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for name, values in results.items():
        med = statistics.median(values)
        extra = "" if name.startswith("bare") else (f"   overhead {1000 * (med - bare_median):6.0f} ms"
                                                    f"   {med / bare_median:.2f}× bare")
        print(f"  {name:<32} {1000 * med:7.0f} ms{extra}")


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=1)
        return True
    except OSError:
        return False


def wait_until(condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.time() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.3)


def stop_shared_server(tracking_server) -> None:
    """SIGTERM to the shared server's watcher (it stops `mlflow server`); wait until it has gone."""
    import json

    from mmp.system import procs

    try:
        state = json.loads(tracking_server._state_file().read_text())
    except (OSError, ValueError):
        return
    watcher = procs.find_process(state["pid"], state["started"])
    procs.signal_process(watcher, 15)
    procs.wait_gone(watcher, 60)

if __name__ == "__main__":
    main()
