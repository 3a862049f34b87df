"""What the API server checks before it stores a Trainer object, from the vendored CRDs of the pinned tag.

* The structural OpenAPI schema: types (int32/int64 ranges, int-or-string), enums, patterns,
  lengths, item counts, minimum, required fields.
* Unknown fields refused, as with `fieldValidation=Strict` (without it the API server drops
  them silently and the object does something else than MMP meant).
* `x-kubernetes-list-type`: map (each key present, no two items with the same keys), set (no
  duplicates).
* The CRDs' CEL rules (`x-kubernetes-validations`, evaluated with cel-python after the schema's
  defaults are applied, as the API server does); transition rules (`oldSelf`) do not run on create.
* ObjectMeta: name (DNS-1123 subdomain), namespace, label keys and values, known fields only.

The Trainer webhook's own checks that matter to MMP (runtimePatches naming existing jobs and
containers, no env on the `node` containers through a patch, reserved MPI env names) are in
`webhook_problems`. Returned as `path: message` strings, empty when the object would be accepted.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kubeflow-trainer"
CRD_FILES = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
             "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml"}
INT32 = (-(2 ** 31), 2 ** 31 - 1)
INT64 = (-(2 ** 63), 2 ** 63 - 1)
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "ownerReferences", "finalizers",
               "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
               "deletionGracePeriodSeconds", "managedFields", "selfLink"}
OWNER_REFERENCE = {"apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion"}


@lru_cache(maxsize=None)
def crd(kind: str) -> dict:
    return yaml.safe_load((FIXTURES / CRD_FILES[kind]).read_text())


def crd_tag() -> str:
    """The Trainer tag the vendored CRDs come from (tests/fixtures/README.md records it)."""
    text = (FIXTURES.parent / "README.md").read_text()
    match = re.search(r"kubeflow/trainer.*?tag `v([0-9.]+)`", text)
    assert match, "tests/fixtures/README.md must name the Trainer tag of the vendored CRDs"
    return match.group(1)


def schema(kind: str, version: str = "v1alpha1") -> dict:
    for v in crd(kind)["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} has no version {version}")


# -- defaults ------------------------------------------------------------------------
def apply_defaults(value: Any, s: dict) -> Any:
    """The object as the API server stores it: schema defaults filled in, recursively."""
    if isinstance(value, dict) and s.get("properties"):
        for key, sub in s["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, dict) and isinstance(s.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(value[key], s["additionalProperties"])
    elif isinstance(value, list) and isinstance(s.get("items"), dict):
        return [apply_defaults(item, s["items"]) for item in value]
    return value


# -- structural schema ---------------------------------------------------------------
def _type_ok(value: Any, s: dict) -> str | None:
    if s.get("x-kubernetes-int-or-string"):
        return None if isinstance(value, (int, str)) and not isinstance(value, bool) else "must be an integer or a string"
    kind = s.get("type")
    if value is None:
        return None if s.get("nullable") else f"must be of type {kind}, not null"
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    if kind in checks and not checks[kind](value):
        return f"must be of type {kind}, got {type(value).__name__}"
    if kind == "integer":
        low, high = INT32 if s.get("format") == "int32" else INT64
        if not low <= value <= high:
            return f"{value} is out of range for {s.get('format') or 'int64'}"
    return None


def _list_problems(value: list, s: dict, path: str) -> list[str]:
    kind = s.get("x-kubernetes-list-type")
    out = []
    if kind == "map":
        keys = s.get("x-kubernetes-list-map-keys") or []
        seen = set()
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            missing = [k for k in keys if k not in item and "default" not in (s["items"].get("properties") or {}).get(k, {})]
            if missing:
                out.append(f"{path}[{i}]: Required value: list-map key {', '.join(missing)}")
                continue
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                out.append(f"{path}[{i}]: Duplicate value: {dict(zip(keys, (item.get(k) for k in keys)))}")
            seen.add(key)
    elif kind == "set":
        seen_items: list = []
        for i, item in enumerate(value):
            if item in seen_items:
                out.append(f"{path}[{i}]: Duplicate value: {item!r}")
            seen_items.append(item)
    return out


def structural_problems(value: Any, s: dict, path: str) -> list[str]:
    problem = _type_ok(value, s)
    if problem:
        return [f"{path}: Invalid value: {problem}"]
    if value is None:
        return []
    out: list[str] = []
    if "enum" in s and value not in s["enum"]:
        out.append(f"{path}: Unsupported value: {value!r}: supported values: {', '.join(map(repr, s['enum']))}")
    if isinstance(value, str):
        if "maxLength" in s and len(value) > s["maxLength"]:
            out.append(f"{path}: Too long: may not be more than {s['maxLength']} bytes")
        if "minLength" in s and len(value) < s["minLength"]:
            out.append(f"{path}: Invalid value: shorter than {s['minLength']}")
        patterns = [s.get("pattern")] + [a.get("pattern") for a in s.get("anyOf", []) if a.get("type") == "string"]
        for pattern in filter(None, patterns):
            if not re.search(pattern, value):
                out.append(f"{path}: Invalid value: {value!r}: should match {pattern!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in s and value < s["minimum"]:
            out.append(f"{path}: Invalid value: {value}: should be greater than or equal to {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            out.append(f"{path}: Invalid value: {value}: should be less than or equal to {s['maximum']}")
    if isinstance(value, list):
        if "maxItems" in s and len(value) > s["maxItems"]:
            out.append(f"{path}: Too many: {len(value)}: must have at most {s['maxItems']} items")
        if "minItems" in s and len(value) < s["minItems"]:
            out.append(f"{path}: Invalid value: must have at least {s['minItems']} items")
        out += _list_problems(value, s, path)
        if isinstance(s.get("items"), dict):
            for i, item in enumerate(value):
                out += structural_problems(item, s["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = s.get("properties")
        extra = s.get("additionalProperties")
        for key in s.get("required") or []:
            if key not in value:
                out.append(f"{path}.{key}: Required value")
        if "maxProperties" in s and len(value) > s["maxProperties"]:
            out.append(f"{path}: Too many: {len(value)}: must have at most {s['maxProperties']} items")
        for key, item in value.items():
            if props and key in props:
                out += structural_problems(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += structural_problems(item, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                if not s.get("x-kubernetes-preserve-unknown-fields"):
                    out.append(f'{path}: unknown field "{key}"')
    return out


# -- CEL ---------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_problems(value: Any, s: dict, path: str) -> list[str]:
    import celpy

    out: list[str] = []
    for check in s.get("x-kubernetes-validations") or []:
        rule = check["rule"]
        if "oldSelf" in rule:  # a transition rule: not evaluated on create
            continue
        try:
            ok = _program(rule).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # an evaluation error is a rejection too
            out.append(f"{path}: Invalid value: rule {rule!r} could not be evaluated: {exc}")
            continue
        if not bool(ok):
            out.append(f"{path}: Invalid value: {check.get('message') or 'failed rule: ' + rule}")
    if isinstance(value, dict):
        props = s.get("properties") or {}
        extra = s.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub:
                out += cel_problems(item, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_problems(item, s["items"], f"{path}[{i}]")
    return out


# -- ObjectMeta ------------------------------------------------------------------------------
def label_problems(labels: Any, path: str) -> list[str]:
    if not isinstance(labels, dict):
        return [f"{path}: Invalid value: must be a map of strings"]
    out = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
            out.append(f"{path}: Invalid value: {key!r}: prefix part must be a DNS-1123 subdomain")
        if not name or len(name) > 63 or not LABEL_NAME.match(name):
            out.append(f"{path}: Invalid value: {key!r}: name part must be 63 characters or less, alphanumeric, "
                       "'-', '_' or '.', starting and ending with an alphanumeric character")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            out.append(f"{path}: Invalid value: {value!r}: a label value must be 63 characters or less, "
                       "empty or alphanumeric with '-', '_' or '.' inside")
    return out


def metadata_problems(meta: Any, *, namespaced: bool = True) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: Required value"]
    out = [f'metadata: unknown field "{k}"' for k in meta if k not in OBJECT_META]
    name = meta.get("name")
    if not name:
        out.append("metadata.name: Required value: name or generateName is required")
    elif not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        out.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower "
                   "case alphanumeric characters, '-' or '.'")
    ns = meta.get("namespace")
    if namespaced and ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS_LABEL.match(ns)):
        out.append(f"metadata.namespace: Invalid value: {ns!r}")
    if "labels" in meta:
        out += label_problems(meta["labels"], "metadata.labels")
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        out += [f'metadata.ownerReferences[{i}]: unknown field "{k}"' for k in ref if k not in OWNER_REFERENCE]
        out += [f"metadata.ownerReferences[{i}].{k}: Required value" for k in ("apiVersion", "kind", "name", "uid")
                if not ref.get(k)]
    return out


# -- the whole object ---------------------------------------------------------------------------
def problems(obj: dict, kind: str | None = None) -> list[str]:
    """Everything the API server would refuse in `obj` on create (strict field validation)."""
    kind = kind or obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: Unsupported value: {kind!r}"]
    definition = crd(kind)
    group = definition["spec"]["group"]
    out = []
    if obj.get("apiVersion") != f"{group}/v1alpha1":
        out.append(f"apiVersion: Invalid value: {obj.get('apiVersion')!r}: want {group}/v1alpha1")
    if obj.get("kind") != definition["spec"]["names"]["kind"]:
        out.append(f"kind: Invalid value: {obj.get('kind')!r}")
    out += metadata_problems(obj.get("metadata"))
    s = schema(kind)
    body = {k: v for k, v in obj.items() if k != "metadata"}
    root = {**s, "properties": {k: v for k, v in s["properties"].items() if k != "metadata"}}
    out += [p.removeprefix(".") for p in structural_problems(body, root, "")]
    if out:
        return out
    stored = apply_defaults(copy.deepcopy(obj), s)
    return [p.removeprefix(".") or "<object>" for p in cel_problems(stored, s, "")]


def webhook_problems(obj: dict, runtime: dict | None) -> list[str]:
    """What Trainer's validating webhook (v2.3.0, plugins/jobset and plugins/mpi) refuses in a TrainJob
    that MMP could send: a runtime that does not exist, runtime patches naming replicated jobs or
    containers the runtime lacks, env on the `node` container through a patch, reserved MPI env names."""
    spec = obj.get("spec") or {}
    if runtime is None:
        return [f"spec.runtimeRef: Not found: TrainingRuntime {spec.get('runtimeRef', {}).get('name')!r}"]
    jobs = {j["name"]: {c["name"] for c in j["template"]["spec"]["template"]["spec"].get("containers", [])}
            for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    out = []
    for patch in spec.get("runtimePatches") or []:
        if "/" not in patch.get("manager", ""):
            out.append("spec.runtimePatches.manager: Invalid value: must be a domain-prefixed path")
        for rjob in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                "replicatedJobs") or []:
            if rjob["name"] not in jobs:
                out.append("spec.runtimePatches: Invalid value: must not have replicated job that doesn't exist "
                           "in the runtime job template")
                continue
            pod = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in pod.get("containers") or []:
                if c["name"] not in jobs[rjob["name"]]:
                    out.append(f"spec.runtimePatches: Invalid value: must not have container that doesn't exist in "
                               f"the runtime job {rjob['name']}")
                elif c.get("env") and c["name"] == "node":
                    out.append("spec.runtimePatches: Invalid value: must not have envs for the dataset-initializer, "
                               "model-initializer, node containers")
    reserved = {"OMPI_MCA_orte_default_hostfile", "OMPI_MCA_plm_rsh_args", "OMPI_MCA_orte_keep_fqdn_hostnames",
                "OMPI_MCA_orte_set_default_slots"}
    bad = sorted({e.get("name") for e in (spec.get("trainer") or {}).get("env") or []} & reserved)
    if bad:
        out.append(f"spec.trainer.env: Invalid value: must not have reserved envs, invalid envs configured: {bad}")
    return out
