"""``MaskedWeights``: masks on ordinary parameters, with pruned entries kept exactly zero."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from slope.masks import pack_mask, unpack_mask
from slope.parallel.sharded import full_tensor, is_sharded, shard_like

__all__ = ["MaskedWeights"]


class MaskedWeights:
    """Named parameters and their bool masks (same shape, ``True`` = kept).

    What keeps a pruned entry at exactly zero, whatever the optimizer does:

    - :meth:`apply_` zeroes the pruned weights (call once after setting masks);
    - a gradient hook zeroes their gradients, so clipping norms and accumulation see kept entries only;
    - :meth:`after_step` (call after every ``optimizer.step()``) zeroes the pruned entries of the
      weights and of every optimizer state tensor of the weight's shape (Adam's moments, SGD's
      momentum), which catches anything that would move them (weight decay on a moment, fp16 noise).

    :meth:`set_mask` changes a mask (RigL, gradual pruning): entries that leave or join the mask
    restart from zero in the weights and in the optimizer state. Masks follow their parameters'
    devices: a mask moves to its parameter's device when it is next used there (a model moved after
    the masks were set, as ``transformers.Trainer`` does, works as it is); :meth:`state_dict`
    stores them packed (1 bit per entry).

    Layout: every mask has its parameter's shape. A parameter that stores its weight as
    ``(in, out)`` (GPT-2's ``Conv1D``) is named in ``transposed``; :meth:`out_in` turns its tensors
    into the ``(out, in)`` view that N:M groups (along the input dimension) and policies expect.

    FSDP2 (``fully_shard``) replaces parameters by sharded ``DTensor`` ones: :meth:`rebind` to
    them, and each mask is split like its weight. Hooks on sharded parameters do not run, so for
    those :meth:`mask_grads_` masks the (reduced) gradients instead: call it after the backward
    passes of a step, before clipping. :meth:`state_dict` and :meth:`sparsity` then gather over
    the ranks (collective: every rank calls them).

    Dense gradients (RigL's regrowth): while :meth:`capture_dense_grads` is on, the gradient hook
    also adds each full gradient (pruned entries included, before masking; fp32) to
    :attr:`dense_grads` — autograd computes the full gradient anyway, so the only cost is one
    weight-sized buffer per parameter while capturing. For sharded parameters :meth:`mask_grads_`
    keeps the step's reduced gradient (this rank's shard) before masking it.

    :meth:`weight` is the whole weight (gathered when sharded): what mask policies rank.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor] | None = None, *,
                 transposed: Iterable[str] = ()):
        self.params: dict[str, nn.Parameter] = dict(params)
        self.transposed = frozenset(transposed)
        if not self.transposed <= set(self.params):
            raise KeyError(f"transposed names {sorted(self.transposed - set(self.params))} are not masked parameters")
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.capturing = False
        self.dense_grads: dict[str, torch.Tensor] = {}
        for name, mask in (masks or {}).items():
            self._store(name, mask)
        for name in self.params:
            if name not in self.masks:
                self._store(name, torch.ones_like(self.params[name], dtype=torch.bool))

    @classmethod
    def from_zeros(cls, params: Mapping[str, nn.Parameter]) -> "MaskedWeights":
        """Masks that keep exactly the nonzero entries (the zeros a one-shot pruning left)."""
        return cls(params, {name: p.detach() != 0 for name, p in params.items()})

    def _store(self, name: str, mask: torch.Tensor) -> None:
        if name not in self.params:
            raise KeyError(f"{name!r} is not one of the masked parameters")
        param = self.params[name]
        if mask.dtype != torch.bool or mask.shape != param.shape:
            raise ValueError(
                f"{name}: a mask must be bool of the weight's shape {tuple(param.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if is_sharded(param):
            self.masks[name] = mask if is_sharded(mask) else shard_like(mask, param)
            return  # no hook: see mask_grads_
        self.masks[name] = mask.to(param.device)
        if name not in self._hooks and param.requires_grad:
            self._hooks[name] = param.register_hook(lambda grad, name=name: self._mask_grad(name, grad))

    def _follow(self, name: str, device: torch.device) -> torch.Tensor:
        """``name``'s bool mask on ``device``: a mask left on another device (the model moved since
        it was set) moves there for good. Sharded masks are split like their weight already."""
        mask = self.masks[name]
        if mask.device != device and not is_sharded(mask):
            mask = self.masks[name] = mask.to(device)
        return mask

    def out_in(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (in parameter ``name``'s layout) as ``(out, in)`` — and an ``(out, in)`` tensor back
        to the parameter's layout: the transpose (a view) for names in :attr:`transposed`, else ``tensor``."""
        return tensor.t() if name in self.transposed else tensor

    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self.capturing:
            held = self.dense_grads.get(name)
            self.dense_grads[name] = grad.detach().to(torch.float32, copy=True) if held is None else held.add_(grad.detach())
        return grad * self._follow(name, grad.device).to(grad.dtype)

    def rebind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Hold the same weights as new parameter objects (``fully_shard`` replaced them by
        sharded ones): the masks are split like them, the old gradient hooks removed."""
        if set(params) != set(self.params):
            raise ValueError(f"rebind: the parameters {sorted(set(params) ^ set(self.params))[:3]} are not those masked")
        masks = {name: full_tensor(mask) for name, mask in self.masks.items()}
        self.remove_hooks()
        self.params = dict(params)
        for name, mask in masks.items():
            self._store(name, mask)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned entries of sharded parameters (their hooks do not run);
        unsharded ones are masked by their hooks already."""
        for name, param in self.params.items():
            if is_sharded(param) and param.grad is not None:
                if self.capturing:  # the step's gradient, averaged over the ranks by FSDP2 (a shard)
                    self.dense_grads[name] = param.grad.detach().to(torch.float32, copy=True)
                param.grad.mul_(self.masks[name].to(param.grad.dtype))

    def capture_dense_grads(self, on: bool) -> None:
        """Start (``True``: :attr:`dense_grads` emptied, then accumulated over the following backward
        passes; sharded parameters: kept by :meth:`mask_grads_`) or stop (``False``: emptied) keeping
        the full gradients."""
        self.capturing = bool(on)
        self.dense_grads = {}

    def weight(self, name: str) -> torch.Tensor:
        """The current weight ``name`` (pruned entries zero), detached and whole (a sharded one is
        gathered: collective)."""
        return full_tensor(self.params[name].detach())

    # ------------------------------------------------------------------ keeping zeros zero
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every pruned weight in place."""
        for name, param in self.params.items():
            param.mul_(self._follow(name, param.device).to(param.dtype))

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights and their per-entry optimizer state (call after ``optimizer.step()``)."""
        self.apply_()
        if optimizer is not None:
            for name in self.params:
                self._zero_state(name, optimizer, ~self.masks[name])

    def _zero_state(self, name: str, optimizer: torch.optim.Optimizer, where: torch.Tensor) -> None:
        param = self.params[name]
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where.to(value.device), 0)

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Replace ``name``'s mask; entries that change (dropped or grown) become zero in the weight
        and in the optimizer state. Returns the bool tensor of changed entries (whole: gathered
        when the weight is sharded)."""
        if is_sharded(self.params.get(name)) and not is_sharded(mask):
            mask = shard_like(mask, self.params[name])
        param = self.params[name]
        current = self._follow(name, param.device)
        changed = mask.to(current.device) ^ current
        self._store(name, mask)
        param.masked_fill_(changed, 0)
        if optimizer is not None:
            self._zero_state(name, optimizer, changed)
        return full_tensor(changed)

    # ------------------------------------------------------------------ reporting and persistence
    def sparsity(self, names: Iterable[str] | None = None) -> float:
        """Fraction of pruned entries over ``names`` (default: all masked parameters)."""
        names = list(self.masks if names is None else names)
        total = sum(self.masks[n].numel() for n in names)
        kept = sum(int(full_tensor(self.masks[n].sum())) for n in names)
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: packed uint8 mask}`` (see :func:`slope.masks.pack_mask`), on the CPU."""
        return {name: pack_mask(full_tensor(mask)).cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` (all names must match) and zero pruned weights."""
        if set(state) != set(self.params):
            missing, extra = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
            raise ValueError(f"saved masks do not match the masked parameters (missing {missing}, unexpected {extra})")
        for name, bits in state.items():
            self._store(name, unpack_mask(bits, self.params[name].shape))
        self.apply_()

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the masks stay; nothing keeps zeros zero any more)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
