"""One pass after the optimizer: AdamW over a SLoPe layer's kept values that also writes both GEMM operands.

:func:`adamw_step_operands_` is :func:`slope.kernels.reference.adamw_step_operands_` in one Triton
kernel (CUDA; on CPU only under ``TRITON_INTERPRET=1``). For a layer ``W (rows, cols)`` with 2:4
mask ``M`` (along ``cols``) and double-pruned ``M_t`` (at most 2 of 4 along ``rows``) it

- steps ``values (rows, cols/2)`` (the fp32 master weights) and the fp32 moments, like
  :func:`slope.kernels.triton_kernels.adamw_step_` (the same arithmetic, :func:`_adamw_math`);
- writes the forward operand's values ``fwd (rows, cols/2)``: the new values in the compute dtype;
- writes the backward operand's values ``bwd (cols, rows/2)``: the stored values of
  ``(W ⊙ M ⊙ M_t)ᵀ``, as :func:`slope.kernels.triton_kernels.transpose_kept_2to4` would build them
  from the new values.

Why one program owns a tile of ``4·BLOCK_Q`` rows × ``4·BLOCK_G`` columns of ``W``: the backward
operand groups 4 consecutive *rows* of ``W`` (its reduction dimension is ``W``'s output
dimension), so a program that owns whole row groups — all 4 rows of each — has every input of the
transposed values it writes in registers after the update; each byte of the optimizer state is
read once and each output byte written once (the byte count is in ``docs/kernels.md``). A row
group ``4q .. 4q+3`` and a column group ``4g .. 4g+3`` of ``W`` are, in ``values``, the two
entries ``2g, 2g+1`` of rows ``4q+i``; column ``4g+p`` of ``W`` is row ``4g+p`` of ``bwd``, whose
entries ``2q, 2q+1`` this program writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _check_adamw, _check_mask
from .triton_kernels import TRITON_DTYPES, _adamw_math, _first_and_last, _mask_at, _stored_rows, adamw_coefficients

__all__ = ["adamw_step_operands_", "BLOCK_Q", "BLOCK_G"]

#: row groups (of 4 rows) and column groups (of 4 columns of ``W``) per program.
BLOCK_Q, BLOCK_G = 16, 32


@triton.jit
def _step_entry(p_ptr, g_ptr, m_ptr, v_ptr, fwd_ptr, off, valid,
                one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt, WRITE_FWD: tl.constexpr):
    """AdamW over the kept values at ``off``: stores the new value, moments and (``WRITE_FWD``) the
    forward operand's value; returns the new value as a later read of ``values`` sees it (fp32)."""
    p = tl.load(p_ptr + off, mask=valid, other=0.0)
    grad = tl.load(g_ptr + off, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=valid, other=0.0)
    v = tl.load(v_ptr + off, mask=valid, other=0.0)
    master, m, v = _adamw_math(p.to(tl.float32), grad, m, v, one_minus_beta1, beta2, one_minus_beta2, eps,
                               decay, step_size, bias2_sqrt)
    tl.store(m_ptr + off, m, mask=valid)
    tl.store(v_ptr + off, v, mask=valid)
    stored = master.to(p.dtype)
    tl.store(p_ptr + off, stored, mask=valid)
    if WRITE_FWD:  # the stored value cast, as a rebuild from values would
        tl.store(fwd_ptr + off, stored.to(fwd_ptr.dtype.element_ty), mask=valid)
    return stored.to(tl.float32)


@triton.jit
def _step_row(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, fwd_ptr, row, g, valid, groups,
              one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
              PACKED: tl.constexpr, WRITE_FWD: tl.constexpr):
    """AdamW over the kept values of ``row`` (``(BQ, 1)``) in column groups ``g`` (``(1, BG)``);
    returns the new values of each group's first and second kept entry and their positions (0..3)."""
    mbase = row * (4 * groups) + 4 * g
    b0 = _mask_at(mask_ptr, mbase, valid, PACKED)
    b1 = _mask_at(mask_ptr, mbase + 1, valid, PACKED)
    b2 = _mask_at(mask_ptr, mbase + 2, valid, PACKED)
    b3 = _mask_at(mask_ptr, mbase + 3, valid, PACKED)
    first, last = _first_and_last(b0, b1, b2, b3)
    off = row * (2 * groups) + 2 * g
    v0 = _step_entry(p_ptr, g_ptr, m_ptr, v_ptr, fwd_ptr, off, valid, one_minus_beta1, beta2, one_minus_beta2, eps,
                     decay, step_size, bias2_sqrt, WRITE_FWD)
    v1 = _step_entry(p_ptr, g_ptr, m_ptr, v_ptr, fwd_ptr, off + 1, valid, one_minus_beta1, beta2, one_minus_beta2,
                     eps, decay, step_size, bias2_sqrt, WRITE_FWD)
    return v0, v1, first, last


@triton.jit
def _entry(v0, v1, first, last, p: tl.constexpr):
    """``W[row, 4g + p]`` of a row's column groups from its two kept values (0 where ``M`` prunes)."""
    return tl.where(first == p, v0, tl.where(last == p, v1, tl.zeros_like(v0)))


@triton.jit
def _adamw_operands_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, mask_t_ptr, fwd_ptr, bwd_ptr, rows, cols,
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, PACKED_M: tl.constexpr, PACKED_T: tl.constexpr,
    WRITE_FWD: tl.constexpr, WRITE_BWD: tl.constexpr,
):
    q = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)[:, None]  # row groups
    g = (tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)[None, :]  # column groups
    groups = cols // 4
    valid = (q < rows // 4) & (g < groups)
    a0, a1, f0, l0 = _step_row(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, fwd_ptr, 4 * q, g, valid, groups,
                               one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
                               PACKED_M, WRITE_FWD)
    b0, b1, f1, l1 = _step_row(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, fwd_ptr, 4 * q + 1, g, valid, groups,
                               one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
                               PACKED_M, WRITE_FWD)
    c0, c1, f2, l2 = _step_row(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, fwd_ptr, 4 * q + 2, g, valid, groups,
                               one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
                               PACKED_M, WRITE_FWD)
    d0, d1, f3, l3 = _step_row(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, fwd_ptr, 4 * q + 3, g, valid, groups,
                               one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
                               PACKED_M, WRITE_FWD)
    if WRITE_BWD:
        for p in tl.static_range(4):
            # column j = 4g + p of W: its 4 rows 4q..4q+3, and which of them M_t keeps
            w0 = _entry(a0, a1, f0, l0, p)
            w1 = _entry(b0, b1, f1, l1, p)
            w2 = _entry(c0, c1, f2, l2, p)
            w3 = _entry(d0, d1, f3, l3, p)
            tbase = (4 * q) * cols + 4 * g + p
            t0, t1, t2, t3, pos0, pos1 = _stored_rows(mask_t_ptr, tbase, cols, valid, PACKED_T)
            s0 = tl.where(t0, w0, 0.0)
            s1 = tl.where(t1, w1, 0.0)
            s2 = tl.where(t2, w2, 0.0)
            s3 = tl.where(t3, w3, 0.0)
            v0 = tl.where(pos0 == 0, s0, tl.where(pos0 == 1, s1, tl.where(pos0 == 2, s2, s3)))
            v1 = tl.where(pos1 == 1, s1, tl.where(pos1 == 2, s2, s3))
            obase = (4 * g + p) * (rows // 2) + 2 * q
            tl.store(bwd_ptr + obase, v0.to(bwd_ptr.dtype.element_ty), mask=valid)
            tl.store(bwd_ptr + obase + 1, v1.to(bwd_ptr.dtype.element_ty), mask=valid)


def _check_operand(name: str, t: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or t.device != device or not t.is_contiguous() or t.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"adamw_step_operands_: {name} must be a contiguous fp16/bf16/fp32 tensor of shape {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def adamw_step_operands_(
    values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    mask: torch.Tensor, mask_t: torch.Tensor, *, fwd: torch.Tensor | None = None, bwd: torch.Tensor | None = None,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> torch.Tensor:
    """One AdamW step of ``values (rows, cols/2)`` (fp32 master, or fp16/bf16) with ``grad`` and the
    fp32 moments (all contiguous, that shape), writing in the same pass the new values cast to
    ``fwd.dtype`` into ``fwd (rows, cols/2)`` and the stored values of ``(W ⊙ M ⊙ M_t)ᵀ`` into
    ``bwd (cols, rows/2)`` (either may be None). ``mask`` / ``mask_t``: bool ``(rows, cols)`` or
    their packed bits; trusted as :func:`slope.kernels.triton_kernels.transpose_kept_2to4` trusts
    them. ``rows`` and ``cols`` divisible by 4. Returns ``values``."""
    _check_adamw(values, grad, exp_avg, exp_avg_sq)
    if values.dim() != 2 or values.shape[0] % 4 or values.shape[1] % 2:
        raise ValueError(f"adamw_step_operands_: values must be (rows, cols/2) with rows, cols divisible by 4, got {tuple(values.shape)}")
    rows, cols = values.shape[0], 2 * values.shape[1]
    for name, t in (("values", values), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous() or t.dtype not in TRITON_DTYPES or t.device != values.device:
            raise ValueError(f"adamw_step_operands_: {name} must be a contiguous fp16/bf16/fp32 tensor on {values.device}")
    _check_operand("fwd", fwd, (rows, cols // 2), values.device)
    _check_operand("bwd", bwd, (cols, rows // 2), values.device)
    packed_m = _check_mask("mask", mask, (rows, cols), values.device)
    packed_t = _check_mask("mask_t", mask_t, (rows, cols), values.device)
    mask = mask.contiguous() if packed_m else mask.contiguous().view(torch.uint8)
    mask_t = mask_t.contiguous() if packed_t else mask_t.contiguous().view(torch.uint8)
    if values.numel():
        grid = (triton.cdiv(rows // 4, BLOCK_Q), triton.cdiv(cols // 4, BLOCK_G))
        _adamw_operands_kernel[grid](
            values, grad, exp_avg, exp_avg_sq, mask, mask_t,
            values if fwd is None else fwd, values if bwd is None else bwd,  # unused pointers when not written
            rows, cols, *adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step),
            BLOCK_Q=BLOCK_Q, BLOCK_G=BLOCK_G, PACKED_M=packed_m, PACKED_T=packed_t,
            WRITE_FWD=fwd is not None, WRITE_BWD=bwd is not None,
        )
    return values
