"""Cold import time of the module holding lambda_handler, next to `import boto3`, in fresh interpreters.

Target: the Lambda module at most 0.15 s above boto3. Run: .venv/bin/python bench/webhook_import.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 9
CASES = {
    "import boto3": "import boto3",
    "import mmp.webhook.aws_lambda": "import mmp.webhook.aws_lambda",
    "import boto3 + mmp.webhook.aws_lambda": "import boto3, mmp.webhook.aws_lambda",
    "handler module + boto3 clients made": ("import mmp.webhook.aws_lambda; from mmp import aws; "
                                           "aws.client('dynamodb'); aws.client('stepfunctions')"),
}


def cold(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "AWS_DEFAULT_REGION": "eu-west-1"})
    return float(out.stdout.strip().splitlines()[-1])


def added_by_importtime() -> float:
    """What importing the handler module costs after boto3, from `python -X importtime` (load-robust)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import boto3; import mmp.webhook.aws_lambda"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}).stderr
    after_boto3 = out.split("| boto3\n", 1)[1]
    total = 0
    for line in after_boto3.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  "):  # top-level imports only (cumulative column)
            total += int(parts[1])
    return total / 1e6


def main() -> None:
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for statement in CASES.values():
        cold(statement)  # warm the OS file cache so we measure Python, not the disk
    for _ in range(REPEATS):  # interleaved, so a busy moment hits every case alike
        for name, statement in CASES.items():
            samples[name].append(cold(statement))
    for name, values in samples.items():
        print(f"{name:<42} median {statistics.median(values) * 1000:7.1f} ms   min {min(values) * 1000:7.1f} ms"
              f"   ({REPEATS} fresh interpreters)")
    both, boto = samples["import boto3 + mmp.webhook.aws_lambda"], samples["import boto3"]
    above = statistics.median(both) - statistics.median(boto)
    above_min = min(both) - min(boto)
    print(f"{'lambda module above boto3':<42} median {above * 1000:7.1f} ms   min {above_min * 1000:7.1f} ms"
          f"   (target <= 150 ms: {'met' if above <= 0.15 else 'MISSED'})")
    added = statistics.median(added_by_importtime() for _ in range(REPEATS))
    print(f"{'lambda module after boto3 (-X importtime)':<42} median {added * 1000:7.1f} ms"
          f"   (target <= 150 ms: {'met' if added <= 0.15 else 'MISSED'})")


if __name__ == "__main__":
    main()
