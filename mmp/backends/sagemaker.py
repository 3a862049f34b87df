"""The `sagemaker` and `sagemaker-fsx` backends: one SageMaker training job per run.

Plain boto3 through `mmp.aws.client` (this module runs in Lambda: no SageMaker SDK,
no mlflow, no paramiko). The job runs the image CodeBuild made from
`horovod_docker/` for the commit's dependency set; its `train` entrypoint (mmp.runtime.sagemaker_entrypoint)
turns SageMaker's /opt/ml contract into a horovodrun command. Everything comes from
`MMP_*` environment variables the Pulumi stack sets (docs/sagemaker.md lists them),
and every problem with a request is found by `check()` before any API call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from mmp import aws
from mmp.contract.argv import boolean_names, hyperparameter_text
from mmp.contract.experiment import Experiment
from mmp.contract.image import CODE_CHANNEL
from mmp.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, Paths

log = logging.getLogger("mmp.backends.sagemaker")

OPT_ML = "/opt/ml"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
INSTANCE_TYPE_RE = re.compile(r"^ml\.[a-z0-9]+(?:-[a-z0-9]+)*\.[a-z0-9]+$")
JOB_NAME_MAX = 63
MAX_SECONDS = 28 * 24 * 3600  # SageMaker's ceiling for MaxRuntime and MaxWait
HP_MAX_COUNT, HP_MAX_KEY, HP_MAX_VALUE = 100, 256, 2500  # SageMaker's HyperParameters limits
ENV_MAX_VALUE = 512  # SageMaker's limit on one Environment value
TAG_VALUE_BAD = re.compile(r"[^\w\s.:/=+\-@]", re.UNICODE)
KEEP_ALIVE_MAX = 3600  # SageMaker's ceiling for a warm pool's KeepAlivePeriodInSeconds (docs/sagemaker.md)
TRIAL_KEEP_ALIVE_DEFAULT = 600  # long enough to bridge a study's trials, a runner restart included
THROTTLING = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}

# SecondaryStatus values before the container runs; everything else InProgress is RUNNING.
_STARTING = {"Starting", "Pending", "LaunchingMLInstances", "PreparingTrainingStack", "Downloading",
             "DownloadingTrainingImage", "Restarting"}
# Stopped by SageMaker's own limits, not by a person: a failure, not a cancellation.
_LIMIT_STOPS = {"MaxRuntimeExceeded", "MaxWaitTimeExceeded"}


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _int_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BackendError(f"{name} must be a whole number, got {raw!r}") from None


@dataclass(frozen=True)
class SageMakerSettings:
    """The stack's configuration, read from `MMP_*` environment variables."""

    ecr_repository_uri: str | None = None
    image_context_digest: str | None = None  # part of the image tag (mmp.contract.image); launches outside Prepare need it
    role_arn: str | None = None
    artifacts_bucket: str | None = None
    input_mode: str = "File"
    volume_gb: int = 50
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    fsx_file_system_id: str | None = None
    fsx_mount_name: str | None = None
    max_instances: int | None = None
    job_name_prefix: str = "mmp"
    checkpoint_s3_uri: str | None = None
    mlflow_password_secret_arn: str | None = None
    mlflow_username: str | None = None
    mlflow_tracking_server_arn: str | None = None
    spot_extra_wait_minutes: int = 60
    trial_keep_alive_seconds: int = TRIAL_KEEP_ALIVE_DEFAULT  # a study's trials keep a warm pool (0: off)
    commit_keep_alive_seconds: int = 0  # a single run keeps one for the next commit (off unless the stack says)
    poll_seconds: float | None = None
    region: str = field(default_factory=aws.region)

    @classmethod
    def from_env(cls) -> "SageMakerSettings":
        env = os.environ.get
        poll = env("MMP_SAGEMAKER_POLL_SECONDS", "").strip()
        return cls(
            ecr_repository_uri=env("MMP_ECR_REPOSITORY_URI") or None,
            image_context_digest=env("MMP_IMAGE_CONTEXT_DIGEST") or None,
            role_arn=env("MMP_SAGEMAKER_ROLE_ARN") or None,
            artifacts_bucket=(env("MMP_ARTIFACTS_BUCKET") or "").removeprefix("s3://").strip("/") or None,
            input_mode=env("MMP_SAGEMAKER_INPUT_MODE") or "File",
            volume_gb=_int_env("MMP_SAGEMAKER_VOLUME_GB", 50),
            subnet_ids=tuple(_csv(env("MMP_SUBNET_IDS"))),
            security_group_ids=tuple(_csv(env("MMP_SECURITY_GROUP_IDS"))),
            fsx_file_system_id=env("MMP_FSX_FILE_SYSTEM_ID") or None,
            fsx_mount_name=(env("MMP_FSX_MOUNT_NAME") or "").strip("/") or None,
            max_instances=_int_env("MMP_SAGEMAKER_MAX_INSTANCES", None),
            job_name_prefix=env("MMP_JOB_NAME_PREFIX") or "mmp",
            checkpoint_s3_uri=(env("MMP_CHECKPOINT_S3_URI") or "").rstrip("/") or None,
            mlflow_password_secret_arn=env("MMP_MLFLOW_PASSWORD_SECRET_ARN") or None,
            mlflow_username=env("MMP_MLFLOW_USERNAME") or None,
            mlflow_tracking_server_arn=env("MMP_MLFLOW_TRACKING_SERVER_ARN") or None,
            spot_extra_wait_minutes=_int_env("MMP_SAGEMAKER_SPOT_EXTRA_WAIT_MINUTES", 60),
            trial_keep_alive_seconds=_int_env("MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", TRIAL_KEEP_ALIVE_DEFAULT),
            commit_keep_alive_seconds=_int_env("MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS", 0),
            poll_seconds=float(poll) if poll else None,
        )

    @property
    def vpc_config(self) -> dict[str, list[str]] | None:
        if self.subnet_ids and self.security_group_ids:
            return {"SecurityGroupIds": list(self.security_group_ids), "Subnets": list(self.subnet_ids)}
        return None


def job_name(prefix: str, experiment_name: str, commit: str, delivery_id: str | None = None) -> str:
    """Deterministic, ≤63 characters of [a-zA-Z0-9-]: `<prefix>-<experiment>-<commit7>-<hash8>`.

    The hash covers the experiment, the commit and the delivery (when there is one),
    so a retried launch of the same trigger gets the same name (and SageMaker's
    ResourceInUse), while another push of the same commit gets a new job.
    """

    def clean(text: str) -> str:
        return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9-]+", "-", text)).strip("-")

    digest = hashlib.sha256(f"{experiment_name}\0{commit}\0{delivery_id or ''}".encode()).hexdigest()[:8]
    tail = [part for part in (clean(commit[:7]), digest) if part]
    head = clean(prefix)[:20].strip("-") or "mmp"
    room = JOB_NAME_MAX - len(head) - sum(len(p) + 1 for p in tail) - 1
    slug = clean(experiment_name)[: max(room, 0)].strip("-")
    return "-".join(part for part in (head, slug, *tail) if part)[:JOB_NAME_MAX].strip("-")


def image_uri(repository_uri: str, tag: str) -> str:
    """`<repo>:<tag>` (the dependency set's tag, mmp.contract.image), unless the URI already pins a tag/digest."""
    last = repository_uri.rsplit("/", 1)[-1]
    if ":" in last or "@" in last:
        return repository_uri
    return f"{repository_uri}:{tag}"


def _tag_value(text: str) -> str:
    return TAG_VALUE_BAD.sub("-", text)[:256]


def _is_throttling(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in THROTTLING


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "response", {}).get("Error", {}).get("Code")


class SageMakerBackend(Backend):
    """A SageMaker training job reading the dataset's S3 prefix (File or FastFile)."""

    name: ClassVar[str] = "sagemaker"
    # SageMaker stops the job itself at Max_Runtime (StoppingCondition); callers must not add a deadline.
    bounds_runtime: ClassVar[bool] = True
    poll_seconds: ClassVar[float] = 30.0  # DescribeTrainingJob is rate-limited; jobs take minutes

    def __init__(self, settings: SageMakerSettings | None = None, *, sagemaker_client: Any = None,
                 logs_client: Any = None, poll_seconds: float | None = None):
        self.settings = settings or SageMakerSettings.from_env()
        self._sm = sagemaker_client
        self._logs = logs_client
        chosen = poll_seconds if poll_seconds is not None else self.settings.poll_seconds
        if chosen is not None:
            self.poll_seconds = chosen  # instance override of the class default
        self._last: dict[str, JobStatus] = {}

    # -- clients (made on first use, so check() never touches AWS) ---------------
    @property
    def sagemaker(self) -> Any:
        if self._sm is None:
            self._sm = aws.client("sagemaker", self.settings.region)
        return self._sm

    @property
    def cloudwatch_logs(self) -> Any:
        if self._logs is None:
            self._logs = aws.client("logs", self.settings.region)
        return self._logs

    # -- preflight ---------------------------------------------------------------
    def check(self, experiment: Experiment, dataset: Any) -> list[str]:
        s = self.settings
        problems: list[str] = []
        if not INSTANCE_TYPE_RE.fullmatch(experiment.training_instance):
            problems.append(
                f"Training_Instance: {experiment.training_instance!r} is not a SageMaker instance type; "
                "use the ml.* family, e.g. ml.p3.16xlarge or ml.g5.12xlarge"
            )
        if s.max_instances is not None and experiment.instance_count > s.max_instances:
            problems.append(
                f"Instance_Count: {experiment.instance_count} is above this stack's quota of "
                f"{s.max_instances} instances (MMP_SAGEMAKER_MAX_INSTANCES)"
            )
        if experiment.runtime_minutes * 60 > MAX_SECONDS:
            problems.append(f"Max_Runtime: SageMaker allows at most {MAX_SECONDS // 60} minutes")
        problems += self._check_dataset(dataset)
        if experiment.dataset_name == CODE_CHANNEL:
            problems.append(f"Dataset_Name: {CODE_CHANNEL!r} is the channel that carries the commit's code; "
                            "rename the dataset")
        if experiment.use_spot:
            if not s.checkpoint_s3_uri:
                problems.append(
                    "Use_Spot: managed spot needs a checkpoint location so interrupted jobs resume; "
                    "this stack has none (MMP_CHECKPOINT_S3_URI); remove Use_Spot or configure one"
                )
            elif not s.checkpoint_s3_uri.startswith("s3://"):
                problems.append(f"MMP_CHECKPOINT_S3_URI must be an s3:// URI, got {s.checkpoint_s3_uri!r}")
        hps = experiment.hyperparameters
        if len(hps) > HP_MAX_COUNT:
            problems.append(f"Hyperparameters: SageMaker takes at most {HP_MAX_COUNT}, got {len(hps)}")
        for key, value in hps.items():
            if len(key) > HP_MAX_KEY or len(hyperparameter_text(value)) > HP_MAX_VALUE:
                problems.append(
                    f"Hyperparameters.{key}: SageMaker allows names up to {HP_MAX_KEY} and values up to "
                    f"{HP_MAX_VALUE} characters"
                )
        problems += self._check_stack()
        return problems

    def _check_dataset(self, dataset: Any) -> list[str]:
        s3 = getattr(dataset, "s3", None)
        if not s3:
            return [f"Dataset_Name: {dataset.name!r} has no S3 location in the catalogue; the sagemaker platform "
                    f"reads s3:// data (mmp datasets add {dataset.name} --s3 s3://BUCKET/PREFIX/)"]
        if not s3.startswith("s3://") or len(s3) <= len("s3://"):
            return [f"Dataset_Name: {dataset.name!r} has S3 location {s3!r}, which is not an s3:// URI"]
        return []

    def _check_stack(self) -> list[str]:
        s = self.settings
        problems = [
            f"stack configuration: {var} is not set ({what})"
            for var, value, what in (
                ("MMP_ECR_REPOSITORY_URI", s.ecr_repository_uri, "the ECR repository of the training image"),
                ("MMP_SAGEMAKER_ROLE_ARN", s.role_arn, "the SageMaker execution role"),
                ("MMP_ARTIFACTS_BUCKET", s.artifacts_bucket, "where models and output go"),
            )
            if not value
        ]
        if s.input_mode not in self.input_modes():
            problems.append(
                f"MMP_SAGEMAKER_INPUT_MODE: {s.input_mode!r} is not allowed for {self.name}; "
                f"use {' or '.join(self.input_modes())}"
            )
        if not 1 <= s.volume_gb <= 16384:
            problems.append(f"MMP_SAGEMAKER_VOLUME_GB: must be 1 to 16384, got {s.volume_gb}")
        for var, value in (("MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", s.trial_keep_alive_seconds),
                           ("MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS", s.commit_keep_alive_seconds)):
            if not 0 <= value <= KEEP_ALIVE_MAX:
                problems.append(f"{var}: a warm pool's keep-alive must be 0 (off) to {KEEP_ALIVE_MAX} seconds, "
                                f"got {value}")
        if bool(s.subnet_ids) != bool(s.security_group_ids):
            problems.append("stack configuration: MMP_SUBNET_IDS and MMP_SECURITY_GROUP_IDS must be set together "
                            "(VpcConfig needs both)")
        return problems

    @staticmethod
    def input_modes() -> tuple[str, ...]:
        return ("File", "FastFile")

    def input_mode(self) -> str:
        return self.settings.input_mode

    # -- the request ---------------------------------------------------------------
    def paths(self, request: LaunchRequest) -> Paths:
        return Paths(dataset=f"{OPT_ML}/input/data/{request.experiment.dataset_name}", output=f"{OPT_ML}/model")

    def job_name(self, request: LaunchRequest) -> str:
        return job_name(self.settings.job_name_prefix, request.experiment_name, request.commit, request.delivery_id)

    def input_channel(self, request: LaunchRequest) -> dict[str, Any]:
        return {
            "ChannelName": request.experiment.dataset_name,
            "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": request.dataset.s3,
                "S3DataDistributionType": "FullyReplicated",
            }},
            "InputMode": self.input_mode(),
        }

    @staticmethod
    def code_channels(request: LaunchRequest) -> list[dict[str, Any]]:
        """The commit's code archive as channel `mmp-code` (File: a few MB, unpacked by the entrypoint)."""
        if not request.code_uri:
            return []
        return [{"ChannelName": CODE_CHANNEL, "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": request.code_uri, "S3DataDistributionType": "FullyReplicated"}},
            "InputMode": "File"}]

    def environment(self, request: LaunchRequest, *, checkpoints: bool) -> dict[str, str]:
        """What the entrypoint needs: MLflow's variables and MMP's, never a secret's value."""
        uri = request.mlflow_env.get("MLFLOW_TRACKING_URI", "")
        if urlsplit(uri).password:
            raise BackendError("MLFLOW_TRACKING_URI carries a password; give it as a secret "
                               "(MMP_MLFLOW_PASSWORD_SECRET_ARN), never in the job request")
        s = self.settings
        experiment = request.experiment
        env = {**request.mlflow_env, "MMP_DATASET": experiment.dataset_name, "MMP_COMMIT": request.commit,
               "AWS_DEFAULT_REGION": s.region}
        order = ",".join(experiment.hyperparameters)
        if order and len(order) <= ENV_MAX_VALUE:
            env["MMP_HYPERPARAMETER_ORDER"] = order
        if boolean_names(experiment.hyperparameters):  # HyperParameters holds text only: keep true → bare flag
            env["MMP_BOOLEAN_HYPERPARAMETERS"] = boolean_names(experiment.hyperparameters)
        if experiment.processes_per_host:
            env["MMP_PROCESSES_PER_HOST"] = str(experiment.processes_per_host)
        if checkpoints:
            env["MMP_CHECKPOINT_DIR"] = CHECKPOINT_LOCAL_PATH
        if s.mlflow_username:
            env["MLFLOW_TRACKING_USERNAME"] = s.mlflow_username
        if s.mlflow_password_secret_arn:
            env["MMP_MLFLOW_PASSWORD_SECRET_ARN"] = s.mlflow_password_secret_arn
        if s.mlflow_tracking_server_arn:
            # SageMaker managed MLflow: train.py's client signs through the sagemaker-mlflow plugin,
            # which takes the server's ARN as the tracking URI (and the job role's credentials).
            env["MLFLOW_TRACKING_URI"] = s.mlflow_tracking_server_arn
        long = [key for key, value in env.items() if len(value) > ENV_MAX_VALUE]
        if long:
            raise BackendError(f"Environment {', '.join(long)} longer than SageMaker's {ENV_MAX_VALUE} characters")
        return env

    def keep_alive_seconds(self, request: LaunchRequest) -> int:
        """How long the job's instances stay warm for the next matching job: a study's trials follow
        each other (the study gives the pool back when it ends); successive commits of one experiment
        only when the stack says so. Never for spot: SageMaker's warm pools do not take spot jobs."""
        if request.experiment.use_spot:
            return 0
        s = self.settings
        return s.trial_keep_alive_seconds if request.study else s.commit_keep_alive_seconds

    def training_job_request(self, request: LaunchRequest) -> dict[str, Any]:
        """The CreateTrainingJob request for this launch (pure: no API call)."""
        s = self.settings
        experiment = request.experiment
        name = self.job_name(request)
        keep_alive = self.keep_alive_seconds(request)
        runtime = experiment.runtime_minutes * 60
        stopping: dict[str, int] = {"MaxRuntimeInSeconds": runtime}
        spot = experiment.use_spot
        if spot:
            stopping["MaxWaitTimeInSeconds"] = min(runtime + max(s.spot_extra_wait_minutes, 1) * 60, MAX_SECONDS)
            if stopping["MaxWaitTimeInSeconds"] <= runtime:
                raise BackendError("Max_Runtime: spot needs MaxWaitTime above MaxRuntime; lower Max_Runtime")
        body: dict[str, Any] = {
            "TrainingJobName": name,
            "AlgorithmSpecification": {
                # The dependency-set tag Prepare staged on Prepared (mmp.pipeline.runner); else the commit's.
                "TrainingImage": image_uri(s.ecr_repository_uri or "", request.image_tag or request.commit),
                "TrainingInputMode": self.input_mode(),
            },
            "RoleArn": s.role_arn,
            "HyperParameters": {k: hyperparameter_text(v) for k, v in experiment.hyperparameters.items()},
            "InputDataConfig": [self.input_channel(request)] + self.code_channels(request),
            "OutputDataConfig": {"S3OutputPath": f"s3://{s.artifacts_bucket}/{request.experiment_name}/{request.run_id}"},
            "ResourceConfig": {
                "InstanceType": experiment.training_instance,
                "InstanceCount": experiment.instance_count,
                "VolumeSizeInGB": s.volume_gb,
                **({"KeepAlivePeriodInSeconds": keep_alive} if keep_alive else {}),
            },
            "StoppingCondition": stopping,
            "Environment": self.environment(request, checkpoints=spot),
            "EnableNetworkIsolation": False,  # train.py must reach the MLflow server
            "EnableManagedSpotTraining": spot,
            "Tags": [
                {"Key": key, "Value": _tag_value(value)}
                for key, value in (
                    ("mmp:repository", request.repository),
                    ("mmp:commit", request.commit),
                    ("mmp:delivery-id", request.delivery_id or "none"),
                    ("mmp:experiment", request.experiment_name),
                    ("mmp:mlflow-run-id", request.run_id),
                    ("mmp:platform", self.name),
                )
            ],
        }
        if spot:
            body["CheckpointConfig"] = {
                "S3Uri": f"{s.checkpoint_s3_uri}/{request.experiment_name}/{name}",
                "LocalPath": CHECKPOINT_LOCAL_PATH,
            }
        if s.vpc_config:
            body["VpcConfig"] = s.vpc_config
        return body

    # -- launch and follow -------------------------------------------------------
    def launch(self, request: LaunchRequest) -> JobHandle:
        from botocore.exceptions import ClientError

        problems = self.check(request.experiment, request.dataset)
        if problems:  # the pipeline checked already; a direct caller may not have
            raise BackendError("; ".join(problems))
        body = self.training_job_request(request)
        name = body["TrainingJobName"]
        attached = False
        try:
            arn = self.sagemaker.create_training_job(**body)["TrainingJobArn"]
        except ClientError as exc:
            if _error_code(exc) != "ResourceInUse":
                raise BackendError(f"CreateTrainingJob {name} failed: {exc}") from None
            # A retried launch (same trigger): follow the job the first try started.
            existing = self.sagemaker.describe_training_job(TrainingJobName=name)
            arn, attached = existing["TrainingJobArn"], True
        return JobHandle(platform=self.name, job_id=name, data={
            "job_name": name, "arn": arn, "region": self.settings.region, "attached": attached,
            "spot": body["EnableManagedSpotTraining"], "launched": time.time(),
            "keep_alive": body["ResourceConfig"].get("KeepAlivePeriodInSeconds", 0),
        })

    def wait(self, handle: JobHandle, *, on_log=None, deadline: float | None = None,
             poll_seconds: float | None = None) -> JobStatus:
        """Follow the job until SageMaker ends it. Its StoppingCondition bounds it (MaxRuntime from
        when training starts, MaxWait for spot including the wait for capacity), so a deadline
        counted from launch would stop jobs still provisioning or waiting: it is not applied."""
        return super().wait(handle, on_log=on_log, deadline=None, poll_seconds=poll_seconds)

    def status(self, handle: JobHandle) -> JobStatus:
        from botocore.exceptions import ClientError

        try:
            job = self.sagemaker.describe_training_job(TrainingJobName=handle.job_id)
        except ClientError as exc:
            if not _is_throttling(exc):
                raise
            # botocore already retried; a polling loop just asks again next time.
            previous = self._last.get(handle.job_id) or JobStatus(JobState.PENDING)
            return JobStatus(previous.state, f"{previous.message} (DescribeTrainingJob throttled; will retry)",
                             previous.exit_code, previous.detail)
        status = job_status(job)
        self._last[handle.job_id] = status
        return status

    def logs(self, handle: JobHandle, cursor: Any = None) -> tuple[list[str], Any]:
        """New lines from every log stream of the job (`<job>/algo-N-<epoch>`), host-prefixed
        when there are several; the cursor maps each stream to its forward token."""
        from botocore.exceptions import ClientError

        cursor = dict(cursor or {})
        try:
            streams = self._log_streams(handle.job_id)
        except ClientError as exc:
            if _error_code(exc) == "ResourceNotFoundException" or _is_throttling(exc):
                return [], cursor  # no log group yet (nothing ran) or busy: try next poll
            raise
        lines: list[str] = []
        for stream in streams:
            host = stream.split("/", 1)[-1]
            prefix = f"[{host}] " if len(streams) > 1 else ""
            token = cursor.get(stream)
            for _ in range(100):  # a bounded drain per poll
                kwargs = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
                if token:
                    kwargs["nextToken"] = token
                try:
                    page = self.cloudwatch_logs.get_log_events(**kwargs)
                except ClientError as exc:
                    if _is_throttling(exc):
                        break
                    raise
                lines += [prefix + event["message"].rstrip("\n") for event in page.get("events", [])]
                new = page.get("nextForwardToken")
                if not new or new == token:
                    break
                token = new
            if token:
                cursor[stream] = token
        return lines, cursor

    def _log_streams(self, name: str) -> list[str]:
        found: list[str] = []
        kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{name}/"}
        while True:
            page = self.cloudwatch_logs.describe_log_streams(**kwargs)
            found += [s["logStreamName"] for s in page.get("logStreams", [])]
            if not page.get("nextToken"):
                return sorted(found)
            kwargs["nextToken"] = page["nextToken"]

    def cancel(self, handle: JobHandle) -> None:
        self._stop(handle.job_id)

    def teardown(self, handle: JobHandle) -> None:
        """Stop the job unless it already ended; safe to call any number of times."""
        from botocore.exceptions import ClientError

        last = self._last.get(handle.job_id)
        if last is not None and last.state.terminal:
            return
        try:
            job = self.sagemaker.describe_training_job(TrainingJobName=handle.job_id)
        except ClientError as exc:
            if _error_code(exc) in ("ValidationException", "ResourceNotFound"):
                return  # never created
            raise
        if job.get("TrainingJobStatus") == "InProgress":
            self._stop(handle.job_id)

    def release_warm(self, handles: list[JobHandle]) -> list[str]:
        """End the warm pools these jobs keep (UpdateTrainingJob, KeepAlivePeriodInSeconds 0), so nobody
        pays for idle instances once no matching job follows. Only jobs launched with a keep-alive are
        asked about. A pool `Available` is ended; so is a job still running or stopping (it then keeps
        none); a pool `Reused` moved on to a later job (which is in `handles` too) and one `Terminated`
        is gone. A refusal is logged, never raised: that pool then ends by its own keep-alive."""
        from botocore.exceptions import ClientError

        released: list[str] = []
        for handle in handles:
            keep_alive = handle.data.get("keep_alive") or 0
            if handle.platform != self.name or not keep_alive:
                continue
            name = handle.job_id
            try:
                job = self.sagemaker.describe_training_job(TrainingJobName=name)
            except ClientError as exc:
                if _error_code(exc) not in ("ValidationException", "ResourceNotFound"):
                    log.warning("could not read the warm pool of %s (it ends by its keep-alive, %s s): %s",
                                name, keep_alive, exc)
                continue
            pool = (job.get("WarmPoolStatus") or {}).get("Status")
            running = job.get("TrainingJobStatus") in ("InProgress", "Stopping")
            if pool != "Available" and not (running and pool in (None, "InUse")):
                continue
            try:
                self.sagemaker.update_training_job(TrainingJobName=name,
                                                   ResourceConfig={"KeepAlivePeriodInSeconds": 0})
            except ClientError as exc:
                log.warning("could not end the warm pool of %s (it ends by its keep-alive, %s s): %s",
                            name, keep_alive, exc)
                continue
            released.append(name)
        if released:
            log.info("ended the warm pools of %s", ", ".join(released))
        return released

    def _stop(self, name: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.sagemaker.stop_training_job(TrainingJobName=name)
        except ClientError as exc:
            # Already stopping/ended, or never made: the job is not running either way.
            if _error_code(exc) not in ("ValidationException", "ResourceNotFound"):
                raise


class SageMakerFsxBackend(SageMakerBackend):
    """The same job, reading the dataset from FSx for Lustre inside the stack's VPC."""

    name: ClassVar[str] = "sagemaker-fsx"

    @staticmethod
    def input_modes() -> tuple[str, ...]:
        return ("File",)

    def input_mode(self) -> str:
        return "File"  # FSx channels are always File, whatever the S3 default says

    def _check_dataset(self, dataset: Any) -> list[str]:
        fsx = getattr(dataset, "fsx", None)
        if not fsx:
            return [f"Dataset_Name: {dataset.name!r} has no FSx path in the catalogue; the sagemaker-fsx platform "
                    f"reads FSx for Lustre (mmp datasets add {dataset.name} --fsx /datasets/{dataset.name})"]
        if not fsx.startswith("/") or ".." in fsx.split("/"):
            return [f"Dataset_Name: {dataset.name!r} has FSx path {fsx!r}; it must be absolute, without '..'"]
        return []

    def _check_stack(self) -> list[str]:
        s = self.settings
        # FastFile is an S3 mode: FSx channels are always File, whatever the S3 default says.
        problems = [p for p in super()._check_stack() if not p.startswith("MMP_SAGEMAKER_INPUT_MODE")]
        if not s.fsx_file_system_id or not s.fsx_mount_name:
            problems.append("stack configuration: this stack has no FSx for Lustre file system "
                            "(MMP_FSX_FILE_SYSTEM_ID and MMP_FSX_MOUNT_NAME); use platform sagemaker")
        if not s.vpc_config:
            problems.append("stack configuration: sagemaker-fsx needs the VPC the file system is in "
                            "(MMP_SUBNET_IDS and MMP_SECURITY_GROUP_IDS)")
        return problems

    def input_channel(self, request: LaunchRequest) -> dict[str, Any]:
        s = self.settings
        return {
            "ChannelName": request.experiment.dataset_name,
            "DataSource": {"FileSystemDataSource": {
                "FileSystemId": s.fsx_file_system_id,
                "FileSystemAccessMode": "ro",
                "FileSystemType": "FSxLustre",
                "DirectoryPath": f"/{s.fsx_mount_name}{request.dataset.fsx.rstrip('/')}",
            }},
            "InputMode": self.input_mode(),
        }


def job_status(job: dict[str, Any]) -> JobStatus:
    """A DescribeTrainingJob response as a JobStatus, with the platform's figures in detail."""
    status = job.get("TrainingJobStatus", "InProgress")
    secondary = job.get("SecondaryStatus") or ""
    reason = job.get("FailureReason") or ""
    transitions = job.get("SecondaryStatusTransitions") or []
    latest = (transitions[-1].get("StatusMessage") or "") if transitions else ""
    detail: dict[str, Any] = {
        "job_name": job.get("TrainingJobName"), "status": status, "secondary_status": secondary,
        "failure_reason": reason or None, "status_message": latest or None,
    }
    billable, training = job.get("BillableTimeInSeconds"), job.get("TrainingTimeInSeconds")
    metrics: dict[str, float] = {}
    if billable is not None:
        metrics["billable_seconds"] = float(billable)
    if training is not None:
        metrics["training_seconds"] = float(training)
    if job.get("EnableManagedSpotTraining") and billable is not None and training:
        metrics["spot_savings_percent"] = round((1 - float(billable) / float(training)) * 100, 2)
    if metrics:
        detail["metrics"] = metrics
    text = f"{status}/{secondary}" if secondary else status
    if latest:
        text += f": {latest}"
    if status == "InProgress":
        return JobStatus(JobState.PENDING if secondary in _STARTING else JobState.RUNNING, text, None, detail)
    if status == "Stopping":
        return JobStatus(JobState.RUNNING, text, None, detail)
    if status == "Completed":
        return JobStatus(JobState.SUCCEEDED, text, 0, detail)
    if status == "Stopped":
        if secondary in _LIMIT_STOPS:
            return JobStatus(JobState.FAILED, f"stopped by SageMaker: {secondary} ({text})", None, detail)
        return JobStatus(JobState.CANCELLED, text, None, detail)
    message = f"{text}; FailureReason: {reason}" if reason else text
    return JobStatus(JobState.FAILED, message, None, detail)
