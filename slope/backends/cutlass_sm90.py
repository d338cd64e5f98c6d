"""``cutlass-sm90``: slope's own CUTLASS 3.x 2:4 sparse GEMM for Hopper (:mod:`slope.kernels.cutlass_sm90`).

The operand ``dense (rows, cols)`` (2:4 along ``cols``) is the GEMM's sparse **A** operand:
``matmul`` computes ``D = A (rows × cols) · xᵀ`` with ``x (tokens, cols)`` read K-contiguous as
B and D written M-contiguous, which *is* ``x @ denseᵀ`` as a row-major ``(tokens, rows)`` tensor —
no transposes or copies of activations or outputs.

- Storage: CUTLASS's sm90 compressed values + metadata, made on the GPU by the extension (not
  PyTorch's sm80 layout, so not interchangeable with the ``reference``/``cutlass`` operands).
- Alignment: the kernel needs ``cols % 16 == 0`` and ``rows % 8 == 0``. Other shapes are
  zero-padded (padding is pruned-away zeros, still 2:4): extra operand rows are sliced off the
  output; extra columns cost a padded copy of ``x`` per call.
- :meth:`CutlassSm90Backend.linear` also exposes the fused epilogue:
  ``alpha · x @ denseᵀ + bias + beta · c`` in one kernel (bias add, merged-LoRA add).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slope.kernels import cutlass_sm90

from . import register_backend
from .base import SparseBackend

#: the kernel's alignment: (row multiple, col multiple) of the sparse operand.
ROW_MULTIPLE, COL_MULTIPLE = 8, 16
#: identity rows per GEMM when :meth:`CutlassSm90Backend.operand_mask` reads a pattern back.
MASK_SLICE = 2048


@dataclass
class Sm90Operand:
    """A compressed operand of logical shape ``rows × cols``, stored padded to ``padded_shape``."""

    values: torch.Tensor  # (padded_rows, padded_cols / 2), fp16/bf16
    meta: torch.Tensor  # uint8, CUTLASS sm90 metadata layout
    rows: int
    cols: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1] * 2


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@register_backend
class CutlassSm90Backend(SparseBackend):
    """2:4 sparse GEMM with CUTLASS 3.x sparse WGMMA kernels on sm_90a (H100/H200), fp16/bf16."""

    name = "cutlass-sm90"
    dtypes = (torch.float16, torch.bfloat16)

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        device = torch.device(device)
        if device.type != "cuda":
            return f"backend {cls.name!r} needs a CUDA device (Hopper, sm_90a), got {device}"
        return cutlass_sm90.unavailable_reason(device)

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> Sm90Operand:
        """Compress ``dense (rows, cols)`` (already ``⊙ mask``, 2:4 along ``cols``; fp16/bf16, CUDA)."""
        if dense.dim() != 2:
            raise ValueError(f"{self.name}: the operand must be 2-D (rows, cols), got shape {tuple(dense.shape)}")
        if dense.dtype not in self.dtypes:
            raise ValueError(f"{self.name}: operand dtype {dense.dtype} unsupported; use float16 or bfloat16")
        rows, cols = dense.shape
        pad_rows, pad_cols = _round_up(rows, ROW_MULTIPLE) - rows, _round_up(cols, COL_MULTIPLE) - cols
        if pad_rows or pad_cols:
            dense = F.pad(dense, (0, pad_cols, 0, pad_rows))
        # The layer hands over masked operands (2:4 by construction): skip the checking sync.
        values, meta = cutlass_sm90.compress(dense.contiguous(), check=False)
        return Sm90Operand(values, meta, rows, cols)

    def operand_structure(self, mask: torch.Tensor, dtype: torch.dtype) -> Sm90Operand | None:
        """The sm90 metadata of ``mask`` (compressing ``mask`` as ones), or None when the shape needs
        padding. Relies on the sm90 compressor storing a group's two kept entries in ascending
        column order, rows in order (checked on the GPU by
        ``tests/gpu/test_cutlass_sm90.py::test_compressed_values_are_the_kept_entries_in_row_order``)."""
        rows, cols = mask.shape
        if rows % ROW_MULTIPLE or cols % COL_MULTIPLE or dtype not in self.dtypes:
            return None
        _, meta = cutlass_sm90.compress(mask.to(dtype).contiguous(), check=False)
        return Sm90Operand(values=mask.new_empty(0, dtype=dtype), meta=meta, rows=rows, cols=cols)

    def operand_from_values(self, values: torch.Tensor, structure: Sm90Operand) -> Sm90Operand:
        if values.shape != (structure.rows, structure.cols // 2):
            raise ValueError(
                f"{self.name}: values must have shape {(structure.rows, structure.cols // 2)}, got {tuple(values.shape)}"
            )
        return Sm90Operand(_aligned(values.contiguous()), structure.meta, structure.rows, structure.cols)

    def operand_values(self, operand: Sm90Operand) -> torch.Tensor:
        return operand.values

    @torch.no_grad()
    def operand_mask(self, operand: Sm90Operand) -> torch.Tensor:
        """Read from the sm90 metadata by the GEMM itself: with every kept value 1, ``I · onesᵀ``
        is the pattern, transposed (each output entry is one product 1·1 or none: exact). The
        identity goes through in slices of :data:`MASK_SLICE` rows."""
        padded_rows, padded_cols = operand.padded_shape
        ones = torch.ones_like(operand.values)
        pattern = torch.empty(operand.cols, operand.rows, dtype=torch.bool, device=ones.device)
        for start in range(0, operand.cols, MASK_SLICE):
            stop = min(start + MASK_SLICE, operand.cols)
            eye = torch.zeros(stop - start, padded_cols, dtype=ones.dtype, device=ones.device)
            eye[:, start:stop].fill_diagonal_(1)
            pattern[start:stop] = cutlass_sm90.gemm(ones, operand.meta, eye)[:, : operand.rows] != 0
        return pattern.t().contiguous()

    def matmul(self, x: torch.Tensor, operand: Sm90Operand) -> torch.Tensor:
        """``x (..., cols) @ denseᵀ -> (..., rows)`` in ``x.dtype`` (= the operand's dtype)."""
        return self.linear(x, operand)

    def linear(
        self,
        x: torch.Tensor,
        operand: Sm90Operand,
        bias: torch.Tensor | None = None,
        c: torch.Tensor | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
    ) -> torch.Tensor:
        """``alpha · x @ denseᵀ + bias + beta · c`` fused in the GEMM epilogue.

        ``x (..., cols)``; ``bias (rows,)`` or None; ``c (..., rows)`` (same leading shape as
        ``x``) or None; all in the operand's dtype. Returns ``(..., rows)`` in that dtype.
        """
        if x.shape[-1] != operand.cols:
            raise ValueError(f"{self.name}: x has {x.shape[-1]} features but the operand has {operand.cols} columns")
        if x.dtype != operand.values.dtype:
            raise ValueError(
                f"{self.name}: x is {x.dtype} but the operand was built in {operand.values.dtype}; "
                "build the operand in the compute dtype"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, operand.cols)
        tokens = x2.shape[0]
        padded_rows, padded_cols = operand.padded_shape
        if tokens == 0:
            return x.new_zeros(*lead, operand.rows)
        x2 = _aligned(_pad_last(x2, padded_cols - operand.cols))
        if bias is not None:
            if bias.shape != (operand.rows,):
                raise ValueError(f"{self.name}: bias must have shape ({operand.rows},), got {tuple(bias.shape)}")
            bias = _aligned(_pad_last(bias.to(x.dtype), padded_rows - operand.rows))
        if c is not None:
            if c.shape != (*lead, operand.rows):
                raise ValueError(f"{self.name}: c must have shape {(*lead, operand.rows)}, got {tuple(c.shape)}")
            c = _aligned(_pad_last(c.to(x.dtype).reshape(tokens, operand.rows), padded_rows - operand.rows))
        y = cutlass_sm90.gemm(operand.values, operand.meta, x2, bias, c, alpha, beta)
        if padded_rows != operand.rows:
            y = y[:, : operand.rows].contiguous()
        return y.reshape(*lead, operand.rows)


def _pad_last(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` with ``extra`` zero entries appended along its last dimension (``t`` itself if 0)."""
    return F.pad(t, (0, extra)) if extra else t


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (TMA); copies only when it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
