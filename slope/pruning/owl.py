"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity"): non-uniform per-block sparsity from activation outliers.

For each transformer block ``l``, the *layerwise outlier distribution* ``D_l`` is the fraction of
the block's Wanda scores ``A_ij = |W_ij|·‖X_j‖₂`` (over all its pruned linears together) that exceed
``M`` times their mean (``M = owl_m``). Blocks with more outliers are pruned less: the ratios are
mapped linearly onto ``[0, 2λ]`` (``λ = owl_lmbda``; the OWL reference scripts' normalisation) and
block ``l`` gets sparsity ``S − (r_l − mean r)``, so the mean over blocks stays ``S`` and the spread is
at most ``2λ``.
"""
from __future__ import annotations

import torch

__all__ = ["outlier_ratio", "owl_sparsities"]


def outlier_ratio(scores: list[torch.Tensor], owl_m: float) -> float:
    """Fraction of the entries of ``scores`` (one tensor per linear of a block, any shapes) above
    ``owl_m`` times the mean of all of them."""
    total = sum(s.numel() for s in scores)
    threshold = owl_m * sum(float(s.detach().double().sum()) for s in scores) / total
    return sum(int((s.detach() > threshold).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], sparsity: float, owl_lmbda: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios: mean ``sparsity``, more outliers → less
    sparse, spread ``2·owl_lmbda`` (uniform when every ratio is equal). Raises ``ValueError`` when a
    block would leave ``[0, 1)``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min()) if len(ratios) else 0.0
    if spread == 0.0:
        return [float(sparsity)] * len(ratios)
    scaled = (r - r.min()) / spread * (2 * owl_lmbda)
    out = (sparsity - (scaled - scaled.mean())).tolist()
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(
            f"OWL: owl_lmbda {owl_lmbda:g} around sparsity {sparsity:g} gives block sparsities from {min(out):.3f} "
            f"to {max(out):.3f}, outside [0, 1); use a smaller owl_lmbda"
        )
    return out
