"""Triton 2:4 sparse GEMM over the compressed format of :mod:`slope.kernels.reference`.

``sparse_linear(x (M, K), values (N, K/2), meta) -> x @ Wᵀ (M, N)`` where ``W (N, K)`` is the
2:4 matrix that ``(values, meta)`` encode. The kernel reads the compressed values and metadata
(CUTLASS int16 layout or plain uint8 codes) and expands each ``(BLOCK_K, BLOCK_N)`` tile of ``Wᵀ``
in registers before ``tl.dot``; it never materialises ``W``. Correctness first: it moves half the
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
    half = K // 2
    groups = K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        # Tile of Wᵀ: element (k, n) = W[n, k]; group g = k // 4, position p = k % 4.
        valid = (kk[:, None] < K) & (rn[None, :] < N)
        g = kk[:, None] // 4
        p = (kk[:, None] % 4).to(tl.int32)
        n = rn[None, :]
        if CUTLASS:
            word = tl.load(meta_ptr + _cutlass_meta_offset(n, g // 4, N), mask=valid, other=0).to(tl.int32)
            code = (word >> (4 * (g % 4)).to(tl.int32)) & 0xF
        else:
            code = tl.load(meta_ptr + n * groups + g, mask=valid, other=0).to(tl.int32)
        v0 = tl.load(v_ptr + n * half + 2 * g, mask=valid, other=0.0)
        v1 = tl.load(v_ptr + n * half + 2 * g + 1, mask=valid, other=0.0)
        w = tl.where(p == (code & 3), v0, tl.where(p == ((code >> 2) & 3), v1, 0.0)).to(v0.dtype)
        if CAST_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    o_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


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
