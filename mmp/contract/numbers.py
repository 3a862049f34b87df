"""Numbers and flags as experiment files write them: JSON numbers or ASCII-digit strings
(the seed's "1"), JSON booleans or the strings "true"/"false".

One place for both models (experiment.json and its Tuning block), so a value is read,
refused and described in the JSON Schema the same way everywhere.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, WithJsonSchema

WHOLE_NUMBER_PATTERN = r"^ *[+-]?[0-9]{1,18} *$"
_WHOLE_RE = re.compile(WHOLE_NUMBER_PATTERN)
POSITIVE_NUMBER_PATTERN = r"^ *[+]?0*[1-9][0-9]{0,17} *$"  # the schema's string form of a count ≥ 1
DECIMAL_PATTERN = r"^ *[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][+-]?[0-9]+)? *$"
_DECIMAL_RE = re.compile(DECIMAL_PATTERN)


def strict_int(value: Any) -> Any:
    """Accept 3 and "3" but not True, 1.5, "1.5", "abc" or "٣" (pydantic would take some)."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not a boolean")
    if isinstance(value, str):
        if not _WHOLE_RE.fullmatch(value):
            raise ValueError(f"must be a whole number written with the digits 0-9, got {value!r}")
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(value)
    return value


def whole_number(minimum: int, maximum: int | None = None) -> Any:
    """An int that may be written as the seed does ("1"); its schema says both forms,
    with JSON Schema's own `minimum`/`maximum` (pydantic would leak `ge`/`le` here)."""
    number: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        number["maximum"] = maximum
    text = {"type": "string", "pattern": POSITIVE_NUMBER_PATTERN if minimum >= 1 else WHOLE_NUMBER_PATTERN}
    return Annotated[
        int,
        BeforeValidator(strict_int),
        Field(ge=minimum, le=maximum),
        WithJsonSchema({"anyOf": [number, text]}),
    ]


def strict_number(value: Any) -> Any:
    """Accept 0.5, 3 and "0.5" (ASCII digits only), never a boolean."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str):
        if not _DECIMAL_RE.fullmatch(value):
            raise ValueError(f"must be a number written with the digits 0-9, got {value!r}")
        return int(value) if _WHOLE_RE.fullmatch(value) else float(value)
    return value


Number = Annotated[Union[int, float], BeforeValidator(strict_number),
                   WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "pattern": DECIMAL_PATTERN}]})]


FLAG_WORDS = {"true": True, "false": False}


def strict_flag(value: Any) -> Any:
    """Accept true/false and "true"/"false" (any case), never "yes", 1 or 0.0 (pydantic would take them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise ValueError(f"must be true or false, got {value!r}")


FLAG_PATTERN = "^ *([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]) *$"
Flag = Annotated[bool, BeforeValidator(strict_flag),
                 WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "string", "pattern": FLAG_PATTERN}]})]
