"""SageMaker endpoint deployment against moto in server mode (update_endpoint, which moto
lacks, through a botocore Stubber), and promotion to production deploying it."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

from mmp import aws as mmp_aws
from mmp.models.endpoint import (BLUE_GREEN, EndpointError, EndpointSettings, delete_endpoint, deploy_version,
                                 deployer_for, resource_name)
from mmp.models.promote import PromotionError, promote, rollback

from .conftest import Synthetic

ROLE = "arn:aws:iam::123456789012:role/mmp-endpoint"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mlflow-pyfunc:3.17.2"
ENV = {"MMP_ENDPOINT_ROLE_ARN": ROLE, "MMP_ENDPOINT_IMAGE": IMAGE, "MMP_ENDPOINT_INSTANCE_TYPE": "ml.c5.xlarge",
       "MMP_ENDPOINT_WAIT_DELAY": "0", "MMP_ENDPOINT_WAIT_ATTEMPTS": "3"}
SETTINGS = EndpointSettings.model_validate(ENV)


class WithStubbedUpdate:
    """moto's SageMaker client, except update_endpoint, answered by a botocore Stubber."""

    def __init__(self, sm):
        self.sm = sm
        self.stubbed = mmp_aws.client("sagemaker")
        self.stubber = Stubber(self.stubbed)

    def expect_update(self, endpoint: str) -> None:
        self.stubber.add_response(
            "update_endpoint",
            {"EndpointArn": f"arn:aws:sagemaker:eu-west-1:123456789012:endpoint/{endpoint}"},
            {"EndpointName": endpoint, "EndpointConfigName": ANY, "DeploymentConfig": BLUE_GREEN})
        self.stubber.activate()

    def __getattr__(self, name):
        return getattr(self.stubbed if name == "update_endpoint" else self.sm, name)


class FailingCreate(WithStubbedUpdate):
    def create_endpoint(self, **kwargs):
        raise ClientError({"Error": {"Code": "ResourceLimitExceeded", "Message": "no ml.c5.xlarge left"}},
                          "CreateEndpoint")


def _version(client, name: str, source: str, version_tags: dict | None = None):
    try:
        client.create_registered_model(name)
    except Exception:
        pass
    return client.create_model_version(name, source, tags=version_tags)


def _names(sm):
    return ({m["ModelName"] for m in sm.list_models()["Models"]},
            {c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]})


def test_settings_come_from_the_environment_with_clear_errors():
    assert EndpointSettings.from_env({}) is None
    assert EndpointSettings.from_env(ENV).instance_type == "ml.c5.xlarge"
    with pytest.raises(EndpointError) as exc:
        EndpointSettings.from_env({"MMP_ENDPOINT_ROLE_ARN": "admin", "MMP_ENDPOINT_INSTANCE_COUNT": "0"})
    for name in ("MMP_ENDPOINT_ROLE_ARN", "MMP_ENDPOINT_IMAGE", "MMP_ENDPOINT_INSTANCE_COUNT"):
        assert name in str(exc.value)
    with pytest.raises(EndpointError, match="MMP_ENDPOINT_NAMES: Extra inputs"):
        EndpointSettings.from_env({**ENV, "MMP_ENDPOINT_NAMES": "typo"})
    assert deployer_for("production", ENV) is not None
    assert deployer_for("staging", ENV) is None and deployer_for("production", {}) is None
    name = resource_name("mmp-" + "x" * 80, "12", "20260101000000123")
    assert len(name) <= 63 and name.endswith("-v12-20260101000000123")


def test_first_deploy_creates_then_blue_green_update_and_cleanup(aws, client):
    sm = WithStubbedUpdate(mmp_aws.client("sagemaker"))
    v1 = _version(client, "digits", "s3://mlflow-artifacts/1/models/m-aaa/artifacts")
    first = deploy_version(SETTINGS, "digits", v1, sm=sm)
    assert (first["endpoint"], first["action"], first["previous_config"]) == ("mmp-digits", "created", None)
    endpoint = sm.describe_endpoint(EndpointName="mmp-digits")
    assert endpoint["EndpointStatus"] == "InService" and endpoint["EndpointConfigName"] == first["endpoint_config"]
    config = sm.describe_endpoint_config(EndpointConfigName=first["endpoint_config"])
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 1)
    model = sm.describe_model(ModelName=variant["ModelName"])
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE
    assert container["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": "s3://mlflow-artifacts/1/models/m-aaa/artifacts/", "S3DataType": "S3Prefix",
        "CompressionType": "None"}
    assert container["Environment"]["MLFLOW_DEPLOYMENT_FLAVOR_NAME"] == "python_function"

    v2 = _version(client, "digits", "s3://mlflow-artifacts/1/models/m-bbb/artifacts")
    sm.expect_update("mmp-digits")
    second = deploy_version(SETTINGS, "digits", v2, sm=sm)
    sm.stubber.assert_no_pending_responses()  # update_endpoint was called with the blue/green policy
    assert second["action"] == "updated" and second["previous_config"] == first["endpoint_config"]
    assert "-v2-" in second["endpoint_config"]
    assert _names(sm) == ({second["sagemaker_model"]}, {second["endpoint_config"]})  # the old pair is gone


def test_a_failed_deploy_deletes_what_it_made_and_local_models_are_refused(aws, client):
    sm = FailingCreate(mmp_aws.client("sagemaker"))
    v1 = _version(client, "digits", "s3://mlflow-artifacts/1/models/m-aaa/artifacts")
    with pytest.raises(EndpointError, match="no ml.c5.xlarge left"):
        deploy_version(SETTINGS, "digits", v1, sm=sm)
    assert _names(sm) == (set(), set())
    local = _version(client, "digits", "file:///tmp/artifacts/models/m-ccc/artifacts")
    with pytest.raises(EndpointError, match="SageMaker reads models from S3.*file:///tmp"):
        deploy_version(SETTINGS, "digits", local, sm=sm)
    assert _names(sm) == (set(), set())


def test_promoting_to_production_deploys_only_production(aws, client, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    runs = Synthetic(client, "s3-digits", artifact_location="s3://mlflow-artifacts/7")
    first = runs.run(metrics={"acc": 0.8})
    p1 = promote("s3-digits", "acc")
    assert p1.deployment["action"] == "created" and p1.deployment["endpoint"] == "mmp-s3-digits"
    assert p1.deployment["model_data"].startswith("s3://mlflow-artifacts/7/")
    sm = mmp_aws.client("sagemaker")
    assert sm.describe_endpoint(EndpointName="mmp-s3-digits")["EndpointConfigName"] == p1.deployment["endpoint_config"]

    staging = promote("s3-digits", "acc", alias="staging")  # only production deploys
    assert staging.deployment is None

    monkeypatch.setenv("MMP_ENDPOINT_IMAGE", "")
    monkeypatch.setenv("MMP_ENDPOINT_INSTANCE_COUNT", "many")
    runs.run(metrics={"acc": 0.9})
    with pytest.raises(PromotionError, match="MMP_ENDPOINT_INSTANCE_COUNT"):
        promote("s3-digits", "acc")
    assert len(client.search_model_versions("name = 's3-digits'")) == 1  # refused before any write
    assert str(client.get_registered_model("s3-digits").aliases["production"]) == "1"
    assert p1.run_id == first

    assert delete_endpoint("mmp-s3-digits", sm=sm) is True  # endpoint, config and model all go
    assert _names(sm) == (set(), set()) and sm.list_endpoints()["Endpoints"] == []
    assert delete_endpoint("mmp-s3-digits", sm=sm) is False


def test_a_failed_deploy_leaves_the_alias_where_it_was(aws, client, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    local = Synthetic(client, "local-digits")  # artifacts on local disk: SageMaker cannot read them
    local.run(metrics={"acc": 0.5})
    promote("local-digits", "acc", deployer=None)
    local.run(metrics={"acc": 0.9})
    with pytest.raises(PromotionError, match="did not move.*SageMaker reads models from S3"):
        promote("local-digits", "acc")
    assert str(client.get_registered_model("local-digits").aliases["production"]) == "1"
    with pytest.raises(PromotionError, match="no earlier holder"):
        rollback("local-digits")


def test_rollback_redeploys_the_previous_version(aws, client):
    sm = WithStubbedUpdate(mmp_aws.client("sagemaker"))

    def deployer(name, mv):
        return deploy_version(SETTINGS, name, mv, sm=sm)

    runs = Synthetic(client, "s3-digits", artifact_location="s3://mlflow-artifacts/7")
    runs.run(metrics={"acc": 0.8})
    assert promote("s3-digits", "acc", deployer=deployer).deployment["action"] == "created"
    runs.run(metrics={"acc": 0.9})
    sm.expect_update("mmp-s3-digits")
    assert "-v2-" in promote("s3-digits", "acc", deployer=deployer).deployment["endpoint_config"]
    sm.expect_update("mmp-s3-digits")
    back = rollback("s3-digits", deployer=deployer)
    sm.stubber.assert_no_pending_responses()
    assert back.version == "1" and back.deployment["action"] == "updated"
    assert "-v1-" in back.deployment["endpoint_config"]
    assert str(client.get_registered_model("s3-digits").aliases["production"]) == "1"
