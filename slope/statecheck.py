"""Validate a state dict against the model or optimizer it is about to be loaded into, before a
single tensor is written: a mismatch (another sparsity, another model size, another dtype) is one
line naming the layer, never a silent wrong-shaped load, a multi-line size-mismatch dump, or
memory corruption at the next optimizer step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["StateDictError", "check_model_state", "check_optimizer_state"]


class StateDictError(ValueError):
    """A state dict that does not fit its target; the message names the first mismatches."""


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _fail(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StateDictError(f"{what}: " + "; ".join(problems[:3]) + more)


def check_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`StateDictError` unless ``state`` has exactly ``model.state_dict()``'s keys,
    shapes and dtypes, and every SLoPe layer's masks keep exactly its N of every M."""
    from slope.registry import sparse_modules

    expected = model.state_dict()
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise StateDictError(f"expected a mapping of names to tensors, got {type(state).__name__}")
    state, problems = dict(state), []
    layers = [(f"{name}." if name else "", layer) for name, layer in sparse_modules(model)]
    for prefix, layer in layers:  # whole shapes where another rank holds the values (sharded)
        if prefix + "values" in expected:
            expected[prefix + "values"] = torch.empty(layer.values_shape, dtype=layer.values.dtype, device="meta")
    for prefix, layer in layers:  # what SparseLinear's loader does first: legacy bool masks, no M_t when frozen
        layer._upgrade_legacy_masks(state, prefix, problems)
        if "mask_t_bits" not in layer._buffers:
            state.pop(prefix + "mask_t_bits", None)
    for prefix, layer in layers:  # first: they say which sparsity the state is from
        problems += layer.state_errors(state, prefix)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems += [f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}"] if missing else []
    problems += [f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"] if unexpected else []
    for key in sorted(set(expected) & set(state)):
        ref, value = expected[key], state[key]
        if _shape(ref) != _shape(value):
            problems.append(f"{key} is {_shape(value)}, the model's is {_shape(ref)}")
        elif ref.dtype != value.dtype:
            problems.append(f"{key} is {value.dtype}, the model's is {ref.dtype}")
    _fail(problems, "the state dict does not fit the model (another sparsity, size or dtype?)")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping, names: Sequence[str] | None = None,
                          shapes: Sequence[tuple[int, ...]] | None = None) -> None:
    """Raise :class:`StateDictError` unless ``state_dict`` (``optimizer.state_dict()`` of another
    run) has ``optimizer``'s groups and parameter counts, and every per-parameter tensor (moments)
    has its parameter's shape and a floating dtype. ``names``: parameter names in group order,
    for the message; ``shapes``: the parameters' whole shapes, where some are placeholders of
    sharded values (default: their shapes)."""
    groups, state = (state_dict.get("param_groups"), state_dict.get("state")) if isinstance(state_dict, Mapping) else (None, None)
    if not isinstance(groups, list) or not isinstance(state, Mapping) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise StateDictError("not an optimizer state dict (expected 'state' and 'param_groups' with 'params' lists)")
    sizes = [len(g["params"]) for g in groups]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != own:
        raise StateDictError(f"the state dict has parameter groups of sizes {sizes}, the optimizer {own}: it is from another model")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in groups for i in g["params"]]
    problems = []
    shapes = [_shape(p) for p in params] if shapes is None else [tuple(shape) for shape in shapes]
    for index, (saved_id, shape) in enumerate(zip(saved_ids, shapes)):
        entry = state.get(saved_id, state.get(str(saved_id), {}))
        name = names[index] if names is not None else f"parameter {index}"
        if not isinstance(entry, Mapping):
            problems.append(f"{name}: state is {type(entry).__name__}, expected a mapping")
            continue
        for key, value in entry.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue  # step counters and other scalars
            if _shape(value) != shape:
                problems.append(f"{name}: {key} is {_shape(value)}, the parameter is {shape}")
            elif not value.is_floating_point():
                problems.append(f"{name}: {key} is {value.dtype}, expected a floating dtype")
    _fail(problems, "the optimizer state does not fit (from another sparsity or model?)")
