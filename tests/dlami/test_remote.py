"""Remote execution for real: horovodrun over SSH on the local sshd, EC2 on moto.

The pipeline trains examples/fashion/train.py with 2 ranks and ends FINISHED in a
real MLflow (sqlite); hostile hyperparameters and dataset names arrive literally;
the GitHub token reaches git on the leader through stdin only.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from ..conftest import ACCOUNT, REGION

from mmp.hosts import localgit as gitutil
from mmp.backends import BackendError, JobState
from mmp.contract.datasets import Dataset
from mmp.contract.experiment import ExperimentError, parse_experiment

from .conftest import ARGV_TRAIN, GITHUB_TOKEN


def test_pipeline_trains_the_example_over_ssh_and_ends_finished(make_backend, make_repo, cloud, fsx_datasets,
                                                               monkeypatch, mmp_home):
    from mlflow.tracking import MlflowClient

    from mmp.pipeline.runner import Pipeline
    from mmp.pipeline.runs import local_trigger
    from mmp.pipeline.store import RunStore
    from mmp.tracking.client import RunTracker

    monkeypatch.setenv("MMP_DLAMI_INSTALL_REQUIREMENTS", "1")  # requirements.txt is already satisfied here
    monkeypatch.setenv("MMP_GITHUB_TOKEN_SECRET_ARN", cloud.token_secret_arn)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = make_repo("fashion-dlami", experiment={
        "Platform": "dlami", "Dataset_Name": "digits", "Training_Instance": "p3.8xlarge", "Instance_Count": "1",
        "Processes_Per_Host": "2", "Hyperparameters": "{'epochs': '1', 'batch-size': '64'}"})
    backend = make_backend()
    streamed: list[str] = []
    launched = {}
    pipeline = Pipeline(tracker=RunTracker(), store=RunStore(), backend_factory=lambda platform: backend,
                        on_log=streamed.append, on_launch=lambda run_id, handle: launched.update(handle=handle))
    outcome = pipeline.run(local_trigger(repo, gitutil.resolve(repo)))

    assert outcome.state == "SUCCEEDED", outcome.message + "\n" + "\n".join(streamed[-30:])
    client = MlflowClient(RunTracker().tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"  # logged by train.py's rank 0, through MLFLOW_RUN_ID
    assert "val_accuracy" in run.data.metrics
    assert run.data.tags["mmp.platform"] == "dlami"
    log_text = (mmp_home / "artifacts").rglob("train.log").__next__().read_text()
    assert "epoch 1/1" in log_text and "train.py: 2 rank(s)" in log_text
    assert any("epoch 1/1" in line for line in streamed)
    handle = launched["handle"]
    argv = handle.data["argv"]
    assert argv[:6] == [os.environ["MMP_DLAMI_HOROVODRUN"], "-np", "2", "-H", "localhost:2", "--gloo"]
    output = handle.data["paths"]["output"]
    assert output.endswith(f"/output/{outcome.experiment.resolved_name('fashion-dlami')}/{outcome.run_id}")
    assert os.path.exists(os.path.join(output, "model.pt"))
    assert cloud.instances() == []  # torn down
    # the token was read (the secret is configured) but went nowhere visible
    everything = log_text + json.dumps(handle.to_dict()) + json.dumps(run.data.tags) + json.dumps(run.data.params)
    assert GITHUB_TOKEN not in everything and GITHUB_TOKEN not in "\n".join(streamed)


def _argv_from(lines: list[str]) -> list[str]:
    marked = [ln for ln in lines if "ARGV " in ln]
    assert marked, "\n".join(lines)
    return json.loads(marked[0].split("ARGV ", 1)[1])


HOSTILE = {
    "semicolon": "0.1; touch {canary}",
    "subst": "$(touch {canary})",
    "backticks": "`touch {canary}`",
    "quotes": "it's \"double\" and 'single'",
    "newline": "first\nsecond && touch {canary}",
    "glob": "* ~ $HOME",
}


def test_hostile_hyperparameters_and_dataset_names_arrive_literally(make_backend, request_for, cloud, tmp_path):
    from mmp.contract.argv import train_args

    canary = tmp_path / "canary"
    hyper = {k: v.format(canary=canary) for k, v in HOSTILE.items()}
    evil_dataset = f"digits;touch {canary};$(touch {canary})`touch {canary}`'\"\nx"
    with pytest.raises(ExperimentError, match="Dataset_Name"):
        parse_experiment({"Platform": "dlami", "Dataset_Name": evil_dataset, "Training_Instance": "p3.2xlarge"})

    request = request_for(train=ARGV_TRAIN, Hyperparameters=hyper)
    # the model refuses such a name; a request built around it must still be passed literally
    request.experiment = request.experiment.model_copy(update={"dataset_name": evil_dataset})
    request.dataset = Dataset(evil_dataset)
    backend = make_backend()
    handle, status, lines = run_to_end(backend, request)
    assert status.state is JobState.SUCCEEDED, status.message
    paths = backend.paths(request)
    assert _argv_from(lines) == train_args(paths.dataset, paths.output, evil_dataset, hyper)
    assert not canary.exists()
    assert cloud.instances() == []


def test_github_token_reaches_git_through_stdin_only(make_backend, request_for, cloud, httpserver, monkeypatch):
    """git asks for credentials; the helper answers from stdin; the token is on no command line."""
    from werkzeug import Response

    seen: list[str | None] = []

    def refs(req):
        seen.append(req.headers.get("Authorization"))
        if not req.headers.get("Authorization"):
            return Response("auth", status=401, headers={"WWW-Authenticate": 'Basic realm="GitHub"'})
        return Response("not found", status=404)

    httpserver.expect_request("/acme/fashion.git/info/refs").respond_with_handler(refs)
    monkeypatch.setenv("MMP_GITHUB_TOKEN_SECRET_ARN", cloud.token_secret_arn)
    backend = make_backend()
    request = request_for()
    request.clone_url = httpserver.url_for("/acme/fashion.git")
    sent_commands: list[str] = []
    original = backend._remote

    def spy(job, session, argv, what, **kw):
        from mmp.contract.argv import shell_join

        sent_commands.append(shell_join(argv))
        return original(job, session, argv, what, **kw)

    backend._remote = spy
    with pytest.raises(BackendError, match="fetch acme/fashion") as info:
        backend.launch(request)
    expected = "Basic " + base64.b64encode(f"x-access-token:{GITHUB_TOKEN}".encode()).decode()
    assert expected in seen
    assert GITHUB_TOKEN not in str(info.value)
    assert sent_commands and all(GITHUB_TOKEN not in c for c in sent_commands)
    assert cloud.instances() == []


def run_to_end(backend, request):
    """Launch, follow to the end, read the logs, tear down (on every path)."""
    handle = backend.launch(request)
    try:
        status = backend.wait(handle, poll_seconds=0.1)
        lines, _ = backend.logs(handle)
    finally:
        backend.teardown(handle)
    return handle, status, lines


PASSWORD_TRAIN = """\
import os
pw = os.environ.get("MLFLOW_TRACKING_PASSWORD")
leaks = 0
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                leaks += pw is not None and pw.encode() in f.read()
        except OSError:
            pass
print("PASSWORD", "ok" if pw == "dlami-mlflow-pw" else "missing", "user", os.environ.get("MLFLOW_TRACKING_USERNAME"),
      "cmdline-leaks", leaks, flush=True)
"""


def test_each_rank_reads_the_mlflow_password_with_the_hosts_role_and_no_command_carries_it(
        make_backend, request_for, cloud, monkeypatch, aws_env, iam_enforced):
    """The stack gives the backend the secret's ARN; the ARN travels on stdin with the MLflow
    variables, and each rank (mmp.runtime.rank, in the container) reads the value from Secrets Manager."""
    from mmp import aws

    arn = aws.client("secretsmanager").create_secret(Name="mlflow-pw", SecretString="dlami-mlflow-pw")["ARN"]
    iam_enforced.bind({arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:MLFLOW_PASSWORD"})  # the stack's
    monkeypatch.setenv("MMP_MLFLOW_PASSWORD_SECRET_ARN", arn)
    monkeypatch.setenv("MMP_MLFLOW_USERNAME", "mmp")
    request = request_for(train=PASSWORD_TRAIN)
    # on EC2 the instance profile answers; here the hosts reach moto with test credentials
    request.mlflow_env.update({"AWS_ENDPOINT_URL": aws_env, "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION})
    backend = make_backend()
    sent: list[str] = []
    original = backend._remote

    def spy(job, session, argv, what, **kw):
        from mmp.contract.argv import shell_join

        sent.append(shell_join(argv) + " " + str(kw.get("stdin") or ""))
        return original(job, session, argv, what, **kw)

    backend._remote = spy
    handle, status, lines = run_to_end(backend, request)
    assert status.state is JobState.SUCCEEDED, status.message
    assert "PASSWORD ok user mmp cmdline-leaks 0" in "\n".join(lines)
    argv = handle.data["argv"]
    assert "dlami-mlflow-pw" not in " ".join(argv) + " ".join(sent) + "\n".join(lines).replace(
        "PASSWORD ok", "")
    assert cloud.instances() == []


STACK_REGION = "eu-west-1"  # not the us-east-1 fallback of mmp.aws.region(), nor the suite's default
REGION_TRAIN = """\
import os
import boto3
from mmp import aws
pw = os.environ.get("MLFLOW_TRACKING_PASSWORD")
print("RANK", os.environ.get("HOROVOD_RANK"), "REGION", aws.region(), boto3.session.Session().region_name,
      "PASSWORD", "ok" if pw == "dlami-mlflow-pw" else "missing", flush=True)
"""


def test_every_rank_gets_the_stacks_region_from_the_runner_with_no_region_variable_set(
        make_backend, request_for, cloud, sshd, monkeypatch, aws_env, iam_enforced):
    """Issue 19, defect 2: no AWS_REGION/AWS_DEFAULT_REGION anywhere in this process; the runner
    knows the stack's region only from its container's environment (rendered by the Pulumi
    program, tests/infra/test_region_handoff.py), and each rank must get it from what the backend
    sends: the MLflow password secret exists only in that region."""
    from mmp import aws
    from mmp.backends.dlami import SSH_KEY_VAR, DlamiConfig

    arn = aws.client("secretsmanager", STACK_REGION).create_secret(
        Name="mlflow-pw-eu", SecretString="dlami-mlflow-pw")["ARN"]
    iam_enforced.bind({arn: f"arn:aws:secretsmanager:{STACK_REGION}:{ACCOUNT}:secret:MLFLOW_PASSWORD"})  # the stack's
    made_in = aws.region()  # where the cloud fixture made the subnet and launch template
    for variable in aws.REGION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MMP_MLFLOW_PASSWORD_SECRET_ARN", arn)
    request = request_for(train=REGION_TRAIN, Processes_Per_Host="2")
    request.mlflow_env.update({"AWS_ENDPOINT_URL": aws_env, "AWS_ACCESS_KEY_ID": "testing",
                               "AWS_SECRET_ACCESS_KEY": "testing"})  # the instance profile's part; no region
    backend = make_backend()
    # The runner's environment as ECS starts it: the container definition's variables, region included.
    backend.config = DlamiConfig.from_env({**os.environ, "AWS_REGION": STACK_REGION,
                                           SSH_KEY_VAR: sshd.client_private})
    backend._clients = lambda service: cloud.client(service, made_in)
    handle, status, lines = run_to_end(backend, request)
    text = "\n".join(lines)
    assert status.state is JobState.SUCCEEDED, (status.message, text[-2000:])
    for rank in ("0", "1"):
        assert f"RANK {rank} REGION {STACK_REGION} {STACK_REGION} PASSWORD ok" in text, text[-2000:]
    assert handle.data["region"] == STACK_REGION
    assert cloud.instances(region=made_in) == []


CHATTY_TRAIN = """\
import sys
for i in range(30000):
    print(f"step {i} loss 0.5", flush=False)
print("train.py: done", flush=True)
"""


def test_a_chatty_run_is_held_in_bounded_memory_and_still_streamed(make_backend, request_for, cloud, monkeypatch):
    """Issue 19, defect 14: the runner task (512 MiB) follows a run that may print for days; the
    backend keeps only the tail (mmp.backends.base.OutputTail), as the pipeline does, while the
    follower still receives every line through `logs`' cursor."""
    from mmp.backends import base

    monkeypatch.setattr(base, "LOG_KEEP_LINES", 500)
    monkeypatch.setattr(base, "LOG_KEEP_CHARS", 64 * 1024)
    backend = make_backend()
    request = request_for(train=CHATTY_TRAIN)
    streamed: list[str] = []
    handle = backend.launch(request)
    try:
        status = backend.wait(handle, on_log=streamed.append, poll_seconds=0.05)
        job = backend._jobs[handle.job_id]
        kept = job.lines.lines()
        assert status.state is JobState.SUCCEEDED, status.message
        assert len(kept) <= 500 and sum(map(len, kept)) <= 64 * 1024
        assert job.lines.total > 30000 and "train.py: done" in kept[-1]
        assert len(job.process.lines) <= 1000  # the SSH reader's own copy is a tail too
        steps = [line for line in streamed if "step " in line]
        assert steps and "train.py: done" in streamed[-1]
        assert steps == sorted(steps, key=lambda line: int(line.split("step ")[1].split()[0]))  # in order
    finally:
        backend.teardown(handle)
    assert cloud.instances() == []


MANAGED_TRAIN = """\
import os
import mlflow
from mlflow.tracking._tracking_service.utils import _get_store
print("RANK", os.environ.get("HOROVOD_RANK"), "URI", mlflow.get_tracking_uri(), "STORE", type(_get_store()).__name__,
      flush=True)
"""


def test_with_sagemaker_managed_mlflow_each_rank_logs_to_the_servers_arn_through_the_plugin(
        make_backend, request_for, cloud, monkeypatch):
    """Issue 19, defect 3: the ranks got the server's URL, which answers unsigned calls with 403;
    like SageMaker jobs they now get its ARN, which the training image's sagemaker-mlflow plugin
    (installed here too) turns into signed calls with the hosts' role."""
    arn = f"arn:aws:sagemaker:{STACK_REGION}:123456789012:mlflow-tracking-server/acme-ml-dev-mlflow"
    monkeypatch.setenv("MMP_MLFLOW_TRACKING_SERVER_ARN", arn)
    request = request_for(train=MANAGED_TRAIN)
    request.mlflow_env["MLFLOW_TRACKING_URI"] = "https://t-abc123.eu-west-1.experiments.sagemaker.aws"
    handle, status, lines = run_to_end(make_backend(), request)
    text = "\n".join(lines)
    assert status.state is JobState.SUCCEEDED, (status.message, text[-2000:])
    assert f"RANK 0 URI {arn} STORE MlflowSageMakerStore" in text, text[-2000:]
    assert cloud.instances() == []


def test_the_commits_archive_from_s3_is_what_runs(make_backend, request_for, cloud, tmp_path, monkeypatch):
    """A launch Prepare staged: the leader unpacks the archive (GitHub's single top folder) with the
    AWS CLI (a stand-in reading a local 'bucket' here) instead of fetching the repository."""
    import io
    import tarfile

    bucket = tmp_path / "bucket"
    key = f"code/acme/fashion/{'e' * 40}.tar.gz"
    (bucket / key).parent.mkdir(parents=True)
    with tarfile.open(bucket / key, "w:gz") as tar:
        data = ARGV_TRAIN.encode() + b"print('FROM THE ARCHIVE', flush=True)\n"
        info = tarfile.TarInfo("acme-fashion-eeeeeee/train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cli = tmp_path / "aws"
    cli.write_text(f'#!/bin/sh\n[ "$1 $2" = "s3 cp" ] || exit 2\nexec cat "{bucket}/${{4#s3://acme-artifacts/}}"\n')
    cli.chmod(0o755)
    monkeypatch.setenv("MMP_DLAMI_AWS_CLI", str(cli))
    request = request_for()
    request.clone_url = "https://github.invalid/never/fetched.git"
    request.code_uri = f"s3://acme-artifacts/{key}"
    backend = make_backend()
    handle, status, lines = run_to_end(backend, request)
    assert status.state is JobState.SUCCEEDED, status.message
    assert "FROM THE ARCHIVE" in "\n".join(lines)
    assert cloud.instances() == []
