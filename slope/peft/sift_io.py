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
    and set its ``exception`` parameters to the trained ones; ``sign=-1`` subtracts the increments."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, SIFT_CONFIG), os.path.join(directory, SIFT_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass a folder written by SIFT.save_pretrained")
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 (add the increments) or -1 (remove them), got {sign!r}")
    recorded = read_json_object(config_path, lambda why: ValueError(
        f"{config_path} is corrupt ({why}); pass a folder written by SIFT.save_pretrained"))["base_model"]
    tensors = load_file(weights_path)
    if sign == 1:
        params = _check_base(model, recorded, directory)
    else:
        params = dict(model.named_parameters())
    for name in recorded:
        p, indices, values = params[name], tensors[f"{name}.indices"], tensors[f"{name}.values"]
        p.data.view(-1).index_add_(0, indices.to(p.device), (sign * values).to(p.device, p.dtype))
    for name, value in tensors.items():
        if name.endswith((".indices", ".values")) and name.rsplit(".", 1)[0] in recorded:
            continue
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"{directory}: the trained parameter {name} {tuple(value.shape)} has no match in this model")
        if sign == 1:
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
    return model
