"""`mmp janitor` on moto with a real MLflow (sqlite) deciding which runs have ended."""

from __future__ import annotations

import datetime as dt
import json

from typer.testing import CliRunner

from mmp import aws
from mmp.backends.dlami_janitor import sweep


def _launch(cloud, tags: dict[str, str]) -> str:
    ec2 = aws.client("ec2")
    return ec2.run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]


def _state(instance_id: str) -> str:
    reservations = aws.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def _mlflow_runs() -> tuple[str, str]:
    from mmp.tracking.client import RunTracker
    from mmp.backends import JobState

    tracker = RunTracker()
    done = tracker.start("janitor", run_name="done", tags={}, params={})
    tracker.finish(done, JobState.FAILED, message="training failed")
    live = tracker.start("janitor", run_name="live", tags={}, params={})
    return done, live


def test_janitor_terminates_ended_and_overdue_instances_only(cloud):
    """The rules; the pipeline's conclusions come from a table here (the tests below ask a real MLflow)."""
    done, live = "run-done", "run-live"
    states = {done: "FAILED", live: None}
    managed = {"mmp:managed": "true", "mmp:max-runtime-minutes": "60"}
    ended = _launch(cloud, {**managed, "mmp:run-id": done})
    running = _launch(cloud, {**managed, "mmp:run-id": live})
    overdue = _launch(cloud, {**managed, "mmp:run-id": live, "mmp:max-runtime-minutes": "1"})
    stranger = _launch(cloud, {"Name": "not-ours"})

    dry = {f.instance_id: f for f in sweep(dry_run=True, concluded=states.get)}
    assert dry[ended].action == "would terminate" and "concluded by the pipeline (FAILED)" in dry[ended].reason
    assert dry[running].action == "keep"
    assert stranger not in dry
    assert all(_state(i) == "running" for i in (ended, running, overdue, stranger))  # dry run touched nothing

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
    found = {f.instance_id: f for f in sweep(now=later, concluded=states.get)}
    assert found[overdue].action == "terminate" and "past its max runtime of 1 min" in found[overdue].reason
    assert found[ended].action == "terminate"
    assert found[running].action == "keep"
    assert _state(ended) == _state(overdue) == "terminated"
    assert _state(running) == _state(stranger) == "running"


def test_janitor_command_dry_run_and_real(cloud):
    from mmp.cli import app

    done, _ = _mlflow_runs()
    ended = _launch(cloud, {"mmp:managed": "true", "mmp:run-id": done, "mmp:max-runtime-minutes": "60"})
    runner = CliRunner()
    result = runner.invoke(app, ["janitor", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.output)
    assert [(f["instance_id"], f["action"]) for f in findings] == [(ended, "would terminate")]
    assert _state(ended) == "running"
    result = runner.invoke(app, ["janitor"])
    assert result.exit_code == 0, result.output
    assert "concluded by the pipeline (FAILED)" in result.output and ended in result.output
    assert _state(ended) == "terminated"
    result = runner.invoke(app, ["janitor"])
    assert "no MMP-tagged instances are running" in result.output


def test_a_run_train_py_finished_keeps_its_hosts_until_the_pipeline_concludes_it(cloud):
    """train.py's mlflow.start_run() sets FINISHED on exit while the leader still copies the
    output to S3: only the pipeline's own conclusion (or the max runtime) releases the hosts."""
    from mlflow.tracking import MlflowClient

    from mmp.backends import JobState
    from mmp.tracking.client import RunTracker

    tracker = RunTracker()
    run = tracker.start("janitor", run_name="copying", tags={}, params={})
    MlflowClient(tracker.tracking_uri).set_terminated(run, status="FINISHED")  # what train.py's exit does
    host = _launch(cloud, {"mmp:managed": "true", "mmp:run-id": run, "mmp:max-runtime-minutes": "60"})

    [kept] = sweep()
    assert kept.action == "keep" and "not concluded by the pipeline" in kept.reason
    assert _state(host) == "running"

    tracker.finish(run, JobState.SUCCEEDED, message="horovodrun exited 0")  # after the copy: the pipeline's word
    [ended] = sweep()
    assert ended.action == "terminate" and "concluded by the pipeline (FINISHED)" in ended.reason
    assert _state(host) == "terminated"
