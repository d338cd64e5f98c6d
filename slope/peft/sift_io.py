"""Saving SIFT's trained increments alone, and adding them to a fresh copy of the base model.

A folder written by :func:`save_sift` holds

- ``sift_delta.safetensors``: per sparse parameter ``<name>.indices`` (``int64 (k,)``, flat
  positions) and ``<name>.values`` (``float32 (k,)``, the trained weight minus the base weight at
  those positions); per ``exception`` parameter its trained tensor ``<name>`` whole;
- ``sift_config.json``: SIFT's settings, and per sparse parameter its shape and a fingerprint of the
  base weight, so that :func:`load_sift` refuses a model that is not the delta's base.

:func:`load_sift` adds the increments and copies the ``exception`` parameters; ``sign=-1`` subtracts
the increments again (the sparse weights return to their base up to rounding; ``exception``
parameters keep their values, as the folder holds no base for them).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from slope.peft.delta import check_indices
from slope.peft.files import read_tensors, tensor_at
from slope.peft.model import FINGERPRINT_RTOL, fingerprint
from slope.serialization.jsonfile import read_json_object

__all__ = ["SIFT_CONFIG", "SIFT_WEIGHTS", "load_sift", "save_sift"]

SIFT_CONFIG = "sift_config.json"
SIFT_WEIGHTS = "sift_delta.safetensors"


@torch.no_grad()
def save_sift(sift, directory: str | os.PathLike) -> None:
    """Write ``sift``'s increments (pending ones applied first) and its ``exception`` parameters."""
    from safetensors.torch import save_file

    sift.apply_pending()
    tensors, base = {}, {}
    params = dict(sift.named_trainable_parameters())
    for name, p in params.items():
        sparse = sift.sparse_mapping.get(name)
        if sparse is None:
            tensors[name] = p.detach().cpu().contiguous()
            continue
        if sparse.flat_idx is None:
            raise ValueError(f"SIFT has not chosen the entries of {name} yet: train at least one step before saving")
        trained = p.detach().reshape(-1)[sparse.flat_idx].float()
        tensors[f"{name}.indices"] = sparse.flat_idx.cpu().contiguous()
        tensors[f"{name}.values"] = (trained - sparse.base_values.float()).cpu().contiguous()
        base[name] = {"shape": list(p.shape), "samples": sift.base_fingerprints[name]}
    config = {"sparse_rate": sift.sparse_rate, "sparse_module": sift.sparse_module, "exception": sift.exception,
              "base_model": base}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SIFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, SIFT_WEIGHTS), metadata={"format": "pt", "peft_type": "SIFT"})


def _check_base(model: nn.Module, recorded: dict, where) -> dict[str, nn.Parameter]:
    """The model's parameters named in ``recorded``; ``ValueError`` unless shapes and base values match."""
    params = dict(model.named_parameters())
    for name, record in recorded.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"{where}: these increments were trained on a base model with a parameter {name!r}, which this model lacks")
        if list(p.shape) != record["shape"]:
            raise ValueError(f"{where}: {name} has shape {list(p.shape)} here but {record['shape']} in the increments' base model: "
                             "load them onto the base model they were trained on")
        if not torch.allclose(torch.tensor(fingerprint(p)), torch.tensor(record["samples"]), rtol=FINGERPRINT_RTOL, atol=1e-6):
            raise ValueError(f"{where}: the weights of {name} differ from those of the base model the increments were trained on: "
                             "load them onto that base model (an increment only makes sense relative to its base)")
    return params


@torch.no_grad()
def load_sift(model: nn.Module, directory: str | os.PathLike, sign: int = 1) -> nn.Module:
    """Add the increments saved in ``directory`` to ``model`` (a fresh copy of their base) in place,
    and set its ``exception`` parameters to the trained ones; ``sign=-1`` subtracts the increments.

    Each entry is computed in float32 (``base + increment``) and rounded once to the weight's dtype,
    so a bf16 model gets back exactly the weights it trained. Everything is checked first: a bad
    folder is an error and leaves ``model`` unchanged.
    """
    config_path, weights_path = os.path.join(directory, SIFT_CONFIG), os.path.join(directory, SIFT_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {REMEDY}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 (add the increments) or -1 (remove them), got {sign!r}")
    config = read_json_object(config_path, lambda why: ValueError(f"{config_path} is corrupt ({why}); {REMEDY}"))
    recorded = config.get("base_model")
    if not isinstance(recorded, dict) or not all(isinstance(r, dict) and {"shape", "samples"} <= set(r) for r in recorded.values()):
        raise ValueError(f"{config_path} lacks the record of the increments' base model ('base_model'); {REMEDY}")
    tensors = read_tensors(weights_path, REMEDY)
    params = _check_base(model, recorded, directory) if sign == 1 else dict(model.named_parameters())
    increments = _checked_increments(params, recorded, tensors, weights_path)
    exceptions = _checked_exceptions(params, recorded, tensors, directory)
    for name, (indices, values) in increments.items():
        flat = params[name].data.view(-1)
        flat[indices] = (flat[indices].float() + sign * values).to(flat.dtype)
    if sign == 1:
        for name, value in exceptions.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
    return model


REMEDY = "pass a folder written by SIFT.save_pretrained"


def _checked_increments(params, recorded: dict, tensors, path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (indices int64 (k,), values float32 (k,))}`` on each parameter's device, checked."""
    out = {}
    for name in recorded:
        if name not in params:
            raise ValueError(f"{path}: the increments of {name} have no parameter of that name in this model")
        p = params[name]
        indices = tensor_at(tensors, f"{name}.indices", path, REMEDY, integer=True)
        values = tensor_at(tensors, f"{name}.values", path, REMEDY)
        check_indices(indices, tuple(p.shape), f"{path}: the indices of {name}")
        if values.shape != indices.shape:
            raise ValueError(f"{path}: {name} has {values.numel()} values for {indices.numel()} indices (corrupt file); {REMEDY}")
        out[name] = (indices.to(p.device, torch.long), values.to(p.device, torch.float32))
    return out


def _checked_exceptions(params, recorded: dict, tensors, where) -> dict[str, torch.Tensor]:
    """The saved ``exception`` parameters (every tensor that is not an increment), checked."""
    out = {}
    for name, value in tensors.items():
        if name.endswith((".indices", ".values")) and name.rsplit(".", 1)[0] in recorded:
            continue
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"{where}: the trained parameter {name} {tuple(value.shape)} has no match in this model")
        out[name] = value
    return out
