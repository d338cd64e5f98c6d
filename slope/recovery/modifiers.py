"""The fine-tuning modifiers of a recipe (SparseML / llm-compressor names), one class each.

- :class:`ConstantPruningModifier` — the zeros of the targeted weights at ``start`` stay zero until
  ``end`` (weights, gradients and optimizer state); before and after, the modifier does nothing;
- :class:`OutputDistillationModifier` — add a comparison of the targets' outputs with a dense
  teacher's to the loss: ``orig_scale · task + distill_scale · mean over targets``.

Both are config dataclasses checked when built (a :class:`RecipeError` names the parameter and the
fix); the work happens in :mod:`slope.recovery.constant` and :mod:`slope.recovery.distill`.
``start`` and ``end`` are in epochs, fractions allowed, as in SparseML / llm-compressor (``start: -1``
means from the beginning, like ``0``; ``end: -1`` or none: never): a modifier acts on the optimizer
steps ``s`` with ``start <= s / steps_per_epoch < end`` (:mod:`slope.recovery.schedule`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from slope.pruning.modifiers import RecipeError

__all__ = ["COMPARISONS", "TRAINING_MODIFIERS", "ALL_PRUNABLE", "ConstantPruningModifier", "OutputDistillationModifier",
           "TrainingModifier"]

#: ``comparison`` values of :class:`OutputDistillationModifier` (see :mod:`slope.recovery.distill`).
COMPARISONS = ("square_head", "kl", "mse")

#: SparseML's ``targets`` aliases for "every prunable layer": here, every linear that holds exact zeros.
ALL_PRUNABLE = ("__ALL_PRUNABLE__", "__ALL__")


class TrainingModifier:
    """What the fine-tuning modifiers share: their recipe name and parameters."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def params(self) -> dict:
        """The recipe parameters, as a YAML-able dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _targets(self, required: bool) -> list[str] | None:
        value = self.targets
        if value is None and not required:
            return None
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise RecipeError(f"{self.name}: targets must be a module name, a 're:' regex, or a non-empty list of them; "
                              f"got {self.targets!r}")
        return list(value)

    def _start(self) -> float:
        start = self.start
        if isinstance(start, bool) or not isinstance(start, (int, float)) or (start < 0 and start != -1):
            raise RecipeError(f"{self.name}: start must be an epoch >= 0 (or -1: from the beginning), got {start!r}")
        return max(0.0, float(start))


@dataclass
class ConstantPruningModifier(TrainingModifier):
    """Keep the zeros of ``targets`` (module names, class names or ``re:`` regexes, as in one-shot
    recipes; a non-linear module selects the linears inside it) exactly zero.

    ``targets`` ``None`` (or ``__ALL_PRUNABLE__``): every linear holding exact zeros (at the start
    of the run). ``start`` (epoch): the zeros present when it starts are held from then on; before,
    the weights train dense (as in SparseML / llm-compressor, whose modifier takes its masks from
    the weights at its start). ``end`` (epoch, ``None`` / ``-1``: never): from then on the weights
    train dense again.
    """

    targets: list[str] | str | None = None
    start: float = 0
    end: float | None = None

    def __post_init__(self):
        self.targets = self._targets(required=False)
        if self.targets is not None and any(t in ALL_PRUNABLE for t in self.targets):
            if len(self.targets) > 1:
                raise RecipeError(f"{self.name}: {self.targets[0]} selects every pruned linear; do not list other targets with it")
            self.targets = None
        self.start = self._start() or 0  # 0 (an int) as before later starts were supported: same recipe.yaml
        end = self.end
        if end is not None and end != -1 and (isinstance(end, bool) or not isinstance(end, (int, float)) or end <= self.start):
            raise RecipeError(f"{self.name}: end must be an epoch after start ({self.start:g}), or -1 / null for never; "
                              f"got {end!r}")
        self.end = None if end is None or end == -1 else float(end)

    def params(self) -> dict:
        params = super().params()
        if params["end"] is None:  # recipes without an end read (and resume) as before it existed
            del params["end"]
        return params


@dataclass
class OutputDistillationModifier(TrainingModifier):
    """Distil the outputs of ``targets`` (module names or ``re:`` regexes; ``re:`` entries select every
    module they match) from a teacher into the student.

    ``comparison``: ``square_head`` (per target ``MSE(f_s, f_t) / MSE(f_t, 0)``, Kurtic et al. 2023),
    ``kl`` (``KL(softmax f_t ‖ softmax f_s)`` over the last dimension, e.g. of the logits) or ``mse``.
    Loss = ``orig_scale · task_loss + distill_scale · mean over targets``, from epoch ``start`` on
    (before it: the task loss alone).
    """

    targets: list[str] | str | None = None
    comparison: str = "square_head"
    orig_scale: float = 1.0
    distill_scale: float = 1.0
    start: float = 0

    def __post_init__(self):
        if self.targets is None:
            raise RecipeError(f"{self.name}: give targets, the modules whose outputs are compared (e.g. a block and the "
                              "head: ['model.layers.0', 'lm_head'] for Llama, ['transformer.h.0', 'lm_head'] for GPT-2)")
        self.targets = self._targets(required=True)
        if self.comparison not in COMPARISONS:
            raise RecipeError(f"{self.name}: comparison must be one of {', '.join(COMPARISONS)}, got {self.comparison!r}")
        for key in ("orig_scale", "distill_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise RecipeError(f"{self.name}: {key} must be a non-negative number, got {value!r}")
            setattr(self, key, float(value))
        self.start = self._start()


#: Fine-tuning modifier classes by recipe name.
TRAINING_MODIFIERS = {cls.__name__: cls for cls in (ConstantPruningModifier, OutputDistillationModifier)}
