"""The study's Optuna journal in S3 (mmp.tuning.s3_journal), against moto in server mode.

What the runner task relies on: a study written by one process is read back whole by
the next (the task started again), and two writers never lose or reorder an entry,
because each append is a conditional PUT (`If-None-Match: *`) of the next sequence number.
"""

from __future__ import annotations

import json
import threading

import pytest

from ..conftest import create_bucket

from mmp import aws
from mmp.tuning.s3_journal import S3JournalBackend, s3_storage

BUCKET = "mmp-artifacts"


@pytest.fixture
def bucket(aws_env):
    create_bucket(aws.client("s3"), BUCKET)
    return BUCKET


def test_a_study_survives_its_process_and_a_running_trial_is_seen_as_running(bucket):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"s3://{bucket}/runner/study/d1/journal"
    study = optuna.create_study(study_name="s", storage=s3_storage(url), direction="maximize")
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    running = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    running.set_user_attr("mmp.handle", {"platform": "dlami", "job_id": "run-1"})
    del study  # the task dies here

    again = optuna.load_study(study_name="s", storage=s3_storage(url))
    trials = again.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert trials[0].value == 0.5 and trials[0].params == {"x": done.params["x"]}
    assert trials[1].user_attrs["mmp.handle"] == {"platform": "dlami", "job_id": "run-1"}
    keys = [o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=bucket, Prefix="runner/study/d1/")["Contents"]]
    assert keys == sorted(keys) and keys[0] == "runner/study/d1/journal/000000000000.json"


def test_two_writers_never_take_the_same_entry(bucket):
    first, second = S3JournalBackend(bucket, "j"), S3JournalBackend(bucket, "j")
    first.append_logs([{"op": "a"}])
    second.append_logs([{"op": "b"}])  # 000…0 is taken: second reads it, writes 000…1
    barrier, errors = threading.Barrier(2), []

    def write(backend, tag):
        barrier.wait()
        try:
            for i in range(5):
                backend.append_logs([{"op": f"{tag}{i}"}])
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b, t)) for b, t in ((first, "x"), (second, "y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    fresh = [entry["op"] for entry in S3JournalBackend(bucket, "j").read_logs(0)]
    assert fresh[:2] == ["a", "b"] and sorted(fresh[2:]) == sorted([f"x{i}" for i in range(5)] + [f"y{i}" for i in range(5)])
    assert [e["op"] for e in first.read_logs(0)] == fresh == [e["op"] for e in second.read_logs(0)]
    assert [e["op"] for e in first.read_logs(7)] == fresh[7:]


def test_a_gap_in_the_journal_is_an_error_not_a_silent_loss(bucket):
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="g/000000000000.json", Body=json.dumps([{"op": 1}]).encode())
    s3.put_object(Bucket=bucket, Key="g/000000000002.json", Body=json.dumps([{"op": 3}]).encode())
    with pytest.raises(RuntimeError, match="000000000001.json should be"):
        S3JournalBackend(bucket, "g").read_logs(0)


def test_the_url_must_name_a_bucket_and_a_prefix():
    with pytest.raises(ValueError, match="s3://BUCKET/PREFIX"):
        s3_storage("s3://only-bucket")
