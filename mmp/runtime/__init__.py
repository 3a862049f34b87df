"""What runs inside a training host: the SageMaker entrypoint, each rank's wrapper and horovodrun's helpers."""
