"""What slope's ``transformers.Trainer`` callbacks keep beside the Trainer's own checkpoints.

Each callback with state (dynamic sparsity, the held-zeros window of a recipe, the sparse
optimizer, the SFT selector) writes one file into the Trainer's ``output_dir/checkpoint-<step>/``
at save time and reads it back when the Trainer resumes at that step. They run under the
Trainer's DDP, not under its FSDP or DeepSpeed (:func:`refuse_sharded_trainer`).
"""
from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["load_from_trainer_checkpoint", "refuse_sharded_trainer", "save_in_trainer_checkpoint", "torch_optimizer",
           "trainer_checkpoint_file"]


def trainer_checkpoint_file(args, state, name: str) -> str:
    """``name`` in the Trainer's checkpoint folder of the current step (``args``: its
    ``TrainingArguments``, ``state``: its ``TrainerState``)."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}", name)


def save_in_trainer_checkpoint(args, state, name: str, value: Any) -> None:
    """``torch.save`` ``value`` as ``name`` in the current checkpoint folder (the main process only:
    the state is the same on every data-parallel rank)."""
    if state.is_world_process_zero:
        path = trainer_checkpoint_file(args, state, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(value, path)


def load_from_trainer_checkpoint(args, state, name: str, writer: str) -> Any:
    """What :func:`save_in_trainer_checkpoint` wrote as ``name`` at the step the Trainer resumes
    at; ``FileNotFoundError`` naming ``writer`` (the callback that writes it) when it is missing."""
    path = trainer_checkpoint_file(args, state, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resuming at step {state.global_step} needs {path} (written by {writer} at save time)")
    return torch.load(path, map_location="cpu", weights_only=True)


def torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its state is keyed by the parameters)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def refuse_sharded_trainer(args, what: str) -> None:
    """A one-line ``ValueError`` when the Trainer (``args``: its ``TrainingArguments``, or the
    ``accelerate launch`` environment) shards the model with FSDP or partitions it with DeepSpeed:
    slope's callbacks hold masks, SLoPe values and their optimizer state on the model's own
    parameters, which those engines replace by flat shards or partitioned fp32 masters, so masks
    would silently stop holding."""
    from slope.parallel import env_flag, launched_with_fsdp

    if bool(getattr(args, "fsdp", None)) or launched_with_fsdp():
        engine = "FSDP"
    elif bool(getattr(args, "deepspeed", None)) or env_flag("ACCELERATE_USE_DEEPSPEED"):
        engine = "DeepSpeed"
    else:
        return
    raise ValueError(f"{what} does not run under the Trainer's {engine} (its masks and sparse weights live on the model's own "
                     f"parameters, which {engine} replaces): train with the Trainer's DDP (torchrun, no {engine} config), or "
                     "shard with `slope finetune --fsdp`")
