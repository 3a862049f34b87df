"""The Kubeflow Trainer objects one run needs, as plain dicts (JSON for the API server). Pure: no I/O.

* A namespaced `TrainingRuntime` per training image (`deps-<hash>`, mmp.contract.image) and shape
  (GPUs per pod; one host or several), created if absent and shared by every run of that shape.
  Why one per image: at Trainer v2.3.0 a TrainJob's `spec.trainer.image` lands only on the
  replicatedJob labelled `trainer.kubeflow.org/trainjob-ancestor-step: trainer` (the launcher,
  pkg/runtime/framework/plugins/jobset/builder.go), never on the MPI `node` pods; labelling `node`
  too would also put the TrainJob's command on the nodes and replace their sshd (kubeflow/trainer
  issue 4030). So the image lives in the runtime, on both.
  - `multi`: an MPI policy with `runLauncherAsNode: true`; `node` pods run sshd on SSH_PORT,
    the launcher waits for them (dependsOn Ready) and runs mmp.runtime.kubernetes_launcher.
  - `single` (Instance_Count 1): the launcher alone. With `runLauncherAsNode` Trainer still
    makes max(numNodes - 1, 1) node pods when a `node` job exists, so it has none.
* A `TrainJob` per run: numNodes, numProcPerNode, the train.py arguments (`spec.trainer.args`),
  the run's environment (`spec.trainer.env`, which Trainer puts on the launcher and, with
  runLauncherAsNode, on the nodes), `activeDeadlineSeconds` (Max_Runtime plus slack), and a
  `runtimePatches` entry (manager mmp/kubernetes-backend) for what varies by cluster or run: the
  service account, node selector, tolerations, the FSx claim at /fsx and, when the code has no
  S3 copy, the ConfigMap that carries the commit's archive.
* That ConfigMap (binaryData, under the API server's 1 MiB object limit), owned by the TrainJob.

Every field is checked against the CRDs of the pinned Trainer tag in tests/kubernetes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mmp.backends.kubernetes import TRAINER_VERSION
from mmp.backends.kubernetes.settings import FSX_MOUNT, SSH_PORT

GROUP = "trainer.kubeflow.org"
API_VERSION = f"{GROUP}/v1alpha1"
ANCESTOR_LABEL = f"{GROUP}/trainjob-ancestor-step"
LAUNCHER, NODE = "launcher", "node"  # Trainer's replicatedJob names; the container is `node` in both
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet's pod labels (the JobSet is named as the TrainJob)
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
MANAGED_BY = "app.kubernetes.io/managed-by"
RUN_LABEL = "mmp/run-id"
IMAGE_LABEL = "mmp/image-tag"
PATCH_MANAGER = "mmp/kubernetes-backend"
GPU_RESOURCE = "nvidia.com/gpu"
SSH_MOUNT = "/etc/mmp/ssh"  # Trainer mounts the run's key Secret here (id_rsa 0640, authorized_keys 0644)
CODE_MOUNT = "/etc/mmp/code"  # the commit's archive, when it travels in a ConfigMap
CODE_KEY = "code.tar.gz"
LAUNCHER_COMMAND = ("python", "-m", "mmp.runtime.kubernetes_launcher")
# sshd on the nodes: its own port, only the run's key (Trainer's Secret volume is root-owned but its
# directories are symlinks sshd's StrictModes refuses, the reason mpi-operator images set it too).
SSHD_COMMAND = ("/usr/sbin/sshd", "-De", "-p", str(SSH_PORT), "-o", f"AuthorizedKeysFile={SSH_MOUNT}/authorized_keys",
                "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no")
# The TrainJob's name: JobSet names pods <jobset>-<replicatedJob>-<i>-<j>-<5 random> within 63
# characters, and its webhook refuses a JobSet whose longest pod name would not fit; with
# `launcher` that leaves 44 for the TrainJob (the JobSet has its name).
TRAINJOB_NAME_MAX = 63 - len(f"-{LAUNCHER}-0-0-xxxxx")
NAME_MAX = 63
CONFIGMAP_LIMIT = 1024 * 1024 - 16 * 1024  # the API server's 1 MiB object limit, minus room for metadata
# Trainer refuses these in spec.trainer.env (constants.MPIReservedEnvNames).
MPI_RESERVED_ENV = ("OMPI_MCA_orte_default_hostfile", "OMPI_MCA_plm_rsh_args", "OMPI_MCA_orte_keep_fqdn_hostnames",
                    "OMPI_MCA_orte_set_default_slots")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ObjectError(ValueError):
    """An object that cannot be built (too big a code archive, a bad name)."""


def _slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", text.lower())).strip("-")


def trainjob_name(experiment_name: str, run_id: str) -> str:
    """`mmp-<experiment slug>-<run id 12>`: an RFC 1035 label within TRAINJOB_NAME_MAX; the run id
    (MLflow's, unique) keeps two runs of one experiment apart."""
    tail = _slug(run_id)[:12] or hashlib.sha256(run_id.encode()).hexdigest()[:12]
    room = TRAINJOB_NAME_MAX - len("mmp-") - len(tail) - 1
    slug = _slug(experiment_name)[:room].strip("-")
    name = "-".join(p for p in ("mmp", slug, tail) if p)
    assert _DNS_LABEL.match(name) and len(name) <= TRAINJOB_NAME_MAX, name
    return name


@dataclass(frozen=True)
class RuntimeShape:
    """What a TrainingRuntime fixes: the image, GPUs per pod, one host or several."""

    image: str
    image_tag: str
    gpus: int = 0
    multi: bool = False

    def spec(self) -> dict[str, Any]:
        container = {"name": NODE, "image": self.image}
        if self.gpus:
            container["resources"] = {"limits": {GPU_RESOURCE: self.gpus}}
        launcher_container = {**container, "command": list(LAUNCHER_COMMAND)}
        launcher = {
            "name": LAUNCHER,
            "template": {
                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [launcher_container]}}},
            },
        }
        jobs = [launcher]
        if self.multi:
            node_container = {**container, "command": list(SSHD_COMMAND),
                              "ports": [{"name": "ssh", "containerPort": SSH_PORT, "protocol": "TCP"}],
                              "readinessProbe": {"tcpSocket": {"port": SSH_PORT}, "periodSeconds": 2}}
            node = {"name": NODE, "template": {"spec": {"template": {"spec": {
                "restartPolicy": "Never", "containers": [node_container]}}}}}
            launcher["dependsOn"] = [{"name": NODE, "status": "Ready"}]
            jobs = [node, launcher]
        return {
            "mlPolicy": {"numNodes": 1, "mpi": {"numProcPerNode": 1, "mpiImplementation": "OpenMPI",
                                                 "sshAuthMountPath": SSH_MOUNT, "runLauncherAsNode": True}},
            "template": {"spec": {
                "network": {"publishNotReadyAddresses": True},
                "successPolicy": {"operator": "All", "targetReplicatedJobs": [LAUNCHER]},
                # Horovod cannot lose a rank and go on: one failed pod fails the job, no restarts.
                "failurePolicy": {"maxRestarts": 0},
                "replicatedJobs": jobs,
            }},
        }

    def name(self) -> str:
        """`mmp-<image tag>-<single|multi>-<digest>`: the digest covers the whole spec, so a runtime
        made by another MMP version (or for another image URI) is never reused by mistake."""
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:8]
        tag = _slug(self.image_tag)[: NAME_MAX - len("mmp--single-") - len(digest)].strip("-")
        return f"mmp-{tag}-{'multi' if self.multi else 'single'}-{digest}"


def training_runtime(shape: RuntimeShape, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRuntime",
        "metadata": {"name": shape.name(), "namespace": namespace, "labels": {
            MANAGED_BY: "mmp", IMAGE_LABEL: _slug(shape.image_tag)[:63].strip("-"),
            f"{GROUP}/framework": "mpi", "mmp/trainer-version": TRAINER_VERSION}},
        "spec": shape.spec(),
    }


@dataclass(frozen=True)
class JobPlan:
    """One run's TrainJob: everything the backend decided before talking to the cluster."""

    name: str
    namespace: str
    runtime: RuntimeShape
    run_id: str
    num_nodes: int
    procs_per_node: int
    args: tuple[str, ...]
    env: Mapping[str, str]
    deadline_seconds: int
    fsx_claim: str
    service_account: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    code_configmap: str | None = None  # the archive's ConfigMap, when there is no S3 copy


def _pod_patch(plan: JobPlan, *, launcher: bool) -> dict[str, Any]:
    volumes = [{"name": "fsx", "persistentVolumeClaim": {"claimName": plan.fsx_claim}}]
    mounts = [{"name": "fsx", "mountPath": FSX_MOUNT}]
    if launcher and plan.code_configmap:
        volumes.append({"name": "mmp-code", "configMap": {"name": plan.code_configmap}})
        mounts.append({"name": "mmp-code", "mountPath": CODE_MOUNT, "readOnly": True})
    spec: dict[str, Any] = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
    if plan.service_account:
        spec["serviceAccountName"] = plan.service_account
    if plan.node_selector:
        spec["nodeSelector"] = dict(plan.node_selector)
    if plan.tolerations:
        spec["tolerations"] = [dict(t) for t in plan.tolerations]
    return {"template": {"spec": {"template": {"spec": spec}}}}


def train_job(plan: JobPlan) -> dict[str, Any]:
    reserved = sorted(set(plan.env) & set(MPI_RESERVED_ENV))
    if reserved:
        raise ObjectError(f"environment variables {', '.join(reserved)} are reserved by Trainer's MPI plugin")
    jobs = [LAUNCHER] + ([NODE] if plan.runtime.multi else [])
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": plan.name, "namespace": plan.namespace,
                     "labels": {MANAGED_BY: "mmp", RUN_LABEL: _slug(plan.run_id)[:63].strip("-")}},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": plan.runtime.name()},
            "trainer": {
                "numNodes": plan.num_nodes,
                "numProcPerNode": plan.procs_per_node,
                "args": list(plan.args),
                "env": [{"name": k, "value": v} for k, v in plan.env.items()],
            },
            "activeDeadlineSeconds": plan.deadline_seconds,
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": job, **_pod_patch(plan, launcher=job == LAUNCHER)} for job in jobs],
            }}}}],
        },
    }


def code_configmap(name: str, namespace: str, archive: bytes, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The commit's archive as binaryData; owned by the TrainJob, so deleting it removes the archive."""
    encoded = base64.b64encode(archive).decode()
    if len(encoded) > CONFIGMAP_LIMIT:
        raise ObjectError(f"the commit's code archive is {len(archive)} bytes; a ConfigMap carries at most about "
                          f"{CONFIGMAP_LIMIT * 3 // 4} (stage it in S3: MMP_ARTIFACTS_BUCKET, as the AWS pipeline does)")
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {MANAGED_BY: "mmp"}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": "TrainJob", "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"], "controller": False,
                                    "blockOwnerDeletion": False}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "binaryData": {CODE_KEY: encoded}}


def launcher_selector(name: str) -> str:
    """The label selector of a TrainJob's launcher pod."""
    return f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={LAUNCHER}"


def job_selector(name: str) -> str:
    return f"{JOBSET_NAME_LABEL}={name}"
