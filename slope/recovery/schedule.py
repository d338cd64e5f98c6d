"""When a finetune recipe's modifiers act: recipe epochs as optimizer steps, and the window in which
a ``ConstantPruningModifier`` holds zeros.

Recipes give ``start`` / ``end`` in epochs, fractions allowed (SparseML, llm-compressor). As in
llm-compressor, whose event index at the start of optimizer step ``s`` (0-based) is
``s / steps_per_epoch``, a modifier acts on the steps ``s`` with ``start <= s / steps_per_epoch < end``:
from step :func:`epoch_to_step` ``(start)`` up to, not including, :func:`epoch_to_step` ``(end)``.

:class:`HeldZeros` is a ``ConstantPruningModifier`` over such a window, with llm-compressor's
semantics: before its start the targeted weights train dense; at its start each takes the mask
"nonzero now" (after step ``start_step - 1``, i.e. before step ``start_step``); from then until its end
those zeros stay exactly zero (weights, gradients, optimizer state); after its end the weights train
dense again. Held for the whole run (start 0, no end before the last step) it is a plain
:class:`~slope.recovery.ConstantMasks` built before training (2:4 layers as SLoPe layers); held for
part of the run, every layer is held under masks, since its weights must be able to train dense.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from slope.recovery.constant import ConstantMasks, held_weight, target_linears
from slope.recovery.modifiers import ConstantPruningModifier

__all__ = ["HeldZeros", "epoch_to_step"]


def epoch_to_step(epoch: float, steps_per_epoch: float) -> int:
    """The first 0-based optimizer step ``s`` with ``s / steps_per_epoch >= epoch`` (``epoch >= 0``)."""
    if not steps_per_epoch > 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch!r}")
    step = max(0, math.ceil(epoch * steps_per_epoch))
    while step > 0 and (step - 1) / steps_per_epoch >= epoch:  # ceil of a product rounded up
        step -= 1
    while step / steps_per_epoch < epoch:  # or down
        step += 1
    return step


class HeldZeros:
    """A :class:`ConstantPruningModifier` over the optimizer steps ``[start_step, end_step)`` of a run
    of ``total_steps`` (module docstring); the front door calls :meth:`after_step` after every step.

    Args:
        model: the (pruned) model; ``modifier``: the recipe's modifier.
        steps_per_epoch: optimizer steps per epoch (may be fractional), to place ``start`` / ``end``.
        total_steps: the run's optimizer steps.
        double_pruning / backend: of 2:4 SLoPe layers (whole-run holding only; see :class:`ConstantMasks`).

    Attributes: ``start_step``, ``end_step`` (``None``: never), ``constant`` (the
    :class:`ConstantMasks` at work, or ``None`` when not holding), ``phase`` (``"before"``,
    ``"holding"``, ``"released"``), ``names`` (the targeted linears, chosen before training).
    """

    def __init__(self, model: nn.Module, modifier: ConstantPruningModifier, steps_per_epoch: float, total_steps: int, *,
                 double_pruning: bool = False, backend: str = "auto"):
        self.model, self.modifier = model, modifier
        self.start_step = epoch_to_step(modifier.start, steps_per_epoch)
        self.end_step = None if modifier.end is None else epoch_to_step(modifier.end, steps_per_epoch)
        if self.end_step is not None and self.end_step >= total_steps:
            self.end_step = None  # holds to the last step: never released within the run
        self.whole_run = self.start_step == 0 and self.end_step is None
        self.holds_any = self.start_step < total_steps and (self.end_step is None or self.end_step > self.start_step)
        self.constant: ConstantMasks | None = None
        self.phase = "before"
        self.released: dict[str, Any] | None = None  # the summary of the masks held, once released
        if self.whole_run:
            self.constant = ConstantMasks(model, modifier, double_pruning=double_pruning, backend=backend)
            self.names, self.phase = list(self.constant.layers), "holding"
            return
        self.names = target_linears(model, modifier, zeros_only=False)
        if not self.holds_any:
            end = "never" if modifier.end is None else f"{modifier.end:g}"
            warnings.warn(f"ConstantPruningModifier (start {modifier.start:g}, end {end}) holds no step of this run "
                          f"({total_steps} steps, {steps_per_epoch:g} per epoch): its targets train dense throughout",
                          UserWarning, stacklevel=3)
        elif self.start_step == 0:
            self._start()

    # ------------------------------------------------------------------ the training-loop call
    def after_step(self, step: int, dense_opt: torch.optim.Optimizer | None = None, sparse_opt=None) -> None:
        """After optimizer step ``step``: re-zero the held weights and their optimizer state while
        holding; then start holding before step ``start_step``, or release after step ``end_step - 1``."""
        if self.phase == "holding":
            self.constant.after_step(dense_opt, sparse_opt)
            if step + 1 == self.end_step:
                self._release()
        elif self.phase == "before" and self.holds_any and step + 1 == self.start_step:
            self._start()

    def rebind(self) -> None:
        """Hold the model's parameters after ``fully_shard`` replaced them by sharded ones (a
        whole-run window only: one that starts or ends mid-run reads and re-masks whole weights)."""
        if not self.whole_run:
            raise ValueError("under FSDP a ConstantPruningModifier holds the whole run only (start: 0, no end); for a window "
                             "that starts or ends mid-run train with DDP (no --fsdp, and no FSDP accelerate config)")
        self.constant.rebind()

    def before_update(self) -> None:
        """After the backward passes of a step, before clipping: mask sharded weights' gradients."""
        if self.constant is not None:
            self.constant.before_update()

    def _start(self) -> None:
        """Take the masks "nonzero now" of the targeted linears that hold exact zeros."""
        modules = dict(self.model.named_modules())
        held = [n for n in self.names if bool((held_weight(self.model, modules, n).detach() == 0).any())]
        if len(held) < len(self.names):
            warnings.warn(f"ConstantPruningModifier starts at step {self.start_step}: {len(self.names) - len(held)} of its "
                          f"{len(self.names)} target linear(s) hold no exact zeros then (trained dense since the run began) "
                          "and go on training dense; start: 0 holds the zeros the model came with", UserWarning, stacklevel=2)
        self.constant = ConstantMasks(self.model, self.modifier, names=held, slope_layers=False)
        self.phase = "holding"

    def _release(self) -> None:
        self.released = self.constant.summary()
        self.constant.remove_hooks()
        self.constant, self.phase = None, "released"

    # ------------------------------------------------------------------ reporting and persistence
    @property
    def zero_fraction(self) -> float:
        """Of the held layers' entries, the fraction held at zero now (0 when nothing is held)."""
        return 0.0 if self.constant is None else self.constant.zero_fraction

    def summary(self) -> dict[str, Any]:
        """:meth:`ConstantMasks.summary` of the masks held (empty before the start), and for a
        partial window its steps and phase."""
        if self.constant is not None:
            summary = self.constant.summary()
        else:
            summary = dict(self.released or {"layers": {}, "zero_fraction": 0.0})
        if not self.whole_run:
            summary.update(start_step=self.start_step, end_step=self.end_step, phase=self.phase)
        return summary

    def state_dict(self) -> dict[str, Any]:
        if self.whole_run:  # the format of checkpoints written before partial windows existed
            return self.constant.state_dict()
        return {"window": [self.start_step, self.end_step], "phase": self.phase, "released": self.released,
                "constant": None if self.constant is None else self.constant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the window's phase and masks (after the model's weights are restored)."""
        if self.whole_run:
            if "window" in state:
                raise ValueError("the checkpoint's ConstantPruningModifier held part of its run, this one holds the whole run; "
                                 "resume with the same data, batch size and recipe")
            self.constant.load_state_dict(state)
            return
        if state.get("window") != [self.start_step, self.end_step]:
            raise ValueError(f"the checkpoint's ConstantPruningModifier window (steps {state.get('window')}) differs from this "
                             f"run's ({[self.start_step, self.end_step]}); resume with the same data, batch size and recipe")
        self.remove_hooks()
        self.constant, self.phase, self.released = None, state["phase"], state["released"]
        if state["constant"] is not None:  # holding: the masks again, on the restored weights
            self.constant = ConstantMasks(self.model, self.modifier, names=list(state["constant"]["layers"]), slope_layers=False)
            self.constant.load_state_dict(state["constant"])

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (after training)."""
        if self.constant is not None:
            self.constant.remove_hooks()
