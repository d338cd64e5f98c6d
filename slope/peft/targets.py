"""Which modules a sparse fine-tuning touches, and how many delta entries each gets."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from slope.peft.delta import SftLinear, _is_conv1d

__all__ = ["allocate", "find_targets", "random_indices"]


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear`` / ``Conv1D`` modules that ``target_modules`` selects.

    Raises ``ValueError`` when nothing matches, or when a matching module is of another kind.
    """
    found, wrong = [], []
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules) or isinstance(module, SftLinear):
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
        raise ValueError(f"target_modules {target_modules!r} match no module of the model; its linear modules are named {linear}")
    return found


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
