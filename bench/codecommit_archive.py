"""The commit's archive from CodeCommit: GetFolder + GetBlob (what Prepare does) against git itself.

A 500-file repository (25 folders of 20 files, 2 KiB each, about 1 MiB) is served by MMP's
CodeCommit stand-in (tests/codecommit_standin.py: the real boto3 client over HTTP, a real git
repository behind it). The API archive is timed with 1 and with 8 GetBlob calls in flight, at
the stand-in's own speed and with a fixed delay added to every answer to stand for a real
round trip (20 and 50 ms: assumed figures for an in-region API call; only a real CodeCommit
account can measure it). The git side is timed on the same repository: a shallow clone over
git's pack protocol (`git clone --depth 1 --no-local file://`) plus `git archive`, the lower bound
of "fetch over git with the credential helper" (which also needs a git binary in the Lambda:
the python3.11 runtime has none).

Run: .venv/bin/python bench/codecommit_archive.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FOLDERS, PER_FOLDER, SIZE = 25, 20, 2048
ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com", "GIT_COMMITTER_NAME": "bench",
       "GIT_COMMITTER_EMAIL": "b@example.com"}


def make_repo(path: Path) -> str:
    path.mkdir()
    run = lambda *a: subprocess.run(["git", "-C", str(path), *a], check=True, capture_output=True,  # noqa: E731
                                    env={**os.environ, **ENV}).stdout.decode().strip()
    run("init", "-q", "-b", "main")
    for f in range(FOLDERS):
        folder = path / f"pkg{f:02}"
        folder.mkdir()
        for i in range(PER_FOLDER):
            (folder / f"mod{i:02}.py").write_bytes(os.urandom(SIZE // 2).hex().encode())
    (path / "train.py").write_text("print('train')\n")
    run("add", "-A")
    run("commit", "-q", "-m", "500 files")
    return run("rev-parse", "HEAD")


def main() -> None:
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "eu-west-1"})
    from mmp.hosts.codecommit import CodeCommitClient
    from tests.codecommit_standin import CodeCommitStandIn

    tmp = Path(tempfile.mkdtemp(prefix="mmp-bench-cc-"))
    try:
        repo = tmp / "bench"
        sha = make_repo(repo)
        files = int(subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", sha], check=True,
                                   capture_output=True).stdout.count(b"\n"))
        print(f"repository: {files} files in {FOLDERS + 1} folders, {FOLDERS * PER_FOLDER * SIZE // 1024} KiB")
        print(f"{'path':<44} {'calls':>6} {'seconds':>8}")
        with CodeCommitStandIn() as standin:
            os.environ["AWS_ENDPOINT_URL_CODECOMMIT"] = standin.url
            standin.add("bench", repo)
            client = CodeCommitClient()
            client.archive("bench", sha)  # warm: connections, git's object cache
            for latency in (0.0, 0.020, 0.050):
                standin.latency = latency
                for workers in (1, 8):
                    standin.calls.clear()
                    start = time.perf_counter()
                    data = client.archive("bench", sha, workers=workers)
                    took = time.perf_counter() - start
                    label = f"API, {workers} in flight, +{latency * 1000:.0f} ms/call"
                    print(f"{label:<44} {len(standin.calls):>6} {took:>8.2f}   ({len(data) // 1024} KiB tar.gz)")
        start = time.perf_counter()
        clone = tmp / "clone"
        subprocess.run(["git", "clone", "-q", "--depth", "1", "--no-local", f"file://{repo}", str(clone)], check=True)
        cloned = time.perf_counter() - start
        data = subprocess.run(["git", "-C", str(clone), "archive", "--format=tar.gz", "HEAD"], check=True,
                              capture_output=True).stdout
        took = time.perf_counter() - start
        print(f"{'git clone --depth 1 (pack protocol, local)':<44} {'-':>6} {cloned:>8.2f}")
        print(f"{'  + git archive':<44} {'-':>6} {took:>8.2f}   ({len(data) // 1024} KiB tar.gz)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
