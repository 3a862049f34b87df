"""Hyperparameter search: what a study costs per trial, against native Optuna, and how fast TPE finds the best.

0. MMP's study against a native Optuna loop (issue 24), side by side in one run: the same
   examples/fashion/train.py on digits under horovodrun, the same TPE sampler, median pruner,
   seed and budget (the native loop seeds its sampler per trial as MMP does, so both draw the
   same trials). Native: `study.ask()`, horovodrun as a subprocess, each epoch's
   val_accuracy read from its output and reported, the process killed when pruned; no MLflow.
   It runs in its own Python process, as `python tune.py` would, timed from start to exit like
   `mmp run` (less its import of MMP's helpers that make both sides draw alike).
   Native with MLflow: the same loop with MLFLOW_TRACKING_URI set (the shared server), so train.py
   tracks as outside a study: its own run per trial, a model logged by every complete trial.
   The breakdown by phase (`breakdown`) compares MMP with the untracked native loop.
   MMP: `mmp run` on the local platform, after one warm-up run that leaves the shared tracking
   server as any earlier `mmp run` does (MLflow runs, the pruner's verdict per epoch, the model
   logged only by trials that beat the best so far). Figure: MMP wall time / native
   wall time, median of `--rounds` interleaved pairs. Goal ≤ 1.2.
   The trials' shape: by default the issue's (Horovod's pytorch_mnist tuned on these cores, where
   training was most of a trial): MNIST-sized 28×28 images (the 1,437 digits scaled up) and
   pytorch_mnist's 10 epochs. `--image-size 8 --epochs 3` gives trials of a fifth of a second of
   training, where start-up is nearly all of a trial and any fixed cost per trial shows most.

1. Per-trial overhead of a study over single runs, side by side in one process: the
   same tiny train.py (it logs the objective through MLflow) run K times with
   `mmp run`'s path, then as a K-trial random study (Parallel 1) on the local
   platform. Figure: (study seconds per trial) / (single-run seconds) - 1. Goal ≤ 5 %.
2. Time to the best value on a synthetic objective with a known optimum (no training):
   Optuna's TPE (what `Strategy: bayesian` uses, with MMP's start-up rule) against
   random search, over several seeds: the median number of trials to come within 1 %
   of the optimum's range, and the median best value after the budget.

Run: .venv/bin/python bench/tuning.py [--study-trials 6] [--rounds 2] [--image-size 28] [--epochs 10]
     [--trials 4] [--seeds 20] [--budget 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = """
import argparse
p = argparse.ArgumentParser()
for flag in ("--dataset-path", "--output-path", "--dataset"):
    p.add_argument(flag)
p.add_argument("--shift", type=float, default=0.0)
a = p.parse_args()
import mlflow
with mlflow.start_run():
    mlflow.log_metric("score", -abs(a.shift - 0.3), step=0)
"""

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


def make_repo(root: Path, experiment: dict) -> tuple[Path, str]:
    repo = root / ("study" if "Tuning" in experiment else "single")
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN)
    (repo / "experiment.json").write_text(json.dumps(experiment))
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, env=env, capture_output=True,
                         text=True).stdout.strip()
    return repo, sha


def overhead(trials: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="mmp-bench-tuning-"))
    os.environ["MMP_HOME"] = str(home)
    try:
        from mmp.contract.datasets import prepare_digits
        from mmp.pipeline.runs import local_trigger, run_trigger

        prepare_digits(home / "datasets" / "digits")
        base = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local",
                "Hyperparameters": {"shift": 0.5}}
        single, single_sha = make_repo(home, base)
        study, study_sha = make_repo(home, {**base, "Tuning": {
            "Objective_Metric": "score", "Strategy": "random", "Max_Runs": trials, "Seed": 3,
            "Ranges": {"shift": {"Min": 0.0, "Max": 1.0}}}})
        run_trigger(local_trigger(single, single_sha))  # warm: MLflow's store, git, the page cache
        singles = []
        for _ in range(trials):
            t0 = time.perf_counter()
            outcome = run_trigger(local_trigger(single, single_sha))
            singles.append(time.perf_counter() - t0)
            assert outcome.ok, outcome.message
        t0 = time.perf_counter()
        outcome = run_trigger(local_trigger(study, study_sha))
        study_s = time.perf_counter() - t0
        assert outcome.ok, outcome.message
        per_single = statistics.mean(singles)
        per_trial = study_s / trials
        print(f"single run: mean {per_single:.2f} s over {trials} (min {min(singles):.2f}, max {max(singles):.2f})")
        print(f"study of {trials} trials: {study_s:.2f} s, {per_trial:.2f} s per trial")
        print(f"per-trial overhead of the study: {100 * (per_trial / per_single - 1):+.1f} % (goal ≤ 5 %)")
    finally:
        shutil.rmtree(home, ignore_errors=True)


EXAMPLE = ROOT / "examples" / "fashion"
VERSUS = {"Objective_Metric": "val_accuracy", "Direction": "maximize", "Strategy": "bayesian", "Parallel": 1,
          "Early_Stopping": True, "Seed": 7,
          "Ranges": {"lr": {"Min": 0.001, "Max": 0.3, "Scale": "log"}, "batch-size": {"Values": [16, 32, 64]}}}
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ .*val_accuracy=([-\d.eE+]+)")
EPOCH_SECONDS = re.compile(r"epoch_seconds=([\d.]+)")
PHASES = ("study start", "between trials", "trial run to launch", "trial start-up", "training", "after each epoch",
          "trial end", "study end")


@dataclasses.dataclass
class TrialTimes:
    """One trial's timestamps (epoch seconds): launched, each epoch's (logged at, epoch_seconds), ended."""

    launched: float
    epochs: list[tuple[float, float]]
    ended: float
    job_started: float | None = None  # MMP: when the backend launched the trial's job (after its run was made)


def breakdown(start: float, trials: list[TrialTimes], end: float) -> dict[str, float]:
    """Seconds of a study's wall time by phase, from timestamps (they add up to the wall time):
    study start (to the first trial's launch), between trials (one trial's end to the next's launch: telling
    Optuna, asking, creating the run), trial run to launch (MMP: the trial's run made to its job launched by the
    backend: tags, code export, the supervisor's start), trial start-up (launch to the end of the first epoch less its
    epoch_seconds: horovodrun, imports, data, MLflow's start_run), training (epoch_seconds, evaluation
    included), after each epoch (logging the metrics and, in MMP, the wait for the pruner's verdict), trial
    end (the last epoch logged to the trial's end: model saving and logging, process exit, the run's
    conclusion), study end (the last trial's end to the study's)."""
    out = dict.fromkeys(PHASES, 0.0)
    out["study start"] = trials[0].launched - start if trials else end - start
    previous = None
    for t in trials:
        if previous is not None:
            out["between trials"] += t.launched - previous
        mark = t.launched
        if t.job_started is not None:
            out["trial run to launch"] += t.job_started - mark
            mark = t.job_started
        for n, (at, seconds) in enumerate(t.epochs):
            out["training"] += seconds
            out["trial start-up" if n == 0 else "after each epoch"] += at - mark - seconds
            mark = at
        out["trial end"] += t.ended - mark
        previous = t.ended
    if previous is not None:
        out["study end"] = end - previous
    return out


def mmp_timeline(tracking_uri: str, parent_id: str) -> list[TrialTimes]:
    """MMP's trials as its MLflow runs recorded them: a run's start and end times (the study creates and
    ends it) and the timestamps train.py gave each epoch's metrics."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)  # no git in this process
    client = MlflowClient(tracking_uri)
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}'")
    import optuna

    from mmp.tuning.study import ATTR_HANDLE, ATTR_PARENT, ATTR_RUN, storage_url

    storage = storage_url()
    name = next(s.study_name for s in optuna.get_all_study_summaries(storage)
                if s.user_attrs.get(ATTR_PARENT) == parent_id)
    launched = {t.user_attrs.get(ATTR_RUN): t.user_attrs.get(ATTR_HANDLE, {}).get("data", {}).get("started")
                for t in optuna.load_study(study_name=name, storage=storage).trials}
    out = []
    for run in sorted(children, key=lambda r: r.info.start_time):
        seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
        logged = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        out.append(TrialTimes(run.info.start_time / 1000, [(at, seconds[step]) for step, at in logged],
                              run.info.end_time / 1000, launched.get(run.info.run_id)))
    return out


def native_study(tuning_block: dict, dataset: Path, repo: Path, fixed: dict, tracking_uri: str | None = None,
                 ) -> tuple[float, list[str], dict[str, float]]:
    """The native loop (`native_loop`) as a user runs one, `python tune.py`: in its own process, timed from its
    start to its exit as `mmp run` is, less the time it spends importing MMP's helpers (they only make sure
    that both sides draw alike; a hand-written loop has none)."""
    spec = {"tuning": tuning_block, "dataset": str(dataset), "repo": str(repo), "fixed": fixed,
            "tracking_uri": tracking_uri}
    t0, wall_start = time.perf_counter(), time.time()
    out = subprocess.run([sys.executable, __file__, "--native-loop", json.dumps(spec)], capture_output=True,
                         text=True)
    seconds, wall_end = time.perf_counter() - t0, time.time()
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    timeline = [TrialTimes(t["launched"], [tuple(e) for e in t["epochs"]], t["ended"]) for t in result["timeline"]]
    return (seconds - result["helpers_s"], result["trials"],
            breakdown(wall_start + result["helpers_s"], timeline, wall_end))


def native_loop(spec: dict) -> None:
    """What a user writes by hand: Optuna's ask/tell around horovodrun, pruning from train.py's output; prints
    its trials and timeline as one JSON line. `tracking_uri`: train.py tracks there as it does outside a study
    (its own run per trial, every complete trial logs its model); else it tracks nothing."""
    import optuna

    t_helpers = time.perf_counter()
    from mmp.backends.local import usable_cores
    from mmp.contract.argv import horovodrun_argv, train_args
    from mmp.contract.tuning import Tuning
    from mmp.runtime.horovod import find_horovodrun
    from mmp.tuning.study import PRUNER_STARTUP_TRIALS, distributions, make_sampler, trial_seed

    tuning = Tuning.model_validate(spec["tuning"])
    helpers_s = time.perf_counter() - t_helpers
    dataset, repo, fixed, tracking_uri = Path(spec["dataset"]), Path(spec["repo"]), spec["fixed"], spec["tracking_uri"]
    study = optuna.create_study(direction=tuning.direction, sampler=make_sampler(tuning),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no tracking: train.py skips it
    if tracking_uri:
        env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_NAME="native-optuna")
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(usable_cores())))
    dists = distributions(tuning)
    timeline = []
    for n in range(tuning.total_runs):
        study.sampler = make_sampler(tuning, seed=trial_seed(tuning.seed, n))  # as MMP seeds: the same draws
        trial = study.ask(dists)
        argv = horovodrun_argv([("localhost", 1)], train_args(str(dataset), str(repo.parent / f"out-{trial.number}"),
                                                               "digits", {**fixed, **trial.params}),
                               python=sys.executable, horovodrun=find_horovodrun() or "horovodrun")
        launched = time.time()
        proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        value, pruned, tail, epochs = None, False, [], []
        for line in proc.stdout:
            tail = (tail + [line])[-5:]
            match = EPOCH_LINE.search(line)
            if not match:
                continue
            step, value = int(match.group(1)), float(match.group(2))
            epochs.append((time.time(), float(EPOCH_SECONDS.search(line).group(1))))
            trial.report(value, step)
            if trial.should_prune():
                pruned = True
                os.killpg(proc.pid, signal.SIGTERM)
                break
        proc.stdout.close()
        code = proc.wait()
        timeline.append({"launched": launched, "epochs": epochs, "ended": time.time()})
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif code == 0 and value is not None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"native trial {trial.number} failed ({code}):", "".join(tail), file=sys.stderr)
    trials = [f"{t.number}:{t.state.name.lower()}" for t in study.trials] + [f"best {study.best_value:.4f}"]
    print(json.dumps({"helpers_s": helpers_s, "trials": trials, "timeline": timeline}))


def scaled_digits(home: Path, size: int) -> Path:
    """The digits dataset with its 8×8 images scaled to size×size (nearest neighbour, centred crop): the same
    labels and difficulty, a convolution's work of MNIST-sized images at size 28."""
    import numpy as np

    from mmp.contract.datasets import IDX_FILES, prepare_digits, write_idx

    dest = home / "datasets" / "digits"  # the name the experiments give
    if size == 8:
        return prepare_digits(dest)
    source = prepare_digits(home / "digits-8")
    dest.mkdir(parents=True, exist_ok=True)
    factor = -(-size // 8)
    cut = (8 * factor - size) // 2
    for image_file, label_file in IDX_FILES.values():
        images, labels = (read_idx(source / f"{name}.gz") for name in (image_file, label_file))
        big = np.kron(images, np.ones((1, factor, factor), dtype=np.uint8))[:, cut:cut + size, cut:cut + size]
        write_idx(dest / f"{image_file}.gz", np.ascontiguousarray(big))
        write_idx(dest / f"{label_file}.gz", labels)
    return dest


def read_idx(path: Path):
    """A gzipped unsigned-byte IDX file as a numpy array (the format mmp.contract.datasets writes)."""
    import gzip
    import struct

    import numpy as np

    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def versus_native(trials: int, rounds: int, image_size: int = 28, epochs: int = 10) -> None:
    """MMP's study (`mmp run`, as a user runs it) and the native loop, `rounds` interleaved pairs; prints the ratio."""
    from pipeline_overhead import stop_shared_server, wait_until  # bench/ is this script's folder

    home = Path(tempfile.mkdtemp(prefix="mmp-bench-versus-"))
    os.environ["MMP_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mmp.tracking import server as tracking_server

    try:
        from mmp.contract.tuning import Tuning

        dataset = scaled_digits(home, image_size)
        fixed = {"epochs": epochs}
        tuning_block = {**VERSUS, "Max_Runs": trials}
        tuning = Tuning.model_validate(tuning_block)
        repo = home / "versus"
        shutil.copytree(EXAMPLE, repo)
        (repo / "requirements.txt").unlink()  # both run in this venv: no per-run environment to build
        single = {"Platform": "local", "Dataset_Name": "digits", "Training_Instance": "local", "Hyperparameters": fixed}
        (repo / "experiment.json").write_text(json.dumps({**single, "Tuning": tuning_block}))
        env = {**os.environ, **GIT_ENV}
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
            subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)
        mmp = [str(Path(sys.executable).with_name("mmp")), "run", "--repo", str(repo), "-q"]
        # warm-up: one single run creates MLflow's store and leaves the shared tracking server that later
        # `mmp run`s use (mmp.tracking.server): the steady state of a laptop that has run anything before
        warm = home / "single.json"
        warm.write_text(json.dumps(single))
        subprocess.run([*mmp, str(warm)], check=True, capture_output=True)
        wait_until(tracking_server.serving_url, "the shared tracking server")
        print(f"MMP study vs native Optuna: examples/fashion/train.py on digits at {image_size}×{image_size}, "
              f"{epochs} epochs, {trials} trials, bayesian, "
              f"Early_Stopping, Seed {tuning.seed}, Parallel 1, load average {os.getloadavg()[0]:.1f}")
        ratios, tracked_ratios, phases = [], [], {"native": [], "MMP": []}
        for n in range(rounds):
            native_s, native_trials, native_phases = native_study(tuning_block, dataset, repo, fixed)
            tracked_s, tracked_trials, _ = native_study(tuning_block, dataset, repo, fixed,
                                                        tracking_server.serving_url())
            t0, wall_start = time.perf_counter(), time.time()
            out = subprocess.run([*mmp, "--json"], capture_output=True, text=True)
            mmp_s, wall_end = time.perf_counter() - t0, time.time()
            outcome = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
            assert out.returncode == 0, out.stderr[-2000:]
            ratios.append(mmp_s / native_s)
            tracked_ratios.append(mmp_s / tracked_s)
            phases["native"].append(native_phases)
            phases["MMP"].append(breakdown(wall_start, mmp_timeline(tracking_server.serving_url(), outcome["run_id"]),
                                           wall_end))
            print(f"round {n + 1}: native {native_s:.1f} s ({' '.join(native_trials)}); native with MLflow "
                  f"{tracked_s:.1f} s ({' '.join(tracked_trials)}); MMP {mmp_s:.1f} s ({outcome.get('message')}); "
                  f"ratio {mmp_s / native_s:.2f} ({mmp_s / tracked_s:.2f} to native with MLflow); "
                  f"load average {os.getloadavg()[0]:.1f}")
        print(f"MMP / native wall time: median {statistics.median(ratios):.2f} over {rounds} round(s) "
              f"(goal ≤ 1.2; load average now {os.getloadavg()[0]:.1f}); MMP / native with MLflow: median "
              f"{statistics.median(tracked_ratios):.2f}")
        print(f"where the time goes, seconds per study (median over rounds; {trials} trials):")
        print(f"{'phase':>18} {'native':>8} {'MMP':>8} {'MMP extra':>10}")
        for phase in PHASES:
            a, b = (statistics.median(p[phase] for p in phases[k]) for k in ("native", "MMP"))
            print(f"{phase:>18} {a:8.2f} {b:8.2f} {b - a:+10.2f}")
    finally:
        stop_shared_server(tracking_server)
        shutil.rmtree(home, ignore_errors=True)


def synthetic(params: dict) -> float:
    """A 4-parameter objective with its maximum 0 at lr=1e-2, momentum=0.9, layers=4, opt='adam'."""
    return -((math.log10(params["lr"]) + 2) ** 2 + 4 * (params["momentum"] - 0.9) ** 2
             + 0.1 * (params["layers"] - 4) ** 2 + (0 if params["opt"] == "adam" else 0.5))


def time_to_best(seeds: int, budget: int) -> None:
    import optuna

    from mmp.contract.tuning import Tuning
    from mmp.tuning.study import distributions, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranges = {"lr": {"Min": 1e-5, "Max": 1.0, "Scale": "log"}, "momentum": {"Min": 0.0, "Max": 0.99},
              "layers": {"Min": 1, "Max": 12}, "opt": {"Values": ["sgd", "adam", "rmsprop"]}}
    worst = synthetic({"lr": 1.0, "momentum": 0.0, "layers": 12, "opt": "sgd"})
    target = 0.01 * worst  # within 1 % of the objective's range from the optimum (0)
    print(f"\nsynthetic objective (optimum 0, worst {worst:.2f}); target ≥ {target:.3f}; "
          f"budget {budget} trials; {seeds} seeds")
    for strategy in ("random", "bayesian"):
        reached, bests, seconds = [], [], []
        for seed in range(seeds):
            tuning = Tuning.model_validate({"Objective_Metric": "score", "Strategy": strategy, "Max_Runs": budget,
                                            "Seed": seed, "Ranges": ranges})
            study = optuna.create_study(direction="maximize", sampler=make_sampler(tuning))
            dists = distributions(tuning)
            t0, hit = time.perf_counter(), None
            for n in range(budget):
                trial = study.ask(dists)
                value = synthetic(trial.params)
                study.tell(trial, value)
                if hit is None and value >= target:
                    hit = n + 1
            seconds.append(time.perf_counter() - t0)
            reached.append(hit if hit is not None else budget + 1)
            bests.append(study.best_value)
        hits = sum(r <= budget for r in reached)
        print(f"{strategy:>9}: reached the target in {hits}/{seeds} seeds; median trials to target "
              f"{statistics.median(reached):.0f}{'+' if statistics.median(reached) > budget else ''}; "
              f"median best {statistics.median(bests):.4f}; sampler time {statistics.median(seconds) * 1000:.0f} ms "
              f"per study")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-trials", type=int, default=6, help="trials per study, MMP vs native Optuna")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved MMP/native pairs")
    parser.add_argument("--image-size", type=int, default=28, help="MMP vs native: the digits scaled to this size")
    parser.add_argument("--epochs", type=int, default=10, help="MMP vs native: epochs per trial")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--skip-overhead", action="store_true", help="only the synthetic comparison")
    parser.add_argument("--versus-only", action="store_true", help="only MMP vs native Optuna")
    parser.add_argument("--native-loop", metavar="JSON", help=argparse.SUPPRESS)  # native_study's own process
    args = parser.parse_args()
    if args.native_loop:
        return native_loop(json.loads(args.native_loop))
    if not args.skip_overhead:
        versus_native(args.study_trials, args.rounds, args.image_size, args.epochs)
        if args.versus_only:
            return
        overhead(args.trials)
    time_to_best(args.seeds, args.budget)


if __name__ == "__main__":
    main()
