"""Tensors beside FSDP2-sharded parameters.

``fully_shard`` replaces a module's parameters by ``DTensor`` parameters sharded along dim 0. What
slope keeps per weight entry (a mask that keeps pruned entries zero) must then be split the same way,
and what it reduces over a weight (a gradient norm) must be reduced over the ranks. These helpers do
both and leave ordinary tensors as they are, so one code path serves sharded and unsharded models.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full_tensor", "held_bytes", "is_sharded", "local_bytes", "local_tensor", "shard_like"]


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. a parameter or gradient of an FSDP2 model)."""
    return isinstance(tensor, DTensor)


def shard_like(full: torch.Tensor, param: DTensor) -> DTensor:
    """``full`` (the whole tensor, of ``param``'s global shape, identical on every rank) split
    like ``param``: each rank keeps its own shard, without communication."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shard_like: a tensor of shape {tuple(full.shape)} cannot be split like one of shape {tuple(param.shape)}")
    device = param.to_local().device
    return distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered (or reduced, for a partial result such as a sum or
    a norm) over its ranks — collective, every rank must call it — an ordinary tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (sharing its storage: in-place changes apply to the
    ``DTensor``), an ordinary tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a ``DTensor``: its shard; others: whole)."""
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def held_bytes(model: torch.nn.Module, dense_opt: torch.optim.Optimizer | None, sparse_opt=None) -> dict[str, int]:
    """Bytes this rank holds between steps (sharded tensors: its shard): the model's ``parameters``
    (of which ``sparse_values``: the SLoPe layers' kept values, on their owner only when sharded),
    ``buffers`` (SLoPe layers' packed masks and metadata), and the state of ``dense_opt`` and of
    ``sparse_opt`` (:class:`slope.optimizers.ADAMWSparse`; its moments on their owner only)."""
    from slope.registry import sparse_modules

    def state_bytes(optimizer) -> int:
        if optimizer is None:
            return 0
        return local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))

    values = [layer.values for _, layer in sparse_modules(model)]
    return {"parameters": local_bytes(model.parameters()), "sparse_values": local_bytes(values),
            "buffers": local_bytes(model.buffers()), "dense_optimizer": state_bytes(dense_opt),
            "sparse_optimizer": state_bytes(sparse_opt)}
