"""Pure-PyTorch reference kernels: they run on any device and are the oracles of the fast paths.

Compressed 2:4 format (``compress_2to4`` / ``decompress_2to4``)
----------------------------------------------------------------
A 2-D ``dense (rows, cols)`` that keeps at most 2 of every 4 consecutive entries along ``cols``
is stored as

- ``values (rows, cols // 2)``, same dtype: the two kept entries of each group in column order
  (a group keeping fewer than two is padded with zeros at fixed positions);
- ``meta``: which two positions each group keeps, as a 4-bit code ``idx0 | idx1 << 2``.

Two metadata layouts, told apart by ``meta.dtype``:

- **CUTLASS** (``int16`` for fp16/bf16, ``int32`` for int8): bit-identical to PyTorch's
  ``sparse_semi_structured_from_dense_cutlass`` (codes packed 4 resp. 8 to an element, elements
  reordered into CUTLASS's interleaved column-major layout), so PyTorch's CUTLASS kernels consume
  it as is. Needs ``rows % 32 == 0`` and ``cols % 32 == 0`` (int8: ``rows % 16``, ``cols % 64``):
  the interleaved layout pairs metadata columns.
- **plain** (``uint8``, shape ``(rows, cols // 4)``, one code per byte): our own layout, used for
  fp32 (PyTorch's fp32 CUTLASS format is 1:2 and cannot express 2:4) and for shapes the CUTLASS
  layout cannot hold.
"""
from __future__ import annotations

import math

import torch

#: the most rows :func:`merged_decode` (and its Triton kernel) takes: decoding batches.
MERGED_DECODE_MAX_ROWS = 16

__all__ = [
    "COMPRESSIBLE_DTYPES",
    "compress_2to4",
    "decompress_2to4",
    "prune_2to4",
    "double_prune_mask_2to4",
    "prune_compress_2to4",
    "gather_kept_2to4",
    "scatter_kept_2to4",
    "stored_mask_2to4",
    "transpose_kept_2to4",
    "cutlass_layout_supported",
    "metadata_dtype",
    "addmm",
    "matvec_add",
    "adamw_step_",
    "adamw_step_operands_",
]

COMPRESSIBLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)

# (idx0, idx1) kept positions for each 4-bit pattern m0 | m1<<1 | m2<<2 | m3<<3 of a group with at
# most two kept entries. Groups with fewer than two use the fillers PyTorch's CUTLASS converter
# uses (so the bytes match); patterns with three or four kept entries are invalid (-1).
_PAIR_FOR_PATTERN = torch.tensor(
    [
        (2, 3), (0, 2), (1, 2), (0, 1),  # patterns 0-3
        (2, 3), (0, 2), (1, 2), (-1, -1),
        (2, 3), (0, 3), (1, 3), (-1, -1),
        (2, 3), (-1, -1), (-1, -1), (-1, -1),
    ],
    dtype=torch.int64,
)
#: number of kept entries of each 4-bit pattern.
_KEPT_COUNT = torch.tensor([bin(pattern).count("1") for pattern in range(16)], dtype=torch.uint8)


def _group_patterns(mask: torch.Tensor) -> torch.Tensor:
    """``int64 (rows, cols/4)``: the 4-bit pattern ``m0 | m1<<1 | m2<<2 | m3<<3`` of every group of
    4 along the last dim of bool ``mask (rows, cols)`` (uint8 arithmetic: ~5x faster than int64)."""
    rows, cols = mask.shape
    g = mask.reshape(rows, cols // 4, 4).view(torch.uint8)
    return (g[..., 0] | (g[..., 1] << 1) | (g[..., 2] << 2) | (g[..., 3] << 3)).long()


def cutlass_layout_supported(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether a ``(rows, cols)`` operand of ``dtype`` fits PyTorch's CUTLASS 2:4 layout."""
    if dtype in (torch.float16, torch.bfloat16):
        return rows % 32 == 0 and cols % 32 == 0
    if dtype == torch.int8:
        return rows % 16 == 0 and cols % 64 == 0
    return False


def metadata_dtype(rows: int, cols: int, dtype: torch.dtype) -> torch.dtype:
    """The ``meta`` dtype :func:`compress_2to4` (``layout="auto"``) returns for this operand."""
    if not cutlass_layout_supported(rows, cols, dtype):
        return torch.uint8
    return torch.int32 if dtype == torch.int8 else torch.int16


def _meta_scatter_offsets(rows: int, meta_cols: int, meta_dtype: torch.dtype, device) -> torch.Tensor:
    """Flat destination of every metadata element ``(r, c)`` (row-major) in CUTLASS's layout.

    CUTLASS keeps sparse-GEMM metadata in ``ColumnMajorInterleaved<2>`` after permuting rows
    within blocks of 32 (16 for 32-bit metadata) and swapping the off-diagonal entries of every
    2×2 tile.
    """
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).unsqueeze(0).expand(rows, meta_cols)
    block, spread = (32, 4) if meta_dtype == torch.int16 else (16, 2)
    r = (r // block) * block + (r % 8) * spread + (r % block) // 8
    # 2x2 tiles: (even row, odd col) <-> (odd row, even col).
    shift = ((r % 2 == 0) & (c % 2 == 1)).long() - ((r % 2 == 1) & (c % 2 == 0)).long()
    r, c = r + shift, c - shift
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")


def compress_2to4(
    dense: torch.Tensor, mask: torch.Tensor | None = None, layout: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse ``dense (rows, cols)`` into ``(values (rows, cols//2), meta)``.

    ``mask`` (bool, ``dense``'s shape) says which entries are kept; without it the nonzeros are.
    Either way at most 2 of every 4 along ``cols`` may be kept — a denser input is an error (prune
    it first with :func:`prune_2to4`), never silently truncated. ``layout`` is ``"auto"`` (CUTLASS
    where it fits, else plain), ``"cutlass"`` or ``"plain"``.
    """
    _check_2d("dense", dense)
    if dense.dtype not in COMPRESSIBLE_DTYPES:
        raise TypeError(
            f"compress_2to4 supports {[str(d) for d in COMPRESSIBLE_DTYPES]}, got {dense.dtype}; "
            "cast the tensor first (or use compress=False to simulate sparsity in this dtype)"
        )
    rows, cols = dense.shape
    if cols % 4:
        raise ValueError(f"2:4 compression needs cols divisible by 4, got shape {(rows, cols)}")
    if mask is None:
        mask = dense != 0
    elif mask.shape != dense.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape {tuple(dense.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    try:
        pairs = _kept_pairs_2to4(mask, "mask", exactly_two=False)  # (rows, cols/4, 2)
    except ValueError:
        raise ValueError(
            "input is not 2:4 sparse (some group of 4 keeps more than 2 entries); "
            "prune it first with slope.kernels.prune_2to4"
        ) from None
    kept = torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))
    values = kept.reshape(rows, cols // 4, 4).gather(-1, pairs).reshape(rows, cols // 2)
    codes = pairs[..., 0] | (pairs[..., 1] << 2)  # (rows, cols/4), 0..15

    if layout not in ("auto", "cutlass", "plain"):
        raise ValueError(f"layout must be 'auto', 'cutlass' or 'plain', got {layout!r}")
    fits = cutlass_layout_supported(rows, cols, dense.dtype)
    if layout == "cutlass" and not fits:
        raise ValueError(
            f"the CUTLASS layout needs fp16/bf16 with rows % 32 == 0 and cols % 32 == 0 "
            f"(int8: rows % 16, cols % 64); got {dense.dtype} {(rows, cols)}"
        )
    if layout == "plain" or not fits:
        return values, codes.to(torch.uint8)

    meta_dtype = torch.int32 if dense.dtype == torch.int8 else torch.int16
    per_elem = 8 if meta_dtype == torch.int32 else 4
    meta_cols = cols // (4 * per_elem)
    nibbles = codes.reshape(rows, meta_cols, per_elem) << (4 * torch.arange(per_elem, device=dense.device))
    packed = nibbles.sum(-1)  # int64; fits 16 resp. 32 bits
    if meta_dtype == torch.int16:
        packed = torch.where(packed >= 1 << 15, packed - (1 << 16), packed)
    else:
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    meta = torch.empty(rows * meta_cols, dtype=meta_dtype, device=dense.device)
    meta.scatter_(0, _meta_scatter_offsets(rows, meta_cols, meta_dtype, dense.device), packed.to(meta_dtype).reshape(-1))
    return values, meta.reshape(rows, meta_cols)


def _codes_from_meta(meta: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """Per-group 4-bit codes ``(rows, groups)`` (int64) from either metadata layout."""
    if meta.dtype == torch.uint8:
        if meta.shape != (rows, groups):
            raise ValueError(f"plain metadata must have shape {(rows, groups)}, got {tuple(meta.shape)}")
        return meta.long()
    if meta.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"metadata dtype must be uint8 (plain), int16 or int32 (CUTLASS), got {meta.dtype}")
    per_elem = 4 if meta.dtype == torch.int16 else 8
    if groups % per_elem or meta.shape != (rows, groups // per_elem):
        raise ValueError(
            f"CUTLASS metadata for {rows} rows and {groups} groups must have shape "
            f"{(rows, groups // per_elem)}, got {tuple(meta.shape)}"
        )
    meta_cols = groups // per_elem
    offsets = _meta_scatter_offsets(rows, meta_cols, meta.dtype, meta.device)
    unordered = meta.reshape(-1).gather(0, offsets).long().reshape(rows, meta_cols, 1)
    shifts = 4 * torch.arange(per_elem, device=meta.device)
    return ((unordered >> shifts) & 0xF).reshape(rows, groups)


def _kept_columns(meta: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """``(rows, groups, 2)`` int64: the two kept columns (0–3) of each group of 4 that ``meta`` encodes."""
    codes = _codes_from_meta(meta, rows, groups)
    return torch.stack((codes & 3, (codes >> 2) & 3), dim=-1)


def pattern_2to4(meta: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The kept pattern that ``meta`` (from :func:`compress_2to4`, either layout) encodes for a
    ``(rows, cols)`` operand, as bool ``(rows, cols)``: the mask :func:`decompress_2to4` scatters
    the values into, read from the metadata alone (kept entries whose value is zero included)."""
    if cols % 4:
        raise ValueError(f"cols must be a multiple of 4, got {cols}")
    pattern = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=meta.device)
    pattern.scatter_(-1, _kept_columns(meta, rows, cols // 4), True)
    return pattern.reshape(rows, cols)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress_2to4`: ``(values (rows, cols//2), meta)`` → ``dense (rows, cols)``."""
    _check_2d("values", values)
    rows, half = values.shape
    if half % 2:
        raise ValueError(f"values must have an even number of columns, got shape {tuple(values.shape)}")
    if meta.device != values.device:
        raise ValueError(f"values on {values.device} but meta on {meta.device}")
    groups = half // 2
    dense = torch.zeros(rows, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, _kept_columns(meta, rows, groups), values.reshape(rows, groups, 2))
    return dense.reshape(rows, 4 * groups)


def prune_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude 2:4 pruning along the last dim: ``(pruned, mask)``, pruned entries exactly 0."""
    from slope.masks import nm_mask

    mask = nm_mask(dense, 2, 4)
    return torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device)), mask


def double_prune_mask_2to4(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M_t`` (bool ``(out, in)``) for 2:4: :func:`slope.masks.double_prune_mask` ``(weight, mask, 2, 4)``
    (``mask`` bool, or its packed bits)."""
    from slope.masks import double_prune_mask

    _check_2d("weight", weight)
    return double_prune_mask(weight, _bool_mask("mask", mask, weight.shape, weight.device), 2, 4)


def prune_compress_2to4(dense: torch.Tensor, layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_2to4` then :func:`compress_2to4` of ``dense (rows, cols)``: ``(values, meta)``."""
    pruned, mask = prune_2to4(dense)
    return compress_2to4(pruned, mask, layout)


def _kept_pairs_2to4(mask: torch.Tensor, name: str, exactly_two: bool) -> torch.Tensor:
    """``int64 (rows, cols/4, 2)``: the two stored positions of every group of 4 of bool ``mask
    (rows, cols)``, ascending. Groups keeping fewer than two (allowed unless ``exactly_two``) get
    :func:`compress_2to4`'s filler positions; more than two is an error."""
    pattern = _group_patterns(mask)
    counts = _KEPT_COUNT.to(mask.device)[pattern]
    if not bool((counts == 2).all() if exactly_two else (counts <= 2).all()):
        raise ValueError(f"{name} must keep {'exactly' if exactly_two else 'at most'} 2 of every 4 entries along its last dim")
    return _PAIR_FOR_PATTERN.to(mask.device)[pattern]


def _check_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> bool:
    """Validate a mask argument: bool of ``shape``, or its packed bits (:func:`slope.masks.pack_mask`,
    ``uint8 (ceil(numel/8),)``). Returns whether it is packed."""
    numel = math.prod(shape)
    packed = mask.dtype == torch.uint8 and tuple(mask.shape) == (-(-numel // 8),)
    if not (packed or (mask.dtype == torch.bool and tuple(mask.shape) == tuple(shape))) or mask.device != device:
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(shape)} (or its packed bits, uint8 "
            f"({-(-numel // 8)},)) on {device}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
        )
    return packed


def _bool_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A mask argument (see :func:`_check_mask`) as bool of ``shape``."""
    from slope.masks import unpack_mask

    return unpack_mask(mask, shape) if _check_mask(name, mask, shape, device) else mask


def stored_mask_2to4(mask: torch.Tensor) -> torch.Tensor:
    """The positions a compressed operand of bool ``mask (rows, cols)`` (at most 2 of every 4
    along ``cols``) stores: ``mask`` plus, in groups keeping fewer than two, :func:`compress_2to4`'s
    filler positions (which then hold zeros). Exactly 2 of every 4; ``⊇ mask``."""
    _check_2d("mask", mask)
    rows, cols = mask.shape
    if mask.dtype != torch.bool or cols % 4:
        raise ValueError(f"mask must be bool with cols divisible by 4, got {mask.dtype} {tuple(mask.shape)}")
    stored = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=mask.device)
    stored.scatter_(-1, _kept_pairs_2to4(mask, "mask", exactly_two=False), True)
    return stored.reshape(rows, cols)


def gather_kept_2to4(
    full: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, accumulate: bool = True,
) -> torch.Tensor:
    """The kept entries of ``full (rows, cols)`` under bool ``mask`` (exactly 2 of every 4 along
    ``cols``; or its packed bits, :func:`slope.masks.pack_mask`), as ``(rows, cols/2)`` in row
    order, ascending column inside each group — the layout of a SLoPe layer's ``values``. Used
    for the weight gradient ``(dyᵀ x) ⊙ M``.

    Without ``out`` the result is a new tensor of ``dtype`` (default ``full``'s; e.g. fp32 for a
    bf16 ``full``: the first micro-batch's gradient, written, never added to zeros); with ``out
    (rows, cols/2)`` (any float dtype) the kept entries are *added* to it in place (the sum in
    ``out``'s dtype; ``accumulate=False``: they overwrite it) and ``out`` is returned.
    """
    _check_2d("full", full)
    rows, cols = full.shape
    if cols % 4:
        raise ValueError(f"2:4 gathering needs cols divisible by 4, got shape {(rows, cols)}")
    mask = _bool_mask("mask", mask, full.shape, full.device)
    pairs = _kept_pairs_2to4(mask, "mask", exactly_two=True)
    kept = full.reshape(rows, cols // 4, 4).gather(-1, pairs).reshape(rows, cols // 2)
    if out is None:
        return kept if dtype is None else kept.to(dtype)
    if out.shape != (rows, cols // 2) or out.device != full.device or not out.is_floating_point():
        raise ValueError(
            f"out must be a float tensor of shape {(rows, cols // 2)} on {full.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out.add_(kept.to(out.dtype)) if accumulate else out.copy_(kept)


def scatter_kept_2to4(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`gather_kept_2to4`: the dense ``(rows, cols)`` tensor (in ``dtype``, default
    ``values``' dtype) holding ``values (rows, cols/2)`` where bool ``mask`` (exactly 2 of every 4
    along cols; or its packed bits) keeps entries and zeros elsewhere — ``W ⊙ M`` from a SLoPe
    layer's values."""
    _check_2d("values", values)
    rows, cols = values.shape[0], 2 * values.shape[1]
    if cols % 4:
        raise ValueError(f"values {tuple(values.shape)} must come from a (rows, cols) with cols divisible by 4")
    mask = _bool_mask("mask", mask, (rows, cols), values.device)
    dtype = values.dtype if dtype is None else dtype
    full = torch.zeros(rows, cols // 4, 4, dtype=dtype, device=values.device)
    full.scatter_(-1, _kept_pairs_2to4(mask, "mask", exactly_two=True), values.to(dtype).reshape(rows, cols // 4, 2))
    return full.reshape(rows, cols)


def transpose_kept_2to4(
    values: torch.Tensor, mask: torch.Tensor, mask_t: torch.Tensor, dtype: torch.dtype | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """Stored values of the double-pruned transpose ``(W ⊙ M ⊙ M_t)ᵀ``, straight from ``W``'s kept values.

    ``values (rows, cols/2)``: the entries of ``W (rows, cols)`` that bool ``mask`` keeps (exactly 2
    of every 4 along ``cols``), in row order, ascending column inside each group (a SLoPe layer's
    ``values``). ``mask_t`` (bool ``(rows, cols)``, ``⊆ mask``) keeps at most 2 of every 4 along
    ``rows``. Returns ``(cols, rows/2)`` in ``dtype`` (default ``values``' dtype): row ``j`` holds,
    for each group of 4 rows, ``(W ⊙ M ⊙ M_t)[i, j]`` at the two ``i`` of
    ``stored_mask_2to4(mask_tᵀ)`` (ascending; filler positions hold 0) — the values of the backward
    operand, whose metadata depends on ``M_t`` alone. With ``dense``: the whole
    ``(W ⊙ M ⊙ M_t)ᵀ (cols, rows)``, contiguous (for backends that take dense operands). Either
    mask may also be given as its packed bits (:func:`slope.masks.pack_mask`).
    """
    _check_2d("values", values)
    rows, half = values.shape
    cols = 2 * half
    if rows % 4 or cols % 4:
        raise ValueError(f"values {tuple(values.shape)} must come from a (rows, cols) with rows and cols divisible by 4")
    mask = _bool_mask("mask", mask, (rows, cols), values.device)
    mask_t = _bool_mask("mask_t", mask_t, (rows, cols), values.device)
    dtype = values.dtype if dtype is None else dtype
    dense_t = (scatter_kept_2to4(values, mask, dtype) * mask_t).t()
    pairs = _kept_pairs_2to4(mask_t.t(), "mask_t (along rows)", exactly_two=False)  # checks M_t
    if dense:
        return dense_t.contiguous()
    return dense_t.reshape(cols, rows // 4, 4).gather(-1, pairs).reshape(cols, rows // 2)


def addmm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place ``c += alpha * (a @ b) (+ bias)`` for ``a (M, K)``, ``b (K, N)``, ``c (M, N)`` and an
    optional ``bias (N,)`` added to every row; returns ``c``."""
    _check_addmm(a, b, c, bias)
    if bias is None:
        return c.addmm_(a, b, alpha=alpha)
    return c.copy_(torch.addmm(c.float() + bias.float(), a.float(), b.float(), alpha=alpha))


def lowrank_concat(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(M, K + 2R)``: ``x (M, K)`` followed by ``u = x @ aᵀ`` (``a (R, K)``) interleaved with zeros
    (``u[:, i]`` at column ``K + 2i``, 0 at ``K + 2i + 1``): the input of a merged layer's
    extended-reduction GEMM (:mod:`slope.inference.fold`)."""
    _check_lowrank_concat(x, a)
    u = torch.nn.functional.linear(x, a)
    return torch.cat([x, torch.stack([u, torch.zeros_like(u)], dim=-1).reshape(x.shape[0], -1)], dim=1)


def merged_decode(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + (x aᵀ) bᵀ (+ bias)`` for the 2:4 ``W`` of ``(values, meta)`` (:func:`compress_2to4`'s),
    ``x (M, K)``, ``a (R, K)``, ``b (N, R)``; ``x aᵀ`` is rounded to ``x``'s dtype before ``bᵀ``."""
    u = torch.nn.functional.linear(x, a)
    y = torch.nn.functional.linear(x, decompress_2to4(values.contiguous(), meta), bias)
    return torch.addmm(y, u, b.t())


def _check_lowrank_concat(x: torch.Tensor, a: torch.Tensor) -> None:
    if x.dim() != 2 or a.dim() != 2 or x.shape[1] != a.shape[1]:
        raise ValueError(f"lowrank_concat needs x (M, K) and a (R, K); got {tuple(x.shape)} and {tuple(a.shape)}")
    if x.dtype != a.dtype or x.device != a.device:
        raise ValueError(f"lowrank_concat: x ({x.dtype}, {x.device}) and a ({a.dtype}, {a.device}) must share dtype and device")


def _check_addmm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> None:
    if a.dim() != 2 or b.dim() != 2 or c.dim() != 2 or a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"addmm needs a (M, K), b (K, N), c (M, N); got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)}"
        )
    if bias is not None and (bias.shape != (c.shape[1],) or bias.device != c.device):
        raise ValueError(f"addmm: bias must be ({c.shape[1]},) on {c.device}, got {tuple(bias.shape)} on {bias.device}")


def matvec_add(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """In place ``matrix[..., j] += vector[j]`` (any strides); returns ``matrix``."""
    if vector.dim() != 1 or matrix.shape[-1] != vector.shape[0]:
        raise ValueError(
            f"matvec_add needs vector (N,) matching matrix (..., N); got {tuple(matrix.shape)} and {tuple(vector.shape)}"
        )
    return matrix.add_(vector)


def _check_adamw(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    if not (param.shape == grad.shape == exp_avg.shape == exp_avg_sq.shape):
        raise ValueError(
            f"adamw_step_: param, grad and moments must have one shape, got {tuple(param.shape)}, "
            f"{tuple(grad.shape)}, {tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)}"
        )
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError(f"adamw_step_: moments must be float32, got {exp_avg.dtype} and {exp_avg_sq.dtype}")


def adamw_step_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """One AdamW step (decoupled weight decay), in place: ``param`` (any float dtype) is updated
    in fp32 arithmetic and rounded back; ``exp_avg`` / ``exp_avg_sq`` are fp32; ``grad`` any float
    dtype; ``step`` counts this step (1 for the first). Returns ``param``."""
    _check_adamw(param, grad, exp_avg, exp_avg_sq)
    g = grad.float()
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    master = param.float() if param.dtype != torch.float32 else param
    master.mul_(1 - lr * weight_decay)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bias1)
    if master is not param:
        param.copy_(master)
    return param


def adamw_step_operands_(
    values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    mask: torch.Tensor, mask_t: torch.Tensor, *, fwd: torch.Tensor | None = None, bwd: torch.Tensor | None = None,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """:func:`adamw_step_` of a SLoPe layer's kept ``values (rows, cols/2)`` that also refreshes its
    GEMM operands' values: ``fwd (rows, cols/2)`` gets the new values in its dtype, ``bwd (cols,
    rows/2)`` :func:`transpose_kept_2to4` of them under ``mask`` / ``mask_t`` (bool ``(rows, cols)``
    or packed bits); either may be None. Returns ``values``."""
    adamw_step_(values, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step)
    if fwd is not None:
        fwd.copy_(values)
    if bwd is not None:
        bwd.copy_(transpose_kept_2to4(values, mask, mask_t, bwd.dtype))
    return values
