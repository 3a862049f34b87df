"""The GitLab client and its pipeline faces against the GitLab stand-in (real HTTP, a real git repository)."""

from __future__ import annotations

import io
import tarfile

import pytest

from mmp.hosts.base import get_host
from mmp.hosts.gitlab import GitLabClient, GitLabError


@pytest.fixture
def commit(gitlab, gl):
    repo = gitlab.repo
    (repo / "train.py").unlink()
    (repo / "real.py").write_text("print('hi')\n")
    (repo / "train.py").symlink_to("real.py")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    gl.git(repo, "add", "-A")
    gl.git(repo, "update-index", "--add", "--cacheinfo", "160000", "1" * 40, "vendored")
    gl.git(repo, "commit", "-qm", "layout")
    return gl.git(repo, "rev-parse", "HEAD").decode().strip()


def test_source_reads_files_and_entry_types(gitlab, gl, commit):
    source = get_host("gitlab").source(gl.PROJECT, "", commit)
    assert source.read_file("experiment.json") == (gitlab.repo / "experiment.json").read_bytes()
    assert source.read_file("pkg/mod.py") == b"x = 1\n"
    assert source.read_file("missing.txt") is None
    assert source.entry_type("experiment.json") == "file"
    assert source.entry_type("train.py") == "symlink"
    assert source.entry_type("pkg") == "dir"
    assert source.entry_type("vendored") == "submodule"
    assert source.entry_type("pkg/mod.py") == "file"
    assert source.entry_type("nope.py") is None
    assert source.entry_type("nofolder/x.py") is None


def test_tree_follows_pages(gitlab, gl):
    repo = gitlab.repo
    for i in range(130):
        (repo / f"f{i:03}.txt").write_text(str(i))
    gl.git(repo, "add", "-A")
    gl.git(repo, "commit", "-qm", "many")
    sha = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    assert get_host("gitlab").source(gl.PROJECT, "", sha).entry_type("f129.txt") == "file"
    pages = [q.get("page") for _, path, q in gitlab.calls if path.endswith("/tree")]
    assert pages == ["1", "2"]


def test_archive_is_the_commit_tree(gitlab, gl, commit):
    data = get_host("gitlab").archive(gl.PROJECT, "", commit)
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert f"fashion-{commit}-{commit}/experiment.json" in names


def test_compare_lists_added_modified_removed_and_renames(gitlab, gl):
    repo = gitlab.repo
    base = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    (repo / "experiment.json").write_text((repo / "experiment.json").read_text() + "\n")
    gl.git(repo, "mv", "requirements.txt", "reqs.txt")
    (repo / "new.txt").write_text("new")
    gl.git(repo, "rm", "-q", "experiment.tuning.json")
    gl.git(repo, "add", "-A")
    gl.git(repo, "commit", "-qm", "changes")
    head = gl.git(repo, "rev-parse", "HEAD").decode().strip()
    changes = get_host("gitlab").compare(gl.PROJECT, "", base, head)
    assert changes == {"added": ["new.txt", "reqs.txt"], "modified": ["experiment.json"],
                       "removed": ["experiment.tuning.json", "requirements.txt"]}


def test_status_goes_pending_then_success_with_gitlab_names(gitlab, gl):
    sha = gl.git(gitlab.repo, "rev-parse", "HEAD").decode().strip()
    reporter = get_host("gitlab").reporter()
    reporter.report(gl.PROJECT, sha, "pending", "training on local", "http://mlflow/#/runs/1")
    reporter.report(gl.PROJECT, sha, "pending", "training on local", "http://mlflow/#/runs/1")  # GitLab: 400, a no-op
    reporter.report(gl.PROJECT, sha, "success", "succeeded: done", "http://mlflow/#/runs/1")
    assert gitlab.states(sha) == ["pending", "success"]
    assert gitlab.statuses[-1]["target_url"] == "http://mlflow/#/runs/1"
    reporter.report(gl.PROJECT, sha, "failure", "failed: exit 1", None, context="mmp/promotion")
    reporter.report(gl.PROJECT, sha, "error", "cancelled: stopped", None, context="mmp/promotion")
    assert gitlab.states(sha, "mmp/promotion") == ["failed", "canceled"]


def test_token_never_reaches_errors_or_repr(gitlab, gl):
    client = GitLabClient.from_env(retries=0)
    assert gl.TOKEN not in repr(client) and "token=set" in repr(client)
    bad = GitLabClient(token="glpat-wrong-secret", url=gitlab.url, retries=0)
    with pytest.raises(GitLabError, match="answered 401") as info:
        bad.get_file(gl.PROJECT, "experiment.json", "HEAD")
    assert "glpat-wrong-secret" not in str(info.value)
    with pytest.raises(GitLabError, match="404: 404 Project Not Found"):
        client.create_status("someone/else", "a" * 40, "pending")


def test_self_managed_base_url_is_a_setting(monkeypatch):
    monkeypatch.setenv("MMP_GITLAB_URL", "https://git.example.org/")
    assert GitLabClient().base_url == "https://git.example.org/api/v4"


def test_bad_project_path_and_state_are_named():
    client = GitLabClient(token="t", url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="full path 'group/project'"):
        client.get_file("justaname", "x", "HEAD")
    with pytest.raises(ValueError, match="pending, running, success, failed, canceled"):
        client.create_status("a/b", "a" * 40, "failure")
