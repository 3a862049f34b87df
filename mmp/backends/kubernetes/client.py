"""A small REST client for the Kubernetes API: stdlib HTTP, like MMP's GitHub and MLflow clients
(the official `kubernetes` package is over 100 MB for the five verbs MMP uses).

Where it connects, first match wins:
* MMP_K8S_API_URL (+ MMP_K8S_CA_DATA): the runner task on AWS. With MMP_K8S_CLUSTER_NAME the
  bearer token is EKS's: `k8s-aws-v1.` + base64url(a presigned STS GetCallerIdentity URL signed
  with the `x-k8s-aws-id: <cluster>` header, 60 s), made with botocore alone, as `aws eks get-token`.
* KUBECONFIG (first file) or ~/.kube/config, its current context: any cluster. Users with a token,
  a token file, a client certificate, or an exec plugin (`aws eks get-token` is recognised and
  made in process; other plugins run as kubectl runs them).

Every write asks for strict field validation, so a field the API server does not know is an error,
not silently dropped. Errors carry the API server's Status (code, reason, message), never a token.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmp.backends.kubernetes.settings import DEFAULT_NAMESPACE, KubernetesSettings

TOKEN_PREFIX = "k8s-aws-v1."
CLUSTER_HEADER = "x-k8s-aws-id"
PRESIGN_SECONDS = 60  # what aws eks get-token signs for; EKS accepts the token for 15 minutes
TOKEN_REFRESH_SECONDS = 5 * 60


class KubeError(RuntimeError):
    """An API call that failed: the HTTP code and the Status reason the API server gave."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


class KubeConfigError(RuntimeError):
    """No usable cluster connection; names the setting at fault."""


def eks_token(cluster: str, region: str, session: Any = None, *, expires: int = PRESIGN_SECONDS) -> str:
    """The bearer token EKS accepts: a presigned STS GetCallerIdentity URL with the cluster header signed."""
    import boto3

    sts = (session or boto3.session.Session()).client(
        "sts", region_name=region, endpoint_url=os.environ.get("MMP_K8S_STS_ENDPOINT") or f"https://sts.{region}.amazonaws.com")

    def add_cluster(request: Any, **_: Any) -> None:
        request.headers[CLUSTER_HEADER] = cluster

    sts.meta.events.register("before-sign.sts.GetCallerIdentity", add_cluster)
    url = sts.generate_presigned_url("get_caller_identity", Params={}, ExpiresIn=expires, HttpMethod="GET")
    return TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


@dataclass
class Connection:
    server: str
    namespace: str = DEFAULT_NAMESPACE
    ca_pem: str | None = field(default=None, repr=False)
    insecure: bool = False
    token: Callable[[], str | None] = field(default=lambda: None, repr=False)
    client_cert: tuple[str, str] | None = field(default=None, repr=False)  # PEM texts: certificate, key

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.server.startswith("https"):
            return None
        ctx = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if self.client_cert:
            with tempfile.TemporaryDirectory() as folder:  # ssl loads chains from files only
                cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
                for path, text in ((cert, self.client_cert[0]), (key, self.client_cert[1])):
                    path.touch(mode=0o600)
                    path.write_text(text)
                ctx.load_cert_chain(cert, key)
        return ctx


class _CachedToken:
    def __init__(self, make: Callable[[], str], ttl: float = TOKEN_REFRESH_SECONDS):
        self.make, self.ttl, self.value, self.at = make, ttl, None, 0.0
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            if self.value is None or time.monotonic() - self.at > self.ttl:
                self.value, self.at = self.make(), time.monotonic()
            return self.value


def _b64(text: str, what: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode()
    except ValueError:
        raise KubeConfigError(f"{what} is not valid base64") from None


def _read(path: str, base: Path) -> str:
    return (base / path).expanduser().read_text()


def _exec_token(spec: dict, region: str) -> Callable[[], str]:
    args = [str(a) for a in spec.get("args") or []]
    command = str(spec.get("command") or "")
    get_token = any(args[i:i + 2] == ["eks", "get-token"] for i in range(len(args)))
    if Path(command).name == "aws" and get_token and "--cluster-name" in args:
        cluster = args[args.index("--cluster-name") + 1]
        region = args[args.index("--region") + 1] if "--region" in args else region
        return _CachedToken(lambda: eks_token(cluster, region))

    def run() -> str:
        env = {**os.environ, **{e["name"]: e["value"] for e in spec.get("env") or []}}
        out = subprocess.run([command, *args], capture_output=True, text=True, env=env, timeout=60)
        if out.returncode != 0:
            raise KubeConfigError(f"kubeconfig exec plugin {command} exited {out.returncode}: {out.stderr.strip()[:300]}")
        return json.loads(out.stdout)["status"]["token"]

    return _CachedToken(run)


def from_kubeconfig(path: Path, region: str, namespace: str | None = None) -> Connection:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise KubeConfigError(f"no cluster configured: MMP_K8S_API_URL is not set and {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"{path} is not valid YAML: {exc}") from None
    current = cfg.get("current-context")
    named = lambda kind, name: next((i.get(kind[:-1]) or {} for i in cfg.get(kind) or [] if i.get("name") == name), None)  # noqa: E731
    context = named("contexts", current)
    if not current or context is None:
        raise KubeConfigError(f"{path}: current-context {current!r} is not one of its contexts")
    cluster = named("clusters", context.get("cluster"))
    if not cluster or not cluster.get("server"):
        raise KubeConfigError(f"{path}: context {current!r} names cluster {context.get('cluster')!r}, which has no server")
    user = named("users", context.get("user")) or {}
    base = path.parent
    ca = (_b64(cluster["certificate-authority-data"], f"{path}: certificate-authority-data")
          if cluster.get("certificate-authority-data")
          else _read(cluster["certificate-authority"], base) if cluster.get("certificate-authority") else None)
    token: Callable[[], str | None] = lambda: None  # noqa: E731
    if user.get("token"):
        token = lambda value=user["token"]: value  # noqa: E731
    elif user.get("tokenFile"):
        token = lambda file=user["tokenFile"]: _read(file, base).strip()  # noqa: E731
    elif user.get("exec"):
        token = _exec_token(user["exec"], region)
    cert = None
    if user.get("client-certificate-data") or user.get("client-certificate"):
        cert = (_b64(user["client-certificate-data"], "client-certificate-data") if user.get("client-certificate-data")
                else _read(user["client-certificate"], base),
                _b64(user["client-key-data"], "client-key-data") if user.get("client-key-data")
                else _read(user.get("client-key", ""), base))
    return Connection(server=cluster["server"].rstrip("/"), namespace=namespace or context.get("namespace") or DEFAULT_NAMESPACE,
                      ca_pem=ca, insecure=bool(cluster.get("insecure-skip-tls-verify")), token=token, client_cert=cert)


def connection(settings: KubernetesSettings) -> Connection:
    """The cluster the settings name (MMP_K8S_API_URL), else the kubeconfig's current context."""
    if settings.api_url:
        ca = _b64(settings.ca_data, "MMP_K8S_CA_DATA") if settings.ca_data else None
        token: Callable[[], str | None] = lambda: None  # noqa: E731
        if settings.cluster_name:
            token = _CachedToken(lambda: eks_token(settings.cluster_name or "", settings.region))
        elif os.environ.get("MMP_K8S_TOKEN_FILE"):  # a service account's projected token, in a pod
            token = lambda: Path(os.environ["MMP_K8S_TOKEN_FILE"]).read_text().strip()  # noqa: E731
        return Connection(server=settings.api_url, namespace=settings.namespace or DEFAULT_NAMESPACE, ca_pem=ca,
                          token=token)
    path = Path(settings.kubeconfig).expanduser() if settings.kubeconfig else Path.home() / ".kube" / "config"
    return from_kubeconfig(path, settings.region, settings.namespace)


class KubeClient:
    """The verbs MMP needs: get, list, create (strict), delete (foreground), pod logs."""

    def __init__(self, conn: Connection, timeout: float = 30.0):
        self.conn, self.timeout = conn, timeout
        self._ssl = conn.ssl_context()

    @property
    def namespace(self) -> str:
        return self.conn.namespace

    def request(self, method: str, path: str, *, body: Any = None, query: dict[str, str] | None = None,
                raw: bool = False) -> Any:
        url = self.conn.server + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        token = self.conn.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                status = json.loads(text)
                reason, message = status.get("reason") or exc.reason, status.get("message") or text
            except ValueError:
                reason, message = exc.reason, text[:500]
            raise KubeError(exc.code, str(reason), str(message)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise KubeError(0, "Unreachable", f"{self.conn.server}: {getattr(exc, 'reason', exc)}") from None
        if raw:
            return payload.decode(errors="replace")
        return json.loads(payload) if payload else {}

    # -- paths ---------------------------------------------------------------------------
    def path(self, api_version: str, plural: str, name: str | None = None, namespace: str | None = None) -> str:
        root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        ns = namespace or self.namespace
        return f"{root}/namespaces/{ns}/{plural}" + (f"/{urllib.parse.quote(name)}" if name else "")

    def get(self, api_version: str, plural: str, name: str) -> dict | None:
        try:
            return self.request("GET", self.path(api_version, plural, name))
        except KubeError as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, selector: str) -> list[dict]:
        return self.request("GET", self.path(api_version, plural), query={"labelSelector": selector}).get("items") or []

    def create(self, api_version: str, plural: str, obj: dict) -> dict:
        return self.request("POST", self.path(api_version, plural), body=obj, query={"fieldValidation": "Strict"})

    def delete(self, api_version: str, plural: str, name: str) -> bool:
        """Delete with foreground propagation (dependents first); False when it was already gone."""
        try:
            self.request("DELETE", self.path(api_version, plural, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
            return True
        except KubeError as exc:
            if exc.code == 404:
                return False
            raise

    def pod_logs(self, pod: str, *, since_time: str | None = None) -> str:
        query = {"timestamps": "true"}
        if since_time:
            query["sinceTime"] = since_time
        return self.request("GET", self.path("v1", "pods", pod) + "/log", query=query, raw=True)
