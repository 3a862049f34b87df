"""The `train` entrypoint under a fake /opt/ml tree: SageMaker's real config files from
tests/fixtures/sagemaker, a tiny IDX dataset, real `horovodrun -np 2` and the
example train.py; the multi-host command for the fixtures' 3 hosts in 2 groups; SSH
waits against real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from mmp.runtime import sagemaker_entrypoint as ep

from ..conftest import ACCOUNT, REGION

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "sagemaker"
HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
SAGEMAKER_CONTAINER = "SageMaker training container=pipeline-sagemaker"  # the job's process tree, ranks included


def opt_ml(tmp_path: Path, *, resourceconfig=None, hyperparameters=None, inputdataconfig=None) -> Path:
    """A fake /opt/ml: the fixtures' config files unless others are given."""
    root = tmp_path / "opt-ml"
    config = root / "input" / "config"
    config.mkdir(parents=True)
    for name, given in (("resourceconfig.json", resourceconfig), ("hyperparameters.json", hyperparameters),
                        ("inputdataconfig.json", inputdataconfig)):
        if given is None:
            shutil.copy(FIXTURES / name, config / name)
        else:
            (config / name).write_text(json.dumps(given))
    return root


def test_the_fixtures_multi_host_command_on_the_leader(tmp_path):
    root = opt_ml(tmp_path)  # 3 hosts (algo-1, algo-2 in train1; algo-3 in train2), current algo-1
    env = {"MMP_SM_ROOT": str(root), "MMP_DATASET": "train", "MMP_PROCESSES_PER_HOST": "8",
           "MMP_HYPERPARAMETER_ORDER": "learning_rate,batch_size", "MMP_CODE_DIR": "/opt/code"}
    plan = ep.build_plan(env, horovodrun="horovodrun", python="/usr/bin/python3")
    assert plan.role == "leader" and plan.leader == "algo-1"
    assert plan.argv == [
        "horovodrun", "-np", "24", "-H", "algo-1:8,algo-2:8,algo-3:8", "--gloo",
        "/usr/bin/python3", "-m", "mmp.runtime.rank", "train.py",
        "--dataset-path", f"{root}/input/data/train", "--output-path", f"{root}/model", "--dataset", "train",
        "--learning_rate", "0.001", "--batch_size", "32",
    ]
    assert plan.cwd == "/opt/code"


@pytest.mark.parametrize("host", ["algo-2", "algo-3"])
def test_the_other_fixture_hosts_are_workers(tmp_path, fixture_json, host):
    resources = {**fixture_json("sagemaker/resourceconfig.json"), "current_host": host}
    root = opt_ml(tmp_path, resourceconfig=resources)
    plan = ep.build_plan({"MMP_SM_ROOT": str(root), "MMP_DATASET": "train"})
    assert (plan.role, plan.leader, plan.argv) == ("worker", "algo-1", [])


def test_without_the_order_sagemaker_injected_hyperparameters_are_left_out(tmp_path):
    root = opt_ml(tmp_path)
    plan = ep.build_plan({"MMP_SM_ROOT": str(root), "MMP_DATASET": "validation", "MMP_PROCESSES_PER_HOST": "1"},
                         horovodrun="horovodrun", python="python")
    args = plan.argv[plan.argv.index("train.py") + 1:]
    # the fixture's sagemaker_* and _tuning_* keys are gone; JSON-encoded strings are decoded
    assert args[6:] == ["--batch_size", "32", "--learning_rate", "0.001", "--hosts", '["algo-1", "algo-2"]',
                        "--default_user_module_name", "net"]
    assert args[:6] == ["--dataset-path", f"{root}/input/data/validation", "--output-path", f"{root}/model",
                        "--dataset", "validation"]


def test_network_interface_and_natural_host_order(tmp_path):
    root = opt_ml(tmp_path, resourceconfig={"current_host": "algo-1", "hosts": ["algo-10", "algo-2", "algo-1"],
                                            "network_interface_name": "eth1"},
                  hyperparameters={}, inputdataconfig={"fashion": {"TrainingInputMode": "File"}})
    plan = ep.build_plan({"MMP_SM_ROOT": str(root), "MMP_PROCESSES_PER_HOST": "4"}, horovodrun="h", python="p")
    assert plan.argv[:8] == ["h", "-np", "12", "-H", "algo-1:4,algo-2:4,algo-10:4", "--gloo",
                             "--network-interface", "eth1"]
    assert plan.argv[-2:] == ["--dataset", "fashion"]  # the only channel is the dataset


def test_one_host_runs_locally_with_checkpoints_exported(tmp_path):
    root = opt_ml(tmp_path, resourceconfig={"current_host": "algo-1", "hosts": ["algo-1"]},
                  hyperparameters={"epochs": "3"}, inputdataconfig={"fashion": {}})
    (root / "checkpoints").mkdir()  # SageMaker makes it when CheckpointConfig is set
    plan = ep.build_plan({"MMP_SM_ROOT": str(root), "MMP_PROCESSES_PER_HOST": "2"}, horovodrun="h", python="p")
    assert plan.role == "single"
    assert plan.argv[:6] == ["h", "-np", "2", "-H", "localhost:2", "--gloo"]
    assert plan.env["MMP_CHECKPOINT_DIR"] == str(root / "checkpoints")


@pytest.mark.parametrize("files, env, words", [
    ({"resourceconfig": {"current_host": "algo-9", "hosts": ["algo-1"]}}, {}, "current_host 'algo-9' is not in hosts"),
    ({}, {}, "has channels train, validation; set MMP_DATASET"),
    ({}, {"MMP_DATASET": "fashion"}, "dataset channel 'fashion' is not in inputdataconfig.json"),
    ({}, {"MMP_DATASET": "train", "MMP_HYPERPARAMETER_ORDER": "epochs"}, "hyperparameters.json lacks epochs"),
    ({}, {"MMP_DATASET": "train", "MMP_PROCESSES_PER_HOST": "many"}, "MMP_PROCESSES_PER_HOST must be"),
])
def test_bad_configuration_is_a_clear_failure(tmp_path, files, env, words):
    root = opt_ml(tmp_path, **files)
    code = ep.main([], {"MMP_SM_ROOT": str(root), **env})
    assert code == 2
    assert words in (root / "output" / "failure").read_text()


def test_missing_config_files_say_so(tmp_path):
    root = tmp_path / "empty"
    assert ep.main([], {"MMP_SM_ROOT": str(root)}) == 2
    assert "resourceconfig.json is missing" in (root / "output" / "failure").read_text()


def test_hyperparameter_values_keep_their_spelling():
    assert ep.decode_value('"us-west-2"') == "us-west-2"
    assert ep.decode_value("1e-3") == "1e-3"
    assert ep.decode_value("true") == "true"
    assert ep.decode_value("plain text") == "plain text"
    assert ep.decode_value('["a"]') == '["a"]'


# -- really training -------------------------------------------------------------------
@pytest.fixture
def single_host_job(tmp_path, digits):
    root = opt_ml(tmp_path, resourceconfig={"current_host": "algo-1", "hosts": ["algo-1"],
                                            "current_instance_type": "ml.m5.xlarge"},
                  hyperparameters={"epochs": "1", "batch-size": '"64"'},  # as the SDK and boto3 write them
                  inputdataconfig={"digits": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                                              "RecordWrapperType": "None"}})
    data = root / "input" / "data" / "digits"
    shutil.copytree(digits, data)
    # the commit's code as Prepare stages it: an archive with one top folder, in channel mmp-code
    channels = json.loads((root / "input" / "config" / "inputdataconfig.json").read_text())
    channels["mmp-code"] = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}
    (root / "input" / "config" / "inputdataconfig.json").write_text(json.dumps(channels))
    code_channel = root / "input" / "data" / "mmp-code"
    code_channel.mkdir(parents=True)
    with tarfile.open(code_channel / f"{'a' * 40}.tar.gz", "w:gz") as tar:
        tar.add(ROOT / "examples" / "fashion", arcname="acme-fashion-demo-aaaaaaa",
                filter=lambda info: None if "__pycache__" in info.name else info)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MMP_", "AWS_"))}
    env.update({"MMP_SM_ROOT": str(root), "MMP_DATASET": "digits",
                "MMP_PROCESSES_PER_HOST": "2", "MMP_HYPERPARAMETER_ORDER": "epochs,batch-size",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    return root, env


@pytest.mark.horovod
@pytest.mark.slow
def test_the_train_script_really_trains_with_horovodrun_np_2(single_host_job, aws_env, monkeypatch, iam_enforced):
    from mlflow.tracking import MlflowClient

    from mmp import aws
    from mmp.tracking.client import RunTracker

    root, env = single_host_job
    secret_arn = aws.client("secretsmanager").create_secret(Name="mlflow-pw", SecretString="s3cr3t-pw")["ARN"]
    tracker = RunTracker()
    run_id = tracker.start("sm-entrypoint", run_name="sm", tags={}, params={"epochs": "1"})
    env.update({"MLFLOW_TRACKING_URI": tracker.tracking_uri, "MLFLOW_EXPERIMENT_NAME": "sm-entrypoint",
                "MLFLOW_RUN_ID": run_id, "MMP_MLFLOW_PASSWORD_SECRET_ARN": secret_arn,
                "AWS_ENDPOINT_URL": aws_env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION, **iam_enforced.subprocess_env(SAGEMAKER_CONTAINER)})
    iam_enforced.bind({secret_arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:MLFLOW_PASSWORD"})

    proc = subprocess.run([sys.executable, str(ROOT / "horovod_docker" / "train"), "train"], env=env,
                          capture_output=True, text=True, timeout=240)

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"mmp: single on algo-1: {HOROVODRUN} -np 2 -H localhost:2 --gloo" in out
    assert "-m mmp.runtime.rank train.py" in out
    assert (root / "code" / "train.py").is_file()  # unpacked from the channel, run from there
    assert "train.py: 2 rank(s), dataset digits" in out
    assert "epoch 1/1" in out
    assert (root / "model" / "model.pt").is_file()
    assert not (root / "output" / "failure").exists()
    assert "epoch 1/1" in (root / "output" / "data" / "train.log").read_text()
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)  # train.py continued the pipeline's run
    assert run.data.params["world_size"] == "2"
    assert "val_accuracy" in run.data.metrics
    assert "s3cr3t-pw" not in out  # fetched for train.py, never printed


def test_horovodruns_environment_never_holds_the_password(aws_env):
    """horovodrun writes its environment onto each rank's command line (`env K=V … python`, and an
    `ssh host '…'` that lives as long as the job): only the ARN may be there."""
    from mmp import aws

    arn = aws.client("secretsmanager").create_secret(Name="mlflow-pw-2", SecretString="pw-123")["ARN"]
    plan = ep.Plan(role="single", current_host="algo-1", hosts=["algo-1"], leader="algo-1", env={"A": "1"})
    env = ep.child_env(plan, {"MMP_MLFLOW_PASSWORD_SECRET_ARN": arn, "PATH": "/bin",
                              "MLFLOW_TRACKING_PASSWORD": "pw-123"})
    assert "pw-123" not in json.dumps(env) and env["A"] == "1"
    assert env["MMP_MLFLOW_PASSWORD_SECRET_ARN"] == arn
    with pytest.raises(ep.EntrypointError, match="could not read the MLflow password secret") as info:
        ep.child_env(plan, {"MMP_MLFLOW_PASSWORD_SECRET_ARN": arn + "-gone"})
    assert "pw-123" not in str(info.value)


RANK_PROBE = """import os, sys
pid = str(os.getpid())
leaks = []
for entry in os.listdir('/proc'):
    if entry.isdigit():
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                if b'pw-secret-xyz' in f.read():
                    leaks.append(entry)
        except OSError:
            pass
ok = os.environ.get('MLFLOW_TRACKING_PASSWORD') == 'pw-secret-xyz'
print('rank', os.environ.get('HOROVOD_RANK'), 'password', 'ok' if ok else 'missing', 'cmdline-leaks', len(leaks),
      'args', sys.argv[1:], flush=True)
"""


@pytest.mark.horovod
def test_each_rank_reads_the_password_itself_and_no_command_line_shows_it(tmp_path, aws_env, iam_enforced):
    """Real horovodrun -np 2 with `python -m mmp.runtime.rank probe.py`: every rank has the password from
    Secrets Manager (moto server) in its environment; no process's command line (`ps`) holds it."""
    from mmp import aws
    from mmp.contract.argv import horovodrun_argv
    from mmp.runtime.rank import LAUNCHER

    arn = aws.client("secretsmanager").create_secret(Name="mlflow-pw-3", SecretString="pw-secret-xyz")["ARN"]
    iam_enforced.bind({arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:MLFLOW_PASSWORD"})
    (tmp_path / "probe.py").write_text(RANK_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MMP_"))}
    env.update({"MMP_MLFLOW_PASSWORD_SECRET_ARN": arn, "AWS_ENDPOINT_URL": aws_env,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                **iam_enforced.subprocess_env(SAGEMAKER_CONTAINER)})
    argv = horovodrun_argv([("localhost", 2)], ["--x", "1"], python=sys.executable, horovodrun=HOROVODRUN,
                           script="probe.py", launcher=LAUNCHER)
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("password ok cmdline-leaks 0 args ['--x', '1']") == 2, out[-3000:]
    assert "pw-secret-xyz" not in out


def test_a_rank_without_access_to_the_secret_stops_naming_the_arn(tmp_path, aws_env, iam_enforced):
    (tmp_path / "t.py").write_text("print('ran')\n")
    iam_enforced.expect_denied("secretsmanager:GetSecretValue")  # not the stack's secret: the role is refused
    env = {**os.environ, **iam_enforced.subprocess_env(SAGEMAKER_CONTAINER), "AWS_ENDPOINT_URL": aws_env,
           "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
           "MMP_MLFLOW_PASSWORD_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:gone"}
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    proc = subprocess.run([sys.executable, "-m", "mmp.runtime.rank", "t.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "could not read the MLflow password secret" in proc.stderr
    assert "ran" not in proc.stdout


# -- the commit's code, from channel mmp-code ----------------------------------------------
def make_archive(path: Path, members: dict[str, bytes], *, links: dict[str, str] | None = None) -> None:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def test_githubs_top_folder_is_stripped_and_git_archives_without_one_work(tmp_path):
    make_archive(tmp_path / "a" / "x.tar.gz", {"o-r-abc/train.py": b"print(1)", "o-r-abc/pkg/m.py": b"",
                                               "o-r-abc/.gitignore": b"*.pyc"})
    dest = ep.unpack_code(tmp_path / "a", tmp_path / "code-a")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        ".gitignore", "pkg/m.py", "train.py"]
    make_archive(tmp_path / "b" / "x.tar.gz", {"train.py": b"print(2)", "lib/u.py": b""})
    assert (ep.unpack_code(tmp_path / "b", tmp_path / "code-b") / "train.py").read_bytes() == b"print(2)"


@pytest.mark.parametrize("members, links, words", [
    ({"top/../../evil.py": b"x", "top/train.py": b""}, None, "leaves the code folder"),
    ({"top/train.py": b""}, {"top/data": "/etc"}, "is a link"),
    ({"top/readme.md": b""}, None, "train.py not found"),
])
def test_unsafe_or_incomplete_archives_fail_clearly(tmp_path, members, links, words):
    make_archive(tmp_path / "in" / "x.tar.gz", members, links=links)
    with pytest.raises(ep.EntrypointError, match=words):
        ep.unpack_code(tmp_path / "in", tmp_path / "code")
    assert not (tmp_path / "evil.py").exists()


def test_the_code_channel_is_never_taken_for_the_dataset(tmp_path):
    root = opt_ml(tmp_path, resourceconfig={"current_host": "algo-1", "hosts": ["algo-1"]}, hyperparameters={},
                  inputdataconfig={"fashion": {}, "mmp-code": {}})
    make_archive(root / "input" / "data" / "mmp-code" / "c.tar.gz", {"t/train.py": b""})
    plan = ep.build_plan({"MMP_SM_ROOT": str(root), "MMP_PROCESSES_PER_HOST": "1"}, horovodrun="h", python="p")
    assert plan.argv[-2:] == ["--dataset", "fashion"] and plan.cwd == str(root / "code")


@pytest.mark.horovod
def test_a_failing_train_py_writes_the_reason_and_exits_with_its_status(single_host_job):
    root, env = single_host_job
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"epochs": '"many"',
                                                                               "batch-size": "64"}))
    proc = subprocess.run([sys.executable, "-m", "mmp.runtime.sagemaker_entrypoint"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("horovodrun exited 1")
    assert len(failure) <= 1024
    assert "invalid int value: 'many'" in proc.stdout


# -- SSH between hosts, with real sockets ----------------------------------------------
class BannerServer:
    """A TCP server on 127.0.0.1 that greets like sshd (or stays silent)."""

    def __init__(self, banner: bytes = b"SSH-2.0-OpenSSH_9.6\r\n"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.banner)

    def close(self):
        self.sock.close()


def test_the_leader_waits_until_every_peer_answers_on_ssh():
    server = BannerServer()
    try:
        ep.wait_for_ssh(["algo-2", "algo-3"], port=server.port, timeout=5, interval=0.05,
                        address=lambda host: "127.0.0.1")
    finally:
        server.close()


def test_a_silent_peer_fails_the_leader_naming_it():
    server = BannerServer()  # listens on 127.0.0.1 only; 127.0.0.2 (also loopback) refuses
    try:
        with pytest.raises(ep.EntrypointError, match=r"host\(s\) algo-3 did not answer on SSH port"):
            ep.wait_for_ssh(["algo-2", "algo-3"], port=server.port, timeout=0.3, interval=0.05,
                            address=lambda host: "127.0.0.1" if host == "algo-2" else "127.0.0.2")
    finally:
        server.close()


def test_only_an_ssh_banner_counts_as_answering():
    other = BannerServer(banner=b"HTTP/1.1 400 Bad Request\r\n")
    try:
        assert ep.ssh_answers("127.0.0.1", other.port) is False
    finally:
        other.close()
    assert ep.ssh_answers("127.0.0.1", other.port) is False  # closed


def test_a_worker_stays_up_until_the_leader_is_gone():
    leader = BannerServer()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (ep.wait_for_leader("algo-1", port=leader.port, start_timeout=5,
                                                                  interval=0.05, address=lambda h: "127.0.0.1"),
                                              done.set()), daemon=True)
    worker.start()
    assert not done.wait(0.5)  # the leader still answers: the worker keeps serving
    leader.close()
    assert done.wait(5)


def test_a_worker_whose_leader_never_comes_fails():
    with pytest.raises(ep.EntrypointError, match="algo-1 did not answer"):
        ep.wait_for_leader("algo-1", port=9, start_timeout=0.2, interval=0.05, address=lambda h: "127.0.0.2")


def test_multi_host_without_sshd_in_the_image_is_a_clear_failure(tmp_path):
    root = opt_ml(tmp_path)
    code = ep.main([], {"MMP_SM_ROOT": str(root), "MMP_DATASET": "train", "MMP_SSHD": str(tmp_path / "no-sshd")})
    assert code == 2
    assert "multi-host training needs openssh-server" in (root / "output" / "failure").read_text()
