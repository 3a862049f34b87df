"""SSH sessions to training hosts with paramiko: pinned host keys, list-built commands.

Why one module: every remote command MMP runs goes through `Session.run`/`start`,
which take an argv *list* and quote it with `mmp.contract.argv.shell_join` (the one quoting
place), so a hyperparameter or dataset name can never become shell syntax. Host
keys are pinned (never AutoAddPolicy): a host that presents another key is refused.
Secrets travel on the channel's stdin, never on a command line. paramiko is
imported lazily, so nothing that merely imports MMP pays for it.
"""

from __future__ import annotations

import collections
import io
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mmp.contract.argv import shell_join

OutputSink = Callable[[str, str], None]  # (stream "stdout"|"stderr", line)
KEEP_LINES = 1000  # a process's own tail (error messages); the whole output goes to on_output
MAX_LINE_BYTES = 64 * 1024  # a longer run without a newline (a progress bar) is cut into lines of this size


class SshError(RuntimeError):
    """SSH could not connect or a command could not be run."""


class HostKeyError(SshError):
    """The host presented a key other than the pinned one (or none was pinned)."""


class SshUnreachable(SshError):
    """Nothing answered SSH before the deadline."""


def load_private_key(text: str) -> Any:
    """A paramiko key from OpenSSH/PEM private key text (ed25519, ECDSA or RSA)."""
    import paramiko

    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except Exception:  # wrong type: try the next one (never echo the key text)
            continue
    raise SshError("the SSH private key is not an ed25519, ECDSA or RSA private key")


def public_key_line(key: Any) -> str:
    """`ssh-ed25519 AAAA…` for a paramiko key (authorized_keys / known_hosts form)."""
    return f"{key.get_name()} {key.get_base64()}"


def parse_public_key(line: str) -> Any:
    """A paramiko public key from an OpenSSH `type base64 [comment]` line."""
    import base64

    import paramiko

    parts = line.split()
    if len(parts) < 2:
        raise SshError(f"not an OpenSSH public key line: {line[:40]!r}")
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


def generate_ed25519() -> tuple[str, str]:
    """A new ed25519 key pair as (OpenSSH private key text, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


@dataclass
class RemoteProcess:
    """A command running on a host; a thread drains its output live to `on_output`, and keeps
    its last KEEP_LINES lines in `lines` (never the whole output: a run may talk for days)."""

    channel: Any
    on_output: OutputSink | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=KEEP_LINES))
    exit_code: int | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._pump, name="mmp-ssh-reader", daemon=True)
        self._thread.start()

    def _emit(self, stream: str, line: str) -> None:
        self.lines.append(line)
        if self.on_output:
            try:
                self.on_output(stream, line)
            except Exception:  # a failing sink must not stop the reader
                pass

    def _pump(self) -> None:
        chan = self.channel
        partial = {"stdout": b"", "stderr": b""}

        def feed(stream: str, data: bytes) -> None:
            buf = partial[stream] + data
            *complete, rest = buf.split(b"\n")
            pieces = [raw[i:i + MAX_LINE_BYTES] for raw in complete for i in range(0, len(raw) or 1, MAX_LINE_BYTES)]
            while len(rest) > MAX_LINE_BYTES:
                pieces.append(rest[:MAX_LINE_BYTES])
                rest = rest[MAX_LINE_BYTES:]
            partial[stream] = rest
            for raw in pieces:
                self._emit(stream, raw.decode(errors="replace").rstrip("\r"))

        try:
            while True:
                got = False
                if chan.recv_ready():
                    feed("stdout", chan.recv(65536))
                    got = True
                if chan.recv_stderr_ready():
                    feed("stderr", chan.recv_stderr(65536))
                    got = True
                if got:
                    continue
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                if chan.closed:
                    break
                select.select([chan], [], [], 0.2)
            for stream, rest in partial.items():
                if rest:
                    self._emit(stream, rest.decode(errors="replace"))
            self.exit_code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except Exception as exc:  # connection lost mid-run
            self.error = f"{type(exc).__name__}: {exc}"
            self.exit_code = -1
        finally:
            self.done.set()

    def wait(self, timeout: float | None = None) -> int | None:
        self.done.wait(timeout)
        return self.exit_code

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:
            pass
        self._thread.join(timeout=5)


class Session:
    """One authenticated SSH connection to `host:port`, whose host key is pinned."""

    def __init__(self, host: str, port: int, username: str, pkey: Any, host_keys: Sequence[str], *,
                 timeout: float = 10.0):
        if not host_keys:
            raise HostKeyError(f"no host key pinned for {host}:{port}; refusing to connect")
        self.host, self.port, self.username = host, int(port), username
        self.pkey = pkey
        self.host_keys = list(host_keys)
        self.timeout = timeout
        self._client: Any = None

    @property
    def known_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def connect(self) -> "Session":
        import paramiko

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        known = client.get_host_keys()
        for line in self.host_keys:
            key = parse_public_key(line)
            known.add(self.known_name, key.get_name(), key)
        try:
            client.connect(
                self.host, port=self.port, username=self.username, pkey=self.pkey, timeout=self.timeout,
                banner_timeout=self.timeout, auth_timeout=self.timeout, look_for_keys=False, allow_agent=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"{self.known_name} presented host key {exc.key.get_name()} {exc.key.get_fingerprint().hex()} "
                "which is not the pinned one; refusing to connect"
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SshError(f"{self.username}@{self.known_name}: authentication failed ({exc})") from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(f"{self.known_name} offered no pinned host key type: {exc}") from None
            raise SshError(f"{self.known_name}: {exc}") from None
        except (OSError, EOFError) as exc:
            client.close()
            raise SshError(f"{self.known_name}: {exc}") from None
        self._client = client
        return self

    @property
    def connected(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def _open(self, argv: Sequence[str], stdin: bytes | str | None) -> Any:
        if not self.connected:
            raise SshError(f"not connected to {self.known_name}")
        channel = self._client.get_transport().open_session(timeout=self.timeout)
        channel.exec_command(shell_join(argv))
        if stdin is not None:
            channel.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
        channel.shutdown_write()
        return channel

    def start(self, argv: Sequence[str], *, stdin: bytes | str | None = None,
              on_output: OutputSink | None = None) -> RemoteProcess:
        """Start `argv` (quoted in one place) and return at once; output streams live."""
        return RemoteProcess(self._open(argv, stdin), on_output=on_output)

    def run(self, argv: Sequence[str], *, stdin: bytes | str | None = None, on_output: OutputSink | None = None,
            timeout: float | None = None) -> tuple[int, list[str]]:
        """Run `argv` to its end: (exit status, output lines)."""
        proc = self.start(argv, stdin=stdin, on_output=on_output)
        if proc.wait(timeout) is None and not proc.done.is_set():
            proc.close()
            raise SshError(f"{self.known_name}: {argv[0]} did not finish within {timeout:.0f} s")
        if proc.error:
            raise SshError(f"{self.known_name}: connection lost: {proc.error}")
        return proc.exit_code if proc.exit_code is not None else -1, list(proc.lines)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def connect_when_ready(make: Callable[[], Session], *, deadline: float, interval: float = 2.0,
                       sleep: Callable[[float], None] = time.sleep) -> Session:
    """Connect once SSH answers (a booting host refuses or stalls for a while).

    A wrong host key or a refused login is not a boot delay: those fail at once.
    """
    last = "no attempt"
    while True:
        session = make()
        try:
            return session.connect()
        except HostKeyError:
            raise
        except SshError as exc:
            if "authentication failed" in str(exc):
                raise
            last = str(exc)
        remaining = deadline - time.time()
        if remaining <= 0:
            raise SshUnreachable(f"SSH did not answer before the deadline (last error: {last})")
        sleep(min(interval, remaining))
