"""What slope's ``transformers.Trainer`` callbacks keep beside the Trainer's own checkpoints.

Each callback with state (dynamic sparsity, the held-zeros window of a recipe, the sparse
optimizer, the SFT selector) writes one file into the Trainer's ``output_dir/checkpoint-<step>/``
at save time and reads it back when the Trainer resumes at that step.
"""
from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["load_from_trainer_checkpoint", "save_in_trainer_checkpoint", "torch_optimizer", "trainer_checkpoint_file"]


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
