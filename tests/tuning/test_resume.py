"""Which study `mmp run` resumes (no training: the decision is made before anything launches)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmp.tuning import control, resume

ROOT = Path(__file__).resolve().parents[2]


def mmp_run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmp", "run", "--repo", str(repo), *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_study_another_process_is_running_is_not_resumed_twice(mmp_home, make_repo, tmp_path):
    repo = make_repo()
    key = resume.resume_key(repo, head(repo), None)
    control.register("manual-live", "mmp-manual-live")
    resume.remember(key, "manual-live")  # this test's process stands for an `mmp run` still running it
    out = mmp_run(repo, "--resume")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"the study of commit {head(repo)[:7]} is running now (pid {os.getpid()})" in out.stderr


def test_the_key_is_the_commit_and_the_experiment_file_s_bytes(tmp_path):
    file = tmp_path / "experiment.json"
    file.write_text("{}")
    first = resume.resume_key(tmp_path, "a" * 40, file)
    assert first == resume.resume_key(tmp_path, "a" * 40, file)
    assert first != resume.resume_key(tmp_path, "b" * 40, file)
    assert resume.resume_key(tmp_path, "a" * 40, None) != first
    file.write_text('{"x": 1}')
    assert resume.resume_key(tmp_path, "a" * 40, file) != first  # another file: another study, never resumed


def test_resume_and_fresh_together_are_refused(mmp_home, make_repo):
    out = mmp_run(make_repo(), "--resume", "--fresh")
    assert out.returncode == 2 and "--resume and --fresh contradict each other" in out.stderr
