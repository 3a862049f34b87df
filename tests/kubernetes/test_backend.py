"""The kubernetes backend against MMP's fake API server: launch, each scripted lifecycle, logs, cancel,
teardown (twice), bad input, EKS tokens. The fake's responses are assumptions (docs/kubernetes.md)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import io
import uuid

import pytest

from mmp.backends import JobState, LaunchRequest, get_backend
from mmp.backends.kubernetes import objects as o
from mmp.backends.kubernetes.client import KubeClient, Connection, KubeError, eks_token
from mmp.backends.kubernetes.settings import KubernetesSettings

from .fake_apiserver import FAILURE_SUMMARY, UNSCHEDULABLE, FakeCluster


@pytest.fixture
def request_for(make_repo, tmp_path):
    from mmp.contract.datasets import Dataset
    from mmp.contract.experiment import parse_experiment
    from mmp.hosts import localgit

    def _make(**fields) -> LaunchRequest:
        experiment = {"Platform": "kubernetes", "Dataset_Name": "digits", "Training_Instance": "g5.12xlarge",
                      "Instance_Count": "2", "Hyperparameters": {"epochs": "1", "fast": True}, **fields}
        repo = make_repo("k8s-repo-" + uuid.uuid4().hex[:6], experiment=experiment)
        run_id = uuid.uuid4().hex
        return LaunchRequest(experiment=parse_experiment(experiment), experiment_name="k8s-test", run_id=run_id,
                             repository="acme/fashion", clone_url=str(repo), commit=localgit.resolve(repo),
                             mlflow_env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "k8s-test",
                                         "MLFLOW_RUN_ID": run_id},
                             dataset=Dataset("digits"), image_tag="deps-" + "ab" * 16)

    return _make


def follow(backend, handle, **kw):
    lines: list[str] = []
    status = backend.wait(handle, on_log=lines.append, poll_seconds=0.01, **kw)
    return status, lines


def test_success_trains_streams_logs_and_leaves_nothing(cluster, k8s_env, request_for):
    backend = get_backend("kubernetes")
    req = request_for()
    handle = backend.launch(req)
    job = cluster.objects[("trainjobs", "mmp", handle.data["name"])]
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["numProcPerNode"] == 4
    assert job["spec"]["trainer"]["args"] == [
        "--dataset-path", "/fsx/datasets/digits", "--output-path", f"/fsx/output/k8s-test/{req.run_id}",
        "--dataset", "digits", "--epochs", "1", "--fast"]
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert env["MLFLOW_RUN_ID"] == req.run_id and env["MMP_CODE_ARCHIVE"] == "/etc/mmp/code/code.tar.gz"
    assert job["spec"]["activeDeadlineSeconds"] == (240 + 30) * 60
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = patch[0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g5.12xlarge"}
    assert pod["serviceAccountName"] == "mmp-training"
    assert {"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx-claim"}} in pod["volumes"]
    runtime = cluster.objects[("trainingruntimes", "mmp", handle.data["runtime"])]
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node["containers"][0]["image"].endswith(":deps-" + "ab" * 16)
    assert node["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    cm = cluster.objects[("configmaps", "mmp", handle.data["code_configmap"])]
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(cm["binaryData"]["code.tar.gz"]))) as tar:
        assert "train.py" in tar.getnames()
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    status, lines = follow(backend, handle)
    assert status.state is JobState.SUCCEEDED, status
    assert lines == list(cluster.log_lines)  # each line once, despite sinceTime's whole seconds
    backend.teardown(handle)
    backend.teardown(handle)  # twice: safe
    assert [k for k in cluster.objects if k[0] != "trainingruntimes"] == []


def test_a_second_run_reuses_the_runtime(cluster, k8s_env, request_for):
    backend = get_backend("kubernetes")
    first, second = backend.launch(request_for()), backend.launch(request_for())
    assert first.data["runtime"] == second.data["runtime"]
    assert len([k for k in cluster.objects if k[0] == "trainingruntimes"]) == 1
    single = backend.launch(request_for(Instance_Count="1"))
    assert single.data["runtime"] != first.data["runtime"] and "-single-" in single.data["runtime"]
    assert len([k for k in cluster.objects if k[0] == "pods" and single.data["name"] in k[2]]) == 1
    for handle in (first, second, single):
        backend.cancel(handle)
        backend.teardown(handle)


def test_failure_reports_the_launchers_summary(cluster, k8s_env, request_for):
    cluster.lifecycle = "failure"
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for())
    status, _ = follow(backend, handle)
    assert status.state is JobState.FAILED and status.message == FAILURE_SUMMARY and status.exit_code == 1
    backend.teardown(handle)


def test_deadline_exceeded_fails(cluster, k8s_env, request_for):
    cluster.lifecycle = "deadline"
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for(Max_Runtime="5"))
    assert cluster.objects[("trainjobs", "mmp", handle.data["name"])]["spec"]["activeDeadlineSeconds"] == 35 * 60
    status, _ = follow(backend, handle)
    assert status.state is JobState.FAILED and "activeDeadlineSeconds (2100 s)" in status.message
    backend.teardown(handle)


def test_unschedulable_stays_pending_with_the_scheduler_message_until_max_runtime(cluster, k8s_env, request_for):
    import time

    cluster.lifecycle = "unschedulable"
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for())
    backend.status(handle)
    status = backend.status(handle)
    assert status.state is JobState.PENDING and status.message == f"Unschedulable: {UNSCHEDULABLE}"
    status, _ = follow(backend, handle, deadline=time.time() + 0.3)  # the pipeline's Max_Runtime
    assert status.state is JobState.FAILED and status.message == "stopped: Max_Runtime reached"
    assert ("trainjobs", "mmp", handle.data["name"]) not in cluster.objects
    backend.teardown(handle)


def test_image_pull_error_fails_fast_and_deletes_the_job(cluster, k8s_env, request_for):
    cluster.lifecycle = "imagepull"
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for())
    status, _ = follow(backend, handle)
    assert status.state is JobState.FAILED and "ErrImagePull" in status.message
    assert status.detail["reason"] == "ErrImagePull"
    assert backend.status(handle).state is JobState.FAILED  # the job is gone; the reason stays
    backend.teardown(handle)
    assert not [k for k in cluster.objects if k[0] != "trainingruntimes"]


def test_deleted_out_of_band_fails(cluster, k8s_env, request_for):
    cluster.lifecycle = "deleted"
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for())
    status, _ = follow(backend, handle)
    assert status.state is JobState.FAILED and "deleted outside MMP" in status.message
    backend.teardown(handle)


def test_cancel_deletes_in_the_foreground_and_is_idempotent(cluster, k8s_env, request_for):
    backend = get_backend("kubernetes")
    handle = backend.launch(request_for())
    backend.cancel(handle)
    assert cluster.objects[("trainjobs", "mmp", handle.data["name"])]["metadata"]["deletionTimestamp"]
    backend.cancel(handle)
    status, _ = follow(backend, handle)
    assert status.state is JobState.CANCELLED
    backend.teardown(handle)
    backend.cancel(handle)
    deletes = [r for r in cluster.requests if r[0] == "DELETE"]
    assert {code for _, _, code in deletes} <= {200, 404}


def test_bad_input_names_the_field_and_creates_nothing(cluster, k8s_env, request_for, monkeypatch):
    backend = get_backend("kubernetes")
    req = request_for(Training_Instance="ml.p3.2xlarge", Use_Spot=True)
    problems = backend.check(req.experiment, req.dataset)
    assert any(p.startswith("Training_Instance: 'ml.p3.2xlarge' is a SageMaker type") for p in problems)
    assert any(p.startswith("Use_Spot:") for p in problems)
    assert backend.check(request_for(Training_Instance="p9.48xlarge").experiment, None)[0].startswith(
        "Training_Instance: the GPUs of 'p9.48xlarge'")
    monkeypatch.delenv("MMP_K8S_FSX_CLAIM")
    monkeypatch.setenv("MMP_K8S_TOLERATIONS", "{not json")
    problems = get_backend("kubernetes").check(request_for().experiment, None)
    assert any("MMP_K8S_TOLERATIONS is not valid JSON" in p for p in problems)
    assert any("MMP_K8S_FSX_CLAIM is not set" in p for p in problems)
    assert cluster.requests == []


def test_invalid_objects_get_422_and_recreate_409(cluster):
    kube = KubeClient(Connection(server=cluster.url, namespace="mmp", token=lambda: "mmp-test-token-0123456789"))
    shape = o.RuntimeShape(image="r:deps-x", image_tag="deps-x", gpus=1, multi=True)
    runtime = o.training_runtime(shape, "mmp")
    kube.create(*("trainer.kubeflow.org/v1alpha1", "trainingruntimes"), runtime)
    with pytest.raises(KubeError) as exc:
        kube.create("trainer.kubeflow.org/v1alpha1", "trainingruntimes", runtime)
    assert exc.value.code == 409 and exc.value.reason == "AlreadyExists"
    runtime["metadata"]["name"] = "other"
    runtime["spec"]["mlPolicy"]["mpi"]["numProcsPerNode"] = 2
    with pytest.raises(KubeError) as exc:
        kube.create("trainer.kubeflow.org/v1alpha1", "trainingruntimes", runtime)
    assert exc.value.code == 422 and 'unknown field "numProcsPerNode"' in exc.value.message
    bad = KubeClient(Connection(server=cluster.url, namespace="mmp", token=lambda: "wrong"))
    with pytest.raises(KubeError) as exc:
        bad.get("trainer.kubeflow.org/v1alpha1", "trainingruntimes", "x")
    assert exc.value.code == 401


def test_eks_token_is_accepted_for_its_cluster_only(aws_env):
    """The token `eks_token` makes (botocore's presigner, the test's credentials) passes the fake's
    SigV4 check for its cluster, and fails for another cluster, region or an expired one."""
    fake = FakeCluster(eks_cluster="mmp-dev", region="eu-west-1").start()
    try:
        token = eks_token("mmp-dev", "eu-west-1")
        assert token.startswith("k8s-aws-v1.") and "=" not in token
        ok = KubeClient(Connection(server=fake.url, namespace="mmp", token=lambda: token))
        assert ok.list("v1", "pods", "a=b") == []
        for bad in (eks_token("mmp-prod", "eu-west-1"), eks_token("mmp-dev", "eu-west-2")):
            with pytest.raises(KubeError) as exc:
                KubeClient(Connection(server=fake.url, token=lambda b=bad: b)).list("v1", "pods", "a=b")
            assert exc.value.code == 401
        assert any("signature does not match" in f for f in fake.auth_failures)
        assert any("not sts.eu-west-1" in f for f in fake.auth_failures)
    finally:
        fake.stop()


def test_mmp_run_trains_on_the_fake_cluster_and_concludes_in_mlflow(cluster, k8s_env, make_repo, digits, tmp_path):
    """`mmp run` of an experiment with Platform kubernetes: the fake's lifecycle drives the status."""
    from mlflow.tracking import MlflowClient

    repo = make_repo("k8s-run", experiment={"Platform": "kubernetes", "Dataset_Name": "digits",
                                            "Training_Instance": "g5.xlarge", "Instance_Count": "1",
                                            "Hyperparameters": {"epochs": "1"}})
    done = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "--json"], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path, env={**__import__("os").environ, **k8s_env})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["state"] == "SUCCEEDED"
    runs = MlflowClient(tracking_uri=f"sqlite:///{digits.parent.parent / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{digits.parent.parent / 'mlflow.db'}")
         .search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert [k for k in cluster.objects if k[0] != "trainingruntimes"] == []  # torn down


def test_runner_task_settings_train_on_eks_over_tls(aws_env, tmp_path, monkeypatch, request_for):
    """The AWS runner task's way in: MMP_K8S_API_URL over HTTPS with MMP_K8S_CA_DATA, and the EKS token
    for MMP_K8S_CLUSTER_NAME; a run goes to its end."""
    fake = FakeCluster(eks_cluster="mmp-dev", region="eu-west-1").start(tls_dir=tmp_path / "tls")
    try:
        monkeypatch.setenv("MMP_K8S_API_URL", fake.url)
        monkeypatch.setenv("MMP_K8S_CA_DATA", base64.b64encode(fake.ca_pem.encode()).decode())
        monkeypatch.setenv("MMP_K8S_CLUSTER_NAME", "mmp-dev")
        monkeypatch.setenv("MMP_K8S_NAMESPACE", "mmp")
        monkeypatch.setenv("MMP_K8S_IMAGE_REPOSITORY", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mmp-training")
        monkeypatch.setenv("MMP_K8S_FSX_CLAIM", "fsx-claim")
        monkeypatch.setenv("MMP_K8S_TOLERATIONS", json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists",
                                                               "effect": "NoSchedule"}]))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        backend = get_backend("kubernetes")
        req = request_for(Instance_Count="1")
        req.code_uri = "s3://mmp-artifacts/code/acme/fashion/" + req.commit + ".tar.gz"
        handle = backend.launch(req)
        job = fake.objects[("trainjobs", "mmp", handle.data["name"])]
        env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
        assert env["MMP_CODE_URI"] == req.code_uri and "MMP_CODE_ARCHIVE" not in env
        assert handle.data["code_configmap"] is None
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        status, _ = follow(backend, handle)
        assert status.state is JobState.SUCCEEDED
        backend.teardown(handle)
        assert fake.auth_failures == [] and fake.forbidden == []  # the runner's Role (RBAC_RULES) was enough
    finally:
        fake.stop()


def test_kubeconfig_exec_aws_eks_get_token_is_made_in_process(aws_env, tmp_path):
    """A kubeconfig as `aws eks update-kubeconfig` writes it (exec: aws eks get-token) works without the
    aws CLI: MMP makes the same token itself."""
    import yaml

    from mmp.backends.kubernetes.client import from_kubeconfig

    fake = FakeCluster(eks_cluster="mmp-dev", region="eu-west-1").start(tls_dir=tmp_path / "tls")
    try:
        path = tmp_path / "config"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "eks",
            "clusters": [{"name": "eks", "cluster": {
                "server": fake.url, "certificate-authority-data": base64.b64encode(fake.ca_pem.encode()).decode()}}],
            "users": [{"name": "eks", "user": {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws",
                "args": ["--region", "eu-west-1", "eks", "get-token", "--cluster-name", "mmp-dev", "--output", "json"]}}}],
            "contexts": [{"name": "eks", "context": {"cluster": "eks", "user": "eks", "namespace": "mmp"}}]}))
        kube = KubeClient(from_kubeconfig(path, "us-east-1"))
        assert kube.namespace == "mmp"
        assert kube.list("v1", "pods", "a=b") == [], fake.auth_failures
        path.write_text(path.read_text().replace("mmp-dev", "other"))
        with pytest.raises(KubeError) as exc:
            KubeClient(from_kubeconfig(path, "us-east-1")).list("v1", "pods", "a=b")
        assert exc.value.code == 401
    finally:
        fake.stop()


def test_an_unknown_ca_is_refused(tmp_path):
    fake = FakeCluster(token="t").start(tls_dir=tmp_path / "tls")
    try:
        with pytest.raises(KubeError) as exc:
            KubeClient(Connection(server=fake.url, token=lambda: "t")).list("v1", "pods", "a=b")
        assert exc.value.code == 0 and "CERTIFICATE_VERIFY_FAILED" in exc.value.message
    finally:
        fake.stop()


def test_a_retried_launch_finds_its_own_job_and_refuses_another_runs(cluster, k8s_env, request_for):
    backend = get_backend("kubernetes")
    req = request_for()
    first = backend.launch(req)
    again = backend.launch(req)  # a retry of the same launch: the 409 is its own job
    assert again.data["name"] == first.data["name"]
    assert len([k for k in cluster.objects if k[0] == "trainjobs"]) == 1
    job = cluster.objects[("trainjobs", "mmp", first.data["name"])]
    job["metadata"]["labels"]["mmp/run-id"] = "someone-else"
    with pytest.raises(Exception, match="already exists in namespace mmp for another run"):
        backend.launch(req)
    job["metadata"]["labels"]["mmp/run-id"] = req.run_id
    backend.teardown(first)


def test_a_code_archive_too_big_for_a_configmap_creates_nothing(cluster, k8s_env, request_for):
    import os as _os

    from mmp.backends import BackendError
    from mmp.hosts import localgit

    req = request_for()
    big = __import__("pathlib").Path(req.clone_url) / "weights.bin"
    big.write_bytes(_os.urandom(1100 * 1024))  # random: gzip cannot shrink it
    localgit.git(req.clone_url, "add", "weights.bin")
    localgit.git(req.clone_url, "commit", "-qm", "weights")
    req.commit = localgit.resolve(req.clone_url)
    with pytest.raises(BackendError, match="MMP_ARTIFACTS_BUCKET"):
        get_backend("kubernetes").launch(req)
    assert [r for r in cluster.requests if r[0] != "GET"] == []


def test_a_refused_code_configmap_tears_the_job_down(cluster, k8s_env, request_for, monkeypatch):
    from mmp.backends import BackendError

    real = cluster.create

    def refuse_configmaps(version, plural, ns, obj, query):
        if plural == "configmaps":
            return cluster.status(403, "Forbidden", 'configmaps is forbidden: User "mmp" cannot create resource')
        return real(version, plural, ns, obj, query)

    monkeypatch.setattr(cluster, "create", refuse_configmaps)
    with pytest.raises(BackendError, match="storing the commit's code .* 403 Forbidden"):
        get_backend("kubernetes").launch(request_for())
    assert [k for k in cluster.objects if k[0] != "trainingruntimes"] == []


def test_a_password_in_the_tracking_uri_never_reaches_the_cluster(cluster, k8s_env, request_for):
    from mmp.backends import BackendError

    req = request_for()
    req.mlflow_env["MLFLOW_TRACKING_URI"] = "https://mmp:s3cret-pw@mlflow.example.com"
    with pytest.raises(BackendError) as exc:
        get_backend("kubernetes").launch(req)
    assert "s3cret-pw" not in str(exc.value) and "MMP_MLFLOW_PASSWORD_SECRET_ARN" in str(exc.value)
    assert [r for r in cluster.requests if r[0] != "GET"] == []


def test_the_fake_api_server_refuses_what_the_runners_role_does_not_grant():
    """RBAC as the API server applies a namespaced Role: the verb, API group, resource or subresource and
    namespace must all match RBAC_RULES, else 403 Forbidden (and the backend's calls above never got one)."""
    from mmp.infra.kubernetes import RBAC_RULES

    fake = FakeCluster(token="t").start()
    try:
        assert fake.rules == RBAC_RULES
        kube = KubeClient(Connection(server=fake.url, namespace="mmp", token=lambda: "t"))
        assert kube.list("v1", "pods", "a=b") == [] and kube.get(o.API_VERSION, "trainjobs", "absent") is None
        refused = [
            lambda: kube.list(o.API_VERSION, "trainjobs", "a=b"),  # list: not granted
            lambda: kube.get("v1", "pods", "p"),  # get on pods: only pods/log
            lambda: kube.delete(o.API_VERSION, "trainingruntimes", "r"),  # the shared runtime stays
            lambda: kube.create("v1", "configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                                    "metadata": {"name": "c"}}),  # no ConfigMap on AWS
            lambda: KubeClient(Connection(server=fake.url, namespace="default", token=lambda: "t"))
            .list("v1", "pods", "a=b"),  # another namespace
            lambda: kube.request("GET", "/api/v1/secrets"),  # cluster scope
        ]
        for call in refused:
            with pytest.raises(KubeError) as info:
                call()
            assert info.value.code == 403, info.value
        assert len(fake.forbidden) == len(refused)
        assert fake.forbidden[0] == ('trainjobs.trainer.kubeflow.org is forbidden: User "mmp-runner" cannot list '
                                     'resource "trainjobs" in API group "trainer.kubeflow.org" in the namespace "mmp"')
        assert 'cannot get resource "pods" in API group ""' in fake.forbidden[1]
        assert 'in the namespace "default"' in fake.forbidden[4]
        assert "at the cluster scope" in fake.forbidden[5]
        with pytest.raises(KubeError) as info:
            kube.pod_logs("absent")
        assert info.value.code == 404 and len(fake.forbidden) == len(refused)  # get on pods/log is granted
    finally:
        fake.stop()


def test_the_fake_server_is_not_held_by_a_client_that_never_finishes_its_tls_handshake(tmp_path):
    """The stand-in's own fault (a full CI run hung on it): the TLS handshake was made in accept() on the serving
    thread, so a client that connected and sent nothing blocked serve_forever, every later client and stop()."""
    import socket
    import ssl
    import threading
    import urllib.error
    import urllib.request

    fake = FakeCluster().start(tls_dir=tmp_path / "tls")
    silent = socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])))  # accepted first
    try:
        try:
            urllib.request.urlopen(f"{fake.url}/version", timeout=10, context=ssl._create_unverified_context())
        except urllib.error.HTTPError:
            pass  # any answer is an answer; a server held by the silent client gives none (a timeout)
        stopper = threading.Thread(target=fake.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "stop() waited on a client that never finished its TLS handshake"
    finally:
        silent.close()
