"""What the SageMaker launch path costs in Lambda: cold import, request building, and
CreateTrainingJob + DescribeTrainingJob round trips against moto (server mode, local).

Run: .venv/bin/python bench/sagemaker_launch.py
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cold_import_ms(module: str, runs: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout) for _ in range(runs)]
    return statistics.median(times)


def main() -> None:
    print(f"cold import mmp.backends.sagemaker: {cold_import_ms('mmp.backends.sagemaker'):.0f} ms (median of 5)")
    print(f"cold import boto3 (for scale):      {cold_import_ms('boto3'):.0f} ms")
    print(f"cold import mmp.runtime.sagemaker_entrypoint: {cold_import_ms('mmp.runtime.sagemaker_entrypoint'):.0f} ms")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    home = tempfile.mkdtemp()
    os.environ.update({
        "MMP_HOME": home, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "eu-west-1",
        "MMP_ECR_REPOSITORY_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mmp",
        "MMP_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/sm", "MMP_ARTIFACTS_BUCKET": "b",
    })
    try:
        from mmp.backends.base import LaunchRequest
        from mmp.backends.sagemaker import SageMakerBackend
        from mmp.contract.datasets import Dataset
        from mmp.contract.experiment import parse_experiment

        experiment = parse_experiment({"Platform": "sagemaker", "Dataset_Name": "fashion",
                                       "Training_Instance": "ml.p3.16xlarge", "Instance_Count": "4",
                                       "Hyperparameters": "{'epochs': '40', 'batch-size': '32'}"})
        dataset = Dataset(name="fashion", s3="s3://data/fashion/")
        backend = SageMakerBackend(poll_seconds=0)

        def request(i: int) -> LaunchRequest:
            return LaunchRequest(experiment=experiment, experiment_name="bench", run_id=f"run{i}", repository="a/b",
                                 clone_url="https://github.com/a/b", commit=f"{i:040x}", dataset=dataset,
                                 mlflow_env={"MLFLOW_TRACKING_URI": "https://mlflow.example.com",
                                             "MLFLOW_EXPERIMENT_NAME": "bench", "MLFLOW_RUN_ID": f"run{i}"})

        n = 2000
        started = time.perf_counter()
        for i in range(n):
            backend.check(experiment, dataset)
            backend.training_job_request(request(i))
        print(f"check + build request: {(time.perf_counter() - started) / n * 1e6:.0f} µs each ({n} runs)")

        backend.launch(request(0))  # warm the client
        launches, describes = [], []
        for i in range(1, 31):
            t = time.perf_counter()
            handle = backend.launch(request(i))
            launches.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            backend.status(handle)
            describes.append((time.perf_counter() - t) * 1000)
        print(f"launch (CreateTrainingJob) vs moto: median {statistics.median(launches):.1f} ms, "
              f"max {max(launches):.1f} ms (30 runs)")
        print(f"status (DescribeTrainingJob) vs moto: median {statistics.median(describes):.1f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
