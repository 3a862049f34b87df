"""A trial's intermediate objective for the pruner: read in bounded pages, thinned to checkpoint steps.

Why: train.py may log its objective once per batch (10^5 steps and more). Reading the whole
history on every tick and reporting each step to Optuna (one storage transaction each) held
the study loop for hours, and cancel and Max_Runtime are only looked at between ticks. Here a
tick reads at most PAGE_ROWS new values of a trial, and reports only checkpoint steps: the
median pruner compares a trial's latest reported step with the other trials' values at that
same step, so a step is useful only if every trial reports it, and the checkpoints are the
same for every trial.
"""

from __future__ import annotations

import math
from typing import Any

PAGE_ROWS = 1000
DRAIN_PAGES = 50  # when a trial completes: the values it logged since the last tick, up to 50 000 rows
DENSE_STEPS = 100  # steps 0-99 are all checkpoints: an epoch-level metric keeps every value


def is_checkpoint(step: int) -> bool:
    """0 to 99, then steps with at most two significant digits (100, 110, …, 990, 1000, 1100, …):
    at most 90 per decade, so 10^6 steps make about 460 reports. Optuna refuses negative steps."""
    if step < DENSE_STEPS:
        return step >= 0
    return step % 10 ** (len(str(step)) - 2) == 0


def checkpoints(values: list[tuple[int, float]], after: int | None) -> list[tuple[int, float]]:
    """The checkpoint steps among (step, value) pairs in log order, later than `after`, in step order;
    a step written twice keeps its last value. NaN and infinities are left out (Optuna's median
    cannot use them)."""
    latest = {step: value for step, value in values
              if (after is None or step > after) and is_checkpoint(step) and math.isfinite(value)}
    return sorted(latest.items())


class IntermediateValues:
    """One trial's objective history, read page by page from where the previous read stopped, through the
    study's tracker (mmp.tracking: REST to a server, MLflow's store for SQLite)."""

    def __init__(self, tracker: Any, run_id: str, key: str, *, page_rows: int = PAGE_ROWS):
        self.tracker, self.run_id, self.key, self.page_rows = tracker, run_id, key, page_rows
        self._token: str | None = None  # the page being read (None: the first)
        self._seen = 0  # rows of that page already returned
        self.caught_up = False  # the last read reached the end of what was logged

    def read(self) -> list[tuple[int, float]]:
        """Up to `page_rows` (step, value) pairs logged since the last read, in log order."""
        rows, token = self.tracker.metric_page(self.run_id, self.key, max_results=self.page_rows,
                                               page_token=self._token)
        fresh = rows[self._seen:]
        self.caught_up = not token
        if self.caught_up:
            self._seen = len(rows)
        else:
            self._token, self._seen = token, 0
        return fresh
