"""What a first real `pulumi up` and first push would hit, checked with the consumers' own rules:
every IAM document through parliament (an IAM linter that knows each action's resource forms),
the shipped prod example through the program, and each permission AWS documents as needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from . import iam_lint as lint

ROOT = Path(__file__).resolve().parents[2]
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nthatmustnotleak\n-----END OPENSSH PRIVATE KEY-----"


def _example(name: str, h) -> dict[str, str]:
    """A shipped Pulumi.<stack>.yaml.example as run_stack config (values as Pulumi passes them), plus secrets."""
    config = yaml.safe_load((ROOT / name).read_text())["config"]
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    return {**values, **{k: h.DEV_CONFIG[k] for k in ("mmp:githubToken", "mmp:webhookSecret", "mmp:mlflowAdminPassword")}}


@pytest.fixture(scope="module")
def prod_example(h):
    return h.run_stack("prod", _example("Pulumi.prod.yaml.example", h))


@pytest.fixture(scope="module")
def managed(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:mlflowMode": "sagemaker"})


@pytest.fixture(scope="module")
def everything(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true", "mmp:sshPublicKey": "ssh-ed25519 AAAA t",
                               "mmp:sshPrivateKey": SSH_KEY,
                               "mmp:datasets": json.dumps({"cifar": {"s3": "s3://shared-data/cifar/"}})})


def _documents(run):
    for policy in run.of_type("aws:iam/rolePolicy:RolePolicy"):
        yield f"{policy.name} (policy)", policy.inputs["policy"]
    for role in run.of_type("aws:iam/role:Role"):
        yield f"{role.name} (trust)", role.inputs["assumeRolePolicy"]


def _policy(run, name_part: str) -> list[dict]:
    return json.loads(run.one("aws:iam/rolePolicy:RolePolicy", name_part).inputs["policy"])["Statement"]


def _grants(statements: list[dict], action: str) -> list[str]:
    return [r for st in statements if action in st["Action"] for r in st["Resource"]]


# Actions AWS documents that parliament's bundled action table predates, each with where AWS lists it.
NEWER_THAN_PARLIAMENT = {
    # "Data retrieval APIs for Amazon SageMaker with MLflow": SearchLoggedModels, Read (MLflow 3's
    # logged models, which promotion searches for a run's model)
    "Unknown action sagemaker-mlflow:SearchLoggedModels",
}


@pytest.mark.parametrize("which", ["dev", "prod", "prod_example", "managed", "everything"])
def test_every_iam_document_passes_parliament(which, request):
    parliament = lint.parliament()
    analyze_policy_string, enhance_finding = parliament.analyze_policy_string, parliament.enhance_finding

    run = request.getfixturevalue(which)
    documents = list(_documents(run))
    assert len(documents) >= 10
    problems = []
    for name, text in documents:
        policy = analyze_policy_string(text, ignore_private_auditors=True)
        for finding in policy.findings:
            finding = enhance_finding(finding)
            if name.endswith("(trust)") and finding.issue == "MALFORMED" and "Resource" in str(finding.detail):
                continue  # a trust policy is resource-based: it has a Principal, never a Resource
            if finding.issue == "UNKNOWN_ACTION" and str(finding.detail) in NEWER_THAN_PARLIAMENT:
                continue
            problems.append(f"{name}: {finding.issue} {finding.detail}")
        if name.endswith("(trust)"):
            statements = json.loads(text)["Statement"]
            assert all(set(st["Principal"]) == {"Service"} and st["Action"] == "sts:AssumeRole" for st in statements)
    assert not problems, "\n".join(problems)


def test_the_prod_example_keeps_the_pipeline_in_reach_of_its_mlflow(prod_example):
    """mlflowAllowedCidrs is narrowed: the load balancer also admits the NAT address, and every
    caller of MLflow in the pipeline (stage Lambdas, training jobs) leaves through that NAT."""
    run = prod_example
    alb = run.one("aws:ec2/securityGroup:SecurityGroup", "mlflow-alb").inputs["ingress"]
    assert {tuple(r["cidrBlocks"]) for r in alb} == {("198.51.100.0/24",), ("198.51.100.77/32",)}  # example + NAT EIP
    assert {(r["fromPort"], r["toPort"]) for r in alb} == {(443, 443)}
    lambda_sg = run.one("aws:ec2/securityGroup:SecurityGroup", "network-lambda")
    private = set(run.exports["privateSubnetIds"])
    for fn in run.of_type("aws:lambda/function:Function"):
        if fn.name.startswith("pipeline-"):
            assert set(fn.inputs["vpcConfig"]["subnetIds"]) == private, fn.name
            assert fn.inputs["vpcConfig"]["securityGroupIds"] == [f"{lambda_sg.name}-id"]
    env = run.exports["backendEnv"]
    assert set(env["MMP_SUBNET_IDS"].split(",")) == private  # plain sagemaker jobs in VPC mode too
    assert env["MMP_SECURITY_GROUP_IDS"]
    stages = _policy(run, "pipeline-stages")
    assert _grants(stages, "ec2:CreateNetworkInterface")[0].startswith("arn:aws:ec2:eu-west-1:123456789012:")
    # HTTPS at the configured name (an ACM certificate cannot cover *.elb.amazonaws.com).
    assert run.exports["mlflowUrl"] == "https://mlflow.acme-ml.example.com"
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.acme-ml.example.com"
    record = run.one("aws:route53/record:Record").inputs
    assert record["name"] == "mlflow.acme-ml.example.com" and record["aliases"][0]["name"].endswith(".elb.amazonaws.com")


def test_an_open_mlflow_leaves_the_lambdas_outside_the_vpc(dev):
    assert not dev.of_type("aws:route53/record:Record")
    assert all(not fn.inputs.get("vpcConfig") for fn in dev.of_type("aws:lambda/function:Function"))
    assert dev.exports["backendEnv"]["MMP_SUBNET_IDS"] == ""
    assert len(dev.one("aws:ec2/securityGroup:SecurityGroup", "mlflow-alb").inputs["ingress"]) == 1


def test_a_reused_vpc_admits_the_egress_addresses_it_names(h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:vpcId": "vpc-0abc", "mmp:privateSubnetIds": '["subnet-a"]',
                              "mmp:publicSubnetIds": '["subnet-c"]', "mmp:mlflowAllowedCidrs": '["198.51.100.0/24"]',
                              "mmp:egressCidrs": '["203.0.113.9/32"]'})
    alb = run.one("aws:ec2/securityGroup:SecurityGroup", "mlflow-alb").inputs["ingress"]
    assert ["203.0.113.9/32"] in [r["cidrBlocks"] for r in alb]


def test_datasets_in_other_buckets_are_readable_and_nothing_more(everything, h):
    statements = _policy(everything, "pipeline-sagemaker")
    assert "arn:aws:s3:::shared-data/cifar/*" in _grants(statements, "s3:GetObject")
    assert "arn:aws:s3:::shared-data" in _grants(statements, "s3:ListBucket")
    assert not any(r.startswith("arn:aws:s3:::shared-data") and r not in ("arn:aws:s3:::shared-data",
                                                                         "arn:aws:s3:::shared-data/cifar/*")
                   for st in statements for r in st["Resource"])


def test_fsx_describe_is_granted_on_star(everything):
    """fsx:DescribeFileSystems has no resource-level form: scoped to one ARN it grants nothing."""
    assert _grants(_policy(everything, "pipeline-sagemaker"), "fsx:DescribeFileSystems") == ["*"]


def test_codebuild_can_read_its_s3_source(dev):
    """AWS documents s3:GetObject/GetObjectVersion on the source and GetBucketAcl/GetBucketLocation on its bucket."""
    statements = _policy(dev, "pipeline-build")
    bucket = dev.one("aws:s3/bucket:Bucket", "artifacts").outputs["arn"]
    source = dev.one("aws:codebuild/project:Project", "pipeline-build").inputs["source"]
    assert source["type"] == "S3" and source["location"].startswith(bucket.removeprefix("arn:aws:s3:::") + "/")
    for action in ("s3:GetBucketAcl", "s3:GetBucketLocation"):
        assert _grants(statements, action) == [bucket], action
    for action in ("s3:GetObject", "s3:GetObjectVersion"):
        grants = _grants(statements, action)
        assert f"{bucket}/codebuild/*" in grants and all(g.startswith(f"{bucket}/") for g in grants), action


def test_the_state_machine_waits_for_its_roles_policy_and_logs_under_vendedlogs(dev):
    machine = dev.one("aws:sfn/stateMachine:StateMachine")
    sfn_policy = dev.one("aws:iam/rolePolicy:RolePolicy", "pipeline-sfn")
    assert sfn_policy.urn in machine.dependencies  # no IAM propagation race on create
    group = dev.one("aws:cloudwatch/logGroup:LogGroup", "pipeline-sfn-logs").inputs["name"]
    assert group.startswith("/aws/vendedlogs/states/")
    assert machine.inputs["loggingConfiguration"]["logDestination"].startswith(
        dev.one("aws:cloudwatch/logGroup:LogGroup", "pipeline-sfn-logs").outputs["arn"])
    stage_policy = dev.one("aws:iam/rolePolicy:RolePolicy", "pipeline-stages")
    for fn in dev.of_type("aws:lambda/function:Function"):
        if fn.name.startswith("pipeline-"):
            assert stage_policy.urn in fn.dependencies, fn.name


def test_managed_mlflow_is_signed_for_and_scoped_to_its_server(managed):
    server = managed.one("aws:sagemaker/mlflowTrackingServer:MlflowTrackingServer").outputs["arn"]
    env = managed.exports["backendEnv"]
    assert env["MMP_MLFLOW_TRACKING_SERVER_ARN"] == server
    assert env["MLFLOW_TRACKING_URI"] == "https://eu-west-1.experiments.sagemaker.aws"  # the API, signed
    assert env["MMP_MLFLOW_UI_URL"] == managed.exports["mlflowUrl"]
    for role, needed in (("pipeline-stages", "sagemaker-mlflow:CreateRun"),
                         ("pipeline-sagemaker", "sagemaker-mlflow:Log*")):
        statements = _policy(managed, role)
        assert _grants(statements, needed) == [server], role
        assert not any(a.startswith("sagemaker-mlflow:") and r != server
                       for st in statements for a in st["Action"] for r in st["Resource"]), role


def test_the_webhook_compare_budget_fits_inside_the_api_gateway_timeout(dev):
    """API Gateway answers 503 itself past the integration timeout; the handler must answer first."""
    from mmp.webhook.aws_lambda import COMPARE_BUDGET_S

    integration = dev.one("aws:apigatewayv2/integration:Integration").inputs["timeoutMilliseconds"] / 1000
    function = next(f for f in dev.of_type("aws:lambda/function:Function") if f.name.startswith("webhook"))
    assert integration <= 30  # HTTP APIs allow at most 30 s
    assert COMPARE_BUDGET_S + 3 <= integration <= function.inputs["timeout"]  # 3 s: secret, DynamoDB, Step Functions
