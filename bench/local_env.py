"""Local dependency environments: what a repository's requirements.txt costs a run.

Measures, with the local backend's own code (mmp.backends.local_env):
- the first run: a venv layered over this one, with a small requirements file installed
  (a tiny package built here, offline: no PyPI, so the figure is the mechanism's cost);
- a second run with the same files (goal: zero, the environment is reused);
- a repository without dependency files, or whose files ask only for what the base
  already has (goal: zero, no environment at all).

    .venv/bin/python bench/local_env.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "local")]

from mmp.backends.local_env import training_python  # noqa: E402
from tiny_package import build_tiny_wheel  # noqa: E402


def timed(code: Path, envs: Path) -> tuple[float, bool]:
    started = time.perf_counter()
    picked = training_python(code, sys.executable, envs, lambda line: None)
    return time.perf_counter() - started, picked.built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["PIP_NO_INDEX"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = build_tiny_wheel(tmp / "wheels")
        firsts, seconds, bare, met = [], [], [], []
        for n in range(args.rounds):
            code = tmp / f"code{n}"
            (code / "wheels").mkdir(parents=True)
            shutil.copy(wheel, code / "wheels" / wheel.name)
            (code / "requirements.txt").write_text(f"./wheels/{wheel.name}\n# round {n}\n")  # a new hash each round
            envs = tmp / "envs"
            first, built = timed(code, envs)
            assert built
            again, built = timed(code, envs)
            assert not built
            firsts.append(first)
            seconds.append(again)
            plain = tmp / f"plain{n}"
            plain.mkdir()
            bare.append(timed(plain, envs)[0])
            (plain / "requirements.txt").write_text("numpy\nmlflow>=3.1,<4\n")  # the example's: all in the base
            met.append(timed(plain, envs)[0])
    print(f"first run, small requirements.txt (venv + pip, offline): median {statistics.median(firsts):.2f} s "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f})")
    print(f"second run, same files: median {statistics.median(seconds) * 1000:.2f} ms")
    print(f"no dependency files: median {statistics.median(bare) * 1000:.3f} ms")
    print(f"requirements already met by the base: median {statistics.median(met) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
