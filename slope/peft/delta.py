"""Sparse deltas on frozen linear weights: ``SparseDelta`` and the ``SftLinear`` wrapper.

A delta of a weight ``W`` (any 2-D layout: ``nn.Linear`` stores ``(out, in)``, GPT-2's ``Conv1D``
stores ``(in, out)``) is ``k`` values at ``k`` distinct flat indices of ``W``'s *stored* layout.
The layer computes with ``W + scatter(indices, values)`` without ever storing that sum: the
effective weight is rebuilt (one transient copy of one layer) in forward and backward, the
weight's full gradient exists only inside this layer's backward, and only its ``k`` entries at
``indices`` leave it (``values.grad``, shape ``(k,)``). An optional *gradient observer* sees the
full gradient there first (SpIEL-AG's candidate statistics, :mod:`slope.peft.selection`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.parallel.sharded import is_sharded

__all__ = ["SftLinear", "SparseDelta", "check_indices", "effective_weight", "refuse_sharded_deltas"]

GradObserver = Callable[[torch.Tensor], None]


class SparseDelta(nn.Module):
    """``k`` trainable ``values`` at distinct flat ``indices`` (int64, ``(k,)``) of a weight of ``shape``.

    ``values`` is the only parameter; ``indices`` is a buffer (it moves with ``.to()`` and DDP
    broadcasts it). ``idx`` gives the indices as ``(ndim, k)`` coordinates (SIFT's convention).
    """

    def __init__(self, shape: tuple[int, ...], indices: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        check_indices(indices, self.shape)
        indices = indices.detach().reshape(-1).long()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=indices.device))

    @property
    def dense_numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def idx(self) -> torch.Tensor:
        """The indices as coordinates, ``(ndim, k)`` int64."""
        return torch.stack(torch.unravel_index(self.indices, self.shape))

    def to_dense(self) -> torch.Tensor:
        """The delta as a dense tensor of ``shape`` (values' dtype); for checks and small models."""
        out = torch.zeros(self.dense_numel, dtype=self.values.dtype, device=self.values.device)
        return out.index_put_((self.indices,), self.values.detach()).view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, k={self.indices.numel()}, density={self.indices.numel() / self.dense_numel:.4g}"


def check_indices(indices: torch.Tensor, shape: tuple[int, ...], what: str = "delta indices") -> None:
    """``ValueError`` unless ``indices`` (1-D, integer) are distinct flat positions of a weight of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool or indices.dim() != 1:
        raise ValueError(f"{what} must be a 1-D integer tensor of flat positions, got {indices.dtype} of shape {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(f"{what} must lie in [0, {numel}) for a weight of shape {tuple(shape)}")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"{what} must be distinct")


def refuse_sharded_deltas(deltas) -> None:
    """A one-line ``ValueError`` when ``fully_shard`` split the deltas' values (``DTensor``): their
    indices (buffers) stay whole, so values and indices would no longer line up."""
    if any(is_sharded(delta.values) for delta in deltas):
        raise ValueError("the deltas' values were sharded by fully_shard (DTensor) while their indices stay whole: "
                         "shard with slope.peft.shard_sft_model(model), which keeps the deltas whole and shards the frozen base")


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``weight + scatter(indices, values)`` as a new tensor in ``weight``'s dtype.

    The same rounding as :meth:`SftLinear.merge` (values are cast to the weight's dtype, then added),
    so a merged layer computes exactly what the unmerged one did.
    """
    flat = weight.detach().reshape(-1).clone()
    flat.index_add_(0, indices, values.detach().to(weight.dtype))
    return flat.view(weight.shape)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


class _DeltaLinear(torch.autograd.Function):
    """``y = x (W + D)ᵀ + b`` (``transposed``: ``x (W + D) + b``, Conv1D) with ``D = scatter(values)``.

    Saves ``x`` (as ``nn.Linear`` does) and references to ``W``, ``values`` and ``indices``; never a
    copy of the effective weight. Gradients: ``x``, ``values`` (gathered from the full weight
    gradient, which then dies) and a trainable ``bias``; the frozen ``W`` gets none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, transposed: bool, observer: GradObserver | None):
        dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            w = effective_weight(weight, values, indices).to(dtype)
            xc = x.to(dtype)
            y = xc @ w if transposed else F.linear(xc, w)
            if bias is not None:
                y = y + bias.to(dtype)
        ctx.save_for_backward(xc, weight, values, indices)
        ctx.transposed, ctx.observer, ctx.x_dtype, ctx.has_bias = transposed, observer, x.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, values, indices = ctx.saved_tensors
        dy = grad_out.to(xc.dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = effective_weight(weight, values, indices).to(xc.dtype)
            grad_x = (dy @ w.t() if ctx.transposed else dy @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] or ctx.observer is not None:
            x2 = xc.reshape(-1, xc.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            full = x2.t() @ dy2 if ctx.transposed else dy2.t() @ x2  # the stored layout of W
            if ctx.observer is not None:
                ctx.observer(full)
            grad_values = full.reshape(-1)[indices].to(values.dtype)
            del full
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class SftLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` (``base_layer``) plus a trainable :class:`SparseDelta`.

    ``merge()`` adds the delta into the base weight and keeps the ``k`` base values it overwrote,
    so ``unmerge()`` restores the base weight bit for bit. While merged the layer is the plain
    base layer (and the delta must not train). ``grad_observer`` (or ``None``) is called with the
    full weight gradient in backward (stored layout, compute dtype).
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or _is_conv1d(base_layer)):
            raise TypeError(f"SftLinear wraps nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        self.sft_delta = SparseDelta(weight.shape, indices.to(weight.device), dtype or weight.dtype)
        self.merged = False
        self._merged_base: torch.Tensor | None = None
        self.grad_observer: GradObserver | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        delta = self.sft_delta
        return _DeltaLinear.apply(
            x, self.base_layer.weight, self.base_layer.bias, delta.values, delta.indices, self.transposed, self.grad_observer
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight in place (remembering the ``k`` base values)."""
        if self.merged:
            return
        weight, delta = self.base_layer.weight, self.sft_delta
        flat = weight.data.view(-1)
        self._merged_base = flat[delta.indices].clone()
        flat.index_add_(0, delta.indices, delta.values.detach().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight (the values ``merge`` overwrote)."""
        if not self.merged:
            return
        self.base_layer.weight.data.view(-1)[self.sft_delta.indices] = self._merged_base
        self._merged_base = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}, layout={'(in, out)' if self.transposed else '(out, in)'}"
