"""CodeCommit on the local stack: `mmp up`'s server takes an EventBridge-shaped event on
`POST /events/codecommit` (loopback only), reads the commit through MMP's CodeCommit stand-in (the
real boto3 client over HTTP, a real git repository behind it), and the worker trains it with
horovodrun and reports back as one comment on the stand-in."""

from __future__ import annotations

import copy
import json
import socket
import urllib.error
import urllib.request

import pytest

from ..codecommit_standin import CodeCommitStandIn
from ..conftest import ACCOUNT, REGION, commit_all, git

NAME = "fashion-demo"
ARN = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:{NAME}"
QUICK_TRAIN = "import sys\nprint('codecommit run', sys.argv[1:], flush=True)\n"


@pytest.fixture
def standin(monkeypatch):
    for key, value in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "MMP_CODECOMMIT_REPOSITORIES": NAME}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with CodeCommitStandIn() as cc:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", cc.url)
        yield cc


def _event(fixture_json, commit: str, old: str) -> dict:
    event = copy.deepcopy(fixture_json("codecommit/reference-updated.json"))  # AWS's documented event
    event.update(id="local-codecommit-event-1", region=REGION, account=ACCOUNT, resources=[ARN])
    event["detail"].update(repositoryName=NAME, referenceName="main", referenceFullName="refs/heads/main",
                           commitId=commit, oldCommitId=old)
    return event


def _post(url: str, event: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(event).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.horovod
@pytest.mark.slow
def test_a_codecommit_event_on_the_local_stack_trains_and_comments(standin, queue, secret_env, make_repo, digits,
                                                                   fixture_json, mmp_home):
    from mmp.pipeline.store import RunStore
    from mmp.pipeline.worker import Worker
    from mmp.webhook.server import local_server

    repo = make_repo(name=NAME, files={"train.py": QUICK_TRAIN, "data.md": "kept out", ".gitattributes":
                                       "*.md export-ignore\n"})
    before = git(repo, "rev-parse", "HEAD")
    (repo / "experiment.json").write_text(json.dumps({**json.loads((repo / "experiment.json").read_text()),
                                                      "Hyperparameters": "{'epochs': '1'}"}))
    after = commit_all(repo, "one epoch")
    standin.add(NAME, repo)
    server = local_server(host="0.0.0.0", port=0, queue=queue).start()
    try:
        status, body = _post(f"http://127.0.0.1:{server.port}/events/codecommit", _event(fixture_json, after, before))
        assert (status, body["status"]) == (202, "queued") and body["job"]["host"] == "codecommit"
        assert _post(f"http://127.0.0.1:{server.port}/events/codecommit",
                     _event(fixture_json, after, before))[1]["status"] == "duplicate"
        outside = _outside_address()
        assert outside is not None, "this machine needs a non-loopback address to show the loopback-only rule"
        status, body = _post(f"http://{outside}:{server.port}/events/codecommit", _event(fixture_json, after, before))
        assert status == 403 and "from this machine only" in body["error"]
    finally:
        server.stop()

    assert Worker(queue).run_once()
    job = queue.get("local-codecommit-event-1")
    assert job.state == "done", job.message
    (record,) = RunStore().list()
    assert record.state == "SUCCEEDED"
    code = mmp_home / "runs"
    assert [p for p in code.rglob("train.py")] and not list(code.rglob("data.md"))  # export-ignore honoured
    (comment,) = standin.comments_on(NAME, after)
    assert [h.splitlines()[0] for h in comment["_history"]][0] == "**MMP mmp/training**: ⏳ pending"
    assert comment["content"].startswith("**MMP mmp/training**: ✅ success") and "MLflow run:" in comment["content"]
