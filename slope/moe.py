"""Mixture-of-experts weights: fused expert tensors, pruned N:M per expert in simulation.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, ... as fused 3-D
parameters of an ``...Experts`` module (e.g. ``gate_up_proj (E, 2·I, H)``, ``down_proj (E, H, I)``),
multiplied per expert with ``F.linear(x, W[e])``; no ``nn.Linear`` exists to replace by a
:class:`slope.SparseLinear`. :func:`prune_experts` prunes them *in simulation*: every expert's
``(out, in)`` slice gets an N:M mask along ``in`` by ``|W|`` (:func:`slope.masks.nm_mask_from_scores`),
kept on the fused parameter by the shared mask core :class:`slope.sparsity.MaskedWeights` (pruned
entries are zero and their gradients are zeroed; call ``after_step(optimizer)`` after each
optimizer step to keep optimizer state zero too; :class:`slope.SparseOptimizerCallback` does).
``wrap_ddp`` / ``wrap_fsdp2`` copy rank 0's masks to every rank; under FSDP2 the masks follow the
sharded tensors, whose gradient hooks do not run: call ``expert_masks(model).mask_grads_()`` after
the backward passes (before clipping) as well.
The weights stay dense tensors (no compressed storage, no sparse GEMM): same math, no speed-up.

Modules marked ``is_transposed`` (experts stored ``(E, in, out)``, e.g. GPT-OSS) are masked along
their input dimension (dim 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from slope.masks import nm_mask_from_scores
from slope.sparsity import MaskedWeights

__all__ = ["ExpertMasks", "ExpertWeight", "find_expert_weights", "prune_experts", "expert_masks"]

#: Attribute of each experts module holding the :class:`ExpertMasks` of the model's pruned expert tensors.
EXPERT_MASKS_ATTR = "slope_expert_masks"


@dataclass(frozen=True)
class ExpertWeight:
    """A fused expert parameter: its full name, ``(E, out, in)`` shape as multiplied, and layout."""

    name: str
    shape: tuple[int, int, int]
    transposed: bool  # stored (E, in, out)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


class ExpertMasks(MaskedWeights):
    """:class:`MaskedWeights` of fused expert tensors, with each one's ``(n, m)`` in ``structure``."""

    def __init__(self, params, masks, structure: dict[str, tuple[int, int]]):
        super().__init__(params, masks)
        self.structure = dict(structure)


def find_expert_weights(model: nn.Module) -> list[ExpertWeight]:
    """Every 3-D parameter owned directly by a module whose class name contains ``Experts``."""
    found = []
    for module_name, module in model.named_modules():
        if "Experts" not in type(module).__name__:
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                e, a, b = param.shape
                found.append(ExpertWeight(f"{module_name}.{attr}" if module_name else attr,
                                          (e, b, a) if transposed else (e, a, b), transposed))
    return found


def _nm_mask(param: torch.Tensor, transposed: bool, n: int, m: int) -> torch.Tensor:
    """Bool mask of ``param``'s shape, N:M along each expert's input dimension by ``|W|``."""
    scores = param.detach().abs()
    if transposed:
        return nm_mask_from_scores(scores.transpose(1, 2), n, m).transpose(1, 2).contiguous()
    return nm_mask_from_scores(scores, n, m)


def prune_experts(model: nn.Module, experts: list[ExpertWeight], n: int, m: int,
                  masks: dict[str, torch.Tensor] | None = None) -> ExpertMasks:
    """Prune ``experts`` of ``model`` N:M per expert (new magnitude masks, or the given bool ``masks``
    by name), zero the pruned weights and keep them zero (:class:`ExpertMasks`, returned and kept by
    each experts module as ``slope_expert_masks``; an existing one is extended)."""
    params = {e.name: model.get_parameter(e.name) for e in experts}
    for e in experts:
        if e.shape[2] % m:
            raise ValueError(f"expert weight {e.name!r} {e.shape}: its input dimension is not divisible by M={m}")
    given = masks or {}
    new = {e.name: given[e.name] if e.name in given else _nm_mask(params[e.name], e.transposed, n, m) for e in experts}
    structure = {e.name: (n, m) for e in experts}
    previous = expert_masks(model)
    if previous is not None:
        previous.remove_hooks()
        params, new = {**previous.params, **params}, {**previous.masks, **new}
        structure = {**previous.structure, **structure}
    masked = ExpertMasks(params, new, structure)
    masked.apply_()
    for name in params:  # each experts module knows the masks (and reloads them, see _load_masks)
        owner = model.get_submodule(name.rpartition(".")[0])
        if EXPERT_MASKS_ATTR not in owner.__dict__:
            owner.register_load_state_dict_pre_hook(_load_masks)
        owner.__dict__[EXPERT_MASKS_ATTR] = masked
    return masked


def _load_masks(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of an experts module: masks saved beside its weights
    (``<parameter>.mask_bits``, the dense form of a Hugging Face save) replace the current ones, e.g.
    when a Trainer run resumes from ``checkpoint-N``."""
    from slope.masks import unpack_mask

    masked = module.__dict__[EXPERT_MASKS_ATTR]
    for attr, param in module.named_parameters(recurse=False):
        bits = state_dict.pop(prefix + attr + ".mask_bits", None)
        name = next((n for n, p in masked.params.items() if p is param), None)
        if bits is not None and name is not None:
            masked.set_mask(name, unpack_mask(bits, param.shape).to(param.device))


def expert_masks(model: nn.Module) -> ExpertMasks | None:
    """The :class:`ExpertMasks` of ``model``'s pruned expert tensors (found through wrappers such as
    ``DistributedDataParallel``), or ``None``."""
    for module in model.modules():
        if EXPERT_MASKS_ATTR in module.__dict__:
            return module.__dict__[EXPERT_MASKS_ATTR]
    return None
