"""An inference-only merged layer keeps its masks once: in its operand's metadata.

A frozen :class:`~slope.lora.MergedSparseLinear` multiplies with a backend operand whose
metadata already encodes ``M`` (and, in the ``stacked`` fold, the adapters' ``M_A``): the packed
``mask_bits`` (1 bit per weight) and the bool ``lora_A_mask`` (1 byte per adapter entry) beside
it are a second copy. Once such a layer has built its operand, and the backend reads the pattern
back exactly (:meth:`slope.backends.base.SparseBackend.operand_mask`, checked against the buffers
once), the buffers are dropped; the operand *holds* them.

While held:

- ``layer.mask_bits`` / ``layer.lora_A_mask`` (and ``layer.mask``, the state dict, pickling) are
  derived from the operand, the same values as before, fresh tensors (one per read while no
  earlier one is alive). Writing into such a tensor is adopted before the layer's next product or
  state dict (the buffers come back with the written values, and the operand is rebuilt).
- ``named_buffers()`` does not list them (that is the memory saved).
- Anything that would drop or rebuild the holding operand (moving or casting the model, loading
  a state dict, switching the fold, another dtype or backend) first gives the buffers back; the
  next product holds them again.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from slope.masks import pack_mask

#: the buffers an operand can hold, in the order a layer registers them (state-dict order).
HELD_ORDER = ("mask_bits", "mask_t_bits", "lora_A_mask")


def _in_registration_order(buffers: dict) -> dict:
    """``buffers`` with the holdable ones last, in :data:`HELD_ORDER` (a layer's own order)."""
    names = [n for n in buffers if n not in HELD_ORDER] + [n for n in HELD_ORDER if n in buffers]
    return {n: buffers[n] for n in names}


@dataclass(frozen=True)
class HeldMasks:
    """Where a layer's dropped buffers live: the cached operand under ``key`` of ``backend``."""

    key: tuple
    backend: Any
    names: tuple[str, ...]


class MasksInOperand:
    """Mixin of :class:`~slope.lora.MergedSparseLinear` (module docstring). The layer sets
    ``_held`` (``HeldMasks`` or None) and ``_derived`` (name → ``(weak reference, version)`` of
    the derived tensors handed out) when it becomes merged."""

    def __getattr__(self, name: str):
        if name in HELD_ORDER:
            held = self.__dict__.get("_held")
            if held is not None and name in held.names:
                return self._held_tensor(name)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ holding
    def _holdable(self) -> tuple[str, ...]:
        """The buffers this layer's merged operand encodes: ``M``, and ``M_A`` when stacked under it."""
        return ("mask_bits", "lora_A_mask") if self.lora_rank and self.fold == "stacked" else ("mask_bits",)

    def _masks_from_operand(self, key: tuple, backend, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """``{name: tensor}`` read from the cached operand under ``key``, or None when ``backend``
        cannot read its pattern."""
        cached = self._operands.get(key)
        if cached is None:
            raise RuntimeError(f"{self.layer_name or 'MergedSparseLinear'}: the operand holding its masks is gone (slope bug)")
        operand = cached[1]
        pattern = backend.operand_mask(operand[0] if self.lora_rank and self.fold == "extended" else operand)
        if pattern is None:
            return None
        pattern = pattern.to(self.values.device)
        out, found = self.out_features, {}
        if "mask_bits" in names:
            found["mask_bits"] = pack_mask(pattern[:out, : self.in_features].contiguous())
        if "lora_A_mask" in names:
            found["lora_A_mask"] = pattern[out : out + self.lora_rank, : self.in_features].clone()
        return found

    def _hold_masks(self, key: tuple, backend) -> None:
        """After the operand under ``key`` was built: drop the buffers it encodes, when the layer is
        inference-only and the backend reads them back equal."""
        if self._held is not None or not self.inference_only:
            return
        names = self._holdable()
        found = self._masks_from_operand(key, backend, names)
        if found is None or any(not torch.equal(found[n], self._buffers[n]) for n in names):
            return
        for name in names:
            del self._buffers[name]
        self._forget_mask_caches()
        self._held = HeldMasks(key, backend, names)
        version, operand, buffer = self._operands[key]
        self._operands[key] = (self._merged_version_at(key, backend), operand, buffer)

    def _held_tensor(self, name: str) -> torch.Tensor:
        """A held buffer, derived from the operand (the same tensor while one handed out is alive)."""
        entry = self._derived.get(name)
        tensor = None if entry is None else entry[0]()
        if tensor is None:
            held = self._held
            for other, fresh in self._masks_from_operand(held.key, held.backend, held.names).items():
                alive = self._derived.get(other)
                if alive is None or alive[0]() is None:
                    self._track(other, fresh)
                if other == name:
                    tensor = self._derived[other][0]()
        return tensor

    def _track(self, name: str, tensor: torch.Tensor) -> None:
        derived = self._derived

        def forget(ref, name=name):
            if derived.get(name, (None,))[0] is ref:
                del derived[name]

        derived[name] = (weakref.ref(tensor, forget), tensor._version)

    def _restore_masks(self) -> None:
        """Give the held buffers back (derived tensors still alive become them, with any writes)."""
        held = self._held
        if held is None:
            return
        tensors = {name: self._held_tensor(name) for name in held.names}
        self._held = None
        self._derived.clear()
        self._forget_mask_caches()
        self._buffers.update(tensors)
        for name, tensor in _in_registration_order(self._buffers).items():
            self._buffers[name] = self._buffers.pop(name)

    def _forget_mask_caches(self) -> None:
        """Drop what the layer derived from its mask buffer, keyed by the buffer's (version, address):
        a new tensor may reuse a freed one's address at the same version."""
        self._offsets, self._validated_mask = None, None
        self._structures.clear()

    def _adopt_writes(self) -> None:
        """Give the buffers back when a derived tensor was written into (its version moved)."""
        for ref, version in list(self._derived.values()):
            tensor = ref()
            if tensor is not None and tensor._version != version:
                self._restore_masks()
                return

    # ------------------------------------------------------------------ what may drop the operand
    def refresh(self) -> None:
        self._restore_masks()
        super().refresh()

    def _apply(self, fn, recurse=True):
        self._restore_masks()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        held = self._held
        tensors = {} if held is None else {name: self._held_tensor(name) for name in held.names}
        state = super().__getstate__()
        if tensors:  # the copy holds the buffers itself; this layer keeps holding them
            state["_buffers"] = _in_registration_order({**state["_buffers"], **tensors})
        state["_held"], state["_derived"] = None, {}
        return state

    def __setstate__(self, state):
        state.setdefault("_held", None)
        state.setdefault("_derived", {})
        super().__setstate__(state)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._adopt_writes()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        held = self._held
        if held is not None:
            for name in held.names:
                tensor = self._held_tensor(name)
                destination[prefix + name] = tensor if keep_vars else tensor.detach()
            for name in HELD_ORDER:  # buffers after parameters, in registration order
                if prefix + name in destination:
                    destination[prefix + name] = destination.pop(prefix + name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._restore_masks()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
