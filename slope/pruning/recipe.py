"""Recipes in the SparseML / llm-compressor format: stage → modifier group → ``ModifierName: {params}``.

::

    pruning_stage:                      # a stage (any name); may hold `run_type: oneshot`
      obcq_modifiers:                   # a modifier group (any name)
        SparseGPTModifier:              # a modifier class of slope.pruning.modifiers
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["re:model.layers.\\d+$"]

A recipe is a YAML file path, YAML text, or the same structure as a dict. Stages, groups and
modifiers run in the order written. Anything unknown is a :class:`RecipeError` naming it.

Two kinds of recipe share the format: ``oneshot`` recipes (the pruning modifiers of
:mod:`slope.pruning.modifiers`; stages may say ``run_type: oneshot``) and ``finetune`` recipes
(``ConstantPruningModifier`` / ``OutputDistillationModifier`` of :mod:`slope.recovery.modifiers`;
``run_type: train``). A modifier of the other kind is an error that says which command runs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from slope.pruning.modifiers import MODIFIERS, PruningModifier, RecipeError

__all__ = ["RecipeEntry", "parse_recipe", "recipe_yaml"]

#: Modifiers slope does not run, with why.
_ELSEWHERE = {
    "QuantizationModifier": "quantization, which slope does not support",
    "GPTQModifier": "quantization, which slope does not support",
    "SmoothQuantModifier": "quantization, which slope does not support",
}


@dataclass(frozen=True)
class RecipeEntry:
    """One modifier of a recipe and where it was written (``stage`` / ``group``)."""

    stage: str
    group: str
    modifier: PruningModifier  # or a slope.recovery.modifiers.TrainingModifier in a finetune recipe

    @property
    def where(self) -> str:
        return f"{self.stage}.{self.group}.{self.modifier.name}"


def _load(recipe) -> dict:
    if isinstance(recipe, dict):
        return recipe
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe and recipe.strip().endswith((".yaml", ".yml"))):
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} not found; pass a YAML file, YAML text or a dict")
        text = path.read_text(encoding="utf-8")
    elif isinstance(recipe, str):
        text = recipe
    else:
        raise RecipeError(f"a recipe is a YAML file path, YAML text or a dict, got {type(recipe).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"the recipe is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of stages (e.g. `pruning_stage:`) to modifier groups; got "
                          f"{type(data).__name__} (a file path must end in .yaml or .yml)")
    return data


#: Per recipe kind: the ``run_type`` its stages may declare, and the command that runs the other kind.
_KINDS = {"oneshot": ("oneshot", "slope oneshot (slope.oneshot)"), "finetune": ("train", "slope finetune (slope.finetune)")}


def _registry(kind: str) -> dict:
    if kind == "oneshot":
        return MODIFIERS
    from slope.recovery.modifiers import TRAINING_MODIFIERS

    return TRAINING_MODIFIERS


def _modifier(name: str, params, where: str, kind: str):
    registry = _registry(kind)
    if name not in registry:
        other = "finetune" if kind == "oneshot" else "oneshot"
        if name in _registry(other):
            what = "a fine-tuning modifier" if other == "finetune" else "a one-shot pruning modifier"
            raise RecipeError(f"{where}: {name} is {what}, not a {kind} one; run it with {_KINDS[other][1]} "
                              f"({kind} recipes use {', '.join(registry)})")
        reason = _ELSEWHERE.get(name, "not a known modifier")
        raise RecipeError(f"{where}: {name} is {reason}; {kind} recipes use {', '.join(registry)}")
    cls = registry[name]
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: the parameters of {name} must be a mapping, got {type(params).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown parameter(s) {', '.join(map(str, unknown))} of {name}; known: {', '.join(known)}")
    try:
        return cls(**params)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def parse_recipe(recipe, kind: str = "oneshot") -> list[RecipeEntry]:
    """The modifiers of ``recipe`` (a YAML path, YAML text or dict), in the order they run.

    ``kind``: ``"oneshot"`` (pruning modifiers) or ``"finetune"`` (fine-tuning modifiers)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    run_type = _KINDS[kind][0]
    entries = []
    for stage, groups in _load(recipe).items():
        if not isinstance(groups, dict):
            raise RecipeError(f"stage {stage!r} must map modifier groups (e.g. `obcq_modifiers:`) to modifiers, "
                              f"got {type(groups).__name__}")
        for group, modifiers in groups.items():
            if group == "run_type":
                if modifiers != run_type:
                    raise RecipeError(f"{stage}: run_type {modifiers!r} is not supported in a {kind} recipe; "
                                      f"{_KINDS[kind][1]} runs '{run_type}' stages")
                continue
            if not isinstance(modifiers, dict) or not modifiers:
                raise RecipeError(f"{stage}.{group} must map modifier names (e.g. SparseGPTModifier) to their parameters")
            for name, params in modifiers.items():
                entries.append(RecipeEntry(str(stage), str(group), _modifier(str(name), params, f"{stage}.{group}", kind)))
    if not entries:
        example = ("pruning_stage: {pruning_modifiers: {SparseGPTModifier: {sparsity: 0.5}}}" if kind == "oneshot"
                   else "recovery_stage: {pruning_modifiers: {ConstantPruningModifier: {start: 0}}}")
        raise RecipeError(f"the recipe holds no modifiers; add e.g. `{example}`")
    return entries


def recipe_yaml(entries: list[RecipeEntry]) -> str:
    """The recipe as YAML text (written next to the pruned model)."""
    data: dict = {}
    for e in entries:
        data.setdefault(e.stage, {}).setdefault(e.group, {})[e.modifier.name] = e.modifier.params()
    return yaml.safe_dump(data, sort_keys=False)
