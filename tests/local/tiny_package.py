"""A tiny real package for dependency tests and bench/local_env.py: built offline with
pip from a folder (setuptools from the base environment, no index)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NAME = "mmp-tiny-dep"
VALUE = "tiny-42"


def build_tiny_wheel(dest: Path, version: str = "1.0") -> Path:
    """dest/mmp_tiny_dep-<version>-py3-none-any.whl, importable as `mmp_tiny_dep` (VALUE)."""
    source = dest / f"src-{version}"
    (source / "mmp_tiny_dep").mkdir(parents=True)
    (source / "mmp_tiny_dep" / "__init__.py").write_text(f"VALUE = {VALUE!r}\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{NAME}"\nversion = "{version}"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(dest),
                    str(source)], check=True, env={**os.environ, "PIP_NO_INDEX": "1"}, capture_output=True)
    return dest / f"mmp_tiny_dep-{version}-py3-none-any.whl"
