"""The name rules that the experiment model, its Tuning block and the dataset catalogue share.

Kept below all three so that none imports another for a validator.
"""

from __future__ import annotations

import re

from mmp.contract.argv import contract_flag_clash, horovodrun_ambiguity

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_RE = re.compile(NAME_PATTERN)
MAX_HYPERPARAMETER_NAME = 128


def is_safe_name(value: str) -> bool:
    """A name that is also a safe path segment (datasets, experiments): the pattern and no `..`."""
    return bool(NAME_RE.fullmatch(value)) and ".." not in value


def hyperparameter_name(name: str) -> str:
    """A hyperparameter's name, as train.py's `--name`: safe, and neither a prefix of an option the
    pipeline sets nor an ambiguous abbreviation to horovodrun."""
    if not NAME_RE.fullmatch(name) or len(name) > MAX_HYPERPARAMETER_NAME:
        raise ValueError(f"bad name {name!r}; names match {NAME_PATTERN} (no spaces, no leading '-')")
    flags = contract_flag_clash(f"--{name}")
    if flags:
        raise ValueError(
            f"'--{name}' is a prefix of {' and '.join(flags)}, which the pipeline sets (argparse takes a prefix "
            "of an option for that option); use another name"
        )
    clash = horovodrun_ambiguity(f"--{name}")
    if clash:
        raise ValueError(
            f"'--{name}' is an ambiguous abbreviation to horovodrun (could be {', '.join(clash[:3])}, …); "
            "use a longer name"
        )
    return name
