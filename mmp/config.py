"""Where MMP keeps state and which defaults it uses, read from the environment.

Plain stdlib on purpose: this module is imported by the Lambda handler, so it must
not pull in anything heavy. Every knob is an `MMP_*` environment variable.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PLATFORMS = ("sagemaker", "sagemaker-fsx", "dlami", "local")
# The seed names both; the first one wins when a repository has both.
EXPERIMENT_FILES = ("experiment.json", "experiment_config.json")
DEFAULT_MAX_RUNTIME_MINUTES = 240
MAX_RUNTIME_CAP_MINUTES = 5 * 24 * 60  # SageMaker allows 28 days; five is a sane ceiling


def home_path() -> Path:
    """Where the local stack's state lives, without creating it."""
    return Path(os.environ.get("MMP_HOME") or Path.home() / ".mmp").expanduser()


def mmp_home() -> Path:
    """The local stack's state folder (MLflow DB, queue, runs, datasets, secret)."""
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_platform() -> str:
    """The platform an experiment file gets when it names none (AWS default: sagemaker)."""
    return os.environ.get("MMP_DEFAULT_PLATFORM", "sagemaker")


def max_runtime_cap() -> int:
    return int(os.environ.get("MMP_MAX_RUNTIME_CAP", MAX_RUNTIME_CAP_MINUTES))


def default_max_runtime() -> int:
    return int(os.environ.get("MMP_DEFAULT_MAX_RUNTIME", DEFAULT_MAX_RUNTIME_MINUTES))


def tracking_uri() -> str:
    """MLflow tracking URI: `MLFLOW_TRACKING_URI`, else SQLite under MMP_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mmp_home() / 'mlflow.db'}"


def artifact_root() -> str:
    return os.environ.get("MMP_ARTIFACT_ROOT") or (mmp_home() / "artifacts").as_uri()


def runs_root() -> Path:
    return Path(os.environ.get("MMP_RUNS_ROOT") or mmp_home() / "runs")


def datasets_root() -> Path:
    return Path(os.environ.get("MMP_DATASETS_ROOT") or mmp_home() / "datasets")


# Never inherited by training processes (train.py is user code that logs freely).
SECRET_ENV_VARS = ("GITHUB_TOKEN", "MMP_WEBHOOK_SECRET", "MMP_GITHUB_TOKEN", "GITLAB_TOKEN", "MMP_GITLAB_WEBHOOK_SECRET")


def training_environ() -> dict[str, str]:
    """This process's environment minus MMP's secrets, for launching training."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENV_VARS}


def local_stack_file() -> Path:
    """Written by `mmp up` while it runs: the URLs of its webhook and MLflow server."""
    return home_path() / "stack.json"


def running_stack() -> dict | None:
    """What a running `mmp up` published in `$MMP_HOME/stack.json`; None when none runs (its pid
    and start time must still match, so a dead stack's file or a reused pid does not count).
    Here, not with the pipeline: the post-commit hook asks on every commit and must stay light."""
    import json

    from mmp.local.procs import find_process

    try:
        stack = json.loads(local_stack_file().read_text())
        alive = find_process(int(stack["pid"]), float(stack["started"])) is not None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stack if alive else None


# git hosts whose webhooks the local stack takes on their own path (/webhook/<host>), each with its own secret
WEBHOOK_HOSTS: tuple[str, ...] = ("gitlab",)


def webhook_secret(host: str = "github") -> str:
    """GitHub's: `MMP_WEBHOOK_SECRET`, else a random secret made on first use under MMP_HOME
    (`webhook-secret`). Another host's: `MMP_<HOST>_WEBHOOK_SECRET`, else `<host>-webhook-secret`."""
    env = "MMP_WEBHOOK_SECRET" if host == "github" else f"MMP_{host.upper()}_WEBHOOK_SECRET"
    if os.environ.get(env):
        return os.environ[env]
    path = mmp_home() / ("webhook-secret" if host == "github" else f"{host}-webhook-secret")
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def host_webhook_secrets() -> dict[str, str]:
    """Each WEBHOOK_HOSTS host's local webhook secret (made on first use)."""
    return {host: webhook_secret(host) for host in WEBHOOK_HOSTS}
