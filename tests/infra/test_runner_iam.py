"""The roles the runner and the `.sync` integrations need, linted by parliament (an IAM linter)
and checked for the scoping issue 14 asks: RunTask on the runner's task definition only,
PassRole for exactly its two roles, EC2 launches only through the stack's launch template."""

from __future__ import annotations

import json

import pytest

from .iam_lint import parliament

REGION = "eu-west-1"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def dlami_stack(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true",
                               "mmp:sshPublicKey": "ssh-ed25519 AAAA test", "mmp:sshPrivateKey": SSH_KEY})


def _policies(run) -> dict[str, dict]:
    # The Pulumi mocks give every ARN a region; IAM's have none (arn:aws:iam::ACCOUNT:role/NAME).
    return {p.name: json.loads(p.inputs["policy"].replace(f"arn:aws:iam:{REGION}:", "arn:aws:iam::"))
            for p in run.of_type("aws:iam/rolePolicy:RolePolicy")}


def _allowing(doc: dict, action: str) -> list[dict]:
    return [s for s in doc["Statement"] if action in s["Action"]]


MINE = ("pipeline-sfn", "pipeline-stages", "pipeline-runner-build", "pipeline-runner-execution", "pipeline-runner-task")


def test_parliament_finds_nothing_in_the_runner_and_state_machine_roles(dlami_stack):
    linter = parliament()
    policies = _policies(dlami_stack)
    assert set(MINE) <= set(policies)
    for name in MINE:
        findings = linter.analyze_policy_string(json.dumps(policies[name])).findings
        assert not findings, (name, [(f.issue, f.detail) for f in findings])


def test_the_state_machine_runs_only_the_runner_and_passes_only_its_two_roles(dlami_stack):
    sfn = _policies(dlami_stack)["pipeline-sfn"]
    (run_task,) = _allowing(sfn, "ecs:RunTask")
    assert run_task["Resource"] == [f"arn:aws:ecs:eu-west-1:123456789012:task-definition/acme-ml-dev-runner:*"]
    assert "ecs:cluster" in run_task["Condition"]["ArnEquals"]
    passes = {r: s.get("Condition") for s in _allowing(sfn, "iam:PassRole") for r in s["Resource"]}
    runner_roles = [r for r in passes if "runner" in r]
    assert len(runner_roles) == 2 and all(passes[r] == {"StringEquals": {
        "iam:PassedToService": "ecs-tasks.amazonaws.com"}} for r in runner_roles)
    rules = {r.rsplit("/", 1)[1] for s in _allowing(sfn, "events:PutRule") for r in s["Resource"]}
    assert {"StepFunctionsGetEventsForECSTaskRule", "StepFunctionsGetEventsForSageMakerTrainingJobsRule"} <= rules
    (create,) = _allowing(sfn, "sagemaker:CreateTrainingJob")
    assert create["Resource"][0].endswith(":training-job/acme-ml-dev*") or "training-job/" in create["Resource"][0]


def test_the_runner_launches_only_through_the_launch_template_and_ends_only_managed_instances(dlami_stack):
    task = _policies(dlami_stack)["pipeline-runner-task"]
    (launch,) = _allowing(task, "ec2:RunInstances")
    assert any(":instance/" in r for r in launch["Resource"]) and "*" not in launch["Resource"]
    assert launch["Condition"]["ArnLike"]["ec2:LaunchTemplate"].startswith("arn:aws:ec2:eu-west-1:123456789012:launch-template/")
    (terminate,) = _allowing(task, "ec2:TerminateInstances")
    assert terminate["Condition"] == {"StringEquals": {"aws:ResourceTag/mmp:managed": "true"}}
    (tags,) = _allowing(task, "ec2:CreateTags")
    assert tags["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    passes = {s["Condition"]["StringEquals"]["iam:PassedToService"]: s["Resource"] for s in _allowing(task, "iam:PassRole")}
    assert set(passes) == {"ec2.amazonaws.com", "sagemaker.amazonaws.com"}  # DLAMI hosts; a study's SageMaker trials
    assert all(len(roles) == 1 for roles in passes.values())


def test_a_study_in_the_runner_reads_only_its_folder_and_runs_only_the_stacks_jobs(dlami_stack):
    task = _policies(dlami_stack)["pipeline-runner-task"]
    (listing,) = _allowing(task, "s3:ListBucket")
    assert listing["Condition"] == {"StringLike": {"s3:prefix": "runner/study/*"}}
    (reading,) = _allowing(task, "s3:GetObject")
    assert sorted(r.rsplit("/runner/", 1)[1] for r in reading["Resource"]) == ["state/*", "study/*"]
    (create,) = _allowing(task, "sagemaker:CreateTrainingJob")
    assert set(create["Action"]) == {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob",
                                     "sagemaker:StopTrainingJob", "sagemaker:AddTags"}
    (sfn_create,) = _allowing(_policies(dlami_stack)["pipeline-sfn"], "sagemaker:CreateTrainingJob")
    assert create["Resource"] == sfn_create["Resource"] and create["Resource"][0].endswith("-acme-ml-dev*")
    def passed_to_sagemaker(doc):
        return [s["Resource"] for s in _allowing(doc, "iam:PassRole")
                if s["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"]

    assert passed_to_sagemaker(task) == passed_to_sagemaker(_policies(dlami_stack)["pipeline-sfn"])  # the stack's role


def test_secrets_reach_the_runner_only_through_the_task_definition(dlami_stack):
    task = next(t for t in dlami_stack.of_type("aws:ecs/taskDefinition:TaskDefinition") if "runner" in t.name)
    (container,) = json.loads(task.inputs["containerDefinitions"])
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    assert set(secrets) == {"GITHUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MMP_DLAMI_SSH_KEY"}
    assert all(arn.startswith("arn:aws:secretsmanager:") for arn in secrets.values())
    key_secret = dlami_stack.one("aws:secretsmanager/secret:Secret", "ssh-key").outputs["arn"]
    assert secrets["MMP_DLAMI_SSH_KEY"] == key_secret  # ECS fills the variable with the key's text
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert "MMP_DLAMI_SSH_KEY" not in env and SSH_KEY.strip() not in task.inputs["containerDefinitions"]
    assert "dlami" in env["MMP_PIPELINE_PLATFORMS"] and env["MMP_LAUNCH_TEMPLATE_ID"]
    assert env["MMP_STUDY_POLL_SECONDS"] == "15"  # mmp:pollSeconds, how often a study reads its trials
    assert container["image"].split(":")[-1].startswith("0.1.0-")  # mmp's version (+ a hash of its sources)
    assert container["stopTimeout"] == 120  # time to terminate the instances on SIGTERM


def test_the_execution_role_reads_exactly_the_injected_secrets_and_the_task_role_not_the_key(dlami_stack):
    """ECS reads `secrets` with the execution role at task start (AWS: GetSecretValue on each
    secret's ARN, kms:Decrypt only for a customer key); the runner itself needs no read of the key."""
    task = next(t for t in dlami_stack.of_type("aws:ecs/taskDefinition:TaskDefinition") if "runner" in t.name)
    (container,) = json.loads(task.inputs["containerDefinitions"])
    injected = sorted(s["valueFrom"] for s in container["secrets"])
    policies = _policies(dlami_stack)
    (reads,) = _allowing(policies["pipeline-runner-execution"], "secretsmanager:GetSecretValue")
    assert sorted(reads["Resource"]) == injected and reads["Action"] == ["secretsmanager:GetSecretValue"]
    key_secret = dlami_stack.one("aws:secretsmanager/secret:Secret", "ssh-key").outputs["arn"]
    task_reads = [r for s in _allowing(policies["pipeline-runner-task"], "secretsmanager:GetSecretValue")
                  for r in s["Resource"]]
    assert key_secret not in task_reads and "*" not in task_reads
