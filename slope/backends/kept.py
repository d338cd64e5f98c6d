"""A 2:4 layer's backend operands built from its kept values: the one place that knows how.

A SLoPe layer stores ``values (out, in/2)``, the entries of ``W`` its mask ``M`` keeps (2 of every
4 along ``in``). Its forward operand is ``W ⊙ M`` (``(out, in)``, 2:4 along ``in``), its backward
one ``(W ⊙ M ⊙ M_t)ᵀ`` (``(in, out)``, at most 2 of 4 along ``out``). :class:`slope.layer.SparseLinear`
and the ``auto`` chooser's timing of an operand's rebuild (:mod:`slope.backends.auto`) both use
:func:`operand_pattern` and :func:`operand_from_kept`, so the timed rebuild is the layer's.
"""
from __future__ import annotations

from typing import Any

import torch

from slope import kernels
from slope.masks import unpack_mask

from .base import SparseBackend


def operand_pattern(which: str, kept_mask: torch.Tensor) -> torch.Tensor:
    """The bool pattern the ``which`` ("forward" / "backward") operand stores, for
    :meth:`SparseBackend.operand_structure`: ``M`` itself forward; backward, ``M_tᵀ`` completed to
    exactly 2 of every 4 (:func:`slope.kernels.stored_mask_2to4`). ``kept_mask``: bool ``(out, in)``,
    ``M`` forward, ``M_t`` backward."""
    if which == "forward":
        return kept_mask
    return kernels.stored_mask_2to4(kept_mask.t().contiguous())


def operand_from_kept(
    backend: SparseBackend, which: str, values: torch.Tensor, mask: torch.Tensor, mask_t: torch.Tensor | None,
    dtype: torch.dtype, structure: Any | None,
) -> tuple[Any, torch.Tensor | None]:
    """``(operand, kept)``: ``backend``'s ``which`` operand in ``dtype`` of the 2:4 weight whose kept
    entries are ``values (out, in/2)``.

    ``mask`` / ``mask_t``: ``M`` and ``M_t`` as bool ``(out, in)`` or their packed bits
    (:func:`slope.masks.pack_mask`; ``mask_t`` is read backward only); the kernels trust them (2 of 4 kept, ``M_t ⊆ M``), so the caller
    validates them first. ``structure``: ``backend.operand_structure`` of :func:`operand_pattern`,
    or None for a backend that builds operands with ``make_operand``.

    With a structure no dense weight is made: the forward operand holds ``values`` cast to
    ``dtype``, the backward one :func:`slope.kernels.transpose_kept_2to4` of them, and ``kept`` is
    that tensor (the operand's own values, which a fused optimizer step may refresh in place).
    Without one, the dense operand is built in one kernel pass and ``make_operand`` compresses it;
    ``kept`` is None."""
    if structure is not None:
        if which == "forward":
            kept = values.to(dtype)
        else:
            kept = kernels.transpose_kept_2to4(values, mask, mask_t, dtype)
        return backend.operand_from_values(kept, structure), kept
    shape = (values.shape[0], 2 * values.shape[1])
    if which == "forward":
        return backend.make_operand(kernels.scatter_kept_2to4(values, mask, dtype), _as_bool(mask, shape)), None
    dense_t = kernels.transpose_kept_2to4(values, mask, mask_t, dtype, dense=True)
    return backend.make_operand(dense_t, _as_bool(mask_t, shape).t().contiguous()), None


def _as_bool(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A bool ``shape`` mask from a bool one or its packed bits."""
    return mask if mask.dtype == torch.bool else unpack_mask(mask, shape)
