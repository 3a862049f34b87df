"""Image builds for successive experiment.json-only commits, and what Prepare costs here.

Five commits of one repository that change only experiment.json go through Prepare's
image step (mmp.pipeline.image_stage.plan_image) against moto (S3, ECR; in-process),
with CodeBuild's outcome stood in by pushing the tag to ECR when a build is asked for.
The same commits under the previous design (one image per commit sha) are counted for
comparison. Also timed: the key computation and the whole Prepare image step (tarball
upload, ECR lookup) and the CreateTrainingJob request building, all local.

Run: .venv/bin/python bench/image_builds.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMITS = 5


def main() -> None:
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "eu-west-1"})
    os.environ.pop("AWS_ENDPOINT_URL", None)
    from moto import mock_aws

    from mmp import aws
    from mmp.contract.image import context_digest, image_tag, requirements_text
    from mmp.pipeline.image_stage import plan_image
    from tests.sagemaker.test_image_stage import ECR_NAME, push_image, tarball_of  # the tests' stand-ins

    example = ROOT / "examples" / "fashion"
    files = {name: (example / name).read_text() for name in ("requirements.txt", "train.py", "experiment.json")}
    context = context_digest(ROOT)
    with mock_aws():
        s3, ecr = aws.client("s3"), aws.client("ecr")
        s3.create_bucket(Bucket="acme-artifacts", CreateBucketConfiguration={"LocationConstraint": s3.meta.region_name})
        uri = ecr.create_repository(repositoryName=ECR_NAME)["repository"]["repositoryUri"]
        builds, per_commit_tags, prepare_ms = [], set(), []
        for number in range(COMMITS):
            commit = f"{number + 1:x}" * 40
            experiment = json.loads(files["experiment.json"])
            experiment["Hyperparameters"] = f"{{'epochs': '{number + 1}'}}"
            files["experiment.json"] = json.dumps(experiment)
            started = time.perf_counter()
            plan = plan_image(read=lambda name: files[name].encode() if name in files else None,
                              tarball=lambda: tarball_of(files), repository="acme/fashion", commit=commit,
                              bucket="acme-artifacts", ecr_repository_uri=uri, context=context)
            prepare_ms.append((time.perf_counter() - started) * 1000)
            builds.append(plan.build)
            if plan.build:  # CodeBuild pushes the tag
                push_image(ecr, plan.tag)
            per_commit_tags.add(commit)  # the previous design: tag = commit sha, built when new

    key_runs = []
    for _ in range(200):
        started = time.perf_counter()
        image_tag(requirements_text(lambda name: files[name].encode() if name in files else None), context)
        key_runs.append((time.perf_counter() - started) * 1e6)
    started = time.perf_counter()
    context_digest(ROOT)
    digest_ms = (time.perf_counter() - started) * 1000

    print(f"experiment.json-only commits: {COMMITS}")
    print(f"  builds, image per dependency set: {sum(builds)}  ({' '.join('B' if b else '-' for b in builds)})")
    print(f"  builds, image per commit (before): {len(per_commit_tags)}")
    print(f"Prepare image step (tarball upload + ECR lookup, moto in-process): "
          f"median {statistics.median(prepare_ms):.1f} ms, max {max(prepare_ms):.1f} ms")
    print(f"image key from the dependency files: median {statistics.median(key_runs):.1f} µs")
    print(f"build-context digest (deploy time, {len(list((ROOT / 'mmp').rglob('*.py')))} mmp modules): "
          f"{digest_ms:.1f} ms")


if __name__ == "__main__":
    main()
