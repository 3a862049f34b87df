"""`mmp janitor`: terminate MMP-tagged EC2 instances that should no longer exist.

The dlami backend terminates its instances in a `finally`, and each instance's
user data schedules its own shutdown (which terminates it). The janitor is the
third line: anything tagged `mmp:managed` whose run the pipeline has concluded (its
own `mmp.concluded` tag, set once the output is copied and the hosts released), or
that has outlived its `mmp:max-runtime-minutes` (the run's Max_Runtime plus the
backend's slack), is terminated. The run's MLflow status is no such sign: train.py
sets FINISHED itself while the hosts still copy the run's output. On AWS it runs as a Lambda (`handler`) every 15
minutes (mmp.infra.pipeline) and e-mails what it terminated.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

from mmp import aws
from mmp.backends.dlami import LIVE_STATES, TAG_MANAGED, TAG_MAX_RUNTIME, TAG_RUN

log = logging.getLogger("mmp.backends.dlami_janitor")

@dataclass
class Finding:
    instance_id: str
    run_id: str | None
    state: str
    launched: str
    reason: str
    action: str  # "terminate", "would terminate" (dry run) or "keep"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pipeline_conclusion(run_id: str) -> str | None:
    """How the pipeline ended the run (FINISHED, FAILED, KILLED); None while it has not, or if unknown."""
    try:
        from mmp.tracking.client import make_tracker

        return make_tracker().concluded(run_id)
    except Exception as exc:  # unknown run, MLflow down: decide by age alone
        log.info("no MLflow state for run %s: %s", run_id, exc)
        return None


def _tagged_instances(ec2: Any) -> list[dict]:
    out = []
    filters = [{"Name": "tag-key", "Values": [TAG_MANAGED]},
               {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            out += reservation["Instances"]
    return out


def _as_utc(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def judge(instance: dict, now: dt.datetime, concluded: Callable[[str], str | None]) -> tuple[bool, str]:
    """(terminate?, why) for one tagged instance."""
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    run_id = tags.get(TAG_RUN)
    launched = _as_utc(instance["LaunchTime"])
    age_min = (now - launched).total_seconds() / 60
    limit = tags.get(TAG_MAX_RUNTIME)
    try:
        limit_min = int(limit) if limit is not None else None
    except ValueError:
        limit_min = None
    if limit_min is not None and age_min > limit_min:
        return True, f"up {age_min:.0f} min, past its max runtime of {limit_min} min"
    if run_id:
        state = concluded(run_id)
        if state:
            return True, f"run {run_id} was concluded by the pipeline ({state})"
        return False, f"run {run_id} is not concluded by the pipeline yet; up {age_min:.0f} of {limit or '?'} min"
    if limit_min is None:
        return False, "no run id and no max runtime tag; left for a person to judge"
    return False, f"up {age_min:.0f} of {limit_min} min"


def sweep(*, dry_run: bool = False, now: dt.datetime | None = None,
          concluded: Callable[[str], str | None] = pipeline_conclusion,
          clients: Callable[[str], Any] = aws.client) -> list[Finding]:
    """Judge every MMP-tagged live instance; terminate the ones past their time."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ec2 = clients("ec2")
    findings = []
    for instance in _tagged_instances(ec2):
        doomed, reason = judge(instance, now, concluded)
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        action = ("would terminate" if dry_run else "terminate") if doomed else "keep"
        findings.append(Finding(instance["InstanceId"], tags.get(TAG_RUN), instance["State"]["Name"],
                                _as_utc(instance["LaunchTime"]).isoformat(), reason, action))
    doomed_ids = [f.instance_id for f in findings if f.action == "terminate"]
    if doomed_ids:
        ec2.terminate_instances(InstanceIds=doomed_ids)
        log.warning("janitor terminated %s", ", ".join(doomed_ids))
    return findings


def handler(event: dict, context: Any = None) -> dict:
    """The scheduled Lambda: sweep, and tell the team (SNS) about every instance terminated."""
    findings = sweep()
    doomed = [f.to_dict() for f in findings if f.action == "terminate"]
    if doomed:
        from mmp.pipeline.sns import SnsNotifier

        SnsNotifier().notify(f"[mmp] janitor terminated {len(doomed)} stray instance(s)",
                             "; ".join(f"{f['instance_id']}: {f['reason']}" for f in doomed),
                             {"state": "JANITOR", "terminated": doomed})
    return {"findings": [f.to_dict() for f in findings]}
