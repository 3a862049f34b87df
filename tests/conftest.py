"""Shared test fixtures: an isolated MMP_HOME per test, the real GitHub/SageMaker
fixtures in tests/fixtures (sources in its README), the digits dataset, and example git repositories.

AWS tests run in REGION (eu-west-1, not the code's us-east-1 fallback) and under IAM enforcement:

- `aws_env` (moto in server mode) and any fixture that asks for `iam_enforced` check every
  AWS call a production code path makes (Prepare, Launch, Conclude, the janitor, the webhook
  Lambda, the runner task's kinds, the SageMaker and DLAMI containers, CodeBuild's `aws` CLI
  stand-in, the state machine's createTrainingJob.sync stand-in) against the policy of the
  role that makes it in production, as the Pulumi program renders it. The machinery, and the
  table of entry points (code path -> role), live in tests/iam_enforce/iam_calls.py.
- A call the role does not grant answers AccessDenied to the code, as AWS would, and fails the
  test naming the code path, the role and the action. A missing S3 key answers 403 unless the
  role has s3:ListBucket on the bucket.
- The test's resource names differ from the stack's: bind them with
  `iam_enforced.bind({"my-bucket": "ARTIFACTS", secret_arn: f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:GITHUB_TOKEN"})`
  (tokens: iam_calls.STACK_TOKENS).
- A subprocess is checked too when its environment keeps MMP_IAM_STATE and its PYTHONPATH
  starts with `iam_enforced.pythonpath` (use `iam_pythonpath(...)`).
- A test that shows a refusal on purpose calls `iam_enforced.expect_denied(action)`.
- `MMP_IAM_DOC=write pytest ...` rewrites the table in docs/infra.md from the calls recorded
  (`add` only adds rows); every run fails when a recorded call is missing from that table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLE = ROOT / "examples" / "fashion"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "MMP Test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "MMP Test", "GIT_COMMITTER_EMAIL": "test@example.com",
}


TEST_MARK = "MMP_TEST_PROCESS_MARK"

# The suite's AWS region and account. Not us-east-1, the code's fallback: a process that
# misses the stack's region then fails here as it would in the stack's own region.
REGION = "eu-west-1"
ACCOUNT = "123456789012"


EXIT_GRACE_SECONDS = 3


def kill_left_behind(mark: str, before: set[int] = frozenset()) -> list[str]:
    """Kill what a test left running: processes carrying its mark (own session, reparented to
    init, or not) and new descendants of this process, each with its own descendants.
    Returns their command lines."""
    import psutil

    from mmp.system.procs import processes_with_env

    # Live processes started under this test: they inherited its mark in their environment.
    leftovers = {p.pid: p for p in processes_with_env(TEST_MARK, mark)}
    for child in psutil.Process().children(recursive=True):  # those that cleared their environment
        try:
            if child.pid not in before and child.status() != psutil.STATUS_ZOMBIE:
                leftovers[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    # A process already on its way out is not left behind (sshd's per-connection process ends
    # just after its client closes): give each a moment to exit on its own, then kill the rest.
    _, still_running = psutil.wait_procs(list(leftovers.values()), timeout=EXIT_GRACE_SECONDS)
    described = []
    for proc in still_running:
        try:
            described.append(" ".join(proc.cmdline())[:120])
            for member in [*proc.children(recursive=True), proc]:
                member.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(still_running, timeout=10)
    return described


@pytest.fixture(autouse=True)
def no_process_left_behind(monkeypatch):
    """Whatever a test starts (servers, workers, MLflow, horovodrun) dies with it, passed or failed.

    Each test marks the environment its processes inherit; after the test's own fixtures have
    stopped what they started, anything still running is killed and reported as a warning.
    """
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    monkeypatch.setenv(TEST_MARK, mark)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield mark
    killed = kill_left_behind(mark, before)
    if killed:
        import warnings

        warnings.warn(f"test left {len(killed)} process(es) running, killed: {killed}", stacklevel=1)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite DB with its schema, made once per session (migrations take seconds): tests copy it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def mmp_home(tmp_path, monkeypatch, no_process_left_behind) -> Path:
    """Every test gets its own MMP_HOME, MLflow DB and git identity."""
    home = tmp_path / "mmp-home"
    home.mkdir()
    monkeypatch.setenv("MMP_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MMP_DATASETS",
                "MMP_WEBHOOK_SECRET", "GITHUB_TOKEN", "MMP_DEFAULT_PLATFORM", "GITLAB_TOKEN",
                "MMP_GITLAB_WEBHOOK_SECRET", "MMP_GITLAB_URL", "MMP_GITLAB_TOKEN_SECRET_ARN"):
        monkeypatch.delenv(var, raising=False)
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MMP_TRACKING_SERVER_IDLE", "0")  # `mmp run` leaves no server behind unless a test asks
    return home


@pytest.fixture(scope="session")
def _digits_once(tmp_path_factory) -> Path:
    from mmp.contract.datasets import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("datasets") / "digits")


@pytest.fixture
def digits(mmp_home, _digits_once) -> Path:
    """The digits dataset in IDX format, where the local backend looks for it."""
    target = mmp_home / "datasets" / "digits"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(_digits_once, target_is_directory=True)
    return target


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **GIT_ENV})
    return out.stdout.strip()


def commit_all(repo: Path, message: str = "change") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def make_repo(tmp_path):
    """Factory: a committed git repo made from examples/fashion, with overrides.

    make_repo(experiment={...}, files={"train.py": "..."}) -> Path
    """

    def _make(name: str = "fashion-demo", experiment: dict | None = None, files: dict | None = None,
              drop: tuple[str, ...] = ()) -> Path:
        repo = tmp_path / name
        shutil.copytree(EXAMPLE, repo)
        if experiment is not None:
            (repo / "experiment.json").write_text(json.dumps(experiment, indent=2))
        for rel, text in (files or {}).items():
            path = repo / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for rel in drop:
            (repo / rel).unlink()
        git(repo, "init", "-q", "-b", "main")
        commit_all(repo, "initial")
        return repo

    return _make


@pytest.fixture
def fixture_json():
    def _load(rel: str):
        return json.loads((FIXTURES / rel).read_text())

    return _load


def run_at_once(code: str, n: int, go: Path, timeout: float = 240) -> list[tuple[int, str]]:
    """Race test: `python -c code GO I` in n processes (I = 0..n-1) that each wait for the file GO,
    made once all have started, so they hit the shared resource together. (exit code, output) of each."""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go), str(i)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    try:
        go.touch()
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """moto in server mode on a free 127.0.0.1 port: a real HTTP endpoint for botocore."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


IAM_DIR = ROOT / "tests" / "iam_enforce"
sys.path.insert(0, str(IAM_DIR))  # iam_calls: also what a checked subprocess imports by this name
import iam_calls  # noqa: E402
import iam_doc  # noqa: E402


def iam_pythonpath(*rest: str) -> str:
    """PYTHONPATH for a subprocess whose AWS calls are checked too (it loads iam_enforce/sitecustomize.py)."""
    return os.pathsep.join([str(IAM_DIR), *rest])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist (`make test` runs two workers): a worker's recorded calls join the controller's."""
    iam_doc.merge(node.config, getattr(node, "workeroutput", {}).get(iam_doc.WORKER_OUTPUT, []))


def pytest_sessionfinish(session, exitstatus):
    """docs/infra.md's table of calls per role: rewritten (MMP_IAM_DOC=write) or checked, by the
    controller once every worker's calls are in (a worker's own verdict would not fail the run)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[iam_doc.WORKER_OUTPUT] = iam_doc.recorded(session.config)
        return
    mode = os.environ.get("MMP_IAM_DOC")
    problem = iam_doc.finish(session.config, write=mode == "write", add=mode == "add")
    if problem:
        session.config.get_terminal_writer().line(problem, red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def iam_policies() -> dict:
    """The stack's role policies (every role: FSx and DLAMI on), rendered once, stack names tokenised."""
    done = subprocess.run([sys.executable, str(IAM_DIR / "render_policies.py")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if done.returncode:
        pytest.fail(f"rendering the stack's policies failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return {name: iam_calls.tokenise_policy(doc) for name, doc in json.loads(out).items()}


class IamEnforcement:
    """One test's view of the checked calls (see this module's docstring)."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self.expected: set[str] = set()
        self.pythonpath = iam_pythonpath(str(ROOT))
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)

    def bind(self, names: dict[str, str]) -> None:
        self.state["bindings"].update(names)
        self._write()

    def subprocess_env(self, as_code_path: str | None = None) -> dict[str, str]:
        """What a subprocess's environment needs for its calls to be checked; `as_code_path`
        ("code path=role") makes all of them that role's (a container's process tree)."""
        env = {"PYTHONPATH": self.pythonpath, iam_calls.STATE_ENV: str(self.path)}
        if as_code_path:
            env[iam_calls.AS_ENV] = as_code_path
        return env

    def expect_denied(self, action: str) -> None:
        self.expected.add(action)

    def calls(self) -> list:
        return iam_calls.read_calls(self.state["log"])


@pytest.fixture(scope="session")
def iam_state_path(tmp_path_factory) -> Path:
    """One path for the state of the test now enforcing (gone between tests): the real sshd's
    sessions (DLAMI hosts) are told it once, in its config."""
    return tmp_path_factory.mktemp("iam") / "state.json"


@pytest.fixture
def iam_enforced(iam_policies, iam_state_path, tmp_path, monkeypatch, request):
    state = {"policies": iam_policies, "bindings": {}, "log": str(tmp_path / "iam-calls.jsonl"), "account": ACCOUNT}
    enforcement = IamEnforcement(iam_state_path, state)
    monkeypatch.setenv(iam_calls.STATE_ENV, str(enforcement.path))
    iam_calls.install()
    yield enforcement
    iam_state_path.unlink(missing_ok=True)
    calls = enforcement.calls()
    iam_doc.collect(request.config, calls)
    refused = [c for c in calls if not c.allowed and c.action not in enforcement.expected]
    if refused:
        lines = sorted({f"{c.code_path} (role {c.role}): {c.action} on {c.resource}"
                        f"{' - ' + c.note if c.note else ''}" for c in refused})
        pytest.fail("AWS calls the role does not grant in production:\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture
def aws_env(moto_server, monkeypatch, iam_enforced) -> str:
    """Every boto3 client (through mmp.aws.client) talks to a freshly reset moto server."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).read()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    from mmp import aws

    aws._SECRETS.clear()
    return moto_server


def create_bucket(s3, name: str) -> None:
    """A bucket in the client's region (outside us-east-1, S3 wants the location said)."""
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": s3.meta.region_name})


@contextmanager
def mlflow_server(root: Path, *artifact_args: str):
    """A real `mlflow server` on a free port over SQLite in `root`; yields its URL."""
    port = free_port()
    args = list(artifact_args) or ["--default-artifact-root", (root / "artifacts").as_uri(), "--no-serve-artifacts"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", *args],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:  # already gone (the leftover-process guard may have stopped it)
            pass
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def start_worker(mmp_home):
    """Factory for real worker processes (`python -m mmp.pipeline.worker ARGS`, extra environment as
    keywords, e.g. MMP_CRASH_AT); every one still running is stopped at teardown (SIGTERM: it cancels
    its job and tears it down; SIGKILL after a minute). Their output goes to `start_worker.log`."""
    procs: list[subprocess.Popen] = []
    log = mmp_home / "worker-test.log"

    def _start(*args: str, **env: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mmp.pipeline.worker", *args],
                                    env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=out,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    _start.log = log
    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
