"""Recovery after pruning (DESIGN §8.2, seed 002 steps 1 and 3): constant masks and distillation.

::

    from slope import finetune
    finetune("model-2of4", "recipe.yaml", "embedded", distill_teacher="model-dense", output_dir="recovered")

- :mod:`~slope.recovery.modifiers`: ``ConstantPruningModifier``, ``OutputDistillationModifier`` (recipe
  format of :mod:`slope.pruning.recipe`, ``kind="finetune"``);
- :class:`ConstantMasks`: the zeros stay zero (2:4 on SLoPe layers, other structures under
  :class:`slope.sparsity.MaskedWeights`);
- :mod:`~slope.recovery.schedule`: recipe epochs as steps; :class:`~slope.recovery.schedule.HeldZeros`, the
  window (``start`` / ``end``) in which a ``ConstantPruningModifier`` holds zeros;
- :class:`Distiller` and the comparisons ``square_head``, ``kl_divergence``, ``mse``;
- :func:`finetune` (also ``slope finetune``) and, for ``transformers.Trainer``, :class:`RecoveryTrainer`.
"""
from slope.recovery.constant import ConstantMasks, is_2to4
from slope.recovery.distill import COMPARISON_FUNCTIONS, DistillationError, Distiller, kl_divergence, mse, square_head
from slope.recovery.modifiers import ConstantPruningModifier, OutputDistillationModifier

__all__ = [
    "COMPARISON_FUNCTIONS",
    "ConstantMasks",
    "ConstantPruningModifier",
    "DistillationError",
    "Distiller",
    "OutputDistillationModifier",
    "RecoveryTrainer",
    "finetune",
    "is_2to4",
    "kl_divergence",
    "mse",
    "square_head",
]


def __getattr__(name):
    # Imported lazily: they need transformers (heavy).
    if name == "finetune":
        from slope.recovery.finetune import finetune

        return finetune
    if name == "RecoveryTrainer":
        from slope.recovery.trainer import RecoveryTrainer

        return RecoveryTrainer
    raise AttributeError(f"module 'slope.recovery' has no attribute {name!r}")
