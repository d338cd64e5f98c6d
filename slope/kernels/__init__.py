"""Kernel entry points of slope (``slope.kernels``).

The CUDA/C++ sources that :mod:`slope.kernels.cutlass_sm90` compiles live in ``csrc/`` here
(package data, not a Python package).

Functions with a Triton kernel (``addmm``, ``lowrank_concat``, ``matvec_add``, ``prune_2to4``,
``double_prune_mask_2to4``, ``prune_compress_2to4``, ``gather_kept_2to4``,
``scatter_kept_2to4``, ``transpose_kept_2to4``, ``adamw_step_``, ``adamw_step_operands_``) dispatch: CUDA tensors of a dtype Triton
handles (fp16/bf16/fp32) go to :mod:`slope.kernels.triton_kernels` when Triton can run here;
everything else goes to the pure-PyTorch references in :mod:`slope.kernels.reference`, which
stay importable as ``slope.kernels.reference.*`` and are the oracles of the fast paths.
``compress_2to4`` / ``decompress_2to4`` / ``pattern_2to4`` / ``stored_mask_2to4`` are the references on every device.

The kept-value kernels (``double_prune_mask_2to4``, ``gather_kept_2to4``, ``scatter_kept_2to4``,
``transpose_kept_2to4``) take each mask as bool ``(rows, cols)`` or as its packed bits
(:func:`slope.masks.pack_mask`, ``uint8 (rows·cols/8,)``), which is how SLoPe layers store them.
"""
from __future__ import annotations

import functools

import torch

from . import reference
from .reference import (
    COMPRESSIBLE_DTYPES,
    compress_2to4,
    cutlass_layout_supported,
    decompress_2to4,
    metadata_dtype,
    pattern_2to4,
    stored_mask_2to4,
)

__all__ = [
    "COMPRESSIBLE_DTYPES",
    "adamw_step_",
    "adamw_step_operands_",
    "addmm",
    "compress_2to4",
    "cutlass_layout_supported",
    "decompress_2to4",
    "double_prune_mask_2to4",
    "gather_kept_2to4",
    "lowrank_concat",
    "merged_decode",
    "matvec_add",
    "metadata_dtype",
    "pattern_2to4",
    "prune_2to4",
    "prune_compress_2to4",
    "reference",
    "scatter_kept_2to4",
    "stored_mask_2to4",
    "transpose_kept_2to4",
    "triton_usable",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True when these tensors should take the Triton path: all plain (not a subclass such as
    FSDP2's DTensor, whose local shards the kernels would not see) CUDA tensors of a
    Triton-handled dtype, and Triton importable (CPU tensors always use the reference)."""
    return (
        all(type(t) in _PLAIN_TENSOR_TYPES and t.is_cuda and t.dtype in _TRITON_DTYPES for t in tensors)
        and _triton_importable()
    )


def _triton():
    from . import triton_kernels

    return triton_kernels


def _triton_merged_decode():
    from . import triton_merged_decode

    return triton_merged_decode


def addmm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place ``c += alpha * (a @ b) (+ bias)``, ``a (M, K)``, ``b (K, N)``, ``c (M, N)``, optional
    ``bias (N,)`` added to every row (one pass with the product on CUDA); returns ``c``."""
    if triton_usable(a, b, c) and a.dtype == b.dtype == c.dtype and (bias is None or triton_usable(bias)):
        return _triton().addmm(a, b, c, alpha, bias)
    return reference.addmm(a, b, c, alpha, bias)


def lowrank_concat(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``[x | interleave(x aᵀ, 0)]`` of shape ``(M, K + 2R)`` for ``x (M, K)``, ``a (R, K)``: ``x``
    then ``u = x aᵀ`` with ``u[:, i]`` at column ``K + 2i`` and zeros between (one Triton pass on
    CUDA, reading ``x`` once; see :mod:`slope.kernels.triton_lowrank`)."""
    if triton_usable(x, a) and x.dtype == a.dtype and x.device == a.device and x.dim() == a.dim() == 2 and x.shape[1] == a.shape[1]:
        from . import triton_lowrank

        return triton_lowrank.lowrank_concat(x, a)
    return reference.lowrank_concat(x, a)


def merged_decode(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """A merged 2:4 + low-rank layer on a few rows: ``x Wᵀ + (x aᵀ) bᵀ (+ bias)`` with ``W`` given as
    kept ``values (N, K/2)`` (rows may be strided) and ``compress_2to4`` metadata, ``x (M <= 16, K)``,
    ``a (R, K)``, ``b (N, R)``: one Triton launch on CUDA (:mod:`slope.kernels.triton_merged_decode`),
    else the reference."""
    tensors = (x, values, a, b) if bias is None else (x, values, a, b, bias)
    if (triton_usable(*tensors) and x.dtype == values.dtype == a.dtype == b.dtype and (bias is None or bias.dtype == x.dtype)
            and x.shape[0] <= reference.MERGED_DECODE_MAX_ROWS and values.stride(1) == 1 and meta.device == x.device):
        return _triton_merged_decode().merged_decode(x, values, meta, a, b, bias)
    return reference.merged_decode(x, values, meta, a, b, bias)


def matvec_add(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """In place ``matrix[..., j] += vector[j]`` (any strides); returns ``matrix``."""
    if triton_usable(matrix, vector):
        return _triton().matvec_add(matrix, vector)
    return reference.matvec_add(matrix, vector)


def prune_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude 2:4 pruning along the last dim: ``(pruned, mask)``, pruned entries exactly 0."""
    if triton_usable(dense):
        return _triton().prune_2to4(dense)
    return reference.prune_2to4(dense)


def double_prune_mask_2to4(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M_t`` for 2:4 (bool ``(out, in)``, 2:4 along ``out``, ``⊆ mask``)."""
    if triton_usable(weight) and mask.device == weight.device:
        return _triton().double_prune_mask_2to4(weight, mask)
    return reference.double_prune_mask_2to4(weight, mask)


def prune_compress_2to4(dense: torch.Tensor, layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``dense (rows, cols)`` 2:4 and compress it: ``(values (rows, cols/2), meta)``."""
    if triton_usable(dense):
        return _triton().prune_compress_2to4(dense, layout)
    return reference.prune_compress_2to4(dense, layout)


def gather_kept_2to4(
    full: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, accumulate: bool = True,
) -> torch.Tensor:
    """Kept entries of ``full (rows, cols)`` under 2:4 ``mask`` as a new ``(rows, cols/2)`` tensor
    (of ``dtype``, default ``full``'s), or added to ``out`` (``accumulate=False``: written into it).

    The Triton path trusts ``mask`` to keep exactly 2 of every 4 (the reference checks it)."""
    if (triton_usable(full) and mask.device == full.device and (out is None or triton_usable(out))
            and (dtype is None or dtype in _TRITON_DTYPES)):
        return _triton().gather_kept_2to4(full, mask, out, dtype=dtype, accumulate=accumulate)
    return reference.gather_kept_2to4(full, mask, out, dtype=dtype, accumulate=accumulate)


def transpose_kept_2to4(
    values: torch.Tensor, mask: torch.Tensor, mask_t: torch.Tensor, dtype: torch.dtype | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """Kept values ``(cols, rows/2)`` of ``(W ⊙ M ⊙ M_t)ᵀ`` (``dense``: the whole ``(cols, rows)``)
    from ``W``'s kept ``values (rows, cols/2)``.

    The Triton path trusts the masks (2 of 4 kept, ``M_t ⊆ M``; the reference checks the counts)."""
    if triton_usable(values) and mask.device == mask_t.device == values.device and (dtype is None or dtype in _TRITON_DTYPES):
        return _triton().transpose_kept_2to4(values, mask, mask_t, dtype, dense)
    return reference.transpose_kept_2to4(values, mask, mask_t, dtype, dense)


def adamw_step_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """One in-place AdamW step of ``param`` (any float dtype) with fp32 moments; ``step`` counts
    this step. One Triton pass for contiguous CUDA tensors, else the PyTorch reference."""
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if triton_usable(*tensors) and all(t.is_contiguous() for t in tensors) and len({t.device for t in tensors}) == 1:
        return _triton().adamw_step_(param, grad, exp_avg, exp_avg_sq, **kw)
    return reference.adamw_step_(param, grad, exp_avg, exp_avg_sq, **kw)


def adamw_step_operands_(
    values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    mask: torch.Tensor, mask_t: torch.Tensor, *, fwd: torch.Tensor | None = None, bwd: torch.Tensor | None = None,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """One AdamW step of a 2:4 layer's kept ``values (rows, cols/2)`` (fp32 moments) that also writes
    its forward operand's values ``fwd (rows, cols/2)`` and backward operand's values ``bwd (cols,
    rows/2)`` (:func:`transpose_kept_2to4` of the new values; either may be None): one Triton pass
    on CUDA (:mod:`slope.kernels.triton_fused_step`), else the reference. The Triton path trusts the
    masks as :func:`transpose_kept_2to4` does."""
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    tensors = [values, grad, exp_avg, exp_avg_sq] + [t for t in (fwd, bwd) if t is not None]
    if (triton_usable(*tensors) and all(t.is_contiguous() for t in tensors)
            and len({t.device for t in tensors + [mask, mask_t]}) == 1):
        from . import triton_fused_step

        return triton_fused_step.adamw_step_operands_(values, grad, exp_avg, exp_avg_sq, mask, mask_t, fwd=fwd, bwd=bwd, **kw)
    return reference.adamw_step_operands_(values, grad, exp_avg, exp_avg_sq, mask, mask_t, fwd=fwd, bwd=bwd, **kw)


def scatter_kept_2to4(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``(rows, cols)`` (``W ⊙ M``) from kept ``values (rows, cols/2)`` and 2:4 ``mask``.

    The Triton path trusts ``mask`` to keep exactly 2 of every 4 (the reference checks it)."""
    if triton_usable(values) and mask.device == values.device and (dtype is None or dtype in _TRITON_DTYPES):
        return _triton().scatter_kept_2to4(values, mask, dtype)
    return reference.scatter_kept_2to4(values, mask, dtype)
