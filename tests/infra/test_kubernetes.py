"""`mmp:kubernetes`: the EKS cluster, its add-ons, nodes, Trainer and the runner's way in, under mocks.

The program runs whole (tests/infra/conftest.py) with FSx on and kubernetes on and off. The
IAM documents go through parliament and AWS's own action table (parliament's copy of the
Service Authorization Reference) for `*` resources; every Kubernetes object the program
renders is checked as the API server checks names and labels (tests/kubernetes/crd.py, the
same checks the backend's objects pass) and field by field against pulumi_kubernetes' typed
arguments (generated from the Kubernetes OpenAPI schema); the Helm release of Trainer is the
version the backend's objects are validated at.
"""

from __future__ import annotations

import base64
import inspect
import json
import re

import pulumi_kubernetes as k8s
import pytest
import yaml

from mmp.backends.kubernetes import TRAINER_VERSION
from mmp.infra import kubernetes as infra_k8s
from mmp.infra.settings import SettingsError, parse_settings

from ..kubernetes.crd import DNS_LABEL, crd_tag, metadata_problems
from .iam_lint import parliament

K8S_TYPES_PREFIX = "kubernetes:"
EKS_TYPES = ("aws:eks/",)
REGION = "eu-west-1"


@pytest.fixture(scope="module")
def fsx_only(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true"})


@pytest.fixture(scope="module")
def k8s_stack(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:kubernetes": "true",
                               "mmp:kubernetesGpuInstanceTypes": json.dumps(["g5.xlarge", "p4d.24xlarge"])})


def _policies(run) -> dict[str, dict]:
    # The mocks give every ARN a region; IAM's have none (arn:aws:iam::ACCOUNT:role/NAME).
    return {p.name: json.loads(p.inputs["policy"].replace(f"arn:aws:iam:{REGION}:", "arn:aws:iam::"))
            for p in run.of_type("aws:iam/rolePolicy:RolePolicy")}


def _container_env(run, task: str) -> dict[str, str]:
    definition = json.loads(run.one("aws:ecs/taskDefinition:TaskDefinition", task).inputs["containerDefinitions"])[0]
    return {e["name"]: e["value"] for e in definition["environment"]}


def _k8s_objects(run) -> list:
    return [r for r in run.resources if r.typ.startswith(K8S_TYPES_PREFIX) and "helm.sh" not in r.typ]


# -- off: nothing of it -----------------------------------------------------------------------
def test_off_by_default_nothing_of_it_exists(dev, fsx_only):
    for run in (dev, fsx_only):
        assert not [r.typ for r in run.resources if r.typ.startswith((K8S_TYPES_PREFIX, "pulumi:providers:kubernetes",
                                                                      *EKS_TYPES))]
        assert "mmp:infra:KubernetesCluster" not in run.components.values()
        env = _container_env(run, "pipeline-runner")
        assert not [k for k in env if k.startswith("MMP_K8S_")]
        assert "kubernetes" not in env["MMP_PIPELINE_PLATFORMS"].split(",")
        assert not [k for k in run.exports["backendEnv"] if k.startswith("MMP_K8S_")]
        assert run.exports["kubernetesClusterName"] == ""


def test_on_adds_exactly_the_cluster_and_its_parts(fsx_only, k8s_stack):
    before, after = fsx_only.types(), k8s_stack.types()
    added = {t: n - before.get(t, 0) for t, n in after.items() if n != before.get(t, 0)}
    assert added == {
        "mmp:infra:KubernetesCluster": 1, "aws:eks/cluster:Cluster": 1, "aws:cloudwatch/logGroup:LogGroup": 1,
        # cluster, nodes, the FSx CSI driver, the autoscaler, the training pods
        "aws:iam/role:Role": 5, "aws:iam/rolePolicy:RolePolicy": 3,
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment": 4,
        "aws:ec2/securityGroup:SecurityGroup": 1, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": 1,
        "aws:eks/nodeGroup:NodeGroup": 3, "aws:ec2/launchTemplate:LaunchTemplate": 1,
        "aws:eks/addon:Addon": 2, "aws:eks/podIdentityAssociation:PodIdentityAssociation": 2,
        "aws:eks/accessEntry:AccessEntry": 1, "pulumi:providers:kubernetes": 1,
        "kubernetes:helm.sh/v3:Release": 3, "kubernetes:core/v1:Namespace": 1,
        "kubernetes:core/v1:ServiceAccount": 1, "kubernetes:rbac.authorization.k8s.io/v1:Role": 1,
        "kubernetes:rbac.authorization.k8s.io/v1:RoleBinding": 1, "kubernetes:core/v1:PersistentVolume": 1,
        "kubernetes:core/v1:PersistentVolumeClaim": 1,
    }
    component = next(u for u, t in k8s_stack.components.items() if t == "mmp:infra:KubernetesCluster")
    assert k8s_stack.registered_outputs[component] >= {"clusterName", "endpoint", "namespace", "fsxClaim"}
    stack_urn = next(u for u in k8s_stack.registered_outputs if u.endswith("Stack::mmp-dev"))
    assert not [r.name for r in k8s_stack.resources if not r.typ.startswith("mmp:") and r.parent == stack_urn]


# -- the cluster and its network -----------------------------------------------------------------
def test_cluster_is_private_api_authenticated_and_on_standard_support(k8s_stack):
    cluster = k8s_stack.one("aws:eks/cluster:Cluster").inputs
    assert cluster["accessConfig"]["authenticationMode"] == "API"
    assert cluster["upgradePolicy"] == {"supportType": "STANDARD"}  # the API's default is EXTENDED
    vpc = cluster["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True and vpc["endpointPublicAccess"] is False
    assert "publicAccessCidrs" not in vpc
    logs = k8s_stack.one("aws:cloudwatch/logGroup:LogGroup", "kubernetes-logs")
    assert logs.inputs["name"] == f"/aws/eks/{cluster['name']}/cluster"  # the group EKS writes to, with retention
    assert logs.inputs["retentionInDays"] == 30 and logs.urn in k8s_stack.one("aws:eks/cluster:Cluster").dependencies
    assert cluster["enabledClusterLogTypes"] == ["audit", "authenticator"]
    assert sorted(vpc["subnetIds"]) == sorted(k8s_stack.exports["privateSubnetIds"])
    api = k8s_stack.one("aws:ec2/securityGroup:SecurityGroup", "kubernetes-api")
    assert vpc["securityGroupIds"] == [f"{api.name}-id"]
    assert not api.inputs.get("ingress")  # only the runner's rule, a resource of its own
    (rule,) = k8s_stack.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    runner_sg = k8s_stack.one("aws:ec2/securityGroup:SecurityGroup", "pipeline-runner")
    assert rule.inputs["securityGroupId"] == f"{api.name}-id"
    assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 443, 443)
    assert rule.inputs["referencedSecurityGroupId"] == f"{runner_sg.name}-id" and "cidrIpv4" not in rule.inputs
    # The runner reaches the private endpoint from inside the VPC, not from a public subnet.
    states = json.loads(k8s_stack.one("aws:sfn/stateMachine:StateMachine").inputs["definition"])["States"]
    network = states["RunTraining"]["Arguments"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "DISABLED"
    assert set(network["Subnets"]) == set(k8s_stack.exports["privateSubnetIds"])


def test_named_networks_may_reach_the_endpoint_but_never_the_internet(h):
    run = h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:kubernetes": "true",
                              "mmp:kubernetesApiCidrs": '["203.0.113.0/24"]'})
    vpc = run.one("aws:eks/cluster:Cluster").inputs["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True and vpc["endpointPublicAccess"] is True
    assert vpc["publicAccessCidrs"] == ["203.0.113.0/24"]


def test_gpu_nodes_rest_at_zero_in_the_zone_of_fsx(k8s_stack):
    subnets = {f"{s.name}-id": s.inputs for s in k8s_stack.of_type("aws:ec2/subnet:Subnet")}
    fsx_subnet = k8s_stack.one("aws:fsx/lustreFileSystem:LustreFileSystem").inputs["subnetIds"]
    groups = {g.inputs["nodeGroupName"]: g.inputs for g in k8s_stack.of_type("aws:eks/nodeGroup:NodeGroup")}
    gpu = {n: g for n, g in groups.items() if "-gpu-" in n}
    assert sorted(gpu) == ["acme-ml-dev-gpu-g5-xlarge", "acme-ml-dev-gpu-p4d-24xlarge"]
    template = k8s_stack.one("aws:ec2/launchTemplate:LaunchTemplate", "kubernetes-gpu")
    for name, group in gpu.items():
        assert group["scalingConfig"]["minSize"] == 0 and group["scalingConfig"]["desiredSize"] == 0, name
        assert group["scalingConfig"]["maxSize"] == 4
        assert group["subnetIds"] == [fsx_subnet], name
        assert subnets[group["subnetIds"][0]]["availabilityZone"] == subnets[fsx_subnet]["availabilityZone"]
        assert group["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
        assert group["amiType"] == "AL2023_x86_64_NVIDIA" and len(group["instanceTypes"]) == 1
        # NVIDIA's device plugin DaemonSet only runs where its chart's nodeAffinity matches (no NFD here).
        assert group["labels"]["nvidia.com/gpu.present"] == "true"
        assert group["launchTemplate"]["id"] == f"{template.name}-id"
    (system,) = [g for n, g in groups.items() if n.endswith("-system")]
    assert system["scalingConfig"]["minSize"] == 1 and system["instanceTypes"] == ["t3.medium"]
    assert "taints" not in system
    # GPU hosts: the cluster's group and the training group (FSx admits Lustre from it), one IMDS hop.
    t = template.inputs
    assert sorted(t["vpcSecurityGroupIds"]) == sorted(["sg-0eks0cluster", "network-training-id"])
    fsx_sg = k8s_stack.one("aws:ec2/securityGroup:SecurityGroup", "network-fsx")
    assert {(r["fromPort"], r["toPort"]) for r in fsx_sg.inputs["ingress"]
            if "network-training-id" in r.get("securityGroups", [])} == {(988, 988), (1018, 1023)}
    assert t["metadataOptions"]["httpTokens"] == "required" and t["metadataOptions"]["httpPutResponseHopLimit"] == 1
    assert t["blockDeviceMappings"][0]["ebs"]["encrypted"] == "true"


# -- the runner's way in ----------------------------------------------------------------------
def test_runner_task_gets_the_backends_environment_and_the_lambdas_do_not_carry_the_ca(k8s_stack):
    env = _container_env(k8s_stack, "pipeline-runner")
    assert {k for k in env if k.startswith("MMP_K8S_")} == set(infra_k8s.ENVIRONMENT_NAMES)
    assert env["MMP_K8S_API_URL"].startswith("https://") and env["MMP_K8S_API_URL"].endswith(".eks.amazonaws.com")
    assert base64.b64decode(env["MMP_K8S_CA_DATA"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert env["MMP_K8S_CLUSTER_NAME"] == k8s_stack.exports["kubernetesClusterName"] == "acme-ml-dev-training"
    assert (env["MMP_K8S_NAMESPACE"], env["MMP_K8S_SERVICE_ACCOUNT"], env["MMP_K8S_FSX_CLAIM"]) == \
        ("mmp-training", "mmp-training", "mmp-fsx")
    assert env["MMP_K8S_IMAGE_REPOSITORY"] == k8s_stack.exports["ecrRepositoryUri"]
    # Training pods land on the GPU groups and tolerate exactly their taint, as the backend reads them.
    from mmp.backends.kubernetes.settings import KubernetesSettings

    read = KubernetesSettings.from_env(env)
    groups = [g.inputs for g in k8s_stack.of_type("aws:eks/nodeGroup:NodeGroup") if "-gpu-" in g.inputs["nodeGroupName"]]
    for group in groups:
        assert read.node_selector.items() <= group["labels"].items()
        for taint in group["taints"]:
            assert any(t["key"] == taint["key"] and t["operator"] == "Exists"
                       and t["effect"] == {"NO_SCHEDULE": "NoSchedule"}[taint["effect"]] for t in read.tolerations)
    system = next(g.inputs for g in k8s_stack.of_type("aws:eks/nodeGroup:NodeGroup") if "-system" in g.inputs["nodeGroupName"])
    assert not read.node_selector.items() <= system["labels"].items()  # never on the always-on node
    assert (read.api_url, read.cluster_name, read.namespace, read.fsx_claim) == (
        env["MMP_K8S_API_URL"], "acme-ml-dev-training", "mmp-training", "mmp-fsx")
    assert "kubernetes" in env["MMP_PIPELINE_PLATFORMS"].split(",")
    for fn in k8s_stack.of_type("aws:lambda/function:Function"):
        variables = fn.inputs["environment"]["variables"]
        if fn.name.startswith("pipeline-"):  # Prepare checks an experiment against the settings: all but the CA
            assert {k: v for k, v in variables.items() if k.startswith("MMP_K8S_")} == \
                {k: v for k, v in env.items() if k.startswith("MMP_K8S_") and k != "MMP_K8S_CA_DATA"}, fn.name
        else:
            assert not [k for k in variables if k.startswith("MMP_K8S_")], fn.name
        assert sum(len(k) + len(v) for k, v in variables.items()) < 4096, fn.name  # Lambda's limit
    assert {k: v for k, v in k8s_stack.exports["backendEnv"].items() if k.startswith("MMP_K8S_")} == \
        {k: v for k, v in env.items() if k.startswith("MMP_K8S_")}


def test_runner_is_admitted_to_one_namespace_and_nothing_cluster_wide(k8s_stack):
    (entry,) = k8s_stack.of_type("aws:eks/accessEntry:AccessEntry")
    runner_role = k8s_stack.one("aws:iam/role:Role", "pipeline-runner-task")
    assert entry.inputs["principalArn"] == runner_role.outputs["arn"]
    assert entry.inputs["kubernetesGroups"] == [infra_k8s.RUNNER_GROUP] and entry.inputs["type"] == "STANDARD"
    types = k8s_stack.types()
    assert "aws:eks/accessPolicyAssociation:AccessPolicyAssociation" not in types  # no EKS-wide access policy
    assert not [t for t in types if "ClusterRole" in t]
    role = k8s_stack.one("kubernetes:rbac.authorization.k8s.io/v1:Role").inputs
    assert role["metadata"]["namespace"] == "mmp-training"
    # exactly what the backend calls (tests/kubernetes's fake API server refuses anything else with 403)
    assert role["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainingruntimes"], "verbs": ["create", "get"]},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
    binding = k8s_stack.one("kubernetes:rbac.authorization.k8s.io/v1:RoleBinding").inputs
    assert binding["metadata"]["namespace"] == "mmp-training"
    assert binding["subjects"] == [{"kind": "Group", "name": infra_k8s.RUNNER_GROUP,
                                    "apiGroup": "rbac.authorization.k8s.io"}]
    assert binding["roleRef"] == {"kind": "Role", "name": role["metadata"]["name"],
                                  "apiGroup": "rbac.authorization.k8s.io"}
    assert not infra_k8s.RUNNER_GROUP.startswith("system:")  # EKS refuses system: groups in access entries


# -- IAM ----------------------------------------------------------------------------------------
K8S_ROLES = ("kubernetes-fsx-csi", "kubernetes-autoscaler", "kubernetes-training")


def test_parliament_finds_nothing_in_the_clusters_roles_and_the_runners(k8s_stack):
    linter = parliament()
    policies = _policies(k8s_stack)
    for name in (*K8S_ROLES, "pipeline-runner-task", "pipeline-sfn"):
        findings = linter.analyze_policy_string(json.dumps(policies[name])).findings
        assert not findings, (name, [(f.issue, f.detail) for f in findings])


def test_a_star_resource_only_where_the_action_has_no_resource_level_form(k8s_stack):
    """AWS's action table (parliament's copy of the Service Authorization Reference): an action that
    names a resource type must be granted on that resource's ARN, never on `*`."""
    linter = parliament()
    policies = _policies(k8s_stack)
    for name in (*K8S_ROLES, "pipeline-runner-task"):
        for st in policies[name]["Statement"]:
            if "*" not in st["Resource"]:
                continue
            for action in st["Action"]:
                service, _, verb = action.partition(":")
                (definition,) = [d for d in linter.iam_definition if d["prefix"] == service]
                (privilege,) = [p for p in definition["privileges"] if p["privilege"] == verb]
                typed = [r["resource_type"] for r in privilege["resource_types"] if r["resource_type"]]
                assert not typed, (name, action, f"has a resource-level form ({typed}); name the ARN")


def test_each_role_grants_what_its_pods_call_and_no_more(k8s_stack, h):
    policies = _policies(k8s_stack)
    assert policies["kubernetes-fsx-csi"]["Statement"] == [  # static volumes: create, resize, delete nothing
        {"Effect": "Allow", "Action": ["fsx:DescribeFileSystems"], "Resource": ["*"]}]
    scaling = [s for s in policies["kubernetes-autoscaler"]["Statement"] if "autoscaling:SetDesiredCapacity" in s["Action"]]
    (scaling,) = scaling
    assert scaling["Resource"] == [f"arn:aws:autoscaling:{REGION}:{h.ACCOUNT}:autoScalingGroup:*:"
                                   "autoScalingGroupName/eks-acme-ml-dev-gpu-*"]
    assert scaling["Condition"] == {"StringEquals": {
        "aws:ResourceTag/k8s.io/cluster-autoscaler/acme-ml-dev-training": "owned"}}
    training = policies["kubernetes-training"]["Statement"]
    deny = [s for s in training if s["Effect"] == "Deny"]
    assert deny and all(r.endswith("/pipeline-runs/*") for s in deny for r in s["Resource"])  # never the run record
    assert not [a for s in training for a in s["Action"] if a.startswith(("ecr:", "eks:", "iam:"))]
    # The runner's token is a presigned sts:GetCallerIdentity, which needs no permission, and the
    # endpoint and CA come from its environment: no eks:DescribeCluster, no eks:* at all.
    runner = policies["pipeline-runner-task"]["Statement"]
    assert not [a for s in runner for a in s["Action"] if a.startswith(("eks:", "sts:"))]


def test_trust_and_managed_policies(k8s_stack):
    roles = {r.name: r.inputs for r in k8s_stack.of_type("aws:iam/role:Role")}
    for name in K8S_ROLES:
        (st,) = json.loads(roles[name]["assumeRolePolicy"])["Statement"]
        assert st["Principal"] == {"Service": "pods.eks.amazonaws.com"}
        assert st["Action"] == ["sts:AssumeRole", "sts:TagSession"]
    owners: dict[str, set[str]] = {}
    for a in k8s_stack.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment"):
        owners.setdefault(a.name.split("-Amazon")[0], set()).add(a.inputs["policyArn"])
    assert owners == {"kubernetes-cluster": set(infra_k8s.CLUSTER_POLICIES),
                      "kubernetes-node": set(infra_k8s.NODE_POLICIES)}
    assert json.loads(roles["kubernetes-cluster"]["assumeRolePolicy"])["Statement"][0]["Principal"] == \
        {"Service": "eks.amazonaws.com"}
    assert json.loads(roles["kubernetes-node"]["assumeRolePolicy"])["Statement"][0]["Principal"] == \
        {"Service": "ec2.amazonaws.com"}


def test_add_ons_and_pod_identities(k8s_stack):
    addons = {a.inputs["addonName"]: a for a in k8s_stack.of_type("aws:eks/addon:Addon")}
    assert set(addons) == set(infra_k8s.ADDONS)
    fsx_csi_role = k8s_stack.one("aws:iam/role:Role", "kubernetes-fsx-csi")
    assert addons["aws-fsx-csi-driver"].inputs["podIdentityAssociations"] == [
        {"roleArn": fsx_csi_role.outputs["arn"], "serviceAccount": "fsx-csi-controller-sa"}]
    # The driver authenticates through the agent: the agent's add-on comes first.
    assert addons["eks-pod-identity-agent"].urn in addons["aws-fsx-csi-driver"].dependencies
    associations = {(a.inputs["namespace"], a.inputs["serviceAccount"]): a.inputs["roleArn"]
                    for a in k8s_stack.of_type("aws:eks/podIdentityAssociation:PodIdentityAssociation")}
    assert associations == {
        ("kube-system", "cluster-autoscaler"): k8s_stack.one("aws:iam/role:Role", "kubernetes-autoscaler").outputs["arn"],
        ("mmp-training", "mmp-training"): k8s_stack.one("aws:iam/role:Role", "kubernetes-training").outputs["arn"],
    }


# -- Helm --------------------------------------------------------------------------------------
def test_trainer_release_is_the_version_the_backends_objects_are_checked_at(k8s_stack):
    """One pin: the chart the program installs, TRAINER_VERSION, and the tag of the vendored CRDs
    (tests/fixtures/README.md) the backend's TrainJobs and TrainingRuntimes are validated against."""
    releases = {r.inputs["name"]: r.inputs for r in k8s_stack.of_type("kubernetes:helm.sh/v3:Release")}
    trainer = releases["kubeflow-trainer"]
    assert trainer["chart"] == "oci://ghcr.io/kubeflow/charts/kubeflow-trainer"
    assert trainer["version"] == TRAINER_VERSION == crd_tag()
    assert trainer["namespace"] == "kubeflow-system" and trainer["createNamespace"] is True
    for name, release in releases.items():  # every chart pinned to one release
        assert re.fullmatch(r"\d+\.\d+\.\d+", release["version"]), name
        assert release["chart"].startswith("oci://") or release["repositoryOpts"]["repo"].startswith("https://"), name
    autoscaler = releases["cluster-autoscaler"]["values"]
    assert autoscaler["autoDiscovery"]["clusterName"] == k8s_stack.exports["kubernetesClusterName"]
    assert autoscaler["rbac"]["serviceAccount"]["name"] == "cluster-autoscaler"
    # The device plugin must run on the tainted GPU nodes: its chart tolerates nvidia.com/gpu by default.
    assert releases["nvidia-device-plugin"]["values"]["nodeSelector"] == {infra_k8s.POOL_LABEL: "gpu"}


def test_the_provider_connects_with_the_clusters_endpoint_ca_and_an_eks_token(k8s_stack):
    provider = k8s_stack.one("pulumi:providers:kubernetes").inputs
    config = yaml.safe_load(provider["kubeconfig"])  # kubectl's loader reads YAML (JSON is YAML)
    cluster = k8s_stack.one("aws:eks/cluster:Cluster")
    (entry,) = config["clusters"]
    assert entry["cluster"]["server"] == cluster.outputs["endpoint"]
    assert entry["cluster"]["certificate-authority-data"] == cluster.outputs["certificateAuthority"]["data"]
    (user,) = config["users"]
    exec_ = user["user"]["exec"]
    assert exec_["command"] == "aws" and exec_["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert exec_["args"][:4] == ["eks", "get-token", "--cluster-name", "acme-ml-dev-training"]
    assert config["current-context"] == config["contexts"][0]["name"]
    every = [r for r in k8s_stack.resources if r.typ.startswith(K8S_TYPES_PREFIX)]
    provider_urn = k8s_stack.one("pulumi:providers:kubernetes").urn
    assert every and all(r.parent != provider_urn for r in every)


# -- the objects the program renders -------------------------------------------------------------
def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _unknown_fields(value: dict, args_class: type, path: str) -> list[str]:
    """Fields pulumi_kubernetes' typed arguments (generated from the Kubernetes OpenAPI) do not have."""
    known = set(inspect.signature(args_class.__init__).parameters) - {"self"}
    return [f"{path}.{k}" for k in value if _snake(k) not in known]


def test_every_rendered_object_passes_the_api_servers_name_and_label_rules(k8s_stack, h):
    objects = _k8s_objects(k8s_stack)
    assert {o.typ.rsplit(":", 1)[1] for o in objects} == {"Namespace", "ServiceAccount", "Role", "RoleBinding",
                                                           "PersistentVolume", "PersistentVolumeClaim"}
    cluster_scoped = {"Namespace", "PersistentVolume"}
    for obj in objects:
        kind = obj.typ.rsplit(":", 1)[1]
        text = yaml.safe_dump({"apiVersion": obj.inputs["apiVersion"], "kind": kind, **{
            k: v for k, v in obj.inputs.items() if k not in ("apiVersion", "kind")}})
        parsed = yaml.safe_load(text)  # what kubectl apply would send
        meta = parsed["metadata"]
        assert not metadata_problems(meta, namespaced=kind not in cluster_scoped), (kind, meta)
        assert ("namespace" in meta) == (kind not in cluster_scoped), kind
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "mmp"
        if kind == "Namespace":
            assert DNS_LABEL.fullmatch(meta["name"]) and len(meta["name"]) <= 63
    pv = k8s_stack.one("kubernetes:core/v1:PersistentVolume").inputs
    pvc = k8s_stack.one("kubernetes:core/v1:PersistentVolumeClaim").inputs
    problems = (_unknown_fields(pv["spec"], k8s.core.v1.PersistentVolumeSpecArgs, "pv.spec")
                + _unknown_fields(pv["spec"]["csi"], k8s.core.v1.CSIPersistentVolumeSourceArgs, "pv.spec.csi")
                + _unknown_fields(pvc["spec"], k8s.core.v1.PersistentVolumeClaimSpecArgs, "pvc.spec")
                + _unknown_fields(pv["metadata"], k8s.meta.v1.ObjectMetaArgs, "pv.metadata"))
    assert not problems, problems


def test_the_volume_is_the_stacks_file_system_bound_to_the_training_claim(k8s_stack):
    pv = k8s_stack.one("kubernetes:core/v1:PersistentVolume").inputs
    pvc = k8s_stack.one("kubernetes:core/v1:PersistentVolumeClaim").inputs
    csi = pv["spec"]["csi"]
    assert csi["driver"] == "fsx.csi.aws.com"
    assert csi["volumeHandle"] == k8s_stack.exports["fsxFileSystemId"]
    assert csi["volumeAttributes"] == {"dnsname": k8s_stack.exports["fsxDnsName"],
                                       "mountname": k8s_stack.exports["fsxMountName"]}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # deleting the claim never touches FSx
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"] == ""  # static: no provisioner
    assert set(pvc["spec"]["accessModes"]) <= set(pv["spec"]["accessModes"]) == {"ReadWriteMany"}
    assert pvc["spec"]["resources"]["requests"]["storage"] == pv["spec"]["capacity"]["storage"] == "1200Gi"
    assert pvc["metadata"]["name"] == infra_k8s.FSX_CLAIM and pvc["metadata"]["namespace"] == infra_k8s.NAMESPACE


# -- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"mmp:kubernetes": "true"}, "kubernetes: the training pods read datasets from FSx"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesGpuInstanceTypes": '["m5.xlarge"]'},
     "mmp:kubernetesGpuInstanceTypes: Value error, 'm5.xlarge' is not an EC2 instance type with NVIDIA GPUs"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesGpuInstanceTypes": '[]'},
     "name at least one GPU instance type"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesApiCidrs": '["0.0.0.0/0"]'},
     "would open the cluster's API endpoint to the whole internet"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesVersion": "1.29"},
     "mmp:kubernetesVersion: Value error, 1.29: Kubeflow Trainer needs Kubernetes 1.31 or later"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesVersion": "latest"},
     "'latest' is not a Kubernetes minor version"),
    ({"mmp:fsx": "true", "mmp:kubernetes": "true", "mmp:kubernetesMaxNodes": "0"}, "mmp:kubernetesMaxNodes"),
])
def test_bad_kubernetes_config_fails_naming_the_key(extra, message, h):
    with pytest.raises(Exception) as info:
        h.run_stack("dev", {**h.DEV_CONFIG, **extra})
    assert message in str(info.value)


def test_settings_defaults_keep_kubernetes_off():
    settings = parse_settings("dev", {"deploymentName": "acme"}, secret_keys=("githubToken", "webhookSecret",
                                                                              "mlflowAdminPassword"))
    assert settings.kubernetes is False and settings.kubernetes_gpu_instance_types == ["g5.xlarge"]
    with pytest.raises(SettingsError, match="kubernetes"):
        parse_settings("dev", {"deploymentName": "acme", "kubernetes": True},
                       secret_keys=("githubToken", "webhookSecret", "mlflowAdminPassword"))
