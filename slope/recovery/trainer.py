"""``RecoveryTrainer``: a finetune recipe inside ``transformers.Trainer``, by changing one line.

::

    from slope.recovery import RecoveryTrainer
    trainer = RecoveryTrainer(model=model, args=training_args, train_dataset=ds,      # was: Trainer(...)
                              recipe="recipe.yaml", distill_teacher=teacher)
    trainer.train()                       # trainer.train(resume_from_checkpoint=...) resumes exactly

Before the Trainer is built (so that its optimizer and DDP wrapper see the final parameters), a
``ConstantPruningModifier`` converts the 2:4 layers to SLoPe layers and masks the others
(:class:`slope.recovery.ConstantMasks`); the SLoPe layers' kept values train with
:class:`slope.optimizers.ADAMWSparse` through :class:`slope.SparseOptimizerCallback` (which also saves
and restores its state at checkpoints). A finite ``TrainingArguments.max_grad_norm`` is applied to
the joint (sparse + dense) norm by that callback instead of the Trainer. After every optimizer step
the held zeros are re-zeroed with their optimizer state. An ``OutputDistillationModifier`` adds its
term in :meth:`RecoveryTrainer.compute_loss` (training only; evaluation reports the task loss),
from epoch ``start`` on, with padding positions (``attention_mask``) left out of the comparison.
"""
from __future__ import annotations

import copy
import math
import os

from transformers import Trainer, TrainerCallback

from slope.recovery.constant import ConstantMasks, _warn_uncovered
from slope.recovery.distill import Distiller
from slope.recovery.schedule import HeldZeros
from slope.trainer_state import (load_from_trainer_checkpoint, refuse_sharded_trainer, save_in_trainer_checkpoint,
                                 torch_optimizer)

__all__ = ["RecoveryTrainer"]


class _HoldZeros(TrainerCallback):
    """Re-zero the held weights and their optimizer state after every optimizer step."""

    def __init__(self, constant: ConstantMasks, sparse_opt):
        self.constant, self.sparse_opt = constant, sparse_opt

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharded_trainer(args, "RecoveryTrainer")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.constant.after_step(torch_optimizer(optimizer), self.sparse_opt)


class _HoldWindow(TrainerCallback):
    """A ``ConstantPruningModifier`` over part of the run (``start > 0`` or an ``end``):
    :class:`slope.recovery.schedule.HeldZeros` placed on the Trainer's optimizer steps once it
    knows them (steps per epoch: its dataloader's micro-batches / gradient accumulation, as in
    ``slope.finetune``); its state rides in each checkpoint folder as ``slope_held_zeros.pt``."""

    STATE_NAME = "slope_held_zeros.pt"

    def __init__(self, model, modifier):
        self.model, self.modifier, self.held = model, modifier, None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        refuse_sharded_trainer(args, "RecoveryTrainer")
        steps_per_epoch = len(train_dataloader) / args.gradient_accumulation_steps
        self.held = HeldZeros(self.model, self.modifier, steps_per_epoch, state.max_steps)
        if state.global_step > 0:
            self.held.load_state_dict(load_from_trainer_checkpoint(args, state, self.STATE_NAME, "RecoveryTrainer"))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.held.after_step(state.global_step, torch_optimizer(optimizer))  # global_step: this step's 0-based index

    def on_save(self, args, state, control, **kwargs):
        save_in_trainer_checkpoint(args, state, self.STATE_NAME, self.held.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        self.held.remove_hooks()


class RecoveryTrainer(Trainer):
    """``transformers.Trainer`` running a finetune recipe (module docstring).

    Args (besides the Trainer's own, ``model`` and ``args`` given by keyword):
        recipe: a finetune recipe (YAML path, YAML text or dict), or ``None``; ``stage``: which stage
            of a multi-stage recipe (default: its one train stage).
        distill_teacher: the teacher an ``OutputDistillationModifier`` needs (a model or a model folder).
        double_pruning: 2:4 layers compressed with SLoPe's double-pruned backward (default: exact
            backward in simulation).

    Attributes: ``constant`` (:class:`ConstantMasks` holding the whole run, or ``None``; a
    modifier with ``start > 0`` or an ``end`` holds its window through a callback instead, on
    masked linears, as ``slope.finetune`` does), ``distiller`` (:class:`Distiller` or ``None``),
    ``sparse_optimizer`` (``ADAMWSparse`` over the SLoPe layers, or ``None``).
    """

    def __init__(self, *args, recipe=None, distill_teacher=None, double_pruning: bool = False, backend: str = "auto",
                 stage: str | None = None, **kwargs):
        from slope.recovery.finetune import plan_recipe

        model, targs = kwargs.get("model"), kwargs.get("args")
        if model is None or targs is None or args:
            raise TypeError("RecoveryTrainer takes model= and args= (TrainingArguments) by keyword")
        constant_mod, distill_mod, _ = plan_recipe(recipe, stage)
        window = constant_mod is not None and (constant_mod.start > 0 or constant_mod.end is not None)
        if distill_mod is None and distill_teacher is not None:
            raise ValueError("distill_teacher is given but the recipe has no OutputDistillationModifier; add one or drop the teacher")
        if distill_mod is not None and distill_teacher is None:
            raise ValueError("the recipe's OutputDistillationModifier needs distill_teacher (the dense model)")
        self.constant = None
        if constant_mod is not None and not window:
            self.constant = ConstantMasks(model, constant_mod, double_pruning=double_pruning, backend=backend)
        if constant_mod is None:
            _warn_uncovered(model, dict(model.named_modules()), set())
        self.sparse_optimizer = None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if window:  # masked linears only (HeldZeros), held over the window the Trainer's steps place
            callbacks.append(_HoldWindow(model, constant_mod))
        if self.constant is not None and self.constant.slope_layers:
            kwargs["args"] = targs = self._sparse_training(model, targs, callbacks)
        if self.constant is not None:
            callbacks.append(_HoldZeros(self.constant, self.sparse_optimizer))
        if isinstance(distill_teacher, (str, os.PathLike)):
            from slope.pruning.loading import load_model

            distill_teacher = load_model(distill_teacher, flag="distill_teacher")[0]
        self.distiller = None if distill_mod is None else Distiller(model, distill_teacher, distill_mod)
        super().__init__(callbacks=callbacks, **kwargs)
        if self.distiller is not None:
            self.distiller.teacher.to(self.args.device)

    def _sparse_training(self, model, targs, callbacks):
        """ADAMWSparse for the SLoPe layers, stepped by SparseOptimizerCallback with the joint clipping norm."""
        from slope.hf import SparseOptimizerCallback
        from slope.optimizers import ADAMWSparse

        self.sparse_optimizer = ADAMWSparse(model, lr=targs.learning_rate, weight_decay=targs.weight_decay,
                                            betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_epsilon)
        norm = targs.max_grad_norm
        clip = norm if norm is not None and 0 < norm < math.inf else None
        if clip is not None:  # the callback clips sparse and dense gradients together; the Trainer must not clip first
            targs = copy.copy(targs)
            targs.max_grad_norm = math.inf
        callbacks.insert(0, SparseOptimizerCallback(self.sparse_optimizer, max_grad_norm=clip))
        return targs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distiller = self.distiller
        epoch = self.state.epoch or 0.0
        if distiller is None or not model.training or epoch < distiller.modifier.start:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with distiller.student_capture.capture() as student:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mask = inputs.get("attention_mask")
        distill = distiller.loss(student, distiller.teacher_outputs(inputs["input_ids"], mask), mask)
        if self._loss_scaled_for_accumulation(num_items_in_batch):  # the Trainer will not divide by the micro-batch count
            distill = distill / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        total = distiller.combine(loss, distill)
        return (total, outputs) if return_outputs else total

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Mirrors ``Trainer.training_step``: whether the task loss is already normalised over the accumulation window."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
