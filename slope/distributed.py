"""Gradient synchronisation of the sparse gradients across data-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from slope.registry import live_layers, sparse_modules

__all__ = ["average_over_ranks", "sync_grads"]


def _layers(model: nn.Module | None) -> list[nn.Module]:
    return live_layers() if model is None else [m for _, m in sparse_modules(model)]


@torch.no_grad()
def sync_grads(model: nn.Module | None = None, group=None) -> None:
    """All-reduce every SLoPe layer's sparse gradient and **average** it over the world size.

    A no-op outside an initialised ``torch.distributed`` process group (or with one rank).
    Layers without a gradient on this rank contribute zeros, so every rank issues the same
    collectives. Gradients are flattened into one buffer per dtype (one all-reduce each).
    Layers whose values are sharded (:class:`slope.parallel.ShardedValues`) are skipped: their
    backward reduces their gradients to the owners.
    ``model=None`` walks every live SLoPe layer in creation order (SLoPe's argument-free call).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    layers = [layer for layer in _layers(model) if getattr(layer, "values_holder", None) is None]
    for layer in layers:
        if layer.values_grad is None:
            layer.values_grad = torch.zeros_like(layer.values)
    by_dtype: dict[torch.dtype, list[nn.Module]] = {}
    for layer in layers:
        by_dtype.setdefault(layer.values_grad.dtype, []).append(layer)
    for group_layers in by_dtype.values():
        flat = torch.cat([layer.values_grad.reshape(-1) for layer in group_layers])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for layer in group_layers:
            numel = layer.values_grad.numel()
            layer.values_grad.copy_(flat[offset : offset + numel].view_as(layer.values_grad))
            offset += numel


@torch.no_grad()
def average_over_ranks(tensors: list[torch.Tensor], group=None) -> None:
    """Replace each tensor by its mean over the ranks, in place (one all-reduce per tensor; every
    rank must call it with tensors of the same shapes, in the same order). A no-op outside an
    initialised ``torch.distributed`` process group or with one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, group=group)
        tensor.div_(world)
