"""FSDP2 for sparse fine-tuning: shard the frozen base, keep the deltas whole.

``fully_shard`` would split every parameter along dim 0, the deltas' ``values`` too, while their
``indices`` (buffers) stay whole: values and indices would no longer line up for the optimizer and
the reselection. :func:`shard_sft_model` shards with FSDP2 everything but the trainable parameters
(the deltas' values and the ``modules_to_save``; about ``density`` of the model), which stay whole
and identical on every rank, their gradients averaged over the ranks after each backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from slope.parallel import wrap_fsdp2
from slope.peft.model import SftModel

__all__ = ["shard_sft_model"]


def shard_sft_model(model: SftModel, **fsdp_kwargs) -> SftModel:
    """Shard ``model`` (from :func:`slope.peft.get_peft_model`, on its device) with FSDP2, in place.

    The decoder blocks (members of every ``nn.ModuleList``) and the root become FSDP2 units
    (``units=`` picks others); ``fsdp_kwargs`` go to :func:`slope.parallel.wrap_fsdp2` (``units``,
    ``param_dtype``, ``reshard_after_forward``, ``mesh``). Rank 0's weights and buffers are copied
    to every rank first. The trainable parameters are left whole; each backward adds the mean of
    the ranks' gradients to them (summing in accumulation is linear, so micro-batches inside
    ``slope.parallel.no_sync`` or not give the same step). Build the optimizer and the
    :class:`SftSelector` afterwards, as for DDP; ``save_pretrained`` on rank 0 alone writes all.
    """
    if not isinstance(model, SftModel):
        raise TypeError(f"shard_sft_model shards the model from slope.peft.get_peft_model, got {type(model).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrap_fsdp2(model, require_sparse=False, sync_sparse=False, ignored_params=trainable, **fsdp_kwargs)
    group = dist.new_group(backend=dist.get_backend())  # the deltas' gradients apart from FSDP2's traffic
    world = dist.get_world_size(group)

    @torch.no_grad()
    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)

    for p in trainable:
        p.register_post_accumulate_grad_hook(average)
    return model
