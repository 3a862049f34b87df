"""`mmp demo`: the whole GitOps story on a sample repository, start to finish.

Steps, each a function over one `DemoContext`, run in order by `run_demo`:
prepare the digits dataset, make a repository from examples/fashion, start the
local stack (webhook + worker, MLflow UI with --ui), install the hook, commit two
experiment.json files with different hyperparameters, wait for both runs, show the
commit statuses and MLflow runs, then `finale`: the leaderboard, promotion of the
best run and one prediction from the served model.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmp import config
from mmp.hosts import localgit as gitutil

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion"
REPO_NAME = "fashion-demo"
WAIT_S = 600
EXPERIMENTS = (
    {"epochs": "1", "batch-size": "32", "lr": "0.01"},
    {"epochs": "2", "batch-size": "16", "lr": "0.05"},
)
GIT_IDENTITY = ("-c", "user.name=MMP Demo", "-c", "user.email=demo@mmp.invalid")


class DemoError(RuntimeError):
    pass


@dataclass
class DemoContext:
    workdir: Path
    say: Callable[[str], None]
    ui: bool = False
    mlflow_port: int = 5000
    repo: Path | None = None
    stack: Any = None
    commits: list[str] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)
    experiment_name: str = REPO_NAME


@dataclass
class DemoResult:
    repo: Path
    commits: list[str]
    runs: list[Any]
    statuses: dict[str, list[dict]]

    @property
    def ok(self) -> bool:
        return len(self.runs) == len(self.commits) and all(r is not None and r.state == "SUCCEEDED" for r in self.runs)


def prepare_dataset(ctx: DemoContext) -> None:
    from mmp.contract.datasets import load_catalogue, missing_files, prepare_digits

    folder = load_catalogue()["digits"].local_path()
    if folder.is_dir() and not missing_files(folder):
        ctx.say(f"1. dataset: digits already at {folder}")
        return
    prepare_digits(folder)
    ctx.say(f"1. dataset: prepared digits (scikit-learn, offline) at {folder}")


def make_repository(ctx: DemoContext) -> None:
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    repo = ctx.workdir / REPO_NAME
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(EXAMPLE, repo)
    gitutil.git(repo, "init", "-q", "-b", "main")
    gitutil.git(repo, "add", "-A")
    gitutil.git(repo, *GIT_IDENTITY, "commit", "-q", "-m", "train.py from examples/fashion")
    ctx.repo = repo
    ctx.say(f"2. repository: {repo} (train.py + experiment.json from examples/fashion)")


def start_stack(ctx: DemoContext) -> None:
    from mmp.local.stack import LocalStack, StackRunning

    try:
        ctx.stack = LocalStack(port=0, mlflow_port=ctx.mlflow_port, ui=ctx.ui, say=ctx.say).start()
    except StackRunning as exc:  # an `mmp up` already serves this MMP_HOME
        raise DemoError(str(exc)) from None
    ctx.say(f"3. local stack: webhook {ctx.stack.server.url}, worker running"
            + (f", MLflow UI {ctx.stack.ui_url}" if ctx.stack.ui else ""))


def install_hook(ctx: DemoContext) -> None:
    from mmp.hosts.hooks import install

    path = install(ctx.repo, url=ctx.stack.server.url)
    ctx.say(f"4. hook: {path.name} installed → every commit posts a signed push event")


def commit_experiments(ctx: DemoContext) -> None:
    for i, hyper in enumerate(EXPERIMENTS, start=1):
        experiment = json.loads((ctx.repo / "experiment.json").read_text())
        experiment["Hyperparameters"] = json.dumps(hyper)
        (ctx.repo / "experiment.json").write_text(json.dumps(experiment, indent=2) + "\n")
        gitutil.git(ctx.repo, "add", "experiment.json")
        gitutil.git(ctx.repo, *GIT_IDENTITY, "commit", "-q", "-m", f"experiment {i}: {hyper}")
        sha = gitutil.resolve(ctx.repo)
        ctx.commits.append(sha)
        ctx.say(f"5.{i} git commit {sha[:7]}: Hyperparameters {hyper}")


def wait_for_runs(ctx: DemoContext, timeout: float = WAIT_S) -> None:
    from mmp.pipeline.queue import JobQueue
    from mmp.pipeline.store import RunStore

    queue, store = JobQueue(), RunStore()
    deadline = time.time() + timeout
    pending = list(ctx.commits)
    ctx.say(f"6. waiting for {len(pending)} runs (worker log: {config.mmp_home() / 'logs' / 'worker.log'})")
    finished: dict[str, Any] = {}
    while pending and time.time() < deadline:
        for sha in list(pending):
            jobs = queue.list(commit=sha, limit=1)
            if jobs and jobs[0].state in ("done", "failed"):
                finished[sha] = jobs[0]
                pending.remove(sha)
                run = store.get(jobs[0].run_id) if jobs[0].run_id else None
                ctx.say(f"   {sha[:7]}: {run.state if run else jobs[0].state} — {jobs[0].message[:100]}")
        if ctx.stack is not None and ctx.stack.worker_proc is not None and ctx.stack.worker_proc.poll() is not None:
            raise DemoError(f"the worker exited ({ctx.stack.worker_proc.returncode}); "
                            f"see {config.mmp_home() / 'logs' / 'worker.log'}")
        time.sleep(0.5)
    if pending:
        raise DemoError(f"runs for {', '.join(s[:7] for s in pending)} did not finish in {timeout:.0f}s")
    ctx.jobs = [finished[sha] for sha in ctx.commits]
    ctx.runs = [store.get(j.run_id) if j.run_id else None for j in ctx.jobs]
    for run in ctx.runs:
        if run is not None:
            ctx.experiment_name = run.experiment


def show_results(ctx: DemoContext) -> dict[str, list[dict]]:
    from mmp.pipeline.reporting import LocalStatusReporter
    from mmp.pipeline.runs import mlflow_link

    reporter = LocalStatusReporter()
    repository = gitutil.repository_name(ctx.repo)
    statuses = {}
    ctx.say("7. commit statuses and MLflow runs:")
    for sha, run in zip(ctx.commits, ctx.runs):
        history = reporter.history(repository, sha)
        statuses[sha] = history
        trail = " → ".join(h["state"] for h in history) or "(none)"
        ctx.say(f"   {sha[:7]} statuses: {trail}")
        if run is not None:
            link = mlflow_link(run.run_url) if run.run_url else ""
            ctx.say(f"           run {run.run_id} {run.state}. {link}")
    ctx.say(f"   MLflow experiment {ctx.experiment_name!r} in {config.tracking_uri()}; "
            "browse with `mmp up` and open the MLflow URL")
    return statuses


def finale(experiment_name: str, console: Any = None) -> None:
    """The leaderboard, promotion of the best run, and one prediction from the served model,
    printed on `console` (a rich Console; None: a plain one on stdout)."""
    from mmp.models.finale import demo_finale

    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    demo_finale(experiment_name, console)


def run_demo(workdir: Path | None = None, *, ui: bool = False, mlflow_port: int = 5000,
             say: Callable[[str], None] = print, timeout: float = WAIT_S, console: Any = None) -> DemoResult:
    ctx = DemoContext(workdir=Path(workdir or config.mmp_home() / "demo"), say=say, ui=ui, mlflow_port=mlflow_port)
    try:
        prepare_dataset(ctx)
        make_repository(ctx)
        start_stack(ctx)
        install_hook(ctx)
        commit_experiments(ctx)
        wait_for_runs(ctx, timeout)
        statuses = show_results(ctx)
        if ctx.runs and all(r is not None and r.state == "SUCCEEDED" for r in ctx.runs):
            finale(ctx.experiment_name, console)
        if ui:
            say(f"MLflow UI at {ctx.stack.ui_url}; Ctrl-C stops the stack")
            ctx.stack.serve()
    finally:
        if ctx.stack is not None:
            ctx.stack.stop()
    return DemoResult(repo=ctx.repo, commits=ctx.commits, runs=ctx.runs, statuses=statuses)
