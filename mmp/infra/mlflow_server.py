"""MlflowServer: the tracking server the pipeline, train.py and people all use.

Default (`mmp:mlflowMode fargate`): one ECS Fargate task running `mlflow server`
with job execution off, `--serve-artifacts` into the artifacts bucket, the
basic-auth app, and an RDS PostgreSQL backend store, behind an internet-facing
ALB (HTTPS at `mmp:mlflowDomainName` when `mmp:mlflowCertificateArn` is set, with an
alias record when `mmp:mlflowHostedZoneId` is; the UI is what the GitHub commit
status links to). The database password is managed by RDS in Secrets
Manager (`manage_master_user_password`) and the admin password is the
`mmp:mlflowAdminPassword` secret; ECS injects both, so neither sits in the task
definition or the Pulumi state in clear. The basic-auth app keeps its users in
its own database on the same PostgreSQL instance (`mlflow_auth`, made at start:
the auth app's migrations use alembic's default version table, so it cannot share
the tracking store's database).

`mmp:mlflowMode sagemaker` makes a SageMaker managed MLflow tracking server
instead (no ALB, RDS or Fargate); its API takes SigV4-signed requests, which the
stage Lambdas' REST tracker makes (mmp.tracking.sigv4) with their role's
`sagemaker-mlflow:*` on this server, and train.py's MLflow client makes through
the sagemaker-mlflow plugin with the training role's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pulumi
import pulumi_aws as aws

from mmp.tracking.sigv4 import endpoint as sigv4_endpoint
from mmp.infra import iam
from mmp.infra.datastore import DataStore
from mmp.infra.image_ready import ImageReady
from mmp.infra.network import Network
from mmp.infra.settings import Settings
from mmp.infra.stack_image import stack_image

PORT = 5000
REQUEST_TIMEOUT_S = 120  # the ALB's idle timeout and the workers' request timeout

# The server's image: mlflow_docker/ (mlflow[auth], psycopg2 and boto3, every package pinned), built by
# CodeBuild into the stack's ECR at `pulumi up` (mmp.infra.stack_image, mmp.infra.image_ready), so a task
# start installs nothing and needs no PyPI. `mmp:mlflowImage` names another image holding the same packages.
IMAGE_CONTEXT = ("mlflow_docker",)
IMAGE_DOCKERFILE = "mlflow_docker/Dockerfile"

# Run by /bin/sh in that image. The auth INI is written by Python's configparser with every `%` doubled:
# MLflow reads it with ConfigParser, whose interpolation rejects the `%XX` of a URL-quoted password.
STARTUP = "set -eu\n" + r"""umask 077
export MLFLOW_AUTH_CONFIG_PATH="${TMPDIR:-/tmp}/mlflow-auth.ini"
MLFLOW_BACKEND_STORE_URI=$(python - <<'PY'
import configparser, os, urllib.parse
import psycopg2
from psycopg2 import sql
env = os.environ
server = {"host": env["DB_HOST"], "port": env.get("DB_PORT", "5432"), "user": env["DB_USER"],
          "password": env["DB_PASSWORD"]}
# The auth app migrates with alembic's default version table, like the tracking store: sharing one
# database they read each other's revision and fail. Its own database on the same instance.
auth_db = env["DB_NAME"] + "_auth"
conn = psycopg2.connect(dbname=env["DB_NAME"], **server)
try:
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (auth_db,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(auth_db)))
finally:
    conn.close()
password = urllib.parse.quote(env["DB_PASSWORD"], safe="")
base = f"postgresql://{env['DB_USER']}:{password}@{env['DB_HOST']}:{env.get('DB_PORT', '5432')}"
uri = f"{base}/{env['DB_NAME']}"
ini = configparser.ConfigParser()
ini["mlflow"] = {key: value.replace("%", "%%") for key, value in {
    "default_permission": "READ", "database_uri": f"{base}/{auth_db}",
    "admin_username": env["MLFLOW_ADMIN_USERNAME"], "admin_password": env["MLFLOW_ADMIN_PASSWORD"],
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}.items()}
with open(env["MLFLOW_AUTH_CONFIG_PATH"], "w") as out:
    ini.write(out)
# Migrate the auth database once, before the workers: each worker migrates it when it starts, and two
# workers migrating an empty database at once race (one exits with code 3, and gunicorn stops them all).
import contextlib, sys
with contextlib.redirect_stdout(sys.stderr):  # stdout is the store URI, read below
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore
    SqlAlchemyStore().init_db(f"{base}/{auth_db}")
print(uri)
PY
)
export MLFLOW_BACKEND_STORE_URI  # read by `mlflow server` from the environment: not in argv, not in ps
MLFLOW_FLASK_SERVER_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')
export MLFLOW_FLASK_SERVER_SECRET_KEY  # one key for every worker, so CSRF tokens hold across them
unset DB_PASSWORD MLFLOW_ADMIN_PASSWORD
# gunicorn's default 30 s kills a sync worker mid-request (a model upload through --serve-artifacts):
# give requests as long as the load balancer's idle timeout.
exec mlflow server --host 0.0.0.0 --port "${MLFLOW_PORT:-__PORT__}" --workers 2 --app-name basic-auth \
  --gunicorn-opts "--timeout ${MLFLOW_REQUEST_TIMEOUT:-__TIMEOUT__}" --serve-artifacts --artifacts-destination "${ARTIFACTS_DESTINATION}"
""".replace("__PORT__", str(PORT)).replace("__TIMEOUT__", str(REQUEST_TIMEOUT_S))


class MlflowServer(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, name: str, settings: Settings, network: Network, data: DataStore, *, account: pulumi.Input[str],
                 admin_password: pulumi.Input[str] | None, project_root: Path,
                 docker_hub_rule: pulumi.Resource | None = None, opts: pulumi.ResourceOptions | None = None):
        super().__init__("mmp:infra:MlflowServer", name, None, opts)
        self.settings = settings
        self.username = settings.mlflow_username
        self.password_secret: aws.secretsmanager.Secret | None = None
        self.tracking_server_arn: pulumi.Output[str] | str = ""
        self.load_balancer_dns_name: pulumi.Output[str] | str = ""
        if settings.mlflow_mode == "sagemaker":
            self._sagemaker(name, settings, data)
        else:
            self._fargate(name, settings, network, data, account, admin_password, project_root, docker_hub_rule)
        self.register_outputs({
            "url": self.url, "username": self.username,
            "passwordSecretArn": self.password_secret.arn if self.password_secret else "",
            "trackingServerArn": self.tracking_server_arn, "loadBalancerDnsName": self.load_balancer_dns_name,
        })

    # -- SageMaker managed MLflow -----------------------------------------------------
    def _sagemaker(self, name: str, settings: Settings, data: DataStore) -> None:
        child = pulumi.ResourceOptions(parent=self)
        bucket_arn = data.artifacts_bucket.arn
        role = iam.service_role(f"{name}-sagemaker-mlflow", "sagemaker.amazonaws.com", [
            iam.statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket",
                           "s3:GetBucketLocation"], [bucket_arn, pulumi.Output.concat(bucket_arn, "/*")]),
        ], self, description="SageMaker managed MLflow: the artifact store")
        server = aws.sagemaker.MlflowTrackingServer(
            f"{name}-tracking", tracking_server_name=f"{settings.prefix}-mlflow",
            artifact_store_uri=pulumi.Output.concat("s3://", data.artifacts_bucket.bucket, "/mlflow"),
            role_arn=role.arn, tracking_server_size=settings.sagemaker_mlflow_size,
            automatic_model_registration=False, opts=child)
        self.url = server.tracking_server_url  # the UI
        self.tracking_server_arn = server.arn
        # The API: the regional endpoint, SigV4-signed, the server named in a header (mmp.tracking.sigv4).
        self.api_url = server.arn.apply(sigv4_endpoint)

    # -- ECS Fargate + RDS + ALB --------------------------------------------------------
    def _fargate(self, name: str, settings: Settings, network: Network, data: DataStore, account: pulumi.Input[str],
                 admin_password: pulumi.Input[str] | None, project_root: Path,
                 docker_hub_rule: pulumi.Resource | None) -> None:
        child = pulumi.ResourceOptions(parent=self)
        tags = {"mmp:deployment": settings.prefix}
        region = settings.region
        pull: list[dict] = []
        if settings.mlflow_image:
            image: pulumi.Input[str] = settings.mlflow_image
        else:
            built = stack_image(f"{name}-server", "mlflow", settings, account=account,
                                artifacts_bucket=data.artifacts_bucket, project_root=project_root,
                                context_paths=IMAGE_CONTEXT, dockerfile=IMAGE_DOCKERFILE, parent=self)
            image = ImageReady(f"{name}-server-image", project=built.build_project.name,
                               repository=built.repository.name, repository_url=built.repository.repository_url,
                               tag=built.tag, region=region, opts=pulumi.ResourceOptions(
                                   parent=self, depends_on=[docker_hub_rule] if docker_hub_rule else [])).image
            pull = iam.ecr_statements(built.repository.arn)

        self.password_secret = aws.secretsmanager.Secret(
            f"{name}-admin-password", description="MLflow basic-auth admin password (mmp:mlflowAdminPassword)",
            recovery_window_in_days=0 if not settings.production else 7, tags=tags, opts=child)
        aws.secretsmanager.SecretVersion(f"{name}-admin-password", secret_id=self.password_secret.id,
                                         secret_string=admin_password, opts=child)

        subnets = aws.rds.SubnetGroup(f"{name}-db", subnet_ids=network.private_subnet_ids, tags=tags, opts=child)
        self.database = aws.rds.Instance(
            f"{name}-db", engine="postgres", engine_version="16", instance_class=settings.db_instance_class,
            allocated_storage=settings.db_storage_gb, max_allocated_storage=settings.db_storage_gb * 5,
            storage_type="gp3", storage_encrypted=True, db_name="mlflow", username="mlflow",
            manage_master_user_password=True, db_subnet_group_name=subnets.name,
            vpc_security_group_ids=[network.database_sg.id], publicly_accessible=False,
            multi_az=settings.db_multi_az, backup_retention_period=7 if settings.production else 1,
            deletion_protection=settings.production, skip_final_snapshot=not settings.production,
            final_snapshot_identifier=f"{settings.prefix}-mlflow-final" if settings.production else None,
            copy_tags_to_snapshot=True, auto_minor_version_upgrade=True, tags=tags, opts=child)
        db_secret_arn = self.database.master_user_secrets.apply(lambda s: s[0]["secret_arn"] if s else "")

        log_group = aws.cloudwatch.LogGroup(f"{name}-logs", name=f"/mmp/{settings.prefix}/mlflow",
                                            retention_in_days=settings.log_retention_days, tags=tags, opts=child)
        execution_role = iam.service_role(f"{name}-execution", "ecs-tasks.amazonaws.com", [
            *pull,
            iam.logs_statement(region, account, [log_group.name]),
            iam.statement(["secretsmanager:GetSecretValue"], [self.password_secret.arn, db_secret_arn]),
        ], self, description="ECS: pull, log, and inject the MLflow secrets")
        bucket_arn = data.artifacts_bucket.arn
        task_role = iam.service_role(f"{name}-task", "ecs-tasks.amazonaws.com", [
            iam.statement(["s3:ListBucket", "s3:GetBucketLocation"], [bucket_arn]),
            iam.statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                          [pulumi.Output.concat(bucket_arn, "/mlflow/*")]),
        ], self, description="MLflow server: its artifact store")

        container = pulumi.Output.all(
            image=image, log_group=log_group.name, host=self.database.address,
            bucket=data.artifacts_bucket.bucket, db_secret=db_secret_arn, admin_secret=self.password_secret.arn,
        ).apply(lambda a: json.dumps([{
            "name": "mlflow", "image": a["image"], "essential": True,
            "entryPoint": ["/bin/sh", "-c"], "command": [STARTUP],
            "portMappings": [{"containerPort": PORT, "protocol": "tcp"}],
            "environment": [
                {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"},
                {"name": "DB_HOST", "value": a["host"]}, {"name": "DB_NAME", "value": "mlflow"},
                {"name": "DB_USER", "value": "mlflow"},
                {"name": "MLFLOW_ADMIN_USERNAME", "value": settings.mlflow_username},
                {"name": "ARTIFACTS_DESTINATION", "value": f"s3://{a['bucket']}/mlflow"},
                {"name": "AWS_DEFAULT_REGION", "value": region},
            ],
            "secrets": [
                {"name": "DB_PASSWORD", "valueFrom": f"{a['db_secret']}:password::"},
                {"name": "MLFLOW_ADMIN_PASSWORD", "valueFrom": a["admin_secret"]},
            ],
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": a["log_group"], "awslogs-region": region, "awslogs-stream-prefix": "mlflow"}},
            "healthCheck": {"command": ["CMD-SHELL", f"python -c \"import urllib.request;urllib.request.urlopen('http://127.0.0.1:{PORT}/health')\""],
                            "interval": 30, "timeout": 5, "retries": 3, "startPeriod": 120},
        }]))
        task = aws.ecs.TaskDefinition(
            f"{name}-task", family=f"{settings.prefix}-mlflow", requires_compatibilities=["FARGATE"],
            network_mode="awsvpc", cpu=str(settings.mlflow_cpu), memory=str(settings.mlflow_memory),
            execution_role_arn=execution_role.arn, task_role_arn=task_role.arn, container_definitions=container,
            runtime_platform={"operating_system_family": "LINUX", "cpu_architecture": "X86_64"}, tags=tags,
            opts=child)
        self.cluster = aws.ecs.Cluster(f"{name}-cluster", tags=tags, opts=child)

        alb = aws.lb.LoadBalancer(f"{name}-alb", load_balancer_type="application", internal=False,
                                  security_groups=[network.alb_sg.id], subnets=network.public_subnet_ids,
                                  drop_invalid_header_fields=True, idle_timeout=REQUEST_TIMEOUT_S, tags=tags, opts=child)
        target = aws.lb.TargetGroup(f"{name}-tg", port=PORT, protocol="HTTP", target_type="ip",
                                    vpc_id=network.vpc_id, deregistration_delay=30, health_check={
                                        "path": "/health", "matcher": "200", "interval": 30,
                                        "healthy_threshold": 2, "unhealthy_threshold": 3}, tags=tags, opts=child)
        if settings.mlflow_certificate_arn:
            listener = aws.lb.Listener(f"{name}-https", load_balancer_arn=alb.arn, port=443, protocol="HTTPS",
                                       certificate_arn=settings.mlflow_certificate_arn,
                                       ssl_policy="ELBSecurityPolicy-TLS13-1-2-2021-06",
                                       default_actions=[{"type": "forward", "target_group_arn": target.arn}],
                                       opts=child)
            # The certificate covers mlflowDomainName, never *.elb.amazonaws.com: the URL must be that name.
            self.url = pulumi.Output.from_input(f"https://{settings.mlflow_domain_name}")
            if settings.mlflow_hosted_zone_id:
                aws.route53.Record(f"{name}-dns", zone_id=settings.mlflow_hosted_zone_id,
                                   name=settings.mlflow_domain_name, type="A", aliases=[{
                                       "name": alb.dns_name, "zone_id": alb.zone_id,
                                       "evaluate_target_health": False}], opts=child)
        else:
            listener = aws.lb.Listener(f"{name}-http", load_balancer_arn=alb.arn, port=80, protocol="HTTP",
                                       default_actions=[{"type": "forward", "target_group_arn": target.arn}],
                                       opts=child)
            self.url = pulumi.Output.concat("http://", alb.dns_name)
        self.load_balancer_dns_name = alb.dns_name
        self.api_url = self.url
        # Without a NAT gateway the task needs a public IP to pull its image (its group still admits only the ALB).
        aws.ecs.Service(
            f"{name}-service", cluster=self.cluster.arn, task_definition=task.arn, desired_count=1,
            launch_type="FARGATE", health_check_grace_period_seconds=180,
            deployment_minimum_healthy_percent=0, deployment_maximum_percent=100,  # one writer at a time
            network_configuration={"subnets": network.task_subnet_ids, "security_groups": [network.mlflow_sg.id],
                                   "assign_public_ip": network.task_public_ip},
            load_balancers=[{"target_group_arn": target.arn, "container_name": "mlflow", "container_port": PORT}],
            tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[listener]))
