"""Run train.py as one Horovod rank, with the MLflow password fetched by the rank itself.

Why: horovodrun (gloo) starts every rank as `env K=V … python train.py` and, for other
hosts, as an `ssh host 'cd …; env K=V … python train.py'` that lives as long as the job:
any secret in horovodrun's environment is on a command line `ps` shows. So the
environment carries only the secret's ARN (MMP_MLFLOW_PASSWORD_SECRET_ARN), and each
rank reads the value from Secrets Manager with the job's own role (SageMaker execution
role, DLAMI instance profile) into its own environment, where MLflow's client finds
MLFLOW_TRACKING_PASSWORD. Then train.py runs in this process as `__main__`.

    horovodrun … python -m mmp.runtime.rank train.py --dataset-path …
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import MutableMapping, Sequence

LAUNCHER = ("-m", "mmp.runtime.rank")  # what mmp.contract.argv.horovodrun_argv puts between python and train.py
SECRET_ARN_VAR = "MMP_MLFLOW_PASSWORD_SECRET_ARN"
PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"


class CredentialsError(RuntimeError):
    """The MLflow password secret could not be read; names the ARN, never a value."""


def load_mlflow_password(environ: MutableMapping[str, str]) -> bool:
    """Put the MLflow password into `environ` from its secret; False when none is configured."""
    arn = environ.get(SECRET_ARN_VAR)
    if not arn or environ.get(PASSWORD_VAR):
        return False
    from mmp import aws

    try:
        environ[PASSWORD_VAR] = aws.secret(arn)
    except Exception as exc:  # the ARN is not secret; the value never reaches this message
        raise CredentialsError(f"could not read the MLflow password secret {arn}: {type(exc).__name__}") from None
    return True


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m mmp.runtime.rank train.py [arguments…]")
    try:
        load_mlflow_password(os.environ)
    except CredentialsError as exc:
        raise SystemExit(f"mmp: {exc}") from None
    script = os.path.abspath(args[0])
    sys.argv = [script, *args[1:]]
    sys.path[0] = os.path.dirname(script)  # as `python train.py` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
