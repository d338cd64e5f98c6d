"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", Algorithm 1): prune a linear layer and update its remaining weights so that ``W X``
is reconstructed as well as possible on the calibration inputs ``X``.

For the layer-wise objective ``‖W X − Ŵ X‖²`` the Hessian is ``H = 2 X Xᵀ / n`` (``(in, in)``).
Optimal Brain Surgeon: removing weight ``w_q`` of a row is best compensated by
``δ = −(w_q / [H⁻¹]_qq) · H⁻¹_{:,q}``, at a loss increase of ``w_q² / [H⁻¹]_qq``. SparseGPT processes
the columns left to right; once column ``j`` is done it leaves the problem, and the inverse Hessian
of the remaining columns is row ``j`` onward of the upper Cholesky factor ``U`` of ``H⁻¹``
(``UᵀU = H⁻¹``): the update of column ``j`` is ``W[:, j:] −= (w_j − q_j)/U_jj · U[j, j:]``.
The same ``U`` serves every row, which is what makes the method fast.

- *Lazy batch updates*: the updates are applied within a block of ``block_size`` columns at once and
  carried to the columns right of the block by one matrix product ``E · U[block, rest]``.
- *Adaptive mask selection*: the unstructured mask of a block is chosen when the sweep reaches the
  block, from the current weights, keeping the ``1 − sparsity`` fraction of the block's entries
  with the largest ``w² / U_cc²``. For N:M, each group of M columns is chosen when the sweep
  reaches its first column: in every row the N largest ``w² / U_cc²`` are kept.
- *Dampening*: ``H += dampening_frac · mean(diag H) · I``; inputs that never fire (``H_ii = 0``)
  have their weights zeroed and ``H_ii = 1``.
"""
from __future__ import annotations

import torch

from slope.masks import nm_mask_from_scores, topk_mask

__all__ = ["PruningError", "sparsegpt_prune", "inverse_hessian_cholesky"]


class PruningError(RuntimeError):
    """A layer that cannot be pruned with the given settings (e.g. a singular Hessian); says what to change."""


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening_frac: float, layer: str = "?") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = dampening_frac · mean(diag H)``;
    ``hessian (in, in)`` float, already with dead inputs set to ``H_ii = 1``."""
    H = hessian.clone()
    H.diagonal().add_(dampening_frac * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise PruningError(
            f"SparseGPT: the Hessian of layer {layer!r} is not positive definite after dampening; raise "
            "dampening_frac (e.g. 0.1) or use more calibration samples"
        )
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise PruningError(f"SparseGPT: the inverse Hessian of layer {layer!r} is numerically singular; raise dampening_frac")
    return U


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    layer: str = "?",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight (out, in)`` with SparseGPT given ``hessian (in, in)`` (``2 X Xᵀ / n``).

    ``structure``: ``None`` (unstructured at ``sparsity``) or ``(n, m)`` (N kept in every M inputs;
    ``block_size % m == 0``). Computes in fp32 (fp64 if ``weight`` is fp64) on ``weight``'s device.
    Returns ``(new weight, mask)``: the updated weights in the compute dtype with exact zeros where
    the bool ``mask`` (True = kept) is False. ``weight`` itself is not modified.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_cholesky(H, dampening_frac, layer)
    d2 = U.diagonal().square()
    mask = torch.ones_like(W, dtype=torch.bool)
    for i in range(0, cols, block_size):
        end = min(i + block_size, cols)
        W1, U1, M1 = W[:, i:end].clone(), U[i:end, i:end], mask[:, i:end]
        E = torch.zeros_like(W1)
        if structure is None:
            M1.copy_(topk_mask(W1.square() / d2[i:end], sparsity))
        for j in range(end - i):
            if structure is not None and j % structure[1] == 0:
                m = structure[1]
                M1[:, j : j + m] = nm_mask_from_scores(W1[:, j : j + m].square() / d2[i + j : i + j + m], *structure)
            w = W1[:, j]
            err = (w - w * M1[:, j]) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E[:, j] = err
        W[:, i:end] = W1
        W[:, end:] -= E @ U[i:end, end:]
    return W * mask, mask
