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
    field_validator,
)

from . import config
from .argv import horovodrun_ambiguity

EXPERIMENT_FILES = config.EXPERIMENT_FILES
MAX_FILE_BYTES = 256 * 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
MAX_HYPERPARAMETERS = 100

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


def _strict_int(value: Any) -> Any:
    """Accept 3 and "3" but not True, 1.5, "1.5" or "abc" (pydantic would take some)."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(value)
    return value


def _parse_hyperparameters(value: Any) -> Any:
    """A JSON object, a JSON string, or a Python-literal string (never `eval`)."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise ValueError(
                    "must be an object of name → value, as JSON "
                    '({"epochs": "40"}) or a Python-literal string ("{\'epochs\': \'40\'}")'
                ) from None
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of name → value, got {type(value).__name__}")
    return value


def _hyperparameter_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise ValueError(f"bad name {name!r}; names match {NAME_PATTERN} (no spaces, no leading '-')")
    clash = horovodrun_ambiguity(f"--{name}")
    if clash:
        raise ValueError(
            f"'--{name}' is an ambiguous abbreviation to horovodrun (could be {', '.join(clash[:3])}, …); "
            "use a longer name"
        )
    return name


StrictInt = Annotated[int, BeforeValidator(_strict_int)]
HyperparameterName = Annotated[str, AfterValidator(_hyperparameter_name)]


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
        description="Instance type, e.g. ml.p3.16xlarge (sagemaker), p3.8xlarge (dlami), local.",
        json_schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
    )
    instance_count: StrictInt = Field(default=1, alias="Instance_Count", ge=1, le=256)
    hyperparameters: Annotated[dict[HyperparameterName, Scalar], BeforeValidator(_parse_hyperparameters)] = Field(
        default_factory=dict,
        alias="Hyperparameters",
        description="Passed to train.py as --name value, in order.",
    )
    experiment_name: str | None = Field(
        default=None,
        alias="Experiment_Name",
        max_length=128,
        description="MLflow experiment; defaults to the repository's name.",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    max_runtime: StrictInt | None = Field(
        default=None,
        alias="Max_Runtime",
        ge=1,
        description="Minutes before the job is stopped.",
    )
    processes_per_host: StrictInt | None = Field(
        default=None, alias="Processes_Per_Host", ge=1, le=64, description="Horovod ranks per host."
    )
    use_spot: bool = Field(default=False, alias="Use_Spot", description="SageMaker managed spot.")

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
        if not _NAME_RE.fullmatch(value) or ".." in value:
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
        if value is not None and (not _NAME_RE.fullmatch(value) or ".." in value):
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
        reserved = {"dataset-path", "output-path", "dataset"} & set(value)
        if reserved:
            raise ValueError(f"{', '.join(sorted(reserved))} is set by the pipeline, not a hyperparameter")
        for name, item in value.items():
            if isinstance(item, str) and len(item) > 2500:
                raise ValueError(f"value of {name!r} is longer than 2500 characters")
            clash = horovodrun_ambiguity(item) if isinstance(item, str) else []
            if clash:
                raise ValueError(
                    f"value {item!r} of {name!r} is an ambiguous abbreviation to horovodrun "
                    f"(could be {', '.join(clash[:3])}, …)"
                )
        return value

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
        if len(loc) > 1 and field == "Hyperparameters":
            field = f"Hyperparameters.{loc[1]}"
            if len(loc) > 2 and loc[2] == "[key]":
                field += " (name)"
        kind = err["type"]
        given = err.get("input")
        if kind == "extra_forbidden":
            message = f"unknown field; allowed fields are {_allowed_fields()}"
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
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise ExperimentError([FieldProblem(field="(file)", message=f"is not valid JSON: {exc}")], source) from None
    if not isinstance(data, Mapping):
        raise ExperimentError(
            [FieldProblem(field="(file)", message=f"must hold a JSON object, got {type(data).__name__}")], source
        )
    context = {
        "datasets": set(datasets) if datasets is not None else None,
        "platforms": tuple(platforms) if platforms is not None else None,
    }
    try:
        return Experiment.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise ExperimentError(_problems(exc), source) from None


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
