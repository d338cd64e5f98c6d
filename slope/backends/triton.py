"""``triton``: 2:4 sparse matmul in Triton over the compressed ``slope.kernels`` format.

The operand is exactly what :func:`slope.kernels.compress_2to4` returns (values + CUTLASS or
plain metadata); the kernel (:mod:`slope.kernels.triton_sparse`) expands it tile by tile in
registers. A portable GPU backend (any CUDA GPU Triton supports); on CPU it runs only under
``TRITON_INTERPRET=1`` (for tests).
"""
from __future__ import annotations

import os

import torch

from . import register_backend
from .base import SparseBackend
from .reference import SlopeFormatOperands


@register_backend
class TritonBackend(SlopeFormatOperands, SparseBackend):
    """Operand ``(values (rows, cols/2), meta)``; ``matmul`` runs the Triton sparse GEMM."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        try:
            import triton  # noqa: F401
        except ImportError:
            return "backend 'triton' needs the triton package (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return f"backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU, for testing), got {device}"

    def matmul(self, x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from slope.kernels.triton_sparse import sparse_linear

        values, meta = operand
        cols = 2 * values.shape[1]
        y = sparse_linear(x.reshape(-1, cols), values, meta)
        return y.reshape(*x.shape[:-1], values.shape[0])
