"""Prepare's image step against moto (server mode): the code archive per commit, one build
per dependency set; the archive is GitHub's tarball of the commit, fetched over HTTP."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from ..conftest import ACCOUNT, REGION, create_bucket

from mmp import aws
from mmp.hosts.github import GitHubClient, GitHubError
from mmp.contract.image import ImageError, code_key, requirements_key
from mmp.pipeline.image_stage import plan_image

REPO = "octo-org/fashion-demo"
ECR_NAME = "acme-training"
CONTEXT = "c" * 64


@pytest.fixture
def stack(aws_env, iam_enforced):
    s3, ecr = aws.client("s3"), aws.client("ecr")
    create_bucket(s3, "acme-artifacts")
    uri = ecr.create_repository(repositoryName=ECR_NAME)["repository"]["repositoryUri"]
    iam_enforced.bind({"arn:aws:s3:::acme-artifacts": "arn:aws:s3:::ARTIFACTS",  # the stack's (tests/iam_enforce)
                       f"repository/{ECR_NAME}": "repository/TRAINING_IMAGES",
                       f"arn:aws:sns:{REGION}:{ACCOUNT}:mmp-notify": f"arn:aws:sns:{REGION}:{ACCOUNT}:NOTIFY_TOPIC"})
    return s3, ecr, uri


def tarball_of(files: dict[str, str], top: str = "octo-org-fashion-demo-abc1234") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def push_image(ecr, tag: str) -> None:
    """What CodeBuild's `docker buildx build` push leaves in ECR."""
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                           "digest": "sha256:" + "0" * 64}, "layers": []}
    ecr.put_image(repositoryName=ECR_NAME, imageManifest=json.dumps(manifest), imageTag=tag)


def test_five_experiment_json_commits_build_once(stack):
    s3, ecr, uri = stack
    files = {"requirements.txt": "mlflow>=3.1,<4\nnumpy\n", "train.py": "print('v1')\n"}
    builds, tarballs = [], []
    for number in range(5):
        commit = f"{number:x}" * 40
        files["experiment.json"] = json.dumps({"Hyperparameters": f"{{'epochs': '{number + 1}'}}"})

        def tarball(files=dict(files)):
            tarballs.append(1)
            return tarball_of(files)

        plan = plan_image(read=lambda name: files[name].encode() if name in files else None, tarball=tarball,
                          repository=REPO, commit=commit, bucket="acme-artifacts", ecr_repository_uri=uri,
                          context=CONTEXT, clients=aws.client)
        builds.append(plan.build)
        if plan.build:  # the state machine's BuildImage state; CodeBuild pushes the tag
            body = s3.get_object(Bucket="acme-artifacts", Key=requirements_key(plan.tag))["Body"].read()
            assert body == files["requirements.txt"].encode()
            push_image(ecr, plan.tag)
        assert plan.code_uri == f"s3://acme-artifacts/{code_key(REPO, commit)}"
        archive = s3.get_object(Bucket="acme-artifacts", Key=code_key(REPO, commit))["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            assert json.loads(tar.extractfile(f"octo-org-fashion-demo-abc1234/experiment.json").read()) == \
                json.loads(files["experiment.json"])
    assert builds == [True, False, False, False, False]
    assert len(tarballs) == 5  # one archive per commit


def test_the_same_commit_is_not_uploaded_twice_and_a_new_dependency_builds(stack):
    s3, ecr, uri = stack
    files = {"requirements.txt": "numpy\n"}
    calls = []
    kwargs = dict(read=lambda name: files[name].encode() if name in files else None, repository=REPO,
                  commit="b" * 40, bucket="acme-artifacts", ecr_repository_uri=uri, context=CONTEXT)
    first = plan_image(tarball=lambda: calls.append(1) or tarball_of({"train.py": ""}), **kwargs)
    push_image(ecr, first.tag)
    again = plan_image(tarball=lambda: calls.append(1) or tarball_of({"train.py": ""}), **kwargs)
    assert (first.build, again.build, len(calls)) == (True, False, 1)
    files["requirements.txt"] = "numpy\nscipy\n"
    changed = plan_image(tarball=lambda: tarball_of({}), **kwargs)
    assert changed.build and changed.tag != first.tag


def test_a_pinned_image_uri_never_builds(stack):
    _, _, uri = stack
    plan = plan_image(read=lambda name: None, tarball=lambda: tarball_of({}), repository=REPO, commit="c" * 40,
                      bucket="acme-artifacts", ecr_repository_uri=f"{uri}:team-base", context=CONTEXT)
    assert plan.build is False


def test_unusable_dependency_files_stop_before_any_upload(stack):
    s3, _, uri = stack
    with pytest.raises(ImageError, match="setup.py without requirements.txt"):
        plan_image(read=lambda name: b"setup()" if name == "setup.py" else None, tarball=lambda: b"",
                   repository=REPO, commit="d" * 40, bucket="acme-artifacts", ecr_repository_uri=uri,
                   context=CONTEXT)
    assert s3.list_objects_v2(Bucket="acme-artifacts").get("KeyCount") == 0


def test_the_github_tarball_is_the_commits_tree(httpserver, make_repo):
    """GitHub answers /tarball/<sha> with a redirect to codeload; the client follows it with the token
    header and returns the gzip bytes, which are `git archive` of the commit."""
    repo = make_repo(experiment={"Platform": "sagemaker"})
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar.gz",
                              f"--prefix=octo-org-fashion-demo-{sha[:7]}/", sha], capture_output=True,
                             check=True).stdout
    (repo / "uncommitted.txt").write_text("working tree only")
    httpserver.expect_request(f"/repos/{REPO}/tarball/{sha}").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for(f"/codeload/{sha}")})
    httpserver.expect_request(f"/codeload/{sha}").respond_with_data(archive, content_type="application/x-gzip")
    client = GitHubClient(token="ghp_x", base_url=httpserver.url_for("").rstrip("/"), retries=0)
    data = client.tarball(REPO, sha)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert f"octo-org-fashion-demo-{sha[:7]}/train.py" in names
    assert not any(name.endswith("uncommitted.txt") for name in names)

    httpserver.expect_request(f"/repos/{REPO}/tarball/{'0' * 40}").respond_with_data("<html>", status=200)
    with pytest.raises(GitHubError, match="not a gzip archive"):
        client.tarball(REPO, "0" * 40)


# -- through the stage handlers: Prepare decides, Launch sends the staged request -----------------
@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    from ..conftest import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def serve_commit(httpserver, repo, sha: str) -> None:
    import base64

    for name in ("experiment.json", "train.py", "requirements.txt", "pyproject.toml", "setup.py", "setup.cfg"):
        path = repo / name
        uri = f"/repos/{REPO}/contents/{name}"
        if path.exists():
            httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json(
                {"type": "file", "encoding": "base64", "name": name, "path": name,
                 "content": base64.encodebytes(path.read_bytes()).decode()})
        else:
            httpserver.expect_request(uri, query_string={"ref": sha}).respond_with_json({"message": "Not Found"},
                                                                                        status=404)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar.gz", f"--prefix=x-{sha[:7]}/", sha],
                             capture_output=True, check=True).stdout
    httpserver.expect_request(f"/repos/{REPO}/tarball/{sha}").respond_with_data(archive)
    httpserver.expect_request(f"/repos/{REPO}/statuses/{sha}", method="POST").respond_with_json({"id": 1},
                                                                                                  status=201)


def test_experiment_json_pushes_go_from_prepare_to_create_training_job_with_one_build(
        stack, stack_env, sm, sm_dataset, make_repo, httpserver, mlflow_url, monkeypatch):
    import json as _json

    from mmp.pipeline import aws_stages

    from ..conftest import commit_all

    s3, ecr, uri = stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.setenv("MMP_GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_test")
    monkeypatch.setenv("MMP_PIPELINE_PLATFORMS", "sagemaker")
    monkeypatch.setenv("MMP_ECR_REPOSITORY_URI", uri)
    monkeypatch.setenv("MMP_ARTIFACTS_BUCKET", "acme-artifacts")
    monkeypatch.setenv("MMP_IMAGE_CONTEXT_DIGEST", CONTEXT)
    monkeypatch.setenv("MMP_SAGEMAKER_MAX_INSTANCES", "4")
    monkeypatch.setenv("MMP_NOTIFY_TOPIC_ARN", aws.client("sns").create_topic(Name="mmp-notify")["TopicArn"])
    aws_stages._BACKENDS.clear()
    repo = make_repo(experiment={**sm.SM_EXPERIMENT, "Instance_Count": "1"})
    builds, images = [], []
    for epochs in range(1, 4):
        experiment = _json.loads((repo / "experiment.json").read_text())
        experiment["Hyperparameters"] = f"{{'epochs': '{epochs}'}}"
        (repo / "experiment.json").write_text(_json.dumps(experiment))
        sha = commit_all(repo, f"epochs {epochs}")
        serve_commit(httpserver, repo, sha)
        job = {"repository": REPO, "clone_url": "https://github.com/octo-org/fashion-demo.git", "after": sha,
               "before": "0" * 40, "ref": "refs/heads/main", "delivery_id": f"d-{epochs}",
               "trigger_files": ["experiment.json"]}
        state = _json.loads(_json.dumps(aws_stages.prepare(job)))
        assert state["accepted"], state.get("outcome")
        builds.append(state["build_image"])
        if state["build_image"]:  # BuildImage: the state machine hands CodeBuild $.image.tag/requirements_uri
            assert state["image"]["requirements_uri"].endswith(f"/{state['image']['tag']}/requirements.txt")
            push_image(ecr, state["image"]["tag"])
        state = aws_stages.launch(state)
        assert not state["status"]["terminal"], state["status"]
        # The Train state's createTrainingJob.sync sends the request Launch built (moto stands in for it)
        aws.client("sagemaker").create_training_job(**state["training_request"])
        job_desc = aws.client("sagemaker").describe_training_job(TrainingJobName=state["handle"]["job_id"])
        images.append(job_desc["AlgorithmSpecification"]["TrainingImage"])
        channels = {c["ChannelName"]: c for c in job_desc["InputDataConfig"]}
        assert channels["mmp-code"]["DataSource"]["S3DataSource"]["S3Uri"] == \
            f"s3://acme-artifacts/{code_key(REPO, sha)}"
    assert builds == [True, False, False]
    assert len(set(images)) == 1 and images[0] == f"{uri}:{state['image']['tag']}"
    aws_stages._BACKENDS.clear()
