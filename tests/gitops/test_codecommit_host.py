"""CodeCommit as a git host, through the real boto3 client against MMP's stand-in (tests/codecommit_standin.py)
over a real git repository: files and entry types, changes, the archive against real `git archive`,
and the one comment per commit that moves from pending to the result."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import boto3
import pytest
from botocore.exceptions import ClientError

from mmp.hosts.codecommit import CodeCommitClient, CodeCommitCommentReporter, CodeCommitError, CodeCommitSource

from ..codecommit_standin import CodeCommitStandIn
from ..conftest import GIT_ENV, REGION, commit_all, git


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with CodeCommitStandIn() as cc:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", cc.url)
        yield cc


def _repo(tmp_path, files: dict[str, str | bytes], name="demo"):
    repo = tmp_path / name
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for rel, content in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    commit_all(repo, "initial")
    return repo


def _client() -> CodeCommitClient:
    return CodeCommitClient()


def test_the_real_boto3_client_reads_files_and_entry_types(standin, tmp_path):
    repo = _repo(tmp_path, {"train.py": "print(1)\n", "experiment.json": "{}", "src/a.py": "a"})
    os.symlink("train.py", repo / "link.py")
    commit_all(repo, "link")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{git(repo, 'rev-parse', 'HEAD')},vendored")
    git(repo, "commit", "-q", "-m", "submodule")
    sha = git(repo, "rev-parse", "HEAD")
    standin.add("demo", repo)
    client = _client()
    assert client.get_file("demo", "train.py", sha) == b"print(1)\n"
    assert client.get_file("demo", "missing.py", sha) is None
    assert [client.entry_type("demo", p, sha) for p in ("train.py", "link.py", "src", "vendored", "nope", "src/a.py")] \
        == ["file", "symlink", "dir", "submodule", None, "file"]
    assert client.commit_exists("demo", sha) and not client.commit_exists("demo", "f" * 40)
    with pytest.raises(CodeCommitError, match="RepositoryDoesNotExistException"):
        client.get_file("other", "train.py", sha)


def test_the_standin_answers_codecommits_documented_errors(standin, tmp_path):
    repo = _repo(tmp_path, {"train.py": "x"})
    standin.add("demo", repo)
    cc = boto3.client("codecommit")
    cases = [
        (lambda: cc.get_file(repositoryName="demo", filePath="nope"), "FileDoesNotExistException"),
        (lambda: cc.get_file(repositoryName="demo", commitSpecifier="f" * 40, filePath="train.py"),
         "CommitDoesNotExistException"),
        (lambda: cc.get_commit(repositoryName="demo", commitId="f" * 40), "CommitIdDoesNotExistException"),
        (lambda: cc.get_commit(repositoryName="demo", commitId="HEAD"), "InvalidCommitIdException"),
        (lambda: cc.get_folder(repositoryName="demo", folderPath="/nope"), "FolderDoesNotExistException"),
        (lambda: cc.get_blob(repositoryName="demo", blobId="f" * 40), "BlobIdDoesNotExistException"),
        (lambda: cc.get_repository(repositoryName="ghost"), "RepositoryDoesNotExistException"),
        (lambda: cc.update_comment(commentId="nope", content="x"), "CommentDoesNotExistException"),
    ]
    for call, code in cases:
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] == code
        # botocore maps each documented error to its modelled exception class
        assert type(info.value).__name__ == code


def test_compare_pages_through_get_differences(standin, tmp_path):
    repo = _repo(tmp_path, {f"f{i:03}.txt": str(i) for i in range(230)} | {"experiment.json": "{}"})
    before = git(repo, "rev-parse", "HEAD")
    (repo / "experiment.json").write_text('{"a": 1}')
    (repo / "f000.txt").unlink()
    (repo / "new.txt").write_text("n")
    after = commit_all(repo)
    standin.add("demo", repo)
    client = _client()
    assert client.compare("demo", before, after) == {"added": ["new.txt"], "modified": ["experiment.json"],
                                                     "removed": ["f000.txt"]}
    everything = client.compare("demo", None, after)
    assert len(everything["added"]) == 231  # three pages of at most 100
    assert [op for op in standin.operations() if op == "GetDifferences"].count("GetDifferences") == 1 + 3


ATTRIBUTES = """\
*.md export-ignore
docs export-ignore
/anchored.txt export-ignore
data/** export-ignore
keep/*.bin export-ignore
keep/kept.bin -export-ignore
build/ export-ignore
"""


def _members(data: bytes) -> dict[str, tuple[bool, int, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        out = {}
        for m in tar.getmembers():
            if m.name == "pax_global_header" or m.type == tarfile.XGLTYPE:
                continue
            body = tar.extractfile(m).read() if m.isfile() else None
            out[m.name.rstrip("/")] = (m.isdir(), m.mode & 0o777 if m.isfile() else 0, body)
        return out


def test_the_archive_matches_git_archive_with_export_ignore(standin, tmp_path):
    repo = _repo(tmp_path, {
        ".gitattributes": ATTRIBUTES, "train.py": "print('hi')\n", "README.md": "r", "docs/guide.txt": "g",
        "anchored.txt": "a", "sub/anchored.txt": "kept: the pattern is anchored", "sub/notes.md": "n",
        "data/x/y.csv": "1", "keep/a.bin": "a", "keep/kept.bin": "k", "build/out.o": "o",
        "nested/.gitattributes": "secret.txt export-ignore\n*.md -export-ignore\n", "nested/secret.txt": "s",
        "nested/readme.md": "kept: the deeper file wins", "src/pkg/mod.py": "m", "run.sh": "#!/bin/sh\n",
    })
    (repo / "run.sh").chmod(0o755)
    commit_all(repo, "exec bit")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{git(repo, 'rev-parse', 'HEAD')},third/party/mod")
    git(repo, "commit", "-q", "-m", "a submodule: an empty folder in both")
    sha = git(repo, "rev-parse", "HEAD")
    standin.add("demo", repo)
    ours = _members(_client().archive("demo", sha))
    theirs = _members(subprocess.run(["git", "-C", str(repo), "archive", "--format=tar.gz", sha],
                                     capture_output=True, check=True, env={**os.environ, **GIT_ENV}).stdout)
    assert ours == theirs
    assert "nested/readme.md" in ours and "README.md" not in ours and "keep/kept.bin" in ours


def test_the_archive_refuses_links_and_keeps_its_bounds(standin, tmp_path):
    repo = _repo(tmp_path, {"train.py": "x", "a.txt": "1" * 100, "b.txt": "2" * 100})
    os.symlink("/etc/passwd", repo / "escape")
    sha = commit_all(repo)
    standin.add("demo", repo)
    with pytest.raises(CodeCommitError, match="escape is a symbolic link"):
        _client().archive("demo", sha)
    (repo / ".gitattributes").write_text("escape export-ignore\n")
    sha = commit_all(repo)
    assert "escape" not in _members(_client().archive("demo", sha))  # export-ignored: never read
    with pytest.raises(CodeCommitError, match="more than 2 files"):
        _client().archive("demo", sha, max_files=2)
    with pytest.raises(CodeCommitError, match="more than 150 bytes"):
        _client().archive("demo", sha, max_bytes=150)


def test_the_source_answers_the_pipelines_questions(standin, tmp_path):
    repo = _repo(tmp_path, {"train.py": "x", "experiment.json": "{}", ".gitattributes": "train.py export-ignore\n"})
    sha = git(repo, "rev-parse", "HEAD")
    standin.add("demo", repo)
    source = CodeCommitSource(_client(), "demo", sha)
    assert source.read_file("experiment.json") == b"{}"
    assert source.entry_type("train.py") == "export-ignored"
    assert source.entry_type("experiment.json") == "file"


def test_one_comment_per_commit_moves_from_pending_to_the_result(standin, tmp_path):
    repo = _repo(tmp_path, {"train.py": "x"})
    sha = git(repo, "rev-parse", "HEAD")
    standin.add("demo", repo)
    reporter = CodeCommitCommentReporter(_client())
    reporter.report("demo", sha, "pending", "sagemaker: queued", None)
    reporter.report("demo", sha, "pending", "sagemaker: training", "http://mlflow/#/runs/1")
    CodeCommitCommentReporter(_client()).report("demo", sha, "success", "accuracy 0.97",
                                                 "http://mlflow/#/runs/1")  # a fresh process finds it again
    reporter.report("demo", sha, "pending", "promoting", None, context="mmp/promotion")
    (training, promotion) = sorted(standin.comments_on("demo", sha), key=lambda c: c["creationDate"])
    assert [h.splitlines()[0] for h in training["_history"]] == [
        "**MMP mmp/training**: ⏳ pending", "**MMP mmp/training**: ⏳ pending", "**MMP mmp/training**: ✅ success"]
    assert "MLflow run: http://mlflow/#/runs/1" in training["content"] and "accuracy 0.97" in training["content"]
    assert promotion["content"].endswith("mmp-status: mmp/promotion")
    assert standin.operations().count("PostCommentForComparedCommit") == 2
    assert standin.operations().count("UpdateComment") == 2
