"""``DynamicSparsityCallback``: dynamic sparse training inside ``transformers.Trainer``.

::

    sparsifier = DynamicSparsity(model, total_steps=args.max_steps, sparsity_ratio=0.5)
    trainer = Trainer(model=model, args=args, ..., callbacks=[DynamicSparsityCallback(sparsifier)])

N:M (``sparsity_type="2:4"``): the model holds SLoPe layers, trained by
:class:`slope.optimizers.ADAMWSparse` through :class:`slope.SparseOptimizerCallback`; pass that
optimizer here too (``DynamicSparsityCallback(sparsifier, optimizer=sparse_opt)``) so the mask
updates move its moments.

After each optimizer step (``on_optimizer_step``) it calls :meth:`DynamicSparsity.step`. At every
Trainer save it writes ``checkpoint-<step>/slope_dynamic_sparsity.pt``; ``trainer.train(
resume_from_checkpoint=...)`` restores the masks, the step count and the schedule from it.
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from slope.dynamic.sparsifier import DynamicSparsity

__all__ = ["DynamicSparsityCallback", "STATE_NAME"]

#: File (in each Trainer ``checkpoint-<step>`` folder) holding :meth:`DynamicSparsity.state_dict`.
STATE_NAME = "slope_dynamic_sparsity.pt"


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its state is keyed by the parameters)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class DynamicSparsityCallback(TrainerCallback):
    """Drive a :class:`DynamicSparsity` from ``transformers.Trainer`` (module docstring).

    Args:
        sparsifier: built on the Trainer's model with ``total_steps`` = the Trainer's ``max_steps``.
        optimizer: the optimizer holding the masked weights' state; default: the Trainer's
            (right for unstructured masks on ordinary weights).
    """

    def __init__(self, sparsifier: DynamicSparsity, optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(sparsifier, DynamicSparsity):
            raise TypeError(f"DynamicSparsityCallback takes a slope.dynamic.DynamicSparsity, got {type(sparsifier).__name__}")
        self.sparsifier = sparsifier
        self.optimizer = optimizer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.sparsifier.total_steps:
            raise ValueError(
                f"the Trainer runs {state.max_steps} optimizer steps but the DynamicSparsity was built for "
                f"{self.sparsifier.total_steps}; build it with total_steps={state.max_steps} (TrainingArguments.max_steps)"
            )
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming at step {state.global_step} needs {path} (written by DynamicSparsityCallback at save time)")
            self.sparsifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.sparsifier.step(self.optimizer if self.optimizer is not None else _torch_optimizer(optimizer))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.sparsifier.state_dict(), os.path.join(folder, STATE_NAME))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["sparsity"] = round(self.sparsifier.sparsity, 6)
