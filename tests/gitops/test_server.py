"""The local webhook server over real sockets: bad requests get 4xx and the server keeps serving."""

from __future__ import annotations

import http.client
import json
import socket
import time

from mmp.webhook.core import MAX_BODY_BYTES


def post(server, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def healthy(server) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200
    return json.loads(resp.read())


def raw_exchange(server, data: bytes, shutdown_write: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(data)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_accepted_push_is_queued_and_acked_fast(server, gh, queue):
    body = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    started = time.perf_counter()
    status, answer = post(server, body, gh.headers_for(body, delivery="srv-1"))
    assert time.perf_counter() - started < 1.0
    assert status == 202 and answer["status"] == "queued"
    assert queue.get("srv-1").state == "queued"
    assert healthy(server)["jobs"]["queued"] == 1


def test_bad_requests_never_queue_and_the_server_keeps_serving(server, gh, queue):
    good = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    assert post(server, good, gh.headers_for(good, secret="forged"))[0] == 401
    assert post(server, b"{oops", gh.headers_for(b"{oops"))[0] == 400
    assert post(server, good, gh.headers_for(good, content_type="text/plain"))[0] == 415
    missing = json.dumps({"ref": "refs/heads/main"}).encode()
    assert post(server, missing, gh.headers_for(missing))[0] == 400
    removed = json.dumps(gh.with_files("push-added-and-modified.json", removed=["experiment.json"])).encode()
    status, answer = post(server, removed, gh.headers_for(removed))
    assert status == 202 and answer["status"] == "ignored"
    # a replay of an accepted delivery
    assert post(server, good, gh.headers_for(good, delivery="r-1"))[0] == 202
    assert post(server, good, gh.headers_for(good, delivery="r-1"))[1]["status"] == "duplicate"
    assert queue.counts()["queued"] == 1
    assert healthy(server)["ok"] is True


def test_truncated_body_gets_400(server, gh, queue):
    body = json.dumps(gh.with_files("push-added-and-modified.json", modified=["experiment.json"])).encode()
    headers = gh.headers_for(body)
    head = "POST /webhook HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    answer = raw_exchange(server, head.encode() + body[: len(body) // 2])
    assert answer.startswith(b"HTTP/1.1 400") and b"truncated body" in answer
    assert queue.counts()["queued"] == 0
    assert healthy(server)["ok"]


def test_over_25_mb_gets_413_before_the_body_is_sent(server, gh):
    head = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n").encode()
    answer = raw_exchange(server, head, shutdown_write=False)
    assert answer.startswith(b"HTTP/1.1 413")
    assert healthy(server)["ok"]


def test_chunked_or_lengthless_posts_are_refused(server):
    answer = raw_exchange(server, b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")
    assert healthy(server)["ok"]


def test_unknown_paths_and_methods(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/nope")
    assert conn.getresponse().status == 404
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("PUT", "/webhook", body=b"{}")
    assert conn.getresponse().status == 405


def test_keep_alive_connection_serves_many_deliveries(server, gh, queue):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for i in range(20):
        payload = gh.with_files("push-added-and-modified.json", modified=["experiment.json"])
        payload["after"] = f"{i + 1:040x}"
        body = json.dumps(payload).encode()
        conn.request("POST", "/webhook", body=body, headers=gh.headers_for(body))
        resp = conn.getresponse()
        assert resp.status == 202 and json.loads(resp.read())["status"] == "queued"
    assert queue.counts()["queued"] == 20
