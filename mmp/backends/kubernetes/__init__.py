"""Platform `kubernetes`: Horovod training on a cluster through Kubeflow Trainer (TrainJob + TrainingRuntime)."""

# The Kubeflow Trainer release every generated object is checked against (its CRDs are vendored in
# tests/fixtures) and the Helm chart version the Pulumi program installs: one pin for both.
TRAINER_VERSION = "2.3.0"
# 2.3.0, not 2.4.0: v2.3.0 (tag commit 658725bd) is the newest release in the upstream repository and on
# PyPI (kubeflow-trainer-api) at the time of writing; no v2.4.0 tag could be found to vendor or check against.
