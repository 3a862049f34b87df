"""The `local` backend: `horovodrun --gloo` on this machine, in an export of the commit.

The code is exported with `git archive` into the run folder (never the user's
working tree) and runs with the repository's dependency files installed
(local_env). horovodrun runs under a small supervisor (local_supervisor) that is
a child subreaper and, where the machine allows, in a cgroup v2 directory of the
run's own, so cancel, Max_Runtime and teardown leave nothing behind, even processes
that double-forked, called setsid and cleared their environment. A handle names the
supervisor by pid + start time, so a reused pid is never signalled. train.py gets
an allow-listed environment (train_environ), never MMP's secrets or MMP_HOME.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from mmp import config
from mmp.hosts import localgit as gitutil
from mmp.hosts.base import get_host, local_repository
from mmp.system import procs
from mmp.contract.argv import horovodrun_argv, train_args
from mmp.contract.datasets import Dataset, missing_files
from mmp.contract.experiment import Experiment
from mmp.runtime.horovod import failure_summary, find_horovodrun
from mmp.backends import local_supervisor
from mmp.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, Paths
from mmp.backends.local_env import training_python
from mmp.backends.train_environ import training_environ

EXIT_FILE = "exit-code"
CANCEL_FILE = "cancelled"
LOG_FILE = "train.log"
RANKS_PER_CORE = 4  # the most ranks one local run may start, per usable core
GRACE_SECONDS = 5.0  # SIGTERM → SIGKILL on cancel and Max_Runtime
STOP_TIMEOUT_S = 30.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rank_limit() -> int:
    return RANKS_PER_CORE * usable_cores()


class LocalBackend(Backend):
    name = "local"
    poll_seconds = 0.2

    def __init__(self, runs_root: Path | None = None, python: str | None = None, horovodrun: str | None = None,
                 envs_root: Path | None = None, use_cgroup: bool = True, grace_seconds: float = GRACE_SECONDS):
        self.runs_root = Path(runs_root or config.runs_root())
        self.envs_root = Path(envs_root or config.home_path() / "envs")
        self.python = python or sys.executable
        self.horovodrun = horovodrun or find_horovodrun()
        self.use_cgroup = use_cgroup
        self.grace_seconds = grace_seconds
        self._procs: dict[str, subprocess.Popen] = {}

    def run_dir(self, request: LaunchRequest) -> Path:
        return self.runs_root / request.experiment_name / request.run_id

    def paths(self, request: LaunchRequest) -> Paths:
        return Paths(dataset=str(request.dataset.local_path()), output=str(self.run_dir(request) / "output"))

    def check(self, experiment: Experiment, dataset: Dataset) -> list[str]:
        problems = []
        folder = dataset.local_path()
        if not folder.is_dir():
            hint = f"mmp datasets prepare {dataset.name}" if dataset.name == "digits" else (
                f"mmp datasets add {dataset.name} --local DIR"
            )
            problems.append(f"Dataset_Name: {dataset.name!r} has no local folder at {folder}; run `{hint}`")
        elif dataset.name in ("digits", "fashion") and missing_files(folder):
            problems.append(f"Dataset_Name: {folder} lacks {', '.join(missing_files(folder))}")
        if experiment.total_processes > rank_limit():
            problems.append(
                f"Instance_Count × Processes_Per_Host: {experiment.instance_count} × {experiment.processes} = "
                f"{experiment.total_processes} ranks; the local platform runs at most {rank_limit()} on this machine "
                f"({RANKS_PER_CORE} per core, {usable_cores()} cores)")
        if not self.horovodrun:
            problems.append("horovodrun is not installed in this environment (run scripts/bootstrap.sh)")
        return problems

    def _export(self, request: LaunchRequest, code: Path) -> None:
        """The tree at the commit into `code`: `git archive` of a repository here, else the git host's archive
        of the commit (a GitLab or GitHub push to the local stack), unpacked as the training image does."""
        if local_repository(request.clone_url) is not None:
            gitutil.export(request.clone_url, request.commit, code)
            return
        from mmp.runtime.sagemaker_entrypoint import EntrypointError, unpack_code

        host = get_host(request.host)
        folder = self.run_dir(request) / "code-archive"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "code.tar.gz").write_bytes(host.archive(request.repository, request.clone_url, request.commit))
        try:
            unpack_code(folder, code)
        except EntrypointError as exc:
            raise BackendError(f"{host.title} archive of {request.repository}@{request.short_commit}: {exc}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def launch(self, request: LaunchRequest) -> JobHandle:
        run_dir = self.run_dir(request)
        code = run_dir / "code"
        if code.exists():
            shutil.rmtree(code)
        self._export(request, code)
        if not (code / "train.py").is_file():
            raise BackendError("train.py not found at the repository root")
        for stale in (EXIT_FILE, CANCEL_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        log_path = run_dir / LOG_FILE
        with open(log_path, "a") as log:
            python = training_python(code, self.python, self.envs_root, lambda line: print(line, file=log))
        paths = self.paths(request)
        Path(paths.output).mkdir(parents=True, exist_ok=True)
        n = request.experiment.total_processes
        argv = horovodrun_argv(
            [("localhost", n)],
            train_args(paths.dataset, paths.output, request.experiment.dataset_name, request.experiment.hyperparameters),
            python=python.python,
            horovodrun=self.horovodrun or "horovodrun",
        )
        env = training_environ({**request.mlflow_env, "MMP_RUN_ID": request.run_id, "PYTHONUNBUFFERED": "1"})
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // n)))
        cgroup = procs.make_run_cgroup(request.run_id) if self.use_cgroup else None
        supervised = [sys.executable, "-I", local_supervisor.__file__, "--exit-file", str(run_dir / EXIT_FILE),
                      "--grace", str(self.grace_seconds), *(["--cgroup", str(cgroup)] if cgroup else []), "--", *argv]
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    supervised, cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError:
            procs.kill_cgroup(cgroup)
            raise
        self._procs[request.run_id] = proc
        return JobHandle(
            platform=self.name,
            job_id=request.run_id,
            data={"pid": proc.pid, "pid_started": procs.start_time(proc.pid), "supervisor": True,
                  "cgroup": str(cgroup) if cgroup else None, "run_dir": str(run_dir), "log": str(log_path),
                  "argv": argv, "python": python.python, "started": time.time()},
        )

    # -- following -------------------------------------------------------------
    def _owner(self, handle: JobHandle) -> psutil.Process | None:
        """The live process this handle started, or None: never a process that merely has its pid."""
        data = handle.data
        if "pid_started" in data:
            return procs.find_process(data.get("pid"), data.get("pid_started"))
        # handles saved before start times were recorded: ours only if it still carries the run id
        try:
            proc = psutil.Process(int(data["pid"]))
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("MMP_RUN_ID") == handle.job_id:
                return proc
        except (psutil.Error, OSError, KeyError, ValueError):
            pass
        return None

    def _exit_code(self, handle: JobHandle) -> int | None:
        run_dir = Path(handle.data["run_dir"])
        exit_file = run_dir / EXIT_FILE
        if exit_file.exists():  # the supervisor writes it once nothing of the run is left
            return int(exit_file.read_text())
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            code = proc.poll()
            if code is not None:
                exit_file.write_text(str(code))
            return code
        if self._owner(handle) is not None:
            return None
        return -1  # vanished without a recorded code: its supervisor died

    def status(self, handle: JobHandle) -> JobStatus:
        code = self._exit_code(handle)
        if code is None:
            return JobStatus(JobState.RUNNING)
        if (Path(handle.data["run_dir"]) / CANCEL_FILE).exists():
            return JobStatus(JobState.CANCELLED, "cancelled", code)
        if code == 0:
            return JobStatus(JobState.SUCCEEDED, "train.py exited 0", 0)
        return JobStatus(JobState.FAILED, failure_summary(_read_lines(Path(handle.data["log"])), code), code)

    def pause(self, handle: JobHandle, seconds: float) -> None:
        """Until the supervisor this backend started exits (a run's end is heard at once), at most `seconds`."""
        proc = self._procs.get(handle.job_id)
        if proc is None:
            time.sleep(seconds)
            return
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def logs(self, handle: JobHandle, cursor: Any = None) -> tuple[list[str], Any]:
        offset = int(cursor or 0)
        try:
            with open(handle.data["log"], "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            return [], offset
        end = chunk.rfind(b"\n")
        if end < 0:
            return [], offset
        text = chunk[: end + 1].decode(errors="replace")
        return text.splitlines(), offset + end + 1

    def cancel(self, handle: JobHandle) -> None:
        """SIGTERM to the run (the supervisor passes it on, then SIGKILLs after the grace period)."""
        (Path(handle.data["run_dir"]) / CANCEL_FILE).touch()
        owner = self._owner(handle)
        if owner is not None:
            if handle.data.get("supervisor"):
                procs.signal_process(owner, signal.SIGTERM)
            else:
                _signal_group(owner, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_seconds + STOP_TIMEOUT_S
            while time.monotonic() < deadline and self._exit_code(handle) is None:
                time.sleep(0.1)
        self._stop(handle)

    def teardown(self, handle: JobHandle) -> None:
        self._stop(handle)
        proc = self._procs.pop(handle.job_id, None)
        exit_file = Path(handle.data["run_dir"]) / EXIT_FILE
        if proc is not None and proc.poll() is not None and not exit_file.exists():
            exit_file.write_text(str(proc.returncode))

    def _stop(self, handle: JobHandle) -> None:
        """Kill whatever of the run is left, now: the supervisor's tree, the cgroup, tagged stragglers."""
        owner = self._owner(handle)
        if owner is not None:
            if handle.data.get("supervisor"):
                procs.signal_process(owner, signal.SIGUSR1)  # kill the tree, record the code, exit
                if not procs.wait_gone(owner, STOP_TIMEOUT_S):
                    _signal_group(owner, signal.SIGKILL)
            else:
                _signal_group(owner, signal.SIGKILL)
        procs.kill_cgroup(handle.data.get("cgroup"))
        for proc in _tagged_processes(handle.job_id):
            try:
                proc.kill()
            except psutil.Error:
                pass
        owned = self._procs.get(handle.job_id)
        if owned is not None:
            try:
                owned.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(owner: psutil.Process, sig: int) -> None:
    """Signal the process group an identified process leads (never a bare saved number)."""
    try:
        if os.getpgid(owner.pid) == owner.pid and owner.is_running():
            os.killpg(owner.pid, sig)
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass


def _tagged_processes(run_id: str) -> list:
    """Processes whose environment carries MMP_RUN_ID=run_id (ranks that left the group)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("MMP_RUN_ID") == run_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
