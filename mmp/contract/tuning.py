"""The `Tuning` block of experiment.json: what to search, how, and how much at once.

Kept free of Optuna (a 2 s import): `mmp validate`, the webhook and the Lambda
stages validate a study without loading the engine. Problems are raised per field,
so `mmp validate` names `Tuning.Ranges.lr` or `Tuning.Parallel` and lists them all.
"""

from __future__ import annotations

import decimal
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


TYPE_SYNONYMS = {"int": "integer"}  # `"Type": "int"` reads as people write it


class FloatSteps(Sequence):
    """The points of a float range with a Step: Min, Min+Step, … up to Max, counted and computed in decimal
    as Optuna's FloatDistribution does (`(Max-Min) // Step`; a Max off the grid is not a point), so 0.1 steps
    give 0.3, not 0.30000000000000004. Lazy: a count of 10**12 costs nothing until iterated."""

    def __init__(self, low: float, high: float, step: float):
        self.low, self.step = decimal.Decimal(str(low)), decimal.Decimal(str(step))
        self.count = int((decimal.Decimal(str(high)) - self.low) // self.step) + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return float(self.low + index * self.step)


def _same_value(a: Category, b: Category) -> bool:
    """Equal as a JSON value: 1 == 1.0, but true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


class Range(BaseModel):
    """One tuned hyperparameter: integer or float bounds (linear or log, or in steps), or a list of values;
    with `When`, used only in trials where earlier categorical ranges take the given values."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    type: Literal["integer", "float", "categorical"] | None = Field(
        default=None, alias="Type",
        description="integer (or int), float or categorical; inferred when left out (Values → categorical, "
                    "whole-number Min, Max and Step → integer, otherwise float). `mmp validate` notes an integer "
                    "range inferred from whole-number bounds alone: write 0.0 and 1.0, or Type float, for a float.")
    min: Number | None = Field(default=None, alias="Min", description="Lower bound (inclusive).")
    max: Number | None = Field(default=None, alias="Max", description="Upper bound (inclusive).")
    scale: Literal["linear", "log"] = Field(default="linear", alias="Scale",
                                            description="log samples evenly in log space (bounds must be > 0).")
    step: Number | None = Field(default=None, alias="Step",
                                description="Spacing of the values from Min (integer: default 1; float: none, "
                                            "continuous). A float range with a Step has a grid.")
    values: list[Category] | None = Field(default=None, alias="Values", description="The choices of a categorical range.")
    when: dict[str, Union[Category, list[Category]]] | None = Field(
        default=None, alias="When",
        description="Use this range only in trials where each named categorical range (listed before this one) "
                    "takes the given value (or one of the given values); otherwise the hyperparameter keeps its "
                    "fixed value, or is not passed.")

    @field_validator("type", mode="before")
    @classmethod
    def _synonym(cls, value: Any) -> Any:
        return TYPE_SYNONYMS.get(value, value) if isinstance(value, str) else value

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
                if self.scale == "log":
                    problems.append("Step cannot be combined with a log scale")
                elif kind == "integer" and not (float(self.step).is_integer() and self.step >= 1):
                    problems.append(f"an integer range's Step must be a whole number ≥ 1, got {self.step!r}")
                elif kind == "float" and not (math.isfinite(self.step) and self.step > 0):
                    problems.append(f"a float range's Step must be a number above 0, got {self.step!r}")
                elif (kind == "float" and self.min is not None and self.max is not None and self.min < self.max
                      and not _bounds_problem(kind, self.min, self.max) and self.step > self.max - self.min):
                    problems.append(f"Step ({self.step:g}) is wider than Max - Min ({self.max - self.min:g}): "
                                    "the range would have one value")
        if self.when is not None and not self.when:
            problems.append("When needs at least one range and the value(s) it must take")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def kind(self) -> str:
        if self.type:
            return self.type
        if self.values is not None:
            return "categorical"
        if isinstance(self.min, int) and isinstance(self.max, int) and (self.step is None or isinstance(self.step, int)):
            return "integer"
        return "float"

    @property
    def inferred_integer(self) -> bool:
        """An integer range only because Min and Max are whole numbers (no Type, no Step said so)."""
        return self.type is None and self.step is None and self.kind == "integer"

    def grid_points(self) -> Sequence[Category] | None:
        """Every value grid search visits, or None for a float range without Step (no finite grid).
        Lazy for numbers: 0 to 10**9 costs nothing until someone iterates it."""
        if self.kind == "categorical":
            return list(self.values or [])
        if self.kind == "integer":
            return range(int(self.min), int(self.max) + 1, int(self.step or 1))
        if self.step is not None:
            return FloatSteps(self.min, self.max, self.step)
        return None

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "integer" and not float(value).is_integer():
            return False
        if self.kind == "float" and self.step is not None:
            k = (value - self.min) / self.step
            if abs(k - round(k)) >= 1e-8:  # Optuna's own test for a stepped float
                return False
        return self.min <= value <= self.max

    def active(self, chosen: dict[str, Any]) -> bool:
        """Whether a trial with the earlier ranges' `chosen` values uses this range (its When holds)."""
        for name, wanted in (self.when or {}).items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if name not in chosen or not any(_same_value(chosen[name], w) for w in options):
                return False
        return True


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
            floats = sorted(name for name, r in value.items() if r.grid_points() is None)
            if floats:
                problems.append(f"grid search needs integer, categorical or stepped float ranges; {', '.join(floats)} "
                                "is a float range without Step (give a Step or Values, or Strategy random/bayesian)")
        problems += _condition_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("max_runs")
    @classmethod
    def _budget(cls, value: int | None, info: ValidationInfo) -> int | None:
        strategy, ranges = info.data.get("strategy"), info.data.get("ranges")
        if strategy == "grid" and ranges:
            size = grid_size(ranges, limit=MAX_RUNS_CAP)
            if size is not None and size <= MAX_RUNS_CAP and value is not None and value != size:
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
            runs = grid_size(info.data["ranges"], limit=MAX_RUNS_CAP)
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
            size = grid_size(self.ranges, limit=MAX_RUNS_CAP)
            if size is not None and size > MAX_RUNS_CAP:
                exact = not any(r.when for r in self.ranges.values())  # a conditional count stops past the cap
                raise ValueError(f"the grid has {'' if exact else 'more than '}"
                                 f"{size if exact else MAX_RUNS_CAP} combinations; at most {MAX_RUNS_CAP}")
        return self

    @property
    def total_runs(self) -> int:
        if self.strategy == "grid":
            return grid_size(self.ranges) or 0
        return int(self.max_runs or 0)

    def grid(self) -> list[dict[str, Category]]:
        """Every combination, in a stable order (the order of Ranges, then of each range's values); a
        conditional range appears only in the combinations where its When holds.
        Validation capped the count at MAX_RUNS_CAP before anything is built."""
        size = grid_size(self.ranges, limit=MAX_RUNS_CAP)
        if size is None or size > MAX_RUNS_CAP:
            raise ValueError(f"no grid of at most {MAX_RUNS_CAP} combinations (got {size})")
        items = list(self.ranges.items())

        def combos(index: int, chosen: dict[str, Category]):
            if index == len(items):
                yield dict(chosen)
                return
            name, r = items[index]
            if not r.active(chosen):
                yield from combos(index + 1, chosen)
                return
            for value in r.grid_points() or []:
                yield from combos(index + 1, {**chosen, name: value})

        return list(combos(0, {}))

    @property
    def conditional(self) -> bool:
        return any(r.when for r in self.ranges.values())

    def notes(self) -> list[str]:
        """Valid but maybe unintended, for `mmp validate`: an integer range inferred from whole-number bounds
        (`"Min": 0, "Max": 1` samples only 0 and 1), a Max that a Step never reaches."""
        notes = []
        for name, r in self.ranges.items():
            if r.inferred_integer:
                points = r.grid_points()
                shown = ", ".join(str(v) for v in points[:3]) + (f", …, {points[-1]}" if len(points) > 3 else "")
                notes.append(f"Tuning.Ranges.{name}: whole-number Min and Max make an integer range "
                             f"({{{shown}}}); for a float range write {r.min}.0 and {r.max}.0 or add "
                             f'"Type": "float"; add "Type": "integer" to keep it and silence this note')
            points = r.grid_points()
            if r.step is not None and points is not None and points[-1] != r.max:
                notes.append(f"Tuning.Ranges.{name}: Max {r.max:g} is not Min plus a whole number of Steps; "
                             f"the last value is {points[-1]:g} (as Optuna samples it)")
        return notes

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


def allowed_fields(loc: list[str]) -> str | None:
    """The fields allowed where an unknown one was found (`Tuning.Ranges.lr.When` → a range's fields,
    `Tuning.Trials` → the block's), or None outside the Tuning block."""
    if not loc or loc[0] != "Tuning":
        return None
    model = Range if len(loc) == 4 and loc[1] in ("Ranges", "ranges") else Tuning
    return ", ".join(f.alias for f in model.model_fields.values() if f.alias)


def grid_size(ranges: dict[str, Range], limit: int | None = None) -> int | None:
    """The number of grid combinations, or None when a range is continuous: counted, never built.

    With conditional ranges (When), the count walks the values of the ranges others depend on; past
    `limit` it stops and returns a number above `limit` (not the exact size)."""
    sizes = [r.grid_points() for r in ranges.values()]
    if any(points is None for points in sizes):
        return None
    if not any(r.when for r in ranges.values()):
        return math.prod(len(points) for points in sizes)  # type: ignore[arg-type]
    items = list(ranges.items())
    parents = {name for r in ranges.values() for name in (r.when or {})}

    def count(index: int, chosen: dict[str, Category]) -> int:
        if index == len(items):
            return 1
        name, r = items[index]
        if not r.active(chosen):
            return count(index + 1, chosen)
        points = r.grid_points() or []
        if name not in parents:  # nothing later depends on its value: a factor
            return len(points) * count(index + 1, chosen)
        total = 0
        for value in points:
            total += count(index + 1, {**chosen, name: value})
            if limit is not None and total > limit:
                break
        return total

    return count(0, {})


def _condition_problems(ranges: dict[str, Range]) -> list[str]:
    """Each When names a categorical range listed before it (so trials sample in the order written, and
    no two ranges wait on each other) and only values that range has."""
    problems = []
    names = list(ranges)
    for position, (name, r) in enumerate(ranges.items()):
        for parent, wanted in (r.when or {}).items():
            where = f"{name!r}: When {parent!r}"
            if parent not in ranges:
                problems.append(f"{where} is not a range; When names one of Ranges "
                                f"({', '.join(n for n in names if n != name)})")
            elif names.index(parent) >= position:
                problems.append(f"{where} must name a range listed before {name!r} in Ranges")
            elif ranges[parent].kind != "categorical":
                problems.append(f"{where} must name a categorical range (one with Values); {parent!r} is "
                                f"{ranges[parent].kind}")
            else:
                allowed = ranges[parent].values or []
                for value in (wanted if isinstance(wanted, list) else [wanted]):
                    if not any(_same_value(value, v) for v in allowed):
                        problems.append(f"{where}: {_json(value)} is not one of its Values "
                                        f"({', '.join(_json(v) for v in allowed)})")
    return problems


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
