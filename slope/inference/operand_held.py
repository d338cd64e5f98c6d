"""An inference-only merged layer keeps what its operand encodes only there.

A frozen :class:`~slope.lora.MergedSparseLinear` multiplies with a backend operand whose
metadata encodes ``M``; in the ``stacked`` fold its rows ``out…out+r`` are the adapters'
``A⊙M_A`` (kept values and pattern), in the ``extended`` fold it carries ``s·A⊙M_A`` densely. The
packed ``mask_bits`` (1 bit per weight), the dense ``lora_A`` and the bool ``lora_A_mask`` (1 byte
per adapter entry) beside it are a second copy. Once such a layer has built its operand, it drops
each of them that the backend reads back exactly (:meth:`slope.backends.base.SparseBackend.operand_mask`
and ``operand_values``; in the extended fold ``A`` is ``s·A`` divided by ``s``, exact for a power
of two, and ``M_A`` its nonzeros, exact unless a kept entry of ``A`` is zero; each compared with the
layer's tensor once): the operand *holds* them. The operand does not change while it holds them
(anything that would change it gives them back first), so what is derived later is what was
compared.

While held:

- ``layer.mask_bits``, ``layer.lora_A_mask``, ``layer.lora_A`` (and ``layer.mask``, the state
  dict, copies and pickles) are derived from the operand: the same values as before, in fresh
  tensors (the same tensor again while one handed out is alive). Writing into one in place is
  adopted before the layer's next product or state dict: the tensors come back, with the write,
  and the operand is rebuilt. A tensor handed out is kept alive until that check, so a write
  into one nobody keeps (``layer.lora_A.mul_(2)``) counts too, and so does a write through
  ``.data`` before that check (no version counter moves: its values are compared with the
  operand's; a ``.data`` write into one kept across a product is not seen).
- ``named_buffers()`` / ``named_parameters()`` do not list them (that is the memory saved).
- Whatever would drop or rebuild the holding operand (moving or casting the model, loading a
  state dict, switching the fold, another dtype or backend) first gives them back; the next
  product holds them again.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from slope.masks import pack_mask

#: a layer's parameters and buffers in registration order (its state-dict order); the ones an
#: operand can hold: ``mask_bits``, ``lora_A_mask``, ``lora_A``.
PARAMETER_ORDER = ("values", "bias", "lora_A", "lora_B")
BUFFER_ORDER = ("mask_bits", "mask_t_bits", "lora_A_mask")
HOLDABLE = frozenset({"mask_bits", "lora_A_mask", "lora_A"})


def _in_order(tensors: dict, order: tuple[str, ...]) -> dict:
    """``tensors`` with the names of ``order`` in that order, after any others."""
    names = [n for n in tensors if n not in order] + [n for n in order if n in tensors]
    return {n: tensors[n] for n in names}


@dataclass(frozen=True)
class HeldTensors:
    """What a layer dropped, and where it lives: the cached operand under ``key`` of ``backend``."""

    key: tuple
    backend: Any
    names: tuple[str, ...]


class HeldByOperand:
    """Mixin of :class:`~slope.lora.MergedSparseLinear` (module docstring). The layer sets
    ``_held`` (:class:`HeldTensors` or None) and ``_derived`` (name → ``(weak reference,
    version, the tensor itself or None)`` of the derived tensors handed out; the tensor itself
    until the next check of writes, :meth:`_adopt_writes`) when it becomes merged."""

    def __getattr__(self, name: str):
        if name in HOLDABLE:
            held = self.__dict__.get("_held")
            if held is not None and name in held.names:
                return self._held_tensor(name)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ reading the operand
    def _holdable(self) -> tuple[str, ...]:
        """What this layer's merged operand encodes: ``M``; with adapters also ``A`` and ``M_A``
        (stacked: the extra rows ``A⊙M_A``, kept values and pattern; extended: ``s·A⊙M_A``, dense,
        which gives back ``A`` exactly when ``s`` is a power of two, e.g. the default
        ``alpha = rank``, and ``M_A`` as its nonzeros unless a kept entry of ``A`` is zero)."""
        return ("mask_bits", "lora_A_mask", "lora_A") if self.lora_rank else ("mask_bits",)

    def _read_operand(self, key: tuple, backend, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` read from the cached operand under ``key``, for each of ``names`` that
        ``backend`` can read back: ordinary tensors (version-counted, writable), also when called
        under ``torch.inference_mode``."""
        with torch.inference_mode(False), torch.no_grad():
            return self._read_operand_tensors(key, backend, names)

    def _read_operand_tensors(self, key: tuple, backend, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        cached = self._operands.get(key)
        if cached is None:
            raise RuntimeError(f"{self.layer_name or 'MergedSparseLinear'}: the operand holding its masks is gone (slope bug)")
        extended = self.lora_rank and self.fold == "extended"
        operand = cached[1][0] if extended else cached[1]
        pattern = backend.operand_mask(operand)
        if pattern is None:
            return {}
        device, (out, r, cols) = self.values.device, (self.out_features, self.lora_rank, self.in_features)
        pattern = pattern.to(device)
        found = {"mask_bits": pack_mask(pattern[:out, :cols].contiguous())}
        a_scaled = cached[1][1][:r].to(device) if extended else None  # the operand's s·A⊙M_A (R, in)
        a_mask = (a_scaled != 0) if extended else pattern[out : out + r, :cols]
        if "lora_A_mask" in names:
            found["lora_A_mask"] = a_mask.clone()
        if "lora_A" in names and extended:  # s a power of two: exact
            found["lora_A"] = nn.Parameter((a_scaled.float() / self.lora_scaling).to(a_scaled.dtype), requires_grad=False)
        elif "lora_A" in names and (held_values := backend.operand_values(operand)) is not None:
            kept = held_values[out : out + r, : cols // 2]
            if int(a_mask.sum()) != kept.numel():  # not a 2:4 pattern: nothing to scatter A into
                return {name: found[name] for name in names if name in found}
            a = torch.zeros(r, cols, dtype=kept.dtype, device=device)
            a[a_mask] = kept.reshape(-1).to(device)  # row order, ascending column
            found["lora_A"] = nn.Parameter(a, requires_grad=False)
        return {name: found[name] for name in names if name in found}

    def _hold(self, key: tuple, backend) -> None:
        """After the operand under ``key`` was built: drop each tensor it encodes that the backend
        reads back equal (same dtype), when the layer is inference-only."""
        if self._held is not None or not self.inference_only:
            return
        try:
            found = self._read_operand(key, backend, self._holdable())
        except (RuntimeError, ValueError) as exc:  # a read-back that fails costs memory, never the product
            warnings.warn(f"{self.layer_name or 'MergedSparseLinear'}: backend {backend.name!r} could not read its operand "
                          f"back ({exc}); the layer keeps its masks and lora_A (more memory, the same results)",
                          RuntimeWarning, stacklevel=2)
            return
        own = {n: getattr(self, n) for n in found}
        names = tuple(n for n, t in found.items() if t.dtype == own[n].dtype and torch.equal(t, own[n]))
        if not names:
            return
        for name in names:
            (self._parameters if name in PARAMETER_ORDER else self._buffers).pop(name)
        self._forget_mask_caches()
        self._held = HeldTensors(key, backend, names)
        version, operand, buffer = self._operands[key]
        self._operands[key] = (self._merged_version_at(key, backend), operand, buffer)

    def _held_tensor(self, name: str) -> torch.Tensor:
        """A held tensor, derived from the operand (the same one while one handed out is alive),
        kept alive until the next check of writes (:meth:`_adopt_writes`)."""
        entry = self._derived.get(name)
        tensor = None if entry is None else entry[0]()
        if tensor is None:
            held = self._held
            for other, fresh in self._read_operand(held.key, held.backend, held.names).items():
                alive = self._derived.get(other)
                if alive is None or alive[0]() is None:
                    self._track(other, fresh, keep=other == name)
                if other == name:
                    tensor = fresh
        else:
            self._derived[name] = (entry[0], entry[1], tensor)
        return tensor

    def _track(self, name: str, tensor: torch.Tensor, keep: bool) -> None:
        derived = self._derived

        def forget(ref, name=name):
            if derived.get(name, (None,))[0] is ref:
                del derived[name]

        derived[name] = (weakref.ref(tensor, forget), tensor._version, tensor if keep else None)

    # ------------------------------------------------------------------ giving back
    def _restore_held(self) -> None:
        """Give the held tensors back (derived ones still alive become them, with any writes)."""
        held = self._held
        if held is None:
            return
        tensors = {name: self._held_tensor(name) for name in held.names}
        self._held = None
        self._derived.clear()
        # every cached operand's version left the held tensors out: after they come back (written
        # into, maybe, and held again by another operand) no such version may match again
        self._operands.clear()
        self._forget_mask_caches()
        params = {**self._parameters, **{n: t for n, t in tensors.items() if n in PARAMETER_ORDER}}
        buffers = {**self._buffers, **{n: t for n, t in tensors.items() if n not in PARAMETER_ORDER}}
        for store, new, order in ((self._parameters, params, PARAMETER_ORDER), (self._buffers, buffers, BUFFER_ORDER)):
            store.clear()
            store.update(_in_order(new, order))

    def _forget_mask_caches(self) -> None:
        """Drop what the layer derived from its mask buffer, keyed by the buffer's (version, address):
        a new tensor may reuse a freed one's address at the same version."""
        self._offsets, self._validated_mask = None, None
        self._structures.clear()

    def _adopt_writes(self) -> None:
        """Give the held tensors back when a derived one was written into: its version moved, or,
        for one handed out since the last check, its values are no longer the operand's (a write
        through ``.data``). Then let go of the ones kept alive for this check."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # (no host syncs while a CUDA graph captures; the eager warm-up checked)
        derived = self._derived
        for ref, version, _ in list(derived.values()):
            tensor = ref()
            if tensor is not None and tensor._version != version:
                self._restore_held()
                return
        kept = {name: entry[2] for name, entry in derived.items() if entry[2] is not None}
        if not kept:
            return
        held = self._held
        fresh = self._read_operand(held.key, held.backend, tuple(kept))
        if any(not torch.equal(tensor, fresh[name]) for name, tensor in kept.items()):
            self._restore_held()
            return
        self._let_go()

    def _let_go(self) -> None:
        """Stop keeping the derived tensors handed out alive (those nobody else holds go)."""
        derived = self._derived
        for name, (ref, version, tensor) in list(derived.items()):
            if tensor is not None:
                derived[name] = (ref, version, None)

    # ------------------------------------------------------------------ what may drop the operand
    def _give_back_before_setting(self, name: str) -> None:
        """Before ``name`` is assigned, registered or deleted: a held one comes back first (else
        ``nn.Module`` would find the derived one, a KeyError, or set an attribute beside it)."""
        if name in HOLDABLE and self.__dict__.get("_held") is not None:
            self._restore_held()

    def __setattr__(self, name: str, value) -> None:
        self._give_back_before_setting(name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._give_back_before_setting(name)
        super().__delattr__(name)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        self._give_back_before_setting(name)
        super().register_buffer(name, tensor, persistent)

    def register_parameter(self, name: str, param) -> None:
        self._give_back_before_setting(name)
        super().register_parameter(name, param)

    def refresh(self) -> None:
        self._restore_held()
        super().refresh()

    def _apply(self, fn, recurse=True):
        self._restore_held()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        held = self._held
        tensors = {} if held is None else {name: self._held_tensor(name) for name in held.names}
        state = super().__getstate__()
        if tensors:  # the copy holds them itself; this layer keeps holding them
            for slot, order in (("_parameters", PARAMETER_ORDER), ("_buffers", BUFFER_ORDER)):
                mine = {n: t for n, t in tensors.items() if (n in PARAMETER_ORDER) == (slot == "_parameters")}
                state[slot] = _in_order({**state[slot], **mine}, order)
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
            for name in PARAMETER_ORDER + BUFFER_ORDER:  # this layer's entries in registration order again
                if prefix + name in destination:
                    destination[prefix + name] = destination.pop(prefix + name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._restore_held()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
