"""The whole Pulumi program under mocks, as a dev and a prod stack, and with each flag."""

from __future__ import annotations

import importlib
import ipaddress
import json
import re

import pytest

from mmp.infra.settings import KEYS, SECRET_KEYS, SettingsError, parse_settings

SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAthatmustnotleak\n-----END OPENSSH PRIVATE KEY-----"
FSX_TYPES = {"aws:fsx/lustreFileSystem:LustreFileSystem", "aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation"}


@pytest.fixture(scope="module")
def fsx(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true"})


def test_dev_inventory(dev):
    types = dev.types()
    assert types["aws:lambda/function:Function"] == 4  # webhook + prepare, launch, conclude
    assert types["aws:s3/bucket:Bucket"] == 2
    assert types["aws:sfn/stateMachine:StateMachine"] == 1
    assert types["aws:codebuild/project:Project"] == 3  # the training, runner and MLflow server images
    assert types["aws:ecr/repository:Repository"] == 3 and types["aws:ecr/lifecyclePolicy:LifecyclePolicy"] == 1
    assert types["pulumi-python:dynamic:Resource"] == 1  # the MLflow image, built at deploy (ImageReady)
    assert types["aws:dynamodb/table:Table"] == 1
    assert types["aws:apigatewayv2/api:Api"] == 1 and types["aws:apigatewayv2/stage:Stage"] == 1
    assert types["aws:rds/instance:Instance"] == 1 and types["aws:ecs/service:Service"] == 1
    assert types["aws:lb/loadBalancer:LoadBalancer"] == 1
    assert types["aws:secretsmanager/secret:Secret"] == 3  # GitHub token, webhook secret, MLflow admin
    assert types["aws:sns/topicSubscription:TopicSubscription"] == 1
    assert types["aws:ec2/vpcEndpoint:VpcEndpoint"] == 1
    assert sorted(dev.components.values()) == sorted(
        ["mmp:infra:Network", "mmp:infra:DataStore", "mmp:infra:MlflowServer", "mmp:infra:TrainingPipeline",
         "mmp:infra:WebhookApi", "mmp:infra:RunnerTask"])
    assert not FSX_TYPES & set(types), "FSx is off by default"
    assert "aws:ec2/launchTemplate:LaunchTemplate" not in types


def test_exports(dev):
    for key in ("webhookUrl", "mlflowUrl", "datasetsBucket", "fsxMountName", "notificationTopicArn",
                "stateMachineArn", "ecrRepositoryUri", "sagemakerRoleArn", "jobNamePrefix", "backendEnv"):
        assert key in dev.exports, key
    assert dev.exports["webhookUrl"].endswith("/webhook") and dev.exports["webhookUrl"].startswith("https://")
    assert dev.exports["mlflowUrl"].startswith("http://")
    assert dev.exports["jobNamePrefix"] == "mmp-acme-ml-dev"
    env = dev.exports["backendEnv"]
    assert env["MLFLOW_TRACKING_URI"] == dev.exports["mlflowUrl"]
    assert env["MMP_NOTIFY_TOPIC_ARN"] == dev.exports["notificationTopicArn"]
    assert json.loads(env["MMP_DATASETS"])["digits"]["s3"].startswith(f"s3://{dev.exports['datasetsBucket']}/")


def test_children_are_parented_and_components_register_outputs(dev):
    stack_urn = next(u for u in dev.registered_outputs if u.endswith("Stack::mmp-dev"))
    custom = [r for r in dev.resources if not r.typ.startswith("mmp:")]
    orphans = [r.name for r in custom if r.parent == stack_urn]
    assert not orphans, f"resources outside a component: {orphans}"
    for urn in dev.components:
        assert dev.registered_outputs.get(urn), f"{urn} registered no outputs"


def test_every_lambda_handler_is_a_real_function(dev, prod):
    for run in (dev, prod):
        for fn in run.of_type("aws:lambda/function:Function"):
            module, _, attr = fn.inputs["handler"].rpartition(".")
            target = getattr(importlib.import_module(module), attr)
            assert callable(target), fn.inputs["handler"]
            assert fn.inputs["runtime"] == "python3.11" and fn.inputs["architectures"] == ["x86_64"]
            assert fn.inputs["environment"]["variables"]["MMP_HOME"].startswith("/tmp/")


def test_state_machine_names_only_the_stacks_resources(dev):
    sm = dev.one("aws:sfn/stateMachine:StateMachine")
    definition = json.loads(sm.inputs["definition"])
    functions = {r.outputs["arn"] for r in dev.of_type("aws:lambda/function:Function")}
    projects = {r.outputs["name"] for r in dev.of_type("aws:codebuild/project:Project")}
    states = definition["States"]
    assert definition["StartAt"] in states
    named = []
    for name, state in states.items():
        for target in [state.get("Next"), state.get("Default"), *[c["Next"] for c in state.get("Choices", [])],
                       *[c["Next"] for c in state.get("Catch", [])]]:
            assert target is None or target in states, f"{name} → {target}"
        params = state.get("Parameters", {})
        if "FunctionName" in params:
            named.append(params["FunctionName"])
            assert params["FunctionName"] in functions
        if "ProjectName" in params:
            assert params["ProjectName"] in projects
            assert state["Resource"] == "arn:aws:states:::codebuild:startBuild.sync"
    assert len(set(named)) == 3  # prepare, launch, conclude
    for stage in ("Prepare", "BuildImage", "Launch", "Train", "RunTraining"):  # every failure ends in Conclude
        assert states[stage]["Catch"][0]["Next"] == "Conclude"
    role_policies = [json.loads(p.inputs["policy"]) for p in dev.of_type("aws:iam/rolePolicy:RolePolicy")]
    sfn_role = next(d for d in role_policies if any("lambda:InvokeFunction" in s["Action"] for s in d["Statement"]))
    invokable = {r for s in sfn_role["Statement"] if "lambda:InvokeFunction" in s["Action"] for r in s["Resource"]}
    assert set(named) <= invokable and not any(a.endswith("-webhook") for a in invokable)


def _statements(run):
    for policy in run.of_type("aws:iam/rolePolicy:RolePolicy"):
        for st in json.loads(policy.inputs["policy"])["Statement"]:
            yield policy.name, st


@pytest.mark.parametrize("which", ["dev", "prod"])
def test_no_wildcard_action_on_wildcard_resource(which, request, h):
    run = request.getfixturevalue(which)
    assert run.of_type("aws:iam/rolePolicy:RolePolicy")
    for name, st in _statements(run):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert "*" not in actions, name
        if "*" in resources:
            assert not any(a.endswith(":*") or a == "*" for a in actions), (name, st)
        for arn in resources:
            if arn != "*" and ":" in arn.split(":", 4)[-1] and not arn.startswith("arn:aws:s3"):
                assert h.ACCOUNT in arn, (name, arn)  # the stack's own account's resources
    roles = {r.name: r for r in run.of_type("aws:iam/role:Role")}
    assert len(roles) == len(run.of_type("aws:iam/rolePolicy:RolePolicy"))
    stage_policy = next(st for name, st in _statements(run) if "sagemaker:CreateTrainingJob" in st["Action"])
    assert stage_policy["Resource"] == [f"arn:aws:sagemaker:eu-west-1:{h.ACCOUNT}:training-job/{run.exports['jobNamePrefix']}*"]
    pass_role = next(st for name, st in _statements(run) if st["Action"] == ["iam:PassRole"])
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"


def test_buckets_encrypted_versioned_private(dev):
    buckets = {b.outputs["bucket"] for b in dev.of_type("aws:s3/bucket:Bucket")}
    versioning = {r.inputs["bucket"]: r.inputs for r in dev.of_type("aws:s3/bucketVersioning:BucketVersioning")}
    sse = {r.inputs["bucket"]: r.inputs for r in dev.of_type(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")}
    blocks = {r.inputs["bucket"]: r.inputs for r in dev.of_type(
        "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")}
    ids = {f"{b.name}-id" for b in dev.of_type("aws:s3/bucket:Bucket")}
    assert len(buckets) == 2 and set(versioning) == set(sse) == set(blocks) == ids
    for bucket_id in ids:
        assert versioning[bucket_id]["versioningConfiguration"]["status"] == "Enabled"
        rule = sse[bucket_id]["rules"][0]["applyServerSideEncryptionByDefault"]
        assert rule["sseAlgorithm"] in ("AES256", "aws:kms")
        assert all(blocks[bucket_id][k] for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                                   "restrictPublicBuckets"))


def _walk_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_strings(v)


def test_secrets_stay_secret(h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true", "mmp:sshPublicKey": "ssh-ed25519 AAAA test",
                            "mmp:sshPrivateKey": SSH_KEY})
    versions = run.of_type("aws:secretsmanager/secretVersion:SecretVersion")
    assert len(versions) == 4
    for version in versions:
        assert "secretString" in version.secret_inputs, version.name
    assert "webhookSecret" in run.secret_exports
    values = [h.DEV_CONFIG[k] for k in ("mmp:githubToken", "mmp:webhookSecret", "mmp:mlflowAdminPassword")] + [SSH_KEY]
    for name, value in run.exports.items():
        if name not in run.secret_exports:
            assert not any(secret in text for text in _walk_strings(value) for secret in values), name
    for res in run.resources:
        public = {k: v for k, v in res.inputs.items() if k not in res.secret_inputs}
        leaked = [s for s in values if any(s in text for text in _walk_strings(public))]
        assert not leaked, f"{res.typ} {res.name} carries a secret in clear"
    task = run.one("aws:ecs/taskDefinition:TaskDefinition", "mlflow")
    container = json.loads(task.inputs["containerDefinitions"])[0]
    assert {s["name"] for s in container["secrets"]} == {"DB_PASSWORD", "MLFLOW_ADMIN_PASSWORD"}
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in container["environment"]
    assert run.one("aws:rds/instance:Instance").inputs["manageMasterUserPassword"] is True


def _opens(rule: dict, port: int) -> bool:
    cidrs = rule.get("cidrBlocks", []) + rule.get("ipv6CidrBlocks", [])
    if not any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs):
        return False
    if rule["protocol"] in ("-1", "all"):
        return True
    return rule["fromPort"] <= port <= rule["toPort"]


@pytest.mark.parametrize("which", ["dev", "prod"])
def test_security_groups_closed_on_ssh_and_database(which, request):
    run = request.getfixturevalue(which)
    groups = run.of_type("aws:ec2/securityGroup:SecurityGroup")
    assert len(groups) == 6  # ... and the runner task's (egress only)
    for group in groups:
        for rule in group.inputs.get("ingress", []):
            assert not _opens(rule, 22) and not _opens(rule, 5432), (group.name, rule)
    assert not run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")  # no dlami: no SSH at all
    db = run.one("aws:ec2/securityGroup:SecurityGroup", "database")
    assert [r["fromPort"] for r in db.inputs["ingress"]] == [5432]
    assert db.inputs["ingress"][0]["securityGroups"] == ["network-mlflow-task-id"]  # MLflow's tasks only
    assert "cidrBlocks" not in db.inputs["ingress"][0]


def test_prod_differs_where_it_should(dev, prod):
    dev_db, prod_db = dev.one("aws:rds/instance:Instance").inputs, prod.one("aws:rds/instance:Instance").inputs
    assert prod_db["multiAz"] is True and prod_db["deletionProtection"] is True
    assert prod_db["skipFinalSnapshot"] is False and prod_db["finalSnapshotIdentifier"]
    assert dev_db["deletionProtection"] is False and dev_db["skipFinalSnapshot"] is True
    assert prod.one("aws:lb/listener:Listener").inputs["protocol"] == "HTTPS"
    assert prod.exports["mlflowUrl"].startswith("https://")
    assert all(b.inputs["forceDestroy"] is False for b in prod.of_type("aws:s3/bucket:Bucket"))
    training = prod.one("aws:ec2/securityGroup:SecurityGroup", "training")
    assert any(r.get("cidrBlocks") == ["203.0.113.0/24"] and r["fromPort"] == 22 for r in training.inputs["ingress"])
    catalogue = json.loads(prod.exports["datasetsCatalogue"])
    assert catalogue["cifar"] == {"s3": "s3://shared-data/cifar/"}
    assert prod.exports["jobNamePrefix"] == "mmp-acme-ml-prod"


def test_codebuild_concurrency_is_the_accounts_unless_set(dev, h):
    """Issue 19 defect 7: a hard-coded project limit of 4 failed `pulumi up` on accounts whose CodeBuild
    quota is lower. Unset by default (builds queue); `mmp:buildConcurrencyLimit` sets it."""
    assert all(p.inputs.get("concurrentBuildLimit") is None for p in dev.of_type("aws:codebuild/project:Project"))
    limited = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:buildConcurrencyLimit": "2"})
    assert {p.name: p.inputs.get("concurrentBuildLimit") for p in limited.of_type("aws:codebuild/project:Project")} == \
        {"pipeline-build": 2, "pipeline-runner-build": None, "mlflow-server-build": None}  # built once per version
    with pytest.raises(Exception, match="mmp:buildConcurrencyLimit"):
        h.run_stack("dev", {**h.DEV_CONFIG, "mmp:buildConcurrencyLimit": "0"})


def test_fsx_flag_adds_exactly_the_file_system(dev, fsx):
    added = {t: n - dev.types().get(t, 0) for t, n in fsx.types().items() if n != dev.types().get(t, 0)}
    assert added == {t: 1 for t in FSX_TYPES}
    lustre = fsx.one("aws:fsx/lustreFileSystem:LustreFileSystem").inputs
    assert lustre["deploymentType"] == "PERSISTENT_2" and lustre["storageCapacity"] == 1200
    dra = fsx.one("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation").inputs
    assert dra["fileSystemPath"] == "/datasets"
    assert dra["dataRepositoryPath"] == f"s3://{fsx.exports['datasetsBucket']}/datasets/"
    assert fsx.exports["fsxMountName"] == "abcdefgh"
    env = fsx.exports["backendEnv"]
    assert env["MMP_FSX_FILE_SYSTEM_ID"] and env["MMP_FSX_MOUNT_NAME"] == "abcdefgh" and env["MMP_SUBNET_IDS"]
    assert json.loads(env["MMP_DATASETS"])["digits"]["fsx"] == "/datasets/digits"  # inside the file system
    assert dev.exports["backendEnv"]["MMP_FSX_FILE_SYSTEM_ID"] == ""


def test_fsx_jobs_read_the_directory_the_stack_made(fsx, monkeypatch):
    """The stack's own catalogue and settings, through the backend, give SageMaker the
    DirectoryPath it documents: /<MountName>/<path inside the file system>, where the data
    repository association put the datasets (/datasets)."""
    from mmp.backends import LaunchRequest
    from mmp.backends.sagemaker import SageMakerFsxBackend
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    for key, value in fsx.exports["backendEnv"].items():
        monkeypatch.setenv(key, value)
    entry = json.loads(fsx.exports["backendEnv"]["MMP_DATASETS"])["fashion"]
    experiment = parse_experiment({"Platform": "sagemaker-fsx", "Dataset_Name": "fashion",
                                   "Training_Instance": "ml.g5.xlarge", "Instance_Count": "1"})
    request = LaunchRequest(experiment=experiment, experiment_name="e", run_id="r1", repository="a/b", clone_url="",
                            commit="c" * 40, mlflow_env={}, dataset=Dataset(name="fashion", **entry))
    channel = SageMakerFsxBackend().training_job_request(request)["InputDataConfig"][0]
    dra = fsx.one("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation").inputs
    source = channel["DataSource"]["FileSystemDataSource"]
    assert source["DirectoryPath"] == f"/{fsx.exports['fsxMountName']}{dra['fileSystemPath']}/fashion"
    assert source["DirectoryPath"] == "/abcdefgh/datasets/fashion"


def test_every_fsx_path_in_the_catalogue_lies_in_a_data_repository_association(h):
    """A dataset in another bucket is linked at /shared/<name> by an import-only association
    of its own: /datasets/<name> would stay empty, the /datasets association holding only
    the stack's own datasets/ prefix. The DLAMI path follows the catalogue."""
    from mmp.backends import LaunchRequest
    from mmp.backends.dlami import DlamiBackend, DlamiConfig
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:datasets": json.dumps(
        {"cifar": {"s3": "s3://shared-data/cifar"}, "mine": {"s3": "s3://shared-data/x/", "fsx": "/already/x"}})})
    catalogue = json.loads(run.exports["backendEnv"]["MMP_DATASETS"])
    links = {d.inputs["fileSystemPath"]: d.inputs
             for d in run.of_type("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation")}
    assert set(links) == {"/datasets", "/shared/cifar"}
    assert catalogue["cifar"] == {"s3": "s3://shared-data/cifar", "fsx": "/shared/cifar"}
    assert catalogue["digits"]["fsx"] == "/datasets/digits" and catalogue["mine"]["fsx"] == "/already/x"
    shared = links["/shared/cifar"]
    assert shared["dataRepositoryPath"] == "s3://shared-data/cifar/"
    assert "autoExportPolicy" not in shared["s3"]  # nothing is written back into another team's bucket
    for name, entry in catalogue.items():
        if name == "mine":  # configured with its own path: the owner keeps it filled
            continue
        link = next(p for p in links if (entry["fsx"] + "/").startswith(p + "/"))
        filled_from = links[link]["dataRepositoryPath"] + entry["fsx"][len(link) + 1:]
        assert entry["s3"].rstrip("/") == filled_from.rstrip("/"), name  # FSx shows exactly the S3 the entry names
    experiment = parse_experiment({"Platform": "dlami", "Dataset_Name": "cifar", "Training_Instance": "p3.2xlarge",
                                   "Instance_Count": "1"})
    request = LaunchRequest(experiment=experiment, experiment_name="e", run_id="r1", repository="a/b", clone_url="",
                            commit="c" * 40, mlflow_env={}, dataset=Dataset(name="cifar", **catalogue["cifar"]))
    assert DlamiBackend(DlamiConfig()).paths(request).dataset == "/fsx/shared/cifar"


def test_dlami_flag_adds_its_resources(fsx, h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true",
                            "mmp:sshPublicKey": "ssh-ed25519 AAAA test", "mmp:sshPrivateKey": SSH_KEY})
    added = {t: n - fsx.types().get(t, 0) for t, n in run.types().items() if n != fsx.types().get(t, 0)}
    assert added == {
        "mmp:infra:DlamiResources": 1, "aws:ec2/placementGroup:PlacementGroup": 1, "aws:iam/role:Role": 1,
        "aws:iam/rolePolicy:RolePolicy": 1, "aws:iam/instanceProfile:InstanceProfile": 1,
        "aws:ec2/keyPair:KeyPair": 1, "aws:secretsmanager/secret:Secret": 1,
        "aws:secretsmanager/secretVersion:SecretVersion": 1, "aws:ec2/launchTemplate:LaunchTemplate": 1,
        # the janitor Lambda on its schedule, and SSH from the runner task to the training hosts
        "aws:lambda/function:Function": 1, "aws:cloudwatch/logGroup:LogGroup": 1,
        "aws:cloudwatch/eventRule:EventRule": 1, "aws:cloudwatch/eventTarget:EventTarget": 1,
        "aws:lambda/permission:Permission": 1, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": 1,
    }
    assert run.one("aws:ec2/placementGroup:PlacementGroup").inputs["strategy"] == "cluster"
    template = run.one("aws:ec2/launchTemplate:LaunchTemplate").inputs
    assert template["imageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    assert template["instanceInitiatedShutdownBehavior"] == "terminate"
    assert template["metadataOptions"]["httpTokens"] == "required"
    import base64

    script = base64.b64decode(template["userData"]).decode()
    assert "shutdown -h +\"$MINUTES\"" in script and "mmp:max-runtime-minutes" in script
    # the backend's FSx step (client, mount, run area; run under bash in tests/dlami/test_user_data.py)
    assert "mmp-fsx fs-0123.fsx.eu-west-1.amazonaws.com abcdefgh /fsx ubuntu /fsx/mmp /fsx/output" in script
    assert "|| true" not in script.split("shutdown -h", 1)[1]  # a failed install or mount is not swallowed
    assert run.exports["backendEnv"]["MMP_LAUNCH_TEMPLATE_ID"] and run.exports["backendEnv"]["MMP_SSH_KEY_SECRET_ARN"]


def test_sagemaker_managed_mlflow_replaces_fargate(dev, h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:mlflowMode": "sagemaker"})
    types = run.types()
    assert types.get("aws:sagemaker/mlflowTrackingServer:MlflowTrackingServer") == 1
    for gone in ("aws:rds/instance:Instance", "aws:ecs/service:Service", "aws:lb/loadBalancer:LoadBalancer"):
        assert gone not in types
    assert run.exports["mlflowUrl"].startswith("https://")


def _runner_networks(run) -> dict[str, dict]:
    states = json.loads(run.one("aws:sfn/stateMachine:StateMachine").inputs["definition"])["States"]
    return {name: (state.get("Arguments") or state.get("Parameters"))["NetworkConfiguration"]["AwsvpcConfiguration"]
            for name, state in states.items() if state.get("Resource") == "arn:aws:states:::ecs:runTask.sync"}


def test_without_a_nat_the_runner_task_leaves_through_a_public_ip(dev, h):
    """natGateway: false leaves the private subnets no route out: the runner (studies, promote.json,
    as MLflow's own task already did) takes the public subnets, whose route is the internet gateway,
    and a public IP. Behind a NAT it stays private."""
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:natGateway": "false"})
    assert not run.of_type("aws:ec2/natGateway:NatGateway")
    public = {f"{r.name}-id" for r in run.of_type("aws:ec2/subnet:Subnet") if "-public-" in r.name}  # mock ids
    assert len(public) == 2 and not public & set(run.exports["privateSubnetIds"])
    networks = _runner_networks(run)
    assert set(networks) == {"Promote", "RunTraining", "RunStudy"}
    for network in networks.values():
        assert network["AssignPublicIp"] == "ENABLED" and set(network["Subnets"]) == public
    public_routes = [r for t in run.of_type("aws:ec2/routeTable:RouteTable") for r in t.inputs.get("routes", [])
                     if r.get("gatewayId")]
    assert public_routes and all(r["cidrBlock"] == "0.0.0.0/0" for r in public_routes)
    service = run.one("aws:ecs/service:Service").inputs["networkConfiguration"]
    assert service["assignPublicIp"] is True and set(service["subnets"]) == public
    for network in _runner_networks(dev).values():
        assert network["AssignPublicIp"] == "DISABLED" and set(network["Subnets"]) == set(dev.exports["privateSubnetIds"])


def test_reused_vpc_creates_no_network(h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:vpcId": "vpc-0abc", "mmp:privateSubnetIds": '["subnet-a","subnet-b"]',
                            "mmp:publicSubnetIds": '["subnet-c","subnet-d"]'})
    assert not run.of_type("aws:ec2/vpc:Vpc") and not run.of_type("aws:ec2/natGateway:NatGateway")
    assert run.exports["privateSubnetIds"] == ["subnet-a", "subnet-b"]
    assert all(g.inputs["vpcId"] == "vpc-0abc" for g in run.of_type("aws:ec2/securityGroup:SecurityGroup"))


@pytest.mark.parametrize("extra, message", [
    ({"mmp:deploymentName": "Acme_ML"}, "mmp:deploymentName"),
    ({"mmp:sshCidrs": '["0.0.0.0/0"]'}, "whole internet"),
    ({"mmp:notifyEmail": "not-an-address"}, "e-mail"),
    ({"mmp:fsx": "true", "mmp:fsxStorageGb": "1000"}, "fsxStorageGb"),
    ({"mmp:fsx": "true", "mmp:fsxStorageGb": "3600"}, "fsxStorageGb: PERSISTENT_2 SSD takes 1200, 2400 or a multiple of 2400"),
    ({"mmp:sagemakerInputMode": "Pipe"}, "mmp:sagemakerInputMode: Value error, 'Pipe' is not run by the sagemaker backend; use File or FastFile"),
    ({"mmp:fsx": "true", "mmp:natGateway": "false"}, "natGateway: false with fsx true"),
    ({"mmp:mlflowCertificateArn": "arn:aws:acm:eu-west-1:123456789012:certificate/x"}, "mlflowCertificateArn: needs mlflowDomainName"),
    ({"mmp:mlflowDomainName": "mlflow.acme.example"}, "mlflowDomainName: only with mlflowCertificateArn"),
    ({"mmp:mlflowAllowedCidrs": '["198.51.100.0/24"]', "mmp:natGateway": "false"}, "natGateway: false with a narrowed mlflowAllowedCidrs"),
    ({"mmp:mlflowAllowedCidrs": '["198.51.100.0/24"]', "mmp:vpcId": "vpc-0abc", "mmp:privateSubnetIds": '["subnet-a"]',
      "mmp:publicSubnetIds": '["subnet-c"]'}, "egressCidrs: required with vpcId"),
    ({"mmp:dlami": "true"}, "dlami"),
    ({"mmp:sagemakerInputMode": "Stream"}, "mmp:sagemakerInputMode"),
    ({"mmp:mlflowPort": "5000"}, "unknown config key(s) mmp:mlflowPort"),
    ({"mmp:mlflowCpu": "1000"}, "mlflowCpu: Fargate takes 256, 512, 1024, 2048, 4096, 8192, 16384 CPU units, got 1000"),
    ({"mmp:mlflowCpu": "256", "mmp:mlflowMemory": "4096"},
     "mlflowMemory: with mlflowCpu 256, Fargate takes 512, 1024 or 2048 MiB, got 4096"),
    ({"mmp:mlflowCpu": "1024", "mmp:mlflowMemory": "1536"},
     "mlflowMemory: with mlflowCpu 1024, Fargate takes 2048 to 8192 in steps of 1024 MiB, got 1536"),
    ({"mmp:mlflowCpu": "512", "mmp:mlflowMemory": "5120"},
     "mlflowMemory: with mlflowCpu 512, Fargate takes 1024, 2048, 3072 or 4096 MiB, got 5120"),
    ({"mmp:mlflowCpu": "8192", "mmp:mlflowMemory": "18432"},
     "mlflowMemory: with mlflowCpu 8192, Fargate takes 16384 to 61440 in steps of 4096 MiB, got 18432"),
    ({"mmp:fsx": "true", "mmp:datasets": json.dumps({f"d{i}": {"s3": f"s3://other/d{i}/"} for i in range(8)})},
     "datasets: with fsx true each dataset in another bucket is linked into FSx by its own data repository "
     "association, and a file system takes 8 (one is the stack's own datasets/ prefix): at most 7 such datasets, got 8"),
    ({"mmp:fsx": "true", "mmp:datasets": json.dumps({"all": {"s3": "s3://other/img"}, "part": {"s3": "s3://other/img/a/"}})},
     "datasets.all.s3 and datasets.part.s3: FSx links an S3 prefix once and never one inside another"),
])
def test_bad_config_fails_naming_the_key(extra, message, h):
    with pytest.raises(Exception) as info:
        h.run_stack("dev", {**h.DEV_CONFIG, **extra})
    assert message in str(info.value)


def test_fargate_sizes_are_the_documented_table():
    """ECS Developer Guide, "Troubleshoot Amazon ECS task definition invalid CPU or memory errors"
    (Linux): every listed pair passes, every other 256-MiB step fails; the runner task's size fits."""
    from mmp.infra import runner
    from mmp.infra.settings import fargate_size_problems

    gib = 1024
    table = {256: [512, gib, 2 * gib], 512: [gib, 2 * gib, 3 * gib, 4 * gib], 1024: [n * gib for n in range(2, 9)],
             2048: [n * gib for n in range(4, 17)], 4096: [n * gib for n in range(8, 31)],
             8192: [n * gib for n in range(16, 61, 4)], 16384: [n * gib for n in range(32, 121, 8)]}
    for cpu, memories in table.items():
        for memory in range(256, 126 * gib, 256):
            assert (not fargate_size_problems(cpu, memory, cpu_key="c", memory_key="m")) == (memory in memories)
    assert fargate_size_problems(int(runner.CPU), int(runner.MEMORY), cpu_key="CPU", memory_key="MEMORY") == []


def test_secrets_are_required(h):
    config = {k: v for k, v in h.DEV_CONFIG.items() if k != "mmp:githubToken"}
    with pytest.raises(SettingsError, match="githubToken: required"):
        parse_settings("dev", {"deploymentName": "acme"}, secret_keys=("webhookSecret", "mlflowAdminPassword"))
    with pytest.raises(Exception, match="githubToken"):
        h.run_stack("dev", config)


def test_example_config_documents_every_key(h):
    text = (h.ROOT / "Pulumi.dev.yaml.example").read_text()
    documented = set(re.findall(r"^\s*#?\s*mmp:([A-Za-z]+):", text, re.M))
    assert set(KEYS) | set(SECRET_KEYS) <= documented, sorted(set(KEYS) | set(SECRET_KEYS) - documented)
    assert "aws:region:" in text
