"""EC2 lifecycle of the dlami backend on moto (server mode), SSH on the local sshd.

Launch, tags, user data (FSx mount line, watchdog), termination; then a fault at
each step, after which no MMP-tagged instance may be left running.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest

from ..conftest import IAM_DIR, REGION, create_bucket
import yaml
from botocore.exceptions import ClientError

from mmp import aws
from mmp.backends import BackendError, JobState

from .conftest import ECR_URI, FAIL_TRAIN, SLEEP_TRAIN, PlacementStub, tagged_processes

FAKE_HOROVODRUN = """#!{python}
# Stands in for horovodrun on a 2-instance cluster whose worker IP (moto's) is not
# reachable here: records the argv the backend built and what the identity file is.
import json, os, stat, sys
args = sys.argv[1:]
key = args[args.index("--ssh-identity-file") + 1]
mode = stat.S_IMODE(os.stat(key).st_mode)
print("HOROVODRUN " + json.dumps({{"argv": args, "key_mode": mode, "key_head": open(key).readline().strip(),
                                   "cwd": os.getcwd(), "run_id": os.environ.get("MLFLOW_RUN_ID")}}), flush=True)
"""


def user_data(instance_id: str) -> dict:
    raw = aws.client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    text = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def assert_nothing_running(cloud, run_id: str) -> None:
    live = [i for i in cloud.instances() if any(t["Value"] == run_id for t in i.get("Tags", []))]
    assert live == [], f"instances left running: {[i['InstanceId'] for i in live]}"
    assert cloud.instances() == []


def test_two_instances_launch_tag_user_data_and_terminate(make_backend, request_for, cloud, tmp_path, monkeypatch):
    fake = tmp_path / "horovodrun"
    fake.write_text(FAKE_HOROVODRUN.format(python=os.environ["MMP_DLAMI_PYTHON"]))
    fake.chmod(0o755)
    monkeypatch.setenv("MMP_DLAMI_HOROVODRUN", str(fake))
    backend = make_backend()
    request = request_for(Instance_Count="2", Processes_Per_Host="1", Max_Runtime="30")
    handle = backend.launch(request)
    ids = handle.data["instance_ids"]
    assert len(ids) == 2
    assert json.loads(json.dumps(handle.to_dict())) == handle.to_dict()  # JSON-serialisable handle

    ec2 = aws.client("ec2")
    instances = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
                 for i in r["Instances"]}
    for iid, inst in instances.items():
        assert inst["State"]["Name"] == "running"
        assert inst["InstanceType"] == "p3.2xlarge"
        assert inst["SubnetId"] == cloud.subnet_id
        assert inst["ImageId"] == cloud.image_id  # resolved through the SSM parameter
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["mmp:run-id"] == request.run_id
        assert tags["mmp:experiment"] == "dl-test"
        assert tags["mmp:commit"] == request.commit
        assert tags["mmp:repository"] == "acme/fashion"
        assert tags["mmp:managed"] == "true"
        assert tags["mmp:max-runtime-minutes"] == "45"  # 30 min + 15 min slack
        behaviour = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        doc = user_data(iid)
        assert ["shutdown", "-h", "+45"] in doc["runcmd"]
        fsx = doc["runcmd"][1]  # client, mount and the SSH user's run area (run under bash in test_user_data)
        assert fsx[:2] == ["bash", "-c"] and fsx[3:] == [
            "mmp-fsx", f"fs-0123456789abcdef0.fsx.{REGION}.amazonaws.com", "abcdefgh", "/fsx",
            os.environ["MMP_SSH_USER"], os.environ["MMP_DLAMI_WORK_ROOT"], os.environ["MMP_DLAMI_OUTPUT_ROOT"]]
        assert doc["ssh_keys"]["ed25519_public"] == handle.data["host_keys"][iid]
        assert doc["ssh_genkeytypes"] == []
        assert len(doc["ssh_authorized_keys"]) == 1  # MMP's key: the host's sshd is MMP's way in
        cluster = [f for f in doc["write_files"] if f["path"] == "/etc/mmp/authorized_keys"]
        assert cluster[0]["content"].startswith("ssh-ed25519 ")  # the container's sshd trusts the run's key
        container = doc["runcmd"][-1]  # after the mount: the training image, /fsx inside it
        assert container[:2] == ["bash", "-c"] and container[3:] == [
            "mmp-container", f"{ECR_URI}:{request.commit}", "2222", "eu-west-1"]

    assert len(cloud.launched) == 2
    for sent in cloud.launched:
        assert sent["Placement"] == {"GroupName": "mmp-cluster"}
        assert sent["LaunchTemplate"] == {"LaunchTemplateId": cloud.launch_template_id, "Version": "$Default"}
        assert sent["InstanceInitiatedShutdownBehavior"] == "terminate"

    status = backend.wait(handle, poll_seconds=0.05)
    assert status.state is JobState.SUCCEEDED, status.message
    lines, _ = backend.logs(handle)
    record = json.loads(next(ln for ln in lines if ln.startswith("HOROVODRUN "))[len("HOROVODRUN "):])
    worker_ip = instances[ids[1]]["PrivateIpAddress"]
    argv = record["argv"]
    assert argv[:4] == ["-np", "2", "-H", f"localhost:1,{worker_ip}:1"]
    assert argv[argv.index("-p") + 1] == "2222"  # the workers' container sshd
    assert argv[argv.index("--ssh-identity-file") + 2:][:3] == ["-p", "2222", os.environ["MMP_DLAMI_PYTHON"]]
    assert argv[argv.index(os.environ["MMP_DLAMI_PYTHON"]) + 1:][:3] == ["-m", "mmp.runtime.rank", "train.py"]
    assert argv[argv.index("--ssh-identity-file") + 1].endswith(f"/dl-test/{request.run_id}/.ssh/cluster_key")
    assert record["key_mode"] == 0o600 and record["key_head"] == "-----BEGIN OPENSSH PRIVATE KEY-----"
    assert record["cwd"].endswith(f"/dl-test/{request.run_id}/code")
    assert record["run_id"] == request.run_id
    assert argv[-8:] == ["--dataset-path", f"{os.environ['MMP_DLAMI_DATASET_ROOT']}/digits", "--output-path",
                         f"{os.environ['MMP_DLAMI_OUTPUT_ROOT']}/dl-test/{request.run_id}", "--dataset", "digits",
                         "--epochs", "1"]

    backend.teardown(handle)
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
              for i in r["Instances"]}
    assert set(states.values()) <= {"shutting-down", "terminated"}
    assert_nothing_running(cloud, request.run_id)
    backend.teardown(handle)  # idempotent


class FailSecondLaunch(PlacementStub):
    """moto's EC2, except that the second RunInstances fails as AWS does on no capacity."""

    calls = 0

    def run_instances(self, **kwargs):
        FailSecondLaunch.calls += 1
        if FailSecondLaunch.calls == 2:
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity",
                                         "Message": "We currently do not have sufficient p3.2xlarge capacity"}},
                              "RunInstances")
        return self._real.run_instances(**kwargs)


def test_launch_error_on_second_instance_terminates_the_first(make_backend, request_for, cloud):
    FailSecondLaunch.calls = 0
    backend = make_backend()
    backend._clients = lambda svc: (FailSecondLaunch(aws.client("ec2"), cloud.placement_groups) if svc == "ec2"
                                    else aws.client(svc))
    request = request_for(Instance_Count="2")
    with pytest.raises(BackendError, match="instance 2 of 2.*InsufficientInstanceCapacity"):
        backend.launch(request)
    assert FailSecondLaunch.calls == 2
    gone = [i for r in aws.client("ec2").describe_instances(
        Filters=[{"Name": "tag:mmp:run-id", "Values": [request.run_id]}])["Reservations"] for i in r["Instances"]]
    assert len(gone) == 1 and gone[0]["State"]["Name"] == "terminated"
    assert_nothing_running(cloud, request.run_id)


def test_ssh_never_answering_fails_and_terminates(make_backend, request_for, cloud):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts TCP, never says a word (a host still booting)
    port = silent.getsockname()[1]
    try:
        backend = make_backend(address=lambda instance: ("127.0.0.1", port))
        request = request_for()
        started = time.time()
        with pytest.raises(BackendError, match="SSH to i-.* failed: SSH did not answer"):
            backend.launch(request)
        assert time.time() - started < 20
    finally:
        silent.close()
    assert_nothing_running(cloud, request.run_id)


def test_wrong_host_key_is_refused_and_terminates(make_backend, request_for, cloud):
    from mmp.backends.ssh import generate_ed25519

    backend = make_backend(host_keys=generate_ed25519)  # the host will present another key
    request = request_for()
    with pytest.raises(BackendError, match="not the pinned one"):
        backend.launch(request)
    assert_nothing_running(cloud, request.run_id)


def test_training_failure_fails_the_job_and_teardown_terminates(make_backend, request_for, cloud):
    backend = make_backend()
    request = request_for(train=FAIL_TRAIN)
    handle = backend.launch(request)
    seen: list[str] = []
    status = backend.wait(handle, on_log=seen.append, poll_seconds=0.1)
    backend.teardown(handle)
    assert status.state is JobState.FAILED
    assert status.exit_code == 1  # horovodrun's code whichever rank failed
    assert status.message.startswith("horovodrun exited 1")
    assert any("train.py: about to fail" in ln for ln in seen)
    assert any("some detail on stderr" in ln for ln in seen)
    assert_nothing_running(cloud, request.run_id)


def launch_until_sleeping(backend, request):
    """Launch SLEEP_TRAIN and return once the host says it is sleeping (up to 30 s)."""
    handle = backend.launch(request)
    deadline = time.time() + 30
    while not any("train.py: sleeping" in ln for ln in backend.logs(handle)[0]) and time.time() < deadline:
        time.sleep(0.1)
    return handle


def test_cancel_mid_run_kills_training_and_terminates(make_backend, request_for, cloud):
    backend = make_backend()
    request = request_for(train=SLEEP_TRAIN)
    handle = launch_until_sleeping(backend, request)
    assert tagged_processes(request.run_id), "training should be running on the host"
    assert backend.status(handle).state is JobState.RUNNING
    backend.cancel(handle)
    assert backend.status(handle).state is JobState.CANCELLED
    assert_nothing_running(cloud, request.run_id)
    backend.teardown(handle)
    deadline = time.time() + 10
    while tagged_processes(request.run_id) and time.time() < deadline:
        time.sleep(0.2)
    assert tagged_processes(request.run_id) == []


def test_max_runtime_timeout_cancels_and_fails(make_backend, request_for, cloud):
    backend = make_backend()
    request = request_for(train=SLEEP_TRAIN)
    handle = backend.launch(request)
    try:
        status = backend.wait(handle, deadline=time.time() + 1.5, poll_seconds=0.2)
    finally:
        backend.teardown(handle)
    assert status.state is JobState.FAILED and "Max_Runtime" in status.message
    assert_nothing_running(cloud, request.run_id)


def test_keyboard_interrupt_during_launch_terminates(make_backend, request_for, cloud, sshd):
    calls = []

    def host_keys():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sshd.host_private, sshd.host_public

    backend = make_backend(host_keys=host_keys)
    request = request_for(Instance_Count="2")
    with pytest.raises(KeyboardInterrupt):
        backend.launch(request)
    assert_nothing_running(cloud, request.run_id)


def test_fetch_failure_fails_launch_and_terminates(make_backend, request_for, cloud):
    backend = make_backend()
    request = request_for()
    request.commit = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(BackendError, match="fetch acme/fashion@0123456789ab failed"):
        backend.launch(request)
    assert_nothing_running(cloud, request.run_id)


def test_teardown_finds_instances_by_tag_even_if_unrecorded(make_backend, request_for, cloud):
    """A crash between RunInstances and recording the id still leaves a tag to find."""
    from mmp.backends import JobHandle

    request = request_for()
    ec2 = aws.client("ec2")
    ec2.run_instances(ImageId=cloud.image_id, MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "mmp:managed", "Value": "true"},
                                              {"Key": "mmp:run-id", "Value": request.run_id}]}])
    assert len(cloud.instances()) == 1
    make_backend().teardown(JobHandle("dlami", request.run_id, {"instance_ids": []}))
    assert_nothing_running(cloud, request.run_id)


def test_environment_with_a_newline_is_refused_and_terminates(make_backend, request_for, cloud):
    backend = make_backend()
    request = request_for()
    request.mlflow_env["MLFLOW_TRACKING_URI"] = "http://mlflow\nMMP_EVIL=1"
    with pytest.raises(BackendError, match="'MLFLOW_TRACKING_URI' cannot be sent"):
        backend.launch(request)
    assert_nothing_running(cloud, request.run_id)


OUTPUT_TRAIN = """\
import os, sys
out = sys.argv[sys.argv.index("--output-path") + 1]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "model.pt"), "w").write("weights")
print("train.py: wrote", out, flush=True)
"""

AWS_CLI = """#!{python}
# The AWS CLI on the instance (its instance profile gives the credentials): `aws s3 cp URI -`
# and `aws s3 sync DIR URI`, against moto, its calls checked as the DLAMI host role's.
import sys
sys.path.insert(0, {iam_dir!r})
import aws_cli
aws_cli.main({endpoint!r})
"""


def test_output_is_copied_to_s3_when_configured(make_backend, request_for, cloud, tmp_path, monkeypatch, aws_env):
    cli = tmp_path / "aws"
    cli.write_text(AWS_CLI.format(python=os.environ["MMP_DLAMI_PYTHON"], endpoint=aws_env, iam_dir=str(IAM_DIR)))
    cli.chmod(0o755)
    create_bucket(aws.client("s3"), "mmp-artifacts")
    monkeypatch.setenv("MMP_ARTIFACTS_BUCKET", "mmp-artifacts")
    monkeypatch.setenv("MMP_DLAMI_AWS_CLI", str(cli))
    backend = make_backend()
    request = request_for(train=OUTPUT_TRAIN)
    handle = backend.launch(request)
    try:
        status = backend.wait(handle, poll_seconds=0.1)
    finally:
        backend.teardown(handle)
    assert status.state is JobState.SUCCEEDED, status.message
    key = f"output/dl-test/{request.run_id}/model.pt"
    assert handle.data["output_s3"] == f"s3://mmp-artifacts/output/dl-test/{request.run_id}/"
    assert aws.client("s3").get_object(Bucket="mmp-artifacts", Key=key)["Body"].read() == b"weights"
    assert_nothing_running(cloud, request.run_id)


def test_teardown_while_training_still_runs_stops_it(make_backend, request_for, cloud):
    """An error while following the job goes straight to teardown: nothing may keep running."""
    backend = make_backend()
    request = request_for(train=SLEEP_TRAIN)
    handle = launch_until_sleeping(backend, request)
    backend.teardown(handle)
    assert_nothing_running(cloud, request.run_id)
    deadline = time.time() + 10
    while tagged_processes(request.run_id) and time.time() < deadline:
        time.sleep(0.2)
    assert tagged_processes(request.run_id) == []
