"""``save_pretrained`` of a pruned Hugging Face model: the folder plain ``transformers`` and slope both load.

:func:`slope.prune_model` replaces ``model.save_pretrained`` of a ``PreTrainedModel`` by a
:class:`SaveDenseForm` (an instance attribute; the class is untouched). So every Hugging Face save
path — ``model.save_pretrained(dir)``, ``push_to_hub``, and the ``Trainer``'s ``checkpoint-N``
folders (it calls ``save_pretrained(dir, state_dict=...)``) — writes:

- the weights in the dense form (:mod:`slope.serialization.dense_form`): every key a dense model
  of the config has (a SLoPe layer's ``weight`` holds ``W⊙M``, adapters merged), so
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads the dense-equivalent model with no missing
  key, plus slope's masks (and, with adapters, the sparse values and the adapters) as extra keys
  that ``transformers`` lists as unexpected and ignores;
- ``config.json`` with a ``slope_config`` entry (as quantized models carry a
  ``quantization_config``): the format version, the masks' home and, per SLoPe layer, its prune
  arguments and form (:func:`slope.io.slope_record`). :func:`slope.from_pretrained` rebuilds the
  sparse model from it, bit-exact.

The weights keep the model's own key layout (``save_original_format=False`` in transformers 5):
mixture-of-experts models stay in their fused layout, which transformers 5 loads as is.
"""
from __future__ import annotations

import inspect
import os

import torch.nn as nn

__all__ = ["SaveDenseForm", "install_save_hook", "save_dense_form", "SLOPE_CONFIG_KEY"]

#: The ``config.json`` entry that records a pruned model (see :func:`slope.io.slope_record`).
SLOPE_CONFIG_KEY = "slope_config"


def save_dense_form(model: nn.Module, save_directory: str | os.PathLike, *args, **kwargs):
    """``type(model).save_pretrained(model, save_directory, *args, **kwargs)`` writing the dense form
    and the ``slope_config`` entry (module docstring). A model without SLoPe layers (e.g. after
    :func:`slope.prune.densify`) is saved as the plain model it is, without the entry."""
    from slope.io import slope_record
    from slope.moe import expert_masks
    from slope.registry import sparse_modules
    from slope.serialization.dense_form import dense_form_state_dict

    save = type(model).save_pretrained
    params = inspect.signature(save).parameters
    bound = inspect.signature(save).bind(model, save_directory, *args, **kwargs)
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
    arguments.update(bound.arguments.get("kwargs", {}))
    config = model.config
    config.__dict__.pop(SLOPE_CONFIG_KEY, None)  # a loaded folder's record is stale: rebuilt below
    if not any(True for _ in sparse_modules(model)) and expert_masks(model) is None:
        return save(model, **arguments)
    arguments["state_dict"] = dense_form_state_dict(model, arguments.get("state_dict"))
    if "save_original_format" in params:
        arguments["save_original_format"] = False  # keep the model's key layout (slope's keys follow it)
    setattr(config, SLOPE_CONFIG_KEY, slope_record(model))
    try:
        return save(model, **arguments)
    finally:
        config.__dict__.pop(SLOPE_CONFIG_KEY, None)


class SaveDenseForm:
    """Bound ``save_pretrained`` of one pruned model: calls :func:`save_dense_form` (same arguments
    as ``PreTrainedModel.save_pretrained``). Survives ``copy.deepcopy`` and pickling with the model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, **kwargs):
        return save_dense_form(self.model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<slope save_pretrained (dense form + slope_config) of {type(self.model).__name__}>"


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the dense form (a no-op for models that are not
    Hugging Face ``PreTrainedModel``\\ s)."""
    import sys

    if "transformers" not in sys.modules:  # then the model cannot be a PreTrainedModel
        return
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and not isinstance(model.__dict__.get("save_pretrained"), SaveDenseForm):
        model.save_pretrained = SaveDenseForm(model)
