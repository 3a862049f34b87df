"""Issue 19, defect 3: with `mmp:mlflowMode sagemaker` the managed server authorises every MLflow
call as `sagemaker-mlflow:<API name>` on its ARN, so each role must be granted what its code calls.

The calls are derived from the code, not typed: the REST paths mmp.tracking.rest requests (the
stage Lambdas, and a study in the runner task), mapped to their API names through MLflow's own
service definitions; and the MlflowClient methods promotion calls in the runner task (MLflow names
each API as its client method, in CamelCase). The rendered policies are then evaluated for each action."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REGION = "eu-west-1"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
RUNNER_CLIENT_CODE = ("mmp/models/promote.py", "mmp/models/compare.py", "mmp/models/search.py", "mmp/models/gitops.py")
# REST calls only a study makes (its pruning reads, in the runner task): the stage Lambdas are not granted them
STUDY_ONLY_METHODS = {"metric_page": "GetMetricHistory"}


@pytest.fixture(scope="module")
def managed(h):
    config = {k: v for k, v in h.DEV_CONFIG.items() if k != "mmp:mlflowAdminPassword"}
    return h.run_stack("dev", {**config, "mmp:mlflowMode": "sagemaker", "mmp:fsx": "true", "mmp:dlami": "true",
                               "mmp:sshPublicKey": "ssh-ed25519 AAAA test", "mmp:sshPrivateKey": SSH_KEY})


def rest_actions() -> set[str]:
    from mlflow.protos.model_registry_pb2 import ModelRegistryService
    from mlflow.protos.service_pb2 import MlflowService
    from mlflow.utils.rest_utils import extract_api_info_for_service

    names = {path: request.__name__ for service in (MlflowService, ModelRegistryService)
             for request, (path, _method) in extract_api_info_for_service(service, "/api/2.0").items()}
    called = set(re.findall(r'"(/api/2\.0/mlflow/[a-z/-]+)"', (ROOT / "mmp" / "tracking" / "rest.py").read_text()))
    assert called and called <= set(names), called - set(names)
    return {names[path] for path in called}


def client_actions() -> set[str]:
    methods = set()
    for rel in RUNNER_CLIENT_CODE:
        methods |= set(re.findall(r"\b(?:client\(\)|client|store)\.([a-z]+_[a-z_]+)\(", (ROOT / rel).read_text()))
    assert {"search_runs", "create_model_version", "set_registered_model_alias"} <= methods
    return {"".join(word.capitalize() for word in method.split("_")) for method in methods}


def server_arn(run) -> str:
    server = run.one("aws:sagemaker/mlflowTrackingServer:MlflowTrackingServer")
    return server.outputs["arn"]


def allowed(policy: dict, action: str, resource: str) -> bool:
    """An Allow statement whose Action and Resource patterns match (IAM's `*` wildcards)."""
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in actions) and any(
                fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def policy(run, name: str) -> dict:
    return json.loads(run.one("aws:iam/rolePolicy:RolePolicy", name).inputs["policy"])


def test_only_a_study_calls_the_study_only_methods():
    callers = {str(path.relative_to(ROOT)) for path in (ROOT / "mmp").rglob("*.py")
               for method in STUDY_ONLY_METHODS if f".{method}(" in path.read_text()}
    assert callers and all(c.startswith("mmp/tuning/") for c in callers), callers
    assert set(STUDY_ONLY_METHODS.values()) <= rest_actions()


def test_the_stage_role_may_make_every_call_the_rest_tracker_makes(managed):
    arn = server_arn(managed)
    actions = rest_actions() - set(STUDY_ONLY_METHODS.values())
    assert {"SearchRuns", "SetExperimentTag"} <= actions  # the ownership check
    stages = policy(managed, "pipeline-stages")
    missing = sorted(a for a in actions if not allowed(stages, f"sagemaker-mlflow:{a}", arn))
    assert not missing, f"the stage Lambdas' role lacks {missing} on {arn}"


def test_the_runner_task_role_may_make_every_call_promotion_and_a_study_make(managed):
    arn = server_arn(managed)
    runner = policy(managed, "pipeline-runner-task")
    missing = sorted(a for a in client_actions() | rest_actions()
                     if not allowed(runner, f"sagemaker-mlflow:{a}", arn))
    assert not missing, f"the runner task's role lacks {missing} on {arn}"
    assert not allowed(runner, "sagemaker-mlflow:DeleteRun", arn)  # and nothing it never calls


def test_the_dlami_hosts_may_log_from_train_py_to_that_server_only(managed):
    arn = server_arn(managed)
    host = policy(managed, "dlami-host")
    for action in ("CreateRun", "LogBatch", "GetRun", "UpdateRun", "LogModel", "SearchRuns"):
        assert allowed(host, f"sagemaker-mlflow:{action}", arn), action
    assert not allowed(host, "sagemaker-mlflow:LogBatch", arn.replace("mlflow", "other"))
    assert not allowed(host, "sagemaker-mlflow:DeleteExperiment", arn)
