"""Run MMP's state machine definition state by state, as Step Functions would.

Neither Step Functions Local nor moto runs `.sync` integrations or JSONata, so this
walks the real definition (mmp.infra.pipeline.state_machine_definition): Choice
rules, JSONPath Parameters/ResultSelector/ResultPath/OutputPath, and every JSONata
expression (Arguments, TimeoutSeconds, Output, Catch Output) evaluated by the
`jsonata` npm package (the library Step Functions' JSONata is specified by). The
Lambda stages are the real handlers; each integration is a callable the test
supplies (moto, the runner's entry command in-process, a CodeBuild stand-in). A
callable raises TaskFailed to fail its Task, which then goes through the state's
own Retry (at once, without the interval: `retries` counts them) and then its Catch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / "build" / "node" / "node_modules"
EVAL = Path(__file__).with_name("jsonata_eval.js")
EXPRESSION = re.compile(r"^\{%(.*)%\}$", re.S)

LAMBDA = "arn:aws:states:::lambda:invoke"


class TaskFailed(Exception):
    def __init__(self, error: str, cause: str = ""):
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


def jsonata(expr: str, states: dict) -> Any:
    proc = subprocess.run(["node", str(EVAL)], input=json.dumps({"expr": expr, "states": states}),
                          capture_output=True, text=True, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def evaluate(template: Any, states: dict) -> Any:
    """A JSONata field: `{% expr %}` strings evaluated, anywhere inside objects and arrays."""
    if isinstance(template, str):
        match = EXPRESSION.match(template)
        return jsonata(match.group(1).strip(), states) if match else template
    if isinstance(template, dict):
        return {k: evaluate(v, states) for k, v in template.items()}
    if isinstance(template, list):
        return [evaluate(v, states) for v in template]
    return template


def path_get(data: Any, path: str) -> Any:
    if path == "$":
        return data
    for part in path.removeprefix("$.").split("."):
        data = data[part]
    return data


def path_set(data: dict, path: str, value: Any) -> dict:
    if path == "$":
        return value
    out = json.loads(json.dumps(data))
    node = out
    parts = path.removeprefix("$.").split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def payload(template: Any, data: Any) -> Any:
    """A JSONPath payload template: keys ending in `.$` take a path's value."""
    if isinstance(template, dict):
        return {(k[:-2] if k.endswith(".$") else k): (path_get(data, v) if k.endswith(".$") else payload(v, data))
                for k, v in template.items()}
    if isinstance(template, list):
        return [payload(v, data) for v in template]
    return template


def choose(state: dict, data: dict) -> str:
    def holds(rule: dict) -> bool:
        if "Or" in rule:
            return any(holds(r) for r in rule["Or"])
        if "And" in rule:
            return all(holds(r) for r in rule["And"])
        value = path_get(data, rule["Variable"])  # a missing field fails the execution, as in AWS
        return value == rule["BooleanEquals"]

    for rule in state["Choices"]:
        if holds(rule):
            return rule["Next"]
    return state["Default"]


def matches(names: list[str], error: str) -> bool:
    """ASL's error matching: States.ALL matches anything; States.TaskFailed any error but States.Timeout."""
    return error in names or "States.ALL" in names or ("States.TaskFailed" in names and error != "States.Timeout")


@dataclass
class Execution:
    definition: dict
    lambdas: dict[str, Callable[[dict], dict]]  # function ARN → handler
    integrations: dict[str, Callable[[Any, dict], Any]]  # Resource → fn(arguments, task state) → result
    path: list[str] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (state name, what the integration received)
    timeouts: dict[str, Any] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # state name → attempts past the first

    def run(self, data: dict, max_steps: int = 50) -> tuple[str, dict]:
        """(the end state's type: Succeed or Fail, the final data)."""
        name = self.definition["StartAt"]
        for _ in range(max_steps):
            self.path.append(name)
            state = self.definition["States"][name]
            kind = state["Type"]
            if kind in ("Succeed", "Fail"):
                return kind, data
            if kind == "Choice":
                name = choose(state, data)
                continue
            assert kind == "Task", kind
            data, name = self._task(name, state, data)
        raise AssertionError(f"no end after {max_steps} states: {self.path}")

    def _task(self, name: str, state: dict, data: dict) -> tuple[dict, str]:
        data = json.loads(json.dumps(data))  # what Step Functions hands over is JSON
        attempts: dict[int, int] = {}
        while True:
            try:
                return self._attempt(name, state, data)
            except TaskFailed as exc:
                retriers = state.get("Retry", [])
                index = next((i for i, r in enumerate(retriers) if matches(r["ErrorEquals"], exc.error)), None)
                if index is not None and attempts.get(index, 0) < retriers[index].get("MaxAttempts", 3):
                    attempts[index] = attempts.get(index, 0) + 1
                    self.retries[name] = self.retries.get(name, 0) + 1
                    continue
                catch = next((c for c in state.get("Catch", []) if matches(c["ErrorEquals"], exc.error)), None)
                if catch is None:
                    raise
                error = {"Error": exc.error, "Cause": exc.cause}
                if state.get("QueryLanguage") == "JSONata":
                    return evaluate(catch["Output"], {"input": data, "errorOutput": error}), catch["Next"]
                return path_set(data, catch["ResultPath"], error), catch["Next"]

    def _attempt(self, name: str, state: dict, data: dict) -> tuple[dict, str]:
        """One try of the Task: its output and next state, or TaskFailed."""
        jsonata_mode = state.get("QueryLanguage") == "JSONata"
        if jsonata_mode:
            arguments = evaluate(state["Arguments"], {"input": data})
            self.timeouts[name] = evaluate(state.get("TimeoutSeconds"), {"input": data})
        else:
            arguments = payload(state.get("Parameters", {}), data)
        self.calls.append((name, arguments))
        if state["Resource"] == LAMBDA:
            try:
                returned = self.lambdas[arguments["FunctionName"]](arguments["Payload"])
            except Exception as exc:  # a function error, as Lambda reports it
                raise TaskFailed(type(exc).__name__, str(exc)) from exc
            result = {"Payload": json.loads(json.dumps(returned))}
        else:
            result = self.integrations[state["Resource"]](arguments, data)
        if jsonata_mode:
            out = evaluate(state["Output"], {"input": data, "result": result})
        else:
            if "ResultSelector" in state:
                result = payload(state["ResultSelector"], result)
            out = path_set(data, state["ResultPath"], result) if "ResultPath" in state else result
            if "OutputPath" in state:
                out = path_get(out, state["OutputPath"])
        return out, state["Next"]
