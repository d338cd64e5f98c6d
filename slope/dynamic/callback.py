"""``DynamicSparsityCallback``: dynamic sparse training inside ``transformers.Trainer``.

::

    sparsifier = DynamicSparsity(model, total_steps=args.max_steps, sparsity_ratio=0.5)
    trainer = Trainer(model=model, args=args, ..., callbacks=[DynamicSparsityCallback(sparsifier)])

N:M (``sparsity_type="2:4"``): the model holds SLoPe layers, trained by
:class:`slope.optimizers.ADAMWSparse` through :class:`slope.SparseOptimizerCallback`; pass that
optimizer here too (``DynamicSparsityCallback(sparsifier, optimizer=sparse_opt)``) so the mask
updates move its moments.

After each optimizer step (``on_optimizer_step``) it calls :meth:`DynamicSparsity.step`; every log
(``on_log``) carries the current ``sparsity``, in ``trainer.state.log_history`` too. At every
Trainer save it writes ``checkpoint-<step>/slope_dynamic_sparsity.pt``; ``trainer.train(
resume_from_checkpoint=...)`` restores the masks, the step count and the schedule from it.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from slope.dynamic.sparsifier import DynamicSparsity
from slope.trainer_state import load_from_trainer_checkpoint, refuse_sharded_trainer, save_in_trainer_checkpoint, torch_optimizer

__all__ = ["DynamicSparsityCallback", "STATE_NAME"]

#: File (in each Trainer ``checkpoint-<step>`` folder) holding :meth:`DynamicSparsity.state_dict`.
STATE_NAME = "slope_dynamic_sparsity.pt"


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
        refuse_sharded_trainer(args, "DynamicSparsityCallback")
        if state.max_steps != self.sparsifier.total_steps:
            raise ValueError(
                f"the Trainer runs {state.max_steps} optimizer steps but the DynamicSparsity was built for "
                f"{self.sparsifier.total_steps}; build it with total_steps={state.max_steps} (TrainingArguments.max_steps)"
            )
        if state.global_step > 0:
            self.sparsifier.load_state_dict(load_from_trainer_checkpoint(args, state, STATE_NAME, "DynamicSparsityCallback"))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.sparsifier.step(self.optimizer if self.optimizer is not None else torch_optimizer(optimizer))

    def on_save(self, args, state, control, **kwargs):
        save_in_trainer_checkpoint(args, state, STATE_NAME, self.sparsifier.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``sparsity`` to the logs. ``Trainer.log`` appends a copy of the logs to
        ``state.log_history`` before any callback runs, so that entry (this step's, saved in
        ``trainer_state.json``) gets it too. Callbacks that run before this one (the default ones and
        ``report_to`` integrations come before those passed in ``callbacks=``) see the logs without it;
        ``trainer.callback_handler.callbacks.insert(0, callback)`` puts this one first."""
        if logs is None:
            return
        logs["sparsity"] = round(self.sparsifier.sparsity, 6)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and entry.keys() - {"step"} <= logs.keys():
            entry["sparsity"] = logs["sparsity"]
