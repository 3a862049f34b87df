"""`mmp hook install` with real git: post-commit, post-receive, and the whole loop into MLflow."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from mmp.hosts.hooks import MARKER, HookError, install

from ..conftest import free_port

ZERO = "0" * 40


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def git_run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)


def bump(repo: Path, epochs: str = "1", name: str = "experiment.json") -> None:
    data = json.loads((repo / "experiment.json").read_text())
    data["Hyperparameters"] = json.dumps({"epochs": epochs, "batch-size": "64"})
    (repo / name).write_text(json.dumps(data, indent=2))


def test_install_picks_the_hook_by_repository_kind(make_repo, tmp_path):
    repo = make_repo()
    hook = install(repo)
    assert hook == repo / ".git" / "hooks" / "post-commit" and os.access(hook, os.X_OK)
    assert MARKER in hook.read_text()
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    assert install(bare) == bare / "hooks" / "post-receive"
    assert install(repo) == hook  # reinstalling our own hook is fine


def test_install_does_not_clobber_a_foreign_hook(make_repo):
    repo = make_repo()
    foreign = repo / ".git" / "hooks" / "post-commit"
    foreign.write_text("#!/bin/sh\necho mine\n")
    with pytest.raises(HookError, match="not installed by mmp; use --force"):
        install(repo)
    install(repo, force=True)
    assert MARKER in foreign.read_text()
    assert any(p.name.startswith("post-commit.bak") for p in foreign.parent.iterdir())


def test_install_refuses_a_non_repository(tmp_path):
    with pytest.raises(HookError, match="not a git repository"):
        install(tmp_path)


def test_post_commit_posts_the_real_commit(make_repo, server, queue):
    repo = make_repo()
    install(repo, url=server.url)
    before = git(repo, "rev-parse", "HEAD")
    bump(repo, "2")
    (repo / "notes.txt").write_text("hello")
    git(repo, "add", "-A")
    done = git_run(repo, "commit", "-q", "-m", "more epochs")
    assert done.returncode == 0 and "webhook 202 queued" in done.stderr
    after = git(repo, "rev-parse", "HEAD")
    (job,) = queue.list()
    assert job.payload == {"repository": repo.name, "clone_url": str(repo), "before": before, "after": after,
                           "ref": "refs/heads/main", "delivery_id": job.delivery_id,
                           "trigger_files": ["experiment.json"]}


def test_post_commit_that_does_not_touch_the_experiment_is_ignored(make_repo, server, queue):
    repo = make_repo()
    install(repo, url=server.url)
    (repo / "README.md").write_text("docs")
    git(repo, "add", "-A")
    done = git_run(repo, "commit", "-q", "-m", "docs")
    assert "ignored" in done.stderr and queue.list() == []
    git(repo, "rm", "-q", "experiment.json")
    done = git_run(repo, "commit", "-q", "-m", "drop experiment")
    assert "experiment.json removed" in done.stderr and queue.list() == []


def test_server_down_never_blocks_a_commit(make_repo, queue, secret_env):
    repo = make_repo()
    install(repo, url=f"http://127.0.0.1:{free_port()}/webhook")
    bump(repo, "3")
    started = time.perf_counter()
    done = git_run(repo, "commit", "-qam", "offline")
    assert done.returncode == 0 and time.perf_counter() - started < 10
    assert "could not reach the webhook" in done.stderr and "the commit is kept" in done.stderr
    assert git(repo, "log", "-1", "--format=%s") == "offline" and queue.list() == []


def test_post_receive_on_a_bare_repository(make_repo, server, queue, tmp_path):
    work = make_repo()
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    install(bare, url=server.url)
    git(work, "remote", "add", "origin", str(bare))
    before = git(work, "rev-parse", "HEAD")
    bump(work, "2")
    git(work, "commit", "-qam", "one")
    (work / "x.txt").write_text("x")
    git(work, "add", "x.txt")
    git(work, "commit", "-qm", "two")
    after = git(work, "rev-parse", "HEAD")
    pushed = git_run(work, "push", "-q", "origin", "main")
    assert pushed.returncode == 0 and "queued" in pushed.stderr
    (job,) = queue.list()
    assert (job.payload["before"], job.payload["after"], job.payload["ref"]) == (before, after, "refs/heads/main")
    assert job.payload["clone_url"] == str(bare) and job.payload["repository"] == "origin"
    # a tag push and a branch deletion are sent, and ignored
    git(work, "tag", "v1")
    assert "tag push" in git_run(work, "push", "-q", "origin", "v1").stderr
    git(work, "push", "-q", "origin", "main:side")
    assert "deleted" in git_run(work, "push", "-q", "origin", ":side").stderr
    assert len(queue.list()) == 1


def test_long_push_is_completed_from_git(make_repo, server, queue, tmp_path):
    """More than 20 commits: the event lists the last 20, the webhook asks git for the rest."""
    work = make_repo()
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    install(bare, url=server.url)
    git(work, "remote", "add", "origin", str(bare))
    bump(work, "2")
    git(work, "commit", "-qam", "experiment first")
    for i in range(22):
        (work / "log.txt").write_text(str(i))
        git(work, "add", "log.txt")
        git(work, "commit", "-qm", f"noise {i}")
    assert "queued" in git_run(work, "push", "-q", "origin", "main").stderr
    assert queue.list()[0].payload["trigger_files"] == ["experiment.json"]


@pytest.mark.horovod
@pytest.mark.slow
def test_push_to_bare_repository_trains_and_finishes_in_mlflow(make_repo, digits, server, queue, tmp_path,
                                                                  monkeypatch, caplog):
    """The whole local loop: git push → post-receive → signed event → queue → worker → horovodrun → MLflow."""
    from mlflow.tracking import MlflowClient

    from mmp import config
    from mmp.pipeline.reporting import LocalStatusReporter
    from mmp.pipeline.worker import Worker

    caplog.set_level(logging.DEBUG)
    token = "ghp_E2E_TOKEN_must_not_leak_42"
    monkeypatch.setenv("GITHUB_TOKEN", token)
    work = make_repo()
    bare = tmp_path / "fashion.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    install(bare, url=server.url)
    git(work, "remote", "add", "origin", str(bare))
    bump(work, "1")
    git(work, "commit", "-qam", "train one epoch")
    sha = git(work, "rev-parse", "HEAD")
    assert "queued" in git_run(work, "push", "-q", "origin", "main").stderr

    assert Worker(queue).run(once=True) == 1
    (job,) = queue.list()
    assert job.state == "done" and job.run_id
    run = MlflowClient(config.tracking_uri()).get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.git.commit"] == sha
    assert run.data.tags["mmp.delivery_id"] == job.delivery_id
    assert run.data.params["epochs"] == "1"
    assert any(k.startswith(("train", "test", "val")) or "acc" in k or "loss" in k for k in run.data.metrics)
    states = [s["state"] for s in LocalStatusReporter().history("fashion", sha)]
    assert states == ["pending", "success"]
    # no secret anywhere it could be read back
    secret = os.environ["MMP_WEBHOOK_SECRET"]
    mlflow_text = json.dumps({"params": run.data.params, "tags": run.data.tags})
    home = Path(os.environ["MMP_HOME"])
    files_text = "".join(p.read_text(errors="replace") for p in home.rglob("*")
                         if p.is_file() and p.suffix in (".json", ".jsonl", ".log", ".txt"))
    for value in (secret, token):
        assert value not in mlflow_text and value not in caplog.text and value not in files_text


def _commit_env(**extra: str) -> dict[str, str]:
    """The committing shell's environment: no MMP_HOME / MMP_WEBHOOK_URL unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMP_HOME", "MMP_WEBHOOK_URL")}
    return {**env, **extra}


@pytest.fixture
def stack(secret_env):
    """A real `mmp up` stack (webhook only) on a free port: it publishes stack.json in MMP_HOME."""
    from mmp.local.stack import LocalStack

    running = LocalStack("127.0.0.1", 0, ui=False, worker=False, say=lambda *_: None).start()
    try:
        yield running
    finally:
        running.stop()


def test_hook_finds_the_running_stack_when_it_fires(make_repo, stack, monkeypatch):
    """Installed before `mmp up --port P` started or not: the hook reads stack.json when it fires."""
    from mmp.hosts.hooks import DEFAULT_URL, webhook_url
    from mmp.pipeline.queue import JobQueue

    repo = make_repo()
    install(repo)  # no --url: nothing about a port is baked into the hook
    assert "8080" not in (repo / ".git" / "hooks" / "post-commit").read_text()
    bump(repo, "2")
    done = subprocess.run(["git", "-C", str(repo), "commit", "-qam", "two"], capture_output=True, text=True,
                          timeout=60, env=_commit_env(MMP_HOME=os.environ["MMP_HOME"]))
    assert done.returncode == 0 and "webhook 202 queued" in done.stderr, done.stderr
    assert stack.port != 8080 and len(JobQueue().list()) == 1
    stack.stop()  # no stack any more: back to the default
    assert webhook_url() == DEFAULT_URL
    monkeypatch.setenv("MMP_WEBHOOK_URL", "http://127.0.0.1:9/webhook")  # the explicit override wins
    assert webhook_url() == "http://127.0.0.1:9/webhook"


def test_url_override_is_kept_in_the_hook(make_repo, server, queue, tmp_path):
    repo = make_repo()
    install(repo, url=server.url)
    (tmp_path / "stack-home").mkdir()
    bump(repo, "2")
    done = subprocess.run(["git", "-C", str(repo), "commit", "-qam", "two"], capture_output=True, text=True,
                          timeout=60, env=_commit_env(MMP_HOME=str(tmp_path / "stack-home")))
    assert "webhook 202 queued" in done.stderr and len(queue.list()) == 1


HOSTILE = 'home $(touch pwned) `touch pwned2` "dq" \'sq\' ; touch pwned3 \\\nline2 $HOME'


def test_hostile_mmp_home_and_url_are_never_run(make_repo, tmp_path, monkeypatch, secret_env):
    """Values written into the hook are data: `$(...)`, backticks, quotes, `;`, newlines stay literal."""
    from mmp.local.stack import LocalStack
    from mmp.pipeline.queue import JobQueue

    home = tmp_path / HOSTILE
    home.mkdir()
    monkeypatch.setenv("MMP_HOME", str(home))
    repo = make_repo()
    hook = install(repo)  # MMP_HOME (the hostile one) is baked into the hook as its default
    check = subprocess.run(["sh", "-n", str(hook)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    running = LocalStack("127.0.0.1", 0, ui=False, worker=False, say=lambda *_: None).start()
    try:
        bump(repo, "2")
        done = subprocess.run(["git", "-C", str(repo), "commit", "-qam", "two"], capture_output=True, text=True,
                              timeout=60, env=_commit_env())
        # the hook found the stack.json under the hostile MMP_HOME, so the path reached Python intact
        assert "webhook 202 queued" in done.stderr, done.stderr
        assert len(JobQueue().list()) == 1
    finally:
        running.stop()
    with pytest.raises(HookError, match="--url"):
        install(repo, url="http://127.0.0.1:9/x $(touch pwned6)")  # not a URL at all: refused
    bad_url = "http://127.0.0.1:9/x$(touch${IFS}pwned4)\"'`touch${IFS}pwned5`;touch${IFS}pwned7"
    install(repo, url=bad_url)
    bump(repo, "3")
    done = subprocess.run(["git", "-C", str(repo), "commit", "-qam", "three"], capture_output=True, text=True,
                          timeout=60, env=_commit_env())
    assert done.returncode == 0 and "could not reach the webhook at " + bad_url in done.stderr, done.stderr
    for place in (repo, tmp_path, home, Path.cwd()):
        assert not [p for p in place.iterdir() if p.name.startswith("pwned")], place


def test_a_busy_webhook_gets_the_push_again_and_the_hook_says_so(make_repo, queue, secret_env, tmp_path):
    """Issue 20.14: a 429 used to be the end of it (nothing queued); now the hook retries, bounded, and says so."""
    import socket

    from mmp.webhook.server import Limits, local_server

    srv = local_server(port=0, queue=queue, limits=Limits(per_client=1, request_seconds=120,
                                                          refusal_seconds=30)).start()
    holder = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        holder.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # a request in progress: 127.0.0.1's one slot
        deadline = time.monotonic() + 30
        while srv.httpd.load()["serving"] != 1:
            assert time.monotonic() < deadline, "the held request never took its slot"
            time.sleep(0.05)
        repo = make_repo()
        install(repo, url=srv.url)
        bump(repo, "4")
        err = tmp_path / "commit.err"
        with open(err, "w") as out:
            commit = subprocess.Popen(["git", "-C", str(repo), "commit", "-qam", "busy"], stderr=out, text=True)
        try:
            deadline = time.monotonic() + 60
            while "retrying" not in err.read_text():
                assert commit.poll() is None, err.read_text()  # before: exited with "webhook 429", nothing queued
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.05)
            holder.close()  # the slot frees; the next try gets in
            assert commit.wait(timeout=60) == 0
        finally:
            if commit.poll() is None:
                commit.kill()
                commit.wait()
    finally:
        holder.close()
        srv.stop()
    said = err.read_text()
    assert "webhook busy (429" in said and "retry 1 of" in said and "webhook 202 queued" in said, said
    (job,) = queue.list()
    assert job.commit_sha == git(repo, "rev-parse", "HEAD")
