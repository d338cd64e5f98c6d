"""SLoPe layers' kept values on one rank between uses: ZeRO-3 over whole layers, beside FSDP2.

FSDP2 shards dense parameters row-wise; a SLoPe layer's ``values`` (its kept weights, updated by
:class:`slope.optimizers.ADAMWSparse` from ``values_grad``, never by autograd) stay outside it. With
:class:`ShardedValues` each layer's values, its averaged gradient and its optimizer moments live on
one *owner* rank (:class:`slope.optimizers.sharding.LayerOwners`: largest layer first to the
least-loaded rank); the other ranks hold ``(0, kept)`` placeholders. Around each use::

    forward  (each call):    broadcast owner → all; compute; non-owners drop them
    backward (autograd fn):  broadcast owner → all; dx and the local dW; with gradient sync on,
                             reduce dW to the owner (sum / world: the mean FSDP2 gives); drop both
    optimizer step:          the owner steps (moments only there); nothing is broadcast; M_t
                             updates are computed by the owner and their packed bits broadcast

So per kept weight a rank holds ``(4 + 4 + 8) / N`` bytes of fp32 value, gradient and moments
(instead of ``4 + 4`` replicated plus ``8 / N``), plus one layer's values and local gradient while
that layer computes. The values travel twice per step (forward and backward, as FSDP2's
all-gathers with ``reshard_after_forward``), the gradient once; the collectives are synchronous, in
the order the layers run, the same on every rank (no prefetch or overlap yet).

Every rank must run every SLoPe layer's forward and backward, in the same order (each is a
collective): evaluation and generation too run on all ranks, never on one alone.

Gradient accumulation: micro-batches run with the sync off (:func:`slope.parallel.no_sync`: the
layer keeps its local gradient, whole, on every rank) and then one with it on; backward passes with
the sync on may also follow each other (each adds its mean to the owner's). A backward with the
sync off after one with it on, in the same step, is an error: it cannot be averaged correctly.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from slope.optimizers.sharding import LayerOwners

__all__ = ["ShardedValues", "holds_values", "values_holder_of"]


def holds_values(layer: nn.Module) -> bool:
    """Whether ``layer.values`` hold its weights on this rank between uses (not sharded, or its owner)."""
    holder = getattr(layer, "values_holder", None)
    return holder is None or holder.owns(layer)


def values_holder_of(layers: Sequence[nn.Module]) -> "ShardedValues | None":
    """The :class:`ShardedValues` of ``layers`` (SLoPe layers), or ``None`` when they are not sharded."""
    return next((layer.values_holder for layer in layers if getattr(layer, "values_holder", None) is not None), None)


class ShardedValues:
    """Keeps each of ``layers``' ``values`` on its owner rank of ``group`` (module docstring).

    Every rank must construct it at the same point, with the same layers in the same order, each
    holding the same values (e.g. after :func:`slope.parallel.broadcast_module_state`). It is the
    model's sparse-gradient sync: :func:`slope.parallel.no_sync` turns :attr:`enabled` off.

    Args:
        layers: the model's SLoPe layers (:class:`slope.layer.SparseLinear`; not the merged
            inference form), all on one device.
        group: the data-parallel process group (default: the world).
    """

    def __init__(self, layers: Sequence[nn.Module], group=None):
        from slope.lora import MergedSparseLinear

        merged = [layer.layer_name for layer in layers if isinstance(layer, MergedSparseLinear)]
        if merged:
            raise ValueError(f"sharded values: {merged[0]} is a merged inference layer, which does not train; "
                             "shard the model before merging its adapters, or pass shard_values=False")
        self.layers = list(layers)
        self.group = group
        self.owners = LayerOwners([layer.values for layer in self.layers], group)
        self.world, self.rank = self.owners.world, self.owners.rank
        self.enabled = True  # reduce gradients in the backward (no_sync turns it off)
        self.syncs = 0  # gradient reductions issued (for tests and logs)
        # id(layer) → (its gradient as last reduced, that tensor's version then): the owner's; a
        # gradient zeroed or accumulated into in place since has another version
        self._reduced: dict[int, tuple[weakref.ref, int]] = {}
        self._aside: dict[int, torch.Tensor] = {}  # id(layer) → that gradient, during the next backward
        for layer in self.layers:
            layer.values_holder = self
            self._drop(layer)

    # ------------------------------------------------------------------ ownership
    def owns(self, layer: nn.Module) -> bool:
        return self.owners.owns(layer.values)

    def _src(self, layer: nn.Module) -> int:
        """The owner's global rank (what collectives name)."""
        return self.owners._global(self.owners.owner(layer.values))

    def _placeholder(self, layer: nn.Module) -> torch.Tensor:
        values = layer.values
        return values.new_empty((0, values.shape[-1]))

    # ------------------------------------------------------------------ values around a use
    @torch.no_grad()
    def _fetch(self, layer: nn.Module) -> None:
        """Every rank's ``layer.values`` become the owner's (collective)."""
        if not self.owns(layer):
            layer.values.data = layer.values.new_empty(layer.values_shape)
        dist.broadcast(layer.values.data, src=self._src(layer), group=self.group)

    def _drop(self, layer: nn.Module) -> None:
        """A non-owner frees ``layer.values`` (and the operands built from them)."""
        if not self.owns(layer):
            layer.values.data = self._placeholder(layer)
            layer.refresh()

    @contextlib.contextmanager
    def holding(self, layer: nn.Module) -> Iterator[None]:
        """``layer.values`` are the whole weights inside (collective: every rank enters alike)."""
        self._fetch(layer)
        try:
            yield
        finally:
            self._drop(layer)

    # ------------------------------------------------------------------ the backward
    def before_backward(self, layer: nn.Module) -> None:
        """Fetch the values; a gradient already averaged by an earlier backward of this step is set
        aside (the owner's) or dropped (a placeholder) so the new one is accumulated alone."""
        self._fetch(layer)
        grad = layer.values_grad
        if grad is None:
            return
        placeholder = grad.shape[0] == 0  # (the owner holds this step's mean)
        fresh = layer._grad_is_zero()  # zeroed since: a new step
        reduced = self._reduced.get(id(layer))
        averaged = reduced is not None and reduced[0]() is grad and reduced[1] == grad._version
        if not placeholder and (fresh or not averaged):
            return  # a zeroed buffer, or local micro-batches (no_sync) so far: this backward adds to them
        if not self.enabled and not fresh:
            self._drop(layer)
            raise RuntimeError(f"{layer.layer_name}: a backward without gradient sync (no_sync) after one with it in the same "
                               "step; with sharded values run the no_sync micro-batches first")
        if not placeholder:
            self._aside[id(layer)] = grad
        layer.values_grad = None

    @torch.no_grad()
    def after_backward(self, layer: nn.Module) -> None:
        """With the sync on, reduce the local gradient to the owner (its mean over the ranks, added
        to one set aside), the others keep a placeholder; then free the values."""
        aside = self._aside.pop(id(layer), None)
        try:
            grad = layer.values_grad
            if not self.enabled or grad is None:  # (None: the values do not train, on every rank)
                return
            dist.reduce(grad, dst=self._src(layer), op=dist.ReduceOp.SUM, group=self.group)
            self.syncs += 1
            if self.owns(layer):
                grad.div_(self.world)
                if aside is not None:
                    grad = aside.add_(grad)
                layer.values_grad = grad
                self._reduced[id(layer)] = (weakref.ref(grad), grad._version)
            else:
                layer.values_grad = grad.new_empty((0, grad.shape[-1]))
        finally:
            self._drop(layer)

    # ------------------------------------------------------------------ the optimizer step
    @torch.no_grad()
    def update_mask_t(self, layer: nn.Module) -> None:
        """``layer.update_mask_t()`` on the owner, its ``M_t`` broadcast (collective)."""
        if self.owns(layer):
            layer.update_mask_t()
        # received into a copy, then copied in: a collective does not bump the version that keys
        # the layer's caches of M_t-derived metadata
        bits = layer.mask_t_bits.clone()
        dist.broadcast(bits, src=self._src(layer), group=self.group)
        if not self.owns(layer):
            layer.mask_t_bits.copy_(bits)
            layer.refresh()

    @torch.no_grad()
    def set_mask(self, layer: nn.Module, mask: torch.Tensor, optimizer=None) -> torch.Tensor:
        """``layer.set_mask(mask, optimizer)`` (dynamic sparsity: RigL) with the values on their owner:
        the owner moves its values, gradient and moments to the new positions and recomputes
        ``M_t``, which the other ranks receive (collective; every rank passes the same ``mask``).
        Returns the bool ``(out, in)`` changed entries on every rank."""
        changed = mask.to(layer.mask_bits.device) ^ layer.mask
        if self.owns(layer):
            layer.set_mask(mask, optimizer)
        else:
            layer._set_mask(mask)
        from slope.parallel.wrap import broadcast_tensors

        broadcast_tensors([layer.mask_t_bits], src=self._src(layer), group=self.group)
        if not self.owns(layer):
            layer.refresh()
        return changed

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (collective)."""
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value)

    def total_norm(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The ``norm_type`` norm over all ranks of gradients each rank holds a part of, from this
        rank's part's norm ``local`` (collective)."""
        if norm_type == float("inf"):
            total = local.clone()
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
            return total
        total = local.pow(norm_type)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.pow(1.0 / norm_type)

    # ------------------------------------------------------------------ whole state
    @torch.no_grad()
    def complete_state(self, state: dict[str, torch.Tensor], names: dict[int, str], rank0_only: bool) -> None:
        """Put every layer's whole values (CPU) into ``state`` under ``names[id(layer)]`` — on
        rank 0 only (``rank0_only``: owners send to it; the others' ``state`` is left as it is)
        or on every rank. Collective; one layer's values on a device at a time."""
        for layer in self.layers:
            key, src = names[id(layer)], self._src(layer)
            if rank0_only:
                if self.owns(layer) and self.rank == 0:
                    state[key] = layer.values.detach().cpu().clone()
                elif self.owns(layer):
                    dist.send(layer.values.data.contiguous(), dst=self.owners._global(0), group=self.group)
                elif self.rank == 0:
                    buffer = layer.values.new_empty(layer.values_shape)
                    dist.recv(buffer, src=src, group=self.group)
                    state[key] = buffer.cpu()
                continue
            buffer = layer.values.data if self.owns(layer) else layer.values.new_empty(layer.values_shape)
            dist.broadcast(buffer, src=src, group=self.group)
            state[key] = buffer.cpu().clone()

    def placeholders_for(self, state: dict[str, torch.Tensor], names: dict[int, str]) -> dict[str, torch.Tensor]:
        """A copy of a whole ``state`` to load on this rank: the values of layers it does not own
        become ``(0, kept)`` placeholders (after checking that the whole ones fit)."""
        state = dict(state)
        for layer in self.layers:
            key = names[id(layer)]
            values = state.get(key)
            if values is None or self.owns(layer):
                continue
            if tuple(values.shape) != layer.values_shape:
                raise ValueError(f"{key}: the state's values are {tuple(values.shape)}, this layer's "
                                 f"{layer.values_shape}; load a state of this model's layer shapes")
            state[key] = values[:0]
        return state
