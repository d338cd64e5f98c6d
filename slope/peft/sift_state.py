"""What a SIFT model's ``state_dict`` holds, so that saving and resuming lose nothing.

SIFT (:mod:`slope.peft.sift`) keeps a pending increment per sparse weight (a ``(k,)`` parameter
the optimizer writes, added into the weight at the next forward) and the entries it trains
(``flat_idx``, chosen at the first backward). Hooks on the model's ``state_dict`` make every save
(``save_pretrained``, ``Trainer`` checkpoints, ``torch.save(model.state_dict())``) hold

- the weights with the pending increments added (the last step is never lost), and no
  ``<name>_sparse`` keys (the increments are 0 once added, so they carry nothing);
- per sparse weight whose entries are chosen, ``sift.<weight name>.indices`` (``int64 (k,)``) and
  ``sift.<weight name>.base_values`` (``(k,)``, the weight's dtype: those entries before training),
  so that loading the state into a model under a fresh ``SIFT`` (``Trainer`` resume) trains the
  same entries with the restored optimizer moments. Hugging Face ``from_pretrained`` of the plain
  model class lists these few keys as unexpected and ignores them.

Loading takes these keys out of the state before the model sees them, and a state without
``<name>_sparse`` keys is not reported as missing them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["STATE_PREFIX", "install_state_hooks"]

STATE_PREFIX = "sift."


def install_state_hooks(sift) -> list:
    """Register the state-dict hooks of ``sift`` (a :class:`slope.peft.SIFT`) on its model; the handles."""
    model: nn.Module = sift.model
    registered = {name.replace(".", "_") + "_sparse": name for name in sift.sparse_mapping}

    def before_save(module, prefix, keep_vars) -> None:  # noqa: ARG001
        sift.apply_pending()

    def after_save(module, state_dict, prefix, local_metadata) -> None:  # noqa: ARG001
        for key, name in registered.items():
            state_dict.pop(prefix + key, None)
            sparse = sift.sparse_mapping[name]
            if sparse.flat_idx is not None:
                state_dict[f"{prefix}{STATE_PREFIX}{name}.indices"] = sparse.flat_idx.detach().clone()
                state_dict[f"{prefix}{STATE_PREFIX}{name}.base_values"] = sparse.base_values.detach().clone()

    def before_load(module, state_dict, prefix, *args) -> None:  # noqa: ARG001
        params = dict(model.named_parameters())
        for name, sparse in sift.sparse_mapping.items():
            indices = state_dict.pop(f"{prefix}{STATE_PREFIX}{name}.indices", None)
            base = state_dict.pop(f"{prefix}{STATE_PREFIX}{name}.base_values", None)
            if indices is None or base is None:
                continue
            sift.set_entries(name, params[name], indices)
            with torch.no_grad():
                sparse.base_values = base.to(params[name].device, params[name].dtype)
                sparse.zero_()  # the state's weights already hold every increment

    def after_load(module, incompatible) -> None:  # noqa: ARG001
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in registered]

    return [
        model.register_state_dict_pre_hook(before_save),
        model.register_state_dict_post_hook(after_save),
        model.register_load_state_dict_pre_hook(before_load),
        model.register_load_state_dict_post_hook(after_load),
    ]
