"""Every object the kubernetes backend builds passes the API server's checks of the pinned Trainer CRDs,
and the checks themselves refuse what the API server refuses."""

from __future__ import annotations

import copy

import pytest
import yaml

from mmp.backends.kubernetes import TRAINER_VERSION
from mmp.backends.kubernetes import objects as o

from . import crd


def shape(multi=True, gpus=4) -> o.RuntimeShape:
    tag = "deps-" + "0123456789abcdef" * 2
    return o.RuntimeShape(image=f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/mmp-training:{tag}", image_tag=tag,
                          gpus=gpus, multi=multi)


def plan(multi=True, **over) -> o.JobPlan:
    s = shape(multi)
    base = dict(
        name=o.trainjob_name("fashion-demo", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"), namespace="mmp",
        runtime=s, run_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0", num_nodes=3 if multi else 1, procs_per_node=4,
        args=("--dataset-path", "/fsx/datasets/fashion", "--output-path", "/fsx/output/e/r", "--dataset", "fashion",
              "--epochs", "3"),
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MMP_RUN_ID": "0f1e"}, deadline_seconds=3600,
        fsx_claim="fsx-claim", service_account="mmp-training", node_selector={"node.kubernetes.io/instance-type": "g5.12xlarge"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        code_configmap="mmp-x-code")
    base.update(over)
    return o.JobPlan(**base)


def test_vendored_crds_are_the_pinned_tag():
    assert crd.crd_tag() == TRAINER_VERSION
    for kind in crd.CRD_FILES:
        assert crd.crd(kind)["spec"]["group"] == o.GROUP
        assert [v["name"] for v in crd.crd(kind)["spec"]["versions"]] == ["v1alpha1"]


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_training_runtime_passes_the_crd(multi, gpus):
    runtime = o.training_runtime(shape(multi, gpus), "mmp")
    assert crd.problems(runtime) == []
    jobs = [j["name"] for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]]
    assert jobs == (["node", "launcher"] if multi else ["launcher"])
    assert len(runtime["metadata"]["name"]) <= 63


@pytest.mark.parametrize("multi", [True, False])
def test_train_job_passes_the_crd_and_the_webhook(multi):
    p = plan(multi)
    job = o.train_job(p)
    assert crd.problems(job) == []
    assert crd.webhook_problems(job, o.training_runtime(p.runtime, "mmp")) == []
    assert job["spec"]["runtimeRef"]["name"] == p.runtime.name()


def test_runtime_name_follows_image_and_shape():
    assert shape(True).name() != shape(False).name()
    assert shape(True, 4).name() != shape(True, 8).name()
    assert shape(True).name() == shape(True).name()
    assert shape().name().startswith("mmp-deps-0123456789abcdef")


@pytest.mark.parametrize("experiment", ["fashion", "A_Very/Long Experiment Name " * 6, "9-starts-with-digit", "---"])
def test_trainjob_names_fit_jobset_pod_names(experiment):
    name = o.trainjob_name(experiment, "ABCDEF0123456789abcdef0123456789")
    assert len(name) <= o.TRAINJOB_NAME_MAX == 44
    assert crd.problems(o.train_job(plan(name=name))) == []
    assert len(f"{name}-launcher-0-0-abcde") <= 63


def test_code_configmap_limits():
    owner = {"metadata": {"name": "mmp-x", "uid": "1234"}}
    cm = o.code_configmap("mmp-x-code", "mmp", b"\x1f\x8b" * 100, owner)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "1234"
    assert crd.metadata_problems(cm["metadata"]) == []
    with pytest.raises(o.ObjectError, match="MMP_ARTIFACTS_BUCKET"):
        o.code_configmap("mmp-x-code", "mmp", b"x" * (1024 * 1024))


def test_reserved_mpi_env_is_refused():
    with pytest.raises(o.ObjectError, match="OMPI_MCA_plm_rsh_args"):
        o.train_job(plan(env={"OMPI_MCA_plm_rsh_args": "-p 22"}))


# -- the checks refuse what the API server refuses ---------------------------------------
def _mutated(obj, path, value):
    obj = copy.deepcopy(obj)
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return obj


@pytest.mark.parametrize("path,value,expected", [
    (("spec", "trainer", "numProcsPerNode"), 2, 'unknown field "numProcsPerNode"'),
    (("spec", "trainer", "numNodes"), "3", "must be of type integer"),
    (("spec", "trainer", "numNodes"), 2 ** 31, "out of range for int32"),
    (("spec", "runtimeRef"), KeyError, "spec.runtimeRef: Required value"),
    (("spec", "activeDeadlineSeconds"), 0, "greater than or equal to 1"),
    (("spec", "managedBy"), "someone-else", "ManagedBy must be"),
    (("metadata", "name"), "Bad_Name", "RFC 1123 subdomain"),
    (("metadata", "name"), "a.b", "RFC 1035 DNS label"),
    (("metadata", "name"), "a" * 64, "no more than 63"),
    (("metadata", "labels"), {"mmp/run-id": "x" * 64}, "label value"),
    (("metadata", "labels"), {"-bad": "x"}, "name part"),
    (("metadata", "nme"), "x", 'metadata: unknown field "nme"'),
])
def test_train_job_checks_refuse(path, value, expected):
    bad = _mutated(o.train_job(plan()), path, value)
    found = crd.problems(bad)
    assert any(expected in p for p in found), found


def test_list_map_keys_are_checked():
    job = o.train_job(plan())
    job["spec"]["trainer"]["env"].append(dict(job["spec"]["trainer"]["env"][0]))
    assert any("Duplicate value" in p and "spec.trainer.env[2]" in p for p in crd.problems(job))
    job = o.train_job(plan())
    job["spec"]["runtimePatches"].append({"trainingRuntimeSpec": {}})
    assert any("Required value: list-map key manager" in p for p in crd.problems(job))


def test_runtime_cel_rules_run():
    runtime = o.training_runtime(shape(), "mmp")
    runtime["spec"]["mlPolicy"]["torch"] = {}
    assert any("Only one of the policy can be configured" in p for p in crd.problems(runtime))
    runtime = o.training_runtime(shape(), "mmp")
    runtime["spec"]["mlPolicy"]["mpi"]["mpiImplementation"] = "MPICH"
    assert any("Unsupported value: 'MPICH'" in p for p in crd.problems(runtime))
    runtime = o.training_runtime(shape(), "mmp")
    runtime["spec"]["template"]["spec"]["startupPolicy"] = {"startupPolicyOrder": "InOrder"}
    assert any("mutually exclusive" in p for p in crd.problems(runtime))


def test_webhook_checks_refuse():
    p = plan(multi=False)
    job = o.train_job(p)
    assert crd.webhook_problems(job, None)
    multi_job = o.train_job(plan(multi=True))
    single_runtime = o.training_runtime(p.runtime, "mmp")
    assert any("replicated job that doesn't exist" in e for e in crd.webhook_problems(multi_job, single_runtime))
    job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    assert any("must not have envs" in e for e in crd.webhook_problems(job, single_runtime))


def test_objects_survive_a_yaml_round_trip():
    """What kubectl would apply: the objects as YAML parse back to the same thing."""
    for obj in (o.train_job(plan()), o.training_runtime(shape(), "mmp")):
        assert yaml.safe_load(yaml.safe_dump(obj)) == obj
