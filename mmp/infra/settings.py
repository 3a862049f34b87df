"""The stack's settings: every `mmp:*` config key, validated before any resource exists.

One pydantic model, so a wrong key or value fails `pulumi up`/`preview` at once with
the key's name and what is allowed, instead of half-way through a deployment.
Pulumi.dev.yaml.example documents the same keys; a test keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAMESPACE = "mmp"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,18}[a-z0-9]$")
NAME_RULE = "3-20 characters: lower-case letters, digits and '-', starting with a letter, not ending with '-'"
SECRET_KEYS = ("githubToken", "webhookSecret", "mlflowAdminPassword", "sshPrivateKey", "gitlabToken",
               "gitlabWebhookSecret")
DEFAULT_DLAMI_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
MAX_LINKED_DATASETS = 7  # FSx: 8 data repository associations per file system, one for the stack's datasets/
CODECOMMIT_NAME_RE = re.compile(r"[\w.-]{1,100}", re.ASCII)  # CreateRepository's repositoryName pattern
CODECOMMIT_ARN_RE = re.compile(r"arn:aws[\w-]*:codecommit:([a-z0-9-]+):(\d{12}):([\w.-]{1,100})", re.ASCII)
INPUT_MODES = ("File", "FastFile")  # what mmp.backends.sagemaker runs (Pipe needs a record reader)
# EC2 instance families with NVIDIA GPUs (the EKS AL2023 NVIDIA AMI's hosts): g4dn, g5, g6, g6e, p3, p4d, p5...
GPU_INSTANCE_RE = re.compile(r"^(g[4-9][a-z0-9-]*|p[3-9][a-z0-9-]*)\.[0-9a-z]+$")
KUBERNETES_VERSION_RE = re.compile(r"^1\.(\d{2})$")
TRAINER_MIN_KUBERNETES = 31  # Kubeflow Trainer's installation guide: Kubernetes >= 1.31


class SettingsError(ValueError):
    """Config that cannot deploy; the message names each `mmp:` key at fault."""


def validate_name(value: str) -> str:
    """A deployment name usable in every AWS resource name (buckets included)."""
    if not NAME_RE.fullmatch(value or "") or "--" in value:
        raise ValueError(f"{value!r} is not a deployment name: {NAME_RULE}")
    return value


def validate_email(value: str) -> str:
    if not EMAIL_RE.fullmatch(value or ""):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def valid_fsx_capacity(gib: int) -> bool:
    """FSx for Lustre PERSISTENT_2 SSD: 1200 GiB, 2400 GiB, then increments of 2400 GiB (FSx API docs)."""
    return gib == 1200 or (gib > 0 and gib % 2400 == 0)


# Fargate's task sizes (Linux): CPU units → the memory (MiB) each takes, from the ECS
# Developer Guide's "Troubleshoot Amazon ECS task definition invalid CPU or memory errors" table;
# 8 and 16 vCPU need platform 1.4.0 or later (LATEST, which the MLflow service runs).
FARGATE_MEMORY = {256: (512, 1024, 2048), 512: tuple(range(1024, 4097, 1024)), 1024: tuple(range(2048, 8193, 1024)),
                  2048: tuple(range(4096, 16385, 1024)), 4096: tuple(range(8192, 30721, 1024)),
                  8192: tuple(range(16384, 61441, 4096)), 16384: tuple(range(32768, 122881, 8192))}


def fargate_size_problems(cpu: int, memory: int, *, cpu_key: str, memory_key: str) -> list[str]:
    """What RegisterTaskDefinition would refuse in a Fargate task size, naming the keys."""
    if cpu not in FARGATE_MEMORY:
        return [f"{cpu_key}: Fargate takes {', '.join(map(str, FARGATE_MEMORY))} CPU units, got {cpu}"]
    allowed = FARGATE_MEMORY[cpu]
    if memory in allowed:
        return []
    text = (", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}" if len(allowed) <= 4
            else f"{allowed[0]} to {allowed[-1]} in steps of {allowed[1] - allowed[0]}")
    return [f"{memory_key}: with {cpu_key} {cpu}, Fargate takes {text} MiB, got {memory}"]


def _is_open(cidr: str) -> bool:
    return ipaddress.ip_network(cidr, strict=False).prefixlen == 0


# CreatePullThroughCacheRule's credentialArn pattern and ecrRepositoryPrefix length (ECR API reference).
PULL_THROUGH_SECRET_RE = re.compile(r"^arn:aws:secretsmanager:([a-z0-9-]+):\d{12}:secret:ecr-pullthroughcache/[a-zA-Z0-9/_+=.@-]+$")
PULL_THROUGH_PREFIX_MAX = 30


def _docker_hub_problems(arn: str, region: str, prefix: str) -> list[str]:
    match = PULL_THROUGH_SECRET_RE.fullmatch(arn)
    if not match:
        return [f"dockerHubSecretArn: {arn!r} is not a Secrets Manager secret ARN whose name begins with "
                "ecr-pullthroughcache/ (what ECR's pull-through cache accepts)"]
    if match.group(1) != region:
        return [f"dockerHubSecretArn: the secret is in {match.group(1)}; ECR's pull-through cache needs it in the "
                f"stack's region {region}"]
    if len(f"{prefix}-hub") > PULL_THROUGH_PREFIX_MAX:
        return [f"dockerHubSecretArn: the cache prefix {prefix}-hub is over ECR's {PULL_THROUGH_PREFIX_MAX} "
                "characters; use a shorter deploymentName or stack name"]
    return []


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s3: str | None = None
    fsx: str | None = None


class Settings(BaseModel):
    """The `mmp:` config of one stack (camelCase keys, as in Pulumi.<stack>.yaml)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    stack: str = Field(description="the Pulumi stack (environment) name; not a config key")
    region: str = Field(default="us-east-1", description="aws:region")
    deployment_name: str = Field(alias="deploymentName")
    notify_email: str | None = Field(default=None, alias="notifyEmail")
    github_api_url: str = Field(default="https://api.github.com", alias="githubApiUrl")
    gitlab_url: str = Field(default="https://gitlab.com", alias="gitlabUrl")  # a self-managed GitLab's URL
    # -- network
    vpc_id: str | None = Field(default=None, alias="vpcId")
    private_subnet_ids: list[str] = Field(default_factory=list, alias="privateSubnetIds")
    public_subnet_ids: list[str] = Field(default_factory=list, alias="publicSubnetIds")
    vpc_cidr: str = Field(default="10.42.0.0/16", alias="vpcCidr")
    availability_zones: list[str] = Field(default_factory=list, alias="availabilityZones")
    nat_gateway: bool = Field(default=True, alias="natGateway")
    ssh_cidrs: list[str] = Field(default_factory=list, alias="sshCidrs")
    # -- data
    fsx: bool = False
    fsx_storage_gb: int = Field(default=1200, alias="fsxStorageGb")
    fsx_throughput: Literal[125, 250, 500, 1000] = Field(default=125, alias="fsxThroughput")
    datasets: dict[str, DatasetEntry] = Field(default_factory=dict)
    # -- webhook
    api_rate_limit: float = Field(default=10.0, alias="apiRateLimit", gt=0)
    api_burst_limit: int = Field(default=20, alias="apiBurstLimit", gt=0)
    delivery_ttl_days: int = Field(default=30, alias="deliveryTtlDays", ge=1)
    # CodeCommit repositories (names, or ARNs in the stack's region) whose branch pushes train: an
    # EventBridge rule, a trigger Lambda and the pipeline's read/comment rights on exactly these (mmp.infra.codecommit).
    codecommit_repositories: list[str] = Field(default_factory=list, alias="codecommitRepositories")
    # -- pipeline
    job_name_prefix: str | None = Field(default=None, alias="jobNamePrefix")
    # How often a study in the runner task reads its running trials' objective from MLflow (pruning).
    poll_seconds: int = Field(default=15, alias="pollSeconds", ge=10, le=3600)
    sagemaker_input_mode: str = Field(default="File", alias="sagemakerInputMode")
    sagemaker_volume_gb: int = Field(default=100, alias="sagemakerVolumeGb", ge=1, le=16384)
    sagemaker_max_instances: int = Field(default=4, alias="sagemakerMaxInstances", ge=1, le=256)
    # SageMaker warm pools (docs/sagemaker.md): how long a job's instances stay warm for the next matching
    # job, 0 to 3600 s (SageMaker's ceiling; 0 = off). A study's trials keep one and the study gives it back
    # when it ends; successive commits of one experiment only when set here (billed while warm).
    sagemaker_trial_keep_alive_seconds: int = Field(default=600, alias="sagemakerTrialKeepAliveSeconds",
                                                    ge=0, le=3600)
    sagemaker_commit_keep_alive_seconds: int = Field(default=0, alias="sagemakerCommitKeepAliveSeconds",
                                                     ge=0, le=3600)
    image_keep_count: int = Field(default=20, alias="imageKeepCount", ge=1)
    build_compute_type: str = Field(default="BUILD_GENERAL1_MEDIUM", alias="buildComputeType")
    # Unset: CodeBuild queues builds past the account's quota. A project limit above that quota fails
    # CreateProject ("greater than 0 and less than the account concurrent running builds limit"), and
    # builds past a set limit fail instead of queueing (CodeBuild user guide, "Builds in AWS CodeBuild").
    build_concurrency_limit: int | None = Field(default=None, alias="buildConcurrencyLimit", ge=1)
    # A Secrets Manager secret `ecr-pullthroughcache/...` ({"username", "accessToken"}) for Docker Hub: builds
    # then pull Docker Hub images through an ECR pull-through cache (mmp.infra.docker_hub), not anonymously.
    docker_hub_secret_arn: str | None = Field(default=None, alias="dockerHubSecretArn")
    log_retention_days: int = Field(default=30, alias="logRetentionDays")
    # -- mlflow
    mlflow_mode: Literal["fargate", "sagemaker"] = Field(default="fargate", alias="mlflowMode")
    # Unset: the stack builds mlflow_docker/ into its own ECR (mmp.infra.mlflow_server). Another image must
    # hold what that one does: mlflow[auth], psycopg2 and boto3 (the start-up installs nothing).
    mlflow_image: str | None = Field(default=None, alias="mlflowImage")
    mlflow_username: str = Field(default="admin", alias="mlflowUsername")
    mlflow_allowed_cidrs: list[str] = Field(default_factory=lambda: ["0.0.0.0/0"], alias="mlflowAllowedCidrs")
    mlflow_certificate_arn: str | None = Field(default=None, alias="mlflowCertificateArn")
    mlflow_domain_name: str | None = Field(default=None, alias="mlflowDomainName")
    mlflow_hosted_zone_id: str | None = Field(default=None, alias="mlflowHostedZoneId")
    egress_cidrs: list[str] = Field(default_factory=list, alias="egressCidrs")
    mlflow_cpu: int = Field(default=1024, alias="mlflowCpu")
    mlflow_memory: int = Field(default=2048, alias="mlflowMemory")
    sagemaker_mlflow_size: Literal["Small", "Medium", "Large"] = Field(default="Small", alias="sagemakerMlflowSize")
    db_instance_class: str = Field(default="db.t4g.micro", alias="dbInstanceClass")
    db_storage_gb: int = Field(default=20, alias="dbStorageGb", ge=20)
    db_multi_az: bool = Field(default=False, alias="dbMultiAz")
    # -- dlami
    dlami: bool = False
    dlami_ssm_parameter: str = Field(default=DEFAULT_DLAMI_SSM, alias="dlamiSsmParameter")
    dlami_ami_id: str | None = Field(default=None, alias="dlamiAmiId")
    ssh_user: str = Field(default="ubuntu", alias="sshUser")
    ssh_public_key: str | None = Field(default=None, alias="sshPublicKey")
    dlami_max_runtime_minutes: int = Field(default=240, alias="dlamiMaxRuntimeMinutes", ge=1)
    dlami_volume_gb: int = Field(default=200, alias="dlamiVolumeGb", ge=50)
    # -- kubernetes (EKS + Kubeflow Trainer, mmp.infra.kubernetes; needs fsx)
    kubernetes: bool = False
    kubernetes_version: str | None = Field(default=None, alias="kubernetesVersion")  # unset: EKS's default
    kubernetes_gpu_instance_types: list[str] = Field(default_factory=lambda: ["g5.xlarge"],
                                                     alias="kubernetesGpuInstanceTypes")
    kubernetes_max_nodes: int = Field(default=4, alias="kubernetesMaxNodes", ge=1, le=100)
    kubernetes_system_instance_type: str = Field(default="t3.medium", alias="kubernetesSystemInstanceType")
    kubernetes_node_volume_gb: int = Field(default=200, alias="kubernetesNodeVolumeGb", ge=50)
    # The API endpoint is private; these networks may also reach it (a `pulumi up` from outside the VPC).
    kubernetes_api_cidrs: list[str] = Field(default_factory=list, alias="kubernetesApiCidrs")
    # -- secrets: only whether each is set; the values stay pulumi secrets
    has_secrets: tuple[str, ...] = Field(default=(), description="secret keys present in config")

    @field_validator("deployment_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("notify_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return validate_email(value) if value else value

    @field_validator("ssh_cidrs")
    @classmethod
    def _ssh_closed(cls, value: list[str]) -> list[str]:
        for cidr in value:
            if _is_open(cidr):  # an invalid CIDR raises ValueError here too, with ipaddress's message
                raise ValueError(f"{cidr} would open SSH to the whole internet; name your own network")
        return value

    @field_validator("codecommit_repositories")
    @classmethod
    def _codecommit(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not CODECOMMIT_NAME_RE.fullmatch(entry) and not CODECOMMIT_ARN_RE.fullmatch(entry):
                raise ValueError(f"{entry!r} is neither a CodeCommit repository name (1-100 letters, digits, '_', "
                                 "'.', '-') nor its ARN (arn:aws:codecommit:REGION:ACCOUNT:NAME)")
        names = [entry.rsplit(":", 1)[-1] for entry in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value

    @field_validator("sagemaker_input_mode")
    @classmethod
    def _input_mode(cls, value: str) -> str:
        if value not in INPUT_MODES:
            raise ValueError(f"{value!r} is not run by the sagemaker backend; use {' or '.join(INPUT_MODES)}"
                             + (" (Pipe streams records to a reader train.py does not have)" if value == "Pipe" else ""))
        return value

    @field_validator("mlflow_domain_name")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is not None and not DOMAIN_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a DNS name such as mlflow.example.com")
        return value

    @field_validator("kubernetes_api_cidrs")
    @classmethod
    def _api_closed(cls, value: list[str]) -> list[str]:
        for cidr in value:
            if _is_open(cidr):
                raise ValueError(f"{cidr} would open the cluster's API endpoint to the whole internet; name your "
                                 "own network")
        return value

    @field_validator("kubernetes_version")
    @classmethod
    def _kubernetes_version(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = KUBERNETES_VERSION_RE.fullmatch(value)
        if not match:
            raise ValueError(f"{value!r} is not a Kubernetes minor version such as 1.33")
        if int(match.group(1)) < TRAINER_MIN_KUBERNETES:
            raise ValueError(f"{value}: Kubeflow Trainer needs Kubernetes 1.{TRAINER_MIN_KUBERNETES} or later")
        return value

    @field_validator("kubernetes_gpu_instance_types")
    @classmethod
    def _gpu_types(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one GPU instance type, such as g5.xlarge")
        for name in value:
            if not GPU_INSTANCE_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an EC2 instance type with NVIDIA GPUs (a g4dn, g5, g6, p3, p4d or "
                                 "p5 size such as g5.xlarge)")
        if len(set(value)) != len(value):
            raise ValueError("each instance type once (one node group each)")
        return value

    @field_validator("mlflow_allowed_cidrs", "ssh_cidrs", "egress_cidrs", "kubernetes_api_cidrs", mode="after")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: dict[str, DatasetEntry]) -> dict[str, DatasetEntry]:
        for name, entry in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
                raise ValueError(f"dataset name {name!r} is not a safe name")
            if entry.s3 and not entry.s3.startswith("s3://"):
                raise ValueError(f"datasets.{name}.s3 must be an s3:// URI")
            if entry.fsx and not entry.fsx.startswith("/"):
                raise ValueError(f"datasets.{name}.fsx must be an absolute path")
        return value

    @property
    def gitlab(self) -> bool:
        """GitLab deliveries are taken (and its token stored) when both GitLab secrets are set."""
        return {"gitlabToken", "gitlabWebhookSecret"} <= set(self.has_secrets)

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        problems = []
        if self.vpc_id and (not self.private_subnet_ids or not self.public_subnet_ids):
            problems.append("vpcId: reusing a VPC needs privateSubnetIds and publicSubnetIds too")
        if not self.vpc_id and (self.private_subnet_ids or self.public_subnet_ids):
            problems.append("privateSubnetIds/publicSubnetIds: only with vpcId")
        for key in ("githubToken", "webhookSecret"):
            if key not in self.has_secrets:
                problems.append(f"{key}: required; set it with `pulumi config set --secret mmp:{key} ...` (mmp deploy does)")
        gitlab = [k for k in ("gitlabToken", "gitlabWebhookSecret") if k in self.has_secrets]
        if len(gitlab) == 1:
            other = "gitlabWebhookSecret" if gitlab == ["gitlabToken"] else "gitlabToken"
            problems.append(f"{other}: GitLab needs both gitlabToken and gitlabWebhookSecret (secrets); "
                            f"only {gitlab[0]} is set")
        if self.mlflow_mode == "fargate" and "mlflowAdminPassword" not in self.has_secrets:
            problems.append("mlflowAdminPassword: required with mlflowMode fargate (secret)")
        if self.dlami and (not self.ssh_public_key or "sshPrivateKey" not in self.has_secrets):
            problems.append("dlami: needs sshPublicKey and the secret sshPrivateKey (the key the backend connects with)")
        if self.dlami and not self.fsx:
            problems.append("dlami: the DLAMI cluster reads datasets from FSx; set mmp:fsx true as well")
        if self.kubernetes and not self.fsx:
            problems.append("kubernetes: the training pods read datasets from FSx (a static PersistentVolume); "
                            "set mmp:fsx true as well")
        if self.fsx and not valid_fsx_capacity(self.fsx_storage_gb):
            problems.append(f"fsxStorageGb: PERSISTENT_2 SSD takes 1200, 2400 or a multiple of 2400 GiB, "
                            f"got {self.fsx_storage_gb}")
        problems += fargate_size_problems(self.mlflow_cpu, self.mlflow_memory, cpu_key="mlflowCpu",
                                          memory_key="mlflowMemory")
        if self.fsx:
            problems += self._fsx_link_problems()
        if self.fsx and not self.nat_gateway and not self.vpc_id:
            problems.append("natGateway: false with fsx true leaves sagemaker-fsx jobs and DLAMI hosts in private "
                            "subnets with no route to ECR, Secrets Manager or MLflow; keep natGateway true")
        if self.mlflow_certificate_arn and not self.mlflow_domain_name:
            problems.append("mlflowCertificateArn: needs mlflowDomainName, the name the certificate covers (an ACM "
                            "certificate cannot cover the load balancer's *.elb.amazonaws.com name)")
        if self.mlflow_domain_name and not self.mlflow_certificate_arn:
            problems.append("mlflowDomainName: only with mlflowCertificateArn (HTTPS for that name)")
        if self.mlflow_hosted_zone_id and not self.mlflow_domain_name:
            problems.append("mlflowHostedZoneId: only with mlflowDomainName (the record it creates)")
        if self.mlflow_mode == "fargate" and not self.mlflow_open:
            if self.vpc_id and not self.egress_cidrs:
                problems.append("egressCidrs: required with vpcId when mlflowAllowedCidrs is narrowed: the public "
                                "addresses the reused VPC's private subnets leave through (its NAT), so the "
                                "pipeline's own Lambdas and training jobs can reach MLflow")
            if not self.vpc_id and not self.nat_gateway:
                problems.append("natGateway: false with a narrowed mlflowAllowedCidrs cuts the pipeline off from "
                                "MLflow (its callers leave through the NAT address); keep natGateway true or "
                                "open mlflowAllowedCidrs")
        if self.docker_hub_secret_arn:
            problems.extend(_docker_hub_problems(self.docker_hub_secret_arn, self.region, self.prefix))
        if self.egress_cidrs and not self.vpc_id:
            problems.append("egressCidrs: only with vpcId (a stack-made VPC admits its own NAT address)")
        for entry in self.codecommit_repositories:
            match = CODECOMMIT_ARN_RE.fullmatch(entry)
            if match and match.group(1) != self.region:
                problems.append(f"codecommitRepositories: {entry} is in {match.group(1)}; the stack's EventBridge rule "
                                f"hears only its own region's events ({self.region}): list repositories in {self.region}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _fsx_link_problems(self) -> list[str]:
        """FSx allows 8 data repository associations per file system, none overlapping another's
        S3 prefix (FSx API reference, CreateDataRepositoryAssociation); the stack's own
        datasets/ prefix takes one."""
        linked = self.fsx_linked_datasets
        problems = []
        if len(linked) > MAX_LINKED_DATASETS:
            problems.append(f"datasets: with fsx true each dataset in another bucket is linked into FSx by its own "
                            f"data repository association, and a file system takes 8 (one is the stack's own "
                            f"datasets/ prefix): at most {MAX_LINKED_DATASETS} such datasets, got {len(linked)} "
                            f"({', '.join(sorted(linked))}); give the others an fsx path that already holds them")
        prefixes = sorted((uri.rstrip("/") + "/", name) for name, uri in linked.items())
        for (first, a), (second, b) in zip(prefixes, prefixes[1:]):
            if second.startswith(first):
                problems.append(f"datasets.{a}.s3 and datasets.{b}.s3: FSx links an S3 prefix once and never one "
                                f"inside another ({first} holds {second}); name one of them, or give one an fsx path")
        return problems

    # -- derived -------------------------------------------------------------------
    @property
    def fsx_linked_datasets(self) -> dict[str, str]:
        """name → S3 prefix of each configured dataset outside the stack's bucket that the stack
        links into FSx itself, at /shared/<name> (one given an `fsx` path is already there)."""
        return {name: entry.s3 for name, entry in self.datasets.items() if entry.s3 and not entry.fsx}

    @property
    def prefix(self) -> str:
        """Physical-name prefix, unique per deployment and environment."""
        return f"{self.deployment_name}-{self.stack}"

    @property
    def job_prefix(self) -> str:
        return self.job_name_prefix or f"mmp-{self.prefix}"

    @property
    def production(self) -> bool:
        return self.stack.startswith("prod")

    @property
    def mlflow_open(self) -> bool:
        """Whether the MLflow load balancer admits the whole internet (then no caller needs admitting)."""
        return any(_is_open(c) for c in self.mlflow_allowed_cidrs)

    @property
    def pipeline_in_vpc(self) -> bool:
        """Run the stage Lambdas and every training job in the private subnets, so they reach a
        narrowed MLflow from the NAT's (or egressCidrs') address."""
        return self.mlflow_mode == "fargate" and not self.mlflow_open

    @property
    def zones(self) -> list[str]:
        return self.availability_zones or [f"{self.region}a", f"{self.region}b"]


def parse_settings(stack: str, values: dict[str, Any], *, region: str | None = None,
                   secret_keys: tuple[str, ...] = ()) -> Settings:
    """Validate plain config values; raise SettingsError naming each `mmp:` key at fault."""
    data = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    data.update(stack=stack, has_secrets=tuple(k for k in SECRET_KEYS if k in secret_keys))
    if region:
        data["region"] = region
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"mmp:{loc}: {err['msg']}" if loc else err["msg"].removeprefix("Value error, "))
        raise SettingsError("stack config is invalid:\n  - " + "\n  - ".join(lines)) from None


KEYS = tuple(f.alias or name for name, f in Settings.model_fields.items() if name not in ("stack", "region", "has_secrets"))
