"""The one-shot pruning modifiers of a recipe (SparseML / llm-compressor names), one class each.

A modifier is a config dataclass plus the rule that turns one weight ``W (out, in)`` and its
calibration statistics into a pruned weight:

- :class:`MagnitudePruningModifier` — keep the largest ``|W|`` (no calibration data);
- :class:`WandaPruningModifier` — keep the largest ``|W_ij|·‖X_j‖₂`` per output row (Sun et al. 2023);
- :class:`SparseGPTModifier` — OBS reconstruction with the inverse-Hessian Cholesky factor
  (Frantar & Alistarh 2023).

Common parameters: ``sparsity`` (fraction pruned, in [0, 1)), ``mask_structure`` (``"0:0"``
unstructured, or ``"N:M"``: N kept in every M consecutive inputs), ``targets`` / ``ignore``
(module names or ``re:`` regexes; see :mod:`slope.pruning.targets`). Calibrated modifiers add
``sparsity_profile`` (``None`` or ``"owl"``, with ``owl_m`` / ``owl_lmbda``; :mod:`slope.pruning.owl`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from slope.masks import mask_from_scores, parse_structure
from slope.pruning.sparsegpt import sparsegpt_prune
from slope.pruning.wanda import wanda_mask

__all__ = [
    "MODIFIERS",
    "CalibratedModifier",
    "MagnitudePruningModifier",
    "PruningModifier",
    "RecipeError",
    "SparseGPTModifier",
    "WandaPruningModifier",
]


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the modifier, the parameter and the fix."""


@dataclass
class PruningModifier:
    """Parameters every pruning modifier takes.

    ``targets``: ``None`` = every linear inside the model's transformer blocks.
    """

    sparsity: float | None = None
    mask_structure: str = "0:0"
    targets: list[str] | str | None = None
    ignore: list[str] | str | None = None

    #: What the modifier needs from calibration: ``None``, ``"norms"`` or ``"hessian"``.
    statistics = None

    def __post_init__(self):
        self.targets = _names(self, "targets")
        self.ignore = _names(self, "ignore") or []
        if isinstance(self.mask_structure, int):
            raise RecipeError(f"{self.name}: mask_structure {self.mask_structure!r} is a number; quote it, e.g. "
                              "mask_structure: \"2:4\" (YAML reads an unquoted 2:4 as the base-60 number 124)")
        try:
            self.structure = parse_structure(self.mask_structure)
        except ValueError as e:
            raise RecipeError(f"{self.name}: mask_structure {self.mask_structure!r}: {e}") from None
        if self.sparsity is None:
            if self.structure is None:
                raise RecipeError(f"{self.name}: give `sparsity` (fraction pruned, e.g. 0.5) or an N:M `mask_structure`")
            n, m = self.structure
            self.sparsity = 1 - n / m
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise RecipeError(f"{self.name}: sparsity must be a number in [0, 1) (the fraction pruned), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        if self.structure is not None and not math.isclose(self.sparsity, 1 - self.structure[0] / self.structure[1]):
            n, m = self.structure
            raise RecipeError(f"{self.name}: sparsity {self.sparsity:g} disagrees with mask_structure '{n}:{m}', "
                              f"which prunes {1 - n / m:g}; drop `sparsity` or make them agree")

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def structure_name(self) -> str:
        return "unstructured" if self.structure is None else f"{self.structure[0]}:{self.structure[1]}"

    def params(self) -> dict:
        """The recipe parameters, as a YAML-able dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def mask_for(self, weight: torch.Tensor, stats, sparsity: float) -> torch.Tensor:
        """The bool mask (True = kept) of ``weight (out, in)``; ``stats``: the layer's calibration statistics."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, stats, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new weight, mask)`` for ``weight (out, in)`` (any float dtype) at ``sparsity``: the new
        weight is fp32 (fp64 if ``weight`` is) with exact zeros where ``mask`` (bool, True = kept) is False."""
        mask = self.mask_for(weight, stats, sparsity)
        work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        return work * mask, mask


@dataclass
class MagnitudePruningModifier(PruningModifier):
    """Keep the largest ``|W|``: per layer over the whole matrix (unstructured) or N:M along the input."""

    def mask_for(self, weight, stats, sparsity):
        return mask_from_scores(weight.detach().abs(), None if self.structure else sparsity, self.structure)


@dataclass
class CalibratedModifier(PruningModifier):
    """A modifier that needs calibration activations; ``sparsity_profile="owl"`` sets per-block
    sparsities from the blocks' outlier ratios (``owl_m``: outlier threshold as a multiple of the
    mean score; ``owl_lmbda``: spread of the per-block sparsities), keeping their mean at ``sparsity``."""

    sparsity_profile: str | None = None
    owl_m: float = 5.0
    owl_lmbda: float = 0.08

    #: Inputs of block k come from the already-pruned blocks < k (Wanda's pipeline; SparseGPT: its flag).
    propagate_pruned = True

    def __post_init__(self):
        super().__post_init__()
        profile = self.sparsity_profile
        if profile is not None and (not isinstance(profile, str) or profile.lower() != "owl"):
            raise RecipeError(f"{self.name}: sparsity_profile must be null or 'owl', got {profile!r}")
        self.sparsity_profile = None if profile is None else "owl"
        if self.sparsity_profile and self.structure is not None:
            raise RecipeError(f"{self.name}: sparsity_profile 'owl' varies the sparsity per layer, which an N:M "
                              f"mask_structure ({self.structure_name}) fixes; use mask_structure '0:0'")
        _positive(self, "owl_m")
        _positive(self, "owl_lmbda", allow_zero=True)


@dataclass
class WandaPruningModifier(CalibratedModifier):
    """Wanda: keep the largest ``|W_ij|·‖X_j‖₂`` in every output row (unstructured) or N:M group."""

    statistics = "norms"

    def mask_for(self, weight, stats, sparsity):
        return wanda_mask(weight, stats.squared_norms(), sparsity, self.structure)


@dataclass
class SparseGPTModifier(CalibratedModifier):
    """SparseGPT: prune and update the remaining weights to reconstruct ``W X`` (OBS, lazy batches)."""

    block_size: int = 128
    dampening_frac: float = 0.01
    sequential_update: bool = True
    quantize: bool = False

    statistics = "hessian"

    def __post_init__(self):
        super().__post_init__()
        if self.quantize is not False:
            raise RecipeError(f"{self.name}: quantize: {self.quantize!r} is not supported (slope prunes only); "
                              "set quantize: false or remove it")
        if not isinstance(self.sequential_update, bool):
            raise RecipeError(f"{self.name}: sequential_update must be true or false, got {self.sequential_update!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise RecipeError(f"{self.name}: block_size must be a positive integer, got {self.block_size!r}")
        if self.structure is not None and self.block_size % self.structure[1]:
            raise RecipeError(f"{self.name}: block_size {self.block_size} must be a multiple of M={self.structure[1]} "
                              f"for mask_structure '{self.structure_name}'")
        _positive(self, "dampening_frac", allow_zero=True)
        self.propagate_pruned = self.sequential_update

    def prune(self, weight, stats, sparsity):
        return sparsegpt_prune(weight, stats.hessian(), sparsity, self.structure, self.block_size, self.dampening_frac,
                               layer=stats.name)


def _names(modifier: PruningModifier, key: str) -> list[str] | None:
    value = getattr(modifier, key)
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    empty_ok = key == "ignore"
    if not isinstance(value, (list, tuple)) or not (value or empty_ok) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"{modifier.name}: {key} must be a module name, a 're:' regex, or a non-empty list of them; "
                          f"got {getattr(modifier, key)!r}")
    return list(value)


def _positive(modifier: PruningModifier, key: str, allow_zero: bool = False) -> None:
    value = getattr(modifier, key)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise RecipeError(f"{modifier.name}: {key} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


#: Modifier classes by recipe name.
MODIFIERS = {cls.__name__: cls for cls in (MagnitudePruningModifier, WandaPruningModifier, SparseGPTModifier)}
