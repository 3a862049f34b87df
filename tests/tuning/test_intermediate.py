"""Issue 20, finding 11: a per-batch objective is read a bounded page per tick and thinned to the
checkpoint steps every trial reports, against a real MLflow SQLite store."""

from __future__ import annotations

import math
import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.tracking.client import make_tracker
from mmp.tuning.intermediate import IntermediateValues, checkpoints, is_checkpoint

from ..conftest import mlflow_server


def log_steps(client: MlflowClient, run_id: str, steps: range, value=lambda step: float(step)) -> None:
    now = int(time.time() * 1000)
    for start in range(steps.start, steps.stop, 1000):  # MLflow takes at most 1000 metrics per batch
        batch = range(start, min(start + 1000, steps.stop))
        client.log_batch(run_id, metrics=[Metric("loss", value(s), now + s, s) for s in batch])


def test_checkpoints_are_few_and_the_same_for_every_trial():
    assert [s for s in range(0, 2000) if is_checkpoint(s)][98:104] == [98, 99, 100, 110, 120, 130]
    assert sum(map(is_checkpoint, range(10**6))) == 100 + 4 * 90  # a million per-batch steps: 460 reports
    assert not is_checkpoint(-1) and not is_checkpoint(105) and is_checkpoint(2_000_000)
    values = [(0, 1.0), (1, 2.0), (1, 3.0), (105, 9.0), (110, math.nan), (120, 4.0), (-1, 5.0)]
    assert checkpoints(values, None) == [(0, 1.0), (1, 3.0), (120, 4.0)]  # last write per step; no NaN
    assert checkpoints(values, 1) == [(120, 4.0)]


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request, tmp_path):
    """MMP's SQLite store (mmp run, the local worker: MLflow's store) and a real MLflow server (MMP's REST
    tracker, as on AWS and with `mmp up`)."""
    if request.param == "sqlite":
        yield config.tracking_uri()
        return
    with mlflow_server(tmp_path / "server") as url:
        yield url


def test_a_long_history_is_read_one_bounded_page_at_a_time(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("pages")).info.run_id
    log_steps(client, run_id, range(0, 2500))
    tracker = make_tracker(tracking_uri)
    assert type(tracker).__name__ == {"sqlite": "RunTracker", "http": "RestRunTracker"}[tracking_uri.split(":")[0]]
    reader = IntermediateValues(tracker, run_id, "loss", page_rows=1000)
    pages = [reader.read() for _ in range(3)]
    assert [len(p) for p in pages] == [1000, 1000, 500] and reader.caught_up
    assert [step for page in pages for step, _ in page] == list(range(2500))  # each value once, in order
    assert reader.read() == []
    log_steps(client, run_id, range(2500, 2800))  # train.py goes on: only the new values come back
    assert [step for step, _ in reader.read()] == list(range(2500, 2800))
    assert tracker.latest_metric(run_id, "loss") == 2799.0 and tracker.latest_metric(run_id, "accuracy") is None
