"""``SparseLayerMasks``: the masks ``M`` of slope's SLoPe layers behind :class:`MaskedWeights`' interface.

N:M weights that train on :class:`slope.SparseLinear` (the accelerated 2:4 path) keep their mask in
the layer and only their kept values in storage, so nothing has to keep pruned entries zero: the
layer cannot represent them. A :class:`slope.sparsity.MaskPolicy` drives these masks through the
same calls it uses on ordinary weights (:meth:`set_mask`, :meth:`weight`,
:meth:`capture_dense_grads`, :meth:`state_dict`), so RigL and friends are written once.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch

from slope.masks import pack_mask, unpack_mask

__all__ = ["SparseLayerMasks"]


class SparseLayerMasks:
    """Named :class:`slope.SparseLinear` layers, seen as masked ``(out, in)`` weights.

    - :attr:`masks` / :meth:`weight`: each layer's ``M`` (bool) and ``W ⊙ M`` (fp32), fresh copies;
    - :meth:`set_mask`: :meth:`slope.SparseLinear.set_mask` (values and the sparse optimizer's
      moments move to the new positions; grown entries start at zero);
    - :meth:`capture_dense_grads`: the layers' backward also keeps the full ``dyᵀx``, which it
      computes anyway before keeping the entries of ``M`` (one fp32 ``(out, in)`` buffer per
      layer while capturing, no extra matmul).
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module]):
        from slope.layer import SparseLinear

        self.layers = dict(layers)
        for name, layer in self.layers.items():
            if not isinstance(layer, SparseLinear):
                raise TypeError(f"{name}: SparseLayerMasks holds slope.SparseLinear layers, got {type(layer).__name__}")
        self.capturing = False

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: layer.mask for name, layer in self.layers.items()}

    def weight(self, name: str) -> torch.Tensor:
        """``W ⊙ M`` of layer ``name`` as a dense fp32 ``(out, in)`` tensor (values sharded by
        :class:`slope.parallel.ShardedValues`: fetched from their owner, collective)."""
        layer = self.layers[name]
        holder = layer.values_holder
        with contextlib.nullcontext() if holder is None else holder.holding(layer):
            return layer.dense_weight(torch.float32)

    def out_in(self, name: str, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        """``tensor`` itself: a SLoPe layer's mask and weight are ``(out, in)`` already (see
        :meth:`MaskedWeights.out_in`)."""
        return tensor

    # ------------------------------------------------------------------ dense gradients
    def capture_dense_grads(self, on: bool) -> None:
        """Start (``True``) or stop (``False``) keeping the layers' full weight gradients; both empty them."""
        self.capturing = bool(on)
        for layer in self.layers.values():
            layer.keep_dense_grad = self.capturing
            layer.dense_grad = None

    @property
    def dense_grads(self) -> dict[str, torch.Tensor]:
        return {name: layer.dense_grad for name, layer in self.layers.items() if layer.dense_grad is not None}

    # ------------------------------------------------------------------ changing masks
    def set_mask(self, name: str, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Replace layer ``name``'s ``M`` (see :meth:`slope.SparseLinear.set_mask`; sharded values: on
        their owner, :meth:`slope.parallel.ShardedValues.set_mask`); returns the changed entries."""
        layer = self.layers[name]
        if layer.values_holder is not None:
            return layer.values_holder.set_mask(layer, mask, optimizer)
        return layer.set_mask(mask, optimizer)

    def apply_(self) -> None:
        """Nothing to do: a SLoPe layer stores only kept entries."""

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:  # noqa: ARG002
        """Nothing to do: the sparse optimizer's state holds only kept entries."""

    # ------------------------------------------------------------------ reporting and persistence
    def sparsity(self, names: Iterable[str] | None = None) -> float:
        """Fraction of pruned entries over ``names`` (default: every layer)."""
        names = list(self.layers if names is None else names)
        total = sum(self.layers[n].out_features * self.layers[n].in_features for n in names)
        kept = sum(math.prod(self.layers[n].values_shape) for n in names)  # (whole: also where values are sharded)
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: packed uint8 M}`` on the CPU."""
        return {name: pack_mask(layer.mask).cpu() for name, layer in self.layers.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` (a layer whose ``M`` already matches is left alone)."""
        if set(state) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(state)), sorted(set(state) - set(self.layers))
            raise ValueError(f"saved masks do not match the SLoPe layers (missing {missing}, unexpected {extra})")
        for name, bits in state.items():
            layer = self.layers[name]
            mask = unpack_mask(bits, (layer.out_features, layer.in_features)).to(layer.mask_bits.device)
            if not torch.equal(mask, layer.mask):
                layer.set_mask(mask)
