"""The local webhook under bursts and hostile clients: what is lost, what memory it takes, how long it is held.

The server runs in its own process with its default limits (mmp.webhook.server.Limits),
queueing into a temporary MMP_HOME. Every scenario sends traffic to 127.0.0.1 only and
stops by itself (bounded counts, and a deadline on each wait):

1. bursts: N concurrent signed pushes, each on its own connection, released together;
   counts 202 / 429 / 503 / connection resets, and checks the queue holds each accepted one once;
2. memory: 30 concurrent 25 MB requests, unsigned (refused before the body is read), then
   with a forged signature (bodies read, up to the in-memory cap); peak RSS of the server;
3. slowloris: 60 connections sending one header byte every 8 s; how long each is held, and
   the ack time of signed pushes sent meanwhile;
4. one client holding connections: how many one address gets, what the rest get, and
   whether another address is still served.

Run: .venv/bin/python bench/webhook_faults.py [--burst 200 --burst 1000] [--skip-slowloris]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmp.webhook.core import MAX_BODY_BYTES  # noqa: E402
from mmp.webhook.server import Limits  # noqa: E402
from tests.gitops.concurrency import concurrently  # noqa: E402
from webhook_ack import SECRET, deliveries as pushes, free_port  # noqa: E402  (bench/ is this script's folder)


def post(port: int, body: bytes, headers: dict, source: str = "127.0.0.1", timeout: float = 60) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


def at_once(jobs: list, timeout: float = 300) -> list:
    """The jobs released together; an exception is counted by its type's name."""
    return [type(r).__name__ if isinstance(r, Exception) else r for r in concurrently(jobs, timeout)]


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/healthz")
    return json.loads(conn.getresponse().read())


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bursts(port: int, sizes: list[int]) -> None:
    for size in sizes:
        before = health(port)["jobs"]["queued"]
        work = pushes(size)
        started = time.perf_counter()
        results = Counter(at_once([lambda b=b, h=h: post(port, b, h) for b, h in work]))
        took = time.perf_counter() - started
        queued = health(port)["jobs"]["queued"] - before
        print(f"burst of {size} concurrent signed pushes: {dict(results)} in {took:.1f} s; "
              f"queued {queued} (accepted {results.get('202', 0)}; resets {results.get('reset', 0)})")


def big_requests(port: int, server: psutil.Process, signed: bool, count: int = 30) -> None:
    body = b" " * MAX_BODY_BYTES
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": "big"}
    if signed:
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64  # well-formed, wrong: the body must be read to know
    idle = rss_mb(server)
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mb(server))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    results = Counter(at_once([lambda: post(port, body, dict(headers)) for _ in range(count)]))
    done.set()
    sampler.join()
    kind = "forged-signature" if signed else "unsigned"
    print(f"{count} concurrent {kind} 25 MB requests: {dict(results)} in {time.perf_counter() - started:.1f} s; "
          f"server RSS {idle:.0f} MB idle, {peak[0]:.0f} MB at peak (sampled every 50 ms)")


def slowloris(port: int, connections: int = 60, every: float = 8.0, limit_s: float = 40.0) -> None:
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        socks.append(sock)
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    acks: list[tuple[str, float]] = []
    next_byte = opened + every
    next_push = opened + 1
    while len(closed_after) < connections and time.monotonic() - opened < limit_s:
        live = [s for i, s in enumerate(socks) if i not in closed_after]
        readable = select.select(live, [], [], 0.2)[0]
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed_after[socks.index(sock)] = time.monotonic() - opened
        now = time.monotonic()
        if now >= next_byte:
            for i, sock in enumerate(socks):
                if i not in closed_after:
                    try:
                        sock.send(b"a")
                    except OSError:
                        closed_after[i] = now - opened
            next_byte += every
        if now >= next_push:
            body, headers = pushes(1)[0]
            t = time.perf_counter()
            acks.append((post(port, body, headers), time.perf_counter() - t))
            next_push = time.monotonic() + 2
    for sock in socks:
        sock.close()
    held = sorted(closed_after.values())
    print(f"slowloris, {connections} connections, 1 header byte every {every:g} s: "
          f"{len(held)} closed by the server, held {held[0]:.1f}-{held[-1]:.1f} s "
          f"(still open after {limit_s:g} s: {connections - len(held)}); "
          f"signed pushes meanwhile: {dict(Counter(s for s, _ in acks))}, "
          f"slowest ack {max(t for _, t in acks) * 1000:.0f} ms")


def one_client(port: int, limits: Limits, extra: int = 40) -> None:
    """Signed requests whose bodies never come: the first per_client wait for them, the rest are answered."""
    socks, answers = [], Counter()
    body, headers = pushes(1)[0]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    for _ in range(limits.per_client + extra):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST /webhook HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode())
        socks.append(sock)
    deadline = time.monotonic() + limits.refusal_seconds + 3  # before the held ones reach their own deadline
    pending = list(socks)
    while pending and time.monotonic() < deadline:
        for sock in select.select(pending, [], [], 0.2)[0]:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"] += 1
            pending.remove(sock)
    other_body, other_headers = pushes(1)[0]
    other = post(port, other_body, other_headers, source="127.0.0.2")
    for sock in socks:
        sock.close()
    print(f"one client opening {len(socks)} connections: {len(pending)} held (waiting for their bodies), "
          f"answers to the others {dict(answers)}; a push from another address meanwhile: {other}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--burst", type=int, action="append", help="burst size (repeatable; default 200 and 1000)")
    parser.add_argument("--skip-slowloris", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mmp-bench-faults-"))
    env = {**os.environ, "MMP_HOME": str(home), "MMP_WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", (
        "from mmp.webhook.server import local_server; "
        f"s = local_server(port={port}); s.httpd.serve_forever()")], env=env)
    limits = Limits()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        print(f"limits: {limits}")
        bursts(port, args.burst or [200, 1000])
        big_requests(port, proc, signed=False)
        big_requests(port, proc, signed=True)
        print(f"server peak RSS over the whole run so far (VmHWM): {peak_rss_mb(server.pid):.0f} MB")
        if not args.skip_slowloris:
            slowloris(port)
        one_client(port, limits)
        print(f"server still answering: {health(port)['ok']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
