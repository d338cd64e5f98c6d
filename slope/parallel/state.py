"""Rank-count-independent model and dense-optimizer state (checkpoints written by N ranks load on M).

Format (the same for a single process, DDP, FSDP2 and DeepSpeed ZeRO-1/2):

- model: ``{name: tensor}`` with the names of the *unwrapped* model (no ``module.`` prefix) and
  full, unsharded CPU tensors — exactly ``model.state_dict()`` of a single-process run (SLoPe
  layers contribute ``values``, ``mask_bits``, ``mask_t_bits``, ``bias`` and adapters).
- dense optimizer: ``{"state": {name: {"step", "exp_avg", ...}}, "param_groups": [{..., "params":
  [name, ...]}]}`` with full tensors, i.e. ``torch.distributed.checkpoint``'s full optimizer state
  dict.
- the sparse optimizer (:class:`ADAMWSparse`) is replicated on every rank: its own
  ``state_dict()`` is already rank-independent.

All functions are collective under ``torch.distributed``: every rank must call them. The getters
return the full state on every rank (on the CPU); only rank 0 needs to write it. With
``rank0_only=True`` only rank 0 receives it (the others ``{}``), gathered straight into CPU memory,
so no rank holds a second whole copy of a sharded model on its device; on a CPU model rank 0's
tensors may then share storage with the model's: write them before training on. The loaders expect every rank
to pass the full state (e.g. each rank ``torch.load``s the same file).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from slope.parallel import deepspeed as ds
from slope.parallel.env import is_main_process
from slope.parallel.sharded_values import values_holder_of
from slope.parallel.wrap import unwrap
from slope.registry import sparse_modules

__all__ = [
    "full_model_state_dict",
    "load_full_model_state_dict",
    "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
    "to_index_keyed",
    "to_name_keyed",
]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _to_cpu(state):
    if torch.is_tensor(state):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def _copy_structure(state):
    """Copy nested dicts/lists (not the tensors), so callers' checkpoints are never modified."""
    if isinstance(state, dict):
        return {k: _copy_structure(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copy_structure(v) for v in state]
    return state


def _values_names(model: nn.Module):
    """The model's :class:`ShardedValues` (or ``None``) and the state-dict key of each of its
    layers' ``values`` (by ``id(layer)``)."""
    layers = dict(sparse_modules(unwrap(model)))
    holder = values_holder_of(list(layers.values()))
    return holder, {id(layer): f"{name}.values" for name, layer in layers.items()}


def full_model_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU state dict of a plain, DDP-wrapped, FSDP2-sharded model or a DeepSpeed engine
    (``rank0_only``: module docstring). Sharded SLoPe values are gathered too (collective)."""
    if ds.is_deepspeed_engine(model):
        return ds.deepspeed_full_model_state_dict(model)
    holder, names = _values_names(model)
    if rank0_only:
        state = get_model_state_dict(model, options=_FULL_ON_RANK0)  # CPU tensors on rank 0, {} elsewhere
    else:
        state = _to_cpu(get_model_state_dict(model, options=_FULL))
    if holder is not None:
        holder.complete_state(state, names, rank0_only)
    return _tie_aliases(model, state)


def _tie_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the names of one shared parameter (tied input / output embeddings) holding one
    tensor, as ``model.state_dict()`` does (the gathered copies are separate: checkpoints would store
    the weight twice). Changes ``state`` in place; returns it."""
    names: dict[int, list[str]] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for shared in names.values():
        for alias in shared[1:]:
            if shared[0] in state and alias in state:
                state[alias] = state[shared[0]]
    return state


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state from :func:`full_model_state_dict` (strict: names and shapes must match)."""
    holder, names = (None, None) if ds.is_deepspeed_engine(model) else _values_names(model)
    if holder is not None:  # each rank loads the values it owns
        state = holder.placeholders_for(state, names)
    inner = model.module if ds.is_deepspeed_engine(model) else model
    # An inference-only state has no M_t: recomputed below from the loaded W⊙M. Meanwhile an empty
    # M_t stands in (torch would fill the gap with the model's current one, which need not fit the
    # loaded M and would be refused as corrupt).
    lacking = [name for name, layer in sparse_modules(inner) if layer.state_lacks_mask_t(state, f"{name}.")]
    state = {**state, **{f"{name}.mask_t_bits": torch.zeros_like(state[f"{name}.mask_bits"]) for name in lacking}}
    if ds.is_deepspeed_engine(model):
        ds.deepspeed_load_full_model_state_dict(model, state)
    else:
        # (a copy: torch renames the keys of the dict it is given in place)
        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
    for name, layer in sparse_modules(inner):
        if name in lacking:  # the M_t of the loaded W⊙M (sharded values: the owner's, on every rank)
            holder.update_mask_t(layer) if holder is not None else layer.update_mask_t()
        layer.refresh()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[list[str]]:
    """Names of ``optimizer``'s parameters per group (for DeepSpeed: the engine's dense optimizer)."""
    if ds.is_deepspeed_engine(model):
        return ds.deepspeed_param_names(model)
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    missing = [p.shape for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer holds parameters that are not in the model (shapes {missing[:3]})")
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def to_index_keyed(state: dict) -> dict:
    """Name-keyed full optimizer state → ``optimizer.state_dict()``'s layout (parameters numbered
    in group order), i.e. what the same optimizer writes in a single process."""
    out, groups, index = {}, [], 0
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in state["state"]:
                out[index] = state["state"][name]
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": out, "param_groups": groups}


def to_name_keyed(state: dict, names: list[list[str]]) -> dict:
    """Inverse of :func:`to_index_keyed`, given the parameter names per group."""
    sizes = [len(group["params"]) for group in state["param_groups"]]
    if sizes != [len(group) for group in names]:
        raise ValueError(
            f"optimizer state has groups of {sizes} parameters but the optimizer has {[len(g) for g in names]}; "
            "the model or optimizer configuration changed"
        )
    flat = [name for group in names for name in group]
    return {
        "state": {flat[int(index)]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": list(group_names)} for group, group_names in zip(state["param_groups"], names)],
    }


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None, index_keys: bool = False,
                              rank0_only: bool = False) -> dict:
    """Full state of the dense optimizer (the engine's when ``model`` is a DeepSpeed engine), keyed
    by parameter name, or with ``index_keys=True`` numbered like ``optimizer.state_dict()`` of a
    single process (``rank0_only``: module docstring)."""
    if ds.is_deepspeed_engine(model):
        state = ds.deepspeed_full_optimizer_state_dict(model)
    elif rank0_only:
        state = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)
        if not is_main_process():
            return {}
    else:
        state = _to_cpu(get_optimizer_state_dict(model, optimizer, options=_FULL))
    return to_index_keyed(state) if index_keys else state


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict, strict: bool = True
) -> None:
    """Load a state from :func:`full_optimizer_state_dict` (either key style), written by any number
    of ranks. ``strict=False`` (DeepSpeed only) lets wholly new parameter groups start fresh."""
    if any(isinstance(p, int) for group in state["param_groups"] for p in group["params"]):
        state = to_name_keyed(state, _param_names(model, optimizer))
    if ds.is_deepspeed_engine(model):
        ds.deepspeed_load_full_optimizer_state_dict(model, state, strict=strict)
    else:
        set_optimizer_state_dict(model, optimizer, _copy_structure(state), options=StateDictOptions(full_state_dict=True))
