"""Gradual magnitude pruning (Zhu & Gupta 2017) as a :class:`MaskPolicy`, and one-off pruning to a sparsity.

Every ``interval`` optimizer steps (and after the last one) each masked weight is pruned to the
sparsity ``schedule(steps_done, total_steps)``: the kept entries of smallest ``|w|`` — or those a
custom ``torch.nn.utils.prune.BasePruningMethod`` picks (:mod:`slope.dynamic.criteria`) — join the
pruned ones, which stay pruned. Per layer: every layer reaches the scheduled sparsity. Towards an
N:M target the sparsity moves in whole entries per group (2:4: 4:4 → 3:4 → 2:4), so the layers
are N:M only once the schedule reaches ``1 - N/M``; they train as masked dense weights until then.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.prune import BasePruningMethod

from slope.masks import nm_mask_from_scores, topk_mask
from slope.parallel.sharded import full_tensor
from slope.sparsity import MaskPolicy
from slope.dynamic.criteria import criterion_mask
from slope.dynamic.policies import check_schedule

__all__ = ["GradualPruning", "nm_keep_per_group", "prune_to"]


def nm_keep_per_group(sparsity: float, n: int, m: int) -> int:
    """Entries each group of ``m`` keeps on the way to ``n:m`` at ``sparsity``: ``⌈(1 − sparsity)·m⌉``
    (never sparser than asked: 2:4 at 0.4 keeps 3 of 4), at least ``n`` (``1 − n/m`` is the most)."""
    return min(m, max(n, math.ceil((1.0 - sparsity) * m - 1e-9)))


def _pruned_mask(weight: torch.Tensor, mask: torch.Tensor, sparsity: float, method: BasePruningMethod | None,
                 structure: tuple[int, int] | None) -> torch.Tensor | None:
    """The mask of ``weight`` at ``sparsity`` within ``mask`` (both ``(out, in)``; bool), or ``None``
    when the mask already keeps no more than that (unstructured)."""
    scores = weight.abs().float().masked_fill(~mask, -1.0)  # pruned ones stay pruned
    if structure is not None:
        n, m = structure
        return nm_mask_from_scores(scores, nm_keep_per_group(sparsity, n, m), m) & mask
    keep = round((1.0 - sparsity) * mask.numel())
    if keep >= int(mask.sum()):
        return None
    return topk_mask(scores, keep=keep) if method is None else criterion_mask(method, weight, mask, sparsity)


@torch.no_grad()
def prune_to(masked, sparsity: float | dict[str, float], method: BasePruningMethod | None = None,
             optimizer: torch.optim.Optimizer | None = None, structure: tuple[int, int] | None = None) -> dict[str, int]:
    """Prune every weight of ``masked`` to ``sparsity`` (one for all, or ``{name: sparsity}``; never
    un-pruning); returns the newly pruned count per weight. ``structure`` ``(n, m)``: every group of ``m`` inputs keeps
    :func:`nm_keep_per_group` — gradual N:M steps through ``m:m, (m-1):m, …, n:m``. Weights are seen as
    ``(out, in)`` (:meth:`MaskedWeights.out_in`), so groups run along the input dimension of every layer."""
    pruned = {}
    for name in masked.masks:
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        new = _pruned_mask(masked.out_in(name, masked.weight(name)), masked.out_in(name, full_tensor(masked.masks[name])), target, method,
                           structure)
        pruned[name] = 0 if new is None else int(masked.set_mask(name, masked.out_in(name, new).contiguous(), optimizer).sum())
    return pruned


class GradualPruning(MaskPolicy):
    """Prune to ``schedule(steps_done, total_steps)`` after every ``interval`` steps and the last one
    (unstructured, or N:M through intermediate ``k:m`` stages with ``structure``; see :func:`prune_to`).

    The schedule must never decrease (pruned weights are gone); a value outside ``[0, 1)`` or a
    decrease is a clear error; with ``structure`` a schedule that ends above ``1 - n/m`` is warned of
    (the layers stop at ``n:m``). :attr:`last_update` records each pruning event: the ``sparsity``
    the masks reached (over all weights) and the schedule's ``target``.
    """

    kind = "gradual"

    def __init__(self, masked, total_steps: int, schedule: Callable[[int, int], float], *, interval: int = 100,
                 pruning_method: BasePruningMethod | None = None, structure: tuple[int, int] | None = None):
        super().__init__(masked, total_steps)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"gradual pruning: the mask update interval must be a positive int of optimizer steps, got {interval!r}")
        if not callable(schedule):
            raise TypeError(f"sparsity_schedule must be callable (step, total_steps) -> sparsity, got {type(schedule).__name__}")
        self.schedule, self.interval, self.pruning_method, self.structure = schedule, interval, pruning_method, structure
        self.last_target = 0.0
        self.last_update: dict[str, Any] | None = None
        if structure is not None:
            self._warn_beyond_nm()

    def _warn_beyond_nm(self) -> None:
        n, m = self.structure
        final = float(self.schedule(self.total_steps, self.total_steps))
        if final > 1 - n / m + 1e-9:
            warnings.warn(f"gradual pruning to {n}:{m}: the sparsity_schedule ends at {final:g}, more than {n}:{m} holds "
                          f"({1 - n / m:g}); the layers stop at {n}:{m}", UserWarning, stacklevel=4)

    def share_after_last_step(self) -> float:
        """The share of the schedule's pruning (from step 0 to the end) done at the update after the
        last step, which no training follows (1.0 when ``interval >= total_steps``)."""
        total = self.total_steps
        start, final = (float(self.schedule(s, total)) for s in (0, total))
        last_inner = (total - 1) // self.interval * self.interval  # the last update before the end (0: none)
        before = float(self.schedule(last_inner, total))
        return (final - before) / (final - start) if final > start else 0.0

    def target(self, steps_done: int) -> float:
        """The schedule's sparsity after ``steps_done`` steps, validated (range, never decreasing)."""
        value = self.schedule(steps_done, self.total_steps)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"sparsity_schedule({steps_done}, {self.total_steps}) returned {value!r}, not a number") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity_schedule({steps_done}, {self.total_steps}) = {value!r} is outside [0, 1)")
        if value < self.last_target - 1e-9:
            raise ValueError(
                f"sparsity_schedule({steps_done}, {self.total_steps}) = {value:g} is below the earlier {self.last_target:g}: "
                "gradual pruning cannot un-prune; make the schedule non-decreasing"
            )
        return value

    def prune(self, steps_done: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prune to :meth:`target` of ``steps_done`` now (also the initial pruning, ``steps_done=0``)."""
        target = self.target(steps_done)
        pruned = prune_to(self.masked, target, self.pruning_method, optimizer, self.structure)
        self.last_target = max(self.last_target, target)
        self.last_update = {"step": steps_done, "kind": self.kind, "sparsity": self.masked.sparsity(), "target": target,
                            "layers": {name: {"pruned": count} for name, count in pruned.items()}}

    def due(self, step: int) -> bool:
        done = step + 1
        return done % self.interval == 0 or done == self.total_steps

    def update(self, step: int, optimizer: torch.optim.Optimizer | None, grads: dict[str, torch.Tensor] | None) -> None:  # noqa: ARG002
        self.prune(step + 1, optimizer)

    def _schedule_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "interval": self.interval, "structure": None if self.structure is None else list(self.structure)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self._schedule_state(), "last_target": self.last_target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_schedule(self, state["schedule"])
        super().load_state_dict(state)
        self.last_target = float(state["last_target"])
