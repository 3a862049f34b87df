"""Webhook ack latency (p50/p99) and signed deliveries per second on loopback, while a training job runs.

The local webhook server runs in its own process (as under `mmp up`), queueing every
delivery in the durable SQLite queue; a real `mmp run` trains the digits CNN with
horovodrun at the same time. Every delivery is a signed push that changes
experiment.json, so each one takes the full path: size check, HMAC, JSON parse,
filter, SQLite insert (WAL) and the 202. Targets on 2 cores: p99 <= 50 ms, >= 500/s.
Run: .venv/bin/python bench/webhook_ack.py [--deliveries 3000] [--clients 4] [--no-training]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "github" / "push-added-and-modified.json"
SECRET = "bench-secret"
sys.path.insert(0, str(ROOT))

from mmp.hosts.github import sign  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_made = 0


def deliveries(n: int) -> list[tuple[bytes, dict]]:
    """n signed pushes, each with its own body (the queue dedupes identical bodies)."""
    global _made
    base = json.loads(FIXTURE.read_text())
    base["commits"][0]["modified"].append("experiment.json")
    out = []
    for _ in range(n):
        _made += 1
        base["after"] = f"{_made:040x}"
        body = json.dumps(base).encode()
        out.append((body, {"Content-Type": "application/json", "X-GitHub-Event": "push",
                           "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": sign(SECRET, body)}))
    return out


def fire(port: int, work: list[tuple[bytes, dict]], latencies: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    # http.client writes headers and body separately; without TCP_NODELAY the body waits for the
    # server's delayed ACK (~40 ms). GitHub's sender does not have this client-side artefact.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for body, headers in work:
        started = time.perf_counter()
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        latencies.append(time.perf_counter() - started)
        if resp.status != 202:
            errors.append(str(resp.status))
    conn.close()


def measure(port: int, work: list[tuple[bytes, dict]], clients: int) -> tuple[list[float], float, list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    shards = [work[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=fire, args=(port, shard, latencies, errors)) for shard in shards]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started, errors


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_training(home: Path, env: dict) -> subprocess.Popen:
    repo = home / "bench-repo"
    shutil.copytree(ROOT / "examples" / "fashion", repo)
    experiment = json.loads((repo / "experiment.json").read_text())
    experiment["Hyperparameters"] = json.dumps({"epochs": "500", "batch-size": "32"})
    (repo / "experiment.json").write_text(json.dumps(experiment))
    ident = ["-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], [*ident, "commit", "-qm", "bench"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "mmp", "datasets", "prepare", "digits"], env=env, check=True,
                   capture_output=True)
    return subprocess.Popen([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def training_started(home: Path) -> bool:
    return any("epoch" in p.read_text(errors="replace").lower() for p in (home / "runs").rglob("train.log"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-training", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mmp-bench-"))
    env = {**os.environ, "MMP_HOME": str(home), "MMP_WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(ROOT),
           "MMP_TRACKING_SERVER_IDLE": "0"}  # the training load's `mmp run` leaves no tracking server behind
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", (
        "from mmp.webhook.server import local_server; import sys; "
        f"s = local_server(port={port}); s.httpd.serve_forever()")], env=env)
    training = None
    try:
        if not args.no_training:
            training = start_training(home, env)
            deadline = time.time() + 120
            while not training_started(home) and time.time() < deadline:
                time.sleep(0.5)
            print(f"training job running: {training_started(home) and training.poll() is None}")
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        measure(port, deliveries(200), 1)  # warm up: connections, SQLite pages
        seq, seq_s, seq_err = measure(port, deliveries(min(1000, args.deliveries)), 1)
        conc, conc_s, conc_err = measure(port, deliveries(args.deliveries), args.clients)
        still = training is not None and training.poll() is None
        print(f"ack latency, 1 connection ({len(seq)} deliveries): p50 {pct(seq, 50) * 1000:.2f} ms, "
              f"p99 {pct(seq, 99) * 1000:.2f} ms, max {max(seq) * 1000:.2f} ms")
        print(f"ack latency, {args.clients} connections ({len(conc)} deliveries): p50 {pct(conc, 50) * 1000:.2f} ms, "
              f"p99 {pct(conc, 99) * 1000:.2f} ms, mean {statistics.mean(conc) * 1000:.2f} ms")
        print(f"throughput: {len(conc) / conc_s:.0f} signed deliveries/s with {args.clients} connections "
              f"({len(seq) / seq_s:.0f}/s with 1)")
        print(f"non-202 answers: {len(seq_err) + len(conc_err)}; training still running during the bench: {still}")
        print(f"targets: p99 <= 50 ms: {'met' if pct(conc, 99) <= 0.05 else 'MISSED'}; "
              f">= 500/s: {'met' if len(conc) / conc_s >= 500 else 'MISSED'}")
    finally:
        server.terminate()
        server.wait()
        if training is not None and training.poll() is None:
            os.killpg(training.pid, signal.SIGINT)  # mmp run cancels and tears the job down
            try:
                training.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(training.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
