"""The pipeline's unit of work: one accepted push, as the webhook hands it off (the Step Functions
input, the local queue's row). It belongs to the pipeline, which consumes it; the webhook and each
git host produce it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from mmp.config import EXPERIMENT_FILES

PROMOTE_FILE = "promote.json"
DEFAULT_HOST = "github"  # a job without `host` (all job JSON written before the host seam) is GitHub's


@dataclass
class Job:
    """What the pipeline needs from an accepted push (the Step Functions input, the queue row)."""

    repository: str  # the host's full name: owner/name, group/subgroup/project, ...
    clone_url: str
    before: str
    after: str
    ref: str
    delivery_id: str
    trigger_files: list[str] = field(default_factory=list)  # trigger files added/modified at the root
    host: str = DEFAULT_HOST  # the git host it came from (mmp.hosts.base.HOSTS); job JSON without it is GitHub's

    def to_dict(self) -> dict[str, Any]:
        """The job JSON; `host` only when it is not GitHub, so GitHub's JSON is what it was before hosts."""
        data = asdict(self)
        if data["host"] == DEFAULT_HOST:
            del data["host"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Job":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def trains(self) -> bool:
        return any(name in EXPERIMENT_FILES for name in self.trigger_files)

    @property
    def promotes(self) -> bool:
        return PROMOTE_FILE in self.trigger_files
