"""``dense``: the masked dense operand multiplied by cuBLAS (``F.linear``), and row tiling.

``dense`` is what ``backend="auto"`` falls back to on CUDA when no sparse kernel beats a dense
GEMM for a layer's shape: the layer keeps its compressed storage (values + metadata) and the same
math; only the operand handed to the matmul is dense (``W ⊙ M``, resp. ``(W ⊙ M ⊙ M_t)ᵀ``).

:class:`RowTiledBackend` wraps another backend and splits a *tall* operand (``rows >= 2·cols``)
into near-square row blocks, one product each, concatenated along the output. Row splitting
keeps every block N:M along ``cols``, so any backend can multiply the blocks; whether it pays is
decided by timing (``tiling=True`` in :mod:`slope.backends.auto`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register_backend
from .base import SparseBackend


@register_backend
class DenseBackend(SparseBackend):
    """Operand: the masked dense ``(rows, cols)`` tensor (contiguous); ``matmul`` is ``F.linear``."""

    name = "dense"
    compressed = False
    any_nm = True
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return dense.contiguous()

    def matmul(self, x: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        return F.linear(x, operand)

    def linear(self, x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, operand, bias)


class _Tiles(list):
    """Operands of consecutive row blocks (a distinct type so an untiled operand is never confused)."""


class RowTiledBackend(SparseBackend):
    """Split tall operands (``rows >= 2·cols``) into ``≈ rows / cols`` row blocks.

    Block heights are multiples of ``align`` rows (64: every backend's row multiple) so that no
    block needs padding. Operands that are not tall are passed to ``inner`` unchanged.
    """

    def __init__(self, inner: SparseBackend, align: int = 64):
        super().__init__(tiling=True)
        self.inner, self.align = inner, align
        self.name = f"{inner.name}+rowtiles"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:  # type: ignore[override]
        return self.inner.unavailable_reason(device, dtype)

    def block_rows(self, rows: int, cols: int) -> int | None:
        """Rows per block for a ``(rows, cols)`` operand, or ``None`` when it is not split."""
        if rows < 2 * cols:
            return None
        blocks = round(rows / cols)
        height = math.ceil(rows / blocks / self.align) * self.align
        return height if height < rows else None

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor):
        height = self.block_rows(*dense.shape)
        if height is None:
            return self.inner.make_operand(dense, mask)
        return _Tiles(
            self.inner.make_operand(d.contiguous(), m.contiguous())
            for d, m in zip(dense.split(height), mask.split(height))
        )

    def matmul(self, x: torch.Tensor, operand) -> torch.Tensor:
        if isinstance(operand, _Tiles):
            return torch.cat([self.inner.matmul(x, op) for op in operand], dim=-1)
        return self.inner.matmul(x, operand)

    def __repr__(self) -> str:
        return f"RowTiledBackend({self.inner!r})"
