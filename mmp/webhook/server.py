"""The webhook on the local stack: a threaded HTTP server on 127.0.0.1, same core as the Lambda.

`POST /webhook` (GitHub's deliveries and the local hook's) and `POST /webhook/<host>` for the
other git hosts (`/webhook/gitlab`, each with its own secret) run the shared handler, `POST /events/codecommit`
(loopback only, when MMP_CODECOMMIT_REPOSITORIES is set) takes a CodeCommit EventBridge event, and each queues
accepted pushes in the durable SQLite queue; `GET /healthz` answers with the queue's counts. Nothing here waits
for training. What a burst or a hostile client can take is bounded by `Limits`,
and every refusal is an HTTP answer GitHub records (a reset is recorded as nothing):

- the listen backlog holds a burst while threads start; past `connections` requests
  served at once the answer is 503, past `per_client` from one address 429 (both with
  Retry-After). A request counts once its request line has come, not while its connection
  sits idle: idle sockets (even hundreds from 127.0.0.1, the hook's own address) take no
  request slot. Past `connections + refusals` threads, connections wait in the backlog,
  and the longest-idle connection is closed to make room;
- refusals that need no body (size, duplicate or missing headers, no signature)
  are answered before a byte of the body is read, and the unread body is drained
  before the socket closes (closing over unread data would send a reset);
- bodies held in memory at once are capped (`body_memory`; 503 past it);
- each request has one deadline for all its reads (`request_seconds`), so a client
  sending a byte every few seconds cannot hold a connection past it (408).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from mmp.hosts.base import DEFAULT_HOST, get_host
from mmp.webhook.core import MAX_BODY_BYTES, Headers, Response, WebhookHandler

log = logging.getLogger("mmp.webhook")

WRITE_TIMEOUT_S = 5.0
# headers read once: a second copy is ambiguous (request smuggling, a signature for another body);
# each host adds its own (GitHost.single_headers)
SINGLE_HEADERS = ("Content-Length", "Transfer-Encoding", "Content-Type")
_DIGITS_RE = re.compile(r"^[0-9]{1,12}$")  # ASCII only: str.isdigit() also takes '٣'


@dataclass(frozen=True)
class Limits:
    """What one server takes at once. Defaults: 200 concurrent pushes from one address are all served."""

    connections: int = 512  # requests served at once; past it: 503
    per_client: int = 256  # of those, from one client address; past it: 429
    refusals: int = 256  # connections being answered 503/429 at once; past it they wait in the backlog
    body_memory: int = 4 * MAX_BODY_BYTES  # request bodies held at once, all requests together; past it: 503
    request_seconds: float = 10.0  # one request, first byte to last (GitHub itself gives up after 10 s)
    refusal_seconds: float = 2.0  # to read a refused request's headers, and again to drain its body
    backlog: int = 1024  # connections the kernel holds until accepted (capped by net.core.somaxconn)
    retry_after_s: int = 5


def compare_for(host_name: str) -> Callable[[str, str, str, str], Any]:
    """Changed files for a long push from `host_name`: `git diff` for a local repository, the host's
    compare API otherwise (few retries: the host is waiting for an answer)."""
    def compare(full_name: str, clone_url: str, base: str, head: str):
        if Path(clone_url.removeprefix("file://")).is_dir():
            from mmp.hosts import localgit as gitutil

            return gitutil.changed_files(clone_url.removeprefix("file://"), base, head)
        return get_host(host_name, retries=2, timeout=3).compare(full_name, clone_url, base, head)

    return compare


class _DeadlineReader(io.RawIOBase):
    """Socket reads sharing one deadline: a per-read timeout alone lets a byte every 8 s hold forever."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's time is up")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    webhook: WebhookHandler
    routes: dict[str, WebhookHandler]
    health: Callable[[], dict[str, Any]] | None

    def __init__(self, address: tuple[str, int], limits: Limits):
        self.limits = limits
        self.request_queue_size = limits.backlog  # listen()'s backlog; 5 by default lost bursts as resets
        self._thread_slots = threading.BoundedSemaphore(limits.connections + limits.refusals)
        self._lock = threading.Lock()
        self._serving = 0
        self._per_client: Counter[str] = Counter()
        self._body_bytes = 0
        self._idle: dict[socket.socket, float] = {}  # connections waiting for a request line → since when
        super().__init__(address, _RequestHandler)

    # -- connections ------------------------------------------------------------------
    def get_request(self):
        """Accept only with a thread to spare; otherwise close the longest-idle connection (its thread
        ends and the next pass accepts) while this one waits in the backlog."""
        if not self._thread_slots.acquire(timeout=0.2):
            self.close_longest_idle()
            raise OSError("every connection thread is busy")  # serve_forever's loop tries again
        try:
            return super().get_request()
        except BaseException:
            self._thread_slots.release()
            raise

    def shutdown_request(self, request) -> None:
        super().shutdown_request(request)
        self._thread_slots.release()

    def idle(self, connection: socket.socket, waiting: bool) -> None:
        """Mark a connection as waiting for its next request line (or no longer)."""
        with self._lock:
            if waiting:
                self._idle[connection] = time.monotonic()
            else:
                self._idle.pop(connection, None)

    def close_longest_idle(self) -> None:
        with self._lock:
            if not self._idle:
                return
            connection = min(self._idle, key=self._idle.__getitem__)
            del self._idle[connection]
        try:
            connection.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once; the thread ends
        except OSError:
            pass

    def admit(self, client: str) -> tuple[int, str] | None:
        """Take a serving slot for `client`, or say (status, why) it is refused."""
        with self._lock:
            if self._serving >= self.limits.connections:
                return 503, (f"the server is answering {self._serving} requests, its limit; "
                             f"redeliver in a few seconds")
            if self._per_client[client] >= self.limits.per_client:
                return 429, (f"{client} has {self._per_client[client]} requests in progress, "
                             f"the limit per client; retry when one finishes")
            self._serving += 1
            self._per_client[client] += 1
            return None

    def leave(self, client: str) -> None:
        with self._lock:
            self._serving -= 1
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

    # -- body memory ------------------------------------------------------------------
    def reserve_body(self, size: int) -> bool:
        with self._lock:
            if self._body_bytes + size > self.limits.body_memory:
                return False
            self._body_bytes += size
            return True

    def release_body(self, size: int) -> None:
        with self._lock:
            self._body_bytes -= size

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"serving": self._serving, "body_bytes": self._body_bytes}

    def handle_error(self, request, client_address) -> None:  # a broken request never stops the server
        log.exception("webhook request from %s failed", client_address[0])

    def finish_request(self, request, client_address) -> None:
        try:
            super().finish_request(request, client_address)
        except (ConnectionError, TimeoutError) as exc:  # the client went away or was too slow: not our failure
            log.debug("connection from %s ended: %s", client_address[0], exc)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: GitHub and the bench reuse connections
    disable_nagle_algorithm = True  # small answers go out at once, not after a delayed ACK
    wbufsize = 64 * 1024  # headers and body leave in one write when the request is done
    server: _Server
    server_version = "mmp-webhook"

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)
        self._opened = time.monotonic()
        self._client = self.client_address[0]
        self._refusal: tuple[int, str] | None = None
        self._admitted = False
        self._reader.deadline = time.monotonic() + self.server.limits.request_seconds
        self._unread = 0  # body bytes not read when the answer went out (drained before closing)
        self.server.idle(self.connection, True)

    def parse_request(self) -> bool:
        """A request line came: the connection is no longer idle, and the request takes a slot (or is refused)."""
        self.server.idle(self.connection, False)
        self._opened = time.monotonic()
        self._refusal = self.server.admit(self._client)
        self._admitted = self._refusal is None
        limits = self.server.limits
        self._reader.deadline = time.monotonic() + (limits.request_seconds if self._admitted
                                                    else limits.refusal_seconds)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            if self._admitted:  # the slot is the request's, not the connection's
                self._admitted = False
                self.server.leave(self._client)
            if not self.close_connection:
                self.server.idle(self.connection, True)  # keep-alive: waiting for the next request

    def finish(self) -> None:
        try:
            if self._unread:
                self._drain()
            super().finish()
        finally:
            self.server.idle(self.connection, False)
            if self._admitted:
                self._admitted = False
                self.server.leave(self._client)

    def _drain(self) -> None:
        """Read and drop an unread body so closing does not reset the connection (a reset can destroy the
        answer before the client reads it). Bounded by the request's own deadline, never under refusal_seconds."""
        limits = self.server.limits
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client may read it now
            self._reader.deadline = max(time.monotonic() + limits.refusal_seconds, self._opened + limits.request_seconds)
            left = min(self._unread, 2 * MAX_BODY_BYTES)
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))  # what the header read buffered first, then the socket
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:  # the deadline (TimeoutError) or the client went away
            pass

    def log_message(self, format: str, *args: Any) -> None:  # no headers, no bodies in logs
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, response: Response, close: bool = False, retry_after: int | None = None) -> None:
        data = response.json()
        self.connection.settimeout(WRITE_TIMEOUT_S)
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self._reader.deadline = time.monotonic() + self.server.limits.request_seconds  # the next request's

    def _error(self, status: int, message: str, close: bool = False, unread: int = 0) -> None:
        self._unread = unread
        retry = self.server.limits.retry_after_s if status in (429, 503) else None
        self._send(Response(status, {"status": "rejected", "error": message}), close=close or bool(unread),
                   retry_after=retry)

    def _declared_length(self) -> int:
        """The body a refused request may still send (drained, never read): its Content-Length, or until it ends."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.command == "GET" and not lengths:
            return 0
        if len(lengths) == 1 and _DIGITS_RE.match(lengths[0].strip()) and not self.headers.get("Transfer-Encoding"):
            return int(lengths[0])
        return 2 * MAX_BODY_BYTES

    def _refused(self) -> bool:
        """Answer a connection that got no serving slot (503/429); its body is drained, not read."""
        if self._refusal is None:
            return False
        self._error(*self._refusal, close=True, unread=self._declared_length())
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
        if self.path.split("?")[0] in ("/healthz", "/health"):
            body = {"ok": True, **(self.server.health() if self.server.health else {}), "load": self.server.load()}
            self._send(Response(200, body))
        else:
            self._error(404, f"no such path {self.path.split('?')[0]!r}; POST {self._paths()} or GET /healthz")

    def _paths(self) -> str:
        return " or ".join(sorted(self.server.routes))

    def _length_problem(self, handler: WebhookHandler) -> tuple[int, str] | None:
        for name in (*SINGLE_HEADERS, *handler.host.single_headers):
            if len(self.headers.get_all(name) or []) > 1:
                return 400, f"the {name} header appears more than once; send it once"
        if self.headers.get("Transfer-Encoding"):
            return 411, "send the body with a Content-Length (chunked bodies are not accepted)"
        length_text = self.headers.get("Content-Length")
        if length_text is None or not _DIGITS_RE.match(length_text.strip()):
            return 411, "Content-Length header is missing or not a number of bytes"
        limit = handler.host.max_body_bytes
        if int(length_text) > limit:
            return 413, f"body is {int(length_text)} bytes; {handler.host.title} sends at most {limit}"
        return None

    def do_POST(self) -> None:
        if self._refused():
            return
        handler = self.server.routes.get(self.path.split("?")[0])
        if handler is None:
            self._error(404, f"no such path {self.path.split('?')[0]!r}; POST {self._paths()}",
                        unread=self._declared_length())
            return
        if getattr(handler, "loopback_only", False) and not ipaddress.ip_address(self._client).is_loopback:
            self._error(403, f"{self.path.split('?')[0]} takes events from this machine only",
                        unread=self._declared_length())
            return
        problem = self._length_problem(handler)
        if problem is not None:
            self._error(*problem, unread=self._declared_length())
            return
        length = int(self.headers["Content-Length"])
        headers = Headers(dict(self.headers.items()))
        early = handler.check_headers(headers)  # no signature: refused before the body is read
        if early is not None:
            self._error(early.status, early.body["error"], unread=length)
            return
        if not self.server.reserve_body(length):
            self._error(503, f"too many request bodies in memory (limit {self.server.limits.body_memory} bytes); "
                             "redeliver in a few seconds", unread=length)
            return
        try:
            self._post(handler, headers, length)
        finally:
            self.server.release_body(length)

    def _post(self, handler: WebhookHandler, headers: Headers, length: int) -> None:
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._error(408, f"the request took longer than {self.server.limits.request_seconds:g} s; "
                             "send it at once", close=True)
            return
        except OSError:
            body = b""
        if len(body) != length:
            self._error(400, f"truncated body: got {len(body)} of {length} bytes", close=True)
            return
        try:
            response = handler.handle(headers, body)
        except Exception as exc:
            log.exception("webhook handler failed")
            response = Response(500, {"status": "rejected", "error": f"internal error ({type(exc).__name__})"})
        self._send(response, retry_after=self.server.limits.retry_after_s if response.status == 503 else None)

    def do_PUT(self) -> None:
        if not self._refused():
            self._error(405, f"POST {self._paths()} only", unread=self._declared_length())

    do_DELETE = do_PATCH = do_PUT


class WebhookServer:
    """The HTTP server in a background thread; `port=0` picks a free port. `handler` answers
    `POST /webhook`; `routes` adds a path per other host (`{"/webhook/gitlab": handler}`)."""

    def __init__(self, handler: WebhookHandler, host: str = "127.0.0.1", port: int = 8080,
                 health: Callable[[], dict[str, Any]] | None = None, limits: Limits | None = None,
                 routes: dict[str, WebhookHandler] | None = None):
        self.httpd = _Server((host, port), limits or Limits())
        self.httpd.webhook = handler
        self.httpd.routes = {"/webhook": handler, **(routes or {})}
        self.httpd.health = health
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/webhook"

    def start(self) -> "WebhookServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="mmp-webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "WebhookServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# the hosts the local stack takes deliveries from besides GitHub: path → (host, its secret)
def _extra_routes(queue) -> dict[str, WebhookHandler]:
    from mmp import config

    return {f"/webhook/{name}": WebhookHandler(secret, queue, compare=compare_for(name), host=name)
            for name, secret in config.host_webhook_secrets().items()}


def local_server(host: str = "127.0.0.1", port: int = 8080, queue=None, limits: Limits | None = None) -> WebhookServer:
    """The local stack's server: the local secrets, the durable queue, git or the host's compare."""
    from mmp import config
    from mmp.pipeline.queue import JobQueue

    queue = queue or JobQueue()
    secret = config.webhook_secret()
    handler = WebhookHandler(secret, queue, compare=compare_for(DEFAULT_HOST))
    routes: dict[str, Any] = dict(_extra_routes(queue))
    from mmp.webhook.codecommit import local_endpoint

    codecommit = local_endpoint(queue)  # EventBridge-shaped CodeCommit events, from loopback only
    if codecommit is not None:
        routes["/events/codecommit"] = codecommit
    return WebhookServer(handler, host, port, health=lambda: {"jobs": queue.counts()}, limits=limits,
                         routes=routes)
