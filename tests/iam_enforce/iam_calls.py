"""Every AWS call a code path makes, judged against the policy of the role that makes it in production.

Why: moto answers every call whatever the caller's IAM policy, so a role that lacks an
action (or grants it on the wrong ARN, or under a condition the call does not meet)
passes every moto test and fails in AWS. This module closes that gap:

1. `install()` wraps botocore's `BaseClient._make_api_call` (every boto3 client, so every
   `mmp.aws.client()`), in this process and, through `sitecustomize.py` beside this file,
   in subprocesses that put this folder on PYTHONPATH and inherit `MMP_IAM_STATE`.
2. The code path is found on the Python stack (`ENTRY_POINTS`: innermost entry function
   wins); calls outside every entry point are the test's own set-up and pass unchecked.
3. `requests_for()` maps the call to the IAM actions it needs, their resource ARNs and the
   condition keys the policies use (`OPERATIONS`; an unmapped operation is an error).
4. `allowed()` evaluates each against the role's policy as the Pulumi program renders it
   (tests/conftest.py renders it once per session): moto's IAM statement evaluator matches
   actions and resources; the condition operators moto lacks (StringLike, Arn*, negations,
   a missing key) are evaluated here as IAM documents them.
5. A refused call raises AccessDenied to the code (what AWS would answer) and is recorded;
   the test then fails naming the code path, the role and the action.
6. S3's rule for missing keys: GetObject/HeadObject of a missing key answers 404 only with
   s3:ListBucket on the bucket, else 403 (AWS: GetObject API reference, "Permissions").
   ListBucket granted only under an s3:prefix condition does not count: the object request
   carries no s3:prefix key.

Resource names: the rendered policy names the stack's resources (`STACK_TOKENS` turns them
into neutral tokens), a test names its own; `bindings` (test name -> token) join the two.
Stdlib + botocore only at import: it runs inside every hooked subprocess.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

STATE_ENV = "MMP_IAM_STATE"  # path of the JSON state: policies, bindings, the call log
# "code path=role": a process a test starts to stand for a container (e.g. horovodrun's ranks of a
# SageMaker job) makes every call as that role; without it mmp.runtime.rank's calls are the DLAMI host's.
AS_ENV = "MMP_IAM_AS"

# (file path suffix, function name) -> (code path, role policy name in the rendered stack)
ENTRY_POINTS: dict[tuple[str, str], tuple[str, str]] = {
    ("mmp/pipeline/aws_stages.py", "prepare"): ("Prepare", "pipeline-stages"),
    ("mmp/pipeline/aws_stages.py", "launch"): ("Launch", "pipeline-stages"),
    ("mmp/pipeline/aws_stages.py", "conclude"): ("Conclude", "pipeline-stages"),
    ("mmp/backends/dlami_janitor.py", "handler"): ("janitor", "pipeline-stages"),
    ("mmp/backends/dlami_janitor.py", "sweep"): ("janitor", "pipeline-stages"),
    ("mmp/webhook/aws_lambda.py", "lambda_handler"): ("webhook", "webhook-lambda"),
    ("mmp/webhook/codecommit_lambda.py", "lambda_handler"): ("codecommit trigger", "codecommit-trigger"),
    ("mmp/pipeline/aws_runner.py", "main"): ("runner task", "pipeline-runner-task"),
    ("mmp/pipeline/aws_runner.py", "train"): ("runner task: train", "pipeline-runner-task"),
    ("mmp/pipeline/aws_runner.py", "study"): ("runner task: study", "pipeline-runner-task"),
    ("mmp/pipeline/aws_runner.py", "promote"): ("runner task: promote", "pipeline-runner-task"),
    ("mmp/runtime/sagemaker_entrypoint.py", "main"): ("SageMaker training container", "pipeline-sagemaker"),
    ("mmp/runtime/rank.py", "main"): ("DLAMI training container (rank)", "dlami-host"),
    # The kubernetes launcher pod, as the training service account's Pod Identity role (mmp.infra.kubernetes);
    # its ranks' calls are that role's through MMP_IAM_AS (tests/kubernetes/test_launcher_aws.py).
    ("mmp/runtime/kubernetes_launcher.py", "main"): ("Kubernetes training pod (launcher)", "kubernetes-training"),
    # The stand-in for Step Functions' createTrainingJob.sync integration (tests/infra/pipeline_stack.py).
    ("tests/infra/pipeline_stack.py", "sagemaker"): ("state machine: createTrainingJob.sync", "pipeline-sfn"),
}

# The rendered stack's names (tests/infra/conftest.py mocks) -> neutral tokens; longest first.
STACK_TOKENS = {
    "data-artifacts-a1b2c3d": "ARTIFACTS",
    "data-datasets-a1b2c3d": "DATASETS",
    "secret:pipeline-github-token-a1b2c3d-AbCdEf": "secret:GITHUB_TOKEN",
    "secret:mlflow-admin-password-a1b2c3d-AbCdEf": "secret:MLFLOW_PASSWORD",
    "secret:dlami-ssh-key-a1b2c3d-AbCdEf": "secret:SSH_KEY",
    "secret:webhook-secret-a1b2c3d-AbCdEf": "secret:WEBHOOK_SECRET",
    "secret:pipeline-gitlab-token-a1b2c3d-AbCdEf": "secret:GITLAB_TOKEN",
    "secret:webhook-gitlab-secret-a1b2c3d-AbCdEf": "secret:GITLAB_WEBHOOK_SECRET",
    "pipeline-notify-a1b2c3d": "NOTIFY_TOPIC",
    "table/webhook-deliveries-a1b2c3d": "table/DELIVERIES",
    "repository/acme-ml-dev-training": "repository/TRAINING_IMAGES",
    "repository/acme-ml-dev-runner": "repository/RUNNER_IMAGES",
    "repository/acme-ml-dev-hub/": "repository/DOCKER_HUB_CACHE/",
    "training-job/mmp-acme-ml-dev": "training-job/JOBS",
    "stateMachine:acme-ml-dev-pipeline": "stateMachine:PIPELINE",
    "execution:acme-ml-dev-pipeline": "execution:PIPELINE",
    "launch-template/dlami-template-id": "launch-template/LAUNCH_TEMPLATE",
    "role/pipeline-sagemaker-a1b2c3d": "role/SAGEMAKER_ROLE",
}


@dataclass
class Request:
    """One IAM authorisation a call needs."""

    action: str
    resource: str
    context: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    code_path: str
    role: str
    operation: str  # service.Operation
    action: str
    resource: str
    allowed: bool
    note: str = ""


class Unmapped(LookupError):
    """An operation with no IAM mapping yet: add it to OPERATIONS."""


# -- mapping a call to IAM -------------------------------------------------------------------------

def _s3(bucket: str, key: str | None = None) -> str:
    return f"arn:aws:s3:::{bucket}" + (f"/{key}" if key is not None else "")


def _secret(region: str, account: str, secret_id: str) -> str:
    return secret_id if secret_id.startswith("arn:") else f"arn:aws:secretsmanager:{region}:{account}:secret:{secret_id}"


def _job(region: str, account: str, name: str) -> str:
    return f"arn:aws:sagemaker:{region}:{account}:training-job/{name.lower()}"


def _ec2(region: str, account: str, kind: str, ident: str = "*") -> str:
    return f"arn:aws:ec2:{region}:{account}:{kind}/{ident}"


def _create_training_job(r: str, a: str, p: dict) -> list[Request]:
    out = [Request("sagemaker:CreateTrainingJob", _job(r, a, p["TrainingJobName"]))]
    if p.get("Tags"):
        out.append(Request("sagemaker:AddTags", _job(r, a, p["TrainingJobName"])))
    out.append(Request("iam:PassRole", p["RoleArn"], {"iam:PassedToService": "sagemaker.amazonaws.com"}))
    return out


def _run_instances(r: str, a: str, p: dict) -> list[Request]:
    template = (p.get("LaunchTemplate") or {}).get("LaunchTemplateId")
    context = {"ec2:LaunchTemplate": _ec2(r, a, "launch-template", template)} if template else {}
    out = [Request("ec2:RunInstances", _ec2(r, a, "instance"), context)]
    if template:
        out.append(Request("ec2:RunInstances", _ec2(r, a, "launch-template", template), context))
    for spec in p.get("TagSpecifications") or []:
        out.append(Request("ec2:CreateTags", _ec2(r, a, spec["ResourceType"]), {"ec2:CreateAction": "RunInstances"}))
    if p.get("ImageId"):
        out.append(Request("ec2:RunInstances", f"arn:aws:ec2:{r}::image/{p['ImageId']}", context))
    return out


def _transact_write(r: str, a: str, p: dict) -> list[Request]:
    """IAM authorises each item of a transaction as its own action (DynamoDB: TransactWriteItems)."""
    actions = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem", "ConditionCheck": "ConditionCheckItem"}
    return [Request(f"dynamodb:{actions[kind]}", f"arn:aws:dynamodb:{r}:{a}:table/{body['TableName']}")
            for item in p["TransactItems"] for kind, body in item.items()]


def _codecommit(r: str, a: str, name: str) -> str:
    return f"arn:aws:codecommit:{r}:{a}:{name}"


# UpdateComment names only the comment, yet IAM authorises it on the comment's repository (the
# Service Authorization Reference lists `repository*` for it): the CodeCommit stand-in
# (tests/codecommit_standin.py) records here which repository each comment it made lives in.
COMMENT_REPOSITORIES: dict[str, str] = {}


def _update_comment(r: str, a: str, p: dict) -> list[Request]:
    name = COMMENT_REPOSITORIES.get(p["commentId"])
    if name is None:
        raise Unmapped(f"codecommit.UpdateComment of comment {p['commentId']!r}: its repository is unknown "
                       "(the stand-in records it when it posts the comment)")
    return [Request("codecommit:UpdateComment", _codecommit(r, a, name))]


def _log_group(r: str, a: str, p: dict) -> str:
    return f"arn:aws:logs:{r}:{a}:log-group:{p['logGroupName']}:*"


OPERATIONS: dict[str, Callable[[str, str, dict], list[Request]]] = {
    "s3.PutObject": lambda r, a, p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "s3.CreateMultipartUpload": lambda r, a, p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "s3.UploadPart": lambda r, a, p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "s3.CompleteMultipartUpload": lambda r, a, p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "s3.AbortMultipartUpload": lambda r, a, p: [Request("s3:AbortMultipartUpload", _s3(p["Bucket"], p["Key"]))],
    "s3.GetObject": lambda r, a, p: [Request("s3:GetObject", _s3(p["Bucket"], p["Key"]))],
    "s3.HeadObject": lambda r, a, p: [Request("s3:GetObject", _s3(p["Bucket"], p["Key"]))],
    "s3.DeleteObject": lambda r, a, p: [Request("s3:DeleteObject", _s3(p["Bucket"], p["Key"]))],
    "s3.ListObjectsV2": lambda r, a, p: [Request("s3:ListBucket", _s3(p["Bucket"]), {"s3:prefix": p.get("Prefix", "")})],
    "s3.ListObjects": lambda r, a, p: [Request("s3:ListBucket", _s3(p["Bucket"]), {"s3:prefix": p.get("Prefix", "")})],
    "s3.GetBucketLocation": lambda r, a, p: [Request("s3:GetBucketLocation", _s3(p["Bucket"]))],
    "secretsmanager.GetSecretValue": lambda r, a, p: [
        Request("secretsmanager:GetSecretValue", _secret(r, a, p["SecretId"]))],
    "sns.Publish": lambda r, a, p: [Request("sns:Publish", p["TopicArn"])],
    "dynamodb.PutItem": lambda r, a, p: [Request("dynamodb:PutItem", f"arn:aws:dynamodb:{r}:{a}:table/{p['TableName']}")],
    "dynamodb.GetItem": lambda r, a, p: [Request("dynamodb:GetItem", f"arn:aws:dynamodb:{r}:{a}:table/{p['TableName']}")],
    "dynamodb.DeleteItem": lambda r, a, p: [
        Request("dynamodb:DeleteItem", f"arn:aws:dynamodb:{r}:{a}:table/{p['TableName']}")],
    "dynamodb.TransactWriteItems": _transact_write,
    "stepfunctions.StartExecution": lambda r, a, p: [Request("states:StartExecution", p["stateMachineArn"])],
    "stepfunctions.GetExecutionHistory": lambda r, a, p: [Request("states:GetExecutionHistory", p["executionArn"])],
    "ecr.DescribeImages": lambda r, a, p: [
        Request("ecr:DescribeImages", f"arn:aws:ecr:{r}:{p.get('registryId') or a}:repository/{p['repositoryName']}")],
    "ecr.GetAuthorizationToken": lambda r, a, p: [Request("ecr:GetAuthorizationToken", "*")],
    "sagemaker.CreateTrainingJob": _create_training_job,
    "sagemaker.DescribeTrainingJob": lambda r, a, p: [
        Request("sagemaker:DescribeTrainingJob", _job(r, a, p["TrainingJobName"]))],
    "sagemaker.StopTrainingJob": lambda r, a, p: [Request("sagemaker:StopTrainingJob", _job(r, a, p["TrainingJobName"]))],
    "sagemaker.UpdateTrainingJob": lambda r, a, p: [  # a study's end: KeepAlivePeriodInSeconds 0
        Request("sagemaker:UpdateTrainingJob", _job(r, a, p["TrainingJobName"]))],
    "logs.GetLogEvents": lambda r, a, p: [Request("logs:GetLogEvents", _log_group(r, a, p))],
    "logs.DescribeLogStreams": lambda r, a, p: [Request("logs:DescribeLogStreams", _log_group(r, a, p))],
    "logs.FilterLogEvents": lambda r, a, p: [Request("logs:FilterLogEvents", _log_group(r, a, p))],
    "ec2.DescribeInstances": lambda r, a, p: [Request("ec2:DescribeInstances", "*")],
    "ec2.DescribeInstanceTypes": lambda r, a, p: [Request("ec2:DescribeInstanceTypes", "*")],
    "ec2.DescribePlacementGroups": lambda r, a, p: [Request("ec2:DescribePlacementGroups", "*")],
    "ec2.RunInstances": _run_instances,
    "ec2.TerminateInstances": lambda r, a, p: [  # the tag condition is filled in from EC2 (`_instance_tags`)
        Request("ec2:TerminateInstances", _ec2(r, a, "instance", i)) for i in p["InstanceIds"]],
    "ssm.GetParameter": lambda r, a, p: [
        Request("ssm:GetParameter", f"arn:aws:ssm:{r}:{a}:parameter/{p['Name'].lstrip('/')}")],
    "sts.GetCallerIdentity": lambda r, a, p: [],  # needs no permission (AWS: GetCallerIdentity)
    **{f"codecommit.{op}": (lambda op: lambda r, a, p: [
        Request(f"codecommit:{op}", _codecommit(r, a, p["repositoryName"]))])(op)
       for op in ("GetFile", "GetFolder", "GetBlob", "GetCommit", "GetBranch", "GetRepository", "GetDifferences",
                  "PostCommentForComparedCommit", "GetCommentsForComparedCommit")},
    "codecommit.UpdateComment": _update_comment,
}


def requests_for(service: str, operation: str, params: dict, region: str, account: str) -> list[Request]:
    mapper = OPERATIONS.get(f"{service}.{operation}")
    if mapper is None:
        raise Unmapped(f"no IAM mapping for {service}.{operation}: add it to tests/iam_enforce/iam_calls.py OPERATIONS")
    return mapper(region, account, params)


# -- evaluating a request against a policy --------------------------------------------------------

def _like(pattern: str, value: str) -> bool:
    """IAM's wildcard match: * any run, ? one character, case-sensitive (ARNs and values)."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), value, re.S) is not None


def _condition_holds(operator: str, key: str, expected: Any, context: dict[str, str]) -> bool:
    """One condition key: AWS's rules, a missing key fails every operator but the negated and IfExists ones."""
    expected = expected if isinstance(expected, list) else [expected]
    if_exists = operator.endswith("IfExists")
    op = operator.removesuffix("IfExists")
    if op == "Null":
        return (key not in context) == (str(expected[0]).lower() == "true")
    if key not in context:
        return if_exists or op.startswith(("StringNot", "ArnNot"))
    value = context[key]
    tests = {
        "StringEquals": lambda e: value == e, "StringNotEquals": lambda e: value == e,
        "StringEqualsIgnoreCase": lambda e: value.lower() == e.lower(),
        "StringLike": lambda e: _like(e, value), "StringNotLike": lambda e: _like(e, value),
        "ArnEquals": lambda e: _like(e, value), "ArnLike": lambda e: _like(e, value),
        "ArnNotEquals": lambda e: _like(e, value), "ArnNotLike": lambda e: _like(e, value),
        "Bool": lambda e: value.lower() == str(e).lower(),
    }
    if op not in tests:
        raise ValueError(f"condition operator {operator} is not modelled: add it to _condition_holds")
    hit = any(tests[op](str(e)) for e in expected)
    return not hit if "Not" in op else hit


def _statement_matches(statement: dict, request: Request) -> bool:
    from moto.iam.access_control import IAMPolicyStatement, PermissionResult

    class _Statement(IAMPolicyStatement):
        @staticmethod
        def _match(pattern: str, string: str):  # moto's match leaves regex characters (".", "?") unescaped
            return _like(pattern, string) or None

    bare = {k: v for k, v in statement.items() if k != "Condition"}  # moto evaluates StringEquals only
    if _Statement(bare).is_action_permitted(request.action, request.resource) == PermissionResult.NEUTRAL:
        return False
    return all(_condition_holds(op, key, expected, request.context)
               for op, keys in (statement.get("Condition") or {}).items() for key, expected in keys.items())


def allowed(policy: dict, request: Request) -> bool:
    """IAM's rule within one identity policy: an explicit Deny wins, else some Allow must match."""
    statements = policy["Statement"] if isinstance(policy["Statement"], list) else [policy["Statement"]]
    matching = [s for s in statements if _statement_matches(s, request)]
    return bool(matching) and all(s["Effect"] == "Allow" for s in matching)


# -- the state shared with subprocesses ------------------------------------------------------------

def tokenise_policy(doc: dict) -> dict:
    text = json.dumps(doc)
    for name in sorted(STACK_TOKENS, key=len, reverse=True):
        text = text.replace(name, STACK_TOKENS[name])
    return json.loads(text)


def bind(resource: str, bindings: dict[str, str]) -> str:
    for name in sorted(bindings, key=len, reverse=True):
        resource = resource.replace(name, bindings[name])
    return resource


def code_path_on_stack() -> tuple[str, str] | None:
    """The innermost entry point on the current thread's stack: (code path, role)."""
    if os.environ.get(AS_ENV):
        path, _, role = os.environ[AS_ENV].rpartition("=")
        return path, role
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename.replace(os.sep, "/")
        for (suffix, function), found in ENTRY_POINTS.items():
            if frame.f_code.co_name == function and filename.endswith(suffix):
                return found
        frame = frame.f_back
    return getattr(threading.current_thread(), "_mmp_iam_where", None)  # a thread the code path started


_lock = threading.Lock()
_inside = threading.local()  # the check's own reads (instance tags) are not the code path's calls


def _state() -> dict | None:
    path = os.environ.get(STATE_ENV)
    if not path or not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def record(state: dict, call: Call) -> None:
    with _lock, open(state["log"], "a") as fh:
        fh.write(json.dumps(asdict(call)) + "\n")


def read_calls(log_path: str) -> list[Call]:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as fh:
        return [Call(**json.loads(line)) for line in fh if line.strip()]


def _denied(operation: str, message: str, status: int = 403):
    from botocore.exceptions import ClientError

    code = "403" if operation == "HeadObject" else "AccessDenied"
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def _instance_tags(client: Any, instance_ids: list[str]) -> dict[str, dict[str, str]]:
    """The tags of instances, read with the test's own credentials (outside the check)."""
    import boto3

    ec2 = boto3.client("ec2", region_name=client.meta.region_name, endpoint_url=client.meta.endpoint_url)
    found = {}
    for reservation in ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]:
        for inst in reservation["Instances"]:
            found[inst["InstanceId"]] = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    return found


def check(client: Any, operation: str, params: dict, state: dict, where: tuple[str, str]) -> list[Request]:
    """Judge one call; record it; raise AccessDenied (as AWS would) when the role lacks a request."""
    code_path, role = where
    service = client.meta.service_model.service_name
    region = client.meta.region_name
    account = state.get("account", "123456789012")
    name = f"{service}.{operation}"
    policy = state["policies"].get(role)
    try:
        wanted = requests_for(service, operation, params, region, account)
    except Unmapped as exc:
        record(state, Call(code_path, role, name, "?", "?", False, str(exc)))
        raise
    if operation == "TerminateInstances":
        tags = _instance_tags(client, list(params["InstanceIds"]))
        for req in wanted:
            for key, value in tags.get(req.resource.rsplit("/", 1)[-1], {}).items():
                req.context[f"aws:ResourceTag/{key}"] = value
    for req in wanted:
        req.resource = bind(req.resource, state["bindings"])
        req.context = {key: bind(value, state["bindings"]) for key, value in req.context.items()}
        ok = policy is not None and allowed(policy, req)
        record(state, Call(code_path, role, name, req.action, req.resource, ok,
                           "" if policy is not None else f"no role policy named {role} in the rendered stack"))
        if not ok:
            raise _denied(operation, f"{code_path} as role {role} is not authorized to perform {req.action} "
                                     f"on {req.resource}")
    return wanted


# -- shell tools: CodeBuild's `aws` CLI and docker (the buildspec tests log their stand-ins' argv) --

ECR_PULL = ("ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
ECR_PUSH = ("ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage")


def cli_requests(line: str, region: str, account: str) -> list[Request]:
    """The IAM requests of one logged command line (`aws ...` or `docker ...`); [] for none."""
    words = line.split()
    if words[:3] == ["aws", "ecr", "get-login-password"]:
        return [Request("ecr:GetAuthorizationToken", "*")]
    if words[:3] == ["aws", "ecr", "describe-images"]:
        name = words[words.index("--repository-name") + 1]
        return [Request("ecr:DescribeImages", f"arn:aws:ecr:{region}:{account}:repository/{name}")]
    if words[:3] == ["aws", "s3", "cp"]:
        sources = [w for w in words[3:] if w.startswith("s3://")]
        return [Request("s3:GetObject", "arn:aws:s3:::" + sources[0][len("s3://"):])] if sources else []
    if words[:1] == ["docker"] and words[1:2] != ["login"]:
        repos = {w.split(".amazonaws.com/", 1)[1].split(":")[0].split("@")[0].split(",")[0]
                 for w in words if ".dkr.ecr." in w and ".amazonaws.com/" in w}
        pushing = "--push" in words or words[1:2] == ["push"]
        actions = ECR_PULL + (ECR_PUSH if pushing else ())
        return [Request(a, f"arn:aws:ecr:{region}:{account}:repository/{repo}") for repo in sorted(repos) for a in actions]
    return []


def check_cli_log(lines: list[str], where: tuple[str, str], region: str) -> None:
    """Judge and record the calls a build made through its shell tools (no raise: the build ran)."""
    state = _state()
    if state is None:
        return
    code_path, role = where
    policy = state["policies"].get(role)
    for line in lines:
        for req in cli_requests(line, region, state.get("account", "123456789012")):
            req.resource = bind(req.resource, state["bindings"])
            record(state, Call(code_path, role, " ".join(line.split()[:3]), req.action, req.resource,
                               policy is not None and allowed(policy, req)))


def install() -> None:
    """Wrap every botocore client call in this process (idempotent)."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    if getattr(BaseClient._make_api_call, "_mmp_iam", False):
        return
    original = BaseClient._make_api_call

    def _make_api_call(self, operation_name, api_params):
        state = None if getattr(_inside, "active", False) else _state()
        where = code_path_on_stack() if state else None
        if where is None:
            return original(self, operation_name, api_params)
        _inside.active = True
        try:
            check(self, operation_name, api_params, state, where)
        finally:
            _inside.active = False
        try:
            return original(self, operation_name, api_params)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if operation_name in ("GetObject", "HeadObject") and code in ("404", "NoSuchKey", "NotFound"):
                listing = Request("s3:ListBucket", bind(_s3(api_params["Bucket"]), state["bindings"]))
                if not allowed(state["policies"].get(where[1]) or {"Statement": []}, listing):
                    raise _denied(operation_name, "Access Denied (a missing key, and no s3:ListBucket "
                                                  "on the bucket)") from None
            raise

    # A thread (a pool's worker: s3transfer, a study's parallel trials) acts for the code path that made it.
    thread_init = threading.Thread.__init__

    def __init__(self, *args, **kwargs):
        thread_init(self, *args, **kwargs)
        self._mmp_iam_where = code_path_on_stack()

    threading.Thread.__init__ = __init__
    _make_api_call._mmp_iam = True  # type: ignore[attr-defined]
    BaseClient._make_api_call = _make_api_call

