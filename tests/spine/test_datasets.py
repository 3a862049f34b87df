"""The dataset catalogue and the IDX files the example reads (Fashion-MNIST's format)."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mmp import config
from mmp.contract.datasets import IDX_FILES, add_dataset, load_catalogue, missing_files, prepare_digits, write_idx


def mmp(*args):
    return subprocess.run([sys.executable, "-m", "mmp", *args], capture_output=True, text=True, timeout=300)


def read_idx_header(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        zero, dtype, ndim = struct.unpack(">HBB", fh.read(4))
        return zero, dtype, struct.unpack(f">{ndim}I", fh.read(4 * ndim))


def test_prepare_digits_writes_fashion_mnist_style_idx(tmp_path):
    folder = prepare_digits(tmp_path / "digits")
    assert missing_files(folder) == []
    assert read_idx_header(folder / "train-images-idx3-ubyte.gz") == (0, 0x08, (1437, 8, 8))
    assert read_idx_header(folder / "t10k-labels-idx1-ubyte.gz") == (0, 0x08, (360,))


def test_catalogue_add_list_and_refusals(tmp_path):
    assert set(load_catalogue()) == {"digits", "fashion"}
    add_dataset("cifar", local=str(tmp_path), s3="s3://bucket/datasets/cifar", fsx="/datasets/cifar")
    entry = load_catalogue()["cifar"]
    assert (entry.local, entry.s3, entry.fsx) == (str(tmp_path), "s3://bucket/datasets/cifar", "/datasets/cifar")
    for bad in ({"name": "../x"}, {"name": "ok", "s3": "http://x"}, {"name": "ok", "fsx": "relative"}):
        with pytest.raises(ValueError):
            add_dataset(**bad)
    listed = json.loads(mmp("datasets", "--json").stdout)
    assert {row["name"] for row in listed} == {"digits", "fashion", "cifar"}
    refused = mmp("datasets", "add", "a;b", "--local", str(tmp_path))
    assert refused.returncode == 2 and "dataset name" in refused.stderr


def test_catalogue_from_the_stack_environment(monkeypatch):
    monkeypatch.setenv("MMP_DATASETS", json.dumps({"fashion": {"s3": "s3://b/datasets/fashion"}}))
    assert load_catalogue()["fashion"].s3 == "s3://b/datasets/fashion"


@pytest.mark.horovod
def test_example_trains_on_fashion_mnist_format_files(make_repo, tmp_path):
    """Raw (not gzipped) 28×28 IDX files named as Fashion-MNIST ships them."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, count in (("train", 64), ("test", 32)):
        images, labels = IDX_FILES[split]
        write_idx(folder / images, rng.integers(0, 256, size=(count, 28, 28)))
        write_idx(folder / labels, rng.integers(0, 10, size=count))
    assert mmp("datasets", "add", "fashion", "--local", str(folder)).returncode == 0
    repo = make_repo(experiment={"Platform": "local", "Dataset_Name": "fashion", "Training_Instance": "local",
                                 "Hyperparameters": {"epochs": 1, "batch-size": 16}})
    proc = mmp("run", "--repo", str(repo), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = MlflowClient(config.tracking_uri()).get_run(json.loads(proc.stdout)["run_id"])
    assert run.data.params["image_shape"] == "1x28x28" and run.data.params["train_examples"] == "64"
