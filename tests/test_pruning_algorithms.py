"""SparseGPT, Wanda and OWL against small, slow, obviously correct references of ours (fresh random inputs)."""
import math

import pytest
import torch
import torch.nn as nn

from slope.masks import mask_from_scores
from slope.pruning.calibration import LayerStats
from slope.pruning.owl import outlier_ratio, owl_sparsities
from slope.pruning.sparsegpt import PruningError, sparsegpt_prune
from slope.pruning.wanda import wanda_mask, wanda_scores


def _inputs(tokens, features, seed=0):
    """Correlated inputs with a few outlier features (what makes the Hessian matter)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=g) @ torch.randn(features, features, generator=g) / math.sqrt(features)
    X[:, 1] *= 8.0
    return X


def _keep_best(scores, keep):
    """Positions (flat indices into ``scores``, a list) of the ``keep`` largest; ties: lower index."""
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


# ---------------------------------------------------------------------- SparseGPT
def obs_reference(W, X, sparsity, structure, block_size, damp):
    """Optimal Brain Surgeon, one column at a time, with an explicit inverse Hessian (fp64).

    The inverse Hessian of the columns not yet processed is kept explicitly and shrunk after each
    column by Gaussian elimination, ``G ← G − G[:, c] G[c, :] / G[c, c]``; a pruned weight ``w_rc`` is
    compensated at once on its whole row, ``W[r] −= w_rc / G[c, c] · G[c, :]``. The mask of a group
    (the ``block_size`` columns for unstructured, M columns for N:M) is chosen when the sweep reaches
    it, from the current weights, by the OBS saliency ``w² / d_c`` where ``d_c`` is ``G[c, c]`` when
    column ``c`` is reached.
    """
    W, X = W.double().clone(), X.double()
    rows, cols = W.shape
    H = 2 * X.T @ X / X.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    G = torch.linalg.inv(H)
    d, Gd = [], G.clone()
    for c in range(cols):
        d.append(float(Gd[c, c]))
        Gd = Gd - torch.outer(Gd[:, c], Gd[c, :]) / Gd[c, c]
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for c in range(cols):
        if structure is None and c % block_size == 0:
            span = range(c, min(c + block_size, cols))
            flat = [(r, j) for r in range(rows) for j in span]
            scores = [float(W[r, j]) ** 2 / d[j] for r, j in flat]
            kept = _keep_best(scores, round((1 - sparsity) * len(flat)))
            for i, (r, j) in enumerate(flat):
                mask[r, j] = i in kept
        if structure is not None and c % structure[1] == 0:
            n, m = structure
            for r in range(rows):
                kept = _keep_best([float(W[r, c + j]) ** 2 / d[c + j] for j in range(m)], n)
                for j in range(m):
                    mask[r, c + j] = j in kept
        for r in range(rows):
            if not mask[r, c]:
                W[r, :] -= float(W[r, c]) / G[c, c] * G[c, :]
        G = G - torch.outer(G[:, c], G[c, :]) / G[c, c]
    return W * mask, mask


@pytest.mark.parametrize("structure,sparsity,block_size", [
    (None, 0.5, 8), (None, 0.3, 10), (None, 0.7, 24), ((2, 4), 0.5, 8), ((4, 8), 0.5, 16), ((1, 4), 0.75, 4),
])
def test_sparsegpt_matches_column_by_column_obs(structure, sparsity, block_size):
    W = torch.randn(6, 24, dtype=torch.float64)
    X = _inputs(200, 24).double()
    X[:, 5] = 0.0  # a dead input: its weights are dropped, H_55 = 1
    H = 2 * X.T @ X / X.shape[0]
    new, mask = sparsegpt_prune(W, H, sparsity, structure, block_size, 0.01)
    ref_w, ref_mask = obs_reference(W, X, sparsity, structure, block_size, 0.01)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref_w, rtol=1e-9, atol=1e-9)
    assert bool((new[~mask] == 0).all()) and bool((new[:, 5] == 0).all())
    assert torch.equal(W, W.clone())  # input untouched (new tensor returned)


def test_sparsegpt_nm_does_not_depend_on_block_size_and_fp32_is_close():
    """Lazy batching is exact: for N:M (masks chosen per group of M) any block size gives the same result."""
    W = torch.randn(16, 64)
    H = 2 * (lambda X: X.T @ X / X.shape[0])(_inputs(300, 64))
    outs = [sparsegpt_prune(W, H, 0.5, (2, 4), b)[0] for b in (4, 16, 64, 128)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)
    ref = sparsegpt_prune(W.double(), H.double(), 0.5, (2, 4), 16)[0]
    torch.testing.assert_close(outs[1].double(), ref, rtol=1e-3, atol=1e-4)
    assert outs[0].dtype == torch.float32


def _recon_error(W, new, X):
    return float(((X @ W.T - X @ new.T) ** 2).sum())


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    W = torch.randn(32, 64)
    X = _inputs(512, 64, seed=3)
    H = 2 * X.T @ X / X.shape[0]
    for structure in (None, (2, 4)):
        sgpt, _ = sparsegpt_prune(W, H, 0.5, structure, 32)
        wanda = W * wanda_mask(W, X.square().sum(0), 0.5, structure)
        mag = W * mask_from_scores(W.abs(), None if structure else 0.5, structure and f"{structure[0]}:{structure[1]}")
        assert _recon_error(W, sgpt, X) < _recon_error(W, wanda, X) < _recon_error(W, mag, X)


def test_sparsegpt_singular_hessian_is_a_clear_error():
    H = torch.zeros(8, 8)
    H[0, 1] = H[1, 0] = 5.0  # indefinite, diagonal zero -> dead inputs handled, off-diagonal breaks PD
    H[0, 0] = H[1, 1] = 1.0
    with pytest.raises(PruningError, match="dampening_frac"):
        sparsegpt_prune(torch.randn(4, 8), H, 0.5, None, 8, 0.0, layer="x")


# ---------------------------------------------------------------------- Wanda
def wanda_reference(W, X, sparsity, structure):
    """Loops: ‖X_j‖₂ over all tokens, score |W_ij|·‖X_j‖₂, best kept per row or per N:M group."""
    rows, cols = W.shape
    norms = [math.sqrt(sum(float(X[t, j]) ** 2 for t in range(X.shape[0]))) for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        scores = [abs(float(W[r, j])) * norms[j] for j in range(cols)]
        if structure is None:
            for j in _keep_best(scores, round((1 - sparsity) * cols)):
                mask[r, j] = True
        else:
            n, m = structure
            for g in range(0, cols, m):
                for j in _keep_best(scores[g:g + m], n):
                    mask[r, g + j] = True
    return mask


@pytest.mark.parametrize("structure,sparsity", [(None, 0.5), (None, 0.3), (None, 0.0), ((2, 4), 0.5), ((4, 8), 0.5)])
def test_wanda_matches_a_loop(structure, sparsity):
    W, X = torch.randn(5, 16), _inputs(40, 16)
    stats = LayerStats("l", 16, "norms", torch.device("cpu"))
    for chunk in X.reshape(4, 10, 16):  # accumulated over batches by the calibration hook
        stats.add(chunk)
    mask = wanda_mask(W, stats.squared_norms(), sparsity, structure)
    assert torch.equal(mask, wanda_reference(W, X, sparsity, structure))
    # per row: every output row prunes the same number
    assert len(set(mask.sum(1).tolist())) == 1


def test_layer_stats_match_direct_formulas():
    layer = nn.Linear(12, 3)
    X = _inputs(30, 12).reshape(3, 10, 12)
    norms = LayerStats("n", 12, "norms", torch.device("cpu"))
    hess = LayerStats("h", 12, "hessian", torch.device("cpu"))
    handle = layer.register_forward_hook(lambda mod, args, out: (norms.add(args[0]), hess.add(args[0])))
    for x in X:
        layer(x[None])
    handle.remove()
    flat = X.reshape(-1, 12).double()
    torch.testing.assert_close(norms.squared_norms().double(), flat.square().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hess.hessian().double(), 2 * flat.T @ flat / 30, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hess.squared_norms().double(), flat.square().sum(0), rtol=1e-5, atol=1e-4)
    assert torch.allclose(wanda_scores(layer.weight, norms.squared_norms()),
                          layer.weight.abs() * flat.square().sum(0).sqrt().float()[None], rtol=1e-5)


# ---------------------------------------------------------------------- OWL
def test_outlier_ratio_matches_a_loop():
    scores = [torch.rand(4, 6) ** 4, torch.rand(3, 5) ** 4 * 3]
    values = [float(v) for s in scores for v in s.flatten()]
    mean = sum(values) / len(values)
    for m in (1.0, 2.0, 3.0):
        expected = sum(v > m * mean for v in values) / len(values)
        assert outlier_ratio(scores, m) == pytest.approx(expected)


def test_owl_sparsities_follow_the_outlier_ratios():
    ratios = [0.02, 0.10, 0.05, 0.01]
    out = owl_sparsities(ratios, 0.6, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.6)
    assert max(out) - min(out) == pytest.approx(0.16)  # the spread is 2·lambda
    # more outliers -> pruned less: the order of sparsities is the reverse of the order of ratios
    assert sorted(range(4), key=lambda i: out[i]) == sorted(range(4), key=lambda i: -ratios[i])
    # linear in the ratio: s_l = s - (r_l - r_min)/(r_max - r_min)·2λ + mean correction
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 0.16 for r in ratios]
    assert out == pytest.approx([0.6 - (s - sum(scaled) / 4) for s in scaled])
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(ValueError, match="owl_lmbda"):
        owl_sparsities(ratios, 0.95, 0.2)
