"""The finite-loss guard of ``slope train``: a diverged run stops with a clear error and never
writes a checkpoint holding non-finite numbers.

- A step whose loss or gradients are not finite is skipped (neither optimizer updates; fp16
  also halves its loss scale, down to ``--fp16-min-scale``). :meth:`FiniteGuard.record` counts
  consecutive skipped steps and raises :class:`DivergenceError` once ``--nonfinite-patience`` are
  exceeded: no endless skipping.
- :func:`check_finite` runs before every save: weights, buffers and optimizer moments must all be
  finite, and so must the loss of the step being saved; otherwise nothing is written and the
  previous checkpoint stays.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["DivergenceError", "FiniteGuard", "check_finite", "first_nonfinite"]


class DivergenceError(RuntimeError):
    """The run produced non-finite losses, gradients or weights; the message says what to change."""


class FiniteGuard:
    """Counts consecutive skipped steps; ``patience``: how many in a row are tolerated."""

    def __init__(self, patience: int):
        self.patience = patience
        self.streak = 0
        self.last_good_step: int | None = None

    def record(self, step: int, loss: float, skipped: bool, detail: str = "") -> None:
        """Note the outcome of ``step``; raise :class:`DivergenceError` when more than ``patience``
        steps in a row were skipped (``detail``: e.g. the fp16 loss scale, for the message)."""
        if not skipped:
            self.streak, self.last_good_step = 0, step
            return
        self.streak += 1
        if self.streak > self.patience:
            since = f"since step {self.last_good_step}" if self.last_good_step is not None else "since the start"
            raise DivergenceError(
                f"step {step}: {self.streak} steps in a row skipped for a non-finite loss or gradients ({since}; "
                f"last loss {loss}{', ' + detail if detail else ''}): the run diverged, so it stops without saving; "
                "lower --lr (or use --precision bf16/fp32), then --resume from the last checkpoint "
                "(or raise --nonfinite-patience)"
            )


def first_nonfinite(tensors: Iterable[tuple[str, object]]) -> str | None:
    """The name of the first floating tensor with an inf/nan among ``(name, value)`` pairs (values
    may be nested dicts/lists, like optimizer states), or None."""
    for name, value in tensors:
        if isinstance(value, Mapping):
            found = first_nonfinite((f"{name}.{k}", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            found = first_nonfinite((f"{name}.{i}", v) for i, v in enumerate(value))
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            found = name
        else:
            found = None
        if found is not None:
            return found
    return None


def check_finite(step: int, loss: float, states: Mapping[str, object], *, agree: bool = False) -> None:
    """Raise :class:`DivergenceError` before a save if ``loss`` or any tensor of ``states`` (e.g.
    ``{"model": model_state, "optimizers": ...}``) is not finite.

    ``agree``: the ranks check different tensors (each its own shard of an optimizer state), so
    they agree in one collective over all ranks: all raise if any one finds a non-finite value."""
    if not math.isfinite(loss):
        raise DivergenceError(
            f"step {step}: the loss is {loss}; the checkpoint is not written (the previous one stays); "
            "lower --lr (or use --precision bf16/fp32) and --resume from it"
        )
    bad = first_nonfinite(states.items())
    if agree:
        from slope.parallel import mean_over_ranks

        found_anywhere = mean_over_ranks(float(bad is not None)) > 0
        if found_anywhere and bad is None:
            bad = "another rank's shard of the optimizer state"
    if bad is not None:
        raise DivergenceError(
            f"step {step}: {bad} holds inf/nan values; the checkpoint is not written (the previous one stays); "
            "lower --lr (or use --precision bf16/fp32) and --resume from it"
        )
