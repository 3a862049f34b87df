"""A SageMaker real-time endpoint for the production model version, switched blue/green.

Promoting to the deploy alias (default `production`) on AWS makes a SageMaker model
and endpoint config for that version, then creates the endpoint or, when it exists,
`update_endpoint`s it with a blue/green policy: SageMaker brings the new fleet up,
shifts all traffic, and rolls back by itself if the new fleet fails. What this
module created is deleted on every failure path; the replaced config and model are
deleted once the switch is done. The container is MLflow's pyfunc serving image
(`mlflow sagemaker build-and-push-container`); the model's files are read straight
from the MLflow S3 artifact store (uncompressed `S3Prefix`), so nothing is copied.

Configured from the environment (the Pulumi stack sets these on the pipeline):
MMP_ENDPOINT_ROLE_ARN, MMP_ENDPOINT_IMAGE (both turn deployment on),
MMP_ENDPOINT_INSTANCE_TYPE, MMP_ENDPOINT_INSTANCE_COUNT, MMP_ENDPOINT_NAME,
MMP_ENDPOINT_ALIAS, MMP_ENDPOINT_WAIT_DELAY, MMP_ENDPOINT_WAIT_ATTEMPTS.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("mmp.models")

ENV_PREFIX = "MMP_ENDPOINT_"
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's rule for all three names
VARIANT = "AllTraffic"
BLUE_GREEN = {
    "BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
        "TerminationWaitInSeconds": 120,  # keep the old fleet a little, for a quick automatic rollback
        "MaximumExecutionTimeoutInSeconds": 3600,
    }
}
BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting", "UpdateRollbackFailed")


class EndpointError(RuntimeError):
    """Deployment refused or failed; the message says what to fix."""


class EndpointSettings(BaseModel):
    """Where and how to deploy; field aliases are the environment variables' names."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    role_arn: str = Field(alias="MMP_ENDPOINT_ROLE_ARN", pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$",
                          description="IAM role SageMaker assumes to pull the image and read S3")
    image: str = Field(alias="MMP_ENDPOINT_IMAGE", min_length=1, description="MLflow pyfunc serving image URI")
    instance_type: str = Field(default="ml.m5.large", alias="MMP_ENDPOINT_INSTANCE_TYPE", pattern=r"^ml\.[a-z0-9.]+$")
    instance_count: int = Field(default=1, alias="MMP_ENDPOINT_INSTANCE_COUNT", ge=1, le=100)
    endpoint_name: str | None = Field(default=None, alias="MMP_ENDPOINT_NAME", pattern=NAME_RE.pattern)
    alias: str = Field(default="production", alias="MMP_ENDPOINT_ALIAS", min_length=1)
    wait_delay: int = Field(default=30, alias="MMP_ENDPOINT_WAIT_DELAY", ge=0)
    wait_attempts: int = Field(default=120, alias="MMP_ENDPOINT_WAIT_ATTEMPTS", ge=0)  # 0: do not wait

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "EndpointSettings | None":
        """The settings, or None when deployment is not configured (the local stack)."""
        env = os.environ if environ is None else environ
        given = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and v != ""}
        if not given.get("MMP_ENDPOINT_ROLE_ARN") and not given.get("MMP_ENDPOINT_IMAGE"):
            return None
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(f"{where}: {err['msg']}")
            raise EndpointError("endpoint settings are invalid: " + "; ".join(problems)) from None

    def name_for(self, model_name: str) -> str:
        return self.endpoint_name or safe_name(f"mmp-{model_name}")


def safe_name(text: str, limit: int = 63) -> str:
    """`text` made into a SageMaker resource name (letters, digits, single hyphens, ≤ 63)."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9-]+", "-", text)).strip("-")[:limit].rstrip("-")
    return name or "mmp-model"


def resource_name(endpoint: str, version: str, stamp: str | None = None) -> str:
    """The model / endpoint-config name of one deployment: unique, and says which version."""
    if stamp is None:
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}"
    suffix = f"-v{version}-{stamp}"
    return safe_name(endpoint, 63 - len(suffix)) + suffix


def model_data(mv: "ModelVersion") -> str:
    """The S3 prefix holding the version's MLflow model (its MLmodel file and weights)."""
    source = getattr(mv, "storage_location", None) or mv.source
    if not source or not source.startswith("s3://"):
        raise EndpointError(f"SageMaker reads models from S3, but version {mv.version} of {mv.name} lives at "
                            f"{source!r}; point the MLflow artifact store at S3 (the AWS stack does)")
    return source.rstrip("/") + "/"


def _tags(model_name: str, version: str) -> list[dict[str, str]]:
    return [{"Key": "mmp:model", "Value": model_name[:256]}, {"Key": "mmp:version", "Value": version}]


def _endpoint(sm: Any, name: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return sm.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ValidationException":
            return None  # SageMaker's answer for "Could not find endpoint"
        raise


def _quietly(what: str, call: Callable[[], Any]) -> None:
    """Cleanup that must not hide the error that made it necessary."""
    try:
        call()
    except Exception as exc:
        log.error("could not delete %s: %s", what, exc)


def _delete_config_and_models(sm: Any, config_name: str) -> None:
    try:
        variants = sm.describe_endpoint_config(EndpointConfigName=config_name).get("ProductionVariants", [])
    except Exception as exc:
        log.error("could not read endpoint config %s: %s", config_name, exc)
        variants = []
    _quietly(f"endpoint config {config_name}", lambda: sm.delete_endpoint_config(EndpointConfigName=config_name))
    for variant in variants:
        model = variant.get("ModelName")
        if model:
            _quietly(f"model {model}", lambda m=model: sm.delete_model(ModelName=m))


def deploy_version(settings: EndpointSettings, model_name: str, mv: "ModelVersion", *, sm: Any = None) -> dict:
    """Create or blue/green-update the endpoint so it serves `mv`; return what was done."""
    from mmp import aws

    sm = sm or aws.client("sagemaker")
    version = str(mv.version)
    data = model_data(mv)
    endpoint = settings.name_for(model_name)
    name = resource_name(endpoint, version)
    tags = _tags(model_name, version)
    existing = _endpoint(sm, endpoint)
    if existing is not None and existing.get("EndpointStatus") in BUSY:
        raise EndpointError(f"endpoint {endpoint} is {existing['EndpointStatus']}; try again when it is InService")
    created: list[tuple[str, Callable[[], Any]]] = []
    action = "updated" if existing is not None else "created"
    try:
        sm.create_model(
            ModelName=name, ExecutionRoleArn=settings.role_arn, Tags=tags,
            PrimaryContainer={
                "Image": settings.image,
                "ModelDataSource": {"S3DataSource": {"S3Uri": data, "S3DataType": "S3Prefix",
                                                     "CompressionType": "None"}},
                "Environment": {"MLFLOW_DEPLOYMENT_FLAVOR_NAME": "python_function",
                                "SERVING_ENVIRONMENT": "SageMaker"},
            },
        )
        created.append((f"model {name}", lambda: sm.delete_model(ModelName=name)))
        sm.create_endpoint_config(
            EndpointConfigName=name, Tags=tags,
            ProductionVariants=[{"VariantName": VARIANT, "ModelName": name, "InstanceType": settings.instance_type,
                                 "InitialInstanceCount": settings.instance_count, "InitialVariantWeight": 1.0}],
        )
        created.append((f"endpoint config {name}", lambda: sm.delete_endpoint_config(EndpointConfigName=name)))
        if existing is None:
            sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=name, Tags=tags)
            created.append((f"endpoint {endpoint}", lambda: sm.delete_endpoint(EndpointName=endpoint)))
        else:
            sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=name, DeploymentConfig=BLUE_GREEN)
        if settings.wait_attempts:
            sm.get_waiter("endpoint_in_service").wait(
                EndpointName=endpoint,
                WaiterConfig={"Delay": settings.wait_delay, "MaxAttempts": settings.wait_attempts})
    except BaseException as exc:
        for what, delete in reversed(created):  # SageMaker has rolled an update back to the old config
            _quietly(what, delete)
        if isinstance(exc, Exception) and not isinstance(exc, EndpointError):
            raise EndpointError(f"deploying {model_name} v{version} to endpoint {endpoint} failed: {exc}") from exc
        raise
    previous = existing.get("EndpointConfigName") if existing else None
    if previous and previous != name:
        _delete_config_and_models(sm, previous)
    log.info("endpoint %s %s: %s v%s", endpoint, action, model_name, version)
    return {"endpoint": endpoint, "action": action, "endpoint_config": name, "sagemaker_model": name,
            "previous_config": previous, "model_data": data, "region": sm.meta.region_name}


def delete_endpoint(endpoint: str, *, sm: Any = None) -> bool:
    """Delete an endpoint with its config and models; False when there was none."""
    from mmp import aws

    sm = sm or aws.client("sagemaker")
    existing = _endpoint(sm, endpoint)
    if existing is None:
        return False
    sm.delete_endpoint(EndpointName=endpoint)
    _delete_config_and_models(sm, existing["EndpointConfigName"])
    return True


def deployer_for(alias: str, environ: dict[str, str] | None = None):
    """A promote() deployer when the environment configures an endpoint for `alias`, else None."""
    settings = EndpointSettings.from_env(environ)
    if settings is None or settings.alias != alias:
        return None

    def deploy(model_name: str, mv: "ModelVersion") -> dict:
        return deploy_version(settings, model_name, mv)

    return deploy
