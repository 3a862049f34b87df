"""What MMP knows about horovodrun beyond its command line: where it is installed,
and how to tell which rank failed (it exits 1 whichever rank did, so the rank's own
prefixed output lines are what say why). Stdlib only: the entrypoint, the local
and the DLAMI backends all use it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Iterable


def find_horovodrun() -> str | None:
    """horovodrun beside this Python (a venv), else on PATH."""
    beside = Path(sys.executable).with_name("horovodrun")
    return str(beside) if beside.exists() else shutil.which("horovodrun")


def failure_summary(lines: Iterable[str], code: int) -> str:
    """`horovodrun exited N: <the last line that names the failure>`."""
    lines = list(lines)
    picked = [ln.strip() for ln in lines
              if "exit with status code" in ln or "Traceback" in ln or "Error" in ln.split(":", 1)[-1][:60]]
    detail = picked[-1] if picked else (lines[-1].strip() if lines else "")
    return f"horovodrun exited {code}" + (f": {detail[:300]}" if detail else "")
