"""Which linear layers a modifier prunes, and writing their weights so that a failure can be undone.

- :func:`find_blocks`: the model's transformer blocks (the ``nn.ModuleList`` holding most
  parameters: ``model.layers`` of Llama / Mistral / Qwen2, ``model.decoder.layers`` of OPT,
  ``transformer.h`` of GPT-2, ``bert.encoder.layer`` of BERT).
- :func:`select_layers`: the linears (``nn.Linear``, GPT-2 ``Conv1D``) a modifier's ``targets`` /
  ``ignore`` select. An entry is a module name (exact), a class name (``"Linear"``,
  ``"LlamaDecoderLayer"``) or ``re:REGEX`` (``re.match`` on the module name, so
  ``re:model.layers.\\d+$`` selects the blocks); a linear also answers to its weight's name
  (``up_proj.weight``, ``re:.*q_proj.weight``), as SparseML recipes write it. A selected module
  that is not a linear selects the linears inside it; a linear inside an ignored module is
  ignored. No targets: every linear inside the blocks (every linear, for a model without blocks).
- :class:`WeightJournal`: writes pruned weights and keeps the originals until the run succeeds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from slope.prune import DEFAULT_SKIP, _tied_to_embedding
from slope.pruning.modifiers import PruningModifier, RecipeError

__all__ = ["LayerPlan", "Skipped", "WeightJournal", "find_blocks", "is_linear", "match_targets", "matches_module_or_above",
           "matching_modules", "name_hint", "read_weight", "select_layers"]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or HF GPT-2 ``Conv1D`` (which stores its weight as ``(in, out)``)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def read_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a view for ``Conv1D``)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@dataclass
class LayerPlan:
    """A linear to prune: ``name``, ``module``, its block index (``None`` outside the blocks), ``shape`` (out, in)."""

    name: str
    module: nn.Module
    block: int | None
    shape: tuple[int, int]


@dataclass
class Skipped:
    """A selected linear that is left as it is, and why."""

    name: str
    shape: tuple[int, int]
    reason: str


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)``: the ``nn.ModuleList`` with the most parameters, or ``None`` if there is none."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (name, module, size)
    return None if best is None else (best[0], best[1])


def name_hint(model: nn.Module) -> str:
    """How ``model``'s own modules are named, for an error about a name that matches none: its block
    list as a ``re:`` entry and a linear's name (``re:transformer.h.\\d+$``, ``transformer.h.0.attn.c_attn``
    for GPT-2; ``re:model.layers.\\d+$``, ``model.layers.0.self_attn.q_proj`` for Llama)."""
    linears = [n for n, m in model.named_modules() if n and is_linear(m)]
    found = find_blocks(model)
    if found is None or not found[0]:
        return f"its linear modules are named {', '.join(linears[:3]) or '(none)'}"
    blocks_name = found[0]
    first = [n for n in linears if n.startswith(blocks_name + ".0.")]
    example = f" and its linears like {first[0]}" if first else ""
    return f"its blocks are {blocks_name}.0, {blocks_name}.1, ... (re:{blocks_name}.\\d+$){example}"


def _answers_to(name: str, module: nn.Module) -> tuple[str, ...]:
    """The names an entry may give ``module`` by: its own, and for a linear its weight's
    (SparseML recipes name parameters: ``re:.*q_proj.weight``, ``model.layers.0.mlp.up_proj.weight``)."""
    return (name, name + ".weight") if is_linear(module) else (name,)


def _matches(entry: str, name: str, module: nn.Module) -> bool:
    names = _answers_to(name, module)
    if entry.startswith("re:"):
        return any(re.match(entry[3:], n) is not None for n in names)
    return entry in names or type(module).__name__ == entry


def matches_module_or_above(entries: list[str], name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether one of ``entries`` (module names or ``re:`` regexes) names module ``name`` or a module
    above it (``modules``: the model's ``named_modules()``)."""
    parts = name.split(".")
    ancestry = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(_matches(entry, a, modules[a]) for entry in entries for a in ancestry)


def _check_regex(entry: str, what: str) -> None:
    """A ``re:`` entry must compile (:class:`RecipeError` naming ``what`` otherwise)."""
    if entry.startswith("re:"):
        try:
            re.compile(entry[3:])
        except re.error as e:
            raise RecipeError(f"{what} {entry!r} is not a valid regex ({e})") from None


def _check_regexes(entries: list[str], modifier: PruningModifier, key: str) -> None:
    for entry in entries:
        _check_regex(entry, f"{modifier.name}: {key} entry")


def _block_index(name: str, blocks_name: str | None) -> int | None:
    if blocks_name is None:
        return None
    prefix = blocks_name + "." if blocks_name else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def match_targets(model: nn.Module, targets: list[str], owner: str) -> dict[str, bool]:
    """``{linear name: explicitly named}`` of the linears ``targets`` select: module names (exact),
    class names or ``re:`` regexes (``re.match``); a non-linear module selects the linears inside it.
    An entry that matches no module is a :class:`RecipeError` naming ``owner`` (the modifier)."""
    modules = dict(model.named_modules())
    chosen: dict[str, bool] = {}
    for entry in targets:
        hits = [n for n, m in modules.items() if _matches(entry, n, m)]
        if not hits:
            raise RecipeError(f"{owner}: target {entry!r} matches no module of {type(model).__name__}; "
                              f"check the name ({name_hint(model)})")
        for hit in hits:
            if is_linear(modules[hit]):
                chosen[hit] = chosen.get(hit, False) or entry in _answers_to(hit, modules[hit])
            else:
                prefix = hit + "." if hit else ""
                for n, m in modules.items():
                    if n.startswith(prefix) and n and is_linear(m):
                        chosen.setdefault(n, False)
    return chosen


def matching_modules(model: nn.Module, entries: list[str], owner: str) -> list[str]:
    """Names of the modules (any kind) that ``entries`` select (module names, class names, ``re:``
    regexes), in model order; an entry that matches no module is a :class:`RecipeError`."""
    modules = dict(model.named_modules())
    chosen = set()
    for entry in entries:
        _check_regex(entry, f"{owner}: target")
        hits = {n for n, m in modules.items() if _matches(entry, n, m)}
        if not hits:
            raise RecipeError(f"{owner}: target {entry!r} matches no module of {type(model).__name__}; "
                              f"check the name ({name_hint(model)})")
        chosen |= hits
    return [n for n in modules if n in chosen]


def _selected(model: nn.Module, modifier: PruningModifier, blocks_name: str | None) -> dict[str, bool]:
    """``{linear name: explicitly named}`` of the linears ``targets`` select (before ``ignore``)."""
    if modifier.targets is None:  # the linears of the blocks (all linears of a model without blocks)
        return {n: False for n, m in model.named_modules()
                if n and is_linear(m) and (blocks_name is None or _block_index(n, blocks_name) is not None)}
    return match_targets(model, modifier.targets, modifier.name)


def _skip_reason(name, module, explicit, modifier, model, blocks_name, ignored) -> str:
    out_features, in_features = read_weight(module).shape
    if ignored:
        return "ignored by the recipe"
    if not explicit and name.rpartition(".")[2] in DEFAULT_SKIP:
        return "vocabulary projection (default skip; name it exactly in targets to prune it)"
    if _tied_to_embedding(module.weight, model):
        return "tied to an embedding"
    if modifier.statistics is not None and _block_index(name, blocks_name) is None:
        return "outside the transformer blocks (calibration runs block by block)"
    if modifier.structure is not None and in_features % modifier.structure[1]:
        return f"in_features {in_features} not divisible by M={modifier.structure[1]}"
    return ""


def _reached_experts(model: nn.Module, modifier: PruningModifier, blocks_name: str | None, modules: dict) -> list[Skipped]:
    """The fused MoE expert tensors (:mod:`slope.moe`: 3-D parameters, no ``nn.Linear``) that ``targets``
    reach and ``ignore`` does not: one-shot pruning leaves them dense, so the report lists them."""
    from slope.moe import find_expert_weights

    found = []
    for e in find_expert_weights(model):
        module = e.name.rpartition(".")[0]
        if modifier.targets is None:
            reached = blocks_name is None or _block_index(e.name, blocks_name) is not None
        else:
            reached = matches_module_or_above(modifier.targets, module, modules)
        if reached and not matches_module_or_above(modifier.ignore, module, modules):
            experts, out_features, in_features = e.shape
            found.append(Skipped(e.name, (experts * out_features, in_features),
                                 f"fused MoE experts ({experts} of {out_features}x{in_features}): one-shot pruning prunes "
                                 "linear layers only; slope.prune_model(model, experts=True) prunes experts N:M by magnitude"))
    return found


def select_layers(model: nn.Module, modifier: PruningModifier) -> tuple[list[LayerPlan], list[Skipped]]:
    """The linears ``modifier`` prunes and the selected ones it leaves alone (with the reason).

    Raises :class:`RecipeError` for a ``targets`` / ``ignore`` entry that matches nothing, and when
    nothing at all is left to prune.
    """
    _check_regexes(modifier.targets or [], modifier, "targets")
    _check_regexes(modifier.ignore, modifier, "ignore")
    found = find_blocks(model)
    blocks_name = found[0] if found else None
    if modifier.statistics is not None and found is None:
        raise RecipeError(f"{modifier.name} calibrates block by block, but {type(model).__name__} has no nn.ModuleList of "
                          "transformer blocks; use MagnitudePruningModifier")
    if modifier.statistics is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise RecipeError(f"{modifier.name} calibrates by running {type(model).__name__} on token windows alone, which an "
                          "encoder-decoder model cannot do (its decoder needs inputs of its own); use MagnitudePruningModifier")
    modules = dict(model.named_modules())
    for entry in modifier.ignore:
        if not any(_matches(entry, n, m) for n, m in modules.items()):
            raise RecipeError(f"{modifier.name}: ignore entry {entry!r} matches no module of {type(model).__name__}; "
                              f"check the name ({name_hint(model)})")
    plans, skipped = [], []
    for name, explicit in _selected(model, modifier, blocks_name).items():
        module = modules[name]
        shape = tuple(read_weight(module).shape)
        ignored = matches_module_or_above(modifier.ignore, name, modules)
        reason = _skip_reason(name, module, explicit, modifier, model, blocks_name, ignored)
        if reason:
            skipped.append(Skipped(name, shape, reason))
        else:
            plans.append(LayerPlan(name, module, _block_index(name, blocks_name), shape))
    skipped += _reached_experts(model, modifier, blocks_name, modules)
    if not plans:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:6]) or "no linear layers selected"
        raise RecipeError(f"{modifier.name} selects no layer it can prune ({detail}); adjust targets / ignore / mask_structure")
    return plans, skipped


class WeightJournal:
    """Writes new weights into linears, keeping each original (on the CPU) until :meth:`commit`;
    :meth:`rollback` restores every written layer, so a failed run leaves the model as it was."""

    def __init__(self):
        self._originals: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def write(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Set ``module``'s weight to ``weight (out, in)`` (cast to the module's dtype)."""
        target = read_weight(module)
        if module not in self._originals:
            self._originals[module] = module.weight.detach().to("cpu", copy=True)
        target.copy_(weight.to(target.dtype))

    @torch.no_grad()
    def rollback(self) -> None:
        for module, original in self._originals.items():
            module.weight.copy_(original.to(module.weight.device))
        self._originals.clear()

    def commit(self) -> None:
        self._originals.clear()
