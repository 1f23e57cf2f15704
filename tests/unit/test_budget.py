"""The time budget's bookkeeping (``--minutes``): the step count that fits the time left at the measured pace, the
pacer that re-measures it as the steps go, and the defaults the configuration settles."""

from __future__ import annotations

import pytest

from maskprune.budget import Pacer, TimeBudget, after_steps, fitting_steps
from maskprune.config import DEFAULT_MINUTES, load_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_steps_that_fit_the_time_left():
    assert fitting_steps(10, 30.0, 0.5, 1000) == 70  # 60 more steps at 0.5 s
    assert fitting_steps(10, 30.0, 0.5, 50) == 50  # at most the cap
    assert fitting_steps(10, -5.0, 0.5, 1000) == 10  # time is up: never fewer than those done
    assert fitting_steps(0, 10.0, 0.0, 7) == 7


def test_the_pacer_follows_the_pace_and_ends_by_the_deadline():
    clock = FakeClock()
    budget = TimeBudget(1.0, started=0.0, reserve=6.0, clock=clock)  # 60 s, 6 of them after the last step
    clock.now = 4.0  # the stages before the steps
    pacer = Pacer(budget, cap=10_000, warmup=2, every=5)
    assert pacer.start() == 10_000
    total, done = None, 0
    while total is None or done < total:
        done += 1
        clock.now += 3.0 if done <= 2 else 0.5  # slow first steps (not timed), then 0.5 s a step
        if done == 40:
            clock.now += 2.0  # a validation pass: counted in the pace from then on
        new = pacer(done)
        total = new if new is not None else total
        assert done < 200
    assert clock.now <= 60.0 - 6.0 + 0.5  # the last step ends by the deadline less the reserve (one step's slack)
    assert clock.now >= 60.0 - 6.0 - 3 * 0.5  # and the budget is spent, not wasted
    assert pacer.seconds_per_step == pytest.approx(0.5, rel=0.1)  # the validation amortised over the steps


def test_a_budget_spent_before_the_first_step_leaves_none():
    clock = FakeClock()
    budget = TimeBudget(0.5, started=0.0, reserve=5.0, clock=clock)
    clock.now = 29.0
    assert Pacer(budget, cap=100).start() == 0


def test_the_reserve_is_measured_on_a_model_of_the_students_size():
    cut = {"eval_exported": 20.0, "zeroshot_exported": 30.0, "export": 4.0, "eval_dense": 99.0}
    assert after_steps(cut) == pytest.approx(1.25 * (20.0 + 30.0 + 4.0))
    student = {"eval_dense": 10.0, "load": 2.0}  # a distillation: its student's evaluation at the start
    assert after_steps(student) == pytest.approx(1.25 * (10.0 + 2.0))


def test_the_default_run_takes_ten_minutes_and_steps_fix_the_count():
    default = load_config(None, {})
    assert default.minutes == DEFAULT_MINUTES and default.steps == default.calib_samples // default.batch_size
    fixed = load_config(None, {"steps": 50})
    assert fixed.minutes is None and fixed.steps == 50
    both = load_config(None, {"steps": 50, "minutes": 2})  # the budget buys at most 50 steps
    assert (both.minutes, both.steps) == (2.0, 50)
    one_shot = load_config(None, {"method": "flap"})  # nothing distils: no budget
    assert one_shot.minutes is None
    off = load_config(None, {"minutes": None})
    assert off.minutes is None and off.steps == 400
    with pytest.raises(Exception, match="minutes must be a time budget"):
        load_config(None, {"minutes": 0})
