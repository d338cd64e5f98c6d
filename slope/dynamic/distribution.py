"""How a sparsity budget is spread over the layers (unstructured masks).

- ``"uniform"``: every layer keeps the same fraction ``1 - sparsity``.
- ``"erk"``: Erdős–Rényi(-Kernel) of RigL (Evci et al. 2020, §3 and Appendix; Mocanu et al. 2018
  for ER). Layer ``l`` of shape ``(n_out, n_in)`` keeps the fraction ``ε · (n_in + n_out) / (n_in ·
  n_out)`` (for linear layers ERK and ER coincide: there are no kernel dimensions), with one ``ε`` for
  all layers chosen so that the kept weights total ``(1 - sparsity) · Σ n_in · n_out``; a layer whose
  fraction would exceed 1 stays dense and ``ε`` is solved again over the others. Small layers keep
  more, large ones less, at the same global count.
"""
from __future__ import annotations

__all__ = ["DISTRIBUTIONS", "erk_densities", "layer_sparsities"]

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, float]:
    """Kept fraction per layer (``shapes``: ``{name: (n_out, n_in)}``) under ERK with global ``density``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"the kept fraction must be in (0, 1], got {density!r}")
    numel = {name: out * inp for name, (out, inp) in shapes.items()}
    raw = {name: (out + inp) / (out * inp) for name, (out, inp) in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[name] for name in dense)
        scaled = sum(raw[name] * numel[name] for name in shapes if name not in dense)
        eps = budget / scaled
        saturated = {name for name in shapes if name not in dense and eps * raw[name] > 1.0}
        if not saturated:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense |= saturated


def layer_sparsities(shapes: dict[str, tuple[int, int]], sparsity: float, distribution: str) -> dict[str, float]:
    """Pruned fraction per layer for a global ``sparsity`` spread by ``distribution`` (see the module)."""
    if distribution == "uniform":
        return {name: sparsity for name in shapes}
    if distribution == "erk":
        return {name: 1.0 - kept for name, kept in erk_densities(shapes, 1.0 - sparsity).items()}
    raise ValueError(f"unknown sparsity_distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
