"""The Backend interface every platform implements.

Shaped after MLflow Projects' AbstractBackend (launch returns a handle at once) and
SkyPilot's Backend (provision / execute / teardown as separate steps): a backend
says its paths, checks a request before any API call, launches and returns a
JSON-serialisable handle (so another process can follow or cancel the job), reports
status, returns logs from a cursor, cancels, and tears down what it started.
"""

from __future__ import annotations

import collections
import enum
import itertools
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from mmp.contract.experiment import Experiment


# What a process following a run keeps of its output: the pipeline's copy (mmp.pipeline.runner),
# a backend's own (dlami): the tail, bounded in lines and in characters, however long the run.
LOG_KEEP_LINES = 100_000
LOG_KEEP_CHARS = 32 * 1024 * 1024


class OutputTail:
    """The last lines of a job's output, within LOG_KEEP_LINES and LOG_KEEP_CHARS, with cursors
    that count every line ever appended (so `since` still works once early lines are dropped).
    Thread-safe: a reader thread appends while the follower reads."""

    def __init__(self, keep_lines: int | None = None, keep_chars: int | None = None):
        self._lines: collections.deque[str] = collections.deque()
        self.keep_lines, self.keep_chars = keep_lines or LOG_KEEP_LINES, keep_chars or LOG_KEEP_CHARS
        self._chars = 0
        self.total = 0  # lines appended since the start, dropped ones included
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._chars += len(line)
            self.total += 1
            while len(self._lines) > self.keep_lines or (self._chars > self.keep_chars and len(self._lines) > 1):
                self._chars -= len(self._lines.popleft())

    @property
    def chars(self) -> int:
        return self._chars

    def since(self, cursor: int) -> tuple[list[str], int]:
        """Lines after `cursor` that are still kept, and the cursor after them."""
        with self._lock:
            first = self.total - len(self._lines)
            return list(itertools.islice(self._lines, max(cursor - first, 0), None)), self.total

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobStatus:
    state: JobState
    message: str = ""
    exit_code: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Paths:
    """What train.py sees as --dataset-path and --output-path on this platform."""

    dataset: str
    output: str


@dataclass
class LaunchRequest:
    """Everything a backend needs to start one training run."""

    experiment: Experiment
    experiment_name: str
    run_id: str  # the MLflow run the pipeline created
    repository: str  # a name such as owner/repo
    clone_url: str  # where the code is (local path or https URL)
    commit: str
    mlflow_env: dict[str, str]
    dataset: Any  # mmp.contract.datasets.Dataset
    delivery_id: str | None = None
    image_tag: str | None = None  # the dependency set's training image (mmp.contract.image), image platforms only
    code_uri: str | None = None  # s3:// URI of the commit's code archive the job unpacks (mmp.contract.image)
    study: str | None = None  # the study this run is a trial of: its jobs follow each other (warm pools)
    host: str = "github"  # the git host clone_url is on (mmp.hosts): its credentials fetch the commit

    @property
    def short_commit(self) -> str:
        return self.commit[:12]


@dataclass
class JobHandle:
    platform: str
    job_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "job_id": self.job_id, "data": self.data}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JobHandle":
        return cls(platform=raw["platform"], job_id=raw["job_id"], data=dict(raw.get("data") or {}))


MAX_RUNTIME_MESSAGE = "stopped: Max_Runtime reached"


class BackendError(RuntimeError):
    """A request this backend cannot run (raised before anything is started)."""


LogSink = Callable[[str], None]


class Backend(ABC):
    """One training platform. Subclasses set `name` and implement the abstract steps."""

    name: ClassVar[str]
    poll_seconds: ClassVar[float] = 5.0

    def check(self, experiment: Experiment, dataset: Any) -> list[str]:
        """Problems that make this experiment impossible here, found before any API call
        or MLflow write; each names the field at fault and what is allowed."""
        return []

    @abstractmethod
    def paths(self, request: LaunchRequest) -> Paths: ...

    @abstractmethod
    def launch(self, request: LaunchRequest) -> JobHandle:
        """Start the job and return at once; raise BackendError if nothing started."""

    @abstractmethod
    def status(self, handle: JobHandle) -> JobStatus: ...

    @abstractmethod
    def logs(self, handle: JobHandle, cursor: Any = None) -> tuple[list[str], Any]:
        """New log lines since `cursor`, and the cursor to pass next time."""

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None: ...

    def teardown(self, handle: JobHandle) -> None:
        """Release whatever launch started. Must be safe to call twice."""

    def release_warm(self, handles: list[JobHandle]) -> list[str]:
        """Give back what these jobs keep warm for a next matching job (SageMaker's warm pools) once
        none will follow, e.g. at a study's end; returns the job ids released. Safe to call twice;
        nothing to do on platforms that keep nothing warm."""
        return []

    def wait(
        self,
        handle: JobHandle,
        *,
        on_log: LogSink | None = None,
        deadline: float | None = None,
        poll_seconds: float | None = None,
    ) -> JobStatus:
        """Follow a job to its end, streaming logs; cancel it past `deadline` (epoch s)."""
        cursor = None
        interval = self.poll_seconds if poll_seconds is None else poll_seconds
        timed_out = False
        while True:
            status = self.status(handle)
            lines, cursor = self.logs(handle, cursor)
            if on_log:
                for line in lines:
                    on_log(line)
            if status.state.terminal:
                lines, cursor = self.logs(handle, cursor)
                if on_log:
                    for line in lines:
                        on_log(line)
                if timed_out:
                    status = JobStatus(JobState.FAILED, MAX_RUNTIME_MESSAGE, status.exit_code, status.detail)
                return status
            if deadline is not None and time.time() > deadline and not timed_out:
                timed_out = True
                self.cancel(handle)
            self.pause(handle, interval)

    def pause(self, handle: JobHandle, seconds: float) -> None:
        """The wait between two polls of `wait`; a backend that can hear its job end returns then."""
        time.sleep(seconds)
