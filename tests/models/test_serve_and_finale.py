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


def test_mmp_serve_answers_a_real_prediction(real_runs, mmp_home):
    from mmp.models.finale import sample_digit

    promotion = promote("digits-demo", "val_accuracy", deployer=None)
    port = free_port()
    env = {**os.environ, "MMP_HOME": str(mmp_home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mmp", "serve", "digits-demo@production", "--port", str(port)],
                            cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    ready = f"serving models:/digits-demo@production at http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        # mmp serve says it is ready once its own /ping answered: wait for that, not only the port
        while not any(ready in line.decode(errors="replace") for line in list(lines)):
            assert proc.poll() is None, b"".join(lines).decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "mmp serve never said it was serving"
            time.sleep(0.2)
        image, label = sample_digit()
        body = json.dumps({"inputs": image.tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            scores = json.loads(resp.read())["predictions"]
        assert len(scores) == 1 and len(scores[0]) == 10 and all(isinstance(v, float) for v in scores[0])
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: mmp serve stops its scoring server
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    assert proc.returncode in (0, 130), b"".join(lines).decode(errors="replace")[-3000:]
    assert promotion.version == "1"
    with pytest.raises(OSError):  # nothing left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)


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
