"""``prune_model``: replace a model's linear layers by SLoPe layers, in place."""
from __future__ import annotations

import fnmatch
import logging
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from slope.backends import BACKEND_NAMES, backend_class
from slope.kernels import COMPRESSIBLE_DTYPES
from slope.layer import SparseLinear
from slope.masks import MASK_TYPES, parse_sparsity
from slope.serialization.hf_save import install_save_hook

__all__ = ["prune_model", "densify", "PruneDecision", "DEFAULT_SKIP", "default_plan", "size_reason"]

logger = logging.getLogger("slope")

#: Names (last component) never pruned by default: projections to the vocabulary.
DEFAULT_SKIP = ("lm_head", "embed_out", "output_projection")


@dataclass
class PruneDecision:
    """One row of the prune summary: a linear layer (``shape (out, in)``) or a fused MoE expert
    tensor (``shape (E, out, in)``), and its number of weights ``params``."""

    name: str
    shape: tuple[int, ...]
    pruned: bool
    reason: str
    params: int = 0

    def __post_init__(self):
        if not self.params:
            self.params = math.prod(self.shape)


def _patterns(patterns, what: str) -> list:
    """``targets`` / ``skip`` as a list of glob strings and compiled ``re:`` regexes (checked)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    compiled = []
    for p in patterns:
        if not isinstance(p, str) or not p or p == "re:":
            raise TypeError(f"{what} patterns must be non-empty strings (a module name, suffix, glob or 're:<regex>'), got {p!r}")
        if p.startswith("re:"):
            try:
                p = re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{what} pattern {p!r} is not a valid regular expression ({e})") from None
        compiled.append(p)
    return compiled


def _matches(name: str, patterns) -> bool:
    """PEFT-style (see :func:`prune_model`): ``re:<regex>`` matches the full name (``re.fullmatch``);
    any other pattern matches the full name or a dotted suffix of it, as a glob (``*``, ``?``, ``[..]``)."""
    suffixes = [name] + [name[i + 1 :] for i, c in enumerate(name) if c == "."]
    return any(
        p.fullmatch(name) is not None if isinstance(p, re.Pattern) else any(fnmatch.fnmatchcase(s, p) for s in suffixes)
        for p in patterns
    )


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or HF ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return module.weight.t(), module.bias  # Conv1D stores (in, out)
    return None


def _tied_to_embedding(weight: torch.Tensor, model: nn.Module) -> bool:
    """``weight`` shares its storage with an embedding's (on the meta device, where every tensor's
    ``data_ptr`` is 0: is the embedding's very parameter)."""
    return any(
        isinstance(m, nn.Embedding) and (m.weight is weight or (not weight.is_meta and m.weight.data_ptr() == weight.data_ptr()))
        for m in model.modules()
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_arguments(n: int, m: int, mask_type: str, backend: str, compress: bool, double_pruning: bool,
                     add_lora: bool, lora_rank, merge_lora: bool, lora_alpha=None) -> None:
    """One-line errors for :func:`prune_model` arguments that cannot go together."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {MASK_TYPES}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKEND_NAMES}")
    if compress:
        if (n, m) != (2, 4):
            raise ValueError(f"compress=True stores 2:4 only, not {n}:{m}; use compress=False to simulate {n}:{m}")
        if not double_pruning:
            raise ValueError("double_pruning=False (an exact backward) is not 2:4 sparse; it needs compress=False")
        if backend != "auto":
            check_backend_runs_here(backend)
    elif backend != "auto":
        raise ValueError(f"backend={backend!r} applies to compressed storage; pass compress=True (or backend='auto')")
    if merge_lora and not add_lora:
        raise ValueError("merge_lora=True needs add_lora=True and lora_rank > 0 (the merged form holds the adapters)")
    if not add_lora and (lora_rank not in (0, None) or lora_alpha is not None):
        given = f"lora_rank={lora_rank!r}" if lora_rank not in (0, None) else f"lora_alpha={lora_alpha!r}"
        raise ValueError(f"{given} attaches no adapters without add_lora=True: pass add_lora=True, or drop it")
    if add_lora and (not isinstance(lora_rank, int) or lora_rank <= 0):
        raise ValueError(f"add_lora=True needs a positive lora_rank, got {lora_rank!r}")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer (``nn.Linear``, GPT-2 ``Conv1D``); errors for a model
    without any, or with layers on the meta device."""
    candidates = [(name, mod) for name, mod in model.named_modules() if name and _linear_weight(mod) is not None]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear (or Conv1D) layers to prune; prune_model needs a "
            "model built from linear layers"
        )
    on_meta = [name for name, mod in candidates if _linear_weight(mod)[0].is_meta]
    if on_meta:
        raise ValueError(
            f"layer {on_meta[0]!r} (and {len(on_meta) - 1} more) is on the meta device: it has no weights to prune yet; "
            "load the weights first (e.g. model.to_empty(device='cpu') then load_state_dict), or build the model on a real device"
        )
    return candidates


def _kept_dense_reason(model: nn.Module, name: str, module: nn.Module, targets: list, skip: list, mha_owned: set,
                       n: int, m: int) -> str:
    """Why layer ``name`` stays dense (``""``: it is pruned). A layer named by ``targets`` that cannot
    be pruned is an error, not a reason."""
    out_features, in_features = _linear_weight(module)[0].shape
    explicit = bool(targets) and _matches(name, targets)
    if targets and not explicit:
        return "not in targets"
    if _matches(name, skip):
        return "skip pattern"
    if not targets and name.rpartition(".")[2] in DEFAULT_SKIP:
        return "vocabulary projection (default skip)"
    if _tied_to_embedding(module.weight, model):
        if explicit:
            raise ValueError(
                f"layer {name!r} is targeted but its weight is tied to an embedding (pruning would untie "
                "them); remove it from targets"
            )
        return "tied to an embedding"
    if id(module) in mha_owned:
        if explicit:
            raise ValueError(
                f"layer {name!r} is the out_proj of an nn.MultiheadAttention, which reads .weight directly "
                "(bypassing the layer's forward), so it cannot be sparse; remove it from targets"
            )
        return "nn.MultiheadAttention reads its weight directly"
    if in_features % m or out_features % m:
        if explicit:
            raise ValueError(
                f"layer {name!r} ({out_features}x{in_features}) is targeted but its in_features and "
                f"out_features must be divisible by M={m} for {n}:{m}; remove it from targets or pick another sparsity"
            )
        return size_reason(m)
    return ""


def size_reason(m: int) -> str:
    """Why a layer whose in or out features are not divisible by ``m`` stays dense."""
    return f"in/out features not divisible by {m}"


def default_plan(model: nn.Module, sparsity: str = "2:4") -> list[PruneDecision]:
    """What :func:`prune_model` (default ``targets`` / ``skip``) decides for each linear layer of ``model``
    at ``sparsity``, building nothing (``shape (out, in)``; a layer left dense only by its size has
    ``reason == size_reason(M)``). Reads no weights: ``model`` may be on the meta device."""
    n, m = parse_sparsity(sparsity)
    mha_owned = {id(mod.out_proj) for mod in model.modules() if isinstance(mod, nn.MultiheadAttention)}
    decisions = []
    for name, module in model.named_modules():
        if name and _linear_weight(module) is not None:
            reason = _kept_dense_reason(model, name, module, [], [], mha_owned, n, m)
            decisions.append(PruneDecision(name, tuple(_linear_weight(module)[0].shape), not reason, reason or f"{n}:{m}"))
    return decisions


def prune_model(
    model: nn.Module,
    compress: bool = True,
    tiling: bool = True,
    add_lora: bool = False,
    lora_rank: int = 0,
    merge_lora: bool = False,
    backend: str = "auto",
    sparsity: str = "2:4",
    targets=None,
    skip=None,
    *,
    mask_type: str = "nm",
    double_pruning: bool = True,
    lora_alpha: float | None = None,
    experts: bool = False,
    verbose: bool = True,
) -> nn.Module:
    """Replace ``nn.Linear`` (and HF GPT-2 ``Conv1D``) layers of ``model`` by :class:`SparseLinear`.

    Args:
        compress: store weights compressed (2:4 only) and multiply with ``backend``; ``False``
            simulates any N:M with dense tensors and masks.
        tiling: let backends split very non-square weights when that is faster (harmless elsewhere).
        add_lora / lora_rank / lora_alpha: attach low-rank adapters right away (DESIGN §5).
        merge_lora: build the merged sparse+LoRA inference form (needs ``add_lora``).
        backend: ``"auto"`` or one of ``reference``, ``cusparselt``, ``cutlass``, ``cutlass-sm90``,
            ``triton`` (with ``compress=True``).
        sparsity: ``"N:M"`` kept along the input dimension.
        targets: only layers whose name matches one of these patterns are pruned; a targeted layer
            that cannot be pruned is an error, a pattern that matches no linear layer a warning.
            Patterns work like PEFT's ``target_modules`` list: ``"q_proj"`` or ``"mlp.up_proj"``
            match the full name or a dotted suffix of it (``model.layers.0.mlp.up_proj``), and may
            be globs (``"mlp.*"``: every layer under an ``mlp``; ``"layers.1.*"``); ``"re:<regex>"``
            must match the full name (``re.fullmatch``, PEFT's string form, e.g.
            ``"re:.*[.](q|v)_proj"``). A bare string is one pattern (not a regex as in PEFT).
        skip: layers matching these patterns (same rules) are left dense (added to the default
            rules: the vocabulary projection, weights tied to an embedding, dimensions not divisible by M).
        mask_type: ``"nm"`` (default) or ``"transposable"`` (each M×M block N:M both ways).
        double_pruning: ``False`` keeps the exact backward ``dx = dy (W⊙M)`` (simulation only).
        experts: also prune the fused expert tensors of mixture-of-experts models (transformers 5's
            Mixtral / Qwen-MoE ``...Experts`` modules) N:M per expert, in simulation (masked dense
            tensors, :mod:`slope.moe`); without it they are listed as kept dense with their size.
        verbose: print the summary table (it is also logged at INFO on logger ``"slope"``).

    Returns the same ``model`` object; the decisions are kept in ``model.slope_prune_summary``.
    """
    n, m = parse_sparsity(sparsity)
    _check_arguments(n, m, mask_type, backend, compress, double_pruning, add_lora, lora_rank, merge_lora, lora_alpha)
    targets, skip = _patterns(targets, "targets"), _patterns(skip, "skip")
    _check_not_pruned(model, targets)

    decisions: list[PruneDecision] = []
    candidates = _candidates(model)
    # Nothing is replaced until every layer has been checked and built: an error leaves the model as it was.
    plan = _plan_layers(model, candidates, decisions, targets, skip, n, m, compress=compress, backend=backend, tiling=tiling,
                        double_pruning=double_pruning, mask_type=mask_type, add_lora=add_lora, lora_rank=lora_rank, lora_alpha=lora_alpha)
    expert_plan = _plan_experts(model, decisions, targets, skip, experts, n, m)
    _check_plan(model, decisions, targets, [name for name, _ in candidates] + [e.name for e in expert_plan])
    for name, layer in plan:
        _set_submodule(model, name, layer)
    if expert_plan:
        from slope.moe import prune_experts

        prune_experts(model, expert_plan, n, m)
    install_save_hook(model)  # model.save_pretrained writes W⊙M + masks (slope.serialization.hf_save)
    if merge_lora:
        from slope.lora import merge_lora as _merge

        _merge(model)
    _report(model, decisions, verbose)
    return model


def _plan_layers(model: nn.Module, candidates: list[tuple[str, nn.Module]], decisions: list[PruneDecision], targets: list, skip: list,
                 n: int, m: int, *, compress: bool, backend: str, tiling: bool, double_pruning: bool, mask_type: str,
                 add_lora: bool, lora_rank: int, lora_alpha: float | None) -> list[tuple[str, SparseLinear]]:
    """Decide for every linear layer of ``candidates`` (rows appended to ``decisions``) and build the
    :class:`SparseLinear` of each one pruned, replacing nothing; returns ``(name, new layer)`` pairs."""
    mha_owned = {id(mod.out_proj) for mod in model.modules() if isinstance(mod, nn.MultiheadAttention)}
    plan: list[tuple[str, SparseLinear]] = []
    for name, module in candidates:
        weight, bias = _linear_weight(module)
        out_features, in_features = weight.shape
        reason = _kept_dense_reason(model, name, module, targets, skip, mha_owned, n, m)
        if not reason and compress and weight.dtype not in COMPRESSIBLE_DTYPES:
            raise TypeError(
                f"layer {name!r} has dtype {weight.dtype}; compressed storage supports "
                f"{[str(d) for d in COMPRESSIBLE_DTYPES]}. Cast the model (e.g. model.float()) or use compress=False"
            )
        if reason:
            decisions.append(PruneDecision(name, (out_features, in_features), False, reason))
            continue
        layer = SparseLinear.from_dense(
            weight.detach(),
            None if bias is None else bias.detach(),
            n=n,
            m=m,
            compress=compress,
            backend=backend,
            tiling=tiling,
            double_pruning=double_pruning,
            mask_type=mask_type,
        )
        layer.layer_name = name
        layer.weight_transposed = not isinstance(module, nn.Linear)  # GPT-2's Conv1D stores (in, out)
        if add_lora:
            layer.add_lora(lora_rank, lora_alpha)
        plan.append((name, layer))
        decisions.append(PruneDecision(name, (out_features, in_features), True, f"{n}:{m}"))
    return plan


def _check_plan(model: nn.Module, decisions: list[PruneDecision], targets: list, names: list[str]) -> None:
    """Before anything is replaced: warn of ``targets`` patterns that match none of ``names`` (the
    linear layers and expert tensors), and fail when nothing would be pruned."""
    unmatched = [p if isinstance(p, str) else "re:" + p.pattern for p in targets if not any(_matches(x, [p]) for x in names)]
    if unmatched and any(d.pruned for d in decisions):
        # stacklevel 3: the warning points at prune_model's caller
        warnings.warn(f"prune_model: targets {unmatched} match no linear layer of {type(model).__name__}", UserWarning, stacklevel=3)
    if not any(d.pruned for d in decisions):
        raise ValueError(
            "prune_model found linear layers but pruned none of them:\n" + format_summary(decisions)
            + "\nadjust targets/skip or the sparsity"
        )


def _report(model: nn.Module, decisions: list[PruneDecision], verbose: bool) -> None:
    """Keep the decisions in ``model.slope_prune_summary``; log the summary table (and print it if ``verbose``)."""
    model.slope_prune_summary = decisions
    summary = format_summary(decisions)
    logger.info("slope.prune_model summary:\n%s", summary)
    if verbose:
        print(summary)


def _plan_experts(model: nn.Module, decisions: list[PruneDecision], targets, skip, experts: bool, n: int, m: int):
    """Decide for every fused MoE expert tensor (rows appended to ``decisions``); returns those to prune."""
    from slope.moe import find_expert_weights

    plan = []
    for e in find_expert_weights(model):
        explicit = bool(targets) and _matches(e.name, targets)
        if targets and not explicit:
            reason = "not in targets"
        elif _matches(e.name, skip):
            reason = "skip pattern"
        elif not experts:
            reason = "fused MoE experts; experts=True prunes them per expert in simulation"
        elif e.shape[2] % m:
            reason = f"in features not divisible by {m}"
            if explicit:
                raise ValueError(f"expert weight {e.name!r} {e.shape} is targeted but its input dimension is not divisible by M={m}")
        else:
            plan.append(e)
            decisions.append(PruneDecision(e.name, e.shape, True, f"{n}:{m} per expert (simulated: masked dense)"))
            continue
        decisions.append(PruneDecision(e.name, e.shape, False, reason))
    return plan


def check_backend_runs_here(backend: str) -> None:
    """A named backend must load, and, on a machine without CUDA, run on the CPU (cuSPARSELt and
    CUTLASS cannot): say so now rather than at the first forward."""
    cls = backend_class(backend)
    if torch.cuda.is_available():
        return  # device and dtype are checked when the layers run (the model may move to the GPU first)
    reason = cls.unavailable_reason(torch.device("cpu"), cls.dtypes[0])
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run on this machine (no CUDA GPU): {reason}; use backend='auto' or 'reference' here")


def _check_not_pruned(model: nn.Module, targets: list[str]) -> None:
    """``prune_model`` prunes a model once; later calls may only name layers that are still dense."""
    from slope.registry import sparse_modules

    pruned = [name for name, _ in sparse_modules(model)]
    again = [name for name in pruned if targets and _matches(name, targets)]
    if pruned and (not targets or again):
        example = again[0] if again else pruned[0]
        raise ValueError(
            f"{type(model).__name__} is already pruned ({len(pruned)} SLoPe layers, e.g. {example!r}); prune_model runs "
            "once per model: to change the sparsity, prune a fresh copy of the dense model (or slope.from_pretrained a saved one)"
        )


def format_summary(decisions: list[PruneDecision]) -> str:
    """Plain-text table of the prune decisions, with layer and weight counts."""
    width = max([len(d.name) for d in decisions] + [5])
    lines = [f"{'layer':<{width}}  {'shape':>17}  {'weights':>11}  action"]
    for d in decisions:
        action = f"pruned {d.reason}" if d.pruned else f"kept dense ({d.reason})"
        lines.append(f"{d.name:<{width}}  {'x'.join(map(str, d.shape)):>17}  {d.params:>11,}  {action}")
    linear = [d for d in decisions if len(d.shape) == 2]
    experts = [d for d in decisions if len(d.shape) == 3]
    line = f"{sum(d.pruned for d in linear)} of {len(linear)} linear layers pruned"
    if experts:
        line += f", {sum(d.pruned for d in experts)} of {len(experts)} fused MoE expert tensors pruned"
    total, pruned = sum(d.params for d in decisions), sum(d.params for d in decisions if d.pruned)
    line += f"; {pruned:,} of {total:,} weights ({100 * pruned / max(total, 1):.1f}%) are in pruned tensors"
    dense_experts = sum(d.params for d in experts if not d.pruned)
    if dense_experts:
        line += f", {dense_experts:,} in fused expert tensors kept dense"
    lines.append(line)
    return "\n".join(lines)


def densify(model: nn.Module) -> list[nn.Parameter]:
    """Replace, in place, every SLoPe layer of ``model`` by a dense ``nn.Linear`` computing the same function
    (by a transformers ``Conv1D`` for a layer that replaced one, ``weight_transposed``: GPT-2).

    The new ``weight (out, in)`` (a ``Conv1D``'s: ``(in, out)``) holds the layer's effective weight
    ``W⊙M`` (plus ``(α/r)·B (A⊙M_A)`` when adapters are attached; :func:`slope.lora.effective_weight`)
    in the dtype of ``values``, on its device, and is an ordinary trainable parameter: from then on every entry, pruned ones
    included, is trained by the dense optimizer (the final dense phase of ``slope train
    --dense-tail-fraction``). The bias stays the **same** ``Parameter`` object, so an optimizer
    that already holds it keeps its state. Call it between optimizer steps.

    Returns the new weight parameters, in module order (add them to the dense optimizer).
    """
    from slope.lora import effective_weight
    from slope.registry import sparse_modules

    layers = list(sparse_modules(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLoPe layers to densify; it is dense already (or was never pruned)")
    if layers[0][0] == "":
        raise ValueError("densify replaces SLoPe layers inside a model; a bare SparseLinear cannot replace itself (use nn.Linear with layer.dense_weight())")
    weights = []
    for name, layer in layers:
        with torch.no_grad():
            weight = effective_weight(layer)
        dense = _conv1d(layer, weight) if layer.weight_transposed else _linear(layer, weight)
        _set_submodule(model, name, dense)
        weights.append(dense.weight)
    return weights


def _linear(layer: SparseLinear, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight (out, in)`` and ``layer``'s bias (the same ``Parameter``)."""
    linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight)
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def _conv1d(layer: SparseLinear, weight: torch.Tensor) -> nn.Module:
    """A transformers ``Conv1D`` (GPT-2's, which ``layer`` replaced) holding ``weight (out, in)`` as its
    ``(in, out)`` weight and ``layer``'s bias (the same ``Parameter``): the model's module types and
    state dict are again those of plain transformers."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # no allocation or init of weights that are replaced at once
        conv = Conv1D(layer.out_features, layer.in_features)
    conv.weight = nn.Parameter(weight.t().contiguous())
    # Conv1D always has a bias, so the layer that replaced one has it too
    conv.bias = layer.bias
    return conv
