"""``slope train`` sharded by FSDP2: ``--fsdp`` under ``torchrun``, or ``accelerate launch`` with an
FSDP config. The loop is the one of DDP (:mod:`slope.train`); what differs is here.

- The model is sharded (:func:`slope.parallel.wrap_fsdp2`) as soon as it is built, before the
  optimizers: dense weights, their gradients and AdamW moments are split row-wise over the ranks;
  each SLoPe layer's kept values, their gradient and ADAMWSparse moments live on one rank.
- Lazy LoRA adapters attach to the sharded model (when they start, or at a resume past their
  start, before the checkpoint is loaded). FSDP fixed its parameters when it sharded, so the adapters stay whole on every rank
  (``r·(in + out)`` numbers a layer), start from rank 0's values, and have their gradients averaged
  over the ranks before each update (:func:`average_replicated_grads`).
- Checkpoints are gathered onto rank 0 in the single-process format: a run resumes on any number
  of ranks, with or without FSDP.
"""
from __future__ import annotations

import torch

from slope import parallel
from slope.config import ConfigError, TrainConfig
from slope.distributed import average_over_ranks
from slope.parallel.sharded import is_sharded

__all__ = ["requested_fsdp", "fsdp_settings", "shard_model", "broadcast_adapters", "average_replicated_grads"]


def requested_fsdp(cfg: TrainConfig) -> dict | None:
    """The FSDP settings asked for: ``None`` (neither ``--fsdp`` nor an accelerate FSDP config) or
    ``{"reshard_after_forward", "activation_checkpointing"}``: the accelerate config's, else
    FULL_SHARD without activation checkpointing. Settings FSDP cannot honour are a one-line
    :class:`ConfigError` (checked before any work)."""
    from slope.parallel.env import requested_fsdp as requested

    try:
        settings = requested(cfg.fsdp)
    except ValueError as e:
        raise ConfigError(f"accelerate launch: {e}") from None
    if settings is not None and not cfg.fsdp:
        cfg.updated({"fsdp": True})  # the settings --fsdp refuses
    return settings


def fsdp_settings(requested: dict | None, env: parallel.DistEnv, log) -> dict | None:
    """``requested`` (:func:`requested_fsdp`), or ``None`` in one process: nothing to shard (said
    through ``log``)."""
    if requested is not None and env.world_size == 1:
        log("note: FSDP in one process has nothing to shard: the model trains unsharded (launch with torchrun "
            "--nproc_per_node=N, or accelerate launch with num_processes > 1)")
        return None
    return requested


def shard_model(model: torch.nn.Module, settings: dict, cfg: TrainConfig, log) -> None:
    """Shard ``model`` in place with FSDP2 (each transformer block a unit; SLoPe values sharded by
    layer), after turning on activation checkpointing when ``settings`` ask for it; settings that
    come from an accelerate config are said through ``log``."""
    from slope.finetune_loop import enable_activation_checkpointing

    if parallel.launched_with_fsdp():
        log(parallel.accelerate_fsdp_note(settings) + " (--fsdp / --no-fsdp do not apply)")

    if settings["activation_checkpointing"] and not enable_activation_checkpointing(model):
        raise ConfigError(f"the accelerate config's activation checkpointing is invalid here: {type(model).__name__} does not "
                          "support it (transformers' supports_gradient_checkpointing); turn it off in the config")
    parallel.wrap_fsdp2(model, reshard_after_forward=settings["reshard_after_forward"], require_sparse=not cfg.dense)


def broadcast_adapters(model: torch.nn.Module) -> None:
    """Rank 0's lazy LoRA adapters (``lora_A``, ``lora_B`` and ``lora_A``'s N:M mask) on every rank,
    in place (collective)."""
    from slope.parallel.wrap import broadcast_tensors
    from slope.registry import sparse_modules

    broadcast_tensors([t for _, layer in sparse_modules(model) if layer.lora_rank
                       for t in (layer.lora_A, layer.lora_B, layer.lora_A_mask)])


def average_replicated_grads(optimizer: torch.optim.Optimizer) -> None:
    """Average over the ranks, in place, the gradients of ``optimizer``'s parameters that FSDP does
    not shard (the adapters attached after sharding; FSDP2 reduces its own). Collective: every rank
    holds the same such parameters, each with a gradient."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None and not is_sharded(p)]
    average_over_ranks(grads)
