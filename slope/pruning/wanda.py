"""Wanda (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models"): prune by weights *and* activations, no weight update.

The score of weight ``W_ij`` (output ``i``, input ``j``) is ``|W_ij| · ‖X_j‖₂``, where ``‖X_j‖₂`` is the
L2 norm of input feature ``j`` over every calibration token. Scores are compared **per output row**:
every row keeps the same number of weights (unstructured), or, for N:M, the N largest scores of
every group of M consecutive inputs of a row.
"""
from __future__ import annotations

import torch

from slope.masks import nm_mask_from_scores

__all__ = ["wanda_scores", "wanda_mask"]


def wanda_scores(weight: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X_j‖₂``: fp32 ``(out, in)`` from ``weight (out, in)`` and ``squared_norms (in,)``
    (``Σ_tokens x_j²``; any positive rescaling of it gives the same masks)."""
    return weight.detach().float().abs() * squared_norms.to(weight.device).float().sqrt()[None, :]


def wanda_mask(weight: torch.Tensor, squared_norms: torch.Tensor, sparsity: float,
               structure: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool mask (True = kept) of ``weight (out, in)``: N:M groups when ``structure=(n, m)``, else every
    row keeps its ``round((1 - sparsity) · in)`` best scores (ties: lower index)."""
    scores = wanda_scores(weight, squared_norms)
    if structure is not None:
        return nm_mask_from_scores(scores, *structure)
    in_features = scores.shape[1]
    keep = round((1.0 - sparsity) * in_features)
    # One group spanning the whole row: the per-row comparison group of the paper.
    return nm_mask_from_scores(scores, keep, in_features)
