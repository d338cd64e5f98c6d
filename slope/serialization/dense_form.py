"""The dense-equivalent ("Hugging Face") form of a pruned model's state dict.

A SLoPe layer's own state dict holds the kept weights compressed (``values (out, in·N/M)``) and
packed masks. Plain ``transformers`` knows none of that: it
wants ``<layer>.weight``. The dense form of a SLoPe layer ``L`` is:

- ``L.weight``: the weight the layer computes with, ``W⊙M`` plus ``(α/r)·B(A⊙M_A)`` with adapters
  (:func:`slope.lora.effective_weight`'s math), in ``values``' dtype, in the orientation of the
  module it replaced (``(out, in)``; GPT-2's ``Conv1D``: ``(in, out)``), and ``L.bias``;
- slope's extra entries, which plain ``transformers`` reports as unexpected and ignores:
  ``L.mask_bits`` and ``L.mask_t_bits`` (the packed masks ``M`` / ``M_t``; the inference-only form
  has no ``M_t``), and with adapters ``L.values`` (``W⊙M`` is no longer recoverable from
  ``weight``), ``L.lora_A``, ``L.lora_B``, ``L.lora_A_mask``.

Fused mixture-of-experts tensors pruned in simulation (:mod:`slope.moe`) are ordinary parameters
holding ``W⊙M`` already; their packed masks go beside them as ``<parameter>.mask_bits``.

Without adapters ``values`` is exactly the kept entries of ``weight`` (same dtype):
:func:`native_entries` restores it, so the round trip is bit-exact.
Every other entry of the model's state dict is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slope.masks import unpack_mask

__all__ = ["dense_form_state_dict", "native_entries", "scatter_kept", "gather_kept", "DENSE_FORM_EXTRAS"]

#: Entries of a SLoPe layer that the dense form keeps next to ``weight`` (when the layer has them).
DENSE_FORM_EXTRAS = ("mask_bits", "mask_t_bits", "values", "lora_A", "lora_B", "lora_A_mask")


def _kept_offsets(mask: torch.Tensor, n: int, m: int, checked: bool = False) -> torch.Tensor:
    """``int64 (out, in/M, N)``: positions of the kept entries inside each group of M (ascending);
    ``checked``: the caller already knows ``mask`` keeps exactly N of every M."""
    groups = mask.reshape(mask.shape[0], -1, m)
    if not checked and not bool((groups.sum(-1) == n).all()):
        raise ValueError(f"the mask does not keep exactly {n} of every {m} inputs")
    return torch.sort(groups.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]


def scatter_kept(values: torch.Tensor, mask: torch.Tensor, n: int, m: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``W⊙M (out, in)`` in ``values``' dtype from ``values (out, in·N/M)`` and ``mask (out, in)`` bool
    (``offsets``: its :func:`_kept_offsets`, when already made)."""
    out, cols = mask.shape
    dense = torch.zeros(out, cols, dtype=values.dtype, device=values.device)
    offsets = _kept_offsets(mask, n, m) if offsets is None else offsets
    dense.view(out, -1, m).scatter_(-1, offsets, values.reshape(out, -1, n))
    return dense


def gather_kept(dense: torch.Tensor, mask: torch.Tensor, n: int, m: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The kept entries of ``dense (out, in)`` as ``values (out, in·N/M)`` (inverse of :func:`scatter_kept`;
    ``offsets`` as there)."""
    out = dense.shape[0]
    offsets = _kept_offsets(mask, n, m) if offsets is None else offsets
    return dense.reshape(out, -1, m).gather(-1, offsets).reshape(out, -1).contiguous()


def _effective(entries: dict, layer: nn.Module) -> torch.Tensor:
    """``W⊙M (+ (α/r)·B(A⊙M_A))`` ``(out, in)`` from a layer's native entries (fp32 math, ``values``' dtype)."""
    shape = (layer.out_features, layer.in_features)
    values = entries["values"]
    weight = scatter_kept(values, unpack_mask(entries["mask_bits"], shape).to(values.device), layer.n, layer.m)
    if not layer.lora_rank:
        return weight
    a = entries["lora_A"].float() * entries["lora_A_mask"].to(entries["lora_A"].device)
    return (weight.float() + layer.lora_scaling * (entries["lora_B"].float() @ a)).to(values.dtype)


@torch.no_grad()
def dense_form_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict (or the given one, e.g. gathered by accelerate, with the model's keys)
    in the dense form (module docstring). Tensors of other modules are passed through unchanged."""
    from slope.moe import expert_masks
    from slope.registry import sparse_modules

    state = dict(model.state_dict() if state_dict is None else state_dict)
    for name, layer in sparse_modules(model):
        prefix = f"{name}." if name else ""
        own = {key: state.pop(prefix + key) for key in list(layer.state_dict()) if prefix + key in state}
        if "values" not in own or "mask_bits" not in own:
            raise ValueError(f"the state dict lacks {prefix}values / {prefix}mask_bits of SLoPe layer {name!r}")
        weight = _effective(own, layer)
        state[prefix + "weight"] = (weight.t() if layer.weight_transposed else weight).contiguous()
        if "bias" in own:
            state[prefix + "bias"] = own["bias"]
        kept = DENSE_FORM_EXTRAS if layer.lora_rank else ("mask_bits", "mask_t_bits")
        state.update({prefix + key: own[key] for key in kept if key in own})
    experts = expert_masks(model)  # fused MoE experts: already W⊙M; their masks go beside them
    if experts is not None:
        state.update({name + ".mask_bits": bits for name, bits in experts.state_dict().items()})
    return state


def native_entries(layer: nn.Module, state_dict: dict, prefix: str, error_msgs: list[str]) -> None:
    """In ``state_dict`` (in place): turn ``layer``'s dense-form entries (``prefix + "weight"``) into
    its native ``values``; report a dense weight without slope's mask in
    ``error_msgs``. Does nothing when there is no ``weight`` entry (a native state dict)."""
    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return
    name = layer.layer_name or prefix.rstrip(".") or type(layer).__name__
    bits = state_dict.get(prefix + "mask_bits")
    shape = (layer.out_features, layer.in_features)
    expected = shape[::-1] if layer.weight_transposed else shape
    if bits is None:
        error_msgs.append(
            f"{name}: the checkpoint holds a dense weight without slope's mask ({prefix}mask_bits): it is a dense "
            "model (or was re-saved by plain transformers). Load it into a model that is not pruned, then prune it"
        )
        return
    if tuple(weight.shape) != expected:
        error_msgs.append(f"{name}: the checkpoint's weight is {tuple(weight.shape)}, expected {expected}")
        return
    del state_dict[prefix + "weight"]
    dense = weight.t() if layer.weight_transposed else weight
    try:
        mask = unpack_mask(bits, shape).to(dense.device)
        if prefix + "values" not in state_dict:  # checked once here; the layer's load then knows these bits
            if not layer._state_mask_fits(bits, mask):
                raise ValueError(f"the mask does not keep exactly {layer.n} of every {layer.m} inputs")
            offsets = _kept_offsets(mask, layer.n, layer.m, checked=True)
            state_dict[prefix + "values"] = gather_kept(dense, mask, layer.n, layer.m, offsets)
        # (the layer's load rebuilds its 2:4 metadata from the loaded mask)
    except ValueError as e:  # a mask of another shape or sparsity
        error_msgs.append(f"{name}: the checkpoint's mask does not fit this {layer.n}:{layer.m} layer ({e})")
