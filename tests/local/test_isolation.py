"""The local backend under hostile train.py code and stale handles: real horovodrun,
real processes, real cgroups where this machine allows them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmp import config
from mmp.system import procs
from mmp.backends import JobState
from mmp.backends.base import JobHandle
from mmp.backends.local import LocalBackend, rank_limit
from mmp.contract.datasets import load_catalogue
from mmp.contract.experiment import parse_experiment
from mmp.pipeline.runs import local_trigger, run_trigger

pytestmark = pytest.mark.horovod

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1"}

# Rank 0 leaves a daemon behind the way hostile code would: fork, setsid, fork again,
# drop stdio and the whole environment (MMP_RUN_ID included), exec a long sleep.
ESCAPING_TRAIN = r"""
import json, os, sys, time
out = sys.argv[sys.argv.index("--output-path") + 1]
mode = sys.argv[sys.argv.index("--mode") + 1]
os.makedirs(out, exist_ok=True)
if os.environ["HOROVOD_RANK"] == "0":
    marker = os.path.join(out, "escapee.json")
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            ticks = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]
            with open(marker + ".tmp", "w") as fh:
                json.dump({"pid": os.getpid(), "ticks": ticks}, fh)
            os.rename(marker + ".tmp", marker)
            os.execve("/bin/sleep", ["sleep", "600"], {})
        os._exit(0)
    os.waitpid(child, 0)
    while not os.path.exists(marker):
        time.sleep(0.01)
print("escapee started", flush=True)
if mode == "sleep":
    time.sleep(600)
"""

ENV_DUMP = r"""
import json, os, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"env-{os.environ['HOROVOD_RANK']}.json"), "w") as fh:
    json.dump(dict(os.environ), fh)
"""


def escapee_alive(marker: Path) -> bool:
    """Is the recorded process (same pid *and* same start tick) still running?"""
    info = json.loads(marker.read_text())
    try:
        stat = Path(f"/proc/{info['pid']}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == info["ticks"] and fields[0] != "Z"


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def started_run(make_repo, digits):
    """Start a run's MLflow record for a repo; the test launches it on a backend it chooses."""
    from mmp.pipeline.runner import Pipeline

    def _start(files: dict, hyperparameters: dict, processes: int = 2):
        repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": processes, "Hyperparameters": hyperparameters},
                         files=files)
        pipeline = Pipeline()
        trigger = local_trigger(repo, "HEAD")
        prepared = pipeline.prepare(trigger)
        return pipeline.start(trigger, prepared)

    return _start


@pytest.fixture
def backend_under_test(request):
    """The local backend with its cgroup (where this machine allows one) or with only the subreaper."""
    use_cgroup = request.param
    if use_cgroup:
        probe = procs.make_run_cgroup("probe-" + os.urandom(4).hex())
        if probe is None:
            pytest.skip("no writable cgroup v2 hierarchy here; the subreaper variant covers this machine")
        procs.kill_cgroup(probe)
    backend = LocalBackend(use_cgroup=use_cgroup, grace_seconds=1.0)
    handles: list[JobHandle] = []
    markers: list[Path] = []
    yield backend, handles, markers
    for handle in handles:  # a failing test leaves nothing behind
        backend.teardown(handle)
    for marker in markers:
        if marker.exists() and escapee_alive(marker):
            os.kill(json.loads(marker.read_text())["pid"], 9)


BOTH = pytest.mark.parametrize("backend_under_test", [True, False], ids=["cgroup", "subreaper"], indirect=True)


def _launch(backend_under_test, started_run, mode: str):
    backend, handles, markers = backend_under_test
    started = started_run({"train.py": ESCAPING_TRAIN}, {"mode": mode})
    marker = backend.run_dir(started.request) / "output" / "escapee.json"
    markers.append(marker)
    handle = backend.launch(started.request)
    handles.append(handle)
    return backend, handle, marker


@BOTH
def test_nothing_train_py_started_survives_success(backend_under_test, started_run):
    backend, handle, marker = _launch(backend_under_test, started_run, "exit")
    status = backend.wait(handle, poll_seconds=0.1)
    assert status.state == JobState.SUCCEEDED, status.message
    assert marker.exists(), "the escapee never started"
    assert not escapee_alive(marker), "a double-forked, setsid, env-less child outlived a successful run"


@BOTH
def test_nothing_train_py_started_survives_cancel(backend_under_test, started_run):
    backend, handle, marker = _launch(backend_under_test, started_run, "sleep")
    wait_for(marker.exists, what="the escapee")
    assert escapee_alive(marker)
    backend.cancel(handle)
    assert backend.status(handle).state == JobState.CANCELLED
    assert not escapee_alive(marker), "a double-forked, setsid, env-less child outlived cancel"


@BOTH
def test_nothing_train_py_started_survives_max_runtime(backend_under_test, started_run):
    backend, handle, marker = _launch(backend_under_test, started_run, "sleep")
    wait_for(marker.exists, what="the escapee")
    status = backend.wait(handle, deadline=time.time(), poll_seconds=0.1)
    assert status.state == JobState.FAILED and "Max_Runtime" in status.message
    assert not escapee_alive(marker), "a double-forked, setsid, env-less child outlived Max_Runtime"


@BOTH
def test_teardown_after_the_worker_died_kills_the_tree(backend_under_test, started_run):
    """Recovery in a new worker: a fresh backend with only the saved handle."""
    backend, handle, marker = _launch(backend_under_test, started_run, "sleep")
    wait_for(marker.exists, what="the escapee")
    saved = JobHandle.from_dict(json.loads(json.dumps(handle.to_dict())))
    fresh = LocalBackend(use_cgroup=backend.use_cgroup, grace_seconds=1.0)
    assert fresh.status(saved).state == JobState.RUNNING
    fresh.teardown(saved)
    assert not escapee_alive(marker)
    assert fresh.status(saved).state.terminal


# train.py ends at once, leaving a helper that inherited its stdout (horovodrun's pipe) running.
HOLDING_TRAIN = r"""
import json, os, subprocess, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
helper = subprocess.Popen(["sleep", "600"])
ticks = open(f"/proc/{helper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
with open(os.path.join(out, "escapee.json.tmp"), "w") as fh:
    json.dump({"pid": helper.pid, "ticks": ticks}, fh)
os.rename(os.path.join(out, "escapee.json.tmp"), os.path.join(out, "escapee.json"))
print("trained", flush=True)
"""


@BOTH
def test_a_helper_holding_stdout_does_not_hold_a_finished_run(backend_under_test, started_run):
    """Issue 20.6: horovodrun waited for the helper to close its output, so the run ended at Max_Runtime."""
    backend, handles, markers = backend_under_test
    started = started_run({"train.py": HOLDING_TRAIN}, {}, processes=1)
    marker = backend.run_dir(started.request) / "output" / "escapee.json"
    markers.append(marker)
    handle = backend.launch(started.request)
    handles.append(handle)
    status = backend.wait(handle, deadline=time.time() + 90, poll_seconds=0.1)  # before the fix: Max_Runtime
    assert status.state == JobState.SUCCEEDED, status.message
    assert marker.exists() and not escapee_alive(marker)
    log = Path(handle.data["log"]).read_text()
    assert "trained" in log and "still held its output open" in log, log[-2000:]


def _ctrl_c_as_in_a_shell() -> None:
    """The child gets SIGINT as a terminal's foreground job does: default action, not blocked.

    A signal disposition or mask left over in the pytest process (ignored or blocked SIGINT)
    would otherwise be inherited, and Python keeps an ignored SIGINT ignored."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupting_the_runner_leaves_nothing(make_repo, digits):
    """Ctrl-C of `mmp run`, and SIGTERM of `mmp up`'s worker, go through the runner's interrupt path."""
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2, "Hyperparameters": {"mode": "sleep"}},
                     files={"train.py": ESCAPING_TRAIN})
    output = repo.parent / "mmp-run.out"  # a file, not a pipe: an escaped child holding a pipe must not stall us
    with open(output, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmp", "run", "--repo", str(repo), "-q"],
                                stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=_ctrl_c_as_in_a_shell)
    markers = []
    try:
        def escaped():
            markers[:] = list(config.runs_root().glob("*/*/output/escapee.json"))
            return bool(markers)

        wait_for(escaped, what="the escapee")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        assert not escapee_alive(markers[0]), output.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for marker in markers:
            if escapee_alive(marker):
                os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)


def test_a_handle_saved_before_start_times_still_stops_its_own_run(tmp_path):
    """Old handles name horovodrun's group leader by pid only; it is ours if it carries the run id."""
    old = subprocess.Popen(["sleep", "600"], start_new_session=True, env={**os.environ, "MMP_RUN_ID": "old-run"})
    try:
        wait_for(lambda: "MMP_RUN_ID=old-run" in Path(f"/proc/{old.pid}/environ").read_bytes().decode(errors="replace")
                 .replace("\0", "\n").splitlines(), what="the old run's environment")
        handle = JobHandle("local", "old-run", {"pid": old.pid, "run_dir": str(tmp_path), "log": str(tmp_path / "log")})
        backend = LocalBackend()
        assert backend.status(handle).state == JobState.RUNNING
        backend.teardown(handle)
        assert old.wait(timeout=30) == -signal.SIGKILL
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


@pytest.fixture
def bystander():
    """An unrelated process leading its own process group, as a reused pid would be."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_handle_whose_pid_was_reused_signals_nothing(bystander, tmp_path):
    real_start = procs.start_time(bystander.pid)
    backend = LocalBackend()
    handles = [
        # recorded before a reboot: same pid, another start time
        {"pid": bystander.pid, "pid_started": real_start - 1000.0, "supervisor": True, "cgroup": None},
        # written before start times were recorded: the pid now runs something without our run id
        {"pid": bystander.pid},
        # a tampered cgroup path pointing at the hierarchy's root must not be "killed"
        {"pid": bystander.pid, "pid_started": real_start - 1.0, "supervisor": True,
         "cgroup": str(procs.cgroup2_mount() or "/sys/fs/cgroup")},
    ]
    for n, data in enumerate(handles):
        run_dir = tmp_path / f"run{n}"
        run_dir.mkdir()
        handle = JobHandle("local", f"run{n}", {**data, "run_dir": str(run_dir), "log": str(run_dir / "train.log")})
        backend.cancel(handle)
        backend.teardown(handle)
        assert bystander.poll() is None, f"handle {data} signalled an unrelated process"
        assert backend.status(handle).state.terminal, "a stranger's process is not our run"


def test_more_ranks_than_the_machine_can_run_are_refused_naming_both_fields(make_repo, digits):
    limit = rank_limit()
    backend = LocalBackend()
    dataset = load_catalogue()["digits"]
    per_host = 64
    hosts = limit // per_host + 1
    too_many = parse_experiment(json.dumps({**LOCAL, "Instance_Count": hosts, "Processes_Per_Host": per_host}))
    (problem,) = [p for p in backend.check(too_many, dataset) if "ranks" in p]
    assert "Instance_Count" in problem and "Processes_Per_Host" in problem and str(limit) in problem
    at_limit = parse_experiment(json.dumps({**LOCAL, "Instance_Count": 1, "Processes_Per_Host": min(limit, 64)}))
    assert not [p for p in backend.check(at_limit, dataset) if "ranks" in p]

    repo = make_repo(experiment={**LOCAL, "Instance_Count": 256, "Processes_Per_Host": 64})
    proc = subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Instance_Count" in proc.stderr and "Processes_Per_Host" in proc.stderr and "16384" in proc.stderr
    assert not (config.home_path() / "mlflow.db").exists()


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-canary", "AWS_ACCESS_KEY_ID": "AKIACANARY",
    "PULUMI_ACCESS_TOKEN": "pul-canary", "MMP_WEBHOOK_SECRET": "hook-canary", "GITHUB_TOKEN": "ghp_canary",
    "MMP_GITHUB_TOKEN": "ghp_canary2", "MLFLOW_TRACKING_URI_OVERRIDE_CANARY": "x", "SOME_SERVICE_PASSWORD": "pw",
}


def test_train_py_gets_an_allow_list_environment_through_horovodrun(make_repo, digits, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TEAM_DATA_BUCKET", "declared-value")
    monkeypatch.setenv("MMP_TRAIN_ENV", "TEAM_DATA_BUCKET, MMP_HOME")  # MMP_ names are never passed
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    repo = make_repo(experiment={**LOCAL, "Processes_Per_Host": 2}, files={"train.py": ENV_DUMP})
    outcome = run_trigger(local_trigger(repo, "HEAD"))
    assert outcome.state == "SUCCEEDED", outcome.message
    output = config.runs_root() / "fashion-demo" / outcome.run_id / "output"
    for rank in ("0", "1"):
        env = json.loads((output / f"env-{rank}.json").read_text())
        leaked = sorted(set(SECRETS) & set(env)) + [k for k in env if k.startswith("MMP_") and k != "MMP_RUN_ID"]
        assert not leaked, f"rank {rank} got {leaked}"
        assert env["MLFLOW_RUN_ID"] == outcome.run_id and env["MLFLOW_EXPERIMENT_NAME"] == "fashion-demo"
        assert env["TEAM_DATA_BUCKET"] == "declared-value"
        assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] and env["HOROVOD_RANK"] == rank
