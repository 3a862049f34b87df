"""mlflowMode sagemaker: the stage Lambdas' REST tracker signs every call with SigV4 for
`sagemaker-mlflow` and names the tracking server, as SageMaker managed MLflow requires. The
server side is pytest-httpserver; each request is checked the way the service checks it:
the signature recomputed over what arrived, with the caller's credentials."""

from __future__ import annotations

import hashlib
import json

import pytest
from werkzeug import Request, Response

from mmp.tracking.rest import RestRunTracker
from mmp.tracking.sigv4 import endpoint

ARN = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/acme-ml-dev-mlflow"
KEY, SECRET, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-example"


@pytest.fixture
def signed_env(monkeypatch):
    for var in ("AWS_PROFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MMP_MLFLOW_PASSWORD_SECRET_ARN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("MMP_MLFLOW_TRACKING_SERVER_ARN", ARN)


def _verify(request: Request) -> None:
    """What SageMaker MLflow checks: scope, body hash, routing header, and the signature itself."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    auth = request.headers["Authorization"]
    algorithm, _, rest = auth.partition(" ")
    fields = dict(part.strip().split("=", 1) for part in rest.split(","))
    assert algorithm == "AWS4-HMAC-SHA256"
    key, date, region, service, terminal = fields["Credential"].split("/")
    assert (key, region, service, terminal) == (KEY, "eu-west-1", "sagemaker-mlflow", "aws4_request")
    signed = fields["SignedHeaders"].split(";")
    assert {"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token",
            "x-mlflow-sm-tracking-server-arn"} <= set(signed)
    body = request.get_data()
    assert request.headers["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert request.headers["x-mlflow-sm-tracking-server-arn"] == ARN
    arrived = AWSRequest(method=request.method, url=request.url, data=body,
                         headers={h: request.headers[h] for h in signed})
    arrived.context["timestamp"] = request.headers["X-Amz-Date"]
    signer = SigV4Auth(Credentials(KEY, SECRET, TOKEN), "sagemaker-mlflow", "eu-west-1")
    expected = signer.signature(signer.string_to_sign(arrived, signer.canonical_request(arrived)), arrived)
    assert fields["Signature"] == expected, "signature does not match the request as received"


def test_the_rest_tracker_signs_every_call_for_sagemaker_mlflow(httpserver, signed_env):
    seen: list[str] = []

    def handle(request: Request) -> Response:
        _verify(request)
        seen.append(f"{request.method} {request.path}")
        answers = {
            "/api/2.0/mlflow/experiments/get-by-name": {"experiment": {"experiment_id": "7"}},
            "/api/2.0/mlflow/runs/create": {"run": {"info": {"run_id": "r123", "experiment_id": "7"}}},
            "/api/2.0/mlflow/runs/log-batch": {},
            "/api/2.0/mlflow/experiments/set-experiment-tag": {},  # the experiment kind, on first use
            "/api/2.0/mlflow/metrics/get-history": {"metrics": [
                {"key": "val_accuracy", "value": 0.9, "timestamp": 1, "step": 1}], "next_page_token": "p2"},
            "/api/2.0/mlflow/runs/get": {"run": {"info": {"run_id": "r123"}, "data": {"metrics": [
                {"key": "val_accuracy", "value": 0.9, "timestamp": 1, "step": 1}]}}},
        }
        return Response(json.dumps(answers[request.path]), content_type="application/json")

    for path in ("experiments/get-by-name", "experiments/set-experiment-tag", "runs/create", "runs/log-batch",
                 "metrics/get-history", "runs/get"):
        httpserver.expect_request(f"/api/2.0/mlflow/{path}").respond_with_handler(handle)
    tracker = RestRunTracker(httpserver.url_for("").rstrip("/"))
    run_id = tracker.start("fashion demo", run_name="abc1234", tags={"mmp.commit": "abc"}, params={"epochs": 2})
    assert run_id == "r123"
    assert seen[0] == "GET /api/2.0/mlflow/experiments/get-by-name"
    assert seen[-2:] == ["POST /api/2.0/mlflow/runs/create", "POST /api/2.0/mlflow/runs/log-batch"]
    assert set(seen[1:-2]) <= {"POST /api/2.0/mlflow/experiments/set-experiment-tag"}  # each one verified
    # a study's pruning reads in the runner task: a bounded page (its query signed too), then the final value
    assert tracker.metric_page(run_id, "val_accuracy", max_results=1000, page_token=None) == ([(1, 0.9)], "p2")
    assert tracker.latest_metric(run_id, "val_accuracy") == 0.9 and tracker.latest_metric(run_id, "loss") is None
    assert seen[-3:] == ["GET /api/2.0/mlflow/metrics/get-history", "GET /api/2.0/mlflow/runs/get",
                         "GET /api/2.0/mlflow/runs/get"]


def test_without_a_tracking_server_arn_nothing_is_signed(httpserver, monkeypatch):
    monkeypatch.delenv("MMP_MLFLOW_TRACKING_SERVER_ARN", raising=False)
    httpserver.expect_request("/api/2.0/mlflow/runs/get").respond_with_json(
        {"run": {"info": {"run_id": "r1", "status": "RUNNING"}}})
    assert RestRunTracker(httpserver.url_for("").rstrip("/")).status("r1") == "RUNNING"
    request, _ = httpserver.log[0]
    assert "Authorization" not in request.headers and "x-mlflow-sm-tracking-server-arn" not in request.headers


def test_the_api_endpoint_is_the_regional_one_the_plugin_uses():
    assert endpoint(ARN) == "https://eu-west-1.experiments.sagemaker.aws"
    with pytest.raises(ValueError, match="MMP_MLFLOW_TRACKING_SERVER_ARN"):
        endpoint("arn:aws:sagemaker:eu-west-1:123456789012:training-job/x")


def test_the_runners_mlflow_client_signs_through_the_sagemaker_mlflow_plugin(httpserver, signed_env, monkeypatch):
    """Issue 19, defect 3: promotion uses MLflow's own client (mmp.models.search.make_client; a study's
    pruning reads go through the REST tracker, signed by MMP: above). With the stack's URL alone it calls the managed server
    unsigned; on the server's ARN the real sagemaker-mlflow plugin signs each call with the
    runner's role (its SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT points it at this test's server)."""
    import mlflow

    from mmp.models.search import make_client

    url = httpserver.url_for("").rstrip("/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # what the runner's environment says (mlflow.api_url)
    monkeypatch.setenv("SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT", url)
    seen: list[str] = []

    def handle(request: Request) -> Response:
        _verify(request)
        seen.append(request.path)
        answers = {
            "/api/2.0/mlflow/experiments/get-by-name": {"experiment": {
                "experiment_id": "7", "name": "fashion demo", "lifecycle_stage": "active"}},
        }
        return Response(json.dumps(answers[request.path]), content_type="application/json")

    httpserver.expect_request("/api/2.0/mlflow/experiments/get-by-name").respond_with_handler(handle)
    try:
        client = make_client(url)  # as promotion makes it
        assert client.get_experiment_by_name("fashion demo").experiment_id == "7"
    finally:
        mlflow.set_tracking_uri(None)
    assert seen == ["/api/2.0/mlflow/experiments/get-by-name"]
