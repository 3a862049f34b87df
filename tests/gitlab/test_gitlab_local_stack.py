"""A GitLab push through the local stack: POST /webhook/gitlab → queue → worker → horovodrun → MLflow,
with the commit read from, and statuses reported to, the GitLab stand-in."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest


@pytest.fixture
def queue(mmp_home):
    from mmp.pipeline.queue import JobQueue

    q = JobQueue()
    yield q
    q.close()


@pytest.fixture
def server(queue, monkeypatch, gl):
    monkeypatch.setenv("MMP_WEBHOOK_SECRET", "github-secret-not-gitlabs")
    monkeypatch.setenv("MMP_GITLAB_WEBHOOK_SECRET", gl.SECRET)
    from mmp.webhook.server import local_server

    srv = local_server(port=0, queue=queue).start()
    yield srv
    srv.stop()


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send_twice(port: int, body: bytes, headers: dict, twice: str) -> int:
    """POST /webhook/gitlab with one header sent twice (urllib would merge them)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/webhook/gitlab")
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.putheader(twice, headers[twice])
        conn.endheaders(body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_gitlab_path_has_its_own_secret(server, queue, gl):
    body = json.dumps(gl.push_for(before="1" * 40, after="2" * 40, modified=["experiment.json"])).encode()
    gitlab_url = server.url + "/gitlab"
    status, answer = post(gitlab_url, body, gl.token_headers(body, token="github-secret-not-gitlabs"))
    assert status == 401 and "X-Gitlab-Token does not match" in answer["error"]
    status, answer = post(server.url, body, gl.token_headers(body))  # a GitLab delivery on GitHub's path
    assert status == 401 and "X-Hub-Signature-256" in answer["error"]
    headers = gl.token_headers(body)
    assert post(gitlab_url, body, headers)[0] == 202
    assert post(gitlab_url, body, headers)[1]["status"] == "duplicate"
    assert send_twice(server.port, body, headers, "X-Gitlab-Token") == 400  # ambiguous: refused
    assert [j.payload["host"] for j in queue.list()] == ["gitlab"]


@pytest.mark.horovod
@pytest.mark.slow
def test_gitlab_push_trains_and_concludes_in_mlflow(gitlab, gl, digits, server, queue, caplog):
    from mlflow.tracking import MlflowClient

    from mmp import config
    from mmp.pipeline.worker import Worker

    caplog.set_level(logging.DEBUG)
    repo = gitlab.repo
    before = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    (repo / "experiment.json").write_text((repo / "experiment.json").read_text().replace("'3'", "'1'"))
    gl.git(repo, "commit", "-qam", "train one epoch")
    sha = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    body = json.dumps(gl.push_for(before=before, after=sha, modified=["experiment.json"])).encode()
    status, answer = post(server.url + "/gitlab", body, gl.token_headers(body))
    assert status == 202 and answer["status"] == "queued", answer

    assert Worker(queue).run(once=True) == 1
    (job,) = queue.list()
    assert job.state == "done" and job.run_id, job
    run = MlflowClient(config.tracking_uri()).get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mmp.host"] == "gitlab"
    assert run.data.tags["mlflow.source.name"] == gl.PROJECT
    assert run.data.tags["mlflow.source.git.commit"] == sha
    assert run.data.params["epochs"] == "1"
    assert gitlab.states(sha) == ["pending", "success"]
    assert run.info.run_id in (gitlab.statuses[-1].get("target_url") or "")
    assert gl.TOKEN not in caplog.text and gl.SECRET not in caplog.text
