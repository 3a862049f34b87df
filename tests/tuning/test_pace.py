"""When a study reads a waiting trial's objective again (mmp.tuning.pace): at the steady tick until the
trial's steps show a pace, then seldom between steps and often around the step that is due."""

import pytest

from mmp.tuning.pace import FAST_TICKS, QUIET_MAX_TICKS, StepPace

TICK = 0.1


def paced(interval: float, *, steps: int = 2, start: float = 100.0) -> StepPace:
    pace = StepPace(TICK)
    for n in range(steps):
        pace.saw_step(start + n * interval)
    return pace


def test_no_pace_before_the_second_step():
    pace = StepPace(TICK)
    assert pace.next_read(5.0) == pytest.approx(5.0 + TICK)
    pace.saw_step(5.0)
    assert pace.next_read(5.0) == pytest.approx(5.0 + TICK)  # one step: its start-up is no interval


def test_quiet_until_shortly_before_the_step_is_due():
    pace = paced(1.0)  # steps at 100 and 101: the next is due at 102
    assert pace.next_read(101.0) == pytest.approx(101.5)  # quiet: 5 ticks at most
    assert pace.next_read(101.5) == pytest.approx(101.8)  # 20 % of the interval early
    assert pace.next_read(101.8) == pytest.approx(101.8 + FAST_TICKS * TICK)
    assert pace.next_read(102.5) == pytest.approx(102.5 + FAST_TICKS * TICK)  # late: still expected


def test_early_reads_are_bounded_in_ticks_for_long_steps():
    pace = paced(60.0)  # next due at 220: fast reads from 3 ticks before, one read at least every 5 ticks
    assert pace.next_read(160.0) == pytest.approx(160.0 + QUIET_MAX_TICKS * TICK)
    assert pace.next_read(219.5) == pytest.approx(219.7)


def test_a_step_overdue_by_a_whole_interval_falls_back_to_the_tick():
    pace = paced(0.5)  # due at 101.0
    assert pace.next_read(101.6) == pytest.approx(101.6 + TICK)
    pace.saw_step(103.0)  # it came at last: the new interval (2.5 s) is the pace now
    assert pace.next_read(103.0) == pytest.approx(103.0 + QUIET_MAX_TICKS * TICK)
    assert pace.next_read(104.5) == pytest.approx(105.0)  # quiet for at most 5 ticks
    assert pace.next_read(105.0) == pytest.approx(105.2)  # due at 105.5, fast from 3 ticks before


def test_the_tick_scales_every_read():
    pace = StepPace(15.0)  # the AWS runner's tick
    pace.saw_step(0.0)
    pace.saw_step(600.0)  # ten-minute epochs
    assert pace.next_read(600.0) == pytest.approx(675.0)  # quiet: once every 5 ticks
    assert pace.next_read(1155.0) == pytest.approx(1155.0 + 4.5)  # 45 s before due: every 0.3 ticks


def test_the_first_step_is_read_for_when_earlier_trials_reached_theirs():
    pace = StepPace(TICK, since=50.0, first_step_s=4.0)  # earlier trials took 4 s to their first step
    assert pace.next_read(50.0) == pytest.approx(50.0 + QUIET_MAX_TICKS * TICK)
    assert pace.next_read(53.5) == pytest.approx(53.7)  # due at 54, fast from 3 ticks before
    pace.saw_step(54.1)
    assert pace.startup == pytest.approx(4.1)  # what the study expects of its next trials
    assert pace.next_read(54.1) == pytest.approx(54.1 + TICK)  # one step: no pace between steps yet
    pace.saw_step(54.6)
    assert pace.next_read(54.6) == pytest.approx(55.0)  # every 0.5 s: due at 55.1, fast from 0.1 s before


def test_without_earlier_trials_the_first_step_is_read_each_tick():
    pace = StepPace(TICK, since=50.0, first_step_s=None)
    assert pace.next_read(50.0) == pytest.approx(50.0 + TICK)
