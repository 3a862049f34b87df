"""SageMaker managed warm pools: a study's trials keep their instances warm for the next trial
(`ResourceConfig.KeepAlivePeriodInSeconds`), successive commits only behind the stack's setting,
and every way a study ends gives the pools back (UpdateTrainingJob, KeepAlivePeriodInSeconds 0).

moto (server mode) takes the requests and keeps what it was sent; it has no warm pools and no
UpdateTrainingJob. Those are answered the way botocore's Stubber answers (a `before-call`
handler, after botocore validated the request against its model; every answer validated against
the output shape) by `WarmPools` below, which follows the lifecycle SageMaker documents ("Train
Using SageMaker Managed Warm Pools": Available after a job ends, Reused when a matching job takes
it, Terminated by UpdateTrainingJob KeepAlivePeriodInSeconds 0). It keeps state, unlike a fixed
Stubber script, because a trial's status polls are not a fixed number.
"""

from __future__ import annotations

import json
import threading

import botocore.session
import pytest
from botocore.awsrequest import AWSResponse
from botocore.stub import Stubber
from botocore.validate import validate_parameters

from mmp import aws
from mmp.backends.base import JobHandle, LaunchRequest
from mmp.backends.sagemaker import SageMakerBackend

from .test_moto_request import capture_requests

MODEL = botocore.session.get_session().get_service_model("sagemaker")
TUNING = {"Objective_Metric": "score", "Direction": "maximize", "Strategy": "grid", "Parallel": 1,
          "Ranges": {"batch-size": {"Values": [16, 32]}}}


def keep_alive(body: dict) -> int | None:
    return body["ResourceConfig"].get("KeepAlivePeriodInSeconds")


# -- the request ----------------------------------------------------------------------------------

def launch_request(sm, dataset, **fields) -> LaunchRequest:
    from mmp.contract.experiment import parse_experiment

    experiment = parse_experiment({**sm.SM_EXPERIMENT, **fields.pop("experiment", {})})
    return LaunchRequest(experiment=experiment, experiment_name="fashion-demo", run_id="0" * 32,
                         repository="acme/fashion-demo", clone_url="https://github.com/acme/fashion-demo.git",
                         commit="a" * 40, mlflow_env={"MLFLOW_TRACKING_URI": "https://mlflow.example"},
                         dataset=dataset, **fields)


def test_a_trial_keeps_a_warm_pool_and_both_requests_fit_botocores_model(stack_env, sm, sm_dataset):
    backend = SageMakerBackend()
    trial = backend.training_job_request(launch_request(sm, sm_dataset, delivery_id="d1-trial-0", study="mmp-d1"))
    single = backend.training_job_request(launch_request(sm, sm_dataset, delivery_id="d1"))
    assert keep_alive(trial) == 600  # the default: enough to bridge trials and a runner restart
    assert keep_alive(single) is None  # a commit keeps nothing warm unless the stack says so
    create = MODEL.operation_model("CreateTrainingJob").input_shape
    validate_parameters(trial, create)
    validate_parameters(single, create)
    validate_parameters({"TrainingJobName": trial["TrainingJobName"], "ResourceConfig": {"KeepAlivePeriodInSeconds": 0}},
                        MODEL.operation_model("UpdateTrainingJob").input_shape)


def test_spot_jobs_never_ask_for_a_warm_pool(stack_env, sm, sm_dataset):
    """SageMaker's warm pools do not take spot jobs ("Considerations")."""
    stack_env.setenv("MMP_CHECKPOINT_S3_URI", "s3://ckpt/x")
    stack_env.setenv("MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS", "900")
    backend = SageMakerBackend()
    spot = {"experiment": {"Use_Spot": True}}
    assert keep_alive(backend.training_job_request(launch_request(sm, sm_dataset, study="mmp-d1", **spot))) is None
    assert keep_alive(backend.training_job_request(launch_request(sm, sm_dataset, **spot))) is None


def test_successive_commits_keep_a_pool_only_behind_the_stacks_setting(aws_env, stack_env, sm_repo, sm):
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    repo = sm_repo()
    outcome, _ = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0))
    assert outcome.state == "SUCCEEDED", outcome.message
    stack_env.setenv("MMP_SAGEMAKER_COMMIT_KEEP_ALIVE_SECONDS", "900")
    stack_env.setenv("MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", "0")  # each setting on its own
    outcome, _ = sm.run_pipeline(repo, SageMakerBackend(sagemaker_client=client, poll_seconds=0),
                                 delivery_id="second-push")
    assert outcome.state == "SUCCEEDED", outcome.message
    assert [keep_alive(body) for body in sent] == [None, 900]
    job = client.describe_training_job(TrainingJobName=sent[1]["TrainingJobName"])  # moto kept what was sent
    assert job["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 900


def test_a_studys_trials_on_moto_carry_the_keep_alive(aws_env, stack_env, sm_repo, sm):
    """The real study loop on moto: every trial's CreateTrainingJob asks for the pool; moto's jobs
    report no warm pool, so the study's end has nothing to give back and asks for nothing."""
    from mmp.pipeline.runner import Pipeline
    from mmp.tracking.client import RunTracker
    from mmp.tuning.dispatch import run_commit

    stack_env.setenv("MMP_SAGEMAKER_TRIAL_KEEP_ALIVE_SECONDS", "1200")
    client = aws.client("sagemaker")
    sent = capture_requests(client)
    updates: list[str] = []
    client.meta.events.register("before-call.sagemaker.UpdateTrainingJob", lambda **_: updates.append("sent"))
    backend = SageMakerBackend(sagemaker_client=client, poll_seconds=0)
    repo = sm_repo(Instance_Count="1", Tuning=TUNING)
    run_commit(Pipeline(tracker=RunTracker(), backend_factory=lambda _: backend), sm.trigger_for(repo))
    assert [keep_alive(body) for body in sent] == [1200, 1200]
    assert len({body["TrainingJobName"] for body in sent}) == 2
    assert updates == []


# -- giving a pool back (Stubber) -------------------------------------------------------------------

@pytest.fixture
def stubbed(aws_env, stack_env):
    client = aws.client("sagemaker")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def warm(name: str, keep: int | None = 600, platform: str = "sagemaker") -> JobHandle:
    return JobHandle(platform=platform, job_id=name, data={"job_name": name, **({"keep_alive": keep} if keep else {})})


def expect_describe(stubber, sm, name, status, pool: dict | None):
    extra = {"WarmPoolStatus": pool} if pool else {}
    stubber.add_response("describe_training_job", sm.describe_response(name, status, status, **extra),
                         {"TrainingJobName": name})


def test_release_ends_only_the_pools_still_available(stubbed, sm):
    client, stubber = stubbed
    expect_describe(stubber, sm, "mmp-t0", "Completed", {"Status": "Reused", "ReusedByJob": "mmp-t1",
                                                          "ResourceRetainedBillableTimeInSeconds": 40})
    expect_describe(stubber, sm, "mmp-t1", "Completed", {"Status": "Available"})
    stubber.add_response("update_training_job", {"TrainingJobArn": "arn:aws:sagemaker:eu-west-1:123456789012:training-job/mmp-t1"},
                         {"TrainingJobName": "mmp-t1", "ResourceConfig": {"KeepAlivePeriodInSeconds": 0}})
    expect_describe(stubber, sm, "mmp-t2", "Failed", {"Status": "Terminated"})
    expect_describe(stubber, sm, "mmp-t3", "Stopping", None)  # still ending: it then keeps no pool
    stubber.add_response("update_training_job", {"TrainingJobArn": "arn:aws:sagemaker:eu-west-1:123456789012:training-job/mmp-t3"},
                         {"TrainingJobName": "mmp-t3", "ResourceConfig": {"KeepAlivePeriodInSeconds": 0}})
    backend = SageMakerBackend(sagemaker_client=client)
    handles = [warm("mmp-t0"), warm("mmp-t1"), warm("mmp-t2"), warm("mmp-t3"),
               warm("mmp-cold", keep=None), warm("other", platform="local")]  # these two are never asked about
    assert backend.release_warm(handles) == ["mmp-t1", "mmp-t3"]


def test_a_refused_release_is_logged_and_never_fails_the_study(stubbed, sm, caplog):
    client, stubber = stubbed
    stubber.add_client_error("describe_training_job", "ValidationException", "Requested resource not found",
                             expected_params={"TrainingJobName": "mmp-gone"})
    expect_describe(stubber, sm, "mmp-t1", "Completed", {"Status": "Available"})
    stubber.add_client_error("update_training_job", "ValidationException", "warm pool is not available",
                             expected_params={"TrainingJobName": "mmp-t1",
                                              "ResourceConfig": {"KeepAlivePeriodInSeconds": 0}})
    backend = SageMakerBackend(sagemaker_client=client)
    with caplog.at_level("WARNING", logger="mmp.backends.sagemaker"):
        assert backend.release_warm([warm("mmp-gone"), warm("mmp-t1")]) == []
    assert "could not end the warm pool of mmp-t1 (it ends by its keep-alive, 600 s)" in caplog.text


# -- every way a study ends -----------------------------------------------------------------------------

class WarmPools:
    """SageMaker's job and warm-pool lifecycle for one client, as the developer guide documents it.

    Each job ends as `plan(job)` says when first described: "complete" (train.py's objective is logged
    into its MLflow run first, as train.py would), "fail", or "hold" (runs until StopTrainingJob). A job
    that asked for a keep-alive leaves its pool Available when it ends (stopped and algorithm-failed
    jobs too), and the next matching job takes it (Reused → InUse). UpdateTrainingJob with 0 ends it."""

    def __init__(self, client, sm, plan):
        self.sm, self.plan = sm, plan
        self.jobs: dict[str, dict] = {}
        self.order: list[str] = []
        self.updates: list[str] = []
        self.on_create = None
        self._lock = threading.Lock()
        client.meta.events.register("before-call.sagemaker", self._answer)

    def _answer(self, model, params, **_):
        body = json.loads(params["body"] or b"{}")  # botocore has validated it against the model already
        with self._lock:
            parsed = getattr(self, "_" + model.name)(body)
        status = 400 if "Error" in parsed else 200
        if status == 200:
            validate_parameters(parsed, model.output_shape)
        parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status})
        return AWSResponse(None, status, {}, None), parsed

    def _arn(self, name):
        return f"arn:aws:sagemaker:{self.sm.REGION}:{self.sm.ACCOUNT}:training-job/{name}"

    def _CreateTrainingJob(self, body):
        name = body["TrainingJobName"]
        keep = body["ResourceConfig"].get("KeepAlivePeriodInSeconds", 0)
        job = {"status": "InProgress", "keep": keep, "pool": None, "reused_by": None,
               "run_id": body["Environment"]["MLFLOW_RUN_ID"], "plan": None, "body": body}
        free = [n for n in self.order if self.jobs[n]["pool"] == "Available"]  # every job of a study matches
        if keep and free:
            self.jobs[free[0]].update(pool="Reused", reused_by=name)
            job["pool"] = "InUse"
        self.jobs[name] = job
        self.order.append(name)
        if self.on_create:
            self.on_create(job)
        return {"TrainingJobArn": self._arn(name)}

    def _end(self, job, status):
        job["status"] = status
        job["pool"] = "Available" if job["keep"] else ("Terminated" if job["pool"] else None)

    def _DescribeTrainingJob(self, body):
        name = body["TrainingJobName"]
        job = self.jobs.get(name)
        if job is None:
            return {"Error": {"Code": "ValidationException", "Message": "Requested resource not found."}}
        if job["plan"] is None:
            job["plan"] = self.plan(job)
            if job["plan"] == "complete":
                from mlflow.tracking import MlflowClient

                from mmp import config

                MlflowClient(config.tracking_uri()).log_metric(job["run_id"], "score", 0.9, step=0)
                self._end(job, "Completed")
            elif job["plan"] == "fail":
                self._end(job, "Failed")
        secondary = {"InProgress": "Training", "Completed": "Completed", "Failed": "Failed",
                     "Stopped": "Stopped"}[job["status"]]
        extra = {}
        if job["pool"]:
            extra["WarmPoolStatus"] = {"Status": job["pool"], **({"ReusedByJob": job["reused_by"]}
                                                                 if job["reused_by"] else {})}
        if job["status"] == "Failed":
            extra["FailureReason"] = "AlgorithmError: train.py exited 1"
        return self.sm.describe_response(name, job["status"], secondary, **extra)

    def _StopTrainingJob(self, body):
        job = self.jobs[body["TrainingJobName"]]
        if job["status"] != "InProgress":
            return {"Error": {"Code": "ValidationException", "Message": "The job is not in progress"}}
        self._end(job, "Stopped")
        return {}

    def _UpdateTrainingJob(self, body):
        name = body["TrainingJobName"]
        job = self.jobs[name]
        if body["ResourceConfig"]["KeepAlivePeriodInSeconds"] != 0:
            raise AssertionError("MMP only ever ends a pool")
        if job["status"] == "InProgress":
            job["keep"] = 0
        elif job["pool"] == "Available":
            job["pool"] = "Terminated"
        else:
            return {"Error": {"Code": "ValidationException", "Message": f"no warm pool available for {name}"}}
        self.updates.append(name)
        return {"TrainingJobArn": self._arn(name)}

    def warm_left(self) -> list[str]:
        return [n for n in self.order if self.jobs[n]["pool"] == "Available" or
                (self.jobs[n]["status"] == "InProgress" and self.jobs[n]["keep"])]


@pytest.fixture
def study_on_sagemaker(aws_env, stack_env, sm_repo, sm):
    """Run a study on SageMaker (WarmPools answering) through the real study loop and MLflow."""
    from mmp.pipeline.runner import Pipeline
    from mmp.tracking.client import RunTracker
    from mmp.tuning.dispatch import run_commit

    def run(plan, tuning=None, resume=False):
        client = aws.client("sagemaker")
        pools = WarmPools(client, sm, plan)
        backend = SageMakerBackend(sagemaker_client=client, poll_seconds=0.05)
        pipeline = Pipeline(tracker=RunTracker(), backend_factory=lambda _: backend)
        pipeline.resume_studies = resume
        repo = sm_repo(Instance_Count="1", Tuning={**TUNING, **(tuning or {})})
        pools.outcome = None
        try:
            pools.outcome = run_commit(pipeline, sm.trigger_for(repo))
        except KeyboardInterrupt:
            pools.outcome = "interrupted"
        return pools

    return run


def test_trials_reuse_the_pool_and_the_studys_end_gives_it_back(study_on_sagemaker):
    pools = study_on_sagemaker(lambda job: "complete")
    assert pools.outcome.state == "SUCCEEDED", pools.outcome.message
    first, second = pools.order
    assert pools.jobs[first]["pool"] == "Reused" and pools.jobs[first]["reused_by"] == second  # no cold start
    assert pools.updates == [second]  # only the pool still warm is ended; Reused moved on
    assert pools.warm_left() == []


def test_a_failed_study_gives_its_pools_back(study_on_sagemaker):
    pools = study_on_sagemaker(lambda job: "fail", tuning={"Max_Failures": 1})
    assert pools.outcome.state == "FAILED" and "Max_Failures 1" in pools.outcome.message
    assert pools.updates == pools.order[-1:] and pools.warm_left() == []


def test_a_study_that_stops_on_an_error_gives_its_pools_back(study_on_sagemaker, monkeypatch):
    from mmp.tuning.study import StudyRunner

    original, calls = StudyRunner._report_progress, []

    def breaks_after_the_first_trial(self, study):
        original(self, study)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("Optuna's storage went away")

    monkeypatch.setattr(StudyRunner, "_report_progress", breaks_after_the_first_trial)
    pools = study_on_sagemaker(lambda job: "complete")
    assert pools.outcome.state == "FAILED" and "stopped on an error" in pools.outcome.message
    assert len(pools.order) == 1 and pools.updates == pools.order and pools.warm_left() == []


def test_cancelling_a_study_stops_its_trial_and_gives_the_pool_back(study_on_sagemaker):
    from mlflow.tracking import MlflowClient

    from mmp import config
    from mmp.tuning import control

    def cancel_once_running(job):
        parent = MlflowClient(config.tracking_uri()).get_run(job["run_id"]).data.tags["mlflow.parentRunId"]
        assert control.request_cancel(parent)
        return "hold"  # runs until the study stops it

    pools = study_on_sagemaker(cancel_once_running)
    assert pools.outcome.state == "CANCELLED", pools.outcome.message
    [only] = pools.order
    assert pools.jobs[only]["status"] == "Stopped"  # a stopped job keeps its pool (developer guide) ...
    assert pools.updates == [only] and pools.warm_left() == []  # ... which the study then ends


@pytest.mark.parametrize("resume", [False, True], ids=["ends-cancelled", "suspended-to-resume"])
def test_ctrl_c_gives_the_pools_back_whether_the_study_ends_or_waits_to_resume(study_on_sagemaker, monkeypatch,
                                                                               resume):
    from mmp.tuning.study import StudyRunner

    original = StudyRunner._record_handles

    def interrupted_once_a_trial_runs(self):
        original(self)
        if self._recorded:
            raise KeyboardInterrupt

    monkeypatch.setattr(StudyRunner, "_record_handles", interrupted_once_a_trial_runs)
    pools = study_on_sagemaker(lambda job: "hold", resume=resume)
    assert pools.outcome == "interrupted"
    [only] = pools.order
    assert pools.jobs[only]["status"] == "Stopped"
    assert pools.updates == [only] and pools.warm_left() == []


def test_a_dead_studys_trial_is_stopped_and_its_pool_ended_by_conclude(aws_env, stack_env, sm):
    """Conclude (the runner task died for good) ends the trials progress.json names, pool included;
    the worker resuming a study keeps the pool for the trial that replaces the interrupted one."""
    from mmp.tuning.trials import end_trial

    client = aws.client("sagemaker")
    pools = WarmPools(client, sm, lambda job: "hold")
    backend = SageMakerBackend(sagemaker_client=client)

    class Tracker:  # the MLflow side of end_trial is not what this test is about
        def set_tags(self, *args):
            pass

        def finish(self, *args, **kwargs):
            pass

    for name, release in (("mmp-trial-a", True), ("mmp-trial-b", False)):
        body = {"TrainingJobName": name, "ResourceConfig": {"KeepAlivePeriodInSeconds": 600},
                "Environment": {"MLFLOW_RUN_ID": "r"}}
        pools._CreateTrainingJob(body)
        pools.jobs[name]["plan"] = "hold"
        handle = JobHandle("sagemaker", name, {"job_name": name, "keep_alive": 600}).to_dict()
        end_trial("r", handle, backend_for=lambda _: backend, tracker=Tracker(), message="gone", release=release)
    assert pools.jobs["mmp-trial-a"]["status"] == pools.jobs["mmp-trial-b"]["status"] == "Stopped"
    assert pools.updates == ["mmp-trial-a"]
    assert pools.warm_left() == ["mmp-trial-b"]  # kept for the replacement trial; its keep-alive bounds it
