"""The webhook on the local stack: a threaded HTTP server on 127.0.0.1, same core as the Lambda.

`POST /webhook` runs the shared handler and queues accepted pushes in the durable
SQLite queue; `GET /healthz` answers with the queue's counts. The body is read by
Content-Length only (an over-limit length gets 413 before a byte is read; a body
that ends early gets 400), each connection has a read timeout, and a failing
request never stops the server. Nothing here waits for training.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from .core import MAX_BODY_BYTES, Headers, Response, WebhookHandler

log = logging.getLogger("mmp.webhook")

READ_TIMEOUT_S = 10.0


def local_compare(full_name: str, clone_url: str, base: str, head: str):
    """Changed files for a long push: `git diff` for a local repository, the compare API otherwise."""
    if Path(clone_url.removeprefix("file://")).is_dir():
        from .. import gitutil

        return gitutil.changed_files(clone_url.removeprefix("file://"), base, head)
    from ..github import GitHubClient

    return GitHubClient.from_env(retries=2, timeout=3).compare(full_name, base, head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    webhook: WebhookHandler
    health: Callable[[], dict[str, Any]] | None

    def handle_error(self, request, client_address) -> None:  # a broken request never stops the server
        log.exception("webhook request from %s failed", client_address[0])


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: GitHub and the bench reuse connections
    timeout = READ_TIMEOUT_S
    disable_nagle_algorithm = True  # small answers go out at once, not after a delayed ACK
    wbufsize = 64 * 1024  # headers and body leave in one write when the request is done
    server: _Server
    server_version = "mmp-webhook"

    def log_message(self, format: str, *args: Any) -> None:  # no headers, no bodies in logs
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, response: Response, close: bool = False) -> None:
        data = response.json()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._send(Response(status, {"status": "rejected", "error": message}), close=close)

    def do_GET(self) -> None:
        if self.path.split("?")[0] in ("/healthz", "/health"):
            body = {"ok": True, **(self.server.health() if self.server.health else {})}
            self._send(Response(200, body))
        else:
            self._error(404, f"no such path {self.path.split('?')[0]!r}; POST /webhook or GET /healthz")

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/webhook":
            self._error(404, f"no such path {self.path.split('?')[0]!r}; POST /webhook")
            return
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (chunked bodies are not accepted)", close=True)
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._error(411, "Content-Length header is missing or invalid", close=True)
            return
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self._error(413, f"body is {length} bytes; GitHub sends at most {MAX_BODY_BYTES}", close=True)
            return
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            body = b""
        if len(body) != length:
            self._error(400, f"truncated body: got {len(body)} of {length} bytes", close=True)
            return
        try:
            response = self.server.webhook.handle(Headers(dict(self.headers.items())), body)
        except Exception as exc:
            log.exception("webhook handler failed")
            response = Response(500, {"status": "rejected", "error": f"internal error ({type(exc).__name__})"})
        self._send(response)

    def do_PUT(self) -> None:
        self._error(405, "POST /webhook only", close=True)

    do_DELETE = do_PATCH = do_PUT


class WebhookServer:
    """The HTTP server in a background thread; `port=0` picks a free port."""

    def __init__(self, handler: WebhookHandler, host: str = "127.0.0.1", port: int = 8080,
                 health: Callable[[], dict[str, Any]] | None = None):
        self.httpd = _Server((host, port), _RequestHandler)
        self.httpd.webhook = handler
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


def local_server(host: str = "127.0.0.1", port: int = 8080, queue=None) -> WebhookServer:
    """The local stack's server: the local secret, the durable queue, git/GitHub compare."""
    from .. import config
    from ..pipeline.queue import JobQueue

    queue = queue or JobQueue()
    secret = config.webhook_secret()
    handler = WebhookHandler(secret, queue, compare=local_compare)
    return WebhookServer(handler, host, port, health=lambda: {"jobs": queue.counts()})
