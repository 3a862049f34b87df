"""The `Tuning` block of experiment.json: what to search, how, and how much at once.

Kept free of Optuna (a 2 s import): `mmp validate`, the webhook and the Lambda
stages validate a study without loading the engine. Problems are raised per field,
so `mmp validate` names `Tuning.Ranges.lr` or `Tuning.Parallel` and lists them all.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import posixpath
import re
from typing import Any, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mmp.contract.argv import checked_value, hyperparameter_args
from mmp.contract.names import hyperparameter_name
from mmp.contract.numbers import Flag, Number, whole_number

STRATEGIES = ("grid", "random", "bayesian")
DIRECTIONS = ("maximize", "minimize")
RANGE_TYPES = ("integer", "float", "categorical")
MAX_RUNS_CAP = 1000
MAX_CATEGORIES = 100
MAX_RANGES = 20

# How many trials may run at once, per platform. MMP's own caps, not AWS quotas:
# a local trial takes at least one core; each SageMaker trial is a training job
# (accounts start with low concurrent-job quotas); each dlami trial is a cluster.
PLATFORM_PARALLEL_LIMITS: dict[str, int] = {"sagemaker": 10, "sagemaker-fsx": 10, "dlami": 4, "kubernetes": 4}
PLUGIN_PARALLEL_LIMIT = 1  # a plugin platform tunes one trial at a time unless MMP knows better


def parallel_limit(platform: str | None) -> int:
    if platform == "local":
        return max(os.cpu_count() or 1, 1)
    return PLATFORM_PARALLEL_LIMITS.get(platform or "", PLUGIN_PARALLEL_LIMIT)


def metric_key_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a metric key (mirrors mlflow.utils.validation), or None."""
    if not name or len(name) > 250:
        return "must be 1 to 250 characters"
    if not re.fullmatch(r"[/\w.\- :]+", name):
        return "may only contain letters, digits, '_', '-', '.', ' ', ':' and '/' (MLflow's metric keys)"
    norm = posixpath.normpath(name)
    if norm != name or norm.startswith(("..", "/")):
        return f"would resolve to the path {norm!r} in MLflow; use a plain key"
    return None


Category = Union[bool, int, float, str]


# Optuna's samplers compute in float64: an integer bound beyond 2**53 loses its value there.
MAX_INTEGER_BOUND = 2 ** 53


def _bounds_problem(kind: str, low: float, high: float) -> str | None:
    """Why Min/Max cannot be sampled (an infinite bound, or a width that overflows), or None.
    Without this a study would start and only then fail inside Optuna (issue 20, finding 2)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"Min and Max must be finite numbers, got Min {low!r}, Max {high!r}"
    if kind == "integer" and max(abs(low), abs(high)) > MAX_INTEGER_BOUND:
        return f"an integer range's Min and Max must lie within ±2**53 ({MAX_INTEGER_BOUND}), got {low:g} to {high:g}"
    if not math.isfinite(float(high) - float(low)):
        return f"Max - Min must be a finite float; {high:g} - ({low:g}) overflows (at most about 1.8e308)"
    return None


class Range(BaseModel):
    """One tuned hyperparameter: integer or float bounds (linear or log), or a list of values."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    type: Literal["integer", "float", "categorical"] | None = Field(
        default=None, alias="Type",
        description="integer, float or categorical; inferred when left out (Values → categorical, "
                    "whole-number bounds → integer, otherwise float).")
    min: Number | None = Field(default=None, alias="Min", description="Lower bound (inclusive).")
    max: Number | None = Field(default=None, alias="Max", description="Upper bound (inclusive).")
    scale: Literal["linear", "log"] = Field(default="linear", alias="Scale",
                                            description="log samples evenly in log space (bounds must be > 0).")
    step: Number | None = Field(default=None, alias="Step", description="Spacing of an integer range (default 1).")
    values: list[Category] | None = Field(default=None, alias="Values", description="The choices of a categorical range.")

    @model_validator(mode="after")
    def _consistent(self) -> "Range":
        kind = self.kind
        problems = []
        if kind == "categorical":
            if not self.values:
                problems.append("a categorical range needs a non-empty Values list")
            elif len(self.values) > MAX_CATEGORIES:
                problems.append(f"at most {MAX_CATEGORIES} Values, got {len(self.values)}")
            else:
                problems += _value_problems(self.values)
            if self.min is not None or self.max is not None or self.step is not None or self.scale != "linear":
                problems.append("a categorical range takes Values only (no Min, Max, Step or Scale)")
        else:
            if self.values is not None:
                problems.append(f"an {kind} range takes Min and Max, not Values")
            if self.min is None or self.max is None:
                problems.append(f"an {kind} range needs both Min and Max")
            elif problem := _bounds_problem(kind, self.min, self.max):
                problems.append(problem)
            else:
                if not self.min < self.max:
                    problems.append(f"Min ({self.min:g}) must be below Max ({self.max:g})")
                if self.scale == "log" and self.min <= 0:
                    problems.append(f"a log scale needs Min above 0, got {self.min:g} (log of 0 is undefined)")
                if kind == "integer" and not (float(self.min).is_integer() and float(self.max).is_integer()):
                    problems.append("an integer range needs whole-number Min and Max")
            if self.step is not None:
                if kind != "integer":
                    problems.append("Step applies to integer ranges only")
                elif not (float(self.step).is_integer() and self.step >= 1):
                    problems.append(f"Step must be a whole number ≥ 1, got {self.step!r}")
                elif self.scale == "log":
                    problems.append("Step cannot be combined with a log scale")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def kind(self) -> str:
        if self.type:
            return self.type
        if self.values is not None:
            return "categorical"
        if isinstance(self.min, int) and isinstance(self.max, int):
            return "integer"
        return "float"

    def grid_points(self) -> Sequence[Category] | None:
        """Every value grid search visits, or None for a float range (no finite grid).
        A lazy range for integers: 0 to 10**9 costs nothing until someone iterates it."""
        if self.kind == "categorical":
            return list(self.values or [])
        if self.kind == "integer":
            return range(int(self.min), int(self.max) + 1, int(self.step or 1))
        return None

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "integer" and not float(value).is_integer():
            return False
        return self.min <= value <= self.max


class Tuning(BaseModel):
    """The study: objective, strategy, budget, concurrency, early stopping and ranges."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    objective_metric: str = Field(alias="Objective_Metric",
                                  description="The MLflow metric train.py logs; its final value scores a trial.")
    direction: Literal["maximize", "minimize"] = Field(default="maximize", alias="Direction")
    strategy: Literal["grid", "random", "bayesian"] = Field(
        default="bayesian", alias="Strategy",
        description="grid (every combination once), random, or bayesian (Optuna's TPE).")
    ranges: dict[str, Range] = Field(alias="Ranges", min_length=1,
                                     description="Hyperparameter name → range; other hyperparameters stay fixed.")
    max_runs: whole_number(1, MAX_RUNS_CAP) | None = Field(  # type: ignore[valid-type]
                                   default=None, alias="Max_Runs", validate_default=True,
                                   description="Trials in all (grid: defaults to the grid's size).")
    parallel: whole_number(1) = Field(default=1, alias="Parallel",  # type: ignore[valid-type]
                                      description="Trials running at once.")
    early_stopping: Flag = Field(default=False, alias="Early_Stopping",
                                 description="Stop trials whose intermediate objective is below the median "
                                             "of earlier trials at the same step (Optuna's MedianPruner).")
    max_failures: whole_number(1) | None = Field(default=None, alias="Max_Failures",  # type: ignore[valid-type]
                                       description="Stop and fail the study once this many trials failed "
                                                   "(default: it fails only if every trial failed).")
    seed: whole_number(0) | None = Field(default=None, alias="Seed",  # type: ignore[valid-type]
                                         description="Sampler seed, for repeatable studies.")

    @field_validator("objective_metric")
    @classmethod
    def _metric_key(cls, value: str) -> str:
        problem = metric_key_problem(value)
        if problem:
            raise ValueError(f"{value!r} is not a valid MLflow metric key: {problem}")
        return value

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: dict[str, Range], info: ValidationInfo) -> dict[str, Range]:
        if len(value) > MAX_RANGES:
            raise ValueError(f"at most {MAX_RANGES} ranges, got {len(value)}")
        problems = []
        for name in value:
            try:
                hyperparameter_name(name)
            except ValueError as exc:
                problems.append(f"{name!r}: {exc}")
        if info.data.get("strategy") == "grid":
            floats = sorted(name for name, r in value.items() if r.kind == "float")
            if floats:
                problems.append(f"grid search needs integer or categorical ranges; {', '.join(floats)} "
                                "is a float range (use Values, or Strategy random/bayesian)")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("max_runs")
    @classmethod
    def _budget(cls, value: int | None, info: ValidationInfo) -> int | None:
        strategy, ranges = info.data.get("strategy"), info.data.get("ranges")
        if strategy == "grid" and ranges:
            size = grid_size(ranges)
            if size is not None and value is not None and value != size:
                raise ValueError(f"grid search runs each of the {size} combinations once; leave Max_Runs out "
                                 f"or set it to {size}")
        elif value is None and strategy in ("random", "bayesian"):
            raise ValueError(f"is required for Strategy {strategy} (how many trials to run)")
        return value

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, value: int, info: ValidationInfo) -> int:
        runs = info.data.get("max_runs")
        if runs is None and info.data.get("strategy") == "grid" and info.data.get("ranges"):
            runs = grid_size(info.data["ranges"])
        if runs is not None and value > runs:
            raise ValueError(f"{value} trials at once is more than the {runs} trial(s) in the study")
        platform = (info.context or {}).get("platform")
        limit = parallel_limit(platform)
        if value > limit:
            raise ValueError(f"{value} is above the {platform or 'platform'} limit of {limit} trials at once")
        return value

    @model_validator(mode="after")
    def _grid_not_too_big(self) -> "Tuning":
        if self.strategy == "grid":
            size = grid_size(self.ranges)
            if size is not None and size > MAX_RUNS_CAP:
                raise ValueError(f"the grid has {size} combinations; at most {MAX_RUNS_CAP}")
        return self

    @property
    def total_runs(self) -> int:
        if self.strategy == "grid":
            return grid_size(self.ranges) or 0
        return int(self.max_runs or 0)

    def grid(self) -> list[dict[str, Category]]:
        """Every combination, in a stable order (the order of Ranges, then of each range's values).
        Validation capped the count at MAX_RUNS_CAP before anything is built."""
        size = grid_size(self.ranges)
        if size is None or size > MAX_RUNS_CAP:
            raise ValueError(f"no grid of at most {MAX_RUNS_CAP} combinations (got {size})")
        names = list(self.ranges)
        axes = [self.ranges[n].grid_points() or [] for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*axes)]

    def longest_trial(self) -> dict[str, Category]:
        """Per range, the value with the longest command-line text: the longest line a trial can make
        (a float is at most repr's 24 characters)."""
        def width(value: Category) -> int:
            return len(" ".join(hyperparameter_args({"x": value})))

        def longest(r: Range) -> Category:
            if r.kind == "categorical":
                return max(r.values or [], key=width)
            if r.kind == "integer":
                return max(int(r.min), int(r.max), key=width)
            return -1.2345678901234567e-300

        return {name: longest(r) for name, r in self.ranges.items()}

    def describe(self) -> dict[str, Any]:
        """The block as MMP records it on the study's parent run."""
        return self.model_dump(by_alias=True, exclude_none=True)


def field_path(loc: list[str]) -> str:
    """`Tuning.Max_Runs` for pydantic's loc, which names a defaulted field by its Python name."""
    aliases = {name: f.alias for model in (Tuning, Range) for name, f in model.model_fields.items() if f.alias}
    return ".".join(aliases.get(part, part) for part in loc)


def grid_size(ranges: dict[str, Range]) -> int | None:
    """The number of grid combinations, or None when a range is continuous: counted, never built."""
    sizes = [r.grid_points() for r in ranges.values()]
    if any(points is None for points in sizes):
        return None
    return math.prod(len(points) for points in sizes)  # type: ignore[arg-type]


def _value_problems(values: list[Category]) -> list[str]:
    """Each of a range's Values passes the fixed hyperparameters' check, and no two are one point:
    Optuna matches choices with == (1, 1.0 and true are one), and 1 and "1" give train.py the same
    arguments."""
    problems = []
    for index, value in enumerate(values):
        try:
            checked_value(value)
        except ValueError as exc:
            problems.append(f"Values[{index}] {exc}")
    for later, value in enumerate(values):
        for earlier in values[:later]:
            if earlier == value or hyperparameter_args({"x": earlier}) == hyperparameter_args({"x": value}):
                problems.append(f"Values {_json(earlier)} and {_json(value)} are the same trial (Optuna compares "
                                "with ==, and train.py gets the same arguments); keep one")
                break
    return problems


def _json(value: Category) -> str:
    return json.dumps(value)
