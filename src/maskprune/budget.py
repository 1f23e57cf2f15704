"""A run that fits the time a user gives it (``--minutes``): the clock starts with the run, the stages before the
training take what they take, and the training's step count is set from its own measured pace so that the run,
its evaluations and export included, ends by the deadline.

Pure bookkeeping, no torch: :class:`TimeBudget` holds the deadline and what the run needs after its last step
(``reserve``, measured where the run has measured it: the cut's own export and evaluation of a model of the
student's size); :class:`Pacer` turns the seconds the steps took into the step count that fits."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

__all__ = ["TimeBudget", "Pacer", "fitting_steps", "after_steps"]

MARGIN = 1.25
"""What the reserve measured after the last step is multiplied by: the export and evaluations of the distilled
model vary a little from those they are measured on."""


def fitting_steps(done: int, seconds_left: float, seconds_per_step: float, cap: int) -> int:
    """The total step count that fits: the ``done`` steps and as many more as ``seconds_left`` pays for at
    ``seconds_per_step``, at most ``cap`` (never fewer than ``done``)."""
    if seconds_per_step <= 0.0:
        return max(done, cap)
    more = int(max(0.0, seconds_left) // seconds_per_step)
    return max(done, min(cap, done + more))


def after_steps(seconds: dict) -> float:
    """Seconds a distillation needs after its last step, from the phases a run measured on a model of the student's
    size (a cut's own ``*_exported`` phases, or a distillation's ``*_dense`` ones, its student's): the perplexity
    and the zero-shot tasks of the export, the export itself (fold, save, reload, parity; where not measured, the
    load), times :data:`MARGIN`."""
    ppl = seconds.get("eval_exported", seconds.get("eval_dense", 0.0))
    tasks = seconds.get("zeroshot_exported", seconds.get("zeroshot_dense", 0.0))
    export = seconds.get("export", seconds.get("load", 0.0))
    return MARGIN * (ppl + tasks + export)


@dataclasses.dataclass
class TimeBudget:
    """``minutes`` for the whole run from ``started`` (``time.monotonic()``); ``reserve``: seconds the run needs
    after its last training step (the final validation, the export, the evaluations)."""

    minutes: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    reserve: float = 0.0
    clock: Callable[[], float] = time.monotonic

    @property
    def deadline(self) -> float:
        return self.started + 60.0 * self.minutes

    def left(self) -> float:
        """Seconds left for training steps: to the deadline, less the reserve."""
        return self.deadline - self.clock() - self.reserve

    def elapsed_minutes(self) -> float:
        return (self.clock() - self.started) / 60.0


class Pacer:
    """Called after every training step with the steps done; returns the step count the budget allows (or None
    while it has not measured enough). The first ``warmup`` steps (allocation, first-touch) are not timed; then
    the pace is the mean over every step since, validation passes included, re-measured every ``every`` steps, so
    the count follows the run's real pace (a noisy neighbour, a slower validation) to the end. ``cap``: the most
    steps the run may take (one pass over the calibration windows: steps past it see windows again)."""

    def __init__(self, budget: TimeBudget, cap: int, *, warmup: int = 2, every: int = 5) -> None:
        self.budget, self.cap, self.warmup, self.every = budget, cap, warmup, every
        self._since: tuple[int, float] | None = None
        self.seconds_per_step: float | None = None

    def start(self) -> int:
        """The step count before any step: the cap, or 0 where the budget is spent already."""
        return self.cap if self.budget.left() > 0.0 else 0

    def __call__(self, done: int) -> int | None:
        now = self.budget.clock()
        if self._since is None:
            if done >= self.warmup:
                self._since = (done, now)
            return None
        first, t0 = self._since
        if (done - first) % self.every:
            return None
        self.seconds_per_step = (now - t0) / (done - first)
        return fitting_steps(done, self.budget.left(), self.seconds_per_step, self.cap)
