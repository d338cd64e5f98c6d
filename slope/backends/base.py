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

    def linear(self, x: torch.Tensor, operand: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``matmul(x, operand) + bias`` (``bias (rows,)`` in ``x.dtype``, or None); backends that
        fuse the bias add into their product override it."""
        y = self.matmul(x, operand)
        return y if bias is None else y + bias

    # A SLoPe layer already stores its forward operand's kept values, ``values (rows, cols/2)``
    # (2:4 along cols, exactly two kept per group, ascending column within a group). A backend
    # whose compressed values are exactly that tensor builds the operand from it and a metadata
    # "structure" that depends only on the mask: after an optimizer step (new values, same mask)
    # the forward operand then costs a dtype cast instead of a scatter to dense + a compression.

    def operand_structure(self, mask: torch.Tensor, dtype: torch.dtype) -> Any | None:
        """What an operand of bool ``mask (rows, cols)`` (exactly 2 of every 4 kept along cols) in
        ``dtype`` needs besides its kept values — its metadata — or None when this backend cannot
        build operands from kept values (the default; callers then use :meth:`make_operand`)."""
        return None

    def operand_from_values(self, values: torch.Tensor, structure: Any) -> Any:
        """The operand whose kept entries are ``values (rows, cols/2)`` (row order, ascending column
        inside each group of 4) and whose pattern is ``structure`` (from :meth:`operand_structure`).
        It should hold ``values`` itself, not a copy (see :meth:`operand_values`)."""
        raise NotImplementedError(f"{type(self).__name__} builds operands with make_operand only")

    def operand_values(self, operand: Any) -> torch.Tensor | None:
        """The tensor holding the kept values of an operand built by :meth:`operand_from_values`, or
        None when unknown. When it is the very tensor the operand was built from, writing new values
        into it updates the operand in place (the fused optimizer step does, instead of a rebuild)."""
        return None

    def operand_mask(self, operand: Any) -> torch.Tensor | None:
        """The pattern an operand stores, as bool ``(rows, cols)`` (its logical shape, padding cut
        off), read from its metadata alone, or None when this backend cannot tell. An
        inference-only layer whose operand gives back its mask exactly keeps the mask only there
        (:class:`slope.lora.MergedSparseLinear`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tiling={self.tiling})"
