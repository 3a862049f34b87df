"""`mmp up` as users run it: webhook, worker and MLflow UI come up, and SIGTERM/SIGINT leave nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from mmp import config
from mmp.system.procs import processes_with_env

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_then_stops_cleanly(sig, mmp_home, secret_env, gh):
    port, mlflow_port = free_port(), free_port()
    ui = sig == signal.SIGTERM  # the MLflow UI once (it takes seconds to start on 2 cores)
    argv = [sys.executable, "-m", "mmp", "up", "--port", str(port), "--mlflow-port", str(mlflow_port)]
    if not ui:
        argv.append("--no-ui")
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc, 30)
        body = json.dumps(gh.with_files("push-added-and-modified.json", removed=["experiment.json"])).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=body, headers=gh.headers_for(body))
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 202 and json.loads(resp.read())["status"] == "ignored"
        if ui:
            wait_for(f"http://127.0.0.1:{mlflow_port}/health", proc, 90)
        # stack.json tells `mmp run` where MLflow is, and only once it answers
        expected = f"http://127.0.0.1:{mlflow_port}" if ui else None
        deadline = time.time() + 10
        while json.loads(config.local_stack_file().read_text())["mlflow_url"] != expected:
            assert time.time() < deadline, config.local_stack_file().read_text()
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("mmp.pipeline.worker" in " ".join(c.cmdline()) for c in children)
        assert ui == any("mlflow" in " ".join(c.cmdline()) and "server" in c.cmdline() for c in children)
        time.sleep(0.5)  # let the worker get to its loop
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert not config.local_stack_file().exists()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


# -- faults: kill -9, a second `mmp up`, leftovers of a dead stack ------------------------------------

@pytest.fixture
def stray_processes(mmp_home):
    """Teardown: kill every process this test started, found by its MMP_HOME (kill -9 orphans them)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    strays = processes_with_env("MMP_HOME", str(mmp_home))
    for proc in strays:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(strays, timeout=10)


def start_up(started: list, port: int, mlflow_port: int | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "mmp", "up", "--port", str(port)]
    argv += ["--mlflow-port", str(mlflow_port)] if mlflow_port else ["--no-ui"]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    started.append(proc)
    return proc


def stack_json() -> dict:
    try:
        return json.loads(config.local_stack_file().read_text())
    except (OSError, ValueError):
        return {}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.2)


def worker_lock_holder(home: Path) -> int | None:
    """The pid of the worker holding worker.lock (its content is host:pid), None if the lock is free."""
    import fcntl

    path = home / "worker.lock"
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return int(fh.read().strip().rsplit(":", 1)[1])
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_sigterm_while_up_is_still_starting_its_ui_stops_it_cleanly(mmp_home, secret_env, stray_processes):
    """The webhook answers before the MLflow UI has started: a SIGTERM then (a service manager stopping
    it early) stops the stack as one later does, not by the default action that leaves stack.json."""
    port, mlflow_port = free_port(), free_port()
    proc = start_up(stray_processes, port, mlflow_port)
    wait_for(f"http://127.0.0.1:{port}/healthz", proc, 30)
    wait_until(lambda: descendants(proc.pid), 30, "mmp up to start its children")
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0 and "stopped" in out and "did not answer" not in out, out
    assert psutil.wait_procs(children, timeout=30)[1] == []
    assert not config.local_stack_file().exists()


@pytest.mark.slow
def test_kill_9_of_up_takes_its_worker_and_mlflow_with_it_and_the_next_up_starts(mmp_home, secret_env,
                                                                                 stray_processes):
    port, mlflow_port = free_port(), free_port()
    first = start_up(stray_processes, port, mlflow_port)
    wait_for(f"http://127.0.0.1:{port}/healthz", first, 30)
    wait_for(f"http://127.0.0.1:{mlflow_port}/health", first, 120)
    wait_until(lambda: worker_lock_holder(mmp_home) is not None, 60, "the first worker holds its lock")
    children = descendants(first.pid)
    assert any("mlflow" in " ".join(c.cmdline()) for c in children)
    first.kill()  # SIGKILL: no handler, no cleanup in mmp up itself
    first.wait(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]
    assert worker_lock_holder(mmp_home) is None

    second = start_up(stray_processes, port, mlflow_port)
    wait_for(f"http://127.0.0.1:{port}/healthz", second, 30)
    wait_for(f"http://127.0.0.1:{mlflow_port}/health", second, 120)
    wait_until(lambda: worker_lock_holder(mmp_home) in {p.pid for p in descendants(second.pid)}, 60,
               "the new stack's own worker holds the lock")
    wait_until(lambda: stack_json().get("mlflow_url") == f"http://127.0.0.1:{mlflow_port}", 30,
               "stack.json names the new MLflow server once it answers")
    stack = stack_json()
    assert stack["pid"] == second.pid
    assert stack["children"]["mlflow"]["pid"] in {p.pid for p in descendants(second.pid)}
    children = descendants(second.pid)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and "keeps dying" not in out, out
    assert psutil.wait_procs(children, timeout=10)[1] == []


def test_a_second_up_on_the_same_home_is_refused_at_once_naming_the_first(mmp_home, secret_env, stray_processes):
    port = free_port()
    first = start_up(stray_processes, port)
    wait_for(f"http://127.0.0.1:{port}/healthz", first, 30)
    before = config.local_stack_file().read_text()
    second = start_up(stray_processes, free_port())
    out, _ = second.communicate(timeout=30)  # at once: no waiting for a worker lock
    assert second.returncode == 1, out
    assert "another `mmp up` is running" in out and f"pid {first.pid}" in out
    assert f"http://127.0.0.1:{port}/webhook" in out
    assert config.local_stack_file().read_text() == before  # the first one's stack.json is untouched
    assert get_json(f"http://127.0.0.1:{port}/healthz")["ok"]
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out


def start_worker_alone(started: list, home: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mmp.pipeline.worker"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started.append(proc)
    wait_until(lambda: worker_lock_holder(home) == proc.pid, 60, "the lone worker holds the lock")
    return proc


def test_up_stops_what_a_dead_stack_left_only_after_checking_pid_and_start_time(mmp_home, secret_env,
                                                                               stray_processes):
    """A dead stack's worker that survived (no parent-death signal: another OS, an older mmp) is stopped;
    a process that merely got a recorded pid back (different start time) is not touched."""
    leftover = start_worker_alone(stray_processes, mmp_home)
    bystander = subprocess.Popen(["sleep", "300"])
    stray_processes.append(bystander)
    config.local_stack_file().write_text(json.dumps({
        "pid": 999999, "started": time.time() - 60, "stack_id": "dead-stack", "webhook_url": "x", "mlflow_url": None,
        "children": {
            "worker": {"pid": leftover.pid, "started": psutil.Process(leftover.pid).create_time(), "grace": 20},
            "mlflow": {"pid": bystander.pid, "started": psutil.Process(bystander.pid).create_time() - 3600},
        }}))
    port = free_port()
    up = start_up(stray_processes, port)
    wait_for(f"http://127.0.0.1:{port}/healthz", up, 60)
    assert leftover.wait(timeout=10) is not None  # stopped before the new stack served
    assert bystander.poll() is None  # same pid, another start time: not ours, left alone
    wait_until(lambda: worker_lock_holder(mmp_home) in {p.pid for p in descendants(up.pid)}, 60,
               "the new stack's own worker holds the lock")
    up.send_signal(signal.SIGTERM)
    out, _ = up.communicate(timeout=60)
    assert up.returncode == 0 and "cleaned up after the `mmp up` that died (pid 999999)" in out, out
    assert "keeps dying" not in out


def test_up_refuses_at_once_while_a_worker_it_did_not_start_holds_the_queue(mmp_home, secret_env, stray_processes):
    lone = start_worker_alone(stray_processes, mmp_home)
    up = start_up(stray_processes, free_port())
    out, _ = up.communicate(timeout=30)
    assert up.returncode == 1 and f":{lone.pid}" in out and "worker.lock" in out, out
    assert lone.poll() is None  # not ours to stop


def test_childguard_stops_the_whole_group_when_its_parent_is_killed(tmp_path, stray_processes):
    """The guard's own contract, without `mmp up`: parent kill -9 → the command and its children get SIGTERM."""
    marker = tmp_path / "pids"
    command = f"sleep 300 & echo $! > {marker}; trap 'kill $!; exit 0' TERM; wait"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-I', '-S', {str(ROOT / 'mmp' / 'system' / 'childguard.py')!r}, str(os.getpid()), "
        f"'5', '--', 'sh', '-c', {command!r}], start_new_session=True)\n"
        "time.sleep(300)\n")], env={**os.environ, "MMP_HOME": os.environ["MMP_HOME"]})
    stray_processes.append(parent)
    wait_until(lambda: marker.exists() and marker.read_text().strip(), 30, "the guarded command started")
    group = descendants(parent.pid)
    assert len(group) >= 3  # guard, sh, sleep
    parent.kill()
    parent.wait(timeout=10)
    assert psutil.wait_procs(group, timeout=30)[1] == []


def test_up_never_announces_another_program_on_the_mlflow_port_as_its_own(mmp_home, secret_env, stray_processes):
    """An MLflow server left by someone else answers /health on the port: `mmp up` says the port is taken."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port, taken = free_port(), other.server_address[1]
        up = start_up(stray_processes, port, taken)
        wait_for(f"http://127.0.0.1:{port}/healthz", up, 30)
        wait_until(lambda: "worker" in stack_json().get("children", {}), 30, "the worker listed")
        assert stack_json()["mlflow_url"] is None
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
        assert f"MLflow UI not started: 127.0.0.1:{taken} is in use" in out, out
        assert f"MLflow   http://127.0.0.1:{taken}" not in out
    finally:
        other.shutdown()
        other.server_close()


def test_demo_is_refused_cleanly_while_up_serves_the_same_home(mmp_home, secret_env, stray_processes, tmp_path):
    port = free_port()
    up = start_up(stray_processes, port)
    wait_for(f"http://127.0.0.1:{port}/healthz", up, 30)
    demo = subprocess.run([sys.executable, "-m", "mmp", "demo", "--dir", str(tmp_path / "demo")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 1 and "another `mmp up` is running" in demo.stderr + demo.stdout
    assert "Traceback" not in demo.stderr
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0


def test_childguard_ignores_the_death_of_the_thread_that_started_it(tmp_path, stray_processes):
    """PR_SET_PDEATHSIG fires when the spawning *thread* ends; the guard stops its command only when the
    parent *process* is gone (its parent pid changed)."""
    marker, started = tmp_path / "thread-done", tmp_path / "command-started"
    command = f"touch {started}; exec sleep 300"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, pathlib, subprocess, sys, threading, time\n"
        "def spawn():\n"
        f"    subprocess.Popen([sys.executable, '-I', '-S', {str(ROOT / 'mmp' / 'system' / 'childguard.py')!r}, "
        f"str(os.getpid()), '5', '--', 'sh', '-c', {command!r}], start_new_session=True)\n"
        f"    while not pathlib.Path({str(started)!r}).exists():  # the guard has asked for the signal by now\n"
        "        time.sleep(0.05)\n"
        "t = threading.Thread(target=spawn); t.start(); t.join()\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "time.sleep(300)\n")])
    stray_processes.append(parent)
    wait_until(marker.exists, 30, "the spawning thread ended")
    wait_until(lambda: len(descendants(parent.pid)) == 2, 30, "guard and command running")
    group = descendants(parent.pid)
    alive = psutil.wait_procs(group, timeout=2)[1]
    assert {p.pid for p in alive} == {p.pid for p in group}  # still running after the thread's death
    parent.kill()
    parent.wait(timeout=10)
    assert psutil.wait_procs(group, timeout=30)[1] == []
