"""The `local` backend: `horovodrun --gloo` on this machine, in an export of the commit.

The code is exported with `git archive` into the run folder (never the user's
working tree), output goes to the run folder, and the whole job runs in its own
process group tagged with MMP_RUN_ID, so cancel, Max_Runtime and teardown can
kill every rank and leave nothing behind.
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

from .. import config, gitutil
from ..argv import horovodrun_argv, train_args
from ..datasets import Dataset, missing_files
from ..experiment import Experiment
from ..horovod import failure_summary, find_horovodrun
from .base import Backend, BackendError, JobHandle, JobState, JobStatus, LaunchRequest, Paths

EXIT_FILE = "exit-code"
CANCEL_FILE = "cancelled"
LOG_FILE = "train.log"


class LocalBackend(Backend):
    name = "local"
    poll_seconds = 0.2

    def __init__(self, runs_root: Path | None = None, python: str | None = None, horovodrun: str | None = None):
        self.runs_root = Path(runs_root or config.runs_root())
        self.python = python or sys.executable
        self.horovodrun = horovodrun or find_horovodrun()
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
        if not self.horovodrun:
            problems.append("horovodrun is not installed in this environment (run scripts/bootstrap.sh)")
        return problems

    def launch(self, request: LaunchRequest) -> JobHandle:
        run_dir = self.run_dir(request)
        code = run_dir / "code"
        if code.exists():
            shutil.rmtree(code)
        gitutil.export(request.clone_url, request.commit, code)
        if not (code / "train.py").is_file():
            raise BackendError("train.py not found at the repository root")
        paths = self.paths(request)
        Path(paths.output).mkdir(parents=True, exist_ok=True)
        n = request.experiment.total_processes
        argv = horovodrun_argv(
            [("localhost", n)],
            train_args(paths.dataset, paths.output, request.experiment.dataset_name, request.experiment.hyperparameters),
            python=self.python,
            horovodrun=self.horovodrun or "horovodrun",
        )
        env = {
            **config.training_environ(),
            **request.mlflow_env,
            "MMP_RUN_ID": request.run_id,
            "PYTHONUNBUFFERED": "1",
        }
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        for stale in (EXIT_FILE, CANCEL_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        log_path = run_dir / LOG_FILE
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[request.run_id] = proc
        return JobHandle(
            platform=self.name,
            job_id=request.run_id,
            data={"pid": proc.pid, "run_dir": str(run_dir), "log": str(log_path), "argv": argv, "started": time.time()},
        )

    # -- following -------------------------------------------------------------
    def _exit_code(self, handle: JobHandle) -> int | None:
        run_dir = Path(handle.data["run_dir"])
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            code = proc.poll()
            if code is not None:
                (run_dir / EXIT_FILE).write_text(str(code))
            return code
        exit_file = run_dir / EXIT_FILE
        if exit_file.exists():
            return int(exit_file.read_text())
        if _alive(handle.data["pid"]):
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
        (Path(handle.data["run_dir"]) / CANCEL_FILE).touch()
        self._kill(handle, graceful=True)

    def teardown(self, handle: JobHandle) -> None:
        self._kill(handle, graceful=False)
        proc = self._procs.pop(handle.job_id, None)
        if proc is not None and proc.poll() is not None:
            (Path(handle.data["run_dir"]) / EXIT_FILE).write_text(str(proc.returncode))

    def _kill(self, handle: JobHandle, *, graceful: bool) -> None:
        """Stop the process group, then any straggler still carrying this MMP_RUN_ID."""
        pid = handle.data["pid"]
        if graceful:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.time() + 5
            while time.time() < deadline and _alive(pid) and self._exit_code(handle) is None:
                time.sleep(0.1)
        _signal_group(pid, signal.SIGKILL)
        for proc in _tagged_processes(handle.job_id):
            try:
                proc.kill()
            except Exception:
                pass
        owned = self._procs.get(handle.job_id)
        if owned is not None:
            try:
                owned.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tagged_processes(run_id: str) -> list:
    """Processes whose environment carries MMP_RUN_ID=run_id (ranks that left the group)."""
    import psutil

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
