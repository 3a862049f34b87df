"""The state machine's shape: valid ASL (asl-validator, the npm package), no loop, and every
Task's failure caught into Conclude. How each push is routed is run in test_aws_stages.py
and tests/runner/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .pipeline_stack import definition
from .sfn import NODE_MODULES

VALIDATOR = NODE_MODULES / ".bin" / "asl-validator"


def validate(doc: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    if not VALIDATOR.exists():
        pytest.fail("asl-validator is missing: scripts/bootstrap.sh installs it into build/node (needs npm)")
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(doc))
    return subprocess.run([str(VALIDATOR), "--json-path", str(path)], capture_output=True, text=True, timeout=120)


def successors(state: dict) -> list[str]:
    return [n for n in [state.get("Next"), state.get("Default"), *[c["Next"] for c in state.get("Choices", [])],
                        *[c["Next"] for c in state.get("Catch", [])]] if n]


def test_the_definition_is_valid_asl(tmp_path):
    result = validate(definition(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_catches_what_it_should(tmp_path):
    """So a pass above means something: a Catch to a missing state, a bad JSONata field."""
    broken = definition()
    broken["States"]["Train"]["Catch"][0]["Next"] = "Nowhere"
    assert validate(broken, tmp_path).returncode != 0
    broken = definition()
    broken["States"]["Train"]["TimeoutSeconds"] = "$.train_timeout_seconds"  # JSONPath in a JSONata state
    assert validate(broken, tmp_path).returncode != 0


def test_nothing_loops_so_the_history_stays_short():
    """A run is a path through a DAG (about ten states) however long the job: the 25,000-event
    history limit cannot be reached by waiting."""
    states = definition()["States"]
    visiting, done = set(), set()

    def visit(name: str) -> None:
        assert name not in visiting, f"loop through {name}"
        if name in done:
            return
        visiting.add(name)
        for nxt in successors(states[name]):
            visit(nxt)
        visiting.discard(name)
        done.add(name)

    visit(definition()["StartAt"])
    assert done == set(states)  # and every state is reachable
    assert not any(s["Type"] == "Wait" for s in states.values())


def test_every_task_catches_everything_into_conclude():
    states = definition()["States"]

    def reaches_conclude(name: str, seen=()) -> bool:
        if name == "Conclude":
            return True
        state = states[name]
        nexts = [n for n in [state.get("Next"), state.get("Default"), *[c["Next"] for c in state.get("Choices", [])]]
                 if n and n not in seen]
        return bool(nexts) and all(reaches_conclude(n, (*seen, name)) for n in nexts)

    tasks = {name: s for name, s in states.items() if s["Type"] == "Task" and name != "Conclude"}
    assert set(tasks) == {"Prepare", "RunnerImage", "Promote", "RunTraining", "RunStudy", "BuildImage", "Launch",
                          "Train"}
    for name, state in tasks.items():
        catch_all = [c for c in state.get("Catch", []) if c["ErrorEquals"] == ["States.ALL"]]
        assert catch_all, f"{name} has no Catch for States.ALL"
        assert reaches_conclude(catch_all[0]["Next"]), f"{name}'s Catch does not lead to Conclude"
        assert reaches_conclude(state["Next"]), f"{name} does not lead to Conclude"
    # Conclude itself: retried, and an execution that still fails reaches it through EventBridge.
    assert any("States.TaskFailed" in r["ErrorEquals"] for r in states["Conclude"]["Retry"])


def test_every_wait_is_a_sync_integration_bounded_per_run():
    states = definition()["States"]
    waits = {name: s["Resource"] for name, s in states.items() if s.get("Resource", "").endswith(".sync")}
    assert waits == {"RunnerImage": "arn:aws:states:::codebuild:startBuild.sync",
                     "BuildImage": "arn:aws:states:::codebuild:startBuild.sync",
                     "Promote": "arn:aws:states:::ecs:runTask.sync",
                     "RunTraining": "arn:aws:states:::ecs:runTask.sync",
                     "RunStudy": "arn:aws:states:::ecs:runTask.sync",
                     "Train": "arn:aws:states:::sagemaker:createTrainingJob.sync"}
    assert states["Train"]["TimeoutSeconds"] == "{% $states.input.train_timeout_seconds %}"
    assert states["RunTraining"]["TimeoutSeconds"] == "{% $states.input.runner_timeout_seconds %}"
    assert states["RunStudy"]["TimeoutSeconds"] == "{% $states.input.runner_timeout_seconds %}"


def test_only_a_study_retries_its_runner_and_never_after_a_timeout():
    """A study resumes from its journal, so a dead runner task is started again; one that ran
    out of time, or a training or promotion task (not resumable), is not."""
    from mmp.infra.pipeline import STUDY_RETRY

    states = definition()["States"]
    assert states["RunStudy"]["Retry"] == STUDY_RETRY
    (retrier,) = STUDY_RETRY
    assert retrier["ErrorEquals"] == ["States.TaskFailed"] and 1 <= retrier["MaxAttempts"] <= 3  # TaskFailed: not Timeout
    assert "Retry" not in states["RunTraining"] and "Retry" not in states["Promote"]
    assert isinstance(states["Promote"]["TimeoutSeconds"], int)
