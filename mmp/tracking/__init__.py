"""MLflow tracking: the run client, its REST and SigV4 transports, run ownership, the local store and the shared server."""
