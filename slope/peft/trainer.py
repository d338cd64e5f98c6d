"""``SftTrainer(TrainerClass)``: a Hugging Face ``Trainer`` subclass that trains sparse deltas.

``trainer = SftTrainer(Trainer)(model=sft_model, args=..., train_dataset=..., sft_config=config)``:
the optimizer is ``SftAdamW`` (``rigl``) or ``SftSM3`` (``sm3``) over the deltas, built from the
``TrainingArguments`` (learning rate, Adam betas/eps, weight decay); an :class:`SftSelector`
reselects after every optimizer step; checkpoints hold only the deltas and ``modules_to_save`` (+
the selector state); ``resume_from_checkpoint`` and ``load_best_model_at_end`` restore them. The
Trainer reads the labels' names from the wrapped model's ``forward``, so evaluation reports
``eval_loss`` and ``compute_metrics`` gets the labels.
"""
from __future__ import annotations

import inspect
import os

import torch
from transformers import TrainerCallback
from transformers.utils import can_return_loss, find_labels

from slope.peft.model import SftModel
from slope.peft.optim import SftAdamW, SftSM3
from slope.peft.selector import SftSelector
from slope.trainer_state import refuse_sharded_trainer, save_in_trainer_checkpoint

__all__ = ["SftTrainer"]

SELECTOR_STATE = "sft_selector.pt"


class _SelectorCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_sharded_trainer(args, "SftTrainer", "shard the frozen base in your own loop with slope.peft.shard_sft_model")
        self.trainer._start_selector(state, optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sft_selector.step()

    def on_save(self, args, state, control, **kwargs):
        save_in_trainer_checkpoint(args, state, SELECTOR_STATE, self.trainer.sft_selector.state_dict())


class _SftTrainerMethods:
    """What :func:`SftTrainer` adds to a Trainer class (module docstring); mixed in before it."""

    def __init__(self, *args, sft_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        sft_model = self._sft_model()
        self.sft_config = sft_config if sft_config is not None else sft_model.peft_config
        self.sft_selector: SftSelector | None = None
        self._sft_resume_dir: str | None = None
        if self.args.gradient_checkpointing and hasattr(sft_model.base_model, "enable_input_require_grads"):
            sft_model.base_model.enable_input_require_grads()  # reentrant checkpointing needs it
        self._inspect_base_model(sft_model.base_model)
        self.add_callback(_SelectorCallback(self))

    def _inspect_base_model(self, base) -> None:
        """What the Trainer learns from the model's ``forward`` signature (the labels' names,
        whether it returns a loss without labels, whether it takes loss kwargs), read from the
        wrapped model: ``SftModel.forward(*args, **kwargs)`` hides it, as ``PeftModel``'s does."""
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))
        if hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = base.accepts_loss_kwargs
        else:
            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def _sft_model(self) -> SftModel:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not isinstance(model, SftModel):
            raise TypeError(f"SftTrainer trains the model from slope.peft.get_peft_model, got {type(model).__name__}")
        return model

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        args = self.args
        if self.sft_config.selection_algorithm == "sm3":
            deltas = {delta.values: delta for _, _, delta in self._sft_model().active_deltas()}
            self.optimizer = SftSM3(groups, deltas, lr=args.learning_rate)
        else:
            self.optimizer = SftAdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return self.optimizer

    def _start_selector(self, state, optimizer) -> None:
        self.sft_selector = SftSelector(
            self.model, optimizer if optimizer is not None else self.optimizer, self.sft_config,
            state.max_steps, self.args.gradient_accumulation_steps,
        )
        if self._sft_resume_dir is not None:
            path = os.path.join(self._sft_resume_dir, SELECTOR_STATE)
            if os.path.isfile(path):
                self.sft_selector.load_state_dict(torch.load(path, weights_only=False))

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            forward = self._sft_model().base_model.forward
            self._signature_columns = list(inspect.signature(forward).parameters) + ["label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:  # noqa: ARG002 (deltas only)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self._sft_model().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:  # noqa: ARG002
        self._sft_model().load_deltas(resume_from_checkpoint)
        self._sft_resume_dir = resume_from_checkpoint

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's deltas (and ``modules_to_save``)."""
        self._sft_model().load_deltas(self.state.best_model_checkpoint)


def SftTrainer(trainer_class):  # noqa: N802 (PEFT-SFT's name for a class factory)
    """A subclass of ``trainer_class`` (``transformers.Trainer`` or a subclass) that takes ``sft_config=``."""
    name = f"Sft{trainer_class.__name__}"
    return type(name, (_SftTrainerMethods, trainer_class), {"__qualname__": name, "__module__": __name__})
