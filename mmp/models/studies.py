"""A study's parent run as `mmp compare` and `mmp promote` see it: found by id, with its objective.

A study (experiment.json with a Tuning block) is one parent run tagged `mmp.study`
whose trials are child runs (`mlflow.parentRunId`); the parent records the objective,
its direction and the best trial (see mmp.tuning.study).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmp.tuning.tags import TAG_STUDY
from mmp.models.search import CompareError, experiment_id, search_all

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


def find_study(client: "MlflowClient", experiment: str, ref: str) -> "Run":
    """The study parent run of `experiment` whose id is `ref` or starts with it."""
    exp_id = experiment_id(client, experiment)
    studies = search_all(client, [exp_id], filter_string=f"tags.`{TAG_STUDY}` = 'true'")
    found = [r for r in studies if r.info.run_id.startswith(ref)] if ref else []
    if len(found) != 1:
        known = ", ".join(r.info.run_id[:12] for r in studies[:10]) or "none"
        what = "matches no" if not found else "matches more than one"
        raise CompareError(f"--study {ref!r} {what} study of {experiment!r}; its studies: {known}")
    return found[0]


def objective(parent: "Run") -> tuple[str, str]:
    """The study's objective metric and mode (max/min)."""
    tags = parent.data.tags
    return tags["mmp.tuning.objective"], "min" if tags.get("mmp.tuning.direction") == "minimize" else "max"


def best_trial(parent: "Run") -> str:
    """The run id of the study's best trial; a study still running or with no complete trial has none."""
    best = parent.data.tags.get("mmp.tuning.best_run_id")
    if not best:
        raise CompareError(f"study {parent.info.run_id} has no best trial yet (status {parent.info.status})")
    return best


def tuned_parameters(parent: "Run") -> list[str]:
    import json

    try:
        return list(json.loads(parent.data.tags.get("mmp.tuning.ranges", "{}")))
    except ValueError:
        return []


def sampling_scales(parent: "Run") -> dict[str, str]:
    """How the study sampled each numeric range: `log` for `"Scale": "log"`, `linear` otherwise."""
    import json

    try:
        ranges = json.loads(parent.data.tags.get("mmp.tuning.ranges", "{}"))
    except ValueError:
        return {}
    return {name: r.get("Scale", "linear") for name, r in ranges.items()
            if isinstance(r, dict) and "Values" not in r}
