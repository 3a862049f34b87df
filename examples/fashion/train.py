"""Train a small CNN on Fashion-MNIST-format IDX data with Horovod, tracked in MLflow.

Runs unchanged on every MMP platform: the pipeline passes --dataset-path,
--output-path and --dataset, then one --name value per hyperparameter, and reaches
MLflow through MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME / MLFLOW_RUN_ID, so rank 0
continues the run the pipeline made (as `mlflow.start_run()` does).

In a study (an experiment with a Tuning block) the run's tags say what the study asks
(StudyTrial): with Early_Stopping, wait after each epoch for the pruner's verdict, so a
pruned trial stops at the epoch where Optuna's pruner said so; and log the model only
when this trial beats the study's best so far, so trials do not each pay for packaging
a model that only the best one needs.

Rank 0 talks to MLflow through `Tracking`: over MLflow's REST API with the standard library
when the pipeline made the run on an http(s) tracking server, because `import mlflow` costs
about as much as importing torch and a short trial would pay it every time; the mlflow
package only to log the model, or for everything on any other tracking URI.
"""

import argparse
import base64
import gzip
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import horovod.torch as hvd

IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset-path", required=True, help="folder with the IDX files")
    parser.add_argument("--output-path", required=True, help="where the trained model is written")
    parser.add_argument("--dataset", required=True, help="dataset name, for the record")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    return parser.parse_args()


def read_idx(folder, name):
    """An IDX file (the MNIST / Fashion-MNIST format), plain or gzipped, as a numpy array."""
    path = os.path.join(folder, name)
    opener = open
    if not os.path.exists(path):
        path, opener = path + ".gz", gzip.open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(folder, split):
    images, labels = (read_idx(folder, name) for name in IDX[split])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2) if x.shape[-1] >= 8 else F.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


# With any of these set, only the mlflow package knows what MLflow would do (TLS, auth plugins).
MLFLOW_PACKAGE_SETTINGS = ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                           "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AUTH")


class Tracking:
    """Rank 0's line to its MLflow run.

    REST when the pipeline made the run (MLFLOW_RUN_ID) on a plain http(s) server: the same
    calls the mlflow client makes (runs/get, runs/log-batch), the same credentials
    (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD), never put in an error.
    Otherwise, e.g. a SageMaker MLflow ARN (signed by a plugin) or a sqlite:// store, mlflow."""

    def __init__(self):
        uri, self.run_id = os.environ["MLFLOW_TRACKING_URI"], os.environ.get("MLFLOW_RUN_ID")
        self.rest = (uri.startswith(("http://", "https://")) and "@" not in uri.split("/")[2] and bool(self.run_id)
                     and not any(os.environ.get(name) for name in MLFLOW_PACKAGE_SETTINGS))  # "@": user:pass@host
        self.api = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.started = not self.rest  # a run the mlflow package started, which it marks FINISHED at the end
        self.client = None  # MlflowClient, off the REST path
        if not self.rest:
            import mlflow

            self.run_id = mlflow.start_run().info.run_id  # continues MLFLOW_RUN_ID when the pipeline made the run

    def _call(self, path, body=None, attempts=5):
        headers = {"Content-Type": "application/json"}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
        elif os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(attempts):
            try:
                request = urllib.request.Request(self.api + path, data=data, headers=headers,
                                                 method="POST" if data else "GET")
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as exc:  # 4xx: MLflow's own message; 429/5xx: try again, as mlflow does
                if (exc.code < 500 and exc.code != 429) or attempt == attempts - 1:
                    raise RuntimeError(f"MLflow {path.split('?')[0]}: HTTP {exc.code} "
                                       f"{exc.read()[:300].decode(errors='replace')}") from None
            except urllib.error.URLError as exc:
                if attempt == attempts - 1:
                    raise RuntimeError(f"MLflow {path.split('?')[0]}: {exc.reason}") from None
            time.sleep(0.5 * 2 ** attempt)

    def tags(self):
        if not self.rest:
            from mlflow import MlflowClient

            if self.client is None:  # one client, however often the verdict is polled
                self.client = MlflowClient()
            return self.client.get_run(self.run_id).data.tags
        run = self._call(f"runs/get?run_id={self.run_id}")["run"]
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    def log_params(self, params):
        if not self.rest:
            import mlflow

            return mlflow.log_params(params)
        self._call("runs/log-batch", {"run_id": self.run_id,
                                      "params": [{"key": k, "value": str(v)} for k, v in params.items()]})

    def log_metrics(self, metrics, step):
        if not self.rest:
            import mlflow

            return mlflow.log_metrics(metrics, step=step)
        now = int(time.time() * 1000)
        self._call("runs/log-batch", {"run_id": self.run_id, "metrics": [
            {"key": k, "value": float(v), "timestamp": now, "step": step} for k, v in metrics.items()]})

    def log_model(self, model, example):
        import mlflow
        import mlflow.pytorch

        if not self.started:
            mlflow.start_run(run_id=self.run_id)
            self.started = True
        # MLflow exports the model with torch.export, traced on this example: a batch of one
        # would fix the served model's batch size at 1, so the example holds two images.
        mlflow.pytorch.log_model(model, name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])

    def end(self):
        if self.started:
            import mlflow

            mlflow.end_run()


class StudyTrial:
    """What an MMP study asks of this run through its tags (mmp/tuning/tags.py); nothing outside a study."""

    def __init__(self, tracking):
        tags = tracking.tags() if tracking is not None else {}
        self.tracking = tracking
        self.waits = tags.get("mmp.trial.pruning") == "wait"
        self.objective = tags.get("mmp.trial.objective")
        self.maximize = tags.get("mmp.trial.direction", "maximize") == "maximize"
        best = tags.get("mmp.trial.best_before")
        self.best_before = float(best) if best is not None else None

    def pruned(self, step, timeout=600.0):
        """Once the objective of `step` is logged: wait for the study's verdict; True if it pruned this trial.
        A study that does not answer in `timeout` seconds is gone: training goes on."""
        if not self.waits:
            return False
        deadline = time.time() + timeout
        while time.time() < deadline:
            judged = self.tracking.tags().get("mmp.trial.judged", "")
            if judged.startswith("pruned:"):
                return True
            if judged and int(judged) >= step:
                return False
            time.sleep(0.02)
        return False

    def wants_model(self, metrics):
        """Outside a study, always; in one, only when this trial is at least as good as the best before it
        (the study's best trial always is, so `mmp promote --study` finds its model)."""
        value = metrics.get(self.objective) if self.objective else None
        if self.best_before is None or value is None:
            return True
        return value >= self.best_before if self.maximize else value <= self.best_before


def average(value, name):
    return hvd.allreduce(torch.tensor(value, dtype=torch.float64), name=name).item()


def evaluate(model, loader):
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += len(y)
    return loss / max(count, 1), correct / max(count, 1)


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(42)
    rank0 = hvd.rank() == 0
    if rank0:
        print(f"train.py: {hvd.size()} rank(s), dataset {args.dataset} at {args.dataset_path}", flush=True)

    train, test = load_split(args.dataset_path, "train"), load_split(args.dataset_path, "test")
    sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=hvd.size(), rank=hvd.rank())
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    test_loader = torch.utils.data.DataLoader(test, batch_size=256, sampler=test_sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    run = None
    study = StudyTrial(None)
    if rank0 and os.environ.get("MLFLOW_TRACKING_URI"):
        run = Tracking()
        run.log_params({"world_size": hvd.size(), "train_examples": len(train),
                        "test_examples": len(test), "image_shape": "x".join(map(str, train[0][0].shape))})
        study = StudyTrial(run)

    for epoch in range(1, args.epochs + 1):
        started = time.time()
        model.train()
        sampler.set_epoch(epoch)
        total, correct, count = 0.0, 0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            count += len(y)
        val_loss, val_acc = evaluate(model, test_loader)
        metrics = {
            "train_loss": average(total / max(count, 1), "train_loss"),
            "train_accuracy": average(correct / max(count, 1), "train_accuracy"),
            "val_loss": average(val_loss, "val_loss"),
            "val_accuracy": average(val_acc, "val_accuracy"),
            "epoch_seconds": time.time() - started,
        }
        if rank0:
            print(f"epoch {epoch}/{args.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
            if run is not None:
                run.log_metrics(metrics, step=epoch)
        # every rank stops at the epoch the study pruned (rank 0 heard the verdict)
        pruned = hvd.broadcast(torch.tensor(int(rank0 and study.pruned(epoch))), root_rank=0, name=f"pruned.{epoch}")
        if pruned.item():
            sys.exit(f"train.py: pruned by the study at epoch {epoch}")

    if rank0:
        os.makedirs(args.output_path, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.output_path, "model.pt"))
        if run is not None and not study.wants_model(metrics):
            print(f"train.py: model not logged to MLflow ({study.objective} {metrics[study.objective]:.4f} does not "
                  f"beat the study's best so far, {study.best_before:.4f}); model.pt is in the output path", flush=True)
        elif run is not None:
            run.log_model(model.eval(), torch.stack([train[i][0] for i in range(2)]).numpy())
        if run is not None:
            run.end()
        print("train.py: done", flush=True)


if __name__ == "__main__":
    main()
