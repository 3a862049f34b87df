"""Serving a registered model over HTTP on 127.0.0.1, and the demo's finale, with real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from mmp.models.promote import promote
from mmp.models.serve import ModelServer, ServeError, model_uri, serve_argv

from ..conftest import free_port
from .conftest import ROOT


def test_model_references_become_model_uris():
    assert model_uri("digits@staging") == "models:/digits@staging"
    assert model_uri("digits") == "models:/digits@production"
    assert model_uri("digits/3") == "models:/digits/3"
    assert model_uri("runs:/abc/model") == "runs:/abc/model"
    assert model_uri("models:/digits@staging") == "models:/digits@staging"
    for bad in ("", "@prod", "digits@"):
        with pytest.raises(ServeError):
            model_uri(bad)
    argv = serve_argv("models:/digits@production", "127.0.0.1", 5001)
    assert argv[1:5] == ["-m", "mlflow", "models", "serve"]
    assert argv[argv.index("--env-manager") + 1] == "local" and argv[argv.index("-h") + 1] == "127.0.0.1"


def test_unknown_alias_is_refused_before_starting(synthetic):
    synthetic.run(metrics={"acc": 0.5})
    promote("synthetic", "acc", deployer=None)
    with pytest.raises(ServeError, match="models:/synthetic@canary"):
        ModelServer("synthetic@canary").start()


@pytest.fixture
def started():
    """Processes a test starts, each in its own process group: teardown kills every group they
    made (the scoring server's too), whether the test passed or failed."""
    import psutil

    procs: list[subprocess.Popen] = []
    groups: set[int] = set()

    def remember(proc: subprocess.Popen) -> subprocess.Popen:
        procs.append(proc)
        groups.add(proc.pid)
        return proc

    remember.groups = groups
    yield remember
    for proc in procs:
        try:
            groups.update(os.getpgid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True))
        except (psutil.Error, OSError):
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        proc.wait(timeout=30)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return not all(p.status() == "zombie" for p in _members(pgid))


def _members(pgid: int):
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def predict(port: int, images) -> list:
    body = json.dumps({"inputs": images.tolist()}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["predictions"]


@pytest.mark.timeout(600)  # the first one also trains the session's two real runs (`trained`)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_mmp_serve_predicts_then_stops_its_server_on_each_signal(real_runs, mmp_home, started, sig):
    """Ctrl-C, `kill`, a closed terminal: mmp serve stops its scoring server's whole group within
    seconds. Even `kill -9` of mmp serve takes the server down (parent-death signal)."""
    import numpy as np
    import psutil

    from mmp.models.finale import sample_digit
    from mmp.models.serve import START_TIMEOUT_S, STOP_GRACE_S

    promote("digits-demo", "val_accuracy", deployer=None)
    port = free_port()
    env = {**os.environ, "MMP_HOME": str(mmp_home), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = started(subprocess.Popen([sys.executable, "-m", "mmp", "serve", "digits-demo@production",
                                     "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    ready = f"serving models:/digits-demo@production at http://127.0.0.1:{port}"
    output = lambda: b"".join(lines).decode(errors="replace")[-3000:]  # noqa: E731
    # mmp serve says it is ready once its own /ping answered: wait for that, not only the port
    # (mmp serve gives up by itself after START_TIMEOUT_S)
    wait_until(lambda: ready in output() or proc.poll() is not None, START_TIMEOUT_S + 60,
               "mmp serve never said it was serving")
    assert proc.poll() is None, output()
    (server,) = psutil.Process(proc.pid).children()
    server_group = os.getpgid(server.pid)
    assert server_group != os.getpgid(proc.pid)  # its own group: a signal to mmp serve alone must reach it
    started.groups.add(server_group)

    images = np.concatenate([sample_digit(i)[0] for i in (-1, -2, -3)])  # a batch of three
    scores = predict(port, images)
    assert len(scores) == 3 and all(len(row) == 10 for row in scores)
    assert len(predict(port, images[:1])) == 1  # and a single image still works

    signalled = time.monotonic()
    os.kill(proc.pid, sig)  # mmp serve alone, as `kill PID` or a closing terminal would
    wait_until(lambda: proc.poll() is not None, STOP_GRACE_S + 30, f"mmp serve ignored {sig!r}")
    wait_until(lambda: not group_alive(server_group), STOP_GRACE_S + 30, "the scoring server outlived mmp serve")
    took = time.monotonic() - signalled
    reader.join(timeout=30)
    if sig != signal.SIGKILL:
        assert proc.returncode == 0, output()
    with pytest.raises(OSError):  # nothing left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
    print(f"{signal.Signals(sig).name}: mmp serve and its server gone {took:.1f}s after the signal")


@pytest.mark.parametrize("ref", ["file:///etc", "/etc", "./model", "s3://bucket/model", "mlflow-artifacts:/x",
                                 "runs:/", "runs:/abc", "models:/../x", "~/model", "http://example.com/m"])
def test_only_registry_models_and_run_artifacts_are_served(ref, mmp_home):
    with pytest.raises(ServeError):
        model_uri(ref)
    done = subprocess.run([sys.executable, "-m", "mmp", "serve", ref], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert ref in done.stderr


def test_demo_finale_prints_the_board_promotes_and_predicts(real_runs, client):
    from rich.console import Console

    from mmp.models.finale import demo_finale

    console = Console(record=True, width=200)
    result = demo_finale("digits-demo", console)
    text = console.export_text()
    for run_id in real_runs["run_ids"]:
        assert run_id[:8] in text
    assert "promoted digits-demo v1 @production" in text and "/invocations answered" in text
    assert result["promotion"].run_id == result["leaderboard"].best().run_id
    assert str(client.get_model_version_by_alias("digits-demo", "production").version) == "1"
    assert 0 <= result["predicted"] <= 9 and len(result["scores"]) == 10
    assert f"predicted as {result['predicted']}" in text
    port = int(result["url"].rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the server was stopped
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
