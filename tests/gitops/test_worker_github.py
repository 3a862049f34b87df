"""The worker on GitHub jobs: API failures and invalid files give statuses and notices, never a launch."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from werkzeug import Response

from mmp.hosts.github import GitHubClient, GitHubHost
from mmp.pipeline.worker import Worker
from mmp.pipeline.job import Job

TOKEN = "ghp_WORKERTOKEN_abcdef0123456789_SECRET"
SHA = "fd489864e7642b48eaad6e3f155c10e46810ec72"
REPO = "binkkatal/sample_app"


@pytest.fixture
def run_job(httpserver, queue, caplog, monkeypatch, secret_env):
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    httpserver.expect_request(f"/repos/{REPO}/statuses/{SHA}", method="POST").respond_with_json({"id": 1}, status=201)

    def _run():
        job = Job(repository=REPO, clone_url=f"https://github.com/{REPO}.git", before="0" * 40, after=SHA,
                  ref="refs/heads/master", delivery_id="gh-job-1", trigger_files=["experiment.json"])
        assert queue.submit(job, "digest")
        client = GitHubClient.from_env(base_url=httpserver.url_for("").rstrip("/"), backoff=0.01, max_wait=1)
        worker = Worker(queue, hosts={"github": GitHubHost(client=client)})
        assert worker.run_once()
        statuses = [json.loads(req.data) for req, _ in httpserver.log if req.method == "POST"]
        notes = [json.loads(p.read_text()) for p in (worker.notifier.root).glob("*.json")]
        return queue.get("gh-job-1"), statuses, notes

    return _run


def contents(httpserver, responder):
    httpserver.expect_request(f"/repos/{REPO}/contents/experiment.json").respond_with_response(responder)
    httpserver.expect_request(f"/repos/{REPO}/contents/experiment_config.json").respond_with_response(responder)


def no_runs():
    from mmp.pipeline.store import RunStore

    return RunStore().list() == []


def assert_secret_free(caplog, statuses, notes, job):
    blob = caplog.text + json.dumps(statuses) + json.dumps(notes) + json.dumps(job.to_dict())
    assert TOKEN not in blob


def test_missing_file_404_gives_error_status_and_notice(httpserver, run_job, caplog):
    """The push listed experiment.json, yet GitHub answers 404 at that commit: an API fault."""
    contents(httpserver, Response(json.dumps({"message": "Not Found"}), status=404))
    job, statuses, notes = run_job()
    assert [s["state"] for s in statuses] == ["error"]
    assert "experiment.json: listed in the push but not found" in statuses[0]["description"]
    assert statuses[0]["context"] == "mmp/training"
    assert notes[0]["state"] == "ERROR" and notes[0]["delivery_id"] == "gh-job-1"
    assert job.state == "failed" and no_runs()
    assert_secret_free(caplog, statuses, notes, job)


@pytest.mark.parametrize("status, headers, fragment", [
    (401, {}, "401: Bad credentials"),
    (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 3600)}, "403: API rate limit"),
    (502, {}, "502"),
])
def test_api_failures_give_error_status_and_notice(httpserver, run_job, caplog, status, headers, fragment):
    message = {401: "Bad credentials", 403: "API rate limit exceeded"}.get(status, "Bad Gateway")
    contents(httpserver, Response(json.dumps({"message": message}), status=status, headers=headers))
    job, statuses, notes = run_job()
    assert [s["state"] for s in statuses] == ["error"]
    assert fragment in statuses[0]["description"] and len(statuses[0]["description"]) <= 140
    assert notes[0]["state"] == "ERROR" and fragment in notes[0]["message"]
    assert job.state == "failed" and no_runs()
    assert_secret_free(caplog, statuses, notes, job)


def test_invalid_experiment_gives_failure_with_first_errors(httpserver, run_job, caplog):
    bad = json.dumps({"Platform": "moon", "Dataset_Name": "digits", "Training_Instance": "x",
                      "Instance_Count": "zero", "Hyperparameters": "{}"}).encode()
    encoded = base64.encodebytes(bad).decode()  # wrapped with newlines, as GitHub sends it
    contents(httpserver, Response(json.dumps({"type": "file", "encoding": "base64", "content": encoded}), status=200))
    job, statuses, notes = run_job()
    assert [s["state"] for s in statuses] == ["failure"]
    assert "Platform" in statuses[0]["description"]
    assert notes[0]["state"] == "INVALID" and any("Instance_Count" in p for p in notes[0]["problems"])
    assert no_runs()
