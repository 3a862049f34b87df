"""Run the whole Pulumi program (`__main__.py`) under mocks, no CLI or plugins.

`run_stack("dev", {...})` sets the stack's config, runs the program in a fresh
module namespace with `preview=False` (with preview=True pulumi never resolves
the values these tests look at), waits for every registration, and returns each
resource's type, name, resolved inputs and parent, plus the stack's exports with
whether each is secret.
"""

from __future__ import annotations

import json
import runpy
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.stack import _sync_await, run_pulumi_func

from ..conftest import ACCOUNT, REGION  # the suite's region, not us-east-1

ROOT = Path(__file__).resolve().parents[2]

DEV_CONFIG = {
    "aws:region": REGION,
    "mmp:deploymentName": "acme-ml",
    "mmp:notifyEmail": "ml-team@example.com",
    "mmp:githubToken": "ghp_TESTTOKENthatmustnotleak0000000000",
    "mmp:webhookSecret": "whsec-thatmustnotleak-1234567890abcdef",
    "mmp:mlflowAdminPassword": "mlflow-admin-thatmustnotleak",
}
SECRETS = ["mmp:githubToken", "mmp:webhookSecret", "mmp:mlflowAdminPassword", "mmp:sshPrivateKey", "mmp:gitlabToken",
           "mmp:gitlabWebhookSecret"]
PROD_CONFIG = {
    **DEV_CONFIG,
    "mmp:dbMultiAz": "true",
    "mmp:dbInstanceClass": "db.t4g.small",
    "mmp:sshCidrs": json.dumps(["203.0.113.0/24"]),
    "mmp:mlflowCertificateArn": f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/abc",
    "mmp:mlflowDomainName": "mlflow.acme.example",
    "mmp:datasets": json.dumps({"cifar": {"s3": "s3://shared-data/cifar/"}}),
}


@dataclass
class Res:
    typ: str
    name: str
    inputs: dict
    outputs: dict
    parent: str | None = None
    urn: str = ""
    secret_inputs: set[str] = field(default_factory=set)
    dependencies: set[str] = field(default_factory=set)  # URNs named in depends_on


@dataclass
class StackRun:
    resources: list[Res] = field(default_factory=list)
    exports: dict[str, Any] = field(default_factory=dict)
    secret_exports: set[str] = field(default_factory=set)
    namespace: dict = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)  # urn → type
    registered_outputs: dict[str, set[str]] = field(default_factory=dict)

    def of_type(self, typ: str) -> list[Res]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str, name_part: str = "") -> Res:
        found = [r for r in self.of_type(typ) if name_part in r.name]
        assert len(found) == 1, f"{typ} {name_part!r}: {[r.name for r in found]}"
        return found[0]

    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.resources:
            out[r.typ] = out.get(r.typ, 0) + 1
        return out


def _service(typ: str) -> str:
    module = typ.split(":")[1].split("/")[0]
    return {"lambda": "lambda", "sfn": "states", "apigatewayv2": "apigateway", "cloudwatch": "logs"}.get(module, module)


class Mocks(pulumi.runtime.Mocks):
    """Echo the inputs, and make up what AWS would add (ids, ARNs, URLs, names)."""

    def __init__(self, run: StackRun):
        self.run = run

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        inputs = dict(args.inputs)
        out = dict(inputs)
        name = inputs.get("name") or f"{args.name}-a1b2c3d"
        arn_name = name
        typ = args.typ
        out.setdefault("name", name)
        out["arn"] = f"arn:aws:{_service(typ)}:{REGION}:{ACCOUNT}:{typ.split(':')[-1].lower()}/{arn_name}"
        if typ == "aws:s3/bucket:Bucket":
            out["bucket"] = name
            out["arn"] = f"arn:aws:s3:::{name}"
        elif typ == "aws:lambda/function:Function":
            out["arn"] = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
            out["invokeArn"] = f"arn:aws:apigateway:{REGION}:lambda:path/2015-03-31/functions/{out['arn']}/invocations"
        elif typ == "aws:sfn/stateMachine:StateMachine":
            out["arn"] = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:{name}"
        elif typ == "aws:codebuild/project:Project":
            out["arn"] = f"arn:aws:codebuild:{REGION}:{ACCOUNT}:project/{name}"
        elif typ == "aws:ecr/repository:Repository":
            out["repositoryUrl"] = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{name}"
            out["arn"] = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{name}"
        elif typ == "aws:rds/instance:Instance":
            out["address"] = f"{name}.abc.{REGION}.rds.amazonaws.com"
            out["masterUserSecrets"] = [{"secretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rds!db-{name}",
                                         "secretStatus": "active", "kmsKeyId": "aws/secretsmanager"}]
        elif typ == "aws:fsx/lustreFileSystem:LustreFileSystem":
            out["dnsName"] = f"fs-0123.fsx.{REGION}.amazonaws.com"
            out["mountName"] = "abcdefgh"
        elif typ == "aws:apigatewayv2/api:Api":
            out["apiEndpoint"] = f"https://abc123.execute-api.{REGION}.amazonaws.com"
            out["executionArn"] = f"arn:aws:execute-api:{REGION}:{ACCOUNT}:abc123"
        elif typ == "aws:lb/loadBalancer:LoadBalancer":
            out["dnsName"] = f"{name}.{REGION}.elb.amazonaws.com"
            out["zoneId"] = "Z32O12XQLNTSW2"
        elif typ == "aws:iam/role:Role":
            out["arn"] = f"arn:aws:iam::{ACCOUNT}:role/{name}"  # IAM ARNs have no region
        elif typ == "aws:ec2/eip:Eip":
            out["publicIp"] = "198.51.100.77"
        elif typ == "aws:sagemaker/mlflowTrackingServer:MlflowTrackingServer":
            out["trackingServerUrl"] = f"https://t-abc.{REGION}.experiments.sagemaker.aws"
            out["arn"] = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/{inputs['trackingServerName']}"
        elif typ == "aws:secretsmanager/secret:Secret":
            out["arn"] = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{name}-AbCdEf"
        elif typ == "aws:sns/topic:Topic":
            out["arn"] = f"arn:aws:sns:{REGION}:{ACCOUNT}:{name}"
        elif typ == "aws:cloudwatch/logGroup:LogGroup":
            out["arn"] = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}"
        elif typ == "aws:ec2/keyPair:KeyPair":
            out["keyName"] = name
        elif typ == "aws:dynamodb/table:Table":
            out["arn"] = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}"
        self.run.resources.append(Res(typ, args.name, inputs, out))
        return [f"{args.name}-id", out]

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:user/test", "userId": "AIDA", "id": ACCOUNT}
        raise AssertionError(f"the program made an unexpected call: {args.token}")


SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


class Monitor(MockMonitor):
    """The mock monitor, also noting each resource's parent, which inputs arrive as
    secrets, and the outputs each component registers."""

    def __init__(self, mocks: Mocks):
        super().__init__(mocks)
        self.run = mocks.run
        self.lock = threading.Lock()

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type == "pulumi:pulumi:Stack":
            return response
        with self.lock:
            res = next(r for r in self.run.resources if r.typ == request.type and r.name == request.name)
            res.urn = response.urn
            res.parent = request.parent or None
            res.dependencies = set(request.dependencies)
            res.secret_inputs = {k for k, v in request.object.fields.items()
                                 if v.HasField("struct_value") and SECRET_SIG_KEY in v.struct_value.fields
                                 and v.struct_value.fields[SECRET_SIG_KEY].string_value == SECRET_SIG}
            if not request.custom:
                self.run.components[response.urn] = request.type
        return response

    def RegisterResourceOutputs(self, request):
        self.run.registered_outputs[request.urn] = set(request.outputs.fields)
        return super().RegisterResourceOutputs(request)


def run_stack(stack: str, config: dict[str, str], secret_keys: list[str] | None = None) -> StackRun:
    run = StackRun()
    runtime_settings.set_root_resource(None)
    mocks = Mocks(run)
    pulumi.runtime.set_mocks(mocks, project="mmp", stack=stack, preview=False, monitor=Monitor(mocks))
    keys = [k for k in (SECRETS if secret_keys is None else secret_keys) if k in config]
    pulumi.runtime.set_all_config(dict(config), keys)
    root = runtime_settings.get_root_resource()

    def program():
        run.namespace = runpy.run_path(str(ROOT / "__main__.py"), run_name="__pulumi_main__")

    _sync_await(run_pulumi_func(program))
    for name, value in root.outputs.items():
        output = pulumi.Output.from_input(value)
        run.exports[name] = _sync_await(output.future())
        if _sync_await(output.is_secret()):
            run.secret_exports.add(name)
    return run


@pytest.fixture(scope="module")
def dev() -> StackRun:
    return run_stack("dev", DEV_CONFIG)


@pytest.fixture(scope="module")
def prod() -> StackRun:
    return run_stack("prod", PROD_CONFIG)


@pytest.fixture(scope="session")
def h():
    """This module (constants and run_stack): importlib mode cannot import conftest by name."""
    return sys.modules[__name__]
