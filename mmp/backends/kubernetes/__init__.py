"""Platform `kubernetes`: Horovod training on a cluster through Kubeflow Trainer (TrainJob + TrainingRuntime)."""

# The Kubeflow Trainer release every generated object is checked against (its CRDs are vendored in
# tests/fixtures) and the Helm chart version the Pulumi program installs: one pin for both.
TRAINER_VERSION = "2.4.0"
