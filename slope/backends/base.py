"""The interface every sparse-matmul backend implements.

A backend turns a masked dense operand ``(rows, cols)`` — N:M sparse along ``cols`` — into an
*operand* in its own storage, and multiplies activations by it:
``matmul(x (..., cols), operand) -> x @ denseᵀ (..., rows)``.

A SLoPe layer holds two operands per backend: the forward one (``W ⊙ M``, sparse along ``in``)
and the backward one (``(W ⊙ M ⊙ M_t)ᵀ``, sparse along ``out``). Operands are rebuilt only when
the layer's weights or masks change (after an optimizer step), never per forward.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch


class SparseBackend:
    """Base class: subclasses set the class attributes and implement the two methods."""

    #: the name users pass as ``prune_model(backend=...)``.
    name: ClassVar[str] = ""
    #: True when the operand is stored compressed (only kept values + metadata).
    compressed: ClassVar[bool] = True
    #: True when any N:M works; False means 2:4 only.
    any_nm: ClassVar[bool] = False
    #: dtypes the backend multiplies in.
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16)

    def __init__(self, tiling: bool = True):
        self.tiling = tiling

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """``None`` when the backend can run on ``device`` in ``dtype``, else why not (for errors)."""
        if dtype not in cls.dtypes:
            return f"backend {cls.name!r} supports {[str(d) for d in cls.dtypes]}, not {dtype}"
        return None

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> Any:
        """Build the operand for ``dense (rows, cols)`` (already ``⊙ mask``) and bool ``mask``."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, operand: Any) -> torch.Tensor:
        """``x (..., cols) @ denseᵀ -> (..., rows)`` in ``x.dtype``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tiling={self.tiling})"
