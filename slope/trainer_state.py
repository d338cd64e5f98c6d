"""What slope's ``transformers.Trainer`` callbacks keep beside the Trainer's own checkpoints.

Each callback with state (dynamic sparsity, the held-zeros window of a recipe, the sparse
optimizer, the SFT selector) writes one file into the Trainer's ``output_dir/checkpoint-<step>/``
at save time and reads it back from the folder the Trainer resumes from (which may lie in another
run's ``output_dir``: :func:`resumed_checkpoint_dir`). They run under the Trainer's DDP, not under
its FSDP or DeepSpeed (:func:`refuse_sharded_trainer`).
"""
from __future__ import annotations

import os
import pickle
import sys
import warnings
from typing import Any

import torch

__all__ = ["load_from_trainer_checkpoint", "read_checkpoint_file", "refuse_sharded_trainer", "resumed_checkpoint_dir",
           "save_in_trainer_checkpoint", "torch_optimizer", "trainer_checkpoint_file"]


def trainer_checkpoint_file(args, state, name: str) -> str:
    """``name`` in the Trainer's checkpoint folder of the current step (``args``: its
    ``TrainingArguments``, ``state``: its ``TrainerState``): where a save writes it."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}", name)


def resumed_checkpoint_dir(args, state) -> str:
    """The checkpoint folder the running ``Trainer.train`` resumed from, for callbacks' ``on_train_begin``.

    That is the ``resume_from_checkpoint`` the Trainer resolved (a folder anywhere, or for ``True``
    the newest ``checkpoint-<step>`` of ``output_dir``), not necessarily
    ``output_dir/checkpoint-<global_step>``. transformers 5 tells callbacks only the state read from
    it, so it is read from the Trainer's training loop (``_inner_training_loop``, which calls
    ``on_train_begin`` with the resolved folder as its argument) up the call stack. Called outside a
    ``Trainer.train`` (a callback driven by hand): ``output_dir/checkpoint-<global_step>``.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), Trainer):
            folder = frame.f_locals.get("resume_from_checkpoint")
            if folder is not None:
                return os.fspath(folder)
            break
        frame = frame.f_back
    else:  # no Trainer loop calls this: a callback driven by hand, or a Trainer that trains another way
        warnings.warn(f"the Trainer's resumed checkpoint folder is not known here: reading the state of step {state.global_step} "
                      f"from {args.output_dir}/checkpoint-{state.global_step}", UserWarning, stacklevel=3)
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def save_in_trainer_checkpoint(args, state, name: str, value: Any) -> None:
    """``torch.save`` ``value`` as ``name`` in the current checkpoint folder (the main process only:
    the state is the same on every data-parallel rank)."""
    if state.is_world_process_zero:
        path = trainer_checkpoint_file(args, state, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(value, path)


def load_from_trainer_checkpoint(args, state, name: str, writer: str) -> Any:
    """What :func:`save_in_trainer_checkpoint` wrote as ``name`` into the checkpoint the Trainer
    resumes from (:func:`resumed_checkpoint_dir`); ``FileNotFoundError`` naming ``writer`` (the
    callback that writes it) when it is missing."""
    path = os.path.join(resumed_checkpoint_dir(args, state), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resuming at step {state.global_step} needs {path} (written by {writer} at save time)")
    return read_checkpoint_file(path)


def read_checkpoint_file(path: str) -> Any:
    """``torch.load`` of a callback's file in a Trainer checkpoint; a truncated or corrupt one is a
    ``ValueError`` naming it (torch's own error names no file, and a checkpoint holds several)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); resume from another checkpoint") from e


def torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its state is keyed by the parameters)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def refuse_sharded_trainer(args, what: str, instead: str = "shard with `slope finetune --fsdp`") -> None:
    """A one-line ``ValueError`` when the Trainer (``args``: its ``TrainingArguments``, or the
    ``accelerate launch`` environment) shards the model with FSDP or partitions it with DeepSpeed:
    slope's callbacks hold masks, SLoPe values and their optimizer state on the model's own
    parameters, which those engines replace by flat shards or partitioned fp32 masters, so masks
    would silently stop holding. ``instead``: the sharded alternative the message names."""
    from slope.parallel import env_flag, launched_with_fsdp

    if bool(getattr(args, "fsdp", None)) or launched_with_fsdp():
        engine = "FSDP"
    elif bool(getattr(args, "deepspeed", None)) or env_flag("ACCELERATE_USE_DEEPSPEED"):
        engine = "DeepSpeed"
    else:
        return
    raise ValueError(f"{what} does not run under the Trainer's {engine} (its masks and sparse weights live on the model's own "
                     f"parameters, which {engine} replaces): train with the Trainer's DDP (torchrun, no {engine} config), or "
                     f"{instead}")
