"""KubernetesCluster: the EKS cluster the `kubernetes` platform trains on (config `mmp:kubernetes`).

Built from `pulumi_aws.eks` and `pulumi_kubernetes` resources, not the pulumi-eks component
(one opaque resource under mocks, which the IAM and network tests could not see):

- the cluster: access entries only (authenticationMode API, no aws-auth ConfigMap), a
  private API endpoint (`kubernetesApiCidrs` may add named networks for a deploy from
  outside the VPC), standard support (the EKS API's default, EXTENDED, costs six times
  the control plane's hourly price once the version leaves standard support);
- add-ons: the Pod Identity agent, and the FSx CSI driver with its own role through a
  Pod Identity association;
- a small on-demand system node group (Trainer's and JobSet's controllers, CoreDNS, the
  autoscaler), and one GPU managed node group per `kubernetesGpuInstanceTypes` entry that
  rests at zero nodes, in FSx's subnet (its zone), tainted `nvidia.com/gpu:NoSchedule`,
  in the training security group (Lustre to FSx, all traffic between hosts) through a
  launch template (IMDSv2 with hop limit 1: pods never reach the node role);
- the Cluster Autoscaler (what scales a node group up from zero when a training pod is
  pending) and NVIDIA's device plugin (the AL2023 NVIDIA AMI does not ship it), pinned;
- a pinned Helm release of Kubeflow Trainer (it brings JobSet), at
  mmp.backends.kubernetes.TRAINER_VERSION, the version the backend's objects are checked
  against;
- the training namespace, its service account (a Pod Identity role like the DLAMI hosts':
  datasets, artifacts, the MLflow password), a static PersistentVolume of the stack's
  FSx file system (`fsx.csi.aws.com`) and its claim;
- for the runner task (`admit_runner`): an access entry mapping its role to one
  Kubernetes group, a namespaced Role/RoleBinding for that group (TrainJobs and
  TrainingRuntimes; read pods and their logs; nothing cluster-wide), and HTTPS from its
  security group to the API endpoint.

`pulumi up` talks to the API server through the Kubernetes provider (the namespace, RBAC,
PV/PVC and Helm releases): it runs where the endpoint is reachable and the AWS CLI is
installed (the kubeconfig's token comes from `aws eks get-token`).
"""

from __future__ import annotations

import json
import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from mmp.backends.kubernetes import TRAINER_VERSION
from mmp.infra import iam
from mmp.infra.datastore import DataStore
from mmp.infra.network import Network
from mmp.infra.settings import Settings

NAMESPACE = "mmp-training"
SERVICE_ACCOUNT = "mmp-training"
FSX_CLAIM = "mmp-fsx"
RUNNER_GROUP = "mmp-runner"  # the Kubernetes group the runner task's access entry maps its role to
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}  # pods tolerate it (Exists)
POOL_LABEL = "mmp.dev/pool"
SUPPORT_TYPE = "STANDARD"
LOG_TYPES = ("audit", "authenticator")  # who did what, and who signed in; not the verbose api log
ADDONS = ("eks-pod-identity-agent", "aws-fsx-csi-driver")
FSX_CSI_SERVICE_ACCOUNT = "fsx-csi-controller-sa"  # the add-on's controller (EKS user guide, FSx CSI driver)
SYSTEM_NAMESPACE = "kube-system"
TRAINER_CHART = "oci://ghcr.io/kubeflow/charts/kubeflow-trainer"
TRAINER_NAMESPACE = "kubeflow-system"
# (repository, chart, version): pinned so a deploy never takes an untested release.
DEVICE_PLUGIN = ("https://nvidia.github.io/k8s-device-plugin", "nvidia-device-plugin", "0.17.4")
AUTOSCALER = ("https://kubernetes.github.io/autoscaler", "cluster-autoscaler", "9.46.6")
# The device plugin chart's DaemonSet requires Node Feature Discovery's PCI label or this one (its values'
# nodeAffinity): set on the GPU groups, so no NFD is needed.
DEVICE_PLUGIN_LABEL = {"nvidia.com/gpu.present": "true"}
AUTOSCALER_SERVICE_ACCOUNT = "cluster-autoscaler"
# What the runner's backend does in the training namespace (mmp.backends.kubernetes), and no more:
# the shared runtime is read and made if absent, the TrainJob made, read and deleted, its pods listed
# (scheduling, image pulls, the termination message) and the launcher's log read. No ConfigMap: on AWS
# the code comes from S3. tests/kubernetes/fake_apiserver.py answers 403 to any request outside these.
RBAC_RULES = [
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainingruntimes"], "verbs": ["create", "get"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
# AWS's documented managed policies for the cluster role and for managed node groups' node role.
CLUSTER_POLICIES = ("arn:aws:iam::aws:policy/AmazonEKSClusterPolicy",)
NODE_POLICIES = ("arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
                 "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryPullOnly",
                 "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy")
ENVIRONMENT_NAMES = ("MMP_K8S_API_URL", "MMP_K8S_CA_DATA", "MMP_K8S_CLUSTER_NAME", "MMP_K8S_NAMESPACE",
                     "MMP_K8S_SERVICE_ACCOUNT", "MMP_K8S_FSX_CLAIM", "MMP_K8S_IMAGE_REPOSITORY",
                     "MMP_K8S_NODE_SELECTOR", "MMP_K8S_TOLERATIONS")
# Training pods go to the GPU groups only and tolerate their taint (the API's NoSchedule is EKS's NO_SCHEDULE).
TAINT_EFFECTS = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}
NODE_SELECTOR = {POOL_LABEL: "gpu"}
TOLERATIONS = [{"key": GPU_TAINT["key"], "operator": "Exists", "effect": TAINT_EFFECTS[GPU_TAINT["effect"]]}]


def labels(settings: Settings) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "mmp", "app.kubernetes.io/part-of": settings.prefix}


def namespace_object(settings: Settings) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": labels(settings)}}


def service_account_object(settings: Settings) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE, "labels": labels(settings)}}


def role_object(settings: Settings) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": RUNNER_GROUP, "namespace": NAMESPACE, "labels": labels(settings)},
            "rules": [dict(rule) for rule in RBAC_RULES]}


def role_binding_object(settings: Settings) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": RUNNER_GROUP, "namespace": NAMESPACE, "labels": labels(settings)},
            "subjects": [{"kind": "Group", "name": RUNNER_GROUP, "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"kind": "Role", "name": RUNNER_GROUP, "apiGroup": "rbac.authorization.k8s.io"}}


def volume_name(settings: Settings) -> str:
    """A PersistentVolume is cluster-scoped: named after the deployment, never after the claim alone."""
    return f"{settings.prefix}-fsx"


def persistent_volume_object(settings: Settings, *, file_system_id: str, dns_name: str, mount_name: str,
                             capacity_gib: int) -> dict:
    """The stack's FSx for Lustre file system, statically provisioned (aws-fsx-csi-driver's static
    provisioning example: volumeHandle the file system id, dnsname and mountname attributes),
    bound to exactly the training namespace's claim."""
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": volume_name(settings), "labels": labels(settings)},
            "spec": {"capacity": {"storage": f"{capacity_gib}Gi"}, "volumeMode": "Filesystem",
                     "accessModes": ["ReadWriteMany"], "persistentVolumeReclaimPolicy": "Retain",
                     "storageClassName": "", "mountOptions": ["flock"],
                     "claimRef": {"namespace": NAMESPACE, "name": FSX_CLAIM},
                     "csi": {"driver": "fsx.csi.aws.com", "volumeHandle": file_system_id,
                             "volumeAttributes": {"dnsname": dns_name, "mountname": mount_name}}}}


def persistent_volume_claim_object(settings: Settings, *, capacity_gib: int) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": FSX_CLAIM, "namespace": NAMESPACE, "labels": labels(settings)},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume_name(settings),
                     "resources": {"requests": {"storage": f"{capacity_gib}Gi"}}}}


def backend_environment(endpoint: str, ca_data: str | None, cluster_name: str, image_repository: str) -> dict[str, str]:
    """The MMP_K8S_* settings of the stack's cluster (ENVIRONMENT_NAMES; MMP_K8S_CA_DATA only with `ca_data`)."""
    env = {"MMP_K8S_API_URL": endpoint, "MMP_K8S_CA_DATA": ca_data or "", "MMP_K8S_CLUSTER_NAME": cluster_name,
           "MMP_K8S_NAMESPACE": NAMESPACE, "MMP_K8S_SERVICE_ACCOUNT": SERVICE_ACCOUNT, "MMP_K8S_FSX_CLAIM": FSX_CLAIM,
           "MMP_K8S_IMAGE_REPOSITORY": image_repository,
           "MMP_K8S_NODE_SELECTOR": json.dumps(NODE_SELECTOR, sort_keys=True),
           "MMP_K8S_TOLERATIONS": json.dumps(TOLERATIONS)}
    return {k: v for k, v in env.items() if v}


def kubeconfig(cluster_name: str, endpoint: str, ca_data: str, region: str) -> str:
    """What the Kubernetes provider connects with: the endpoint, its CA, and a token from the AWS CLI
    (`aws eks get-token`, the same presigned STS GetCallerIdentity the backend makes with boto3)."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": cluster_name,
        "clusters": [{"name": cluster_name, "cluster": {"server": endpoint, "certificate-authority-data": ca_data}}],
        "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": cluster_name}}],
        "users": [{"name": cluster_name, "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws", "interactiveMode": "Never",
            "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", region, "--output", "json"]}}}],
    })


def node_group_name(settings: Settings, instance_type: str) -> str:
    return f"{settings.prefix}-gpu-{instance_type.replace('.', '-')}"


def autoscaler_statements(region: str, account: pulumi.Input[str], cluster_name: str, settings: Settings) -> list[dict]:
    """The Cluster Autoscaler's AWS calls (its AWS provider's README), scaled to this cluster's GPU groups:
    Describe* have no resource-level form; the scaling calls only on ASGs EKS tagged as this cluster's."""
    groups = pulumi.Output.concat("arn:aws:autoscaling:", region, ":", account,
                                  f":autoScalingGroup:*:autoScalingGroupName/eks-{settings.prefix}-gpu-*")
    return [
        iam.statement(["autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances",
                       "autoscaling:DescribeLaunchConfigurations", "autoscaling:DescribeScalingActivities",
                       "autoscaling:DescribeTags", "ec2:DescribeImages", "ec2:DescribeInstanceTypes",
                       "ec2:DescribeLaunchTemplateVersions", "ec2:GetInstanceTypesFromInstanceRequirements"], ["*"]),
        # A group at zero nodes: its labels, taints and instance type come from the node group itself.
        iam.statement(["eks:DescribeNodegroup"], [pulumi.Output.concat(
            "arn:aws:eks:", region, ":", account, f":nodegroup/{cluster_name}/{settings.prefix}-gpu-*/*")]),
        iam.statement(["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
                      [groups], {"StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}}),
    ]


class KubernetesCluster(pulumi.ComponentResource):
    def __init__(self, name: str, settings: Settings, network: Network, data: DataStore, *,
                 account: pulumi.Input[str], mlflow_password_secret_arn: pulumi.Input[str] | None,
                 mlflow_tracking_server_arn: pulumi.Input[str] | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:KubernetesCluster", name, None, opts)
        if data.fsx is None:
            raise ValueError("KubernetesCluster needs the stack's FSx file system (mmp:fsx true)")
        self._name, self._settings = name, settings
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region
        self.cluster_name = f"{settings.prefix}-training"

        # -- the control plane ----------------------------------------------------------------
        cluster_role = iam.managed_role(f"{name}-cluster", "eks.amazonaws.com", CLUSTER_POLICIES, self,
                                        description="EKS: the training cluster's control plane",
                                        assume_actions=("sts:AssumeRole", "sts:TagSession"))
        # The API endpoint's own group: HTTPS from the runner task only (admit_runner), no inline rules.
        self.api_security_group = aws.ec2.SecurityGroup(
            f"{name}-api", vpc_id=network.vpc_id, description="MMP EKS API endpoint (HTTPS from the runner task)",
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],
            tags={**tags, "Name": f"{settings.prefix}-eks-api"}, opts=child)
        # EKS writes control-plane logs to this group; made here so it has the stack's retention (EKS's own never expires).
        logs = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/aws/eks/{self.cluster_name}/cluster",
                                       retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        public = bool(settings.kubernetes_api_cidrs)
        self.cluster = aws.eks.Cluster(
            f"{name}-cluster", name=self.cluster_name, role_arn=cluster_role.arn, version=settings.kubernetes_version,
            access_config={"authentication_mode": "API", "bootstrap_cluster_creator_admin_permissions": True},
            vpc_config={"subnet_ids": network.private_subnet_ids, "security_group_ids": [self.api_security_group.id],
                        "endpoint_private_access": True, "endpoint_public_access": public,
                        **({"public_access_cidrs": list(settings.kubernetes_api_cidrs)} if public else {})},
            upgrade_policy={"support_type": SUPPORT_TYPE},
            enabled_cluster_log_types=list(LOG_TYPES), tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*cluster_role.mmp_attachments, logs]))
        self.endpoint = self.cluster.endpoint
        self.ca_data = self.cluster.certificate_authority.apply(lambda ca: ca.data)

        # -- nodes ----------------------------------------------------------------------------
        node_role = iam.managed_role(f"{name}-node", "ec2.amazonaws.com", NODE_POLICIES, self,
                                     description="EKS managed nodes: join the cluster, pull images, pod networking")
        node_deps = pulumi.ResourceOptions(parent=self, depends_on=node_role.mmp_attachments)
        self.system_nodes = aws.eks.NodeGroup(
            f"{name}-system", cluster_name=self.cluster.name, node_group_name=f"{settings.prefix}-system",
            node_role_arn=node_role.arn, subnet_ids=network.private_subnet_ids, ami_type="AL2023_x86_64_STANDARD",
            capacity_type="ON_DEMAND", instance_types=[settings.kubernetes_system_instance_type],
            scaling_config={"min_size": 1, "max_size": 2, "desired_size": 1}, labels={POOL_LABEL: "system"},
            tags=tags, opts=node_deps)
        # GPU hosts: in the training security group (FSx admits Lustre from it; hosts talk freely)
        # beside the cluster's own group (control plane ↔ kubelet), IMDSv2 with one hop.
        self.gpu_template = aws.ec2.LaunchTemplate(
            f"{name}-gpu", description="MMP EKS GPU nodes",
            vpc_security_group_ids=[self.cluster.vpc_config.cluster_security_group_id, network.training_sg.id],
            metadata_options={"http_tokens": "required", "http_endpoint": "enabled", "http_put_response_hop_limit": 1},
            block_device_mappings=[{"device_name": "/dev/xvda", "ebs": {
                "volume_size": settings.kubernetes_node_volume_gb, "volume_type": "gp3", "encrypted": "true",
                "delete_on_termination": "true"}}],
            tag_specifications=[{"resource_type": "instance", "tags": {**tags, "mmp:managed": "true"}}],
            update_default_version=True, tags=tags, opts=child)
        self.gpu_nodes: dict[str, aws.eks.NodeGroup] = {}
        for instance_type in settings.kubernetes_gpu_instance_types:
            self.gpu_nodes[instance_type] = aws.eks.NodeGroup(
                f"{name}-gpu-{instance_type.replace('.', '-')}", cluster_name=self.cluster.name,
                node_group_name=node_group_name(settings, instance_type), node_role_arn=node_role.arn,
                subnet_ids=[data.fsx.subnet_ids],  # FSx's one subnet, so its zone: no cross-zone Lustre traffic
                ami_type="AL2023_x86_64_NVIDIA", capacity_type="ON_DEMAND",
                instance_types=[instance_type],
                scaling_config={"min_size": 0, "max_size": settings.kubernetes_max_nodes, "desired_size": 0},
                launch_template={"id": self.gpu_template.id, "version": self.gpu_template.latest_version.apply(str)},
                taints=[dict(GPU_TAINT)], labels={**NODE_SELECTOR, **DEVICE_PLUGIN_LABEL}, tags=tags,
                # The autoscaler owns the desired size once the group exists.
                opts=pulumi.ResourceOptions(parent=self, depends_on=node_role.mmp_attachments,
                                            ignore_changes=["scalingConfig.desiredSize"]))

        # -- add-ons ----------------------------------------------------------------------------
        fsx_csi_role = iam.pod_identity_role(f"{name}-fsx-csi", [
            # Static provisioning creates, resizes and deletes nothing: the controller may only look file
            # systems up (DescribeFileSystems has no resource-level form: Service Authorization Reference).
            iam.statement(["fsx:DescribeFileSystems"], ["*"]),
        ], self, description="The FSx CSI driver's controller (a static volume of this stack's file system)")
        self.addons = {
            "eks-pod-identity-agent": aws.eks.Addon(f"{name}-pod-identity", cluster_name=self.cluster.name,
                                                    addon_name="eks-pod-identity-agent", tags=tags,
                                                    opts=pulumi.ResourceOptions(parent=self,
                                                                                depends_on=[self.system_nodes])),
        }
        self.addons["aws-fsx-csi-driver"] = aws.eks.Addon(
            f"{name}-fsx-csi", cluster_name=self.cluster.name, addon_name="aws-fsx-csi-driver",
            pod_identity_associations=[{"role_arn": fsx_csi_role.arn, "service_account": FSX_CSI_SERVICE_ACCOUNT}],
            tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[self.addons["eks-pod-identity-agent"],
                                                                            iam.policy_of(fsx_csi_role)]))

        # -- the Kubernetes side ------------------------------------------------------------------
        self.provider = k8s.Provider(
            f"{name}-k8s", kubeconfig=pulumi.Output.all(self.cluster.name, self.endpoint, self.ca_data).apply(
                lambda a: kubeconfig(a[0], a[1], a[2], region)), enable_server_side_apply=True, opts=child)
        on_cluster = pulumi.ResourceOptions(parent=self, provider=self.provider, depends_on=[self.system_nodes])

        autoscaler_role = iam.pod_identity_role(
            f"{name}-autoscaler", autoscaler_statements(region, account, self.cluster_name, settings), self,
            description="The Cluster Autoscaler: scale this cluster's GPU node groups")
        aws.eks.PodIdentityAssociation(f"{name}-autoscaler", cluster_name=self.cluster.name,
                                       namespace=SYSTEM_NAMESPACE, service_account=AUTOSCALER_SERVICE_ACCOUNT,
                                       role_arn=autoscaler_role.arn, tags=tags, opts=child)
        self.releases = {
            "trainer": k8s.helm.v3.Release(
                f"{name}-trainer", name="kubeflow-trainer", chart=TRAINER_CHART, version=TRAINER_VERSION,
                namespace=TRAINER_NAMESPACE, create_namespace=True, atomic=True, timeout=900, opts=on_cluster),
            "device-plugin": k8s.helm.v3.Release(
                f"{name}-device-plugin", name="nvidia-device-plugin", chart=DEVICE_PLUGIN[1], version=DEVICE_PLUGIN[2],
                repository_opts={"repo": DEVICE_PLUGIN[0]}, namespace=SYSTEM_NAMESPACE, atomic=True,
                values={"nodeSelector": {POOL_LABEL: "gpu"}}, opts=on_cluster),
            "autoscaler": k8s.helm.v3.Release(
                f"{name}-autoscaler", name="cluster-autoscaler", chart=AUTOSCALER[1], version=AUTOSCALER[2],
                repository_opts={"repo": AUTOSCALER[0]}, namespace=SYSTEM_NAMESPACE, atomic=True,
                values={"cloudProvider": "aws", "awsRegion": region,
                        "autoDiscovery": {"clusterName": self.cluster_name},
                        "rbac": {"serviceAccount": {"name": AUTOSCALER_SERVICE_ACCOUNT}},
                        "nodeSelector": {POOL_LABEL: "system"},
                        # A GPU node idle this long goes (the group rests at zero between runs).
                        "extraArgs": {"scale-down-unneeded-time": "10m", "balance-similar-node-groups": "false"}},
                opts=on_cluster),
        }

        ns = namespace_object(settings)
        self.namespace = k8s.core.v1.Namespace(f"{name}-namespace", metadata=ns["metadata"], opts=on_cluster)
        in_namespace = pulumi.ResourceOptions(parent=self, provider=self.provider, depends_on=[self.namespace])
        training_role = iam.pod_identity_role(
            f"{name}-training", iam.training_statements(
                data.datasets_bucket.arn, data.artifacts_bucket.arn,
                mlflow_password_secret_arn=mlflow_password_secret_arn,
                mlflow_tracking_server_arn=mlflow_tracking_server_arn), self,
            description="Training pods (train.py's ranks): datasets, artifacts, MLflow password")
        sa = service_account_object(settings)
        self.service_account = k8s.core.v1.ServiceAccount(f"{name}-training", metadata=sa["metadata"],
                                                          opts=in_namespace)
        aws.eks.PodIdentityAssociation(f"{name}-training", cluster_name=self.cluster.name, namespace=NAMESPACE,
                                       service_account=SERVICE_ACCOUNT, role_arn=training_role.arn, tags=tags,
                                       opts=child)
        role, binding = role_object(settings), role_binding_object(settings)
        self.rbac_role = k8s.rbac.v1.Role(f"{name}-runner", metadata=role["metadata"], rules=role["rules"],
                                          opts=in_namespace)
        self.rbac_binding = k8s.rbac.v1.RoleBinding(f"{name}-runner", metadata=binding["metadata"],
                                                    subjects=binding["subjects"], role_ref=binding["roleRef"],
                                                    opts=in_namespace)
        capacity = settings.fsx_storage_gb
        pv = pulumi.Output.all(data.fsx_id, data.fsx_dns_name, data.fsx_mount_name).apply(
            lambda a: persistent_volume_object(settings, file_system_id=a[0], dns_name=a[1], mount_name=a[2],
                                               capacity_gib=capacity))
        self.volume = k8s.core.v1.PersistentVolume(
            f"{name}-fsx", metadata=pv.apply(lambda o: o["metadata"]), spec=pv.apply(lambda o: o["spec"]),
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider,
                                        depends_on=[self.addons["aws-fsx-csi-driver"]]))
        pvc = persistent_volume_claim_object(settings, capacity_gib=capacity)
        self.claim = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-fsx-claim", metadata=pvc["metadata"], spec=pvc["spec"],
            opts=pulumi.ResourceOptions(parent=self, provider=self.provider, depends_on=[self.namespace, self.volume]))

        self.register_outputs({"clusterName": self.cluster.name, "endpoint": self.endpoint,
                               "namespace": NAMESPACE, "fsxClaim": FSX_CLAIM})

    def environment(self, image_repository: pulumi.Input[str], *, ca: bool = True) -> pulumi.Output[dict[str, str]]:
        """What the kubernetes backend reads (mmp.backends.kubernetes): all of it in the runner task; without
        the CA (~1.5 KB of a Lambda's 4 KB) in the stage Lambdas, whose Prepare only checks the experiment
        against the settings and never calls the cluster."""
        return pulumi.Output.all(self.endpoint, self.ca_data, self.cluster.name, image_repository).apply(
            lambda a: backend_environment(a[0], a[1] if ca else None, a[2], a[3]))

    def admit_runner(self, role_arn: pulumi.Input[str], security_group_id: pulumi.Input[str]) -> None:
        """Let the runner task in: its role maps to RUNNER_GROUP (bound to the namespaced Role), and its
        security group reaches the private endpoint on 443."""
        child = pulumi.ResourceOptions(parent=self)
        aws.eks.AccessEntry(f"{self._name}-runner", cluster_name=self.cluster.name, principal_arn=role_arn,
                            type="STANDARD", kubernetes_groups=[RUNNER_GROUP],
                            tags={"mmp:deployment": self._settings.prefix}, opts=child)
        aws.vpc.SecurityGroupIngressRule(
            f"{self._name}-runner-api", security_group_id=self.api_security_group.id, ip_protocol="tcp",
            from_port=443, to_port=443, referenced_security_group_id=security_group_id,
            description="the Kubernetes API from the MMP runner task", opts=child)

