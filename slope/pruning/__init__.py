"""One-shot pruning of pretrained models (DESIGN §8.1; SparseML / llm-compressor names).

::

    from slope import oneshot
    oneshot(model, "recipe.yaml", dataset="embedded", tokenizer=tok, output_dir="pruned")

- :mod:`~slope.pruning.recipe`: recipes (stage → modifier group → ``ModifierName: {params}``);
- :mod:`~slope.pruning.modifiers`: ``MagnitudePruningModifier``, ``WandaPruningModifier``, ``SparseGPTModifier``;
- :mod:`~slope.pruning.sparsegpt`, :mod:`~slope.pruning.wanda`, :mod:`~slope.pruning.owl`: the algorithms;
- :mod:`~slope.pruning.calibration`: calibration windows, block-by-block replay, statistics hooks;
- :mod:`~slope.pruning.layers`: targets / ignore, the journal that undoes a failed run;
- :mod:`~slope.pruning.report`: the per-layer sparsity report; :mod:`~slope.pruning.loading`: ``--model``.

Masks come from the shared core (:func:`slope.masks.mask_from_scores`, ``nm_mask_from_scores``,
``topk_mask``, ``parse_structure``).
"""
from slope.pruning.calibration import CalibrationError, calibration_samples
from slope.pruning.modifiers import (
    MODIFIERS,
    MagnitudePruningModifier,
    RecipeError,
    SparseGPTModifier,
    WandaPruningModifier,
)
from slope.pruning.oneshot import oneshot
from slope.pruning.recipe import parse_recipe
from slope.pruning.sparsegpt import sparsegpt_prune
from slope.pruning.wanda import wanda_mask

__all__ = [
    "MODIFIERS",
    "CalibrationError",
    "MagnitudePruningModifier",
    "RecipeError",
    "SparseGPTModifier",
    "WandaPruningModifier",
    "calibration_samples",
    "oneshot",
    "parse_recipe",
    "sparsegpt_prune",
    "wanda_mask",
]
