"""Configuration, preflight checks, slots, image lookup and placement-group checks."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from mmp import aws
from mmp.backends import BackendError, get_backend
from mmp.backends.dlami import DEFAULT_SSM_PARAMETER, DlamiBackend, DlamiConfig
from mmp.contract.datasets import Dataset
from mmp.contract.experiment import parse_experiment


def _experiment(**fields):
    data = {"Platform": "dlami", "Dataset_Name": "digits", "Training_Instance": "p3.8xlarge"}
    data.update(fields)
    return parse_experiment(data)


def test_registry_builds_it_lazily_and_config_defaults():
    backend = get_backend("dlami", config=DlamiConfig())
    assert isinstance(backend, DlamiBackend)
    cfg = DlamiConfig.from_env({})
    assert cfg.ssm_parameter == DEFAULT_SSM_PARAMETER and cfg.ssh_user == "ubuntu" and cfg.ssh_port == 22
    assert (cfg.dataset_root, cfg.output_root) == ("/fsx/datasets", "/fsx/output")
    cfg = DlamiConfig.from_env({"MMP_SUBNET_IDS": "subnet-a, subnet-b", "MMP_DLAMI_INSTALL_REQUIREMENTS": "no"})
    assert cfg.subnet_ids == ("subnet-a", "subnet-b") and cfg.install_requirements is False
    with pytest.raises(BackendError, match="MMP_SSH_PORT must be a number, got 'twenty-two'"):
        DlamiConfig.from_env({"MMP_SSH_PORT": "twenty-two"})


def test_module_import_stays_light():
    import subprocess
    import sys

    code = "import sys, mmp.backends.dlami, mmp.backends.dlami_janitor; print(sorted({'paramiko', 'boto3', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_check_names_each_problem_before_any_api_call():
    backend = DlamiBackend(DlamiConfig.from_env({}), clients=lambda svc: pytest.fail("no API call in check"))
    problems = backend.check(_experiment(Training_Instance="ml.p3.16xlarge"), Dataset("digits"))
    text = "\n".join(problems)
    assert "Training_Instance: 'ml.p3.16xlarge' is a SageMaker type" in text and "'p3.16xlarge'" in text
    for var in ("MMP_LAUNCH_TEMPLATE_ID", "MMP_SUBNET_IDS", "MMP_SSH_KEY_SECRET_ARN", "MMP_FSX_DNS_NAME"):
        assert var in text
    assert backend.check(_experiment(Training_Instance="local"), Dataset("digits"))[0].startswith(
        "Training_Instance: 'local' is not an EC2 instance type")


def test_paths_follow_the_design():
    from mmp.backends import LaunchRequest

    backend = DlamiBackend(DlamiConfig())
    request = LaunchRequest(experiment=_experiment(), experiment_name="fashion", run_id="abc123", repository="o/r",
                            clone_url="https://github.com/o/r.git", commit="f" * 40, mlflow_env={},
                            dataset=Dataset("fashion"))
    paths = backend.paths(request)
    assert (paths.dataset, paths.output) == ("/fsx/datasets/fashion", "/fsx/output/fashion/abc123")


def test_slots_from_the_table_then_describe_instance_types(aws_env):
    backend = DlamiBackend(DlamiConfig())
    assert [backend.slots(t) for t in ("p3.2xlarge", "p3.8xlarge", "p3.16xlarge", "p4d.24xlarge", "g5.12xlarge",
                                        "g5.xlarge")] == [1, 4, 8, 8, 4, 1]
    assert backend.slots("g6e.12xlarge") == 4  # not in the table: DescribeInstanceTypes on moto
    assert backend.slots("c5.xlarge") == 1  # no GPU: one rank
    with pytest.raises(BackendError, match="'p9.mega' is not a known EC2 instance type"):
        backend.slots("p9.mega")


def test_image_from_ssm_or_configured_id(aws_env):
    aws.client("ssm").put_parameter(Name="/mmp/dlami/ami", Value="ami-0abc", Type="String")
    assert DlamiBackend(DlamiConfig(ssm_parameter="/mmp/dlami/ami")).image_id() == "ami-0abc"
    assert DlamiBackend(DlamiConfig(ami_id="ami-0fixed", ssm_parameter="/nope")).image_id() == "ami-0fixed"
    with pytest.raises(BackendError, match="could not read the DLAMI image from SSM /nope"):
        DlamiBackend(DlamiConfig(ssm_parameter="/nope")).image_id()


def test_private_key_from_ssm_secure_string(aws_env, sshd):
    aws.client("ssm").put_parameter(Name="/mmp/ssh-key", Value=sshd.client_private, Type="SecureString")
    key = DlamiBackend(DlamiConfig(ssh_key_ssm_parameter="/mmp/ssh-key"))._private_key()
    assert f"{key.get_name()} {key.get_base64()}" == sshd.client_public


def test_private_key_from_the_variable_the_platform_fills_before_any_secret(sshd):
    """The runner task gets the key's text in MMP_DLAMI_SSH_KEY (ECS `secrets`): no AWS call,
    and the text stays out of the config's repr and out of the error for a bad key."""
    env = {"MMP_DLAMI_SSH_KEY": sshd.client_private + "\n", "MMP_SSH_KEY_SECRET_ARN": "arn:aws:secretsmanager:x"}
    cfg = DlamiConfig.from_env(env)
    key = DlamiBackend(cfg, clients=lambda svc: pytest.fail("no API call"))._private_key()
    assert f"{key.get_name()} {key.get_base64()}" == sshd.client_public
    body = sshd.client_private.splitlines()[3]
    assert body not in repr(cfg) and body not in str(cfg)
    assert not any("SSH private key" in p for p in DlamiConfig.from_env({"MMP_DLAMI_SSH_KEY": "x"}).problems())
    assert any("MMP_DLAMI_SSH_KEY" in p for p in DlamiConfig.from_env({}).problems())
    damaged = sshd.client_private.replace(body, body[::-1])
    with pytest.raises(Exception) as caught:
        DlamiBackend(DlamiConfig.from_env({"MMP_DLAMI_SSH_KEY": damaged}))._private_key()
    assert "not an ed25519, ECDSA or RSA private key" in str(caught.value)
    assert body[::-1] not in str(caught.value) and caught.value.__cause__ is None


@pytest.mark.parametrize("groups, error", [
    ([{"GroupName": "pg", "Strategy": "cluster", "State": "available"}], None),
    ([{"GroupName": "pg", "Strategy": "spread", "State": "available"}], "strategy 'spread'; want 'cluster'"),
    ([{"GroupName": "pg", "Strategy": "cluster", "State": "deleting"}], "is deleting, not available"),
    ([], "does not exist"),
])
def test_placement_group_is_verified(groups, error):
    ec2 = boto3.client("ec2", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(ec2) as stub:
        stub.add_response("describe_placement_groups", {"PlacementGroups": groups}, {"GroupNames": ["pg"]})
        backend = DlamiBackend(DlamiConfig(placement_group="pg"))
        if error is None:
            backend.verify_placement_group(ec2)
        else:
            with pytest.raises(BackendError, match=error):
                backend.verify_placement_group(ec2)
        stub.assert_no_pending_responses()


def test_the_output_tail_drops_the_oldest_lines_and_its_cursors_count_every_line():
    from mmp.backends.base import OutputTail

    tail = OutputTail(keep_lines=3, keep_chars=1000)
    for i in range(5):
        tail.append(f"line {i}")
    assert tail.lines() == ["line 2", "line 3", "line 4"] and tail.total == 5
    assert tail.since(0) == (["line 2", "line 3", "line 4"], 5)  # what was dropped is gone, not repeated
    assert tail.since(4) == (["line 4"], 5) and tail.since(5) == ([], 5)
    small = OutputTail(keep_lines=100, keep_chars=10)
    for text in ("aaaa", "bbbb", "cccc"):
        small.append(text)
    assert small.lines() == ["bbbb", "cccc"] and small.chars == 8
