"""What MMP knows about horovodrun beyond its command line: where it is installed,
and how to tell which rank failed and why. horovodrun exits 1 whichever rank failed
and ends with its own `RuntimeError('Horovod detected …')` traceback, which says
nothing; the cause is in the failing rank's own prefixed lines (`[1]<stderr>:…`).
Stdlib only: the entrypoint, the local and the DLAMI backends all use it.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Iterable

# GitHub caps a commit status description at 140 characters; the pipeline prefixes the
# summary with the state ("failed: "), so the summary itself keeps to this.
SUMMARY_LIMIT = 125

# `[1]<stderr>:text` (gloo) or `[1,0]<stderr>:text` (mpirun: job, rank)
_RANK_LINE = re.compile(r"^\[(\d+)(?:,(\d+))?\]<(?:stdout|stderr)>:(.*)$")
# horovodrun's own words for the rank that failed first
_FAILED_PROCESS = (re.compile(r"Process (\d+) exit with status code (-?\d+)"),
                   re.compile(r"Process name: (\d+)"))
_ARGPARSE_ERROR = re.compile(r"^\S+: error: ")  # `train.py: error: unrecognized arguments: true`
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)?(: |$)")
_NAMED_ERROR = re.compile(r"\b\w*(Error|Exception)\b")


def find_horovodrun() -> str | None:
    """horovodrun beside this Python (a venv), else on PATH."""
    beside = Path(sys.executable).with_name("horovodrun")
    return str(beside) if beside.exists() else shutil.which("horovodrun")


def split_ranks(lines: Iterable[str]) -> tuple[dict[int, list[str]], list[str]]:
    """({rank: its own lines, prefix removed}, horovodrun's own unprefixed lines)."""
    ranks: dict[int, list[str]] = {}
    own: list[str] = []
    for line in lines:
        match = _RANK_LINE.match(line.rstrip("\n"))
        if match:
            rank = int(match.group(2) if match.group(2) is not None else match.group(1))
            ranks.setdefault(rank, []).append(match.group(3))
        else:
            own.append(line.rstrip("\n"))
    return ranks, own


def last_error_line(lines: list[str]) -> str | None:
    """The line that says why: argparse's `error:` line, a traceback's exception line, or
    the last line naming an Error, whichever comes last."""
    found: tuple[int, str] | None = None
    in_traceback = False
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
            continue
        if in_traceback:
            if line and not line[0].isspace():
                in_traceback = False
                if _EXCEPTION_LINE.match(line):
                    found = (i, line.strip())
            continue
        if _ARGPARSE_ERROR.match(line) or (_NAMED_ERROR.search(line) and ":" in line):
            found = (i, line.strip())
    return found[1] if found else None


def _failed_rank(own: list[str], ranks: dict[int, list[str]]) -> int | None:
    for line in own:
        for pattern in _FAILED_PROCESS:
            match = pattern.search(line)
            if match and (pattern.groups < 2 or match.group(2) != "0") and int(match.group(1)) in ranks:
                return int(match.group(1))
    with_errors = [r for r, text in sorted(ranks.items()) if last_error_line(text)]
    return with_errors[0] if with_errors else None


def failure_summary(lines: Iterable[str], code: int) -> str:
    """`horovodrun exited N: rank R: <its last error line>`, at most SUMMARY_LIMIT characters.

    Without rank output (horovodrun itself refused to start), its own last error line.
    """
    ranks, own = split_ranks(lines)
    head = f"horovodrun exited {code}"
    rank = _failed_rank(own, ranks)
    if rank is not None:
        detail = last_error_line(ranks[rank]) or next((t.strip() for t in reversed(ranks[rank]) if t.strip()), "")
        head += f": rank {rank}"
    else:
        detail = last_error_line(own) or next((t.strip() for t in reversed(own) if t.strip()), "")
    text = " ".join(f"{head}: {detail}".split()) if detail else head
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"
