"""Two backends that run on every device: ``simulated`` (dense + masks) and ``reference``
(compressed 2:4 storage, pure PyTorch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slope.kernels import compress_2to4, decompress_2to4, pattern_2to4

from .base import SparseBackend


class SimulatedBackend(SparseBackend):
    """``compress=False``: the operand is the masked dense tensor; any N:M, any dtype, any device."""

    name = "simulated"
    compressed = False
    any_nm = True
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return dense

    def matmul(self, x: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        return F.linear(x, operand)

    def linear(self, x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, operand, bias)


class SlopeFormatOperands:
    """Operands in ``slope.kernels``' compressed 2:4 format ``(values, meta)``, shared by the
    backends that multiply it (``reference``, ``triton``)."""

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compress_2to4(dense, mask)

    def operand_structure(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The metadata of ``mask`` (its layout, CUTLASS or plain, follows ``dtype`` and the shape)."""
        return compress_2to4(mask.to(dtype), mask)[1]

    def operand_from_values(self, values: torch.Tensor, structure: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return values, structure

    def operand_values(self, operand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return operand[0]

    def operand_mask(self, operand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        values, meta = operand
        return pattern_2to4(meta, values.shape[0], 2 * values.shape[1])


class ReferenceBackend(SlopeFormatOperands, SparseBackend):
    """Compressed 2:4 storage (``slope.kernels`` format) with a decompress-then-matmul product.

    Memory-honest (only values + metadata are kept between steps) and exact; not fast: it exists
    so that compressed training runs anywhere and as the oracle of the GPU backends.
    """

    name = "reference"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def matmul(self, x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.linear(x, operand)

    def linear(self, x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
        values, meta = operand
        return F.linear(x, decompress_2to4(values, meta), bias)
