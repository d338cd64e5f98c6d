"""Which modules a sparse fine-tuning touches, and how many delta entries each gets."""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn

from slope.peft.delta import SftLinear, _is_conv1d

__all__ = ["allocate", "find_targets", "random_indices"]


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str,
                 skip: Callable[[str], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear`` / ``Conv1D`` modules that ``target_modules`` selects
    (a list: names equal to or ending in ``"." + entry``; a string: a regex matching the whole
    name, as in PEFT), except those whose name ``skip`` accepts.

    Raises ``ValueError`` when the model already has deltas, when nothing matches, when a matching
    module is of another kind, or when a matching weight is tied to another parameter.
    """
    wrapped = [name for name, module in model.named_modules() if isinstance(module, SftLinear)]
    if wrapped:
        raise ValueError(f"the model already has sparse deltas ({len(wrapped)} SftLinear layers, e.g. {wrapped[0]}): "
                         "get_peft_model takes the plain model; keep the SftModel you have, or .unload() / .merge_and_unload() it first")
    found, wrong = [], []
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules) or (skip is not None and skip(name)):
            continue
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            found.append((name, module))
        else:
            wrong.append(f"{name} ({type(module).__name__})")
    if wrong:
        hint = ("; SparseLinear is a SLoPe 2:4 layer (prune_model): sparse fine-tuning starts from the dense model"
                if any(w.endswith("(SparseLinear)") for w in wrong) else "")
        raise ValueError(f"target_modules {target_modules!r} match modules that are not nn.Linear/Conv1D: {', '.join(wrong[:5])}{hint}")
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)})
        if isinstance(target_modules, str):
            example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)), "")
            raise ValueError(
                f"target_modules {target_modules!r} is a regular expression that must match a whole module name "
                f"(such as {example!r}) and matches none; pass a list like [{target_modules!r}] to match name endings, "
                f"or a pattern like '.*{target_modules}' (linear modules here are named {linear})")
        raise ValueError(f"target_modules {target_modules!r} match no module of the model; its linear modules are named {linear}")
    _refuse_tied(model, found)
    return found


def _identities(p: torch.Tensor) -> set[tuple[str, int]]:
    """What makes two parameters one tensor: the same object, or the same storage."""
    ptr = p.untyped_storage().data_ptr()
    return {("object", id(p))} | ({("storage", ptr)} if ptr else set())


def _refuse_tied(model: nn.Module, found: list[tuple[str, nn.Module]]) -> None:
    """``ValueError`` if a target's weight is also another parameter of the model (tied weights:
    GPT-2's ``lm_head`` shares ``wte``). The delta acts only where the target computes, but
    ``merge()`` would add it into the shared tensor, changing the other use as well."""
    uses: dict[tuple[str, int], list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for key in _identities(p):
            uses.setdefault(key, []).append(name)
    for name, module in found:
        others = sorted({n for key in _identities(module.weight) for n in uses.get(key, []) if n != f"{name}.weight"})
        if others:
            raise ValueError(
                f"{name}.weight is tied to {others[0]} (one tensor, e.g. tie_word_embeddings): a delta on it would act only in "
                f"{name} but merge() would add it into both; drop {name!r} from target_modules, or untie the weights first")


def allocate(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` entries among weights of ``sizes`` in proportion to size (largest remainders,
    ties to the earlier weight); each share is at most its weight's size."""
    capacity = sum(sizes)
    if not 0 < total <= capacity:
        raise ValueError(
            f"{total} tunable weights do not fit the target modules, which hold {capacity}: "
            "lower density / num_tunable_weights or target more modules"
        )
    exact = [total * s / capacity for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def random_indices(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat indices in ``[0, numel)``, sorted, drawn uniformly by ``generator``."""
    return torch.randperm(numel, generator=generator)[:k].sort().values
