"""The experiment.json model: what users commit to start a training run.

It accepts the seed format exactly as teams write it (string numbers, a
single-quoted Python-literal Hyperparameters string) as well as plain JSON, and
reports every problem at once, each naming the field and what is allowed.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, Union

from pydantic import (
    BaseModel,
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from mmp import config
from mmp.contract.argv import checked_value, command_line_problem
from mmp.contract.names import NAME_PATTERN, hyperparameter_name, is_safe_name
from mmp.contract.numbers import Flag, whole_number
from mmp.contract.tuning import Tuning, allowed_fields, field_path

EXPERIMENT_FILES = config.EXPERIMENT_FILES
MAX_FILE_BYTES = 256 * 1024
MAX_HYPERPARAMETERS = 100
# An experiment file needs two levels (the file, its Hyperparameters); the bound keeps
# json/ast from recursing until Python gives up (RecursionError) on hostile input.
MAX_NESTING = 16
# ASCII digits only: Python's int() also reads "٣" (Arabic-Indic three) as 3.
TAG_PROCESSES = "mmp.processes"
TAG_PROCESSES_PER_HOST = "mmp.processes_per_host"
AUTO_PROCESSES = "auto"  # one per GPU, decided on the instance (cloud platforms)

Scalar = Union[bool, int, float, str]


class FieldProblem(BaseModel):
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ExperimentError(ValueError):
    """An experiment file that cannot run; `problems` lists every field at fault."""

    def __init__(self, problems: list[FieldProblem], source: str = "experiment.json"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")

    def summary(self, limit: int = 140) -> str:
        """The first problems in at most `limit` characters (a GitHub status description)."""
        text = "; ".join(str(p) for p in self.problems)
        return text if len(text) <= limit else text[: limit - 1] + "…"


class _JsonObject(dict):
    """A JSON object that remembers the keys it saw twice (json keeps only the last)."""

    duplicates: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


# A string token's closing quote is optional, so an unclosed one ends the scan in one
# pass instead of being retried from every later quote (quadratic on hostile input).
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|\'(?:[^\'\\]|\\.)*\'?|[\[\]{}()]', re.S)


def _too_deep(text: str) -> str | None:
    """Where `text` (JSON or a Python literal) nests past MAX_NESTING: the keys leading
    there ("" at the top), or None. A scan of brackets outside strings, no recursion."""
    stack: list[tuple[str, str | None]] = []  # per open bracket: it, and the key it is the value of
    last_string: str | None = None
    for match in _TOKEN_RE.finditer(text):
        token = match.group()
        if token[0] in "\"'":
            last_string = token[1:-1]
        elif token in "[{(":
            in_object = bool(stack) and stack[-1][0] == "{"
            stack.append((token, last_string if in_object else None))
            last_string = None
            if len(stack) > MAX_NESTING:
                keys = [key for _, key in stack[1:3]]
                return ".".join(keys[: keys.index(None)] if None in keys else keys)
        elif stack:
            stack.pop()
    return None


def _nesting_message() -> str:
    return f"is nested more than {MAX_NESTING} levels deep; values are strings, numbers or booleans"


def _load_json(text: str | bytes) -> Any:
    """json.loads that keeps duplicate keys visible (call `_too_deep` first)."""
    return json.loads(text, object_pairs_hook=_json_object)


_HYPERPARAMETERS_FORMS = ('must be an object of name → value, as JSON ({"epochs": "40"}) '
                          "or a Python-literal string (\"{'epochs': '40'}\")")


def _python_literal(text: str) -> Any:
    """`ast.literal_eval`, after refusing a dict literal that repeats a key."""
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, MemoryError, RecursionError, ValueError):
        raise ValueError(_HYPERPARAMETERS_FORMS) from None
    if isinstance(node, ast.Dict):
        seen: set[Any] = set()
        for key in node.keys:
            if isinstance(key, ast.Constant) and key.value in seen:
                raise ValueError(f"{key.value!r} is given twice; keep one")
            if isinstance(key, ast.Constant):
                seen.add(key.value)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(_HYPERPARAMETERS_FORMS) from None


def _parse_hyperparameters(value: Any) -> Any:
    """A JSON object, a JSON string, or a Python-literal string (never `eval`)."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if _too_deep(text) is not None:
            raise ValueError(_nesting_message())
        try:
            value = _load_json(text)
        except RecursionError:
            raise ValueError(_nesting_message()) from None
        except ValueError:
            value = _python_literal(text)
        repeated = getattr(value, "duplicates", None)
        if repeated:
            raise ValueError(f"{repeated[0]!r} is given twice; keep one")
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of name → value, got {type(value).__name__}")
    return value


HyperparameterName = Annotated[str, AfterValidator(hyperparameter_name)]
HyperparameterValue = Annotated[Scalar, AfterValidator(checked_value)]
HYPERPARAMETERS_DESCRIPTION = (
    "Passed to train.py after the contract flags, in order: a string or number as `--name value` "
    "(strings exactly as written), true as a bare `--name` (argparse's store_true), false not at all. "
    "A JSON object, or the seed's string form: JSON or a Python literal, where True/False are booleans "
    "and 'True' (quoted) is the string True."
)


class Experiment(BaseModel):
    """One experiment file. Field names are the file's own (`Dataset_Name`, ...)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    platform: str = Field(
        default_factory=config.default_platform,
        alias="Platform",
        description="Where to train: " + ", ".join(config.PLATFORMS) + " (or a plugin's name).",
    )
    dataset_name: str = Field(
        alias="Dataset_Name",
        max_length=64,
        description="A dataset from the catalogue (`mmp datasets`).",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    training_instance: str = Field(
        alias="Training_Instance",
        max_length=64,
        description="Instance type, e.g. ml.p3.16xlarge (sagemaker), p3.8xlarge (dlami), "
                    "g5.12xlarge (kubernetes), local.",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
    )
    instance_count: whole_number(1, 256) = Field(  # type: ignore[valid-type]
        default=1, alias="Instance_Count", description="Hosts (instances) to train on."
    )
    hyperparameters: Annotated[
        dict[HyperparameterName, HyperparameterValue],
        BeforeValidator(_parse_hyperparameters),
        WithJsonSchema({
            "anyOf": [
                {"type": "object", "maxProperties": MAX_HYPERPARAMETERS,
                 "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 128},
                 "additionalProperties": {"type": ["string", "number", "boolean"]}},
                {"type": "string"},
            ],
        }),
    ] = Field(default_factory=dict, alias="Hyperparameters", description=HYPERPARAMETERS_DESCRIPTION)
    experiment_name: str | None = Field(
        default=None,
        alias="Experiment_Name",
        max_length=128,
        description="MLflow experiment; defaults to the repository's name.",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    max_runtime: whole_number(1) | None = Field(  # type: ignore[valid-type]
        default=None,
        alias="Max_Runtime",
        description="Minutes before the job is stopped.",
    )
    processes_per_host: whole_number(1, 64) | None = Field(  # type: ignore[valid-type]
        default=None, alias="Processes_Per_Host",
        description="Horovod ranks per host; the run has Instance_Count × Processes_Per_Host. "
                    "Default: 1 on the local platform, one per GPU on the cloud ones.",
    )
    use_spot: Flag = Field(default=False, alias="Use_Spot", description="SageMaker managed spot.")
    tuning: Tuning | None = Field(
        default=None, alias="Tuning",
        description="Hyperparameter search: one commit runs a study of many trials (see README).",
    )

    @field_validator("platform")
    @classmethod
    def _known_platform(cls, value: str, info: ValidationInfo) -> str:
        allowed = (info.context or {}).get("platforms") or config.PLATFORMS
        if value not in allowed:
            raise ValueError(f"unknown platform {value!r}; allowed: {', '.join(allowed)}")
        return value

    @field_validator("dataset_name")
    @classmethod
    def _known_dataset(cls, value: str, info: ValidationInfo) -> str:
        if not is_safe_name(value):
            raise ValueError(
                f"{value!r} is not a safe name; use letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)"
            )
        datasets = (info.context or {}).get("datasets")
        if datasets is not None and value not in datasets:
            known = ", ".join(sorted(datasets)) or "none yet (mmp datasets add)"
            raise ValueError(f"unknown dataset {value!r}; the catalogue has: {known}")
        return value

    @field_validator("training_instance")
    @classmethod
    def _safe_instance(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} is not an instance type (letters, digits, '.', '-')")
        return value

    @field_validator("experiment_name")
    @classmethod
    def _safe_experiment(cls, value: str | None) -> str | None:
        if value is not None and not is_safe_name(value):
            raise ValueError(f"{value!r} is not a safe name; use letters, digits, '_', '.', '-'")
        return value

    @field_validator("max_runtime")
    @classmethod
    def _capped_runtime(cls, value: int | None) -> int | None:
        cap = config.max_runtime_cap()
        if value is not None and value > cap:
            raise ValueError(f"must be at most {cap} minutes, got {value}")
        return value

    @field_validator("hyperparameters")
    @classmethod
    def _safe_hyperparameters(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        if len(value) > MAX_HYPERPARAMETERS:
            raise ValueError(f"at most {MAX_HYPERPARAMETERS} hyperparameters, got {len(value)}")
        problem = command_line_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("tuning")
    @classmethod
    def _trial_command_line(cls, value: Tuning | None, info: ValidationInfo) -> Tuning | None:
        """The longest command line a trial can make (fixed values plus each range's longest) fits too."""
        fixed = info.data.get("hyperparameters")
        if value is not None and fixed is not None:
            problem = command_line_problem({**fixed, **value.longest_trial()})
            if problem:
                raise ValueError(f"the Hyperparameters with each range's longest value {problem}")
        return value

    def for_trial(self, params: Mapping[str, Any]) -> "Experiment":
        """The single run a study's trial makes: its values checked as a fixed hyperparameter is
        (ValueError names the one refused), the Tuning block gone."""
        for name, value in params.items():
            try:
                checked_value(value)
            except ValueError as exc:
                raise ValueError(f"Tuning.Ranges.{name}: {exc}") from None
        hyperparameters = {**self.hyperparameters, **params}
        problem = command_line_problem(hyperparameters)
        if problem:
            raise ValueError(f"the trial's Hyperparameters {problem}")
        return self.model_copy(update={"hyperparameters": hyperparameters, "tuning": None})

    # -- derived values -------------------------------------------------------
    @property
    def runtime_minutes(self) -> int:
        return self.max_runtime or config.default_max_runtime()

    @property
    def processes(self) -> int:
        return self.processes_per_host or 1

    @property
    def total_processes(self) -> int:
        return self.instance_count * self.processes

    def processes_per_host_known(self) -> int | None:
        """Ranks per host when the file decides it; None: one per GPU, decided on the instance."""
        return self.processes_per_host or (1 if self.platform == "local" else None)

    def process_tags(self) -> dict[str, str]:
        """MLflow tags saying how many training processes the run has (Instance_Count × per host)."""
        per_host = self.processes_per_host_known()
        if per_host is None:
            return {TAG_PROCESSES: AUTO_PROCESSES, TAG_PROCESSES_PER_HOST: AUTO_PROCESSES}
        return {TAG_PROCESSES: str(self.instance_count * per_host), TAG_PROCESSES_PER_HOST: str(per_host)}

    def notes(self) -> list[str]:
        """Valid but likely unintended: a boolean written as a string passes `--name True`,
        which a store_true flag refuses; a tuned range inferred as integer (plain text, for `mmp validate`)."""
        return [
            f"Hyperparameters.{name}: the string {value!r} passes '--{name} {value}'; for an on/off flag "
            f"write {value.lower()} (JSON) or {value.capitalize()} (Python literal) without quotes"
            for name, value in self.hyperparameters.items()
            if isinstance(value, str) and value.lower() in ("true", "false")
        ] + (self.tuning.notes() if self.tuning is not None else [])

    def describe(self) -> str:
        """One line for people: platform, dataset, hosts and processes."""
        per_host = self.processes_per_host_known()
        total = None if per_host is None else self.instance_count * per_host
        procs = ("one process per GPU on each host" if total is None else
                 f"{total} process{'es' if total > 1 else ''} ({self.instance_count} × {per_host} per host)")
        return f"{self.platform}, {self.dataset_name}, {self.instance_count} × {self.training_instance}, {procs}"

    def resolved_name(self, repository: str) -> str:
        return self.experiment_name or safe_name(repository)

    def to_file_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def safe_name(text: str) -> str:
    """A repository name (maybe `owner/repo`) made into an allowed experiment name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.rsplit("/", 1)[-1]).strip("-.") or "experiment"
    return name.replace("..", ".")


_FRIENDLY = {
    "missing": "is required",
    "extra_forbidden": None,  # filled in with the allowed names
    "greater_than_equal": "must be ≥ {ge}",
    "less_than_equal": "must be ≤ {le}",
    "string_too_long": "must be at most {max_length} characters",
}


def _allowed_fields() -> str:
    return ", ".join(f.alias for f in Experiment.model_fields.values() if f.alias)


def _problems(exc: ValidationError) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else "(file)"
        if field == "Tuning":  # name the nested field: Tuning.Ranges.lr, Tuning.Parallel
            field = field_path(loc)
        if len(loc) > 1 and field == "Hyperparameters":
            field = f"Hyperparameters.{loc[1]}"
            if len(loc) > 2 and loc[2] == "[key]":
                field += " (name)"
        kind = err["type"]
        given = err.get("input")
        if kind == "extra_forbidden":  # the fields of the object it was found in, not the file's
            message = f"unknown field; allowed fields are {allowed_fields(loc) or _allowed_fields()}"
        elif kind in _FRIENDLY and _FRIENDLY[kind]:
            message = _FRIENDLY[kind].format(**(err.get("ctx") or {}))
            if kind != "missing":
                message += f", got {given!r}"
        elif field.startswith("Hyperparameters.") and kind.endswith("_type"):
            message = f"must be a string, number or boolean, got {type(given).__name__}"
        else:
            message = err["msg"].removeprefix("Value error, ")
        problems.append(FieldProblem(field=field, message=message))
    # pydantic reports one error per union member for a bad hyperparameter value
    unique: dict[tuple[str, str], FieldProblem] = {}
    for p in problems:
        unique.setdefault((p.field, p.message), p)
    return list(unique.values())


_REPEATED = "appears more than once; JSON would keep only the last, so keep one"


def _repeated_keys(value: Any, path: str = "") -> list[str]:
    """Every key given twice in the file, at any depth (Tuning.Ranges.lr.Max), as a field path."""
    found: list[str] = []
    if isinstance(value, dict):
        found += [f"{path}{key}" for key in getattr(value, "duplicates", [])]
        for key, inner in value.items():
            found += _repeated_keys(inner, f"{path}{key}.")
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _repeated_keys(inner, f"{path[:-1]}[{index}].")
    return found


def parse_experiment(
    data: str | bytes | Mapping[str, Any],
    *,
    datasets: Iterable[str] | None = None,
    platforms: Iterable[str] | None = None,
    source: str = "experiment.json",
) -> Experiment:
    """Validate an experiment file's text (or parsed dict); raise ExperimentError."""
    if isinstance(data, (str, bytes)):
        if len(data) > MAX_FILE_BYTES:
            raise ExperimentError(
                [FieldProblem(field="(file)", message=f"is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")],
                source,
            )
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        deep = _too_deep(text)
        if deep is not None:
            raise ExperimentError([FieldProblem(field=deep or "(file)", message=_nesting_message())], source)
        try:
            data = _load_json(data)
        except RecursionError:  # brackets the scan could not see (a stray quote): still a field error
            raise ExperimentError([FieldProblem(field="(file)", message=_nesting_message())], source) from None
        except ValueError as exc:
            raise ExperimentError([FieldProblem(field="(file)", message=f"is not valid JSON: {exc}")], source) from None
    if not isinstance(data, Mapping):
        raise ExperimentError(
            [FieldProblem(field="(file)", message=f"must hold a JSON object, got {type(data).__name__}")], source
        )
    repeated = [FieldProblem(field=field, message=_REPEATED) for field in _repeated_keys(data)]
    context = {
        "platform": data.get("Platform", config.default_platform()),  # for Tuning.Parallel's platform limit
        "datasets": set(datasets) if datasets is not None else None,
        "platforms": tuple(platforms) if platforms is not None else None,
    }
    try:
        experiment = Experiment.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise ExperimentError(repeated + _problems(exc), source) from None
    if repeated:
        raise ExperimentError(repeated, source)
    return experiment


def find_experiment_file(folder: Path) -> Path | None:
    """`experiment.json` wins over the seed's other name, `experiment_config.json`."""
    for name in EXPERIMENT_FILES:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


def load_experiment(path: Path, **kwargs: Any) -> Experiment:
    path = Path(path)
    if path.is_dir():
        found = find_experiment_file(path)
        if found is None:
            raise ExperimentError(
                [FieldProblem(field="(file)", message=f"no {' or '.join(EXPERIMENT_FILES)} in {path}")],
                str(path),
            )
        path = found
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ExperimentError(
            [FieldProblem(field="(file)", message=f"is {size} bytes; the limit is {MAX_FILE_BYTES}")], path.name
        )
    return parse_experiment(path.read_bytes(), source=path.name, **kwargs)


def json_schema() -> dict[str, Any]:
    schema = Experiment.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "MMP experiment.json"
    return schema
