"""`mmp status/logs/cancel RUN` take a run id or a unique prefix, typed literally: LIKE wildcards match nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mmp.cli import app
from mmp.pipeline.store import RunStore

runner = CliRunner()
RUN_ID = "3fa9c1d2e4b5a6978877665544332211"


@pytest.fixture
def one_run(mmp_home):
    store = RunStore()
    store.add(run_id=RUN_ID, experiment="demo", repository="demo", commit_sha="a" * 40, platform="local")
    store.update(RUN_ID, state="RUNNING")
    return store


@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
@pytest.mark.parametrize("pattern", ["%", "_", "3fa9%", "3f_9", "%1"])
def test_wildcards_in_a_run_id_match_no_run(one_run, command, pattern):
    result = runner.invoke(app, [command, pattern])
    assert result.exit_code == 2, result.output
    assert "no run" in result.output


def test_a_real_prefix_still_finds_the_run(one_run):
    result = runner.invoke(app, ["status", "3fa9c1"])
    assert result.exit_code == 0, result.output
    assert RUN_ID in result.output
    assert one_run.get("3fa9c1").run_id == RUN_ID and one_run.get("3fa9_1") is None


def test_cancel_of_a_run_whose_job_already_ended_says_so(one_run, mmp_home):
    """Issue 11.5: a record still saying RUNNING must not get "cancel sent" for a job that is gone."""
    import subprocess
    import sys

    run_dir = mmp_home / "runs" / "demo" / RUN_ID
    run_dir.mkdir(parents=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    (run_dir / "exit-code").write_text("0")
    (run_dir / "train.log").write_text("done\n")
    one_run.update(RUN_ID, handle={"platform": "local", "job_id": RUN_ID, "data": {
        "pid": finished.pid, "run_dir": str(run_dir), "log": str(run_dir / "train.log")}})
    result = runner.invoke(app, ["cancel", RUN_ID[:8]])
    assert result.exit_code == 1, result.output
    assert "was not running: its job had already ended (SUCCEEDED" in result.output
    assert "nothing cancelled" in result.output and "cancel sent" not in result.output
    assert not (run_dir / "cancelled").exists()
