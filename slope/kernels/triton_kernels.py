"""Triton kernels of ``slope.kernels`` (CUDA; on CPU they run only under ``TRITON_INTERPRET=1``).

Each function has a pure-PyTorch twin of the same name in :mod:`slope.kernels.reference` and
returns the same result (bit-identical for the pruning / compression kernels; up to fp32
accumulation order for ``addmm``). :mod:`slope.kernels` dispatches CUDA tensors here.

Interpreter notes: bf16 ``tl.dot`` is wrong in Triton's interpreter (it multiplies raw bits), so
operands are cast to fp32 before ``tl.dot`` when interpreting; the interpreter also uses one small
fixed tile config instead of autotuning.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import _check_adamw, _check_addmm, _check_mask, cutlass_layout_supported

__all__ = [
    "interpreting",
    "TRITON_DTYPES",
    "addmm",
    "matvec_add",
    "prune_2to4",
    "double_prune_mask_2to4",
    "prune_compress_2to4",
    "gather_kept_2to4",
    "scatter_kept_2to4",
    "transpose_kept_2to4",
    "adamw_step_",
]

#: dtypes the Triton kernels handle (others go to the reference).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: Read once, when the kernels below are decorated: ``triton.jit`` decides then whether they run
#: in the interpreter (and reading the environment per launch shows at decode sizes).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return _INTERPRETING


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{name}: Triton kernels support fp16/bf16/fp32, got {t.dtype}; use slope.kernels.reference")


# ---------------------------------------------------------------------------------------- addmm
def _addmm_configs() -> list[triton.Config]:
    """Tile configs for ``addmm``: Hopper-sized tiles first, then smaller ones for small/odd shapes."""
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 2),
        (32, 64, 32, 5, 2),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


@triton.jit
def _addmm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, alpha,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    CAST_F32: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-tiles share their B tiles in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    c = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c += tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptrs, (c + alpha * acc).to(c_ptr.dtype.element_ty), mask=c_mask)


# restore_value: autotuning runs the kernel several times; c must start from its input each time.
_addmm_autotuned = triton.autotune(configs=_addmm_configs(), key=["M", "N", "K"], restore_value=["c_ptr"])(
    _addmm_kernel
)


def addmm(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place ``c += alpha * (a @ b) (+ bias)`` for ``a (M, K)``, ``b (K, N)``, ``c (M, N)`` (any
    strides) and an optional ``bias (N,)`` (any stride, any float dtype) added to every row.

    ``a``, ``b`` and ``c`` share one dtype (fp16, bf16 or fp32); products accumulate in fp32 and the
    sum is rounded once to ``c.dtype``. fp32 inputs use IEEE fp32 products unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set. Returns ``c``.
    """
    _check_addmm(a, b, c, bias)
    if not (a.dtype == b.dtype == c.dtype):
        raise TypeError(f"addmm needs one dtype for a, b, c; got {a.dtype}, {b.dtype}, {c.dtype}")
    _check_dtype("addmm", c)
    if bias is not None:
        _check_dtype("addmm (bias)", bias)
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    ieee = c.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    bias_arg, bias_stride = (c, 0) if bias is None else (bias, bias.stride(0))  # c: an unused pointer
    args = (a, b, c, bias_arg, M, N, K, float(alpha), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), bias_stride)
    if interpreting():
        bm, bn, bk = 32, 32, 32
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _addmm_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4, CAST_F32=True, IEEE=ieee,
                            HAS_BIAS=bias is not None)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _addmm_autotuned[grid](*args, CAST_F32=False, IEEE=ieee, HAS_BIAS=bias is not None)
    return c


# ----------------------------------------------------------------------------------- matvec_add
@triton.jit
def _matvec_add_kernel(
    m_ptr, v_ptr, rows, N, d1, d2, s0, s1, s2, sn, sv,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    # Row r of the flattened leading dims (d0, d1, d2) -> memory offset through their strides.
    i2 = r % d2
    i1 = (r // d2) % d1
    i0 = r // (d2 * d1)
    offs = (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + n[None, :] * sn
    mask = (r[:, None] < rows) & (n[None, :] < N)
    x = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + n * sv, mask=n < N, other=0.0).to(tl.float32)
    tl.store(m_ptr + offs, (x + v[None, :]).to(m_ptr.dtype.element_ty), mask=mask)


def matvec_add(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """In place ``matrix[..., j] += vector[j]`` for any strides; returns ``matrix``.

    ``matrix (..., N)`` fp16/bf16/fp32, ``vector (N,)`` of any float dtype (added in fp32, the sum
    rounded to ``matrix.dtype``). A matrix whose elements overlap in memory (a broadcast view) is
    an error, as in PyTorch.
    """
    if vector.dim() != 1 or matrix.dim() < 1 or matrix.shape[-1] != vector.shape[0]:
        raise ValueError(
            f"matvec_add needs vector (N,) matching matrix (..., N); got {tuple(matrix.shape)} and {tuple(vector.shape)}"
        )
    _check_dtype("matvec_add", matrix)
    if any(st == 0 and sz > 1 for st, sz in zip(matrix.stride(), matrix.shape)):
        raise ValueError("matvec_add writes in place: matrix must not be a broadcast view (stride 0); clone it first")
    if matrix.dim() > 4:
        for sub in matrix.unbind(0):
            matvec_add(sub, vector)
        return matrix
    if matrix.numel() == 0:
        return matrix
    lead = list(matrix.shape[:-1])
    lead_strides = list(matrix.stride()[:-1])
    while len(lead) < 3:
        lead.insert(0, 1)
        lead_strides.insert(0, 0)
    rows = lead[0] * lead[1] * lead[2]
    N = matrix.shape[-1]
    block_r, block_n = 32, 128
    grid = (triton.cdiv(rows, block_r), triton.cdiv(N, block_n))
    _matvec_add_kernel[grid](
        matrix, vector, rows, N, lead[1], lead[2], *lead_strides, matrix.stride(-1), vector.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return matrix


# -------------------------------------------------------------------------------- 2:4 selection
@triton.jit
def _order_key(score):
    """int32 that orders fp32 ``score`` (``|w|``, or -1 for an entry already pruned) as torch.sort
    does: NaN above +inf (the bits of a non-negative float order as the float; -1's are negative)."""
    return tl.where(score != score, 0x7FC00000, score.to(tl.int32, bitcast=True))


@triton.jit
def _keep_two_of_four(s0, s1, s2, s3):
    """Which 2 of 4 fp32 scores are kept: the largest (NaN largest); ties go to the lower index
    (stable sort)."""
    a0, a1, a2, a3 = _order_key(s0), _order_key(s1), _order_key(s2), _order_key(s3)
    k0 = ((a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)) < 2
    k1 = ((a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)) < 2
    k2 = ((a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)) < 2
    k3 = ((a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)) < 2
    return k0, k1, k2, k3


@triton.jit
def _first_and_last(b0, b1, b2, b3):
    """Positions (0..3) of the first and the last of exactly two set flags."""
    first = tl.where(b0, 0, tl.where(b1, 1, 2))
    last = tl.where(b3, 3, tl.where(b2, 2, 1))
    return first, last


@triton.jit
def _prune_kernel(x_ptr, out_ptr, mask_ptr, groups, BLOCK: tl.constexpr):
    g = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = g < groups
    base = 4 * g
    x0 = tl.load(x_ptr + base, mask=valid, other=0.0)
    x1 = tl.load(x_ptr + base + 1, mask=valid, other=0.0)
    x2 = tl.load(x_ptr + base + 2, mask=valid, other=0.0)
    x3 = tl.load(x_ptr + base + 3, mask=valid, other=0.0)
    k0, k1, k2, k3 = _keep_two_of_four(
        tl.abs(x0.to(tl.float32)), tl.abs(x1.to(tl.float32)), tl.abs(x2.to(tl.float32)), tl.abs(x3.to(tl.float32))
    )
    tl.store(out_ptr + base, tl.where(k0, x0, 0.0).to(x0.dtype), mask=valid)
    tl.store(out_ptr + base + 1, tl.where(k1, x1, 0.0).to(x0.dtype), mask=valid)
    tl.store(out_ptr + base + 2, tl.where(k2, x2, 0.0).to(x0.dtype), mask=valid)
    tl.store(out_ptr + base + 3, tl.where(k3, x3, 0.0).to(x0.dtype), mask=valid)
    tl.store(mask_ptr + base, k0.to(tl.uint8), mask=valid)
    tl.store(mask_ptr + base + 1, k1.to(tl.uint8), mask=valid)
    tl.store(mask_ptr + base + 2, k2.to(tl.uint8), mask=valid)
    tl.store(mask_ptr + base + 3, k3.to(tl.uint8), mask=valid)


def prune_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude 2:4 pruning along the last dim in one pass: ``(pruned, mask)``.

    ``dense (..., cols)`` fp16/bf16/fp32 with ``cols % 4 == 0``; ``pruned`` (same shape/dtype,
    contiguous, pruned entries exactly 0) and bool ``mask`` equal
    :func:`slope.kernels.reference.prune_2to4` (largest ``|w|``, ties → lower index).
    """
    if dense.dim() < 1 or dense.shape[-1] % 4:
        raise ValueError(f"2:4 pruning needs the last dim divisible by 4, got shape {tuple(dense.shape)}")
    _check_dtype("prune_2to4", dense)
    x = dense.contiguous()
    pruned = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    groups = x.numel() // 4
    if groups:
        block = 1024
        _prune_kernel[(triton.cdiv(groups, block),)](x, pruned, mask, groups, BLOCK=block)
    return pruned, mask.view(torch.bool)


@triton.jit
def _mask_at(mask_ptr, offset, valid, PACKED: tl.constexpr):
    """Entry ``offset`` (flat, int64) of a mask held as one byte per entry (bool viewed as uint8)
    or, with ``PACKED``, as bits (:func:`slope.masks.pack_mask`: bit ``offset % 8`` of byte
    ``offset // 8``); False where not ``valid``."""
    if PACKED:
        byte = tl.load(mask_ptr + offset // 8, mask=valid, other=0).to(tl.int32)
        return ((byte >> (offset % 8).to(tl.int32)) & 1) != 0
    else:
        return tl.load(mask_ptr + offset, mask=valid, other=0) != 0


@triton.jit
def _stored_rows(mask_ptr, base, stride, valid, PACKED: tl.constexpr):
    """``M_t`` of one column's group of 4 rows (``base + i·stride``), and the group's two stored rows
    (:func:`slope.kernels.stored_mask_2to4` of ``M_tᵀ``): M_t's kept rows, completed by
    compress_2to4's fillers when M_t keeps fewer than two (those slots hold 0)."""
    t0 = _mask_at(mask_ptr, base, valid, PACKED)
    t1 = _mask_at(mask_ptr, base + stride, valid, PACKED)
    t2 = _mask_at(mask_ptr, base + 2 * stride, valid, PACKED)
    t3 = _mask_at(mask_ptr, base + 3 * stride, valid, PACKED)
    two = (t0.to(tl.int32) + t1.to(tl.int32) + t2.to(tl.int32) + t3.to(tl.int32)) == 2
    pos0, last = _first_and_last(t0, t1, t2, t3)
    pos1 = tl.where(two, last, tl.where(pos0 == 2, 3, 2))
    return t0, t1, t2, t3, pos0, pos1


def _mask_arg(name: str, mask: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, bool]:
    """A kernel's mask argument (bool of ``shape`` or its packed bits) as ``(uint8 tensor, packed)``."""
    packed = _check_mask(name, mask, shape, device)
    return (mask.contiguous() if packed else mask.contiguous().view(torch.uint8)), packed


@triton.jit
def _double_prune_kernel(
    w_ptr, m_ptr, out_ptr, row_groups, cols, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr,
):
    q = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    valid = (q[:, None] < row_groups) & (c[None, :] < cols)
    base = (4 * q)[:, None] * cols + c[None, :]
    m0 = _mask_at(m_ptr, base, valid, PACKED)
    m1 = _mask_at(m_ptr, base + cols, valid, PACKED)
    m2 = _mask_at(m_ptr, base + 2 * cols, valid, PACKED)
    m3 = _mask_at(m_ptr, base + 3 * cols, valid, PACKED)
    # Entries M already pruned score -1 so a kept entry (|w| >= 0) always beats them.
    s0 = tl.where(m0, tl.abs(tl.load(w_ptr + base, mask=valid, other=0.0).to(tl.float32)), -1.0)
    s1 = tl.where(m1, tl.abs(tl.load(w_ptr + base + cols, mask=valid, other=0.0).to(tl.float32)), -1.0)
    s2 = tl.where(m2, tl.abs(tl.load(w_ptr + base + 2 * cols, mask=valid, other=0.0).to(tl.float32)), -1.0)
    s3 = tl.where(m3, tl.abs(tl.load(w_ptr + base + 3 * cols, mask=valid, other=0.0).to(tl.float32)), -1.0)
    k0, k1, k2, k3 = _keep_two_of_four(s0, s1, s2, s3)
    tl.store(out_ptr + base, (k0 & m0).to(tl.uint8), mask=valid)
    tl.store(out_ptr + base + cols, (k1 & m1).to(tl.uint8), mask=valid)
    tl.store(out_ptr + base + 2 * cols, (k2 & m2).to(tl.uint8), mask=valid)
    tl.store(out_ptr + base + 3 * cols, (k3 & m3).to(tl.uint8), mask=valid)


def double_prune_mask_2to4(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``M_t`` for 2:4: bool ``(out, in)``, 2:4 along ``out`` among the entries ``mask`` keeps.

    ``weight (out, in)`` fp16/bf16/fp32 with ``out % 4 == 0``, ``mask`` bool of the same shape (or
    its packed bits); equals :func:`slope.masks.double_prune_mask` ``(weight, mask, 2, 4)``.
    """
    if weight.dim() != 2 or weight.shape[0] % 4:
        raise ValueError(
            f"double pruning groups 4 consecutive output rows; weight must be 2-D with out % 4 == 0, got {tuple(weight.shape)}"
        )
    m, packed = _mask_arg("mask", mask, tuple(weight.shape), weight.device)
    _check_dtype("double_prune_mask_2to4", weight)
    w = weight.contiguous()
    out = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    rows, cols = w.shape
    if w.numel():
        bq, bc = 16, 64
        grid = (triton.cdiv(rows // 4, bq), triton.cdiv(cols, bc))
        _double_prune_kernel[grid](w, m, out, rows // 4, cols, BLOCK_Q=bq, BLOCK_C=bc, PACKED=packed)
    return out.view(torch.bool)


# ----------------------------------------------------------------------- fused prune + compress
@triton.jit
def _cutlass_meta_offset(r, c, rows):
    """Flat offset of metadata element ``(r, c)`` in CUTLASS's int16 layout (see reference.py)."""
    rr = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    even_r = (rr % 2) == 0
    odd_c = (c % 2) == 1
    shift = (even_r & odd_c).to(tl.int64) - ((~even_r) & (~odd_c)).to(tl.int64)
    rr = rr + shift
    cc = c - shift
    return (cc // 2) * rows * 2 + rr * 2 + cc % 2


@triton.jit
def _prune_compress_kernel(
    x_ptr, v_ptr, meta_ptr, rows, cols, BLOCK_R: tl.constexpr, BLOCK_MC: tl.constexpr, CUTLASS: tl.constexpr,
):
    """Each (row, mc) handles 4 consecutive groups (16 columns) = one CUTLASS int16 meta element."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    mc = (tl.program_id(1) * BLOCK_MC + tl.arange(0, BLOCK_MC)).to(tl.int64)[None, :]
    groups = cols // 4
    packed = tl.zeros((BLOCK_R, BLOCK_MC), dtype=tl.int32)
    for j in tl.static_range(4):
        g = 4 * mc + j
        valid = (r < rows) & (g < groups)
        base = r * cols + 4 * g
        x0 = tl.load(x_ptr + base, mask=valid, other=0.0)
        x1 = tl.load(x_ptr + base + 1, mask=valid, other=0.0)
        x2 = tl.load(x_ptr + base + 2, mask=valid, other=0.0)
        x3 = tl.load(x_ptr + base + 3, mask=valid, other=0.0)
        k0, k1, k2, k3 = _keep_two_of_four(
            tl.abs(x0.to(tl.float32)), tl.abs(x1.to(tl.float32)), tl.abs(x2.to(tl.float32)), tl.abs(x3.to(tl.float32))
        )
        # Exactly two are kept: the first is at 0, 1 or 2 and the second at 1, 2 or 3.
        v0 = tl.where(k0, x0, tl.where(k1, x1, x2))
        v1 = tl.where(k3, x3, tl.where(k2, x2, x1))
        idx0, idx1 = _first_and_last(k0, k1, k2, k3)
        code = idx0 | (idx1 << 2)
        vbase = r * (cols // 2) + 2 * g
        tl.store(v_ptr + vbase, v0, mask=valid)
        tl.store(v_ptr + vbase + 1, v1, mask=valid)
        if CUTLASS:
            packed = packed | (code << (4 * j))
        else:
            tl.store(meta_ptr + r * groups + g, code.to(tl.uint8), mask=valid)
    if CUTLASS:
        valid = (r < rows) & (mc < groups // 4)
        signed = tl.where(packed >= 32768, packed - 65536, packed).to(tl.int16)
        tl.store(meta_ptr + _cutlass_meta_offset(r, mc, rows), signed, mask=valid)


def prune_compress_2to4(dense: torch.Tensor, layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`prune_2to4` + :func:`compress_2to4` of ``dense (rows, cols)``: ``(values, meta)``.

    fp16/bf16/fp32, ``cols % 4 == 0``. ``layout`` as in :func:`slope.kernels.reference.compress_2to4`
    (``"auto"``: CUTLASS int16 metadata for fp16/bf16 when ``rows % 32 == cols % 32 == 0``, else
    plain uint8 codes ``(rows, cols // 4)``); bit-identical to the reference.
    """
    if dense.dim() != 2 or dense.shape[1] % 4:
        raise ValueError(f"prune_compress_2to4 needs a 2-D (rows, cols) tensor with cols % 4 == 0, got {tuple(dense.shape)}")
    if layout not in ("auto", "cutlass", "plain"):
        raise ValueError(f"layout must be 'auto', 'cutlass' or 'plain', got {layout!r}")
    _check_dtype("prune_compress_2to4", dense)
    rows, cols = dense.shape
    fits = cutlass_layout_supported(rows, cols, dense.dtype)
    if layout == "cutlass" and not fits:
        raise ValueError(f"the CUTLASS layout needs fp16/bf16 with rows % 32 == 0 and cols % 32 == 0; got {dense.dtype} {(rows, cols)}")
    cutlass = fits and layout != "plain"
    x = dense.contiguous()
    values = torch.empty(rows, cols // 2, dtype=x.dtype, device=x.device)
    if cutlass:
        meta = torch.empty(rows, cols // 16, dtype=torch.int16, device=x.device)
    else:
        meta = torch.empty(rows, cols // 4, dtype=torch.uint8, device=x.device)
    if x.numel():
        br, bmc = 32, 16
        grid = (triton.cdiv(rows, br), triton.cdiv(triton.cdiv(cols // 4, 4), bmc))
        _prune_compress_kernel[grid](x, values, meta, rows, cols, BLOCK_R=br, BLOCK_MC=bmc, CUTLASS=cutlass)
    return values, meta


# -------------------------------------------------------------------- kept-value movement (2:4)
@triton.jit
def _kept_group_block(mask_ptr, rows, groups, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, PACKED: tl.constexpr):
    """This program's ``(BLOCK_R, BLOCK_G)`` block of groups of 4 along the last dim of a bool
    ``(rows, 4·groups)`` mask (bytes, or bits with ``PACKED``): row and group indices, validity,
    the groups' flat offsets and the positions of their two kept entries (exactly two kept: trusted)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    g = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)[None, :]
    valid = (r < rows) & (g < groups)
    mbase = r * (4 * groups) + 4 * g
    b0 = _mask_at(mask_ptr, mbase, valid, PACKED)
    b1 = _mask_at(mask_ptr, mbase + 1, valid, PACKED)
    b2 = _mask_at(mask_ptr, mbase + 2, valid, PACKED)
    b3 = _mask_at(mask_ptr, mbase + 3, valid, PACKED)
    first, last = _first_and_last(b0, b1, b2, b3)
    return r, g, valid, mbase, first, last


@triton.jit
def _gather_kept_kernel(
    full_ptr, mask_ptr, out_ptr, rows, groups, stride_fr, stride_fc,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, ACCUMULATE: tl.constexpr, PACKED: tl.constexpr,
):
    r, g, valid, mbase, first, last = _kept_group_block(mask_ptr, rows, groups, BLOCK_R, BLOCK_G, PACKED)
    fbase = r * stride_fr + (4 * g) * stride_fc
    v0 = tl.load(full_ptr + fbase + first * stride_fc, mask=valid, other=0.0)
    v1 = tl.load(full_ptr + fbase + last * stride_fc, mask=valid, other=0.0)
    obase = r * (2 * groups) + 2 * g
    if ACCUMULATE:
        acc0 = tl.load(out_ptr + obase, mask=valid, other=0.0)
        acc1 = tl.load(out_ptr + obase + 1, mask=valid, other=0.0)
        tl.store(out_ptr + obase, (acc0 + v0.to(acc0.dtype)).to(acc0.dtype), mask=valid)
        tl.store(out_ptr + obase + 1, (acc1 + v1.to(acc1.dtype)).to(acc1.dtype), mask=valid)
    else:
        tl.store(out_ptr + obase, v0.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out_ptr + obase + 1, v1.to(out_ptr.dtype.element_ty), mask=valid)


def gather_kept_2to4(
    full: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, accumulate: bool = True,
) -> torch.Tensor:
    """One-pass :func:`slope.kernels.reference.gather_kept_2to4`: the kept entries of ``full (rows,
    cols)`` (any strides) under ``mask`` (bool, or its packed bits) as a new ``(rows, cols/2)``
    tensor of ``dtype`` (default ``full``'s; written only, no memset), or added in place to ``out``
    (``accumulate=False``: written into it, not read).

    Unlike the reference it does not check that every group keeps exactly two (callers such as
    :class:`slope.layer.SparseLinear` validate their masks once per mask version): a group keeping
    other than two gives unspecified values for that group.
    """
    if full.dim() != 2 or full.shape[1] % 4:
        raise ValueError(f"gather_kept_2to4 needs a 2-D (rows, cols) tensor with cols % 4 == 0, got {tuple(full.shape)}")
    _check_dtype("gather_kept_2to4", full)
    rows, cols = full.shape
    mask, packed = _mask_arg("mask", mask, tuple(full.shape), full.device)
    if out is None:
        dtype = full.dtype if dtype is None else dtype
        _check_dtype("gather_kept_2to4 (dtype)", torch.empty(0, dtype=dtype))
        out = torch.empty(rows, cols // 2, dtype=dtype, device=full.device)
        accumulate = False
    else:
        if out.shape != (rows, cols // 2) or out.device != full.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous tensor of shape {(rows, cols // 2)} on {full.device}, "
                f"got {tuple(out.shape)} on {out.device}"
            )
        _check_dtype("gather_kept_2to4 (out)", out)
    if full.numel():
        br, bg = 32, 32
        grid = (triton.cdiv(rows, br), triton.cdiv(cols // 4, bg))
        _gather_kept_kernel[grid](
            full, mask, out, rows, cols // 4, full.stride(0), full.stride(1),
            BLOCK_R=br, BLOCK_G=bg, ACCUMULATE=accumulate, PACKED=packed,
        )
    return out


@triton.jit
def _scatter_kept_kernel(
    values_ptr, mask_ptr, out_ptr, rows, groups, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, PACKED: tl.constexpr,
):
    r, g, valid, mbase, first, last = _kept_group_block(mask_ptr, rows, groups, BLOCK_R, BLOCK_G, PACKED)
    vbase = r * (2 * groups) + 2 * g
    v0 = tl.load(values_ptr + vbase, mask=valid, other=0.0)
    v1 = tl.load(values_ptr + vbase + 1, mask=valid, other=0.0)
    zero = tl.zeros_like(v0)
    for p in tl.static_range(4):
        entry = tl.where(first == p, v0, tl.where(last == p, v1, zero))
        tl.store(out_ptr + mbase + p, entry.to(out_ptr.dtype.element_ty), mask=valid)


def scatter_kept_2to4(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One-pass :func:`slope.kernels.reference.scatter_kept_2to4`: dense ``(rows, cols)`` in
    ``dtype`` from ``values (rows, cols/2)`` and bool ``mask`` (or its packed bits), which it trusts
    to keep exactly 2 of every 4 along cols (as :func:`gather_kept_2to4`)."""
    if values.dim() != 2 or values.shape[1] % 2:
        raise ValueError(f"values must be 2-D (rows, cols/2) with cols % 4 == 0, got shape {tuple(values.shape)}")
    _check_dtype("scatter_kept_2to4", values)
    rows, cols = values.shape[0], 2 * values.shape[1]
    mask, packed = _mask_arg("mask", mask, (rows, cols), values.device)
    dtype = values.dtype if dtype is None else dtype
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"scatter_kept_2to4: Triton kernels support fp16/bf16/fp32, got {dtype}")
    out = torch.empty(rows, cols, dtype=dtype, device=values.device)
    if values.numel():
        br, bg = 32, 32
        grid = (triton.cdiv(rows, br), triton.cdiv(cols // 4, bg))
        _scatter_kept_kernel[grid](values.contiguous(), mask, out, rows, cols // 4, BLOCK_R=br, BLOCK_G=bg, PACKED=packed)
    return out


@triton.jit
def _stored_backward_value(values_ptr, mask_ptr, t0, t1, t2, t3, pos, q, j, valid, cols,
                           BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr, PACKED: tl.constexpr):
    """``(W ⊙ M_t)[4q + pos, j]`` read from ``values`` (0 where ``M_t`` does not keep it)."""
    kept = valid & (tl.where(pos == 0, t0, tl.where(pos == 1, t1, tl.where(pos == 2, t2, t3))))
    i = 4 * q + pos
    # (i, j) is kept by M (M_t ⊆ M); its slot among the two kept of its group of row i is the
    # number of entries M keeps in that group before j.
    group_start = j - j % 4  # first column of j's group of 4 along cols
    mrow = i * cols + group_start
    slot = tl.zeros((BLOCK_J, BLOCK_Q), dtype=tl.int64)
    for p in tl.static_range(3):
        before = kept & ((j % 4) > p)
        slot += _mask_at(mask_ptr, mrow + p, before, PACKED).to(tl.int64)
    return tl.load(values_ptr + i * (cols // 2) + group_start // 2 + slot, mask=kept, other=0.0)


@triton.jit
def _transpose_kept_kernel(
    values_ptr, mask_ptr, mask_t_ptr, out_ptr, rows, cols,
    BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr, DENSE: tl.constexpr, PACKED_M: tl.constexpr, PACKED_T: tl.constexpr,
):
    """Per column ``j`` of ``W`` and group ``q`` of 4 rows: the group's two stored values
    ``(W ⊙ M_t)[4q + pos_k, j]`` into ``out (cols, rows/2)``, or (``DENSE``) all four entries of
    ``(W ⊙ M ⊙ M_t)ᵀ`` into ``out (cols, rows)``."""
    j = (tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)[:, None]
    q = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)[None, :]
    valid = (j < cols) & (q < rows // 4)
    tbase = (4 * q) * cols + j
    t0, t1, t2, t3, pos0, pos1 = _stored_rows(mask_t_ptr, tbase, cols, valid, PACKED_T)
    v0 = _stored_backward_value(values_ptr, mask_ptr, t0, t1, t2, t3, pos0, q, j, valid, cols, BLOCK_J, BLOCK_Q, PACKED_M)
    v1 = _stored_backward_value(values_ptr, mask_ptr, t0, t1, t2, t3, pos1, q, j, valid, cols, BLOCK_J, BLOCK_Q, PACKED_M)
    if DENSE:
        dbase = j * rows + 4 * q
        for r in tl.static_range(4):
            entry = tl.where(pos0 == r, v0, tl.where(pos1 == r, v1, tl.zeros_like(v0)))
            tl.store(out_ptr + dbase + r, entry.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        obase = j * (rows // 2) + 2 * q
        tl.store(out_ptr + obase, v0.to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(out_ptr + obase + 1, v1.to(out_ptr.dtype.element_ty), mask=valid)


def transpose_kept_2to4(
    values: torch.Tensor, mask: torch.Tensor, mask_t: torch.Tensor, dtype: torch.dtype | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """One-pass :func:`slope.kernels.reference.transpose_kept_2to4`: the backward operand's kept
    values ``(cols, rows/2)`` — or with ``dense`` the whole ``(W ⊙ M ⊙ M_t)ᵀ (cols, rows)`` — in
    ``dtype`` from ``values (rows, cols/2)`` and the bool masks ``mask`` / ``mask_t (rows, cols)``
    (or their packed bits), never building ``W`` itself. Like :func:`gather_kept_2to4` it trusts the masks (``M`` exactly
    2 of 4 along cols, ``M_t`` at most 2 of 4 along rows, ``M_t ⊆ M``).
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (rows, cols/2), got shape {tuple(values.shape)}")
    _check_dtype("transpose_kept_2to4", values)
    rows, cols = values.shape[0], 2 * values.shape[1]
    if rows % 4 or cols % 4:
        raise ValueError(f"values {tuple(values.shape)} must come from a (rows, cols) with rows and cols divisible by 4")
    mask, packed_m = _mask_arg("mask", mask, (rows, cols), values.device)
    mask_t, packed_t = _mask_arg("mask_t", mask_t, (rows, cols), values.device)
    dtype = values.dtype if dtype is None else dtype
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"transpose_kept_2to4: Triton kernels support fp16/bf16/fp32, got {dtype}")
    out = torch.empty(cols, rows if dense else rows // 2, dtype=dtype, device=values.device)
    if values.numel():
        bj, bq = 64, 16
        grid = (triton.cdiv(cols, bj), triton.cdiv(rows // 4, bq))
        _transpose_kept_kernel[grid](
            values.contiguous(), mask, mask_t, out, rows, cols,
            BLOCK_J=bj, BLOCK_Q=bq, DENSE=dense, PACKED_M=packed_m, PACKED_T=packed_t,
        )
    return out


# ------------------------------------------------------------------------------------ AdamW step
@triton.jit
def _adamw_math(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt):
    """One AdamW update of fp32 ``p`` (param), ``g`` (grad), ``m`` / ``v`` (moments): the new
    ``(p, m, v)``. Shared by every AdamW kernel so that they round identically. The square root and
    the divisions are IEEE round-to-nearest (``sqrt_rn`` / ``div_rn``), as PyTorch's are: Triton's
    ``tl.sqrt`` and ``/`` compile to approximate ``sqrt.approx`` / ``div.full`` on NVIDIA GPUs."""
    # lerp, as torch.Tensor.lerp_: from weight 0.5 on it uses the form exact at weight 1 (beta1 = 0)
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (g - m), g - (g - m) * (1.0 - one_minus_beta1))
    v = v * beta2 + one_minus_beta2 * (g * g)
    master = p * decay
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    master = master - step_size * tl.math.div_rn(m, denom)
    return master, m, v


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                  bias2_sqrt, BLOCK: tl.constexpr):
    # The coefficients come from Python (double precision, rounded once to fp32) as PyTorch's do.
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = offs < n
    p = tl.load(p_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0)
    master, m, v = _adamw_math(p.to(tl.float32), g, m, v, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                               step_size, bias2_sqrt)
    tl.store(m_ptr + offs, m, mask=valid)
    tl.store(v_ptr + offs, v, mask=valid)
    tl.store(p_ptr + offs, master.to(p.dtype), mask=valid)


def adamw_step_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """:func:`slope.kernels.reference.adamw_step_` in one pass (fp32 arithmetic, ``param`` in
    fp16/bf16/fp32 rounded back once); every tensor contiguous. Returns ``param``."""
    _check_adamw(param, grad, exp_avg, exp_avg_sq)
    _check_dtype("adamw_step_", param)
    _check_dtype("adamw_step_ (grad)", grad)
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"adamw_step_: {name} must be contiguous")
    n = param.numel()
    if n:
        block = 1024
        _adamw_kernel[(triton.cdiv(n, block),)](
            param, grad, exp_avg, exp_avg_sq, n, *adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step),
            BLOCK=block,
        )
    return param


def adamw_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> tuple:
    """The scalar arguments of the AdamW kernels, computed in double precision on the host (as
    PyTorch's fused AdamW does): ``(1-β1, β2, 1-β2, eps, 1-lr·wd, lr/(1-β1^t), sqrt(1-β2^t))``."""
    return (1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step),
            (1.0 - beta2**step) ** 0.5)
