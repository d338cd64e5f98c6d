"""Custom pruning criteria: ``torch.nn.utils.prune.BasePruningMethod`` subclasses or instances.

slope sets ``method.amount`` to the sparsity it wants (the fraction of the whole weight that is
pruned) and calls ``method.compute_mask(weight, default_mask)`` with the current weight ``W ⊙ M``
(pruned entries are zero). The method decides *which* entries are kept; the schedule decides *how
many*. Both conventions for ``default_mask`` work:

- PyTorch's (``L1Unstructured``, ``RandomUnstructured``): ``default_mask`` is the current mask
  and the method zeroes entries of it;
- the seed's ``MagnitudePruning`` example: it clones ``default_mask`` and *sets* the kept entries
  to 1, which only makes sense starting from an empty mask. When the first call prunes nothing
  new although more sparsity was asked for, the method is called again with an all-zero
  ``default_mask``.

Either way an entry pruned earlier stays pruned (the result is intersected with ``M``), and a
result that keeps a different number of weights than asked (beyond 1 % and rounding) is an error.
"""
from __future__ import annotations

import copy

import torch
from torch.nn.utils.prune import BasePruningMethod

__all__ = ["resolve_pruning_method", "criterion_mask"]


def resolve_pruning_method(method) -> BasePruningMethod | None:
    """An instance of our own (a copy: ``amount`` is set on it) from a subclass, an instance or ``None``."""
    if method is None:
        return None
    if isinstance(method, type) and issubclass(method, BasePruningMethod):
        for kwargs in ({}, {"amount": 0.0}):
            try:
                return method(**kwargs)
            except TypeError:
                continue
        raise TypeError(f"pruning_method {method.__name__} cannot be built without arguments; pass an instance instead")
    if isinstance(method, BasePruningMethod):
        return copy.copy(method)
    raise TypeError(
        f"pruning_method must be a torch.nn.utils.prune.BasePruningMethod subclass or instance, got {type(method).__name__}"
    )


def _as_mask(result, shape: torch.Size, method: BasePruningMethod) -> torch.Tensor:
    name = type(method).__name__
    if not torch.is_tensor(result) or result.shape != shape:
        got = tuple(result.shape) if torch.is_tensor(result) else type(result).__name__
        raise ValueError(f"pruning_method {name}.compute_mask must return a tensor of the weight's shape {tuple(shape)}, got {got}")
    if not bool(((result == 0) | (result == 1)).all()):
        raise ValueError(f"pruning_method {name}.compute_mask must return a 0/1 mask")
    return result.bool()


@torch.no_grad()
def criterion_mask(method: BasePruningMethod, weight: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The mask ``method`` keeps at ``sparsity`` for ``weight`` (current ``W ⊙ M``), within ``mask``."""
    method.amount = float(sparsity)
    target_pruned = round(float(sparsity) * weight.numel())
    current = mask.to(weight.dtype)
    new = _as_mask(method.compute_mask(weight, default_mask=current), weight.shape, method) & mask
    if target_pruned > int((~mask).sum()) and torch.equal(new, mask):  # sets kept entries: start empty
        new = _as_mask(method.compute_mask(weight, default_mask=torch.zeros_like(current)), weight.shape, method) & mask
    kept, expected = int(new.sum()), weight.numel() - target_pruned
    if abs(kept - expected) > 1 + 0.01 * weight.numel():
        raise ValueError(
            f"pruning_method {type(method).__name__} kept {kept} of {weight.numel()} weights at sparsity {sparsity:g} "
            f"(expected about {expected}); its compute_mask must zero pruned entries of default_mask or set kept ones, "
            "keeping about (1 - amount) of the weights"
        )
    return new
