"""docs/infra.md's table of the AWS calls each code path makes, per role: written from the
calls the IAM-enforced tests recorded (MMP_IAM_DOC=write), and checked on every run: a
recorded call missing from the table fails the session, so the table cannot go stale by
addition. A run of a few files cannot prove a call gone, so only a write removes rows:
write it from a run of the AWS folders (tests/infra tests/runner tests/sagemaker
tests/dlami tests/gitops); MMP_IAM_DOC=add only adds the rows a smaller run recorded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "infra.md"
BEGIN = "<!-- iam-calls: begin (generated: MMP_IAM_DOC=write pytest tests/infra tests/runner tests/sagemaker tests/dlami tests/gitops) -->"
END = "<!-- iam-calls: end -->"
_KEY = pytest.StashKey[set]()
WORKER_OUTPUT = "mmp_iam_calls"  # where an xdist worker hands its rows to the controller


def collect(config, calls) -> None:
    """Keep a test's granted calls for the session's end."""
    seen = config.stash.setdefault(_KEY, set())
    seen.update((c.role, c.code_path, c.action) for c in calls if c.allowed and not c.code_path.startswith("demo "))


def recorded(config) -> list[list[str]]:
    """This process's rows, as a worker sends them (plain lists: execnet carries only builtins)."""
    return [list(row) for row in sorted(config.stash.get(_KEY, set()))]


def merge(config, rows: list[list[str]]) -> None:
    """A worker's rows, added to the controller's."""
    config.stash.setdefault(_KEY, set()).update(tuple(row) for row in rows)


def render(rows: set[tuple[str, str, str]]) -> str:
    grouped: dict[tuple[str, str], set[str]] = {}
    for role, path, action in rows:
        grouped.setdefault((role, path), set()).add(action)
    lines = [BEGIN, "| role | code path | AWS calls it makes (IAM actions) |", "|---|---|---|"]
    lines += [f"| `{role}` | {path} | {', '.join(f'`{a}`' for a in sorted(actions))} |"
              for (role, path), actions in sorted(grouped.items())]
    return "\n".join([*lines, END])


def documented(text: str) -> set[tuple[str, str, str]]:
    block = text[text.find(BEGIN):text.find(END)] if BEGIN in text else ""
    rows = set()
    for line in block.splitlines():
        match = re.match(r"\| `([^`]+)` \| (.+?) \| (.+) \|$", line)
        if match:
            rows.update((match[1], match[2], a) for a in re.findall(r"`([^`]+)`", match[3]))
    return rows


def finish(config, *, write: bool, add: bool = False) -> str | None:
    """None when the doc is current; else what is missing from it."""
    rows = config.stash.get(_KEY, set())
    text = DOC.read_text()
    if add:
        rows = rows | documented(text)
    if (write or add) and rows:
        table = render(rows)
        text = (text[:text.find(BEGIN)] + table + text[text.find(END) + len(END):]) if BEGIN in text \
            else text.rstrip("\n") + "\n\n" + table + "\n"
        DOC.write_text(text)
        return None
    missing = rows - documented(text)
    if not missing:
        return None
    listed = "\n  ".join(f"{r} / {p}: {a}" for r, p, a in sorted(missing))
    return f"docs/infra.md's IAM call table is stale (MMP_IAM_DOC=write to regenerate); missing:\n  {listed}"
