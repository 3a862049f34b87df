"""The shared webhook core on GitHub's real payloads: signature, filtering, bodies, idempotency."""

from __future__ import annotations

import json
import subprocess
import urllib.parse

import pytest

from mmp.hosts.github import sign, verify_signature
from mmp.webhook.core import MAX_BODY_BYTES, WebhookHandler

PUSH = "push-added-and-modified.json"


@pytest.fixture
def handler(queue, gh):
    return WebhookHandler(gh.SECRET, queue)


def deliver(handler, gh, payload, event="push", delivery=None, **kw):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return handler.handle(gh.headers_for(body, event, delivery, **kw), body)


def test_github_signature_test_vector(gh):
    vector = json.loads(gh.fixture_bytes("signature-test-vector.json"))
    payload = vector["payload"].encode()
    assert sign(vector["secret"], payload) == vector["x_hub_signature_256"]
    assert verify_signature(vector["secret"], payload, vector["x_hub_signature_256"])
    assert not verify_signature(vector["secret"], payload + b"\n", vector["x_hub_signature_256"])
    assert not verify_signature("another secret", payload, vector["x_hub_signature_256"])
    assert not verify_signature(vector["secret"], payload, "sha1=" + vector["signature_hex"])
    assert not verify_signature(vector["secret"], payload, None)


@pytest.mark.parametrize("name", ["ping-docs.json", "ping-organization.json", "ping-repository.json",
                                  "ping-with-app_id.json"])
def test_pings_get_200(handler, gh, queue, name):
    response = deliver(handler, gh, gh.fixture_bytes(name), event="ping")
    assert response.status == 200 and response.body["status"] == "pong"
    assert queue.counts()["queued"] == 0


@pytest.mark.parametrize("name, reason", [
    ("push-tag-deleted.json", "deleted"),
    ("push-tag-deleted-with-organization.json", "deleted"),
    ("push-tag-created-docs.json", "tag push"),
    ("push-tag-created-ghes.json", "tag push"),
    ("push-branch-created.json", "no commit added or modified experiment.json"),
    ("push-no-username-committer.json", "no commit added or modified experiment.json"),
    ("push-added-and-modified.json", "no commit added or modified experiment.json"),
    ("push-modified-file.json", "no commit added or modified experiment.json"),
])
def test_real_pushes_that_do_not_train_are_ignored_with_a_reason(handler, gh, queue, name, reason):
    response = deliver(handler, gh, gh.fixture_bytes(name))
    assert response.status == 202
    assert response.body["status"] == "ignored" and reason in response.body["reason"]
    assert queue.counts()["queued"] == 0


def test_other_events_get_202_with_reason(handler, gh, queue):
    response = deliver(handler, gh, gh.fixture_bytes(PUSH), event="issues")
    assert response.status == 202 and "'issues'" in response.body["reason"]
    assert queue.counts()["queued"] == 0


@pytest.mark.parametrize("kind", ["added", "modified"])
@pytest.mark.parametrize("name", ["experiment.json", "experiment_config.json"])
def test_push_adding_or_modifying_the_experiment_file_is_queued(handler, gh, queue, kind, name):
    payload = gh.with_files(PUSH, **{kind: [name, "README.md"]})
    response = deliver(handler, gh, payload, delivery="d-1")
    assert response.status == 202 and response.body["status"] == "queued"
    job = queue.get("d-1")
    assert job.payload == {
        "repository": "binkkatal/sample_app", "clone_url": "https://github.com/binkkatal/sample_app.git",
        "before": payload["before"], "after": payload["after"], "ref": "refs/heads/master",
        "delivery_id": "d-1", "trigger_files": [name],
    }


def test_experiment_file_in_a_subfolder_does_not_train(handler, gh, queue):
    response = deliver(handler, gh, gh.with_files(PUSH, modified=["configs/experiment.json"]))
    assert response.body["status"] == "ignored"
    assert queue.counts()["queued"] == 0


def test_removed_experiment_file_is_ignored(handler, gh, queue):
    response = deliver(handler, gh, gh.with_files(PUSH, removed=["experiment.json"]))
    assert response.status == 202 and "experiment.json removed" in response.body["reason"]
    assert queue.counts()["queued"] == 0


def test_added_then_removed_in_the_same_push_is_ignored(handler, gh, queue):
    payload = gh.with_files(PUSH, added=["experiment.json"], commits=2)
    payload["commits"][1].update(added=[], removed=["experiment.json"])
    assert deliver(handler, gh, payload).body["status"] == "ignored"
    assert queue.counts()["queued"] == 0


def test_promote_json_is_queued_for_promotion(handler, gh, queue):
    response = deliver(handler, gh, gh.with_files(PUSH, added=["promote.json"]), delivery="p-1")
    assert response.status == 202
    assert queue.get("p-1").payload["trigger_files"] == ["promote.json"]


def test_same_delivery_twice_is_queued_once(handler, gh, queue):
    payload = gh.with_files(PUSH, modified=["experiment.json"])
    first = deliver(handler, gh, payload, delivery="same")
    second = deliver(handler, gh, payload, delivery="same")
    assert (first.status, second.status) == (202, 200)
    assert second.body["status"] == "duplicate"
    assert queue.counts()["queued"] == 1


def test_replayed_body_under_a_new_delivery_id_is_not_queued(handler, gh, queue):
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    assert deliver(handler, gh, body, delivery="orig").status == 202
    replay = deliver(handler, gh, body, delivery="attacker-made-up-id")
    assert replay.body["status"] == "duplicate"
    assert queue.counts()["queued"] == 1 and queue.get("attacker-made-up-id") is None


def test_forged_and_missing_signatures_get_401(handler, gh, queue):
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    forged = gh.headers_for(body, secret="wrong")
    assert handler.handle(forged, body).status == 401
    unsigned = {k: v for k, v in gh.headers_for(body).items() if k != "X-Hub-Signature-256"}
    response = handler.handle(unsigned, body)
    assert response.status == 401 and "X-Hub-Signature-256" in response.body["error"]
    tampered = gh.headers_for(body)
    assert handler.handle(tampered, body.replace(b"master", b"mastex")).status == 401
    assert queue.counts()["queued"] == 0


def test_signature_checked_before_parsing(handler, gh):
    assert handler.handle(gh.headers_for(b"{}", secret="wrong"), b"not json at all").status == 401


def test_no_secret_configured_refuses_everything(queue, gh):
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    response = WebhookHandler(lambda: None, queue).handle(gh.headers_for(body), body)
    assert response.status == 500 and queue.counts()["queued"] == 0


def test_body_over_25_mb_gets_413(handler, gh, queue):
    body = b" " * (MAX_BODY_BYTES + 1)
    response = handler.handle(gh.headers_for(body), body)
    assert response.status == 413 and queue.counts()["queued"] == 0


@pytest.mark.parametrize("body, fragment", [
    (b'{"ref": "refs/heads/main", ', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_malformed_bodies_get_400(handler, gh, queue, body, fragment):
    response = handler.handle(gh.headers_for(body), body)
    assert response.status == 400 and fragment in response.body["error"]
    assert queue.counts()["queued"] == 0


def test_truncated_real_payload_gets_400(handler, gh, queue):
    body = gh.fixture_bytes(PUSH)[:-40]
    assert handler.handle(gh.headers_for(body), body).status == 400


@pytest.mark.parametrize("drop, field", [
    ("after", "'after'"), ("repository", "'repository'"), ("commits", "'commits'"), ("ref", "'ref'"),
])
def test_payloads_missing_fields_get_400_naming_them(handler, gh, queue, drop, field):
    payload = gh.with_files(PUSH, modified=["experiment.json"])
    del payload[drop]
    response = deliver(handler, gh, payload)
    assert response.status == 400 and field in response.body["error"]
    assert queue.counts()["queued"] == 0


def test_bad_sha_and_missing_delivery_header(handler, gh, queue):
    payload = gh.with_files(PUSH, modified=["experiment.json"], after="not-a-sha")
    assert "40-character" in deliver(handler, gh, payload).body["error"]
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    headers = {k: v for k, v in gh.headers_for(body).items() if k != "X-GitHub-Delivery"}
    assert handler.handle(headers, body).status == 400
    assert queue.counts()["queued"] == 0


def test_form_encoded_payload_is_accepted(handler, gh, queue):
    payload = gh.with_files(PUSH, modified=["experiment.json"])
    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    response = handler.handle(gh.headers_for(body, content_type="application/x-www-form-urlencoded"), body)
    assert response.status == 202 and queue.counts()["queued"] == 1


def test_form_without_payload_field_gets_400(handler, gh):
    body = b"other=1"
    response = handler.handle(gh.headers_for(body, content_type="application/x-www-form-urlencoded"), body)
    assert response.status == 400 and "'payload'" in response.body["error"]


def test_unsupported_content_type_gets_415(handler, gh, queue):
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    response = handler.handle(gh.headers_for(body, content_type="text/plain"), body)
    assert response.status == 415 and "application/json" in response.body["error"]
    assert queue.counts()["queued"] == 0


def test_headers_are_case_insensitive(handler, gh, queue):
    body = json.dumps(gh.with_files(PUSH, modified=["experiment.json"])).encode()
    lower = {k.lower(): v for k, v in gh.headers_for(body).items()}
    assert handler.handle(lower, body).status == 202


def test_long_push_asks_compare_for_changed_files(queue, gh):
    calls = []

    def compare(full_name, clone_url, base, head):
        calls.append((full_name, base, head))
        return {"added": [], "modified": ["experiment.json"], "removed": []}

    handler = WebhookHandler(gh.SECRET, queue, compare=compare)
    payload = gh.with_files(PUSH, modified=["README.md"], commits=20)  # may be cut short
    response = deliver(handler, gh, payload)
    assert response.status == 202 and calls == [("binkkatal/sample_app", payload["before"], payload["after"])]
    short = gh.with_files(PUSH, modified=["README.md"], commits=3)
    assert deliver(handler, gh, short).body["status"] == "ignored" and len(calls) == 1


def test_long_push_whose_compare_fails_gets_503_and_queues_nothing(queue, gh):
    def compare(*args):
        raise ConnectionError("github down")

    handler = WebhookHandler(gh.SECRET, queue, compare=compare)
    response = deliver(handler, gh, gh.with_files(PUSH, modified=["README.md"], commits=25))
    assert response.status == 503 and "redeliver" in response.body["error"]
    assert queue.counts()["queued"] == 0


def test_new_branch_with_long_list_compares_against_default_branch(queue, gh):
    seen = []
    handler = WebhookHandler(gh.SECRET, queue, compare=lambda n, u, b, h: seen.append(b) or {"added": ["experiment.json"]})
    payload = gh.with_files("push-branch-created.json", added=["x"], commits=20)
    payload["ref"] = "refs/heads/feature"
    assert deliver(handler, gh, payload).status == 202
    assert seen == [payload["repository"]["default_branch"]]


def test_local_compare_uses_git(make_repo, gh):
    from mmp.webhook.server import compare_for

    local_compare = compare_for("github")

    repo = make_repo()
    before = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "experiment.json").write_text((repo / "experiment.json").read_text().replace('"1"', '"2"'))
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", "more"], check=True)
    after = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert local_compare("x", str(repo), before, after)["modified"] == ["experiment.json"]


def test_default_branch_that_looks_like_an_option_is_never_compared(queue, gh):
    seen = []
    handler = WebhookHandler(gh.SECRET, queue, compare=lambda n, u, b, h: seen.append(b) or {"added": []})
    payload = gh.with_files("push-branch-created.json", added=["x"], commits=20)
    payload["repository"]["default_branch"] = "--output=/tmp/pwned"
    assert deliver(handler, gh, payload).body["status"] == "ignored"
    assert seen == []


# refs git would refuse (git check-ref-format, and --branch for refs/heads/) never reach the queue
HOSTILE_REFS = [
    "refs/heads/--upload-pack=touch /tmp/pwned", "refs/heads/--upload-pack=evil", "refs/heads/-x", "refs/heads/a..b", "refs/heads/a b",
    "refs/heads/a~1", "refs/heads/a^", "refs/heads/a:b", "refs/heads/a?", "refs/heads/a*", "refs/heads/a[b",
    "refs/heads/a\\b", "refs/heads/a@{1}", "refs/heads/.hidden", "refs/heads/x.lock", "refs/heads/a/", "refs/heads/a.",
    "refs/heads//a", "refs/heads/a\x00b", "refs/heads/a\tb", "refs/heads/a\x7fb", "refs/heads/HEAD", "main",
    "refs/heads/" + "x" * 1100,
]
GOOD_REFS = ["refs/heads/main", "refs/heads/feature/new-model", "refs/heads/v1.2_rc", "refs/heads/a-", "refs/heads/é",
             "refs/heads/a@b", "refs/heads/feature/-x"]


def git_accepts_branch_ref(ref: str) -> bool:
    """The real git's verdict: `git check-ref-format --branch` on the branch part."""
    if "\x00" in ref:
        return False  # cannot even be passed as an argument
    if not ref.startswith("refs/heads/"):
        return False
    return subprocess.run(["git", "check-ref-format", "--branch", ref.removeprefix("refs/heads/")],
                          capture_output=True).returncode == 0 and \
        subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0


@pytest.mark.parametrize("ref", HOSTILE_REFS)
def test_refs_git_refuses_get_400_and_are_not_queued(handler, gh, queue, ref):
    if len(ref) < 1000:
        assert not git_accepts_branch_ref(ref), f"git accepts {ref!r}: the test case is wrong"
    response = deliver(handler, gh, gh.with_files(PUSH, modified=["experiment.json"], ref=ref))
    assert response.status == 400 and "'ref'" in response.body["error"], response.body
    assert queue.counts()["queued"] == 0


@pytest.mark.parametrize("ref", GOOD_REFS)
def test_refs_git_accepts_are_queued(handler, gh, queue, ref):
    assert git_accepts_branch_ref(ref)
    response = deliver(handler, gh, gh.with_files(PUSH, modified=["experiment.json"], ref=ref))
    assert response.status == 202 and response.body["job"]["ref"] == ref


@pytest.mark.parametrize("kind", ["array", "object"])
def test_deeply_nested_json_gets_400_not_a_crash(handler, gh, queue, kind):
    nest = (b"[" * 100_000 + b"]" * 100_000) if kind == "array" else (b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    for body in (nest, b'{"ref": ' + (b"[" * 200 + b"]" * 200) + b"}"):  # past the parser's limit, and past ours
        response = handler.handle(gh.headers_for(body), body)
        assert response.status == 400 and "nests JSON deeper than" in response.body["error"], response.body
    form = b"payload=" + urllib.parse.quote(nest.decode()).encode()
    response = handler.handle(gh.headers_for(form, content_type="application/x-www-form-urlencoded"), form)
    assert response.status == 400 and "nests JSON deeper than" in response.body["error"]
    assert queue.counts()["queued"] == 0
