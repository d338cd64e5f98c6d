"""peft's LoRA on a pruned model: SLoPe layers as ``LoraConfig`` targets.

peft wraps the layer types it knows (``nn.Linear``, ``Conv1D``, ...) and refuses a
:class:`~slope.layer.SparseLinear` ("Target module ... is not supported") unless the config maps
that type to a LoRA layer class (``LoraConfig._register_custom_module``). :func:`sparse_lora_config`
adds the mapping, and :func:`slope.peft.get_peft_model` adds it to any ``LoraConfig`` it is given,
so ``from slope.peft import get_peft_model`` is the one change a peft script needs::

    prune_model(model)                                          # 2:4 layers
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    ...train (peft freezes the sparse weights; adapters train in the usual way)...
    model.save_pretrained("adapter")
    model = load_peft_model(prune_model(fresh_model), "adapter")   # peft's from_pretrained + the mapping

A wrapped layer computes ``y = x(W⊙M)ᵀ + b + s·(x Aᵀ)Bᵀ``: the 2:4 layer's own forward (its sparse
kernels; the input gradient through the double-pruned ``(W⊙M⊙M_t)ᵀ`` as in SLoPe training) plus
peft's dense adapter. Merging is refused: ``W⊙M + s·BA`` is dense, so ``merge`` /
``merge_and_unload`` would silently give up the 2:4 structure. Keep the adapters unmerged for
inference, or ``unload()`` them; for a merged sparse+LoRA inference form, train SLoPe's own
adapters (``prune_model(..., add_lora=True)``) and call :func:`slope.merge_lora`.

This module imports peft (an optional dependency); :mod:`slope.peft` imports it only when a peft
config or one of its functions is used.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from slope.layer import SparseLinear

__all__ = ["SparseLoraLinear", "SparseLoraModel", "is_lora_config", "linear_layer_names", "load_peft_model",
           "sparse_lora_config", "sparse_peft_model"]

#: peft's ``init_lora_weights`` that write the base layer's weight (prefixes, lower case).
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

MERGE_REFUSED = (
    "merging a LoRA adapter into the 2:4 sparse layer {name} would make its weight dense (W⊙M + s·BA); keep the "
    "adapters unmerged for inference, or unload() them; for merged sparse+LoRA inference train SLoPe's adapters "
    "(prune_model(..., add_lora=True)) and call slope.merge_lora"
)

#: set on a SLoPe layer that :func:`sparse_peft_model` froze, so that ``unload()`` unfreezes it (and no other)
FROZEN_BY_PEFT = "_frozen_by_peft"


def is_lora_config(config) -> bool:
    """True for a peft ``LoraConfig``."""
    return isinstance(config, LoraConfig)


def sparse_lora_config(config, model: nn.Module | None = None):
    """``config`` (a peft ``LoraConfig``) with SLoPe layers mapped to :class:`SparseLoraLinear`, so
    peft wraps them like ``nn.Linear`` targets; returns the same object. With ``model``,
    ``target_modules="all-linear"`` becomes the names of its linear layers, SLoPe layers included
    (peft's own expansion takes ``nn.Linear`` / ``Conv1D`` only and would skip every pruned layer),
    and a SLoPe layer in ``modules_to_save`` is refused (its trainable copy's weights would silently
    stay as they were), as are ``use_dora`` and the inits of :data:`BASE_REWRITING_INITS`."""
    if not is_lora_config(config):
        raise TypeError(f"sparse_lora_config takes a peft LoraConfig, got {type(config).__name__}")
    if getattr(config, "use_dora", False):
        raise ValueError("use_dora=True is not supported on 2:4 SLoPe layers (DoRA rescales the dense merged weight); use plain LoRA")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weight as W - s·BA (dense), which a 2:4 SLoPe layer cannot hold: "
            "peft's write would be dropped and the adapters would change the model; use the default init (B = 0), "
            "'gaussian', 'orthogonal' or 'eva'"
        )
    if not hasattr(config, "_register_custom_module"):
        raise ImportError("LoRA on SLoPe layers needs peft >= 0.12 (custom LoRA layers); upgrade peft")
    targets = config.target_modules
    saved = [name for name, module in (model.named_modules() if model is not None else ()) if isinstance(module, SparseLinear)
             and any(name.endswith(key) for key in config.modules_to_save or ())]  # (peft's match)
    if saved:
        raise ValueError(
            f"modules_to_save {config.modules_to_save!r} includes the 2:4 SLoPe layer {saved[0]}, whose kept weights a dense "
            "optimizer never updates (they train with slope.optimizers.ADAMWSparse); target it with LoRA instead, or leave it out"
        )
    if model is not None and isinstance(targets, str) and targets.lower() == "all-linear":
        config.target_modules = linear_layer_names(model)
    config._register_custom_module({SparseLinear: SparseLoraLinear})
    return config


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of ``model``'s linear layers (``nn.Linear``, SLoPe layers, transformers' ``Conv1D``)
    but its output layer, as peft's ``"all-linear"`` means (``model`` may be a peft model: a layer peft
    wrapped counts as the wrapper, never its base layer or adapters, as in peft's own expansion)."""
    kinds: tuple[type, ...] = (nn.Linear, SparseLinear)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:
        pass
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {f"{name}.{inner}" for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)
               for inner, _ in module.named_modules() if inner}
    return [name for name, module in model.named_modules()
            if name and name not in wrapped and module is not output
            and (isinstance(module, kinds) or isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__)]


def load_peft_model(model: nn.Module, model_id: str | Path, **kwargs):
    """``peft.PeftModel.from_pretrained(model, model_id, **kwargs)`` for a pruned ``model``: a LoRA
    config read from ``model_id`` gets the SLoPe mapping first (peft does not save it)."""
    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(str(model_id), **kwargs)  # (subfolder, revision, ... as peft's)
    if is_lora_config(config):
        sparse_lora_config(config, model)
    return sparse_peft_model(PeftModel.from_pretrained(model, str(model_id), config=config, **kwargs))


def sparse_peft_model(peft_model):
    """``peft_model`` (from ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` with
    :func:`sparse_lora_config`) with its SLoPe layers frozen as peft froze the rest of the base model:
    ``sparse_requires_grad=False``, so a backward computes no weight gradient ``dyᵀx`` for them (their
    ``values`` never require grad, so peft's freezing does not reach them); ``unload()`` makes them
    trainable again, and later adapters (``add_adapter``, ``load_adapter``) get the SLoPe mapping too.
    Returns the same object."""
    tuner = peft_model.base_model
    if type(tuner) is LoraModel:  # (swapped in place, as slope.lora swaps layers; a mixed model keeps its class)
        tuner.__class__ = SparseLoraModel
    _freeze_sparse_layers(peft_model)
    return peft_model


def _freeze_sparse_layers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.sparse_requires_grad:
            module.sparse_requires_grad = False
            setattr(module, FROZEN_BY_PEFT, True)


def _unfreeze_sparse_layers(model: nn.Module) -> None:
    """Undo :func:`_freeze_sparse_layers`: layers frozen before it stay frozen."""
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.__dict__.pop(FROZEN_BY_PEFT, False):
            module.sparse_requires_grad = True


class SparseLoraModel(LoraModel):
    """peft's ``LoraModel`` over a pruned model (:func:`sparse_peft_model`): later adapters
    (``add_adapter``, ``load_adapter``) get the SLoPe mapping and ``"all-linear"`` expansion too,
    and ``unload()`` makes the SLoPe layers it froze trainable again."""

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        if is_lora_config(config):  # (peft's own refuses SLoPe targets and skips them in "all-linear")
            sparse_lora_config(config, model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        _freeze_sparse_layers(model)

    def unload(self, *args, **kwargs):
        model = super().unload(*args, **kwargs)
        _unfreeze_sparse_layers(model)
        return model


class SparseLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a 2:4 SLoPe layer (module docstring), merging refused."""

    def __init__(self, base_layer, adapter_name, *args, **kwargs):
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        from slope.lora import MergedSparseLinear

        if isinstance(base, MergedSparseLinear):
            raise ValueError(
                f"{base.layer_name or 'layer'} is in slope's merged inference form (no backward); add peft "
                "adapters to the unmerged pruned model"
            )
        super().__init__(base_layer, adapter_name, *args, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # (peft warns "unsupported layer type" otherwise)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(MERGE_REFUSED.format(name=self.get_base_layer().layer_name or "SparseLinear"))
