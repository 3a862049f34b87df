"""Lambda package figures: zip size, build time, and the handlers' cold import time
from the unpacked zip with only boto3 beside it (what a Lambda cold start pays).
The build time includes pip's install for the runtime on the first run only
(cached under build/lambda-site/ afterwards)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmp.infra import lambda_package  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        package = lambda_package.build(tmp / "mmp.zip")
        build_s = time.perf_counter() - started
        zipped = package.path.stat().st_size
        task = tmp / "task"
        zipfile.ZipFile(package.path).extractall(task)
        unpacked = sum(p.stat().st_size for p in task.rglob("*") if p.is_file())
        site = Path(__import__("boto3").__file__).parents[1]
        runtime = tmp / "runtime"
        runtime.mkdir()
        for name in ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six.py"):
            (runtime / name).symlink_to(site / name)
        figures = {}
        for label, module in (("webhook", "mmp.webhook"), ("stages", "mmp.pipeline.aws_stages"),
                              ("stages+sagemaker", "mmp.pipeline.aws_stages, mmp.backends.sagemaker")):
            code = (f"import sys, time; sys.path[:0] = [{str(task)!r}, {str(runtime)!r}]; t = time.perf_counter(); "
                    f"import {module}; print(time.perf_counter() - t)")
            runs = [float(subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True,
                                         check=True).stdout) for _ in range(5)]
            figures[label] = statistics.median(runs)
    print(f"lambda zip: {zipped / 1e6:.2f} MB zipped, {unpacked / 1e6:.2f} MB unpacked, "
          f"{len(package.modules)} mmp modules, built in {build_s:.2f} s")
    for label, seconds in figures.items():
        print(f"cold import {label}: {seconds * 1000:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
