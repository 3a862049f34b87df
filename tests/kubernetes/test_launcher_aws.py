"""The kubernetes launcher's AWS steps against moto, each call judged as the training pods' role.

On EKS the launcher pod runs as the training service account, whose Pod Identity role the Pulumi
component makes (mmp.infra.kubernetes: `kubernetes-training`, rendered by tests/iam_enforce). Its AWS
calls: the commit's archive Prepare staged (S3 download), the MLflow password it checks before training
(Secrets Manager), and the output copy (S3 upload); each rank reads the password itself (mmp.runtime.rank).
Real horovodrun, one rank here (the two-rank run over sshd is tests/kubernetes/test_launcher.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmp.runtime import kubernetes_launcher as kl

from ..conftest import ACCOUNT, REGION, ROOT, create_bucket
from .test_launcher import TRAIN, archive

HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
LAUNCHER = "Kubernetes training pod (launcher)"
RANK_AS = "Kubernetes training pod (rank)=kubernetes-training"
BUCKET = "mmp-artifacts"
CODE_KEY = "code/acme/fashion/0123abc.tar.gz"


@pytest.fixture
def staged(aws_env, iam_enforced):
    """Prepare's code archive in the artifacts bucket and the MLflow password secret, bound to the stack's names."""
    from mmp import aws

    s3 = aws.client("s3")
    create_bucket(s3, BUCKET)
    s3.put_object(Bucket=BUCKET, Key=CODE_KEY, Body=archive({"train.py": TRAIN}))
    arn = aws.client("secretsmanager").create_secret(Name="mlflow-pw-k8s", SecretString="k8s-pw-xyz")["ARN"]
    iam_enforced.bind({f"arn:aws:s3:::{BUCKET}": "arn:aws:s3:::ARTIFACTS",
                       arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:MLFLOW_PASSWORD"})
    return s3, arn


def launch(tmp_path: Path, arn: str, output_s3: str) -> tuple[int, Path]:
    (tmp_path / "hostfile").write_text("job-launcher-0-0.job slots=1\n")  # Instance_Count 1: the launcher alone
    output = tmp_path / "fsx" / "output" / "e" / "r"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MMP_"))}
    environ.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MMP_RUN_ID": "r",
        "MMP_CODE_URI": f"s3://{BUCKET}/{CODE_KEY}", "MMP_WORK_DIR": str(tmp_path / "fsx" / "mmp" / "e" / "r"),
        "MMP_HOSTFILE": str(tmp_path / "hostfile"), "MMP_HOSTNAME": "job-launcher-0-0.job",
        "MMP_TERMINATION_LOG": str(tmp_path / "termination-log"), "MMP_HOROVODRUN": HOROVODRUN,
        "MMP_PYTHON": sys.executable, "MMP_OUTPUT_S3": output_s3, "MMP_MLFLOW_PASSWORD_SECRET_ARN": arn})
    rc = kl.main(["--dataset-path", "/fsx/datasets/digits", "--output-path", str(output), "--dataset", "digits",
                  "--epochs", "1"], environ)
    return rc, output


@pytest.mark.horovod
def test_the_launchers_aws_calls_are_the_training_roles(tmp_path, staged, iam_enforced):
    s3, arn = staged
    rc, output = launch(tmp_path, arn, f"s3://{BUCKET}/output/e/r/")
    log = tmp_path / "termination-log"
    assert rc == 0, log.read_text() if log.exists() else rc
    assert (tmp_path / "fsx" / "mmp" / "e" / "r" / "code" / "train.py").is_file()  # from S3, onto "FSx"
    assert (output / "model.txt").read_text() == "ok"
    assert s3.get_object(Bucket=BUCKET, Key="output/e/r/model.txt")["Body"].read() == b"ok"  # the output copy
    calls = [c for c in iam_enforced.calls() if c.code_path == LAUNCHER]
    assert {c.role for c in calls} == {"kubernetes-training"} and all(c.allowed for c in calls)
    assert {c.action for c in calls} == {"s3:GetObject", "secretsmanager:GetSecretValue", "s3:PutObject"}
    assert {c.resource for c in calls if c.action == "s3:PutObject"} == {"arn:aws:s3:::ARTIFACTS/output/e/r/model.txt"}


@pytest.mark.horovod
def test_an_output_copy_the_role_does_not_grant_fails_the_run_with_a_reason(tmp_path, staged, iam_enforced):
    """A bucket outside the stack: the role is refused (as AWS would), and the launcher says so in the
    termination log the backend reports, after training succeeded."""
    from mmp import aws

    s3, arn = staged
    create_bucket(s3, "someone-elses-bucket")
    iam_enforced.expect_denied("s3:PutObject")
    rc, _ = launch(tmp_path, arn, "s3://someone-elses-bucket/out/")
    assert rc == 1
    text = (tmp_path / "termination-log").read_text()
    assert text.startswith("training succeeded but copying the output to s3://someone-elses-bucket/out/ failed")
    assert "AccessDenied" in text or "not authorized" in text
    assert aws.client("s3").list_objects_v2(Bucket="someone-elses-bucket")["KeyCount"] == 0


def test_a_rank_reads_the_password_as_the_training_role(tmp_path, staged, iam_enforced):
    """Each rank (`python -m mmp.runtime.rank`) reads the MLflow password itself, as the pod's role."""
    _, arn = staged
    (tmp_path / "t.py").write_text("import os\nprint('password', os.environ.get('MLFLOW_TRACKING_PASSWORD') == 'k8s-pw-xyz')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MMP_"))}
    env.update({**iam_enforced.subprocess_env(RANK_AS), "MMP_MLFLOW_PASSWORD_SECRET_ARN": arn})
    done = subprocess.run([sys.executable, "-m", "mmp.runtime.rank", "t.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "password True" in done.stdout, done.stderr
    rank = [c for c in iam_enforced.calls() if c.code_path == RANK_AS.split("=")[0]]
    assert [(c.role, c.action, c.allowed) for c in rank] == [("kubernetes-training", "secretsmanager:GetSecretValue", True)]
