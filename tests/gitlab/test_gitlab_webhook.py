"""GitLab deliveries through the shared webhook core: each refusal and reason as GitHub's get."""

from __future__ import annotations

import json
import time

import pytest

from mmp.webhook.core import WebhookHandler


@pytest.fixture
def queue(mmp_home):
    from mmp.pipeline.queue import JobQueue

    q = JobQueue()
    yield q
    q.close()


def handler(queue, secret, **kw):
    return WebhookHandler(secret, queue, host="gitlab", **kw)


def experiment_push(gl, **kw):
    return json.dumps(gl.push_for(before="1" * 40, after="2" * 40, modified=["experiment.json"], **kw)).encode()


def test_documented_push_is_parsed_and_ignored_for_touching_no_trigger_file(queue, gl):
    body = (gl.FIXTURES / "push.json").read_bytes()  # GitLab's own example, byte for byte
    response = handler(queue, gl.SECRET).handle(gl.token_headers(body), body)
    assert response.status == 202 and response.body["status"] == "ignored"
    assert "no commit added or modified experiment.json" in response.body["reason"]
    assert queue.list() == []


def test_push_with_experiment_queues_a_gitlab_job(queue, gl):
    body = experiment_push(gl)
    headers = gl.token_headers(body, key="4b1c5e0a-6d1f-4c53-9e49-1f0a1d2e3f40")
    response = handler(queue, gl.SECRET).handle(headers, body)
    assert response.status == 202, response.body
    (job,) = queue.list()
    assert job.payload == {"repository": gl.PROJECT, "clone_url": f"https://gitlab.example.com/{gl.PROJECT}.git",
                           "before": "1" * 40, "after": "2" * 40, "ref": "refs/heads/main",
                           "delivery_id": "4b1c5e0a-6d1f-4c53-9e49-1f0a1d2e3f40",
                           "trigger_files": ["experiment.json"], "host": "gitlab"}


@pytest.mark.parametrize("token, message", [
    ("wrong-token", "X-Gitlab-Token does not match the webhook's secret token"),
    ("gitlab-test-secret-token-7c2", "X-Gitlab-Token does not match"),  # a prefix of the secret
    (None, "X-Gitlab-Token header is missing"),
])
def test_forged_or_missing_token_is_refused_and_nothing_queued(queue, gl, token, message):
    body = experiment_push(gl)
    headers = gl.token_headers(body, token=token or "")
    if token is None:
        del headers["X-Gitlab-Token"]
    response = handler(queue, gl.SECRET).handle(headers, body)
    assert response.status == 401 and message in response.body["error"]
    assert gl.SECRET not in json.dumps(response.body)
    assert queue.list() == []


def test_token_is_refused_before_the_body_is_read(queue, gl):
    refused = handler(queue, gl.SECRET).check_headers({"X-Gitlab-Token": "nope", "X-Gitlab-Event": "Push Hook"})
    assert refused is not None and refused.status == 401


def test_replayed_delivery_launches_once(queue, gl):
    body = experiment_push(gl)
    headers = gl.token_headers(body)
    h = handler(queue, gl.SECRET)
    assert h.handle(headers, body).status == 202
    again = h.handle(headers, body)  # GitLab's retry: same Idempotency-Key
    assert again.status == 200 and again.body["status"] == "duplicate"
    replayed = h.handle(gl.token_headers(body), body)  # the same body under a new key (a replay)
    assert replayed.status == 200 and replayed.body["status"] == "duplicate"
    assert len(queue.list()) == 1


def test_tag_push_is_ignored_with_a_reason(queue, gl):
    body = (gl.FIXTURES / "tag_push.json").read_bytes()
    response = handler(queue, gl.SECRET).handle(gl.token_headers(body, event="Tag Push Hook"), body)
    assert response.status == 202 and response.body["reason"] == "tag push (refs/tags/v1.0.0); only branch pushes train"
    assert queue.list() == []


def test_branch_deletion_is_ignored_with_a_reason(queue, gl):
    body = (gl.FIXTURES / "push-branch-deleted.json").read_bytes()
    response = handler(queue, gl.SECRET).handle(gl.token_headers(body), body)
    assert response.status == 202 and response.body["reason"] == "refs/heads/master was deleted"
    assert queue.list() == []


def test_other_events_are_ignored_and_a_missing_event_header_refused(queue, gl):
    body = b'{"object_kind": "note"}'
    h = handler(queue, gl.SECRET)
    assert h.handle(gl.token_headers(body, event="Note Hook"), body).body["status"] == "ignored"
    headers = gl.token_headers(body)
    del headers["X-Gitlab-Event"]
    response = h.handle(headers, body)
    assert response.status == 400 and "X-Gitlab-Event" in response.body["error"]


def test_push_without_a_delivery_id_is_refused(queue, gl):
    body = experiment_push(gl)
    headers = gl.token_headers(body)
    del headers["Idempotency-Key"], headers["X-Gitlab-Event-UUID"]
    response = handler(queue, gl.SECRET).handle(headers, body)
    assert response.status == 400 and "Idempotency-Key" in response.body["error"]


def test_bad_payload_names_each_field(queue, gl):
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/--upload-pack=x", "before": "x", "after": "2" * 40,
                       "project": {}, "commits": [{"added": "experiment.json"}]}).encode()
    response = handler(queue, gl.SECRET).handle(gl.token_headers(body), body)
    error = response.body["error"]
    assert response.status == 400
    for field in ("'ref'", "'before'", "'project.path_with_namespace'", "'project.git_http_url'", "'commits[0].added'"):
        assert field in error


# -- the signing token (Standard Webhooks headers) ------------------------------------------------
def test_signed_delivery_is_accepted(queue, gl):
    body = experiment_push(gl)
    response = handler(queue, gl.SIGNING_TOKEN).handle(gl.signed_headers(body), body)
    assert response.status == 202, response.body
    assert queue.list()[0].payload["host"] == "gitlab"


def test_signing_key_rotation_accepts_any_listed_signature(queue, gl):
    body = experiment_push(gl)
    headers = gl.signed_headers(body)
    headers["webhook-signature"] = "v1,bm90LXRoaXMtb25l " + headers["webhook-signature"]
    assert handler(queue, gl.SIGNING_TOKEN).handle(headers, body).status == 202


@pytest.mark.parametrize("change, message", [
    ("body", "webhook-signature does not match the body"),
    ("token", "webhook-signature does not match the body"),
    ("old", "webhook-timestamp is 600 s from now"),
    ("missing", "webhook-signature header is missing"),
    ("plain-token", "webhook-id header is missing"),
])
def test_signed_delivery_refusals(queue, gl, change, message):
    body = experiment_push(gl)
    headers = gl.signed_headers(body)
    if change == "body":
        body = body.replace(b"main", b"mainx")
    elif change == "token":
        headers = gl.signed_headers(body, signing_token="whsec_" + "QUFB" * 11)
    elif change == "old":
        headers = gl.signed_headers(body, timestamp=int(time.time()) - 600)
    elif change == "missing":
        del headers["webhook-signature"]
    elif change == "plain-token":  # only X-Gitlab-Token sent where a signing token is configured
        headers = gl.token_headers(body, token=gl.SIGNING_TOKEN)
    response = handler(queue, gl.SIGNING_TOKEN).handle(headers, body)
    assert response.status == 401 and message in response.body["error"]
    assert queue.list() == []


def test_replayed_signed_delivery_launches_once(queue, gl):
    body = experiment_push(gl)
    headers = gl.signed_headers(body)
    h = handler(queue, gl.SIGNING_TOKEN)
    assert h.handle(headers, body).status == 202
    assert h.handle(headers, body).body["status"] == "duplicate"
    assert len(queue.list()) == 1


def test_long_push_asks_the_gitlab_compare_api(queue, gl, gitlab):
    from mmp.webhook.server import compare_for

    repo = gitlab.repo
    before = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    (repo / "experiment.json").write_text((repo / "experiment.json").read_text().replace("'3'", "'4'"))
    gl.git(repo, "commit", "-qam", "experiment")
    after = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    body = json.dumps(gl.push_for(before=before, after=after, modified=["README.md"], commits=20)).encode()
    response = handler(queue, gl.SECRET, compare=compare_for("gitlab")).handle(gl.token_headers(body), body)
    assert response.status == 202 and response.body["status"] == "queued", response.body
    assert any(path.endswith("/repository/compare") for _, path, _ in gitlab.calls)
