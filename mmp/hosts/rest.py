"""The HTTP transport every git host's REST client shares (stdlib urllib, so the Lambda can use it).

5xx answers, network errors and rate limits (403/429 with `x-ratelimit-remaining: 0` or
`retry-after`; GitLab sends 429 with `retry-after`/`ratelimit-reset`) are retried with backoff;
other 4xx are not. The token is only ever put in the header the host names, and is scrubbed
from every exception and log line; a client's repr says only whether it is set.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, ClassVar

from mmp.hosts.base import HostError

log = logging.getLogger("mmp.hosts")


class RateLimited(HostError):
    pass


class RestClient:
    """One host's REST API. Subclasses set `title`, `error`, `rate_limited_error`, `default_accept`
    and `auth_headers`/`extra_headers`."""

    title: ClassVar[str] = "host"
    error: ClassVar[type[HostError]] = HostError
    rate_limited_error: ClassVar[type[HostError]] = RateLimited
    default_accept: ClassVar[str] = "application/json"

    def __init__(self, token: str | None, base_url: str, *, retries: int = 4, backoff: float = 0.5,
                 max_wait: float = 60.0, timeout: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        self.__token = token
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self.sleep = sleep

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, token={'set' if self.__token else 'unset'})"

    @property
    def has_token(self) -> bool:
        return bool(self.__token)

    def _scrub(self, text: str) -> str:
        return text.replace(self.__token, "***") if self.__token else text

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def extra_headers(self) -> dict[str, str]:
        return {}

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                accept: str | None = None, raw: bool = False) -> tuple[int, Any, dict[str, str]]:
        """One API call with retries; returns (status, decoded JSON or text — bytes when `raw` —,
        lower-cased headers). Redirects (archive endpoints answer 302) are followed."""
        accept = accept or self.default_accept
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": accept, "User-Agent": "mmp", **self.extra_headers()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.__token:
            headers.update(self.auth_headers(self.__token))
        what = f"{method} {path}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                req = urllib.request.Request(url, data=data, method=method, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    content = resp.read()
                    return (resp.status, content if raw or accept.endswith(".raw") else decode(content),
                            {k.lower(): v for k, v in resp.headers.items()})
            except urllib.error.HTTPError as exc:
                status, resp_headers = exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()}
                payload = decode(exc.read() or b"")
                message = payload.get("message", payload.get("error")) if isinstance(payload, dict) else payload
                reason = self._scrub(str(message)[:300])
                wait = self._retry_wait(status, resp_headers, attempt)
                if wait is None or last:
                    error = self.rate_limited_error if rate_limited(status, resp_headers) else self.error
                    raise error(f"{self.title} {what} answered {status}: {reason or exc.reason}", status) from None
                log.warning("%s %s answered %s (%s); retry %d in %.1fs", self.title, what, status, reason,
                            attempt + 1, wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = self._scrub(str(getattr(exc, "reason", exc)))
                if last:
                    raise self.error(f"{self.title} {what} failed: {reason}") from None
                wait = self._backoff(attempt)
                log.warning("%s %s failed (%s); retry %d in %.1fs", self.title, what, reason, attempt + 1, wait)
            self.sleep(wait)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)

    def _retry_wait(self, status: int, headers: dict[str, str], attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when this answer is final."""
        if rate_limited(status, headers):
            if headers.get("retry-after", "").isdigit():
                wait = float(headers["retry-after"])
            elif headers.get("x-ratelimit-reset", "").isdigit():
                wait = max(0.0, float(headers["x-ratelimit-reset"]) - time.time()) + 1
            else:
                wait = self._backoff(attempt)
            return wait if wait <= self.max_wait else None  # a reset an hour away is not worth waiting for
        if status >= 500:
            return self._backoff(attempt)
        return None


def rate_limited(status: int, headers: dict[str, str]) -> bool:
    return status in (403, 429) and (headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers)


def decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw
