"""Who may train into an experiment and promote its model: the repository that made it.

Without this, any repository could name another's experiment in `Experiment_Name`,
log a better metric, and have `mmp promote` (or its own promote.json) move the other
team's `@production` alias onto its model. So the pipeline records the creating
repository as the experiment tag `mmp.owner`, promotion records it on the registered
model too, and runs and promotions from any other repository are refused, naming the
owner. A stack shares an experiment (and the model promoted from it) explicitly:

    MMP_SHARED_EXPERIMENTS='{"fashion-demo": ["acme/fashion-tuning"], "sandbox": ["*"]}'

or the same JSON object in `$MMP_HOME/shared-experiments.json` (the variable wins).
Keys are experiment names; values list the other repositories allowed, `*` for any.
A repository is its GitHub full name, or for a local one its absolute path: two local
folders may share a name, so a folder's name alone would let teamB/alpha into teamA/alpha.
Stdlib only: the AWS stages import it in Lambda.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from mmp import config

OWNER_TAG = "mmp.owner"
SOURCE_TAG = "mlflow.source.name"  # the repository a run came from, as people see it (set by Pipeline.start)
REPOSITORY_TAG = "mmp.repository"  # the same by identity: a local repository's absolute path (Trigger.identity)
SHARED_ENV = "MMP_SHARED_EXPERIMENTS"
SHARED_FILE = "shared-experiments.json"
ANY = "*"


class OwnershipError(PermissionError):
    """A run or promotion refused because the experiment or model belongs to another repository."""


def shared_experiments() -> dict[str, frozenset[str]]:
    """The stack's sharing setting: experiment name → the other repositories allowed in."""
    raw, where = os.environ.get(SHARED_ENV), SHARED_ENV
    if raw is None:
        path = config.home_path() / SHARED_FILE
        if not path.is_file():
            return {}
        raw, where = path.read_text(), str(path)
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise OwnershipError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(r, str) and r for r in v) for v in data.values()):
        raise OwnershipError(f'{where}: expected {{"experiment": ["owner/repo", ...]}} ("*" for any repository)')
    return {str(k): frozenset(v) for k, v in data.items()}


def is_shared(name: str, repository: str) -> bool:
    """True when the stack's setting lets `repository` into experiment (or model) `name`."""
    allowed = shared_experiments().get(name, frozenset())
    return repository in allowed or ANY in allowed


def may_use(name: str, owner: str | None, repository: str) -> bool:
    """True when `repository` owns `name` (or nobody does) or the stack shares it."""
    return owner is None or owner == repository or is_shared(name, repository)


def refusal(what: str, owner: str, repository: str) -> str:
    """The reason given to the refused repository, with the way to share."""
    return (f"{what} belongs to repository {owner!r}, not {repository!r}; use another Experiment_Name, "
            f"or have the stack share it ({SHARED_ENV} or $MMP_HOME/{SHARED_FILE})")


def run_source(tags: dict[str, str]) -> str | None:
    """The repository a run came from, by identity (runs made before REPOSITORY_TAG: by name)."""
    return tags.get(REPOSITORY_TAG) or tags.get(SOURCE_TAG)


def claimable(sources: Iterable[str | None], repository: str) -> bool:
    """An experiment made before ownership existed may be claimed if no run came from another repository."""
    return all(source in (None, "", repository) for source in sources)


def check(experiment: str, tags: dict[str, str], sources: Iterable[str | None], repository: str) -> str | None:
    """Why `repository` may not write into `experiment` (its tags; its runs' sources if untagged), or None."""
    owner = tags.get(OWNER_TAG)
    if owner is not None:
        return None if may_use(experiment, owner, repository) else refusal(
            f"experiment {experiment!r}", owner, repository)
    if claimable(sources, repository) or is_shared(experiment, repository):
        return None
    return (f"experiment {experiment!r} has no {OWNER_TAG} tag and holds runs from other repositories, so "
            f"{repository!r} cannot claim it; set the tag {OWNER_TAG} on it, or share it ({SHARED_ENV})")
