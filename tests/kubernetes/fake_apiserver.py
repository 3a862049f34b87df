"""A small, stateful stand-in for a Kubernetes API server with Kubeflow Trainer installed, owned by MMP.

Real HTTP on 127.0.0.1. What it does as the API server does (assumptions, until recorded responses
from a real cluster replace them; docs/kubernetes.md lists them):
* POST validates with tests/kubernetes/crd.py (the pinned CRDs: schema, strict unknown fields,
  list-map keys, CEL; ObjectMeta) and Trainer's webhook checks, answering a `Status` with 422
  Invalid; 409 AlreadyExists on re-create; 404 NotFound; DELETE with `propagationPolicy:
  Foreground` keeps the object (deletionTimestamp set) until its dependents are gone, one poll later.
* Writes without `fieldValidation=Strict` are refused (400), so MMP never relies on silent drops.
* Every request is authorised as the RBAC authoriser does for a namespaced Role: its verb (get, list,
  watch, create, update, patch, delete, deletecollection), API group, resource or `resource/subresource`
  (pods/log) and namespace must match one of `rules` (by default the Role the Pulumi program gives the
  runner, mmp.infra.kubernetes.RBAC_RULES, in `namespace`); anything else is answered 403 Forbidden in
  the API server's words, and noted in `forbidden`.
* The bearer token is checked as EKS checks it: `k8s-aws-v1.` + base64url of a presigned STS
  GetCallerIdentity URL for the cluster's region, whose SigV4 signature (recomputed here with the
  test's credentials) covers `host` and `x-k8s-aws-id: <cluster>`, and which has not expired.
  Or a fixed token, as a kubeconfig user gives one.
* What Trainer and the kubelet do is scripted: a TrainJob's pods appear at once, then each GET of the
  TrainJob advances its lifecycle one step: success, failure, deadline, unschedulable, imagepull,
  deleted (out of band), running (never ends by itself). The launcher's log grows with timestamped lines.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mmp.infra.kubernetes import RBAC_RULES

from . import crd

RUNNER_USER = "mmp-runner"  # how the fake names the caller in a 403 (EKS: the access entry's user)
LIFECYCLES = ("success", "failure", "deadline", "unschedulable", "imagepull", "deleted", "running")
FAILURE_SUMMARY = "horovodrun exited 1: rank 1: ValueError: loss is NaN"
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
# What `mmp run` from a workstation does beyond the runner's Role: without an S3 copy of the commit the
# code travels in a ConfigMap it creates, and deletes at teardown (docs/kubernetes.md lists both).
CODE_CONFIGMAP_RULE = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "delete"]}
WORKSTATION_RULES = [*RBAC_RULES, CODE_CONFIGMAP_RULE]
RESOURCES = {  # (group/version, plural) -> kind
    ("trainer.kubeflow.org/v1alpha1", "trainjobs"): "TrainJob",
    ("trainer.kubeflow.org/v1alpha1", "trainingruntimes"): "TrainingRuntime",
    ("v1", "configmaps"): "ConfigMap",
    ("v1", "pods"): "Pod",
}


def self_signed(folder: Path) -> tuple[Path, Path, str]:
    """A certificate for 127.0.0.1 (IP SAN), its key, and its PEM (the CA a client trusts)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem", pem.decode()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sigv4_ok(url: str, cluster: str, region: str, secret_key: str) -> str | None:
    """Why the presigned STS URL is not a valid EKS token for `cluster`, or None."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    one = {k: v[0] for k, v in query.items()}
    if parts.scheme != "https" or parts.netloc != f"sts.{region}.amazonaws.com":
        return f"signed host {parts.netloc!r} is not sts.{region}.amazonaws.com"
    if one.get("Action") != "GetCallerIdentity" or one.get("Version") != "2011-06-15":
        return "not a GetCallerIdentity request"
    signed = one.get("X-Amz-SignedHeaders", "").split(";")
    if "host" not in signed or "x-k8s-aws-id" not in signed:
        return f"signed headers {signed} lack host or x-k8s-aws-id"
    try:
        issued = dt.datetime.strptime(one["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        expires = int(one["X-Amz-Expires"])
    except (KeyError, ValueError):
        return "no X-Amz-Date / X-Amz-Expires"
    if expires > 900 or dt.datetime.now(dt.timezone.utc) > issued + dt.timedelta(seconds=15 * 60):
        return "token expired"
    credential = one.get("X-Amz-Credential", "").split("/")
    if len(credential) != 5 or credential[2] != region or credential[3] != "sts":
        return f"credential scope {credential} is not {region}/sts"
    headers = {"host": parts.netloc, "x-k8s-aws-id": cluster}
    canonical_query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted((k, v) for k, v in one.items() if k != "X-Amz-Signature"))
    canonical = "\n".join(["GET", parts.path or "/", canonical_query,
                           "".join(f"{h}:{headers[h]}\n" for h in signed), ";".join(signed),
                           hashlib.sha256(b"").hexdigest()])
    scope = "/".join(credential[1:])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", one["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in credential[1:]:
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, one.get("X-Amz-Signature", "")):
        return "signature does not match (wrong cluster header, host or credentials)"
    return None


@dataclass
class FakeCluster:
    namespace: str = "mmp"
    lifecycle: str = "success"
    token: str | None = None  # a fixed bearer token (a kubeconfig user's)
    eks_cluster: str | None = None  # check EKS tokens for this cluster instead
    region: str = "eu-west-1"
    secret_key: str = "testing"
    log_lines: tuple[str, ...] = ("mmp: launcher on host 0", "[0]<stdout>:epoch 1 loss 0.9", "[0]<stdout>:epoch 2 loss 0.5")
    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)  # (plural, ns, name)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    auth_failures: list[str] = field(default_factory=list)
    rules: list[dict] = field(default_factory=lambda: [dict(r) for r in RBAC_RULES])  # the Role, in `namespace`
    forbidden: list[str] = field(default_factory=list)  # every request RBAC refused
    created: list[dict] = field(default_factory=list)  # every object as stored at its creation
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- serving -----------------------------------------------------------------------------
    def start(self, tls_dir: "Path | None" = None) -> "FakeCluster":
        """Serve on 127.0.0.1; with `tls_dir`, over HTTPS with a self-signed certificate for 127.0.0.1
        (its PEM in `self.ca_pem`, what MMP_K8S_CA_DATA or certificate-authority-data carries)."""
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            # A client that connects and never finishes its TLS handshake holds only its own thread, for this
            # long: the handshake is made here, not in accept() on the serving thread (where it blocked
            # serve_forever, and so stop(), for good).
            timeout = 30

            def setup(self) -> None:
                super().setup()  # applies `timeout` to the connection
                if hasattr(self.connection, "do_handshake"):
                    self.connection.do_handshake()

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _answer(self, code: int, body: Any, raw: bool = False) -> None:
                data = body.encode() if raw else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                with cluster.lock:
                    code, body, raw = cluster.handle(method, self.path, dict(self.headers), self._body())
                cluster.requests.append((method, self.path, code))
                self._answer(code, body, raw)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls_dir is not None:
            import ssl

            cert, key, self.ca_pem = self_signed(tls_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- API ----------------------------------------------------------------------------------
    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict, bool]:
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code}, False

    def authorised(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return "no bearer token"
        token = auth.removeprefix("Bearer ")
        if self.eks_cluster:
            if not token.startswith("k8s-aws-v1."):
                return "not an EKS token"
            body = token.removeprefix("k8s-aws-v1.")
            try:
                url = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
            except ValueError:
                return "token is not base64url"
            return _sigv4_ok(url, self.eks_cluster, self.region, self.secret_key)
        return None if self.token is None or hmac.compare_digest(token, self.token) else "wrong token"

    def permitted(self, method: str, segs: list[str], query: dict[str, str]) -> tuple[int, Any, bool] | None:
        """RBAC's answer for a namespaced Role (`rules` in `namespace`): None when allowed, else the 403
        the API server gives (`<resource> "<name>" is forbidden: User … cannot <verb> resource …`)."""
        if segs[:2] == ["api", "v1"]:
            group, rest = "", segs[2:]
        elif segs[:1] == ["apis"] and len(segs) >= 3:
            group, rest = segs[1], segs[3:]
        else:
            group, rest = None, []
        namespaced = len(rest) >= 3 and rest[0] == "namespaces"
        ns = rest[1] if namespaced else None
        resource = rest[2] if namespaced else (rest[0] if rest else "")
        at = 3 if namespaced else 1
        name = rest[at] if len(rest) > at else None
        sub = rest[4] if namespaced and len(rest) > 4 else None
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
        if method == "GET":
            verb = "get" if name else ("watch" if query.get("watch") in ("1", "true") else "list")
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        full = f"{resource}/{sub}" if sub else resource
        if group is not None and ns == self.namespace and any(
                verb in rule["verbs"] and group in rule["apiGroups"] and full in rule["resources"]
                for rule in self.rules):
            return None
        qualified = f"{resource}.{group}" if group else resource
        where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
        named = f' "{name}"' if name else ""
        message = (f'{qualified}{named} is forbidden: User "{RUNNER_USER}" cannot {verb} resource "{full}" '
                   f'in API group "{group or ""}"{where}')
        self.forbidden.append(message)
        return self.status(403, "Forbidden", message)

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, bool]:
        why = self.authorised(headers)
        if why:
            self.auth_failures.append(why)
            return self.status(401, "Unauthorized", "Unauthorized")
        parts = urllib.parse.urlsplit(raw_path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
        segs = [urllib.parse.unquote(s) for s in parts.path.strip("/").split("/")]
        refused = self.permitted(method, segs, query)
        if refused:
            return refused
        if segs[:2] == ["api", "v1"]:
            version, rest = "v1", segs[2:]
        elif segs[:1] == ["apis"] and len(segs) >= 3:
            version, rest = f"{segs[1]}/{segs[2]}", segs[3:]
        else:
            return self.status(404, "NotFound", f"the server could not find the requested resource ({parts.path})")
        if len(rest) < 3 or rest[0] != "namespaces" or (version, rest[2]) not in RESOURCES:
            return self.status(404, "NotFound", f"the server could not find the requested resource ({parts.path})")
        ns, plural = rest[1], rest[2]
        name = rest[3] if len(rest) > 3 else None
        sub = rest[4] if len(rest) > 4 else None
        if method == "POST" and name is None:
            return self.create(version, plural, ns, body, query)
        if method == "GET" and name is None:
            return 200, {"kind": "List", "items": self.select(plural, ns, query.get("labelSelector", ""))}, False
        if method == "GET" and sub == "log":
            return self.pod_log(ns, name, query)
        if method == "GET":
            if plural == "trainjobs":
                self.advance(ns, name)
            obj = self.objects.get((plural, ns, name))
            return (200, obj, False) if obj else self.status(404, "NotFound", f'{plural} "{name}" not found')
        if method == "DELETE":
            return self.delete(plural, ns, name, body or {})
        return self.status(405, "MethodNotAllowed", method)

    def select(self, plural: str, ns: str, selector: str) -> list[dict]:
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        return [obj for (p, n, _), obj in sorted(self.objects.items())
                if p == plural and n == ns and all((obj["metadata"].get("labels") or {}).get(k) == v
                                                   for k, v in wanted.items())]

    def create(self, version: str, plural: str, ns: str, obj: Any, query: dict) -> tuple[int, Any, bool]:
        kind = RESOURCES[(version, plural)]
        if query.get("fieldValidation") != "Strict":
            return self.status(400, "BadRequest", "this fake API server takes writes with fieldValidation=Strict only")
        if not isinstance(obj, dict):
            return self.status(400, "BadRequest", "body is not a JSON object")
        meta = obj.get("metadata") or {}
        if meta.get("namespace", ns) != ns:
            return self.status(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
        if kind == "ConfigMap":
            problems = crd.metadata_problems(meta) + [f'unknown field "{k}"' for k in obj
                                                      if k not in ("apiVersion", "kind", "metadata", "data", "binaryData", "immutable")]
            size = sum(len(v) for v in (obj.get("binaryData") or {}).values())
            if size > 1024 * 1024:
                problems.append("ConfigMap is too long: must have at most 1048576 bytes")
            for v in (obj.get("binaryData") or {}).values():
                try:
                    base64.b64decode(v, validate=True)
                except ValueError:
                    problems.append("binaryData: Invalid value: not base64")
        elif kind == "Pod":
            return self.status(403, "Forbidden", "MMP creates no pods")
        else:
            problems = crd.problems(obj, kind)
            if not problems and kind == "TrainJob":
                ref = obj["spec"]["runtimeRef"]
                runtime = self.objects.get(("trainingruntimes", ns, ref.get("name")))
                problems = crd.webhook_problems(obj, runtime)
        name = meta.get("name", "")
        if problems:
            return self.status(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems))
        if (plural, ns, name) in self.objects:
            return self.status(409, "AlreadyExists", f'{plural} "{name}" already exists')
        stored = crd.apply_defaults(json.loads(json.dumps(obj)), crd.schema(kind)) if kind in crd.CRD_FILES else obj
        stored["metadata"] = {**meta, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": now(),
                              "resourceVersion": "1"}
        self.objects[(plural, ns, name)] = stored
        self.created.append(json.loads(json.dumps(stored)))
        if kind == "TrainJob":
            self.steps[name] = 0
            self.make_pods(stored)
        return 201, stored, False

    def delete(self, plural: str, ns: str, name: str, options: dict) -> tuple[int, Any, bool]:
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            return self.status(404, "NotFound", f'{plural} "{name}" not found')
        if options.get("propagationPolicy") == "Foreground" and plural == "trainjobs":
            obj["metadata"]["deletionTimestamp"] = now()
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
            return 200, obj, False
        self.remove(plural, ns, name)
        return 200, {"kind": "Status", "status": "Success"}, False

    def remove(self, plural: str, ns: str, name: str) -> None:
        obj = self.objects.pop((plural, ns, name), None)
        if obj is None:
            return
        uid = obj["metadata"]["uid"]
        for key, other in list(self.objects.items()):  # garbage collection by owner reference
            if any(ref.get("uid") == uid for ref in other["metadata"].get("ownerReferences") or []):
                self.remove(*key)
        if plural == "trainjobs":
            for key, pod in list(self.objects.items()):
                if key[0] == "pods" and (pod["metadata"].get("labels") or {}).get("jobset.sigs.k8s.io/jobset-name") == name:
                    self.objects.pop(key)

    # -- Trainer and the kubelet, scripted -------------------------------------------------------------
    def make_pods(self, job: dict) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        runtime = self.objects[("trainingruntimes", ns, job["spec"]["runtimeRef"]["name"])]
        nodes = job["spec"]["trainer"].get("numNodes", 1)
        jobs = {j["name"] for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        names = [("launcher", 0)] + ([("node", i) for i in range(max(nodes - 1, 1))] if "node" in jobs else [])
        for rjob, index in names:
            pod_name = f"{name}-{rjob}-0-{index}-{uuid.uuid4().hex[:5]}"
            assert len(pod_name) <= 63, pod_name
            self.objects[("pods", ns, pod_name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": {
                    "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob}},
                "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                           "containerStatuses": [{"name": "node", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
            }
        self.logs[name] = []

    def pods_of(self, ns: str, name: str) -> list[dict]:
        return self.select("pods", ns, f"jobset.sigs.k8s.io/jobset-name={name}")

    def advance(self, ns: str, name: str) -> None:
        """One step of the job's scripted life, at each GET of the TrainJob."""
        job = self.objects.get(("trainjobs", ns, name))
        if job is None:
            return
        if job["metadata"].get("deletionTimestamp"):  # foreground: dependents went on the previous step
            self.remove("trainjobs", ns, name)
            return
        step = self.steps[name] = self.steps[name] + 1
        pods = self.pods_of(ns, name)
        launcher = next(p for p in pods if p["metadata"]["labels"]["jobset.sigs.k8s.io/replicatedjob-name"] == "launcher")
        life = self.lifecycle
        if life == "unschedulable":
            for pod in pods:
                pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": UNSCHEDULABLE}]
            return
        if life == "imagepull":
            launcher["status"]["containerStatuses"][0]["state"] = {"waiting": {
                "reason": "ImagePullBackOff" if step > 1 else "ErrImagePull",
                "message": f'Back-off pulling image "{job["spec"]["runtimeRef"]["name"]}"'}}
            return
        if step == 1:
            for pod in pods:
                pod["status"]["phase"] = "Running"
                pod["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": now()}}
            self.log(name, self.log_lines[0])
            return
        if step == 2:
            for line in self.log_lines[1:]:
                self.log(name, line)
            return
        if life == "deleted":
            self.remove("trainjobs", ns, name)
            return
        if life == "running":  # trains until deleted (a cancel) or its deadline
            return
        if life == "success":
            condition = {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "jobset completed"}
            exit_code, message, phase = 0, "", "Succeeded"
        elif life == "failure":
            condition = {"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "jobset failed"}
            exit_code, message, phase = 1, FAILURE_SUMMARY, "Failed"
        else:  # deadline
            condition = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                         "message": "TrainJob exceeded its active deadline"}
            exit_code, message, phase = 137, "", "Failed"
        launcher["status"]["phase"] = phase
        launcher["status"]["containerStatuses"][0]["state"] = {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}}
        job.setdefault("status", {})["conditions"] = [
            {**condition, "lastTransitionTime": now(), "lastUpdateTime": now()}]

    def log(self, name: str, line: str) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.logs.setdefault(name, []).append(f"{stamp} {line}")

    def pod_log(self, ns: str, pod_name: str, query: dict) -> tuple[int, Any, bool]:
        pod = self.objects.get(("pods", ns, pod_name))
        if pod is None:
            return self.status(404, "NotFound", f'pods "{pod_name}" not found')
        if pod["status"]["phase"] == "Pending":
            return self.status(400, "BadRequest", f'container "node" in pod "{pod_name}" is waiting to start')
        lines = self.logs.get(pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"], [])
        since = query.get("sinceTime")
        if since:
            lines = [line for line in lines if line[:19] + "Z" >= since]
        return 200, "".join(line + "\n" for line in lines), True
