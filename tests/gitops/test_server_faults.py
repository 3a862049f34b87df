"""The local webhook under bursts and hostile clients: every refusal is an HTTP answer, nothing is lost.

Real sockets on 127.0.0.1, real signed push payloads; limits are lowered per test where a
test needs to reach them, and every wait polls a condition against a deadline.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time

import pytest

from mmp.webhook.core import MAX_BODY_BYTES
from mmp.webhook.server import Limits, local_server

from .concurrency import concurrently

PUSH = "push-added-and-modified.json"


def pushes(gh, n: int, start: int = 0, pad: int = 0) -> list[tuple[bytes, dict]]:
    """n signed pushes that each change experiment.json, each with its own body (and delivery id)."""
    out = []
    for i in range(start, start + n):
        payload = gh.with_files(PUSH, modified=["experiment.json"])
        payload["after"] = f"{i + 1:040x}"
        body = json.dumps(payload).encode()
        body += b" " * max(0, pad - len(body))  # JSON allows trailing whitespace: a bigger body, same push
        out.append((body, gh.headers_for(body)))
    return out


def post(port: int, body: bytes, headers: dict, source: str | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def request_head(headers: dict, length: int, extra: str = "") -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /webhook HTTP/1.1\r\nHost: x\r\n{lines}Content-Length: {length}\r\n{extra}\r\n".encode()


def read_answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def limited(secret_env, queue):
    """Factory: a local server with the given limits; all of them stop at teardown."""
    servers = []

    def make(**limits):
        srv = local_server(port=0, queue=queue, limits=Limits(**limits)).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def holders():
    """Raw connections a test opens to hold server slots; closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def hold(port: int, socks: list, n: int, source: str = "127.0.0.1") -> None:
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(sock)


def test_burst_of_200_concurrent_signed_pushes_is_all_queued_once(server, gh, queue):
    work = pushes(gh, 200)
    results = concurrently([lambda b=b, h=h: post(server.port, b, h)[0] for b, h in work])
    assert results == [202] * 200, [r for r in results if r != 202][:5]
    assert queue.counts()["queued"] == 200
    delivered = {h["X-GitHub-Delivery"] for _, h in work}
    assert {j.delivery_id for j in queue.list(limit=500)} == delivered


def test_past_the_connection_limit_the_answer_is_503_never_a_reset(limited, holders, gh, queue):
    srv = limited(connections=4, refusals=3, request_seconds=120, refusal_seconds=30)
    hold(srv.port, holders, 4)
    wait_until(lambda: srv.httpd.load()["serving"] == 4, what="4 connections held")
    results = concurrently([lambda b=b, h=h: post(srv.port, b, h) for b, h in pushes(gh, 12)])
    assert [r[0] if isinstance(r, tuple) else r for r in results] == [503] * 12
    status, answer, headers = results[0]
    assert "limit" in answer["error"] and headers["Retry-After"].isdigit()
    assert queue.counts()["queued"] == 0  # refused: GitHub records the 503, nothing half-accepted
    for sock in holders:
        sock.close()
    wait_until(lambda: srv.httpd.load()["serving"] == 0, what="held connections released")
    body, headers = pushes(gh, 1, start=100)[0]
    assert post(srv.port, body, headers)[0] == 202 and queue.counts()["queued"] == 1


def test_one_client_is_capped_and_other_clients_are_still_served(limited, holders, gh, queue):
    srv = limited(per_client=3, request_seconds=120, refusal_seconds=30)
    hold(srv.port, holders, 3)
    wait_until(lambda: srv.httpd.load()["serving"] == 3, what="3 connections held")
    (body, headers), (other_body, other_headers) = pushes(gh, 2)
    status, answer, reply_headers = post(srv.port, body, headers)
    assert status == 429 and "limit per client" in answer["error"] and reply_headers["Retry-After"].isdigit()
    assert post(srv.port, other_body, other_headers, source="127.0.0.2")[0] == 202  # another address
    assert queue.counts()["queued"] == 1


def idle(port: int, socks: list, n: int) -> None:
    """n connections that send nothing at all."""
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))


def accepted(port: int) -> int:
    """Connections the server in this process has accepted (its side of each socket has a descriptor)."""
    import psutil

    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_idle_connections_from_the_hooks_address_take_no_request_slot(server, holders, gh, queue):
    """Issue 20.14: 256 idle local sockets made every push from 127.0.0.1 answer 429."""
    idle(server.port, holders, 256)
    wait_until(lambda: accepted(server.port) == 256, what="256 idle connections accepted")
    body, headers = pushes(gh, 1)[0]
    status, answer, _ = post(server.port, body, headers)
    assert status == 202, answer
    assert queue.counts()["queued"] == 1


def test_with_every_thread_on_an_idle_socket_the_longest_idle_makes_room(limited, holders, gh, queue):
    srv = limited(connections=4, refusals=2, request_seconds=120, refusal_seconds=30)
    idle(srv.port, holders, 6)  # every connection thread now waits on a socket that says nothing
    wait_until(lambda: accepted(srv.port) == 6, what="6 idle connections accepted")
    body, headers = pushes(gh, 1)[0]
    status, answer, _ = post(srv.port, body, headers)  # before: stuck in the backlog for request_seconds
    assert status == 202, answer
    holders[0].settimeout(10)
    assert holders[0].recv(1) == b""  # the longest idle was closed, not the push
    assert queue.counts()["queued"] == 1


def test_bodies_held_in_memory_are_capped(limited, holders, gh, queue):
    srv = limited(body_memory=1_000_000, request_seconds=120)
    (big, big_headers), (second, second_headers) = pushes(gh, 2, pad=900_000)[0], pushes(gh, 1, 5, 200_000)[0]
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    holders.append(sock)
    sock.sendall(request_head(big_headers, len(big)) + big[:1000])  # 900 kB reserved, slowly arriving
    wait_until(lambda: srv.httpd.load()["body_bytes"] == len(big), what="the first body reserved")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as other:
        other.sendall(request_head(second_headers, len(second)))  # refused before its body is sent
        answer = read_answer(other)
    assert answer.startswith(b"HTTP/1.1 503") and b"bodies in memory" in answer and b"Retry-After" in answer
    sock.sendall(big[1000:])
    sock.shutdown(socket.SHUT_WR)
    assert read_answer(sock).startswith(b"HTTP/1.1 202")
    wait_until(lambda: srv.httpd.load()["body_bytes"] == 0, what="the first body released")
    assert post(srv.port, second, second_headers)[0] == 202
    assert queue.counts()["queued"] == 2


@pytest.mark.parametrize("send_body", [False, True])
def test_unsigned_request_is_refused_before_its_body_is_read(server, gh, send_body):
    length = MAX_BODY_BYTES if not send_body else 4_000_000
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": "unsigned-1"}
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(headers, length))
        if send_body:  # the whole body at once: the answer must still arrive, drained, not reset
            sender = threading.Thread(target=lambda: sock.sendall(b" " * length), daemon=True)
            sender.start()
        answer = read_answer(sock)
        if send_body:
            sender.join(timeout=30)
    assert answer.startswith(b"HTTP/1.1 401") and b"X-Hub-Signature-256" in answer
    assert server.httpd.load()["body_bytes"] == 0


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_request_trickling_bytes_is_cut_at_its_deadline(limited, gh, phase):
    """One byte every half second never trips a per-read timeout; the request's own deadline (2 s) does."""
    srv = limited(request_seconds=2)
    body, headers = pushes(gh, 1)[0]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        if phase == "headers":
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            trickle = b"a" * 40
        else:
            sock.sendall(request_head(headers, len(body)))
            trickle = body[:40]
        answer, started = None, time.monotonic()
        for byte in trickle:  # at most 20 s: ten times the deadline
            if select.select([sock], [], [], 0.5)[0]:
                answer = read_answer(sock)
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                answer = b""
                break
        assert answer is not None, "the server kept a trickling request open for 20 s"
        held = time.monotonic() - started
    assert held < 15
    if phase == "body":
        assert answer.startswith(b"HTTP/1.1 408") and b"longer than 2 s" in answer
    wait_until(lambda: srv.httpd.load() == {"serving": 0, "body_bytes": 0}, what="its slot released")


@pytest.mark.parametrize("name, values", [
    ("Content-Length", ("{n}", "{n}")), ("Content-Length", ("{n}", "5")),
    ("X-Hub-Signature-256", ("sha256=" + "0" * 64,)), ("X-GitHub-Delivery", ("other-delivery",)),
    ("Transfer-Encoding", ("chunked", "chunked")),
])
def test_duplicate_headers_get_400(server, gh, queue, name, values):
    body, headers = pushes(gh, 1)[0]
    lines = [f"{k}: {v}" for k, v in headers.items()]
    if name != "Content-Length":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {v.format(n=len(body))}" for v in values]
    head = ("POST /webhook HTTP/1.1\r\nHost: x\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400") and f"the {name} header appears more than once".encode() in answer
    assert queue.counts()["queued"] == 0


def test_deeply_nested_json_gets_400_from_the_server(server, gh, queue):
    body = b"[" * 100_000 + b"]" * 100_000
    status, answer, _ = post(server.port, body, gh.headers_for(body))
    assert status == 400 and "nests JSON deeper than" in answer["error"]
    body, headers = pushes(gh, 1)[0]
    assert post(server.port, body, headers)[0] == 202  # and the server keeps serving
