"""When to read a running trial's objective again: often where its next step is due, seldom before.

Why: with Early_Stopping the study reads each trial's objective from MLflow, and a train.py that
waits for the pruner's verdict at each step waits for that read. A steady tick is a trade: short,
and its reads take CPU from training on a machine with few cores (the local platform); long, and
every step waits for it. Steps come at a steady pace (an epoch, a fixed number of batches), so the
next one is due about one step interval after the last: read often from shortly before then, and
seldom between.
"""

from __future__ import annotations

# In ticks (the study's read interval where no pace is known: 0.1 s on the local stack, 15 s on AWS):
FAST_TICKS = 0.3  # read this often from shortly before a step is due until a new one is seen;
EARLY_SHARE = 0.2  # fast reads start this share of the step interval before the step is due,
EARLY_MAX_TICKS = 3  # but no earlier than this;
QUIET_MAX_TICKS = 5  # and between steps, a read at least this often (a step may come early)


class StepPace:
    """One trial's steps as the study sees them arrive (monotonic seconds). `tick`: the read interval while no
    pace is known (its second step, or once a step is overdue by a whole interval). `since` and `first_step_s`:
    when the trial was launched and how long earlier trials of the study took to their first step (start-up:
    the same imports and data), so that the first step too is read for when it is due."""

    def __init__(self, tick: float, since: float | None = None, first_step_s: float | None = None):
        self.tick = tick
        self.since = since
        self.steps = 0
        self.startup: float | None = None  # launch to first step seen, once seen (for the study's next trials)
        self.last_seen = since if first_step_s is not None else None
        self.interval = first_step_s if since is not None else None

    def saw_step(self, now: float) -> None:
        """A read found new steps at `now`."""
        if not self.steps and self.since is not None:
            self.startup = now - self.since
        self.interval = now - self.last_seen if self.steps and self.last_seen is not None else None
        self.last_seen = now
        self.steps += 1

    def next_read(self, now: float) -> float:
        """When to read next, after a read at `now`."""
        if self.interval is None or self.last_seen is None:
            return now + self.tick
        due = self.last_seen + self.interval
        if now > due + self.interval:  # not at the old pace (a long evaluation, the end): the steady tick
            return now + self.tick
        early = due - min(EARLY_SHARE * self.interval, EARLY_MAX_TICKS * self.tick)
        if now < early:
            return min(early, now + QUIET_MAX_TICKS * self.tick)
        return now + FAST_TICKS * self.tick
