"""Issue 19: every process the pipeline starts gets the stack's region from what the pipeline
hands it, never from mmp.aws's us-east-1 fallback. The stack is rendered in eu-west-1 and the
test process sets no AWS_REGION/AWS_DEFAULT_REGION at all; each process is started with only
the environment AWS would give it:

- the stage Lambdas: the function's variables plus the AWS_REGION the Lambda runtime sets
  (a reserved name the function's configuration may not set: AWS's "Defined runtime
  environment variables");
- the runner task: its container definition's environment;
- the SageMaker entrypoint and its ranks: the job's Environment, which the Launch stage builds;
- each DLAMI rank: tests/dlami/test_remote.py::test_every_rank_gets_the_stacks_region_…

Each probe reads the MLflow password through mmp.runtime.rank, as a rank does: the secret exists only
in the stack's region, in moto.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REGION = "eu-west-1"
ROOT = Path(__file__).resolve().parents[2]
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
# Lambda refuses these in a function's configuration (CreateFunction: "Reserved keys used").
LAMBDA_RESERVED = {"_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
                   "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
                   "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
                   "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR"}
PROBE = """\
import json, os, sys
import boto3
from mmp import aws
from mmp.backends.dlami import DlamiConfig
from mmp.backends.sagemaker import SageMakerSettings
from mmp.runtime.rank import load_mlflow_password
load_mlflow_password(os.environ)
print(json.dumps({"region": aws.region(), "boto3": boto3.session.Session().region_name,
                  "dlami": DlamiConfig.from_env().region, "sagemaker": SageMakerSettings.from_env().region,
                  "password": os.environ.get("MLFLOW_TRACKING_PASSWORD") == "pw-in-eu"}))
"""


@pytest.fixture(scope="module")
def dlami_stack(h):
    return h.run_stack("dev", {**h.DEV_CONFIG, "mmp:fsx": "true", "mmp:dlami": "true",
                               "mmp:sshPublicKey": "ssh-ed25519 AAAA test", "mmp:sshPrivateKey": SSH_KEY})


def runner_environment(run) -> dict[str, str]:
    task = run.one("aws:ecs/taskDefinition:TaskDefinition", "runner")
    (container,) = json.loads(task.inputs["containerDefinitions"])
    return {e["name"]: e["value"] for e in container["environment"]}


def lambda_environments(run) -> dict[str, dict[str, str]]:
    return {fn.name: fn.inputs["environment"]["variables"] for fn in run.of_type("aws:lambda/function:Function")}


def test_the_runner_container_names_the_stacks_region_and_no_lambda_sets_a_reserved_name(dlami_stack):
    env = runner_environment(dlami_stack)
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == REGION
    functions = lambda_environments(dlami_stack)
    assert functions
    for name, variables in functions.items():
        assert not LAMBDA_RESERVED & set(variables), (name, sorted(LAMBDA_RESERVED & set(variables)))


def probe(tmp_path: Path, environment: dict[str, str], endpoint: str, arn: str) -> dict:
    """Run the probe as a rank would be run (`python -m mmp.runtime.rank`), with exactly `environment`
    plus what reaches moto (the role's credentials, the endpoint) and nothing of this process's."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**environment, "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "MMP_MLFLOW_PASSWORD_SECRET_ARN": arn, "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    out = subprocess.run([sys.executable, "-m", "mmp.runtime.rank", str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_with_no_region_variable_each_process_gets_the_stacks_region_from_its_handoff(
        dlami_stack, aws_env, monkeypatch, tmp_path):
    from mmp import aws
    from mmp.backends import LaunchRequest
    from mmp.backends.sagemaker import SageMakerBackend
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment

    arn = aws.client("secretsmanager", REGION).create_secret(Name="mlflow-pw", SecretString="pw-in-eu")["ARN"]
    for variable in aws.REGION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert aws.region() == "us-east-1"  # what anything not handed a region would use

    runner = runner_environment(dlami_stack)
    assert probe(tmp_path, runner, aws_env, arn) == {
        "region": REGION, "boto3": REGION, "dlami": REGION, "sagemaker": REGION, "password": True}

    stages = next(iter(lambda_environments(dlami_stack).values()))
    launch_stage = {**stages, "AWS_REGION": REGION}  # the Lambda runtime's own variable
    assert probe(tmp_path, launch_stage, aws_env, arn)["region"] == REGION

    # The Launch stage builds the job's Environment in its own process: the SageMaker entrypoint
    # (and every rank it starts) gets exactly that, and no other region.
    for key, value in launch_stage.items():
        monkeypatch.setenv(key, value)
    experiment = parse_experiment({"Platform": "sagemaker", "Dataset_Name": "fashion",
                                   "Training_Instance": "ml.p3.2xlarge", "Instance_Count": "1"})
    request = LaunchRequest(experiment=experiment, experiment_name="fashion-demo", run_id="r1", repository="a/b",
                            clone_url="/x", commit="c" * 40, dataset=Dataset("fashion", s3="s3://b/fashion/"),
                            mlflow_env={"MLFLOW_EXPERIMENT_NAME": "fashion-demo", "MLFLOW_RUN_ID": "r1"})
    job_environment = SageMakerBackend().environment(request, checkpoints=False)
    for key in launch_stage:
        monkeypatch.delenv(key, raising=False)
    assert probe(tmp_path, job_environment, aws_env, arn) == {
        "region": REGION, "boto3": REGION, "dlami": REGION, "sagemaker": REGION, "password": True}
