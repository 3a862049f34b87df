"""The GitHub REST client against recorded responses served by a real local HTTP server."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest

from ..conftest import REGION
from werkzeug import Response

from mmp.hosts.github import GitHubClient, GitHubError, GitHubSource, GitHubStatusReporter, RateLimited

TOKEN = "ghp_TESTTOKEN0123456789abcdefSECRET"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"


@pytest.fixture
def client(httpserver):
    return GitHubClient(TOKEN, httpserver.url_for("").rstrip("/"), backoff=0.01, max_wait=2)


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("name", ["api-get-contents-file-recorded.json", "api-get-contents-file-ref-recorded.json",
                                  "api-get-readme-multiline-base64-recorded.json"])
def test_contents_api_decodes_recorded_base64(httpserver, client, gh, name):
    recorded = json.loads(gh.fixture_bytes(name))
    owner_repo = recorded["url"].split("/repos/")[1].split("/contents/")[0]
    httpserver.expect_request(f"/repos/{owner_repo}/contents/{recorded['path']}",
                              query_string={"ref": SHA}).respond_with_json(recorded)
    data = client.get_file(owner_repo, recorded["path"], SHA)
    assert len(data) == recorded["size"]
    assert git_blob_sha(data) == recorded["sha"]  # the real blob, byte for byte
    request, _ = httpserver.log[0]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["X-GitHub-Api-Version"] == "2022-11-28"


def test_missing_file_is_none(httpserver, client):
    httpserver.expect_request("/repos/o/r/contents/experiment.json").respond_with_json(
        {"message": "Not Found", "documentation_url": "https://docs.github.com"}, status=404)
    assert client.get_file("o/r", "experiment.json", SHA) is None
    assert len(httpserver.log) == 1  # a 404 is final


def test_large_file_falls_back_to_raw(httpserver, client):
    httpserver.expect_request("/repos/o/r/contents/big.json", headers={"Accept": "application/vnd.github+json"}) \
        .respond_with_json({"type": "file", "encoding": "none", "content": "", "size": 2_000_000})
    httpserver.expect_request("/repos/o/r/contents/big.json", headers={"Accept": "application/vnd.github.raw"}) \
        .respond_with_data(b'{"a": 1}\n')
    assert client.get_file("o/r", "big.json", SHA) == b'{"a": 1}\n'


def test_commit_status_matches_the_recorded_session(httpserver, client, gh):
    recorded = json.loads(gh.fixture_bytes("api-create-commit-status-recorded-octokit-fixture.json"))[0]
    httpserver.expect_request(recorded["path"], method="POST", json=recorded["body"]).respond_with_json(
        recorded["response"], status=recorded["status"])
    owner_repo = recorded["path"].split("/repos/")[1].split("/statuses/")[0]
    sha = recorded["path"].rsplit("/", 1)[1]
    answer = client.create_status(owner_repo, sha, recorded["body"]["state"], recorded["body"]["description"],
                                  recorded["body"]["target_url"], context=recorded["body"]["context"])
    assert answer["state"] == "failure" and answer["id"] == recorded["response"]["id"]


def test_status_reporter_sends_mmp_context_and_short_description(httpserver, client, gh):
    example = json.loads(gh.fixture_bytes("api-create-commit-status-openapi-example.json"))
    httpserver.expect_request(f"/repos/octocat/Hello-World/statuses/{SHA}", method="POST") \
        .respond_with_json(example, status=201)
    GitHubStatusReporter(client).report("octocat/Hello-World", SHA, "pending", "x" * 500,
                                        "http://127.0.0.1:5000/#/experiments/1/runs/abc")
    sent = json.loads(httpserver.log[0][0].data)
    assert sent["context"] == "mmp/training" and sent["state"] == "pending"
    assert len(sent["description"]) == 140
    assert sent["target_url"].endswith("/runs/abc")
    with pytest.raises(ValueError, match="pending, success, failure, error"):
        client.create_status("octocat/Hello-World", SHA, "done")


def test_compare_lists_changed_files(httpserver, client):
    httpserver.expect_request(f"/repos/o/r/compare/aaa...{SHA}").respond_with_json({"files": [
        {"filename": "experiment.json", "status": "modified"},
        {"filename": "new.py", "status": "added"},
        {"filename": "old.py", "status": "removed"},
        {"filename": "b.txt", "status": "renamed", "previous_filename": "a.txt"},
    ]})
    assert client.compare("o/r", "aaa", SHA) == {"added": ["new.py", "b.txt"], "modified": ["experiment.json"],
                                                "removed": ["old.py", "a.txt"]}


def test_5xx_is_retried_then_succeeds(httpserver, client, gh):
    recorded = json.loads(gh.fixture_bytes("api-get-contents-file-recorded.json"))
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_data("bad gateway", status=502)
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_json({"message": "x"}, status=503)
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_json(recorded)
    assert client.get_file("o/r", "f", SHA) == b"thanks for reading me\n"
    assert len(httpserver.log) == 3


def test_5xx_gives_up_after_retries(httpserver, gh):
    httpserver.expect_request("/repos/o/r/contents/f").respond_with_json({"message": "Server Error"}, status=500)
    client = GitHubClient(TOKEN, httpserver.url_for("").rstrip("/"), retries=2, backoff=0.01)
    with pytest.raises(GitHubError, match="answered 500: Server Error") as info:
        client.get_file("o/r", "f", SHA)
    assert info.value.status == 500 and len(httpserver.log) == 3


def test_rate_limit_waits_for_the_reset_then_retries(httpserver, client, gh):
    recorded = json.loads(gh.fixture_bytes("api-get-contents-file-recorded.json"))
    reset = str(int(time.time()))
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_response(Response(
        json.dumps({"message": "API rate limit exceeded"}), status=403,
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}))
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_response(Response(
        json.dumps({"message": "secondary rate limit"}), status=429, headers={"retry-after": "0"}))
    httpserver.expect_ordered_request("/repos/o/r/contents/f").respond_with_json(recorded)
    assert client.get_file("o/r", "f", SHA) == b"thanks for reading me\n"


def test_rate_limit_reset_far_away_fails_at_once(httpserver, client):
    httpserver.expect_request("/repos/o/r/contents/f").respond_with_response(Response(
        json.dumps({"message": "API rate limit exceeded"}), status=403,
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 3600)}))
    with pytest.raises(RateLimited, match="403: API rate limit exceeded"):
        client.get_file("o/r", "f", SHA)
    assert len(httpserver.log) == 1


@pytest.mark.parametrize("status, message", [(401, "Bad credentials"), (403, "Resource not accessible")])
def test_auth_failures_are_not_retried(httpserver, client, status, message):
    httpserver.expect_request("/repos/o/r/contents/f").respond_with_json({"message": message}, status=status)
    with pytest.raises(GitHubError, match=message):
        client.get_file("o/r", "f", SHA)
    assert len(httpserver.log) == 1


def test_token_never_in_errors_logs_or_repr(httpserver, caplog):
    caplog.set_level(logging.DEBUG)
    # a server that echoes the Authorization header back in its error message
    httpserver.expect_request("/repos/o/r/contents/f").respond_with_handler(
        lambda req: Response(json.dumps({"message": f"bad {req.headers.get('Authorization')}"}), status=502))
    client = GitHubClient(TOKEN, httpserver.url_for("").rstrip("/"), retries=1, backoff=0.01)
    with pytest.raises(GitHubError) as info:
        client.get_file("o/r", "f", SHA)
    assert TOKEN not in str(info.value) and "***" in str(info.value)
    assert TOKEN not in repr(client) and TOKEN not in caplog.text
    assert "retry" in caplog.text  # the retry was logged, scrubbed


def test_source_and_enterprise_base_url_from_env(httpserver, monkeypatch, gh):
    recorded = json.loads(gh.fixture_bytes("api-get-contents-file-recorded.json"))
    httpserver.expect_request("/api/v3/repos/o/r/contents/train.py").respond_with_json(recorded)
    monkeypatch.setenv("MMP_GITHUB_API_URL", httpserver.url_for("/api/v3"))
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    source = GitHubSource(GitHubClient.from_env(), "o/r", SHA)
    assert source.read_file("train.py") == source.read_file("train.py") == b"thanks for reading me\n"
    assert len(httpserver.log) == 1  # cached per commit
    assert httpserver.log[0][0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_token_from_secrets_manager(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        import boto3

        arn = boto3.client("secretsmanager").create_secret(Name="gh-token", SecretString=TOKEN)["ARN"]
        monkeypatch.setenv("MMP_GITHUB_TOKEN_SECRET_ARN", arn)
        from mmp import aws
        from mmp.hosts.github import token_from_env

        aws._SECRETS.clear()
        assert token_from_env() == TOKEN
        aws._SECRETS.clear()


def test_a_secret_handed_over_by_arn_is_read_in_the_arns_region(monkeypatch):
    """A secret's ARN names its region: a process in another region (or with none set but the
    fallback) still reads it where it lives, not NotFound in its own region."""
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        import boto3

        arn = boto3.client("secretsmanager", "eu-central-1").create_secret(
            Name="gh-token", SecretString=TOKEN)["ARN"]
        from mmp import aws

        assert aws.arn_region(arn) == "eu-central-1" and aws.arn_region("gh-token") is None
        aws._SECRETS.clear()
        try:
            assert aws.secret(arn) == TOKEN  # this process's region is REGION, not the secret's
        finally:
            aws._SECRETS.clear()
