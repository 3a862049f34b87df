"""GitOps promotion: a committed promote.json promotes (or rolls back) like `mmp promote`.

The webhook worker calls `run_promotion` for a push that added or changed
promote.json. The file is validated first (every field error named, nothing
written), then the promotion runs, and the commit gets a status and the team a
notification either way. promote.json:

    {"Experiment": "fashion-demo", "Metric": "val_accuracy", "Mode": "max", "Alias": "production"}

optionally with "Require": 0.9 (refuse a best run below it) or "Rollback": true.
Only the repository that owns the experiment and its registered model (or one the
stack shares them with, see mmp.tracking.ownership) may promote or roll back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmp.contract.names import NAME_PATTERN
from mmp.pipeline.reporting import PROMOTION_CONTEXT, Notifier, StatusReporter, short_description
from mmp.pipeline.sources import Trigger

log = logging.getLogger("mmp.models")

PROMOTE_FILE = "promote.json"
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$"  # MLflow aliases; `v<number>` is reserved by MLflow


class PromoteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False, str_strip_whitespace=True)

    experiment: str = Field(alias="Experiment", pattern=NAME_PATTERN, max_length=128)
    metric: str | None = Field(default=None, alias="Metric", min_length=1, max_length=250)
    mode: Literal["max", "min"] = Field(default="max", alias="Mode")
    alias: str = Field(default="production", alias="Alias", pattern=ALIAS_PATTERN)
    require: float | None = Field(default=None, alias="Require")
    rollback: bool = Field(default=False, alias="Rollback")

    @model_validator(mode="after")
    def _metric_unless_rollback(self) -> "PromoteSpec":
        if not self.rollback and not self.metric:
            raise ValueError("Metric is required (which metric decides the best run), unless Rollback is true")
        return self


FIELDS = ", ".join(f.alias or name for name, f in PromoteSpec.model_fields.items())


class SpecError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_spec(raw: bytes | str) -> PromoteSpec:
    """promote.json's bytes as a PromoteSpec, or SpecError naming every bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError([f"{PROMOTE_FILE}: not valid JSON ({exc})"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{PROMOTE_FILE}: expected a JSON object with {FIELDS}"])
    try:
        return PromoteSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(file)"
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown field; allowed: {FIELDS}")
            elif err["type"] == "missing":
                problems.append(f"{where}: required")
            else:
                problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise SpecError(problems) from None


@dataclass
class PromotionOutcome:
    state: str  # SUCCEEDED, INVALID, REFUSED, ERROR, SKIPPED
    message: str
    promotion: Any = None  # mmp.models.promote.Promotion on success
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"


def _model_url(name: str, version: str) -> str:
    from mmp.tracking.base import ui_url

    return f"{ui_url()}/#/models/{name}/versions/{version}"


def run_promotion(trigger: Trigger, reporter: StatusReporter, notifier: Notifier, *, client: Any = None,
                  deployer: Any = "auto") -> PromotionOutcome:
    """Read promote.json at the trigger's commit, promote, report the commit status, notify."""
    from mmp.models.promote import PromotionError, promote, rollback

    def status(state: str, description: str, url: str | None = None) -> None:
        try:
            reporter.report(trigger.repository, trigger.commit, state, short_description(description), url,
                            context=PROMOTION_CONTEXT)
        except Exception as exc:  # a status we cannot set must not undo a promotion
            log.warning("could not set commit status %s: %s", state, exc)

    def finish(outcome: PromotionOutcome, github_state: str, url: str | None = None) -> PromotionOutcome:
        status(github_state, outcome.message, url)
        promotion = outcome.promotion
        record = {"kind": "promotion", "repository": trigger.repository, "commit": trigger.commit,
                  "delivery_id": trigger.delivery_id, "state": outcome.state, "problems": outcome.problems,
                  "promotion": promotion.to_dict() if promotion is not None else None, "url": url}
        try:
            notifier.notify(f"[mmp] {trigger.repository}@{trigger.commit[:7]}: promotion {outcome.state}",
                            outcome.message, record)
        except Exception as exc:
            log.warning("could not send notification: %s", exc)
        return outcome

    try:
        raw = trigger.source.read_file(PROMOTE_FILE)
    except Exception as exc:
        return finish(PromotionOutcome("ERROR", f"could not read {PROMOTE_FILE}: {exc}"), "error")
    if raw is None:
        return PromotionOutcome("SKIPPED", f"no {PROMOTE_FILE} at {trigger.commit[:7]}; nothing to promote")
    try:
        spec = parse_spec(raw)
    except SpecError as exc:
        return finish(PromotionOutcome("INVALID", f"{PROMOTE_FILE} is invalid: {exc}", problems=exc.problems),
                      "failure")
    what = f"rolling back @{spec.alias}" if spec.rollback else f"promoting the best {spec.metric} run to @{spec.alias}"
    status("pending", f"{what} ({spec.experiment})")
    try:
        if spec.rollback:
            promotion = rollback(spec.experiment, alias=spec.alias, client=client, deployer=deployer,
                                 repository=trigger.identity)
        else:
            promotion = promote(spec.experiment, spec.metric or "", mode=spec.mode, alias=spec.alias,
                                require=spec.require, client=client, deployer=deployer,
                                repository=trigger.identity)
    except PromotionError as exc:
        return finish(PromotionOutcome("REFUSED", str(exc), problems=[str(exc)]), "failure")
    except Exception as exc:
        log.exception("promotion for %s@%s failed", trigger.repository, trigger.commit)
        return finish(PromotionOutcome("ERROR", f"promotion failed: {type(exc).__name__}: {exc}"), "error")
    return finish(PromotionOutcome("SUCCEEDED", promotion.summary(), promotion), "success",
                  _model_url(promotion.model_name, promotion.version))
