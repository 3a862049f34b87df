"""Shared test fixtures: an isolated MMP_HOME per test, the real GitHub/SageMaker
fixtures from ../shared/fixtures, the digits dataset, and example git repositories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
EXAMPLE = ROOT / "examples" / "fashion"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "MMP Test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "MMP Test", "GIT_COMMITTER_EMAIL": "test@example.com",
}


@pytest.fixture(autouse=True)
def mmp_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own MMP_HOME, MLflow DB and git identity."""
    home = tmp_path / "mmp-home"
    home.mkdir()
    monkeypatch.setenv("MMP_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MMP_DATASETS",
                "MMP_WEBHOOK_SECRET", "GITHUB_TOKEN", "MMP_DEFAULT_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    return home


@pytest.fixture(scope="session")
def _digits_once(tmp_path_factory) -> Path:
    from mmp.datasets import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("datasets") / "digits")


@pytest.fixture
def digits(mmp_home, _digits_once) -> Path:
    """The digits dataset in IDX format, where the local backend looks for it."""
    target = mmp_home / "datasets" / "digits"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(_digits_once, target_is_directory=True)
    return target


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **GIT_ENV})
    return out.stdout.strip()


def commit_all(repo: Path, message: str = "change") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def make_repo(tmp_path):
    """Factory: a committed git repo made from examples/fashion, with overrides.

    make_repo(experiment={...}, files={"train.py": "..."}) -> Path
    """

    def _make(name: str = "fashion-demo", experiment: dict | None = None, files: dict | None = None,
              drop: tuple[str, ...] = ()) -> Path:
        repo = tmp_path / name
        shutil.copytree(EXAMPLE, repo)
        if experiment is not None:
            (repo / "experiment.json").write_text(json.dumps(experiment, indent=2))
        for rel, text in (files or {}).items():
            path = repo / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for rel in drop:
            (repo / rel).unlink()
        git(repo, "init", "-q", "-b", "main")
        commit_all(repo, "initial")
        return repo

    return _make


@pytest.fixture
def fixture_json():
    def _load(rel: str):
        return json.loads((FIXTURES / rel).read_text())

    return _load
