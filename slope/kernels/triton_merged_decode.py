"""One-launch merged sparse+LoRA layer for decode-sized inputs (Triton): ``y = x Wᵀ + (x aᵀ) bᵀ + bias``.

For ``x (M, K)`` with few rows (``M <= 16``: decoding), ``W (N, K)`` 2:4 given as its kept
``values (N, K/2)`` (any row stride: a view into an operand's storage works) and the metadata of
:func:`slope.kernels.compress_2to4`, ``a (R, K)`` (the scaled ``s·A⊙M_A``) and ``b (N, R)``. Each
program owns ``BLOCK_N`` output features and every row of ``x``: in one K loop it expands its tile of
``W`` in registers (as :mod:`slope.kernels.triton_sparse`) and multiplies it by the ``x`` tile, and
multiplies the same ``x`` tile by ``a`` (``u = x aᵀ``, recomputed by every program: ``a`` is small and
stays in L2); after the loop it adds ``b u`` (``u`` rounded to the input dtype, as the unmerged layer
rounds it) and the bias, and stores ``y``. One launch per layer, no intermediate in memory: decoding
is memory-bound, and this reads ``W``'s compressed bytes once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import MERGED_DECODE_MAX_ROWS as MAX_ROWS
from .triton_kernels import interpreting
from .triton_sparse import _expanded_weight_tile

__all__ = ["merged_decode"]


def _configs() -> list[triton.Config]:
    # few rows: parallelism comes from the output features, so narrow BLOCK_N tiles keep every SM busy
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
            for n, k, s, w in ((16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 3, 4), (64, 128, 3, 4), (64, 256, 3, 8))]


@triton.jit
def _merged_decode_kernel(
    x_ptr, v_ptr, meta_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R, stride_xm, stride_v, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    CUTLASS: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    rg = tl.arange(0, BLOCK_K // 4).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    groups = K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + kk[:, None] + rm[None, :] * stride_xm, mask=(kk[:, None] < K) & (rm[None, :] < M), other=0.0)
        w = _expanded_weight_tile(v_ptr, meta_ptr, rn, k0 // 4 + rg, N, stride_v, groups,
                                  BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, CUTLASS=CUTLASS)
        a = tl.load(a_ptr + rr[:, None] * K + kk[None, :], mask=(rr[:, None] < R) & (kk[None, :] < K), other=0.0)
        if CAST_F32:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
            acc_u = tl.dot(a, xt, acc_u, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
            acc_u = tl.dot(a, xt, acc_u)
    b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    u = acc_u.to(b_ptr.dtype.element_ty)
    if CAST_F32:
        b = b.to(tl.float32)
        u = u.to(tl.float32)
    if IEEE:
        acc = tl.dot(b, u, acc, input_precision="ieee")
    else:
        acc = tl.dot(b, u, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rn[:, None] + rm[None, :] * stride_om, acc.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rm[None, :] < M))


_merged_decode_autotuned = triton.autotune(configs=_configs(), key=["N", "K", "R"])(_merged_decode_kernel)


def merged_decode(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, N)``: ``x Wᵀ + (x aᵀ) bᵀ (+ bias)`` in one launch (module docstring); ``M <= 16``; one
    dtype for all (fp16/bf16/fp32); ``values`` rows may be strided (unit column stride). fp32 uses
    IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (as :func:`slope.kernels.addmm`)."""
    M, K = x.shape
    N, R = b.shape
    if M > MAX_ROWS:
        raise ValueError(f"merged_decode handles at most {MAX_ROWS} rows (decoding), got {M}; use the GEMM path")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    x, a, b, meta = x.contiguous(), a.contiguous(), b.contiguous(), meta.contiguous()
    bias = None if bias is None else bias.contiguous()
    args = (x, values, meta, a, b, bias if bias is not None else x, out, M, N, K, R, x.stride(0), values.stride(0),
            out.stride(0))
    interpreted = interpreting()
    kw = dict(BLOCK_M=16, BLOCK_R=max(16, triton.next_power_of_2(R)), CUTLASS=meta.dtype == torch.int16,
              HAS_BIAS=bias is not None, CAST_F32=interpreted,
              IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    if interpreted:
        _merged_decode_kernel[(triton.cdiv(N, 32),)](*args, BLOCK_N=32, BLOCK_K=64, **kw)
    else:  # tuned at the first call of a shape (decoding's untimed warm-up), never while a CUDA graph captures
        _merged_decode_autotuned[lambda meta_: (triton.cdiv(N, meta_["BLOCK_N"]),)](*args, **kw)
    return out

