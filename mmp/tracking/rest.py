"""MLflow's REST API with the stdlib, for the paths that must stay light.

The AWS stages run in Lambda, where importing mlflow would dominate the cold start,
and `mmp run` against a tracking server should not pay mlflow's import before the
launch. This speaks the same REST API the MLflow client uses, with the same
credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN; the
password may come from Secrets Manager), and never puts a credential in an error.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from mmp.contract.argv import hyperparameter_text
from mmp.tracking.base import PAGE_SIZE, TrackerBase, ui_url


class MlflowRestError(RuntimeError):
    pass


class RestRunTracker(TrackerBase):
    """The RunTracker interface over HTTP(S) (see mmp.tracking.client.RunTracker)."""

    def __init__(self, tracking_uri: str, *, timeout: float = 15.0, retries: int = 3):
        super().__init__(tracking_uri.rstrip("/"))
        self.timeout = timeout
        self.retries = retries

    # -- transport ---------------------------------------------------------------
    def _auth_header(self) -> dict[str, str]:
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if token:
            return {"Authorization": f"Bearer {token}"}
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and not password and os.environ.get("MMP_MLFLOW_PASSWORD_SECRET_ARN"):
            from mmp.aws import secret

            password = secret(os.environ["MMP_MLFLOW_PASSWORD_SECRET_ARN"])
        if user and password:
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return {}

    @staticmethod
    def _sign(method: str, url: str, data: bytes | None, headers: dict[str, str]) -> dict[str, str]:
        """SigV4 when the server is SageMaker managed MLflow (MMP_MLFLOW_TRACKING_SERVER_ARN set)."""
        from mmp.tracking.sigv4 import sign, tracking_server_arn

        arn = tracking_server_arn()
        return sign(method, url, data, headers, arn) if arn else headers

    def _call(self, method: str, path: str, body: Any = None, *, query: Mapping[str, str] | None = None,
              raw: bytes | None = None, content_type: str = "application/json") -> dict:
        url = f"{self.tracking_uri}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)  # %20, as SigV4 signs
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": content_type, **self._auth_header()}
        delay = 0.5
        for attempt in range(self.retries + 1):
            signed = self._sign(method, url, data, headers)
            request = urllib.request.Request(url, data=data, method=method, headers=signed)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    payload = resp.read()
                return json.loads(payload) if payload else {}
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode(errors="replace")
                if exc.code >= 500 or exc.code == 429:
                    if attempt < self.retries:
                        time.sleep(delay)
                        delay *= 2
                        continue
                raise MlflowRestError(f"MLflow {method} {path} answered {exc.code}: {detail}") from None
            except urllib.error.URLError as exc:
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise MlflowRestError(f"MLflow at {self.tracking_uri} unreachable: {exc.reason}") from None
        raise AssertionError("unreachable")

    # -- RunTracker interface -----------------------------------------------------
    def _find(self, name: str) -> tuple[str, dict[str, str], bool] | None:
        try:
            found = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name", query={"experiment_name": name})
        except MlflowRestError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
            return None
        experiment = found["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        return experiment["experiment_id"], tags, experiment.get("lifecycle_stage") == "deleted"

    def _create_experiment(self, name: str, tags: Mapping[str, str]) -> str:
        return self._call("POST", "/api/2.0/mlflow/experiments/create", {
            "name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]})["experiment_id"]

    def _restore_experiment(self, experiment_id: str) -> None:
        self._call("POST", "/api/2.0/mlflow/experiments/restore", {"experiment_id": experiment_id})

    def _experiment_page(self, token: str | None) -> tuple[list[str], str | None]:
        page = self._call("POST", "/api/2.0/mlflow/experiments/search",
                          {"max_results": PAGE_SIZE, "view_type": "ALL", **({"page_token": token} if token else {})})
        return [e["experiment_id"] for e in page.get("experiments", [])], page.get("next_page_token")

    def _run_page(self, experiment_ids: list[str], filter_string: str, token: str | None
                  ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        page = self._call("POST", "/api/2.0/mlflow/runs/search", {
            "experiment_ids": experiment_ids, "filter": filter_string, "max_results": PAGE_SIZE,
            "run_view_type": "ALL", **({"page_token": token} if token else {})})
        runs = [(run["info"]["run_id"], {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])})
                for run in page.get("runs", [])]
        return runs, page.get("next_page_token")

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self._call("POST", "/api/2.0/mlflow/experiments/set-experiment-tag",
                   {"experiment_id": experiment_id, "key": key, "value": value})

    def start(self, experiment_name: str, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any],
              owner: str | None = None) -> str:
        exp_id = self.experiment_id(experiment_name, owner)
        run = self._call("POST", "/api/2.0/mlflow/runs/create", {
            "experiment_id": exp_id, "run_name": run_name, "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": str(v)} for k, v in {**tags, "mlflow.runName": run_name}.items()],
        })["run"]
        run_id = self._remember(run["info"]["run_id"], exp_id)
        if params:
            self._call("POST", "/api/2.0/mlflow/runs/log-batch", {
                "run_id": run_id, "params": [{"key": k, "value": hyperparameter_text(v)} for k, v in params.items()],
            })
        return run_id

    def get_run(self, run_id: str) -> dict:
        return self._call("GET", "/api/2.0/mlflow/runs/get", query={"run_id": run_id})["run"]

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str:
        experiment_id = (experiment_id or self._known_experiment(run_id)
                         or self.get_run(run_id)["info"]["experiment_id"])
        base = os.environ.get("MMP_MLFLOW_UI_URL") and ui_url() or self.tracking_uri
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if tags:
            self._call("POST", "/api/2.0/mlflow/runs/log-batch",
                       {"run_id": run_id, "tags": [{"key": k, "value": str(v)} for k, v in tags.items()]})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        if metrics:
            self._call("POST", "/api/2.0/mlflow/runs/log-batch", {"run_id": run_id, "metrics": [
                {"key": k, "value": float(v), "timestamp": now, "step": 0} for k, v in metrics.items()]})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload through the server's artifact proxy, or straight to S3 for s3:// roots."""
        root = self.get_run(run_id)["info"]["artifact_uri"]
        parsed = urllib.parse.urlparse(root)
        if parsed.scheme == "mlflow-artifacts":
            path = f"/api/2.0/mlflow-artifacts/artifacts{parsed.path}/{artifact_file}"
            self._call("PUT", urllib.parse.quote(path), raw=text.encode(), content_type="text/plain")
        elif parsed.scheme == "file":
            target = Path(urllib.parse.unquote(parsed.path)) / artifact_file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        elif parsed.scheme == "s3":
            from mmp.aws import client

            key = f"{parsed.path.lstrip('/')}/{artifact_file}"
            client("s3").put_object(Bucket=parsed.netloc, Key=key, Body=text.encode())
        else:
            raise MlflowRestError(f"cannot upload artifacts to {root!r} over REST")

    def _terminate(self, run_id: str, status: str) -> None:
        self._call("POST", "/api/2.0/mlflow/runs/update",
                   {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    def status(self, run_id: str) -> str:
        return self.get_run(run_id)["info"]["status"]

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {t["key"]: t.get("value", "") for t in self.get_run(run_id).get("data", {}).get("tags", [])}

    def metric_page(self, run_id: str, key: str, *, max_results: int, page_token: str | None
                    ) -> tuple[list[tuple[int, float]], str | None]:
        query = {"run_id": run_id, "metric_key": key, "max_results": str(max_results)}
        if page_token:
            query["page_token"] = page_token
        page = self._call("GET", "/api/2.0/mlflow/metrics/get-history", query=query)
        rows = [(int(m.get("step", 0)), float(m["value"])) for m in page.get("metrics", [])]
        return rows, page.get("next_page_token") or None

    def latest_metric(self, run_id: str, key: str) -> float | None:
        for metric in self.get_run(run_id).get("data", {}).get("metrics", []):
            if metric["key"] == key:
                return float(metric["value"])
        return None
