"""A `Platform: dlami` push and a promote.json push through the state machine to Conclude.

The RunTraining/Promote states' `ecs:runTask.sync` runs the runner's entry command
(`python -m mmp.pipeline.aws_runner ...`) in this process with the overrides the
definition builds: the DLAMI backend against moto's EC2 (server mode), the real
sshd standing in for the instances (pinned host key) and real horovodrun, as
tests/dlami do. The runner leaves its result object in S3 (moto) for Conclude.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest

from mmp import aws
from mmp.pipeline import aws_stages, runner_results
from mmp.backends.ssh import generate_ed25519

from ..conftest import IAM_DIR
from ..dlami.conftest import FAIL_TRAIN, SLEEP_TRAIN, tagged_processes

# The AWS CLI on the "leader" (the instance profile's job there): `s3 cp URI -` for the commit's
# archive Prepare staged, `s3 sync DIR URI` for the output, both against moto.
AWS_CLI = """#!{python}
# The AWS CLI on the instance (its instance profile gives the credentials): `aws s3 cp URI -`
# and `aws s3 sync DIR URI`, against moto, its calls checked as the DLAMI host role's.
import sys
sys.path.insert(0, {iam_dir!r})
import aws_cli
aws_cli.main({endpoint!r})
"""
from ..infra.pipeline_stack import OK_TRAIN, TOKEN, experiment, head, job
from ..infra.sfn import TaskFailed

pytestmark = pytest.mark.horovod
DLAMI_PATH = ["Prepare", "NeedsRunner?", "RunnerImage", "Promote?", "Accepted?", "BuildImage", "Train where?",
              "RunTraining", "Conclude", "Succeeded?"]


@pytest.fixture
def dlami_push(cloud, stack, make_backend, make_repo, fsx_datasets, aws_env, tmp_path, monkeypatch, sshd):
    """Commit a dlami experiment; the backend every stage asks for is the one on the local sshd,
    whose `aws s3 sync` of the output (the instance profile's job) reaches moto. The runner has
    the SSH key as deployed: ECS puts its text in MMP_DLAMI_SSH_KEY (the task role cannot read it)."""
    monkeypatch.setenv("MMP_DLAMI_SSH_KEY", sshd.client_private)
    cli = tmp_path / "aws"
    cli.write_text(AWS_CLI.format(python=os.environ["MMP_DLAMI_PYTHON"], endpoint=aws_env, iam_dir=str(IAM_DIR)))
    cli.chmod(0o755)
    monkeypatch.setenv("MMP_DLAMI_AWS_CLI", str(cli))
    aws_stages._BACKENDS["dlami"] = make_backend()

    def push(train: str = OK_TRAIN, **fields):
        repo = make_repo(experiment=experiment(Platform="dlami", Training_Instance="p3.2xlarge", **fields),
                         files={"train.py": train})
        sha = head(repo)
        stack.serve(repo, sha)
        return job(repo, sha)

    return push


def _live(cloud) -> list[str]:
    return [i["InstanceId"] for i in cloud.instances()]


def test_a_dlami_push_trains_on_the_runner_and_concludes(cloud, stack, dlami_push, monkeypatch):
    start = dlami_push()
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == DLAMI_PATH + ["Done"], run.path
    # the runner's image, then the training image the hosts run (its dependency set was not in ECR yet)
    assert [b["ProjectName"] for b in stack.builds] == ["mmp-runner-image", "mmp-image"]
    assert state["started"]["request"]["code_uri"].startswith("s3://")  # the hosts unpack Prepare's archive

    # The runner got only the job and the run, nothing secret, and a bound of Max_Runtime + grace.
    override = dict(run.calls)["RunTraining"]["Overrides"]["ContainerOverrides"][0]
    assert override["Command"] == ["train"]
    passed = json.loads(override["Environment"][0]["Value"])
    assert set(passed) == {runner_results.HANDOFF_KEY} and TOKEN not in override["Environment"][0]["Value"]
    handed = runner_results.taken_over(passed)  # Prepare's hand-off in S3: the job and the run
    assert handed["job"] == state["job"] and handed["started"] == state["started"]
    assert TOKEN not in json.dumps(handed)
    assert run.timeouts["RunTraining"] == 240 * 60 + aws_stages.RUNNER_GRACE_SECONDS

    run_id = state["started"]["run_id"]
    result, log_text = runner_results.read("train", state)
    assert result["state"] == "SUCCEEDED" and result["run_id"] == run_id and result["exit_code"] == 0
    assert "epoch 1 loss 0.5" in log_text  # train.py's output, through horovodrun on the "leader"
    assert state["outcome"]["state"] == "SUCCEEDED" and state["succeeded"] is True
    assert stack.mlflow_run(run_id)["info"]["status"] == "FINISHED"
    assert [s["state"] for s in stack.statuses] == ["pending", "success"]
    assert "SUCCEEDED" in stack.messages()[0]["Subject"]
    assert _live(cloud) == [] and tagged_processes(run_id) == []


def test_a_dlami_experiment_with_large_hyperparameters_starts_the_runner_within_ecss_overrides_limit(
        cloud, stack, dlami_push, monkeypatch):
    """Issue 19, defect 12: ECS refuses RunTask when the overrides pass 8,192 characters, JSON
    included; ~6.5 KB of hyperparameters used to travel in them. Now only the state's key does."""
    hyperparameters = {f"layer-{i:02d}-width": "x" * 60 for i in range(90)}  # the 100-name limit allows it
    assert len(json.dumps(hyperparameters)) > 6500
    start = dlami_push(Hyperparameters=hyperparameters)
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == DLAMI_PATH + ["Done"], run.path
    overrides = dict(run.calls)["RunTraining"]["Overrides"]
    assert len(json.dumps(overrides, separators=(",", ":"))) < runner_results.ECS_OVERRIDES_LIMIT / 8
    result, log_text = runner_results.read("train", state)
    assert result["state"] == "SUCCEEDED"
    assert "layer-89-width" in log_text  # train.py got every hyperparameter
    assert _live(cloud) == []


def test_the_runner_takes_the_ssh_key_from_the_variable_ecs_fills(cloud, sshd, stack, dlami_push, make_backend,
                                                                 monkeypatch, caplog, capfd, tmp_path):
    """The task definition's `secrets` has ECS put the key's text in MMP_DLAMI_SSH_KEY; the runner
    connects with it, reading no secret itself (the task role has no read of the key), and the
    key reaches no log line, result, state or file."""
    caplog.set_level(logging.DEBUG)  # paramiko's and mmp's loggers included
    monkeypatch.setenv("MMP_DLAMI_SSH_KEY", sshd.client_private)
    # The ARN stays in the shared environment, as deployed; a read of it now fails, like the task role's would.
    aws.client("secretsmanager").delete_secret(SecretId=cloud.key_secret_arn, ForceDeleteWithoutRecovery=True)
    start = dlami_push()
    aws_stages._BACKENDS["dlami"] = make_backend()  # the runner builds its backend from its environment
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed", state.get("outcome")
    result, log_text = runner_results.read("train", state)
    assert result["state"] == "SUCCEEDED" and "epoch 1 loss 0.5" in log_text

    captured = capfd.readouterr()
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    seen = "\n".join([caplog.text, captured.out, captured.err, log_text, json.dumps(state), json.dumps(result),
                      json.dumps(run.calls, default=str), *written])
    # Every line of the key text but those any ed25519 key shares (armour, format header).
    common = set(generate_ed25519()[0].splitlines())
    own = [line for line in sshd.client_private.splitlines() if line not in common]
    assert len(own) >= 3 and not [line for line in own if line in seen]


def test_a_failing_train_py_is_reported_and_leaves_nothing(cloud, stack, dlami_push, monkeypatch):
    start = dlami_push(train=FAIL_TRAIN)
    end, state = stack.execution(monkeypatch).run(start)
    assert end == "Fail"
    assert state["outcome"]["state"] == "FAILED" and "exit" in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert [s["state"] for s in stack.statuses] == ["pending", "failure"]
    assert _live(cloud) == []


def test_a_stopped_runner_cancels_training_and_terminates_its_instances(cloud, stack, dlami_push, monkeypatch):
    """Step Functions stops the task (state timeout, abort): ECS sends SIGTERM."""
    start = dlami_push(train=SLEEP_TRAIN)
    stop = threading.Event()

    def sigterm_once_training():
        deadline = time.time() + 120
        while not stop.is_set() and time.time() < deadline:
            ids = [t["Value"] for i in cloud.instances() for t in i.get("Tags", []) if t["Key"] == "mmp:run-id"]
            if ids and tagged_processes(ids[0]):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=sigterm_once_training, daemon=True)
    killer.start()
    try:
        end, state = stack.execution(monkeypatch).run(start)
    finally:
        stop.set()
        killer.join(10)
    run_id = state["started"]["run_id"]
    result, _ = runner_results.read("train", state)
    assert result["state"] == "CANCELLED" and "runner task was stopped" in result["message"]
    assert "error" in state  # the task failed (SIGTERM exit) and was caught into Conclude
    assert state["outcome"]["state"] == "CANCELLED"
    assert stack.mlflow_run(run_id)["info"]["status"] == "KILLED"
    assert [s["state"] for s in stack.statuses] == ["pending", "error"]
    assert _live(cloud) == [] and tagged_processes(run_id) == []


def test_a_runner_that_dies_without_a_result_still_leaves_no_instance(cloud, stack, dlami_push, monkeypatch):
    """SIGKILL, a lost container: no result object; Conclude terminates what is tagged with the run."""
    start = dlami_push()

    def dies_mid_provisioning(arguments, data):
        run_id = data["started"]["run_id"]
        aws.client("ec2").run_instances(ImageId=cloud.image_id, MinCount=2, MaxCount=2, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "mmp:managed", "Value": "true"},
                                                  {"Key": "mmp:run-id", "Value": run_id}]}])
        assert len(_live(cloud)) == 2
        raise TaskFailed("States.TaskFailed", "Essential container in task exited (137)")

    run = stack.execution(monkeypatch, **{"arn:aws:states:::ecs:runTask.sync": dies_mid_provisioning})
    end, state = run.run(start)
    assert end == "Fail" and run.path == DLAMI_PATH + ["Failed"]
    assert state["outcome"]["state"] == "FAILED"
    assert "ended without a result" in state["outcome"]["message"] and "exited (137)" in state["outcome"]["message"]
    assert stack.mlflow_run(state["started"]["run_id"])["info"]["status"] == "FAILED"
    assert _live(cloud) == []


PROMOTE_PATH = ["Prepare", "NeedsRunner?", "RunnerImage", "Promote?", "Promote", "Accepted?", "Conclude",
                "Succeeded?"]


def _promote_push(stack, make_repo, spec: dict):
    repo = make_repo(experiment=experiment(), files={"train.py": OK_TRAIN, "promote.json": json.dumps(spec)})
    sha = head(repo)
    stack.serve(repo, sha)
    return job(repo, sha, files=("promote.json",))


def test_a_promote_json_push_is_run_by_the_runner_with_the_mlflow_client(stack, make_repo, monkeypatch):
    start = _promote_push(stack, make_repo, {"Experiment": "no-such-experiment", "Metric": "val_accuracy"})
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert run.path == PROMOTE_PATH + ["Failed"], run.path
    override = dict(run.calls)["Promote"]["Overrides"]["ContainerOverrides"][0]
    passed = json.loads(override["Environment"][0]["Value"])
    assert override["Command"] == ["promote"] and set(passed) == {runner_results.HANDOFF_KEY}
    assert set(runner_results.taken_over(passed)) == {"job"}
    # The runner asked the real MLflow, refused (no such experiment) and said so on mmp/promotion.
    assert state["promotion"]["state"] == "REFUSED" and "no-such-experiment" in state["promotion"]["message"]
    assert [(s["state"], s["context"]) for s in stack.statuses] == [("pending", "mmp/promotion"),
                                                                     ("failure", "mmp/promotion")]
    assert len(stack.messages()) == 1  # the runner's e-mail; Conclude adds none


def test_a_promotion_whose_runner_dies_is_reported_by_conclude(stack, make_repo, monkeypatch):
    start = _promote_push(stack, make_repo, {"Experiment": "fashion-demo", "Metric": "val_accuracy"})

    def dies(arguments, data):
        raise TaskFailed("States.Timeout", "")

    run = stack.execution(monkeypatch, **{"arn:aws:states:::ecs:runTask.sync": dies})
    end, state = run.run(start)
    assert end == "Fail" and run.path == PROMOTE_PATH + ["Failed"]
    assert state["promotion"]["state"] == "ERROR" and "States.Timeout" in state["promotion"]["message"]
    assert [(s["state"], s["context"]) for s in stack.statuses] == [("error", "mmp/promotion")]
    assert "promotion ERROR" in stack.messages()[0]["Subject"]


# -- a Tuning block: the study runs in the runner task ------------------------------------
STUDY_PATH = ["Prepare", "NeedsRunner?", "RunnerImage", "Promote?", "Accepted?", "BuildImage", "Train where?",
              "RunStudy", "Conclude", "Succeeded?"]
# Each trial's rank 0 logs the objective into the trial's run (MLFLOW_RUN_ID), as a real train.py would.
SCORE_TRAIN = """\
import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--shift", type=float)
a, _ = p.parse_known_args()
print("train.py: shift", a.shift, flush=True)
if os.environ.get("HOROVOD_RANK", "0") == "0":
    import mlflow
    with mlflow.start_run():
        mlflow.log_metric("score", -abs(a.shift - 0.3), step=0)
"""
STUDY = {"Objective_Metric": "score", "Direction": "maximize", "Strategy": "grid", "Parallel": 1,
         "Ranges": {"shift": {"Values": [0.2, 0.6]}}}


def _study_runs(stack, parent_id: str) -> list[dict]:
    """The trial runs of a study, from the MLflow server's REST API."""
    import urllib.request

    parent = stack.mlflow_run(parent_id)
    body = json.dumps({"experiment_ids": [parent["info"]["experiment_id"]],
                       "filter": f"tags.mlflow.parentRunId = '{parent_id}'"}).encode()
    req = urllib.request.Request(f"{stack.mlflow}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read()).get("runs", [])


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_a_study_runs_in_the_runner_task_and_resumes_when_the_task_dies(cloud, stack, dlami_push, monkeypatch):
    """The runner dies (a crash: exit 1) after the first trial; RunStudy starts it again and the
    study resumes from its journal in S3: the finished trial is not run again, the second runs."""
    from mmp.tuning.study import StudyRunner

    monkeypatch.setenv("MMP_STUDY_POLL_SECONDS", "0.2")
    start = dlami_push(train=SCORE_TRAIN, Tuning=STUDY, Hyperparameters="{'epochs': '1'}")
    original, calls = StudyRunner._report_progress, []

    def crash_after_the_first_trial(self, study):
        original(self, study)
        calls.append(len(self._counts(study)))
        if len(calls) == 2:  # the first attempt: "0/2", then "1/2 trials" after trial 0 ended
            raise RuntimeError("the runner task's container died")

    monkeypatch.setattr(StudyRunner, "_report_progress", crash_after_the_first_trial)
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Succeed" and run.path == STUDY_PATH + ["Done"], (run.path, state.get("outcome"))
    assert run.retries == {"RunStudy": 1}
    override = dict(run.calls)["RunStudy"]["Overrides"]["ContainerOverrides"][0]
    assert override["Command"] == ["study"]
    passed = json.loads(override["Environment"][0]["Value"])
    assert set(passed) == {runner_results.HANDOFF_KEY}
    assert set(runner_results.taken_over(passed)) == {"job", "image"}  # never a secret, no run
    assert "started" not in state  # Prepare made no MLflow run: the study makes its parent and trials

    result, _ = runner_results.read("study", state)
    assert result["state"] == "SUCCEEDED" and state["outcome"] == result and state["succeeded"] is True
    parent = stack.mlflow_run(result["run_id"])
    assert parent["info"]["status"] == "FINISHED" and _tags(parent)["mmp.study"] == "true"
    assert json.loads(_tags(parent)["mmp.tuning.best_params"]) == {"shift": 0.2}
    trials = _study_runs(stack, result["run_id"])
    # exactly one run per grid point: the trial that finished before the crash was not run again
    shifts = sorted(float({p["key"]: p["value"] for p in t["data"]["params"]}["shift"]) for t in trials)
    assert shifts == [0.2, 0.6], shifts
    assert {t["info"]["status"] for t in trials} == {"FINISHED"}
    assert {_tags(t)["mmp.trial.state"] for t in trials} == {"complete"}
    journal = aws.client("s3").list_objects_v2(Bucket="mmp-artifacts", Prefix=f"runner/study/{start['delivery_id']}/journal/")
    assert journal["KeyCount"] > 0
    # the pipeline recorded the parent and each trial it made (promotion counts only those: issue 20.7)
    recorded = aws.s3_keys(aws.client("s3"), "mmp-artifacts", "pipeline-runs/")
    assert {f"pipeline-runs/{r['info']['run_id']}" for r in [parent, *trials]} <= set(recorded)
    states = [s["state"] for s in stack.statuses]
    assert states[0] == "pending" and states[-1] == "success" and "failure" not in states
    assert any("1/2 trials" in s["description"] for s in stack.statuses)
    assert _live(cloud) == []


def test_a_study_whose_runner_keeps_dying_is_ended_by_conclude_with_nothing_left(cloud, stack, dlami_push,
                                                                                 monkeypatch):
    """Each attempt dies while a trial's machines run. The next attempt tears the interrupted trial
    down from the handle in the journal (no local job store on AWS) and replaces it; after the last
    retry Conclude stops the trial progress.json names, ends every run and reports."""
    from mmp.backends import JobHandle
    from mmp.tuning.study import StudyRunner

    monkeypatch.setenv("MMP_STUDY_POLL_SECONDS", "0.2")
    start = dlami_push(train=SCORE_TRAIN, Tuning=STUDY, Hyperparameters="{'epochs': '1'}")

    def provisions_and_hangs(self, tr):  # the trial's job: tagged machines, launched, never ending here
        run_id = tr.started.run_id
        aws.client("ec2").run_instances(  # as the backend launches: through the stack's launch template
            ImageId=cloud.image_id, MinCount=1, MaxCount=1,
            LaunchTemplate={"LaunchTemplateId": cloud.launch_template_id}, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "mmp:managed", "Value": "true"},
                                                  {"Key": "mmp:run-id", "Value": run_id}]}])
        self._on_launch(run_id, JobHandle(platform="dlami", job_id=run_id))

    original = StudyRunner._record_handles

    def dies_once_recorded(self):
        original(self)
        if self._recorded:
            assert len(_live(cloud)) == 1  # the interrupted trial's machine went before this one came
            raise RuntimeError("the runner task's container died")

    monkeypatch.setattr(StudyRunner, "_follow", provisions_and_hangs)
    monkeypatch.setattr(StudyRunner, "_record_handles", dies_once_recorded)
    run = stack.execution(monkeypatch)
    end, state = run.run(start)
    assert end == "Fail" and run.path == STUDY_PATH + ["Failed"], run.path
    assert run.retries == {"RunStudy": 2}
    assert state["outcome"]["state"] == "FAILED" and "study did not complete" in state["outcome"]["message"]
    assert "exited (1)" in state["outcome"]["message"]
    assert _live(cloud) == []
    parent_id = state["outcome"]["run_id"]
    assert stack.mlflow_run(parent_id)["info"]["status"] == "FAILED"
    trials = _study_runs(stack, parent_id)
    assert len(trials) == 3  # one per attempt
    assert {t["info"]["status"] for t in trials} == {"FAILED"}
    assert {_tags(t)["mmp.trial.state"] for t in trials} == {"failed"}
    # An interrupted trial's parameters go back in the queue, behind the grid points still waiting:
    # 0.2 (interrupted), 0.6 (interrupted), then 0.2 again.
    assert [p["value"] for t in sorted(trials, key=lambda t: int(_tags(t)["mmp.trial.number"]))
            for p in t["data"]["params"] if p["key"] == "shift"] == ["0.2", "0.6", "0.2"]
    assert stack.statuses[-1]["state"] == "failure" and "study did not complete" in stack.statuses[-1]["description"]
    assert "FAILED" in stack.messages()[-1]["Subject"]


def test_the_runners_promotion_refuses_a_run_the_pipeline_did_not_record(stack, make_repo, monkeypatch):
    """Issue 20.7 on AWS: Prepare records the run it made (s3://<artifacts>/pipeline-runs/<id>); a better
    run any train.py forged in the experiment, tagged as its repository, is skipped by the runner's promotion."""
    import uuid

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from ..infra.pipeline_stack import BUCKET

    name = f"record-{uuid.uuid4().hex[:8]}"
    spec = {"Experiment": name, "Metric": "val_accuracy"}
    repo = make_repo(experiment=experiment(Experiment_Name=name),
                     files={"train.py": OK_TRAIN, "promote.json": json.dumps(spec)})
    sha = head(repo)
    stack.serve(repo, sha)
    end, state = stack.execution(monkeypatch).run(job(repo, sha))
    assert end == "Succeed", state.get("outcome")
    made = state["started"]["run_id"]
    listed = aws.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="pipeline-runs/")["Contents"]
    assert [o["Key"] for o in listed] == [f"pipeline-runs/{made}"]

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name(name)
    forged = client.create_run(exp.experiment_id, tags=client.get_run(made).data.tags).info.run_id
    now = int(time.time() * 1000)
    for run_id, value in ((made, 0.5), (forged, 0.99)):  # each with a READY model, the forgery better
        client.log_batch(run_id, metrics=[Metric("val_accuracy", value, now, 0)])
        model = client.create_logged_model(exp.experiment_id, name="model", source_run_id=run_id)
        client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(forged, "FINISHED")

    end, state = stack.execution(monkeypatch).run(job(repo, sha, files=("promote.json",)))
    assert state["promotion"]["state"] == "SUCCEEDED", state["promotion"]
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == made

    aws.client("s3").delete_object(Bucket=BUCKET, Key=f"pipeline-runs/{made}")  # now neither is recorded
    end, state = stack.execution(monkeypatch).run(job(repo, sha, files=("promote.json",)))
    assert state["promotion"]["state"] == "REFUSED", state["promotion"]
    assert f"not created by it: {forged}" in state["promotion"]["message"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
