"""`mmp run` on platform sagemaker takes Prepare's image step (moto, server mode): the job
runs the dependency set's `:deps-…` image with the local commit's `git archive` as its
`mmp-code` channel; without that image in ECR nothing starts and no MLflow run is made."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from ..conftest import create_bucket

from mmp import aws
from mmp.hosts import localgit as gitutil
from mmp.contract.image import code_key, image_tag, requirements_text
from mmp.pipeline.runs import local_trigger, run_trigger

CONTEXT = "d" * 64


@pytest.fixture
def stack(aws_env, stack_env, sm, sm_dataset):
    """The stack's bucket and ECR repository in moto, and the settings `backendEnv` gives a workstation."""
    stack_env.setenv("MMP_IMAGE_CONTEXT_DIGEST", CONTEXT)
    stack_env.setenv("MMP_SAGEMAKER_POLL_SECONDS", "0")
    create_bucket(aws.client("s3"), sm.BUCKET)
    aws.client("ecr").create_repository(repositoryName=sm.ECR.rsplit("/", 1)[-1])
    return stack_env


def dependency_tag(repo, sha: str) -> str:
    return image_tag(requirements_text(lambda name: gitutil.read_file(repo, sha, name)), CONTEXT)


def push_image(repository_uri: str, tag: str) -> None:
    """What the stack's CodeBuild leaves in ECR once it built the dependency set."""
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                           "digest": "sha256:" + "0" * 64}, "layers": []}
    aws.client("ecr").put_image(repositoryName=repository_uri.rsplit("/", 1)[-1], imageManifest=json.dumps(manifest),
                                imageTag=tag)


def tracked_runs() -> list:
    from mlflow.tracking import MlflowClient

    from mmp import config

    client = MlflowClient(config.tracking_uri())
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def test_mmp_run_launches_the_dependency_image_with_the_commits_archive(stack, sm_repo, sm):
    repo = sm_repo(Instance_Count="1")
    sha = gitutil.resolve(repo)
    committed_train = (repo / "train.py").read_bytes()
    (repo / "train.py").write_text("print('an edit nobody committed')\n")  # the working tree must not travel
    (repo / "notes.txt").write_text("never committed\n")
    tag = dependency_tag(repo, sha)
    push_image(sm.ECR, tag)

    outcome = run_trigger(local_trigger(repo, sha))

    assert outcome.state == "SUCCEEDED", outcome.message  # moto's jobs are always Completed
    sagemaker = aws.client("sagemaker")
    [summary] = sagemaker.list_training_jobs()["TrainingJobSummaries"]
    job = sagemaker.describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}:{tag}"
    assert tag.startswith("deps-")
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    key = code_key("local/fashion-demo", sha)
    assert channels["mmp-code"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{sm.BUCKET}/{key}"
    assert channels["mmp-code"]["InputMode"] == "File"
    archive = aws.client("s3").get_object(Bucket=sm.BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = set(tar.getnames())
        assert {"train.py", "experiment.json", "requirements.txt"} <= names
        assert "notes.txt" not in names
        assert tar.extractfile("train.py").read() == committed_train


def test_mmp_run_without_the_image_is_refused_before_anything_starts(stack, sm_repo, sm):
    repo = sm_repo()
    sha = gitutil.resolve(repo)

    outcome = run_trigger(local_trigger(repo, sha))

    assert outcome.state == "ERROR"
    assert f"{sm.ECR}:{dependency_tag(repo, sha)}" in outcome.message
    assert "has not been built yet" in outcome.message and "push the commit" in outcome.message
    assert outcome.run_id is None
    assert aws.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []
    assert tracked_runs() == []


def test_mmp_run_without_the_context_digest_names_the_setting(stack, sm_repo):
    stack.delenv("MMP_IMAGE_CONTEXT_DIGEST")
    repo = sm_repo()

    outcome = run_trigger(local_trigger(repo, gitutil.resolve(repo)))

    assert outcome.state == "INVALID"
    assert "MMP_IMAGE_CONTEXT_DIGEST is not set" in outcome.message
    assert aws.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []
    assert tracked_runs() == []


def test_the_local_worker_takes_the_same_image_step(stack, sm_repo, sm):
    from mmp.pipeline.queue import JobQueue
    from mmp.pipeline.worker import Worker
    from mmp.pipeline.job import Job

    repo = sm_repo()
    sha = gitutil.resolve(repo)
    tag = dependency_tag(repo, sha)
    push_image(sm.ECR, tag)
    queue = JobQueue()
    try:
        queue.submit(Job(repository="acme/fashion-demo", clone_url=str(repo), before="0" * 40, after=sha,
                         ref="refs/heads/main", delivery_id="delivery-sm", trigger_files=["experiment.json"]), "b")
        assert Worker(queue).run_once()
        assert queue.get("delivery-sm").state == "done", queue.get("delivery-sm").message
    finally:
        queue.close()
    sagemaker = aws.client("sagemaker")
    [summary] = sagemaker.list_training_jobs()["TrainingJobSummaries"]
    job = sagemaker.describe_training_job(TrainingJobName=summary["TrainingJobName"])
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}:{tag}"
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert channels["mmp-code"]["DataSource"]["S3DataSource"]["S3Uri"] == \
        f"s3://{sm.BUCKET}/{code_key('acme/fashion-demo', sha)}"


def test_a_studys_trials_run_the_staged_image_too(stack, sm_repo, sm):
    tuning = {"Objective_Metric": "val_accuracy", "Direction": "maximize", "Strategy": "random", "Max_Runs": 2,
              "Parallel": 1, "Ranges": {"batch-size": {"Values": [16, 32]}}}
    repo = sm_repo(Instance_Count="1", Tuning=tuning)
    sha = gitutil.resolve(repo)
    tag = dependency_tag(repo, sha)
    push_image(sm.ECR, tag)

    run_trigger(local_trigger(repo, sha))  # moto's jobs log no metric: the study's own outcome does not matter

    sagemaker = aws.client("sagemaker")
    names = [s["TrainingJobName"] for s in sagemaker.list_training_jobs()["TrainingJobSummaries"]]
    assert len(names) == 2
    for name in names:
        job = sagemaker.describe_training_job(TrainingJobName=name)
        assert job["AlgorithmSpecification"]["TrainingImage"] == f"{sm.ECR}:{tag}"
        assert "mmp-code" in {c["ChannelName"] for c in job["InputDataConfig"]}


def test_a_github_trigger_stages_githubs_tarball_of_the_commit(httpserver, monkeypatch, make_repo):
    """The local worker's GitHub deliveries have no local clone: the archive is GitHub's tarball."""
    from mmp.pipeline.image_stage import commit_archive
    from mmp.pipeline.sources import Trigger

    repo = make_repo()
    sha = gitutil.resolve(repo)
    archive = gitutil.git(repo, "archive", "--format=tar.gz", f"--prefix=acme-fashion-demo-{sha[:7]}/", sha)
    httpserver.expect_request(f"/repos/acme/fashion-demo/tarball/{sha}").respond_with_data(archive)
    monkeypatch.setenv("MMP_GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_test")
    trigger = Trigger(repository="acme/fashion-demo", clone_url="https://github.com/acme/fashion-demo.git",
                      commit=sha, source=None)

    assert commit_archive(trigger) == archive
