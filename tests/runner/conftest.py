"""The runner task's tests use the DLAMI fixtures (real sshd, moto EC2) and the pipeline's
surroundings (real MLflow, GitHub's API, moto) that the stage tests use."""

from ..dlami.conftest import cloud, fsx_datasets, make_backend, sshd  # noqa: F401
from ..infra.pipeline_stack import stack, stages_mlflow  # noqa: F401
