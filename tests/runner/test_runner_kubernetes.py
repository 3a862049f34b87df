"""A `Platform: kubernetes` push through the state machine to Conclude, on the runner task (issue 22).

The RunTraining state's `ecs:runTask.sync` runs the runner's entry command in this process (as for
dlami, tests/runner/test_runner_task.py) and its kubernetes backend talks to MMP's fake API server
(tests/kubernetes/fake_apiserver.py) as the stack deploys it: the MMP_K8S_* settings the Pulumi component
renders (mmp.infra.kubernetes.backend_environment) pointing at the fake over HTTPS with its CA, the EKS
token (a presigned STS URL, its signature recomputed by the fake) for the cluster's name, the training
namespace, and every request authorised against the runner's Role (RBAC_RULES: a 403 fails the run).
The stage Lambdas get those settings without the CA, as deployed; the runner task gets them all.
AWS calls (moto, eu-west-1) are judged against each caller's role (tests/iam_enforce).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import pytest

from mmp.infra import kubernetes as infra_k8s
from mmp.pipeline import aws_stages, runner_results
from mmp.pipeline.runner import Pipeline

from ..conftest import REGION
from ..infra.pipeline_stack import OK_TRAIN, experiment, head, job
from ..infra.sfn import TaskFailed
from ..kubernetes.fake_apiserver import FAILURE_SUMMARY, UNSCHEDULABLE, FakeCluster

CLUSTER = "acme-ml-dev-training"
K8S_PATH = ["Prepare", "NeedsRunner?", "RunnerImage", "Promote?", "Accepted?", "BuildImage", "Train where?",
            "RunTraining", "Conclude", "Succeeded?"]


@pytest.fixture
def eks(aws_env, tmp_path):
    """The stack's EKS API endpoint: HTTPS with its own CA, EKS tokens for CLUSTER, the runner's Role."""
    fake = FakeCluster(namespace=infra_k8s.NAMESPACE, eks_cluster=CLUSTER, region=REGION).start(tls_dir=tmp_path / "tls")
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def k8s_push(stack, eks, make_repo, monkeypatch, tmp_path):
    """Commit a kubernetes experiment; the stages and the runner have the stack's MMP_K8S_* settings."""
    ca = base64.b64encode(eks.ca_pem.encode()).decode()
    deployed = infra_k8s.backend_environment(eks.url, ca, CLUSTER, os.environ["MMP_ECR_REPOSITORY_URI"])
    assert set(deployed) == set(infra_k8s.ENVIRONMENT_NAMES)
    for key in ("MMP_K8S_TOKEN_FILE", "MMP_K8S_DEADLINE_SLACK_MINUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in deployed.items():
        if key != "MMP_K8S_CA_DATA":  # the stage Lambdas' environment: no CA (mmp.infra.pipeline)
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MMP_K8S_CA_DATA", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # the settings alone reach the cluster
    monkeypatch.setenv("MMP_PIPELINE_PLATFORMS", "sagemaker,dlami,kubernetes")
    monkeypatch.setenv("MMP_K8S_POLL_SECONDS", "0.05")  # the test's pace; deployed: 5 s

    def push(**fields):
        fields = {"Platform": "kubernetes", "Training_Instance": "g5.12xlarge", "Instance_Count": "2", **fields}
        repo = make_repo(experiment=experiment(**fields), files={"train.py": OK_TRAIN})
        sha = head(repo)
        stack.serve(repo, sha)
        return job(repo, sha)

    def execution(**replace):
        def runner_task(arguments, data):
            """The runner task: its own process, so its own backend, built from its environment (CA included)."""
            aws_stages._BACKENDS.pop("kubernetes", None)
            monkeypatch.setenv("MMP_K8S_CA_DATA", ca)
            try:
                return stack.runner(arguments, data, monkeypatch)
            finally:
                monkeypatch.delenv("MMP_K8S_CA_DATA")
                aws_stages._BACKENDS.pop("kubernetes", None)

        return stack.execution(monkeypatch, **{"arn:aws:states:::ecs:runTask.sync": runner_task, **replace})

    push.execution = execution
    return push


def _left(eks: FakeCluster) -> list[tuple[str, str, str]]:
    """What the run left on the cluster: only the shared TrainingRuntime may stay (by design)."""
    return [key for key in eks.objects if key[0] != "trainingruntimes"]


def _clean(eks: FakeCluster) -> None:
    assert eks.auth_failures == [] and eks.forbidden == []  # the EKS token and the runner's Role were enough
    assert _left(eks) == []
    assert [key[0] for key in eks.objects] == ["trainingruntimes"]


def _trainjob(eks: FakeCluster) -> dict:
    (made,) = [o for o in eks.created if o["kind"] == "TrainJob"]
    return made


def test_a_kubernetes_push_trains_on_the_runner_and_concludes(stack, eks, k8s_push):
    start = k8s_push()
    run = k8s_push.execution()
    end, state = run.run(start)
    assert end == "Succeed" and run.path == K8S_PATH + ["Done"], (run.path, state.get("outcome"))
    assert [b["ProjectName"] for b in stack.builds] == ["mmp-runner-image", "mmp-image"]  # the pods' image too
    assert run.timeouts["RunTraining"] == 240 * 60 + aws_stages.RUNNER_GRACE_SECONDS

    run_id = state["started"]["run_id"]
    result, log_text = runner_results.read("train", state)
    assert result["state"] == "SUCCEEDED" and result["run_id"] == run_id
    assert log_text.splitlines() == list(eks.log_lines)  # the launcher pod's log, each line once
    assert state["outcome"]["state"] == "SUCCEEDED" and "teardown failed" not in state["outcome"]["message"]
    assert stack.mlflow_run(run_id)["info"]["status"] == "FINISHED"
    assert [s["state"] for s in stack.statuses] == ["pending", "success"]
    assert "SUCCEEDED" in stack.messages()[0]["Subject"]

    # What the runner created, as the stack's settings and Prepare's staging say.
    trainjob = _trainjob(eks)
    assert trainjob["metadata"]["namespace"] == infra_k8s.NAMESPACE
    env = {e["name"]: e["value"] for e in trainjob["spec"]["trainer"]["env"]}
    assert env["MMP_CODE_URI"] == state["image"]["code_uri"] and "MMP_CODE_ARCHIVE" not in env
    assert env["MMP_OUTPUT_S3"] == f"s3://mmp-artifacts/output/{state['started']['request']['experiment_name']}/{run_id}/"
    assert env["MLFLOW_RUN_ID"] == run_id
    pod = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == infra_k8s.SERVICE_ACCOUNT  # the pod-identity role's
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g5.12xlarge", **infra_k8s.NODE_SELECTOR}
    assert pod["tolerations"] == infra_k8s.TOLERATIONS
    assert {"name": "fsx", "persistentVolumeClaim": {"claimName": infra_k8s.FSX_CLAIM}} in pod["volumes"]
    (runtime,) = [o for o in eks.created if o["kind"] == "TrainingRuntime"]
    image = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert image == f"{os.environ['MMP_ECR_REPOSITORY_URI']}:{state['image']['tag']}"  # the image BuildImage made
    assert not [o for o in eks.created if o["kind"] == "ConfigMap"]  # the code came from S3
    _clean(eks)


def test_a_failing_train_py_is_reported_with_the_launchers_summary(stack, eks, k8s_push):
    eks.lifecycle = "failure"
    end, state = k8s_push.execution().run(k8s_push())
    assert end == "Fail"
    assert state["outcome"]["state"] == "FAILED" and FAILURE_SUMMARY in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    _clean(eks)


def test_the_clusters_deadline_fails_the_run(stack, eks, k8s_push):
    """activeDeadlineSeconds = Max_Runtime + slack: Trainer's DeadlineExceeded is reported as such."""
    eks.lifecycle = "deadline"
    end, state = k8s_push.execution().run(k8s_push(Max_Runtime="20"))
    assert end == "Fail"
    assert _trainjob(eks)["spec"]["activeDeadlineSeconds"] == (20 + 30) * 60
    assert state["outcome"]["state"] == "FAILED"
    assert "activeDeadlineSeconds (3000 s) reached" in state["outcome"]["message"]
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    _clean(eks)


def test_max_runtime_in_the_runner_stops_a_job_that_never_schedules(stack, eks, k8s_push, monkeypatch):
    """No GPU node comes (Insufficient nvidia.com/gpu): the run waits with the scheduler's words until the
    runner's Max_Runtime bound (brought forward to a second here), then the TrainJob is deleted."""
    eks.lifecycle = "unschedulable"
    execute, pending = Pipeline.execute, []

    def bounded(self, backend, started, sink, deadline=None):
        original_status = backend.status

        def status(handle):
            got = original_status(handle)
            pending.append(got.message)
            return got

        monkeypatch.setattr(backend, "status", status)
        return execute(self, backend, started, sink, deadline=time.time() + 1.0)

    monkeypatch.setattr(Pipeline, "execute", bounded)
    end, state = k8s_push.execution().run(k8s_push())
    assert end == "Fail"
    assert f"Unschedulable: {UNSCHEDULABLE}" in pending
    assert state["outcome"]["state"] == "FAILED" and "Max_Runtime reached" in state["outcome"]["message"]
    assert ("DELETE", "trainjobs") in {(m, p.split("/")[6]) for m, p, _ in eks.requests if m == "DELETE"}
    _clean(eks)


def test_a_stopped_runner_cancels_the_trainjob(stack, eks, k8s_push):
    """Step Functions stops the task (state timeout, abort): ECS sends SIGTERM; the runner deletes the TrainJob
    (foreground) and waits until it is gone before it reports."""
    eks.lifecycle = "running"
    stop = threading.Event()

    def sigterm_once_training():
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            with eks.lock:
                running = [o for (plural, _, _), o in eks.objects.items()
                           if plural == "pods" and o["status"]["phase"] == "Running"]
            if running:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=sigterm_once_training, daemon=True)
    killer.start()
    try:
        end, state = k8s_push.execution().run(k8s_push())
    finally:
        stop.set()
        killer.join(10)
    result, _ = runner_results.read("train", state)
    assert result["state"] == "CANCELLED" and "runner task was stopped" in result["message"]
    assert "error" in state and state["outcome"]["state"] == "CANCELLED"
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "KILLED"
    assert [s["state"] for s in stack.statuses] == ["pending", "error"]
    _clean(eks)


def test_a_bad_kubernetes_experiment_is_refused_in_prepare_and_reaches_no_cluster(stack, eks, k8s_push):
    """Prepare (a Lambda, without the cluster's CA) checks the experiment against the backend's settings."""
    run = k8s_push.execution()
    end, state = run.run(k8s_push(Training_Instance="ml.g5.12xlarge"))
    assert end == "Fail" and "RunTraining" not in run.path
    assert state["outcome"]["state"] == "INVALID"
    assert "Training_Instance: 'ml.g5.12xlarge' is a SageMaker type" in state["outcome"]["message"]
    assert eks.requests == []


def test_a_runner_killed_without_a_result_is_concluded_and_its_trainjob_is_bounded(stack, eks, k8s_push):
    """SIGKILL, a lost container: no result. Conclude reports the run failed; the stage Lambdas do not reach
    the cluster, so the TrainJob the runner made ends at its activeDeadlineSeconds (Max_Runtime + slack)."""
    eks.lifecycle = "running"

    def dies_after_launch(arguments, data):
        from mmp.backends import get_backend
        from mmp.pipeline.aws_stages import started_from_dict

        os.environ["MMP_K8S_CA_DATA"] = base64.b64encode(eks.ca_pem.encode()).decode()
        try:
            get_backend("kubernetes").launch(started_from_dict(data["started"]).request)
        finally:
            del os.environ["MMP_K8S_CA_DATA"]
        raise TaskFailed("States.TaskFailed", "Essential container in task exited (137)")

    run = k8s_push.execution(**{"arn:aws:states:::ecs:runTask.sync": dies_after_launch})
    end, state = run.run(k8s_push(Max_Runtime="20"))
    assert end == "Fail" and run.path == K8S_PATH + ["Failed"]
    assert "ended without a result" in state["outcome"]["message"] and "exited (137)" in state["outcome"]["message"]
    assert "teardown failed" not in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    (left,) = [key for key in _left(eks) if key[0] == "trainjobs"]
    assert eks.objects[left]["spec"]["activeDeadlineSeconds"] == (20 + 30) * 60
    assert eks.forbidden == []
