"""Saving and loading pruned Hugging Face models (safetensors), and exporting dense checkpoints.

A pruned model's folder (:func:`save_pretrained`, which is what ``model.save_pretrained`` and the
``Trainer`` write too once :func:`slope.prune_model` ran; :mod:`slope.serialization.hf_save`) holds

- ``config.json``: the model's Hugging Face config with a ``slope_config`` entry
  (:func:`slope_record`): the model class, where the masks live and, per SLoPe layer, the prune
  arguments (sparsity, compress, backend, tiling, mask_type, double_pruning, dtype, adapter
  rank/alpha) and its form (training, merged, inference-only);
- ``model.safetensors`` (or shards and an index): the state dict in the dense form
  (:mod:`slope.serialization.dense_form`): ``<layer>.weight = W⊙M`` (adapters merged) under the
  keys of the dense model, and slope's packed masks (``mask_bits`` / ``mask_t_bits``; with adapters
  also ``values``, ``lora_A``, ``lora_B``, ``lora_A_mask``) beside them.

Plain ``transformers`` loads it as the dense-equivalent model (no missing key; slope's entries are
listed as unexpected and ignored). :func:`from_pretrained` rebuilds the architecture from
``config.json``, prunes the same layers with the same arguments and loads the tensors: the result
computes bit-identical outputs. It also reads the older slope format (``slope_config.json`` beside
the state dict of slope's own keys). :func:`export_dense` writes an ordinary Hugging Face
checkpoint (``W⊙M`` with the adapters merged, ``W⊙M + (α/r)·B(A⊙M_A)``) without slope's entries.
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict

import torch
import torch.nn as nn

from slope.layer import SparseLinear
from slope.registry import sparse_modules
from slope.serialization.hf_save import install_save_hook
from slope.serialization.jsonfile import read_json_object

__all__ = ["save_pretrained", "from_pretrained", "export_dense", "plain_model_class", "save_state_pretrained", "slope_record",
           "SLOPE_CONFIG_NAME", "WEIGHTS_NAME"]

SLOPE_CONFIG_NAME = "slope_config.json"  # the record of version-1 folders
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_FORMAT = "slope-pretrained"
_VERSION = 2  # 1: slope_config.json + slope's own state-dict keys; 2: config.json's slope_config + the dense form
_LAYER_KEYS = ("sparsity", "compress", "backend", "tiling", "mask_type", "double_pruning", "dtype", "lora_rank",
               "lora_alpha", "merged", "inference_only")


def _check_hf_model(model: nn.Module, what: str) -> list[tuple[str, SparseLinear]]:
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_json_string"):
        raise TypeError(f"{what} needs a Hugging Face model (a PreTrainedModel with .config), got {type(model).__name__}")
    from slope.moe import expert_masks

    layers = list(sparse_modules(model))
    if not layers and expert_masks(model) is None:
        raise ValueError(f"{type(model).__name__} has no SLoPe layers; call slope.prune_model(model) first")
    return layers


def _layer_record(layer: SparseLinear) -> dict:
    from slope.lora import MergedSparseLinear

    merged = isinstance(layer, MergedSparseLinear)
    return {
        "sparsity": f"{layer.n}:{layer.m}",
        "compress": layer.compress,
        "backend": layer.backend_name,
        "tiling": layer.tiling,
        "mask_type": layer.mask_type,
        "double_pruning": layer.double_pruning,
        "dtype": str(layer.values.dtype).removeprefix("torch."),
        "lora_rank": layer.lora_rank,
        "lora_alpha": layer.lora_alpha if layer.lora_rank else None,
        "merged": merged,
        "inference_only": merged and layer.inference_only,
        "lora_fold": layer.lora_fold if merged and layer.lora_rank else None,  # (optional: folders before it had none)
    }


def _derived_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtypes of the floating non-persistent buffers (e.g. rotary ``inv_freq``): they are rebuilt
    from the config, in the dtype a fresh model gives them, unless recast after loading."""
    persistent = model.state_dict().keys()
    return {name: str(buf.dtype).removeprefix("torch.") for name, buf in model.named_buffers()
            if name not in persistent and buf.is_floating_point()}


def _set_dtype(model: nn.Module, key: str, dtype: torch.dtype) -> None:
    """Cast the parameter or buffer ``key`` of ``model`` to ``dtype`` in place (ties kept)."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr].data = module._parameters[attr].data.to(dtype)
    elif module._buffers.get(attr) is not None:
        module._buffers[attr] = module._buffers[attr].to(dtype)


def slope_record(model: nn.Module) -> dict:
    """The ``slope_config`` entry of a pruned model's ``config.json`` (module docstring)."""
    from slope.serialization.dense_form import DENSE_FORM_EXTRAS

    layers = _check_hf_model(model, "save_pretrained")
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "architecture": type(model).__name__,
        "weights": "dense-form",  # <layer>.weight = W⊙M (adapters merged), slope's entries beside it:
        "masks": {"keys": ["<layer>.mask_bits", "<layer>.mask_t_bits"], "packing": "slope.masks.pack_mask"},
        "extra_keys": list(DENSE_FORM_EXTRAS),
        "layers": {name: _layer_record(layer) for name, layer in layers},
        "experts": _experts_record(model),
        "buffer_dtypes": _derived_buffer_dtypes(model),
    }


def _experts_record(model: nn.Module) -> dict:
    """``{name: {"sparsity": "N:M"}}`` of the fused MoE expert tensors pruned in simulation (:mod:`slope.moe`)."""
    from slope.moe import expert_masks

    masked = expert_masks(model)
    return {} if masked is None else {name: {"sparsity": f"{n}:{m}"} for name, (n, m) in masked.structure.items()}


def _restore_experts(model: nn.Module, experts: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Prune ``model``'s fused expert tensors with the masks stored beside them (popped from
    ``tensors``): one :func:`slope.moe.prune_experts` call per sparsity, so the masks are wrapped
    and applied once, not once more for every further tensor."""
    from slope.masks import parse_sparsity, unpack_mask
    from slope.moe import find_expert_weights, prune_experts

    found = {e.name: e for e in find_expert_weights(model)}
    groups: dict[tuple[int, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for name, rec in experts.items():
        bits = tensors.pop(name + ".mask_bits", None)
        if name not in found or bits is None:
            raise ValueError(f"{path} does not match config.json: the pruned expert weight {name!r} or its mask_bits is missing")
        groups[parse_sparsity(rec["sparsity"])][name] = unpack_mask(bits, model.get_parameter(name).shape)
    for (n, m), masks in groups.items():
        prune_experts(model, [found[name] for name in masks], n, m, masks=masks)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """Save a pruned Hugging Face ``model`` (adapters, merged or frozen forms included) to a directory.

    The same folder as ``model.save_pretrained(save_directory, **kwargs)`` writes for a pruned model
    (module docstring; ``kwargs`` go to it, e.g. ``max_shard_size``): :func:`from_pretrained`
    restores the sparse model exactly, ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    the dense-equivalent one. Creates the directory if needed.
    """
    from slope.serialization.hf_save import save_dense_form

    _check_hf_model(model, "save_pretrained")
    save_dense_form(model, save_directory, **kwargs)


def _checked_record(record, where: str, version: int) -> dict:
    if not isinstance(record, dict) or record.get("format") != _FORMAT or not isinstance(record.get("layers"), dict):
        raise ValueError(f"{where} is not a slope checkpoint config (expected format {_FORMAT!r} with a 'layers' table)")
    if record.get("version") != version:
        raise ValueError(f"{where} has version {record.get('version')!r}; this slope reads version {version} there")
    for name, rec in record["layers"].items():
        absent = [key for key in _LAYER_KEYS if not isinstance(rec, dict) or key not in rec]
        if absent:
            raise ValueError(f"{where}: the entry of layer {name!r} lacks {absent}; re-save the model with slope.save_pretrained")
    return record


def _read_json(path: str) -> dict:
    return read_json_object(path, lambda why: ValueError(f"{path} is corrupt ({why}); re-save the model with slope.save_pretrained"))


def _read_slope_config(directory: str) -> tuple[dict, int]:
    """``(record, version)`` of a pruned model's folder; a folder of another kind is an error that
    says what it is and how to load it (:mod:`slope.serialization.folders`)."""
    from slope.serialization.folders import describe_folder, folder_kind

    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory!r} is not a directory; pass the folder written by model.save_pretrained of a pruned model "
            "(or slope.save_pretrained / slope export)"
        )
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        if "slope_config" in config:
            return _checked_record(config["slope_config"], f"{config_path} (its slope_config)", _VERSION), _VERSION
    path = os.path.join(directory, SLOPE_CONFIG_NAME)
    if os.path.isfile(path):
        return _checked_record(_read_json(path), path, 1), 1
    kind = folder_kind(directory)
    if kind == "unknown":
        raise FileNotFoundError(f"{config_path} is missing; {describe_folder(directory, kind)}")
    raise ValueError(f"not a pruned model's folder: {describe_folder(directory, kind)}")


def _model_class(record: dict, model_class):
    if model_class is not None:
        return model_class
    import transformers

    name = record.get("architecture")
    cls = getattr(transformers, str(name), None)
    if cls is None:
        raise ValueError(f"the checkpoint's model class {name!r} is not in transformers; pass model_class= to from_pretrained")
    return cls


def _load_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; the slope checkpoint is incomplete (re-save it)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); re-save the model with slope.save_pretrained") from e


def _load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory``'s weights: ``model.safetensors``, or the shards its index names."""
    index = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(index):
        return _load_file(os.path.join(directory, WEIGHTS_NAME))
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map; re-save the model with slope.save_pretrained")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_load_file(os.path.join(directory, shard)))
    return tensors


def _check_not_resaved(directory: str, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A folder whose ``config.json`` keeps slope's record but whose weights hold none of the recorded
    layers' masks was loaded into plain ``transformers`` and saved again: it is a dense model now (the
    masks ``M`` / ``M_t`` and any adapters cannot be recovered from its weights). One-line ``ValueError``."""
    pruned = [*record["layers"], *record.get("experts", {})]
    if not pruned or any(f"{name}.mask_bits" in tensors for name in pruned):
        return
    raise ValueError(
        f"{directory} is a pruned model's folder re-saved by plain transformers: its config.json keeps slope's record of "
        f"{len(pruned)} pruned layers, but its weights are dense, without slope's masks ({pruned[0]}.mask_bits and the "
        "others are gone), so it is a dense model now; load it with transformers.AutoModelForCausalLM.from_pretrained"
        f"({directory!r}) and prune it again with slope.prune_model, or load the folder it was re-saved from"
    )


def _native_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Turn the SLoPe layers' dense-form entries of ``tensors`` into their own (in place)."""
    from slope.serialization.dense_form import native_entries

    errors: list[str] = []
    for name, layer in sparse_modules(model):
        native_entries(layer, tensors, f"{name}.", errors)
    if errors:
        raise ValueError(f"{path} does not match config.json (its slope_config): {'; '.join(errors[:3])}")


def _rebuild(model: nn.Module, layers: dict, backend: str | None) -> None:
    """Prune ``model`` like the saved one: one ``prune_model`` call per group of equal arguments."""
    from slope.lora import freeze_for_inference, merge_lora
    from slope.prune import prune_model

    groups = defaultdict(list)
    for name, rec in layers.items():
        if backend is not None and rec["compress"]:
            rec = {**rec, "backend": backend}
        groups[tuple(rec[k] for k in _LAYER_KEYS[:9])].append(name)
    for (sparsity, compress, backend, tiling, mask_type, double_pruning, dtype, rank, alpha), names in groups.items():
        for name in names:
            try:
                model.get_submodule(name).to(getattr(torch, dtype))
            except AttributeError as e:
                raise ValueError(f"the checkpoint's SLoPe layer {name!r} does not exist in the model built from config.json") from e
        prune_model(model, compress=compress, tiling=tiling, add_lora=bool(rank), lora_rank=rank, backend=backend,
                    sparsity=sparsity, targets=names, mask_type=mask_type, double_pruning=double_pruning,
                    lora_alpha=alpha, verbose=False)
    if any(rec["inference_only"] for rec in layers.values()):
        freeze_for_inference(model)
    elif any(rec["merged"] for rec in layers.values()):
        merge_lora(model)
    for name, rec in layers.items():  # the fold each merged layer was saved with (set_lora_fold), not auto's choice
        fold = rec.get("lora_fold")
        if fold is not None:
            if fold not in ("stacked", "extended"):
                raise ValueError(f"config.json's slope_config gives layer {name!r} lora_fold {fold!r}; expected 'stacked' or "
                                 "'extended' (the folder is corrupt: re-save it)")
            model.get_submodule(name).use_fold(fold)


def _match_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Check names/shapes of ``tensors`` against ``model`` and give model tensors the file's dtypes."""
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    stored_ptrs = {expected[k].data_ptr() for k in tensors if k in expected}
    missing = sorted(k for k in set(expected) - set(tensors) if expected[k].data_ptr() not in stored_ptrs)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model built from config.json/slope_config.json: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'…' if len(unexpected) > 5 else ''}"
        )
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in tensors.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{path} does not match config.json (shape mismatch: {'; '.join(bad[:5])})")
    for key, value in tensors.items():
        if value.dtype != expected[key].dtype:
            _set_dtype(model, key, value.dtype)


def from_pretrained(
    load_directory: str | os.PathLike,
    model_class=None,
    device: str | torch.device | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Load a pruned model's folder (:func:`save_pretrained`, ``model.save_pretrained``, a ``Trainer``
    ``checkpoint-N``, ``slope export --form sparse|merged``) as the sparse model (exact: same
    tensors, same outputs). A folder of another kind is an error saying how to load it.

    Args:
        model_class: the model class to build (default: the saved class name, from ``transformers``).
        device: move the loaded model there (default: CPU).
        backend: sparse backend for the compressed layers instead of the saved one (e.g. ``"auto"``
            to run a checkpoint saved with ``backend="cusparselt"`` on a CPU).

    Returns the model in ``eval()`` mode, like ``transformers``' ``from_pretrained``. Errors name
    the missing or corrupt file, or the mismatch between the files.
    """
    from transformers import AutoConfig

    directory = os.fspath(load_directory)
    record, version = _read_slope_config(directory)
    cls = _model_class(record, model_class)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{os.path.join(directory, 'config.json')} is missing; the slope checkpoint is incomplete")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the Hugging Face config in {directory!r}: {e}") from e
    config.__dict__.pop("slope_config", None)  # rebuilt from the model whenever it is saved again
    tensors = _load_tensors(directory)
    if version >= 2:
        _check_not_resaved(directory, record, tensors)
    dtypes = {rec["dtype"] for rec in record["layers"].values()}
    dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else None
    model = cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    _rebuild(model, record["layers"], backend)
    install_save_hook(model)  # also when only MoE experts are pruned (no prune_model call above)
    for name, _ in sparse_modules(model):  # the 2:4 metadata layers stored before (derived from M)
        tensors.pop(f"{name}.meta", None)
    path = os.path.join(directory, WEIGHTS_NAME)
    if version >= 2:
        _native_tensors(model, tensors, path)
        _restore_experts(model, record.get("experts", {}), tensors, path)
    _match_tensors(model, tensors, path)
    buffers = dict(model.named_buffers())
    for name, dtype in record.get("buffer_dtypes", {}).items():
        if name in buffers:
            _set_dtype(model, name, getattr(torch, dtype))
    model.load_state_dict(tensors, strict=False)  # strictness (aliases aside) checked by _match_tensors
    if device is not None:
        model.to(device)
    return model.eval()


def plain_model_class(model: nn.Module) -> type:
    """The class of ``model`` itself: FSDP2's ``fully_shard`` wraps it in a generated subclass
    (``FSDP<Name>``), which must not name a saved architecture."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _fresh_model(model: nn.Module) -> nn.Module:
    """A new model of :func:`plain_model_class` built from ``model.config``, on the meta device."""
    with torch.device("meta"):
        return plain_model_class(model)(copy.deepcopy(model.config))


def _save_fresh(fresh: nn.Module, state: dict[str, torch.Tensor], save_directory, what: str) -> None:
    name = type(fresh).__name__
    fresh.to_empty(device="cpu")
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{what}: {name}'s state does not match a fresh {name} built from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was the model changed after pruning?"
        )
    fresh.save_pretrained(save_directory)


def save_state_pretrained(model: nn.Module, state: dict[str, torch.Tensor], save_directory: str | os.PathLike) -> None:
    """Write ``state`` (plain Hugging Face keys, whole CPU tensors) as ``model``'s architecture
    would save it: a fresh model of :func:`plain_model_class` built from ``model.config`` holds
    it and ``save_pretrained`` writes it (for a sharded model, whose own parameters are shards)."""
    _save_fresh(_fresh_model(model), state, save_directory, "save_state_pretrained")


def export_dense(model: nn.Module, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` as an ordinary Hugging Face checkpoint that needs no slope to load.

    Every SLoPe layer becomes the module it replaced (``nn.Linear``, or GPT-2's ``Conv1D`` with its
    ``(in, out)`` weight) holding the dense-equivalent weight ``W⊙M`` plus, with adapters,
    ``(α/r)·B (A⊙M_A)`` (computed in fp32, stored in the layer's dtype). Load it with the matching
    Auto class, e.g. ``AutoModelForCausalLM.from_pretrained(save_directory)``.
    ``state_dict``: for an FSDP2-sharded model, its full state
    (:func:`slope.parallel.full_model_state_dict`), read instead of its sharded parameters.
    """
    from slope.lora import effective_weight

    layers = dict(_check_hf_model(model, "export_dense"))
    source = model.state_dict() if state_dict is None else state_dict
    state = {}
    for key, value in source.items():
        module_name = key.rpartition(".")[0]
        if module_name not in layers:
            state[key] = value.detach().cpu()
    dense = _fresh_model(model)
    for name, layer in layers.items():
        weight = effective_weight(layer, state_dict, name + ".").cpu()  # (from the full state when given)
        if type(dense.get_submodule(name)).__name__ == "Conv1D":  # GPT-2's Conv1D stores (in, out)
            weight = weight.t()
        state[name + ".weight"] = weight.contiguous()
        if layer.bias is not None:
            state[name + ".bias"] = source[name + ".bias"].detach().cpu()
    _save_fresh(dense, state, save_directory, "export_dense")
