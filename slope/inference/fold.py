"""How a merged layer folds its adapters into the sparse GEMM (DESIGN §5): ``stacked`` or ``extended``.

A SLoPe layer with adapters computes ``y = x (W⊙M)ᵀ + s·(x (A⊙M_A)ᵀ) Bᵀ + b`` (``s = α/r``;
``W (out, in)``, ``A (r, in)``, ``B (out, r)``). Two merged forms compute it:

``stacked`` (the original form)
    one sparse GEMM on ``[W⊙M ; A⊙M_A]`` (``(out + r, in)``) gives ``[y₀ | u]``, then an add-mm
    ``y₀ += s·u Bᵀ + b`` reads and rewrites the whole output: two kernels, the second a full pass
    over ``y``; the output is a strided view (row stride ``out + r``).
``extended`` (the reduction dimension extended)
    ``y = [x | ũ] · [W⊙M | B̃]ᵀ + b`` with ``u = s·x (A⊙M_A)ᵀ`` and, for ``R = round_up(r, 8)``,
    ``ũ (T, 2R)`` = ``u`` interleaved with zeros (``ũ[:, 2i] = u[:, i]``), ``B̃ (out, 2R)`` = ``B``
    interleaved with zero columns the same way. ``B̃`` keeps entries 0 and 2 of every group of 4,
    so ``[W⊙M | B̃]`` is **2:4 along its reduction dimension** and is one sparse operand; the
    extra reduction length ``2R`` is a multiple of 16 (CUTLASS sm90's alignment). The low-rank
    term is summed in the GEMM's own accumulator and the bias added in its epilogue: no add-mm
    pass, a contiguous output. ``[x | ũ]`` is built by :func:`slope.kernels.lowrank_concat`,
    one pass over ``x`` (read once, written once, with the small ``x (s·A⊙M_A)ᵀ`` product).

Bytes moved besides the GEMM itself (``T`` tokens, 2-byte elements): ``stacked`` writes ``u``,
then reads ``u``, reads and writes ``y``: ``≈ 2T(2·out + 2r)``; ``extended`` reads ``x`` and
writes ``[x | ũ]``: ``≈ 2T(2·in + 4R)``. ``auto`` (:func:`choose_fold`) takes ``extended`` when
that is no more (``in + 2R <= out + r``), else ``stacked`` (e.g. Llama's ``down_proj``,
``in = 4·out``).
"""
from __future__ import annotations

import torch

__all__ = ["FOLDS", "choose_fold", "padded_rank", "extended_weight", "scaled_lora_a"]

#: the merged forms; ``auto`` picks one per layer (:func:`choose_fold`).
FOLDS = ("auto", "stacked", "extended")


def padded_rank(rank: int) -> int:
    """``R = round_up(rank, 8)``: the extended reduction adds ``2R`` columns, a multiple of 16."""
    return -(-rank // 8) * 8


def choose_fold(fold: str, in_features: int, out_features: int, rank: int) -> str:
    """``stacked`` or ``extended`` for a layer (``fold`` = ``auto``: the one moving fewer bytes
    outside the GEMM, module docstring)."""
    if fold not in FOLDS:
        raise ValueError(f"lora fold {fold!r} unknown; choose one of {', '.join(FOLDS)}")
    if fold != "auto":
        return fold
    return "extended" if in_features + 2 * padded_rank(rank) <= out_features + rank else "stacked"


def _masked_a(layer) -> torch.Tensor:
    a = layer.lora_A.detach()
    return torch.where(layer.lora_A_mask, a, torch.zeros((), dtype=a.dtype, device=a.device))


@torch.no_grad()
def extended_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense (out, in + 2R), mask (out, in + 2R) bool)`` of ``[W⊙M | B̃]`` in ``values``' dtype.
    ``mask`` keeps exactly 2 of every 4 along the rows (``M``, then columns ``in + 2i``)."""
    out, rank = layer.out_features, layer.lora_rank
    big_r = padded_rank(rank)
    b = torch.zeros(out, big_r, 2, dtype=layer.values.dtype, device=layer.values.device)
    b[:, :rank, 0] = layer.lora_B.detach().to(b.dtype)
    tail_mask = torch.zeros(out, big_r, 2, dtype=torch.bool, device=b.device)
    tail_mask[..., 0] = True
    dense = torch.cat([layer.dense_weight(), b.reshape(out, 2 * big_r)], dim=1)
    return dense, torch.cat([layer.mask, tail_mask.reshape(out, 2 * big_r)], dim=1)


@torch.no_grad()
def scaled_lora_a(layer, dtype: torch.dtype) -> torch.Tensor:
    """``s·(A⊙M_A)`` zero-padded to ``(R, in)`` in ``dtype`` (the product is taken in fp32)."""
    a = torch.zeros(padded_rank(layer.lora_rank), layer.in_features, dtype=torch.float32, device=layer.lora_A.device)
    a[: layer.lora_rank] = _masked_a(layer).float() * layer.lora_scaling
    return a.to(dtype)
