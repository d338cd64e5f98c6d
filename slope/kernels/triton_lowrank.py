"""Triton kernel of :func:`slope.kernels.lowrank_concat`: ``[x | interleave(x aᵀ, 0)]`` in one pass.

Each program takes ``BLOCK_M`` rows of ``x (M, K)``: it loads their ``(BLOCK_M, BLOCK_K)`` tiles
once, stores them into ``out[:, :K]`` and multiplies them by the matching tile of ``a (R, K)``
(fp32 accumulation); after the K loop the ``(BLOCK_M, R)`` product ``u`` is written interleaved
with zeros into ``out[:, K:K + 2R]`` (``u[:, i]`` at column ``K + 2i``, zero at ``K + 2i + 1``).
So ``x`` is read once and the low-rank input of the extended-reduction GEMM costs no extra pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import interpreting

__all__ = ["lowrank_concat"]


@triton.jit
def _lowrank_concat_kernel(
    x_ptr, a_ptr, out_ptr, M, K, R, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x_mask = (rm[:, None] < M) & (kk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
        tl.store(out_ptr + rm[:, None] * stride_om + kk[None, :], x, mask=x_mask)
        at = tl.load(a_ptr + rr[None, :] * K + kk[:, None], mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
        if CAST_F32:
            x = x.to(tl.float32)
            at = at.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, at, acc)
    # (BLOCK_M, BLOCK_R) -> (BLOCK_M, BLOCK_R, 2) with zeros second -> (BLOCK_M, 2·BLOCK_R): u[:, i] at 2i
    tail = tl.reshape(tl.join(acc, tl.zeros_like(acc)), (BLOCK_M, 2 * BLOCK_R))
    rt = tl.arange(0, 2 * BLOCK_R).to(tl.int64)
    tl.store(out_ptr + rm[:, None] * stride_om + K + rt[None, :], tail.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rt[None, :] < 2 * R))


def lowrank_concat(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(M, K + 2R)``: ``x (M, K)`` then ``x @ aᵀ`` (``a (R, K)``) interleaved with zeros; one pass.
    ``x`` rows may be strided (unit column stride); ``a`` contiguous; one dtype (fp16/bf16/fp32)."""
    M, K = x.shape
    R = a.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    a = a.contiguous()
    out = torch.empty(M, K + 2 * R, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_r = max(16, triton.next_power_of_2(R))
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    if interpreting():
        bm, bk, warps = 32, 64, 4
    else:
        bm, bk, warps = (16 if M <= 16 else 64), 64, 4
    _lowrank_concat_kernel[(triton.cdiv(M, bm),)](
        x, a, out, M, K, R, x.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, CAST_F32=interpreting(), IEEE=ieee, num_warps=warps,
    )
    return out
