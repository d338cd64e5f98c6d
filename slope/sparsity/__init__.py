"""The shared mask core of slope's fine-tuning workflows (DESIGN §8).

- :class:`MaskedWeights` keeps the pruned entries of ordinary (dense-stored) weights exactly zero
  through training: weights, gradients and every per-entry optimizer state tensor.
- :class:`MaskPolicy` decides when and how masks change; :class:`StaticMask` never changes them.
  Gradual pruning, RigL and SFT reselection are policies too, each in its workflow's room
  (``slope.pruning``, ``slope.dynamic``, ``slope.peft``).

Masks themselves come from :mod:`slope.masks` (:func:`slope.masks.mask_from_scores`). 2:4 weights
that train on slope's SLoPe layers (:class:`slope.SparseLinear`) keep their masks in the layer;
:class:`SparseLayerMasks` shows those masks to a policy through :class:`MaskedWeights`' interface.
"""
from slope.sparsity.layers import SparseLayerMasks
from slope.sparsity.masked import MaskedWeights
from slope.sparsity.policy import MaskPolicy, StaticMask

__all__ = ["MaskedWeights", "MaskPolicy", "SparseLayerMasks", "StaticMask"]
