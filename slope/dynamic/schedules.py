"""Schedules of dynamic sparse training: how sparse (gradual pruning) and how much to swap (RigL).

A sparsity schedule is any callable ``schedule(step, total_steps) -> sparsity`` (``step``: optimizer
steps done, ``0 … total_steps``; sparsity in ``[0, 1)``), like the seed's linear example::

    def sparsity_schedule(step, total_steps):
        return 0.1 + 0.8 * min(1.0, step / total_steps)

:class:`CubicSchedule` is the default of gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or
not to prune"): ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` between ``t_0`` and
``t_1``, ``s_i`` before, ``s_f`` after; it prunes fast while many redundant weights remain and
slowly near the target. :func:`rigl_fraction` is RigL's cosine decay of the update fraction.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CubicSchedule", "LinearSchedule", "SCHEDULES", "resolve_schedule", "rigl_fraction"]


def rigl_fraction(initial: float, step: int, end_step: int) -> float:
    """RigL's ``f_decay(t) = α/2 · (1 + cos(π t / T_end))`` (Evci et al. 2020): ``initial`` at
    ``step`` 0, 0 from ``end_step`` on."""
    return 0.5 * initial * (1.0 + math.cos(math.pi * min(step, end_step) / end_step))


@dataclass(frozen=True)
class _Ramp:
    """From ``initial_sparsity`` to ``final_sparsity`` between fractions ``begin`` and ``end`` of training."""

    final_sparsity: float
    initial_sparsity: float = 0.0
    begin: float = 0.0
    end: float = 0.75

    def __post_init__(self):
        for name in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{type(self).__name__}: {name} must be in [0, 1), got {value!r}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"{type(self).__name__}: initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
        if not 0.0 <= self.begin < self.end <= 1.0:
            raise ValueError(f"{type(self).__name__}: need 0 <= begin < end <= 1 (fractions of training), got {self.begin}, {self.end}")

    def progress(self, step: int, total_steps: int) -> float:
        """Where ``step`` lies in the ramp: 0 before ``begin``, 1 after ``end``."""
        t = step / total_steps
        return min(1.0, max(0.0, (t - self.begin) / (self.end - self.begin)))


class CubicSchedule(_Ramp):
    """Zhu & Gupta's cubic ramp (module docstring); ``CubicSchedule(0.5)`` reaches 50 % at 75 % of training."""

    def __call__(self, step: int, total_steps: int) -> float:
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - self.progress(step, total_steps)) ** 3


class LinearSchedule(_Ramp):
    """A straight ramp from ``initial_sparsity`` to ``final_sparsity``."""

    def __call__(self, step: int, total_steps: int) -> float:
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_i + (s_f - s_i) * self.progress(step, total_steps)


#: Named schedules (CLI ``--sparsity-schedule``); ``"constant"``: no gradual pruning (a static mask).
SCHEDULES = {"cubic": CubicSchedule, "linear": LinearSchedule, "constant": None}


def resolve_schedule(schedule: Callable[[int, int], float] | str | None, final_sparsity: float,
                     use_rigl: bool) -> Callable[[int, int], float] | None:
    """The gradual-pruning schedule of a run, or ``None`` for a mask pruned once at the start.

    ``None`` means cubic to ``final_sparsity`` without RigL and none with RigL (RigL trains at a
    fixed sparsity); a name of :data:`SCHEDULES` ramps from 0 to ``final_sparsity``; a callable
    is used as is (its values are the sparsities)."""
    if schedule is None:
        return None if use_rigl else CubicSchedule(final_sparsity)
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown sparsity_schedule {schedule!r}; use one of {sorted(SCHEDULES)} or a callable (step, total_steps) -> sparsity")
        cls = SCHEDULES[schedule]
        return None if cls is None else cls(final_sparsity)
    if not callable(schedule):
        raise TypeError(f"sparsity_schedule must be a callable (step, total_steps) -> sparsity or a name, got {type(schedule).__name__}")
    return schedule
