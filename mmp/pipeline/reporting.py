"""Where the pipeline reports: commit statuses and notifications.

Locally a status is a log line plus a JSON record under `$MMP_HOME/statuses/`, and a
notification a log line plus a JSON record under `$MMP_HOME/notifications/`. On AWS
the GitHub client sets commit statuses and SNS sends the e-mail; both implement
the same two small protocols here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Protocol

from mmp import config

log = logging.getLogger("mmp.pipeline")

STATES = ("pending", "success", "failure", "error")
DESCRIPTION_LIMIT = 140  # GitHub's limit for a commit status description
# One status per concern on a commit: a push that trains and promotes shows both.
TRAINING_CONTEXT = "mmp/training"
PROMOTION_CONTEXT = "mmp/promotion"


def short_description(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


class StatusReporter(Protocol):
    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str = TRAINING_CONTEXT) -> None: ...


class Notifier(Protocol):
    def notify(self, subject: str, message: str, record: dict) -> None: ...


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


class LocalStatusReporter:
    """Commit statuses as JSON lines per commit (what `mmp demo` and `mmp status` show)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or config.mmp_home() / "statuses")

    def report(self, repository: str, commit: str, state: str, description: str, target_url: str | None,
               context: str = TRAINING_CONTEXT) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        entry = {"state": state, "description": short_description(description), "target_url": target_url,
                 "context": context, "repository": repository, "sha": commit, "at": time.time()}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{_slug(repository)}-{commit}.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log.info("status %s for %s@%s: %s", state, repository, commit[:12], entry["description"])

    def history(self, repository: str, commit: str) -> list[dict]:
        path = self.root / f"{_slug(repository)}-{commit}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class LocalNotifier:
    """One JSON record per run outcome under `$MMP_HOME/notifications/`, and a log line."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or config.mmp_home() / "notifications")

    def notify(self, subject: str, message: str, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        key = record.get("run_id") or record.get("delivery_id") or f"{time.time():.6f}"
        (self.root / f"{_slug(str(key))}.json").write_text(
            json.dumps({"subject": subject, "message": message, **record}, indent=2, default=str)
        )
        log.info("%s — %s", subject, message)
