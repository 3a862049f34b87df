"""Network: a VPC with private subnets, an S3 gateway endpoint and the security groups.

Training, FSx, MLflow tasks and the database live in private subnets; only the
MLflow load balancer is in public ones. No security group opens SSH (22) or
PostgreSQL (5432) to 0.0.0.0/0: SSH comes from the training group itself and the
`sshCidrs` you name (0.0.0.0/0 is refused), the database only from MLflow's tasks.
A single NAT gateway (config `natGateway`) lets private tasks pull images and reach
the MLflow URL (without it, the Fargate tasks take the public subnets and a public IP); an existing VPC can be reused with `vpcId` and its subnet ids.
When `mlflowAllowedCidrs` is narrowed, the load balancer also admits the NAT's
address (or `egressCidrs` for a reused VPC): the stage Lambdas and every training
job then run in the private subnets and leave through it, so the pipeline always
reaches its own MLflow.
"""

from __future__ import annotations

import ipaddress

import pulumi
import pulumi_aws as aws

from mmp.infra.settings import Settings

EGRESS_ALL = [aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"])]
LUSTRE_PORTS = ((988, 988), (1018, 1023))


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    private_subnet_ids: pulumi.Output[list[str]]
    public_subnet_ids: pulumi.Output[list[str]]

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}

        self.nat_public_ip: pulumi.Output[str] | None = None
        if settings.vpc_id:
            self.vpc_id = pulumi.Output.from_input(settings.vpc_id)
            self.private_subnet_ids = pulumi.Output.from_input(list(settings.private_subnet_ids))
            self.public_subnet_ids = pulumi.Output.from_input(list(settings.public_subnet_ids))
            route_table_ids = None
        else:
            vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=settings.vpc_cidr, enable_dns_hostnames=True,
                              enable_dns_support=True, tags={**tags, "Name": settings.prefix}, opts=child)
            subnets = list(ipaddress.ip_network(settings.vpc_cidr).subnets(new_prefix=20))
            igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
            public_rt = aws.ec2.RouteTable(f"{name}-public", vpc_id=vpc.id, tags=tags, routes=[
                aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)], opts=child)
            public, private = [], []
            for i, zone in enumerate(settings.zones):
                pub = aws.ec2.Subnet(f"{name}-public-{i}", vpc_id=vpc.id, cidr_block=str(subnets[i]),
                                     availability_zone=zone, map_public_ip_on_launch=False,
                                     tags={**tags, "Name": f"{settings.prefix}-public-{zone}"}, opts=child)
                aws.ec2.RouteTableAssociation(f"{name}-public-{i}", subnet_id=pub.id, route_table_id=public_rt.id,
                                              opts=child)
                priv = aws.ec2.Subnet(f"{name}-private-{i}", vpc_id=vpc.id, cidr_block=str(subnets[8 + i]),
                                      availability_zone=zone,
                                      tags={**tags, "Name": f"{settings.prefix}-private-{zone}"}, opts=child)
                public.append(pub)
                private.append(priv)
            routes = []
            if settings.nat_gateway:
                eip = aws.ec2.Eip(f"{name}-nat", domain="vpc", tags=tags, opts=child)
                nat = aws.ec2.NatGateway(f"{name}-nat", allocation_id=eip.id, subnet_id=public[0].id, tags=tags,
                                         opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]))
                routes.append(aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id))
                self.nat_public_ip = eip.public_ip
            private_rt = aws.ec2.RouteTable(f"{name}-private", vpc_id=vpc.id, routes=routes, tags=tags, opts=child)
            for i, priv in enumerate(private):
                aws.ec2.RouteTableAssociation(f"{name}-private-{i}", subnet_id=priv.id,
                                              route_table_id=private_rt.id, opts=child)
            self.vpc_id = vpc.id
            self.private_subnet_ids = pulumi.Output.all(*[s.id for s in private])
            self.public_subnet_ids = pulumi.Output.all(*[s.id for s in public])
            route_table_ids = [private_rt.id, public_rt.id]
        # Fargate tasks (MLflow, the runner): behind the NAT, or, in a stack-made VPC without one, in
        # the public subnets with a public IP, their only way out to ECR, Logs, Secrets Manager and S3
        # (a Fargate task in a private subnet needs a NAT to pull its image: ECS task networking).
        self.task_public_ip = not (settings.nat_gateway or settings.vpc_id)
        self.task_subnet_ids = self.public_subnet_ids if self.task_public_ip else self.private_subnet_ids

        if route_table_ids:  # a reused VPC keeps its own endpoints
            aws.ec2.VpcEndpoint(f"{name}-s3", vpc_id=self.vpc_id, service_name=f"com.amazonaws.{settings.region}.s3",
                                vpc_endpoint_type="Gateway", route_table_ids=route_table_ids, tags=tags, opts=child)

        def group(key: str, description: str, ingress: list) -> aws.ec2.SecurityGroup:
            return aws.ec2.SecurityGroup(f"{name}-{key}", description=description, vpc_id=self.vpc_id,
                                         ingress=ingress, egress=EGRESS_ALL,
                                         tags={**tags, "Name": f"{settings.prefix}-{key}"}, opts=child)

        # Training hosts talk to each other freely (Horovod/gloo, NCCL); SSH only as configured.
        training_ingress = [aws.ec2.SecurityGroupIngressArgs(protocol="-1", from_port=0, to_port=0, self=True,
                                                             description="between training hosts")]
        if settings.ssh_cidrs:
            training_ingress.append(aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=22, to_port=22, cidr_blocks=list(settings.ssh_cidrs),
                description="SSH from the operators' networks (mmp:sshCidrs)"))
        self.training_sg = group("training", "MMP training hosts (SageMaker VPC mode, DLAMI)", training_ingress)

        port = 443 if settings.mlflow_certificate_arn else 80
        alb_ingress = [aws.ec2.SecurityGroupIngressArgs(
            protocol="tcp", from_port=port, to_port=port, cidr_blocks=list(settings.mlflow_allowed_cidrs),
            description="MLflow UI and API (basic auth)")]
        if settings.pipeline_in_vpc:  # the pipeline's own callers: stage Lambdas and training jobs, via NAT
            egress = (list(settings.egress_cidrs) if settings.vpc_id
                      else [self.nat_public_ip.apply(lambda ip: f"{ip}/32")])
            alb_ingress.append(aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp", from_port=port, to_port=port, cidr_blocks=egress,
                description="the pipeline's Lambdas and training jobs (their NAT address)"))
        self.alb_sg = group("mlflow-alb", "MLflow load balancer", alb_ingress)
        self.mlflow_sg = group("mlflow-task", "MLflow server tasks", [aws.ec2.SecurityGroupIngressArgs(
            protocol="tcp", from_port=5000, to_port=5000, security_groups=[self.alb_sg.id, self.training_sg.id],
            description="from the load balancer and training hosts")])
        self.database_sg = group("database", "MLflow PostgreSQL", [aws.ec2.SecurityGroupIngressArgs(
            protocol="tcp", from_port=5432, to_port=5432, security_groups=[self.mlflow_sg.id],
            description="from MLflow tasks only")])
        self.fsx_sg = group("fsx", "FSx for Lustre", [
            aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=lo, to_port=hi, self=True,
                                             security_groups=[self.training_sg.id], description="Lustre")
            for lo, hi in LUSTRE_PORTS])

        # Stage Lambdas run in the private subnets when MLflow is narrowed (settings.pipeline_in_vpc).
        self.lambda_sg = group("lambda", "MMP stage Lambdas (egress only)", []) if settings.pipeline_in_vpc else None

        self.register_outputs({
            "vpcId": self.vpc_id, "privateSubnetIds": self.private_subnet_ids,
            "publicSubnetIds": self.public_subnet_ids, "trainingSecurityGroupId": self.training_sg.id,
            "mlflowSecurityGroupId": self.mlflow_sg.id, "databaseSecurityGroupId": self.database_sg.id,
        })
