"""Recipes in the SparseML / llm-compressor format: stage → modifier group → ``ModifierName: {params}``.

::

    pruning_stage:                      # a stage (any name); may hold `run_type: oneshot`
      obcq_modifiers:                   # a modifier group (any name)
        SparseGPTModifier:              # a modifier class of slope.pruning.modifiers
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["re:model.layers.\\d+$"]

A recipe is a YAML file path, YAML text, or the same structure as a dict; or, as llm-compressor's
Python recipes, a modifier object or a list of them (``[SparseGPTModifier(sparsity=0.5),
ConstantPruningModifier()]``: consecutive modifiers of one run type form a stage). Stages, groups and
modifiers run in the order written. Anything unknown is a :class:`RecipeError` naming it.

Stages are of two run types: ``oneshot`` stages hold the pruning modifiers of
:mod:`slope.pruning.modifiers` and run with ``slope oneshot``; ``train`` stages hold
``ConstantPruningModifier`` / ``OutputDistillationModifier`` (:mod:`slope.recovery.modifiers`) and
run with ``slope finetune``. A stage's run type is its ``run_type:`` or, without one, that of its
modifiers (a stage mixing both is an error). A recipe may hold several stages, as llm-compressor's
do (``sparsity_stage:`` then ``finetuning_stage:``): each command runs the stages of its run type
and leaves the others to the other command, or runs the one stage ``stage`` names; where that would
break the recipe's order (two train stages; oneshot stages with a train stage between them) it is
an error that lists the commands to run, stage by stage. ``slope apply`` (:func:`slope.stages.apply`)
runs every stage of a recipe in turn.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from slope.pruning.modifiers import MODIFIERS, PruningModifier, RecipeError

__all__ = ["RecipeEntry", "RecipeStage", "parse_recipe", "recipe_stages", "recipe_yaml", "skipped_stages", "stage_recipe"]

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


def _modifier_objects(recipe) -> list | None:
    """``recipe`` as modifier objects (one, or a non-empty list of them: llm-compressor's Python
    recipes), else ``None``."""
    from slope.recovery.modifiers import TrainingModifier

    kinds = (PruningModifier, TrainingModifier)
    if isinstance(recipe, kinds):
        return [recipe]
    if isinstance(recipe, (list, tuple)) and recipe and all(isinstance(m, kinds) for m in recipe):
        return list(recipe)
    return None


def _from_objects(modifiers: list) -> dict:
    """Modifier objects as a recipe dict: consecutive modifiers of one run type form a stage
    (``default_stage`` when all are of one, else ``oneshot_stage``, ``train_stage``, ``oneshot_stage_2``...);
    a stage's modifiers go in ``default_modifiers`` (a repeated modifier opens ``default_modifiers_2``...)."""
    runs: list[tuple[str, list]] = []
    for m in modifiers:
        run_type = _run_type_of(m.name)
        if not runs or runs[-1][0] != run_type:
            runs.append((run_type, []))
        runs[-1][1].append(m)
    data: dict = {}
    for run_type, members in runs:
        count = sum(r == run_type for r, _ in runs[:len(data) + 1])
        name = "default_stage" if len(runs) == 1 else f"{run_type}_stage" + (f"_{count}" if count > 1 else "")
        groups: list[dict] = [{}]
        for m in members:
            if m.name in groups[-1]:
                groups.append({})
            groups[-1][m.name] = m.params()
        data[name] = {"default_modifiers" + (f"_{k + 1}" if k else ""): g for k, g in enumerate(groups)}
    return data


def _load(recipe) -> dict:
    objects = _modifier_objects(recipe)
    if objects is not None:
        return _from_objects(objects)
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
        raise RecipeError(f"a recipe is a YAML file path, YAML text, a dict, or modifier objects (e.g. "
                          f"SparseGPTModifier(sparsity=0.5) or a list of them), got {type(recipe).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"the recipe is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping of stages (e.g. `pruning_stage:`) to modifier groups; got "
                          f"{type(data).__name__} (a file path must end in .yaml or .yml)")
    return data


#: Per recipe kind: the ``run_type`` of its stages, and the command that runs them.
_KINDS = {"oneshot": ("oneshot", "slope oneshot (slope.oneshot)"), "finetune": ("train", "slope finetune (slope.finetune)")}
#: Per stage ``run_type``: the recipe kind of its modifiers, and the command's short name.
_RUN_TYPES = {"oneshot": ("oneshot", "slope oneshot"), "train": ("finetune", "slope finetune")}


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


@dataclass(frozen=True)
class RecipeStage:
    """One stage of a recipe: its ``name``, ``run_type`` (``"oneshot"``: run by ``slope oneshot``;
    ``"train"``: by ``slope finetune``) and ``modifiers`` (``(group, name, params)``, as written)."""

    name: str
    run_type: str
    modifiers: tuple

    @property
    def command(self) -> str:
        return _RUN_TYPES[self.run_type][1]

    @property
    def unsupported(self) -> str | None:
        """Why slope runs no command for this stage (its first modifier slope does not run, e.g.
        ``GPTQModifier``: quantization), or ``None``."""
        name = next((name for _, name, _ in self.modifiers if name in _ELSEWHERE), None)
        return None if name is None else f"{name} is {_ELSEWHERE[name]}"


def _run_type_of(name: str) -> str | None:
    """The ``run_type`` of the stages a modifier belongs in (``None``: not a known modifier)."""
    if name in MODIFIERS or name in _ELSEWHERE:
        return "oneshot"
    return "train" if name in _registry("finetune") else None


def _stage(stage: str, groups) -> RecipeStage:
    """A stage's modifiers and its ``run_type`` (declared, or that of its modifiers), checked."""
    if not isinstance(groups, dict):
        raise RecipeError(f"stage {stage!r} must map modifier groups (e.g. `obcq_modifiers:`) to modifiers, "
                          f"got {type(groups).__name__}")
    declared, modifiers = None, []
    for group, entries in groups.items():
        if group == "run_type":
            if entries not in _RUN_TYPES:
                raise RecipeError(f"{stage}: run_type {entries!r} is not supported; 'oneshot' stages run with slope oneshot, "
                                  "'train' stages with slope finetune")
            declared = entries
            continue
        if not isinstance(entries, dict) or not entries:
            raise RecipeError(f"{stage}.{group} must map modifier names (e.g. SparseGPTModifier) to their parameters")
        modifiers += [(str(group), str(name), params) for name, params in entries.items()]
    found: dict[str, str] = {}  # run_type -> the first modifier of it ("stage.group.Name")
    for group, name, _ in modifiers:
        run_type = _run_type_of(name)
        if run_type is None:
            raise RecipeError(f"{stage}.{group}: {name} is not a known modifier; oneshot stages use {', '.join(MODIFIERS)}, "
                              f"train stages use {', '.join(_registry('finetune'))}")
        found.setdefault(run_type, f"{stage}.{group}.{name}")
    for run_type, where in found.items():
        if declared is not None and run_type != declared:
            raise RecipeError(f"{stage}: run_type {declared!r} does not fit {where}, which {_RUN_TYPES[run_type][1]} runs; "
                              "give it a stage of its own")
    if len(found) > 1:
        raise RecipeError(f"stage {stage!r} mixes one-shot pruning ({found['oneshot']}: slope oneshot) and fine-tuning "
                          f"({found['train']}: slope finetune); split it into a oneshot stage and a train stage, in the order they run")
    return RecipeStage(str(stage), declared or next(iter(found), "oneshot"), tuple(modifiers))


def recipe_stages(recipe) -> list[RecipeStage]:
    """The stages of ``recipe`` (a YAML path, YAML text or dict) in order, each checked (structure,
    known modifiers, ``run_type``); modifier parameters are checked by :func:`parse_recipe`."""
    return [_stage(stage, groups) for stage, groups in _load(recipe).items()]


def stage_recipe(recipe, stage: str) -> dict:
    """The recipe of one stage, as written: a dict holding only ``stage`` (what ``slope apply`` hands
    to the command that runs it, so that the stage's folder records that stage alone)."""
    data = {str(name): groups for name, groups in _load(recipe).items()}  # YAML may key a stage by a number
    if stage not in data:
        raise RecipeError(f"the recipe has no stage {stage!r}; its stages: {', '.join(data) or 'none'}")
    return {stage: data[stage]}


def _listing(stages: list[RecipeStage]) -> str:
    return ", ".join(f"{s.name} ({s.run_type}: {s.command})" for s in stages)


def _select(stages: list[RecipeStage], kind: str, stage: str | None) -> list[RecipeStage]:
    """The stages the command of ``kind`` runs: ``stage`` (by name), else every stage of its run type
    (one for finetune; consecutive for oneshot, so that the recipe's order holds)."""
    run_type, command = _KINDS[kind][0], _RUN_TYPES[_KINDS[kind][0]][1]
    if stage is not None:
        chosen = [s for s in stages if s.name == stage]
        if not chosen:
            raise RecipeError(f"the recipe has no stage {stage!r}; its stages: {_listing(stages) or 'none'}")
        if chosen[0].run_type != run_type:
            raise RecipeError(f"stage {stage!r} is a {chosen[0].run_type} stage; run it with {chosen[0].command} --stage {stage}")
        return chosen
    left_out = [s for s in stages if s.unsupported and s.run_type == run_type]
    stages = [s for s in stages if not s.unsupported]  # left to other tools (said by skipped_stages)
    if left_out and not any(s.run_type == run_type for s in stages):  # nothing else to run: say why not
        group, name, params = next(m for m in left_out[0].modifiers if m[1] in _ELSEWHERE)
        _modifier(name, params, f"{left_out[0].name}.{group}", kind)
    mine = [i for i, s in enumerate(stages) if s.run_type == run_type]
    if not mine:
        if len(stages) == 1:  # one stage of the other kind: say so of its first modifier
            group, name, params = stages[0].modifiers[0]
            _modifier(name, params, f"{stages[0].name}.{group}", kind)
        raise RecipeError(f"the recipe holds no {run_type} stage for {command}; its stages: {_listing(stages)}")
    if len(mine) > 1 and (kind == "finetune" or mine != list(range(mine[0], mine[-1] + 1))):
        order = ", ".join(f"{s.command} --stage {s.name}" for s in stages)
        why = ("runs one train stage per run" if kind == "finetune" else
               f"cannot run {', '.join(stages[i].name for i in mine)} together: other stages come between them")
        raise RecipeError(f"{command} {why}; run the stages in the recipe's order, one at a time, each on the model the previous "
                          f"one wrote: {order}; or run them all with one command: slope apply (slope.apply)")
    return [stages[i] for i in mine]


def parse_recipe(recipe, kind: str = "oneshot", stage: str | None = None) -> list[RecipeEntry]:
    """The modifiers of ``recipe`` (a YAML path, YAML text or dict) that the command of ``kind`` runs,
    in the order they run.

    ``kind``: ``"oneshot"`` (pruning modifiers) or ``"finetune"`` (fine-tuning modifiers). A recipe
    may hold several stages (llm-compressor's ``oneshot_stage:`` then ``finetuning_stage:``): each
    command runs the stages of its run type (``oneshot`` / ``train``, declared by ``run_type`` or
    given by the stage's modifiers) and leaves the others to the other command; ``stage`` picks one
    stage by name. Every modifier of every stage is checked, so a typo fails before anything runs
    (quantization modifiers, which slope does not run, only in a stage that runs)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    stages = recipe_stages(recipe)
    for s in stages:  # parameters of the stages this command skips, too
        for group, name, params in s.modifiers:
            if name not in _ELSEWHERE:
                _modifier(name, params, f"{s.name}.{group}", _RUN_TYPES[s.run_type][0])
    selected = _select(stages, kind, stage) if any(s.modifiers for s in stages) else []
    entries = [RecipeEntry(s.name, group, _modifier(name, params, f"{s.name}.{group}", kind))
               for s in selected for group, name, params in s.modifiers]
    if not entries:
        example = ("pruning_stage: {pruning_modifiers: {SparseGPTModifier: {sparsity: 0.5}}}" if kind == "oneshot"
                   else "recovery_stage: {pruning_modifiers: {ConstantPruningModifier: {start: 0}}}")
        raise RecipeError(f"the recipe holds no modifiers; add e.g. `{example}`")
    return entries


def skipped_stages(recipe, kind: str, stage: str | None = None) -> list[str]:
    """One line per stage of ``recipe`` that the command of ``kind`` leaves to the other (or, with
    ``stage``, does not run), naming the command that runs it."""
    ran = {e.stage for e in parse_recipe(recipe, kind, stage)}
    return [f"recipe stage {s.name} ({s.run_type}) not run: {s.unsupported}; run it with another tool on the model slope writes"
            if s.unsupported else f"recipe stage {s.name} ({s.run_type}) not run here: {s.command} runs it"
            for s in recipe_stages(recipe) if s.name not in ran]


def recipe_yaml(entries: list[RecipeEntry]) -> str:
    """The recipe as YAML text (written next to the pruned model)."""
    data: dict = {}
    for e in entries:
        data.setdefault(e.stage, {}).setdefault(e.group, {})[e.modifier.name] = e.modifier.params()
    return yaml.safe_dump(data, sort_keys=False)
