"""A failed training says why in one line: the failing rank and its last error line, within
GitHub's 140-character status description, from real horovodrun runs through the local pipeline."""

from __future__ import annotations

import pytest

from mmp.runtime.horovod import SUMMARY_LIMIT, failure_summary
from mmp.pipeline.reporting import LocalStatusReporter
from mmp.pipeline.runs import local_trigger, run_trigger

LOCAL = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Instance_Count": "1",
         "Processes_Per_Host": "2"}

MISSING_MODULE = "import torchvision_is_not_installed_here\n"
ARGPARSE = """
import argparse
parser = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset"):
    parser.add_argument(flag)
parser.parse_args()
"""
RANK_1_RAISES = """
import os, time
def load(rank):
    if rank == 1:
        raise ValueError("shape mismatch in layer conv2: expected 32 channels but the checkpoint holds 64 " * 3)
load(int(os.environ["HOROVOD_RANK"]))
time.sleep(2)
"""


def train_and_fail(make_repo, train: str, hyper: dict | None = None):
    repo = make_repo(experiment={**LOCAL, "Hyperparameters": hyper or {}}, files={"train.py": train})
    sha = __import__("subprocess").run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    outcome = run_trigger(local_trigger(repo, sha))
    assert outcome.state == "FAILED", outcome.message
    (*_, final) = LocalStatusReporter().history(repo.name, sha)
    assert final["state"] == "failure" and len(final["description"]) <= 140
    assert len(outcome.message) <= SUMMARY_LIMIT
    return outcome.message, final["description"]


@pytest.mark.horovod
def test_missing_module_names_the_rank_and_the_module(make_repo, digits):
    message, description = train_and_fail(make_repo, MISSING_MODULE)
    assert message.startswith("horovodrun exited 1: rank ")
    assert "ModuleNotFoundError: No module named 'torchvision_is_not_installed_here'" in message
    assert "Horovod detected" not in message and message in description


@pytest.mark.horovod
def test_argparse_error_line_is_the_cause(make_repo, digits):
    message, _ = train_and_fail(make_repo, ARGPARSE, {"epochs": "3"})
    assert "error: unrecognized arguments: --epochs 3" in message and ": rank " in message


@pytest.mark.horovod
def test_the_failing_rank_is_named_and_a_long_error_is_cut(make_repo, digits):
    message, description = train_and_fail(make_repo, RANK_1_RAISES)
    assert message.startswith("horovodrun exited 1: rank 1: ValueError: shape mismatch in layer conv2")
    assert message.endswith("…") and len(description) <= 140


def test_without_rank_output_horovodrun_s_own_error_is_used():
    lines = ["usage: horovodrun [-h] ...", "horovodrun: error: argument -np/--num-proc: invalid int value: 'x'"]
    assert failure_summary(lines, 2) == ("horovodrun exited 2: horovodrun: error: argument -np/--num-proc: "
                                         "invalid int value: 'x'")


def test_mpirun_prefixes_and_chained_tracebacks():
    lines = ["[1,0]<stdout>:starting", "[1,1]<stderr>:Traceback (most recent call last):",
             '[1,1]<stderr>:  File "train.py", line 3, in <module>', "[1,1]<stderr>:KeyError: 'lr'",
             "[1,1]<stderr>:", "[1,1]<stderr>:During handling of the above exception, another exception occurred:",
             "[1,1]<stderr>:", "[1,1]<stderr>:Traceback (most recent call last):",
             '[1,1]<stderr>:  File "train.py", line 5, in <module>', "[1,1]<stderr>:RuntimeError: no learning rate",
             "Process 1 exit with status code 1."]
    assert failure_summary(lines, 1) == "horovodrun exited 1: rank 1: RuntimeError: no learning rate"
