"""Triton 2:4 sparse GEMM over the compressed format of :mod:`slope.kernels.reference`.

``sparse_linear(x (M, K), values (N, K/2), meta) -> x @ Wᵀ (M, N)`` where ``W (N, K)`` is the
2:4 matrix that ``(values, meta)`` encode. The kernel reads the compressed values and metadata
(CUTLASS int16 layout or plain uint8 codes) once per group of 4 columns, expands each
``(BLOCK_N, BLOCK_K)`` tile of ``W`` in registers (selects, then an interleave of the four
positions) and multiplies it by the transposed activation tile (``tl.dot(W, xᵀ)``, stored
transposed); it never materialises ``W``. Correctness first: it moves half the
weight bytes of a dense GEMM but does not use sparse tensor cores. Accumulates in fp32, returns
``x.dtype``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _cutlass_meta_offset, interpreting

__all__ = ["sparse_linear"]


def _configs() -> list[triton.Config]:
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 128, 64, 3, 8),
        (128, 256, 64, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


@triton.jit
def _expanded_weight_tile(v_ptr, meta_ptr, rn, g, N, half, groups,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CUTLASS: tl.constexpr):
    """Dense ``(BLOCK_N, BLOCK_K)`` tile of ``W`` for rows ``rn`` and the groups ``g`` (BLOCK_K / 4
    consecutive groups of 4 columns): the compressed values and codes are loaded once per group
    (contiguous along K) and expanded with selects, then the four positions are interleaved."""
    valid = (rn[:, None] < N) & (g[None, :] < groups)
    pair = rn[:, None] * half + 2 * g[None, :]  # (BLOCK_N, G): the group's first kept value
    two = tl.arange(0, 2)
    vals = tl.load(v_ptr + pair[:, :, None] + two[None, None, :], mask=valid[:, :, None], other=0.0)
    v0, v1 = tl.split(vals)  # (BLOCK_N, G) each
    if CUTLASS:
        word = tl.load(meta_ptr + _cutlass_meta_offset(rn[:, None], g[None, :] // 4, N), mask=valid, other=0)
        code = (word.to(tl.int32) >> (4 * (g[None, :] % 4)).to(tl.int32)) & 0xF
    else:
        code = tl.load(meta_ptr + rn[:, None] * groups + g[None, :], mask=valid, other=0).to(tl.int32)
    i0 = code & 3
    i1 = (code >> 2) & 3
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, zero))
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, zero))
    # join(join(w0, w2), join(w1, w3)) is (BLOCK_N, G, 2, 2) holding w0, w1, w2, w3 in row-major order
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse_linear_kernel(
    x_ptr, v_ptr, meta_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CUTLASS: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    rg = tl.arange(0, BLOCK_K // 4).to(tl.int64)
    half = K // 2
    groups = K // 4
    # The product is computed transposed, accT (BLOCK_N, BLOCK_M) = W tile @ xᵀ tile, so that the
    # expanded W tile feeds tl.dot as it is built (no transpose of it; Triton 3.6's sm_90 pipeline
    # failed on the transposed form).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + kk[:, None] * stride_xk + rm[None, :] * stride_xm,
                     mask=(kk[:, None] < K) & (rm[None, :] < M), other=0.0)
        w = _expanded_weight_tile(v_ptr, meta_ptr, rn, k0 // 4 + rg, N, half, groups,
                                  BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, CUTLASS=CUTLASS)
        if CAST_F32:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    o_mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(out_ptr + rn[:, None] * stride_on + rm[None, :] * stride_om, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


_sparse_linear_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_sparse_linear_kernel)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ Wᵀ -> (M, N)`` for the 2:4 ``W (N, K)`` compressed as ``(values (N, K/2), meta)``.

    ``x`` and ``values`` share one dtype (fp16/bf16/fp32); ``meta`` is CUTLASS int16
    ``(N, K/16)`` or plain uint8 ``(N, K/4)`` as returned by ``compress_2to4``.
    """
    if x.dim() != 2 or values.dim() != 2 or x.shape[1] != 2 * values.shape[1]:
        raise ValueError(f"sparse_linear needs x (M, K) and values (N, K/2); got {tuple(x.shape)} and {tuple(values.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"sparse_linear: x dtype {x.dtype} != values dtype {values.dtype}")
    M, K = x.shape
    N = values.shape[0]
    if K % 4:
        raise ValueError(f"sparse_linear needs K % 4 == 0, got K={K}")
    if meta.dtype == torch.int16:
        if K % 32 or N % 32 or meta.shape != (N, K // 16):
            raise ValueError(f"CUTLASS metadata for W ({N}, {K}) must be int16 ({N}, {K // 16}) with N, K % 32 == 0; got {tuple(meta.shape)}")
        cutlass = True
    elif meta.dtype == torch.uint8:
        if meta.shape != (N, K // 4):
            raise ValueError(f"plain metadata for W ({N}, {K}) must be uint8 ({N}, {K // 4}); got {tuple(meta.shape)}")
        cutlass = False
    else:
        raise ValueError(f"sparse_linear supports int16 (CUTLASS) or uint8 (plain) metadata, got {meta.dtype}")
    values, meta = values.contiguous(), meta.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (x, values, meta, out, M, N, K, x.stride(0), x.stride(1), out.stride(0), out.stride(1))
    if interpreting():
        bm, bn, bk = 32, 32, 32
        _sparse_linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CUTLASS=cutlass, CAST_F32=True, IEEE=ieee
        )
    else:
        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]), triton.cdiv(N, meta_["BLOCK_N"]))

        _sparse_linear_autotuned[grid](*args, CUTLASS=cutlass, CAST_F32=False, IEEE=ieee)
    return out
