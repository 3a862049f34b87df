"""The `kubernetes` backend: one Kubeflow Trainer TrainJob per run, on any cluster with Trainer installed.

launch: the TrainingRuntime of the run's image and shape (created if absent, shared), the TrainJob
(objects.py), and, when the commit's code has no S3 copy, a ConfigMap carrying its archive, owned
by the TrainJob. The launcher pod runs mmp.runtime.kubernetes_launcher; the job's end is Trainer's.

status: the TrainJob's conditions (Complete / Failed, DeadlineExceeded included), with the launcher's
termination message (the failure summary it writes to /dev/termination-log) when it failed; before
that, the pods: an image that cannot be pulled fails the run at once, and a pod that cannot be
scheduled reports the scheduler's message (`0/3 nodes are available: 3 Insufficient nvidia.com/gpu`)
while the run stays pending (nodes may be scaling up; activeDeadlineSeconds bounds the wait).
A TrainJob that disappears without MMP's cancel fails the run (deleted out of band).

logs: the launcher pod's log, with timestamps; the cursor is the last timestamp read (and how many
lines carried it), so each poll asks only `sinceTime` onwards.

cancel / teardown: delete the TrainJob with foreground propagation (its JobSet, pods, Trainer's
Secret and ConfigMap, and MMP's code ConfigMap go with it) and the code ConfigMap by name; a 404
is success, so both are safe to call twice. The shared TrainingRuntime stays.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmp.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, Paths
from mmp.backends.dlami import GPU_SLOTS, fsx_paths
from mmp.backends.kubernetes import objects as o
from mmp.backends.kubernetes.client import KubeClient, KubeConfigError, KubeError, connection
from mmp.backends.kubernetes.settings import FSX_MOUNT, SSH_PORT, KubernetesSettings, SettingsError
from mmp.backends.train_environ import cluster_rank_environ
from mmp.contract.argv import train_args
from mmp.contract.experiment import Experiment

log = logging.getLogger("mmp.kubernetes")

TRAINER = (o.API_VERSION, "trainjobs")
RUNTIMES = (o.API_VERSION, "trainingruntimes")
CONFIGMAPS = ("v1", "configmaps")
PODS = ("v1", "pods")
# Waiting reasons of a container whose image will not come: fail now, not at the deadline.
IMAGE_PULL_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
GPU_FAMILY = re.compile(r"^(p|g|trn|inf|dl)\d")
EC2_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_TIMESTAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z ?(.*)$")


def gpus_of(instance_type: str) -> int | None:
    """GPUs per node of an EC2 instance type; 0 for a CPU type; None for a GPU family MMP does not know."""
    if instance_type in GPU_SLOTS:
        return GPU_SLOTS[instance_type]
    return None if GPU_FAMILY.match(instance_type) else 0


class KubernetesBackend(Backend):
    name = "kubernetes"
    poll_seconds = 5.0

    def __init__(self, settings: KubernetesSettings | None = None, *, client: KubeClient | None = None,
                 poll_seconds: float | None = None):
        import os

        raw = os.environ.get("MMP_K8S_POLL_SECONDS", "").strip()
        self.poll_seconds = poll_seconds or (float(raw) if raw else type(self).poll_seconds)
        self._settings_error: str | None = None
        try:
            self.settings = settings or KubernetesSettings.from_env()
        except SettingsError as exc:
            self.settings, self._settings_error = KubernetesSettings(), str(exc)
        self._client = client

    def client(self) -> KubeClient:
        if self._client is None:
            try:
                self._client = KubeClient(connection(self.settings))
            except KubeConfigError as exc:
                raise BackendError(str(exc)) from None
        return self._client

    # -- plan ----------------------------------------------------------------------------
    def paths(self, request: LaunchRequest) -> Paths:
        return fsx_paths(request, FSX_MOUNT, f"{FSX_MOUNT}/datasets", f"{FSX_MOUNT}/output")

    def check(self, experiment: Experiment, dataset: Any) -> list[str]:
        problems = []
        itype = experiment.training_instance
        if itype.startswith("ml."):
            problems.append(f"Training_Instance: {itype!r} is a SageMaker type; kubernetes takes the nodes' EC2 type "
                            f"such as {itype[3:]!r} (it selects nodes by node.kubernetes.io/instance-type)")
        elif not EC2_TYPE.match(itype):
            problems.append(f"Training_Instance: {itype!r} is not an instance type (e.g. g5.12xlarge, p4d.24xlarge)")
        elif gpus_of(itype) is None:
            problems.append(f"Training_Instance: the GPUs of {itype!r} are not known to MMP; use one of "
                            f"{', '.join(sorted(GPU_SLOTS)[:6])}, …")
        if experiment.use_spot:
            problems.append("Use_Spot: the kubernetes platform has no managed spot; select spot nodes through "
                            "MMP_K8S_NODE_SELECTOR instead")
        if self._settings_error:
            problems.append(f"Platform: kubernetes: {self._settings_error}")
        problems += [f"Platform: kubernetes: {p}" for p in self.settings.problems()]
        if not problems:
            try:
                connection(self.settings)  # reads the kubeconfig; no API call
            except KubeConfigError as exc:
                problems.append(f"Platform: kubernetes: {exc}")
        return problems

    def shape(self, request: LaunchRequest) -> o.RuntimeShape:
        from mmp.backends.sagemaker import image_uri

        repository = self.settings.image_repository or ""
        tag = request.image_tag or request.commit
        image = image_uri(repository, tag)
        pinned = image.rsplit(":", 1)[-1] if image != f"{repository}:{tag}" else tag
        return o.RuntimeShape(image=image, image_tag=pinned, gpus=gpus_of(request.experiment.training_instance) or 0,
                              multi=request.experiment.instance_count > 1)

    def plan(self, request: LaunchRequest, namespace: str, *, code_configmap: str | None) -> o.JobPlan:
        s, exp = self.settings, request.experiment
        if urlsplit(request.mlflow_env.get("MLFLOW_TRACKING_URI", "")).password:
            raise BackendError("MLFLOW_TRACKING_URI carries a password, which the TrainJob would show to anyone who "
                               "can read it; give it as a secret (MMP_MLFLOW_PASSWORD_SECRET_ARN)")
        shape = self.shape(request)
        paths = self.paths(request)
        name = o.trainjob_name(request.experiment_name, request.run_id)
        env = cluster_rank_environ(request.mlflow_env, request.run_id, s.region, username=s.mlflow_username,
                                   password_secret_arn=s.mlflow_password_secret_arn,
                                   tracking_server_arn=s.mlflow_tracking_server_arn)
        env.update({"MMP_WORK_DIR": f"{FSX_MOUNT}/mmp/{request.experiment_name}/{request.run_id}",
                    "MMP_SSH_PORT": str(SSH_PORT), "MMP_SSH_KEY_DIR": o.SSH_MOUNT})
        if request.code_uri:
            env["MMP_CODE_URI"] = request.code_uri
        else:
            env["MMP_CODE_ARCHIVE"] = f"{o.CODE_MOUNT}/{o.CODE_KEY}"
        if s.artifacts_bucket:
            env["MMP_OUTPUT_S3"] = f"s3://{s.artifacts_bucket}/output/{request.experiment_name}/{request.run_id}/"
        selector = {"node.kubernetes.io/instance-type": exp.training_instance, **s.node_selector}
        return o.JobPlan(
            name=name, namespace=namespace, runtime=shape, run_id=request.run_id, num_nodes=exp.instance_count,
            procs_per_node=exp.processes_per_host or shape.gpus or 1,
            args=tuple(train_args(paths.dataset, paths.output, exp.dataset_name, exp.hyperparameters)),
            env=env, deadline_seconds=(exp.runtime_minutes + s.deadline_slack_minutes) * 60,
            fsx_claim=s.fsx_claim or "", service_account=s.service_account, node_selector=selector,
            tolerations=s.tolerations, code_configmap=code_configmap)

    @staticmethod
    def code_archive(request: LaunchRequest) -> bytes:
        """The commit's tree as a tar.gz (`git archive`), for a launch whose code has no S3 copy."""
        from mmp.hosts.localgit import git

        if not Path(request.clone_url).is_dir():
            raise BackendError(f"the commit's code has no S3 copy and {request.clone_url!r} is not a local repository; "
                               "the kubernetes platform needs one of them")
        return git(request.clone_url, "archive", "--format=tar.gz", request.commit)

    # -- launch --------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> JobHandle:
        problems = self.check(request.experiment, request.dataset)
        if problems:
            raise BackendError("; ".join(problems))
        kube = self.client()
        ns = kube.namespace
        archive = None if request.code_uri else self.code_archive(request)
        name = o.trainjob_name(request.experiment_name, request.run_id)
        cm_name = None if archive is None else f"{name}-code"
        plan = self.plan(request, ns, code_configmap=cm_name)
        try:
            job_obj = o.train_job(plan)
        except o.ObjectError as exc:
            raise BackendError(str(exc)) from None
        handle = JobHandle(platform=self.name, job_id=request.run_id, data={
            "name": name, "namespace": ns, "runtime": plan.runtime.name(), "code_configmap": cm_name,
            "paths": dict(vars(self.paths(request))), "started": time.time(), "image": plan.runtime.image})
        if archive is not None:  # too big for a ConfigMap: refused before anything is created
            try:
                o.code_configmap(cm_name, ns, archive)
            except o.ObjectError as exc:
                raise BackendError(str(exc)) from None
        self._ensure_runtime(kube, plan.runtime, ns)
        try:
            created = kube.create(*TRAINER, job_obj)
        except KubeError as exc:
            if exc.code != 409:
                raise BackendError(f"creating TrainJob {name} failed: {exc}") from None
            created = kube.get(*TRAINER, name) or {}
            if (created.get("metadata", {}).get("labels") or {}).get(o.RUN_LABEL) != job_obj["metadata"]["labels"][o.RUN_LABEL]:
                raise BackendError(f"TrainJob {name} already exists in namespace {ns} for another run") from None
        started = archive is None
        try:
            if archive is not None:
                try:
                    kube.create(*CONFIGMAPS, o.code_configmap(cm_name, ns, archive, created))
                except KubeError as exc:
                    if exc.code != 409:  # 409: a retried launch already stored it
                        raise BackendError(f"storing the commit's code in ConfigMap {cm_name} failed: {exc}") from None
                started = True
        finally:
            if not started:  # an error or Ctrl-C between the two creates: the TrainJob goes too
                try:
                    self.teardown(handle)
                except Exception as exc:
                    log.error("teardown after a failed launch of %s failed: %s", name, exc)
        return handle

    def _ensure_runtime(self, kube: KubeClient, shape: o.RuntimeShape, ns: str) -> None:
        name = shape.name()
        if kube.get(*RUNTIMES, name) is not None:
            return
        try:
            kube.create(*RUNTIMES, o.training_runtime(shape, ns))
        except KubeError as exc:
            if exc.code != 409:  # another run made it meanwhile
                raise BackendError(f"creating TrainingRuntime {name} failed: {exc}") from None

    # -- following -------------------------------------------------------------------------
    def status(self, handle: JobHandle) -> JobStatus:
        kube, name = self.client(), handle.data["name"]
        job = kube.get(*TRAINER, name)
        if job is None:
            if handle.data.get("cancelled"):
                return JobStatus(JobState.CANCELLED, "cancelled")
            final = handle.data.get("final")
            if final:
                return JobStatus(JobState(final["state"]), final["message"], final.get("exit_code"))
            return JobStatus(JobState.FAILED, f"TrainJob {name} was deleted outside MMP")
        conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                      if c.get("status") == "True"}
        if "Complete" in conditions:
            return self._final(handle, JobStatus(JobState.SUCCEEDED, "TrainJob complete", 0))
        if "Failed" in conditions:
            cond = conditions["Failed"]
            reason, message = cond.get("reason") or "Failed", cond.get("message") or ""
            launcher = self._launcher_termination(kube, name)
            if reason == "DeadlineExceeded":
                text = f"stopped: activeDeadlineSeconds ({job['spec'].get('activeDeadlineSeconds')} s) reached"
            else:
                text = launcher[0] if launcher and launcher[0] else f"{reason}: {message}".strip(": ")
            return self._final(handle, JobStatus(JobState.FAILED, text, launcher[1] if launcher else None,
                                                 {"reason": reason}))
        if handle.data.get("cancelled"):
            return JobStatus(JobState.RUNNING, "cancelling")
        return self._pods_status(kube, handle, name)

    def _final(self, handle: JobHandle, status: JobStatus) -> JobStatus:
        handle.data["final"] = {"state": status.state.value, "message": status.message, "exit_code": status.exit_code}
        return status

    def _pods_status(self, kube: KubeClient, handle: JobHandle, name: str) -> JobStatus:
        pods = kube.list(*PODS, o.job_selector(name))
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in IMAGE_PULL_ERRORS:
                    message = (f"pod {pod['metadata']['name']}: {waiting['reason']}: "
                               f"{waiting.get('message') or cs.get('image', '')}")
                    handle.data["final"] = {"state": JobState.FAILED.value, "message": message}
                    self.cancel_job(handle)
                    return JobStatus(JobState.FAILED, message, None, {"reason": waiting["reason"]})
        for pod in pods:
            for cond in (pod.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                    return JobStatus(JobState.PENDING, f"{cond.get('reason') or 'pending'}: {cond.get('message') or ''}"
                                     .strip(": "))
        launcher = next((p for p in pods if (p["metadata"].get("labels") or {}).get(o.REPLICATED_JOB_LABEL)
                         == o.LAUNCHER), None)
        if launcher and (launcher.get("status") or {}).get("phase") == "Running":
            return JobStatus(JobState.RUNNING, "training")
        return JobStatus(JobState.PENDING, "starting" if pods else "waiting for pods")

    def _launcher_termination(self, kube: KubeClient, name: str) -> tuple[str, int | None] | None:
        """The launcher container's termination message (the failure summary) and exit code."""
        try:
            pods = kube.list(*PODS, o.launcher_selector(name))
        except KubeError:
            return None
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if term:
                    return (term.get("message") or "").strip(), term.get("exitCode")
        return None

    def logs(self, handle: JobHandle, cursor: Any = None) -> tuple[list[str], Any]:
        cursor = dict(cursor or {"ts": None, "n": 0})
        kube = self.client()
        try:
            pods = kube.list(*PODS, o.launcher_selector(handle.data["name"]))
            pod = next((p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")),
                       None)
            if pod is None:
                return [], cursor
            text = kube.pod_logs(pod["metadata"]["name"], since_time=(cursor["ts"] or "")[:19] + "Z" if cursor["ts"] else None)
        except KubeError as exc:
            log.debug("launcher log not readable yet: %s", exc)
            return [], cursor
        lines: list[str] = []
        same = 0
        for raw in text.splitlines():
            match = _TIMESTAMPED.match(raw)
            if not match:  # a line without a timestamp (should not happen with timestamps=true)
                lines.append(raw)
                continue
            seconds, fraction, line = match.groups()
            ts = f"{seconds}.{(fraction or '').ljust(9, '0')}Z"  # RFC3339Nano drops trailing zeros: compare padded
            if cursor["ts"] and ts < cursor["ts"]:
                continue
            if ts == cursor["ts"]:
                same += 1
                if same <= cursor["n"]:
                    continue
                cursor["n"] = same
            else:
                cursor["ts"], cursor["n"], same = ts, 1, 1
            lines.append(line)
        return lines, cursor

    # -- stopping --------------------------------------------------------------------------
    def cancel_job(self, handle: JobHandle) -> None:
        try:
            self.client().delete(*TRAINER, handle.data["name"])
        except KubeError as exc:
            raise BackendError(f"deleting TrainJob {handle.data['name']} failed: {exc}") from None

    def cancel(self, handle: JobHandle) -> None:
        handle.data["cancelled"] = True
        self.cancel_job(handle)

    def teardown(self, handle: JobHandle, wait_seconds: float = 120.0) -> None:
        """Delete the TrainJob (foreground) and the code ConfigMap, then wait, bounded, until the
        TrainJob is gone: its pods release their GPUs before the run is reported over.

        A handle without a TrainJob name is Conclude's sweep by run id on AWS (aws_stages): the stage
        Lambdas do not reach the cluster (no CA, no access entry), and the runner task tore its TrainJob
        down itself; one a killed runner left ends at its activeDeadlineSeconds (Max_Runtime + slack)."""
        if "name" not in handle.data:
            log.info("run %s: no TrainJob in the handle; the runner task deletes its own", handle.job_id)
            return
        self.cancel_job(handle)
        deadline = time.monotonic() + wait_seconds
        while self.client().get(*TRAINER, handle.data["name"]) is not None:
            if time.monotonic() > deadline:
                log.warning("TrainJob %s is still being deleted after %.0f s", handle.data["name"], wait_seconds)
                break
            time.sleep(min(self.poll_seconds, 2.0))
        cm = handle.data.get("code_configmap")
        if cm:
            try:
                self.client().delete(*CONFIGMAPS, cm)
            except KubeError as exc:
                raise BackendError(f"deleting ConfigMap {cm} failed: {exc}") from None
