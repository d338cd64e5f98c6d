"""The SLoPe linear layer: a double-pruned N:M sparse ``nn.Linear`` replacement.

Math (DESIGN §2), ``W (out, in)``, ``x (..., in)``:

- forward ``y = x (W ⊙ M)ᵀ + b``
- input gradient ``dx = dy (W ⊙ M ⊙ M_t)`` with the *current* weights
- weight gradient ``dW = (dyᵀ x) ⊙ M``, kept compressed in :attr:`SparseLinear.values_grad`
  (never in ``param.grad``: the sparse optimizer consumes it)

Storage: ``values (out, in·N/M)`` holds the kept weights of every row in column order (for 2:4 this
is exactly the values tensor of the CUTLASS format), ``M`` and ``M_t`` are stored as packed bits
(buffers ``mask_bits`` / ``mask_t_bits``, 1/8 byte per weight, :func:`slope.masks.pack_mask`;
``mask`` / ``mask_t`` unpack bool copies in ``W``'s orientation). The 2:4 metadata of
``compress=True`` is not stored: each backend derives its operand's own from ``M`` (and caches it).
State dicts carry the packed buffers; checkpoints written with bool ``mask`` / ``mask_t`` entries,
or with the ``meta`` entry that layers stored before, still load.
The backend operands (forward and backward) are derived and cached; they are rebuilt lazily when
the weights or masks change (after an optimizer step, ``load_state_dict`` or ``.to()``).
Under :func:`slope.parallel.wrap_fsdp2` a layer's ``values`` may live on one rank between uses
(:attr:`SparseLinear.values_holder`, :mod:`slope.parallel.sharded_values`): the forward and the
backward fetch them first and free them after.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope import registry
from slope.backends import SparseBackend, resolve_backend
from slope.backends.kept import operand_from_kept, operand_pattern
from slope import kernels
from slope.masks import (
    double_prune_mask,
    is_nm_sparse,
    nm_mask,
    pack_mask,
    packed_is_nm_sparse,
    packed_keeps_at_most_along_rows,
    transposable_mask,
    unpack_mask,
)

#: Backward passes added into one ``values_grad`` without it being zeroed, after which a layer
#: warns: far beyond any gradient accumulation, it means no ADAMWSparse steps and zeroes it.
UNSTEPPED_BACKWARDS_WARNING = 256

__all__ = ["SparseLinear"]


def _compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype, layer: "SparseLinear") -> torch.dtype:
    """The dtype the matmuls run in: autocast's when active, else ``layer.compute_dtype`` when set
    (mixed precision, e.g. FSDP2's ``param_dtype``), else the input's (must match the weights)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if layer.compute_dtype is not None:
        return layer.compute_dtype
    if x.dtype != weight_dtype:
        raise TypeError(
            f"{layer.layer_name or 'SparseLinear'}: input dtype {x.dtype} does not match the weight "
            f"dtype {weight_dtype}; cast the model or the input, or run under torch.autocast"
        )
    return x.dtype


def _auto_is_timed(device: torch.device) -> bool:
    """Whether ``backend="auto"`` chooses by timing on ``device`` (CUDA); elsewhere it resolves
    to one backend by capability (:func:`slope.backends.resolve_backend`)."""
    return device.type == "cuda"


def _values_held(layer: "SparseLinear"):
    """Context in which ``layer.values`` are the whole weights (fetched from their owner rank when
    sharded, :attr:`SparseLinear.values_holder`; as they are otherwise)."""
    holder = layer.values_holder
    return contextlib.nullcontext() if holder is None else holder.holding(layer)


def _sparse_product(layer: "SparseLinear", xc: torch.Tensor, bias: torch.Tensor | None, training: bool) -> torch.Tensor:
    """``xc (..., in) (W ⊙ M)ᵀ + bias`` in ``xc``'s dtype (the compute dtype), no autograd;
    ``training``: the call is part of a training step (``auto`` counts the operand's rebuild)."""
    dtype = xc.dtype
    backend = layer._backend_for(dtype, xc.device, "forward", xc.numel() // layer.in_features, training)
    operand = layer._operand("forward", dtype, xc.device, backend)
    return backend.linear(xc, operand, None if bias is None else bias.to(dtype))


#: A layer's tensors its backward reads (``values``; ``mask_bits`` and ``mask_t_bits`` where it has them).
_WEIGHT_NAMES = ("values", "mask_bits", "mask_t_bits")


def _weight_tensors(layer: "SparseLinear") -> dict[str, torch.Tensor]:
    """``layer``'s :data:`_WEIGHT_NAMES` tensors (the objects: in-place changes stay visible)."""
    found = {name: layer._parameters.get(name, layer._buffers.get(name)) for name in _WEIGHT_NAMES}
    return {name: t for name, t in found.items() if t is not None}


@contextlib.contextmanager
def _weights_of_forward(layer: "SparseLinear", used: dict[str, torch.Tensor] | None):
    """Context in which ``layer``'s values and masks are ``used``, the tensors its forward read
    (``torch.func.functional_call`` restores the layer's own before the backward runs); ``None``
    (sharded values, which their holder fetches): as they are."""
    current = {} if used is None else _weight_tensors(layer)
    swapped = {name: t for name, t in (used or {}).items() if current.get(name) is not t}
    if not swapped:
        yield
        return
    own = {}
    for name, t in swapped.items():
        store = layer._parameters if name in layer._parameters else layer._buffers
        own[name] = (store, store[name])
        store[name] = t
    try:
        yield
    finally:
        for name, (store, t) in own.items():
            store[name] = t


class _SparseLinearFunction(torch.autograd.Function):
    """Autograd function of :class:`SparseLinear` (weights reach it through the module)."""

    @staticmethod
    def forward(ctx, x, bias, anchor, layer, dtype):  # noqa: ARG004 (anchor only forces backward)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # the weights this product uses, also for the backward ("the current weights": their in-place updates count)
        ctx.weights = _weight_tensors(layer) if layer.values_holder is None else None
        xc = x.to(dtype)
        with _values_held(layer):
            y = _sparse_product(layer, xc, bias, training=layer.sparse_requires_grad)
        ctx.save_for_backward(xc if layer.sparse_requires_grad else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        layer, dtype = ctx.layer, ctx.dtype
        (xc,) = ctx.saved_tensors
        dy = dy.to(dtype)
        dx = dbias = None
        holder = layer.values_holder  # sharded values: fetched here, the gradient reduced to their owner
        if holder is not None:
            holder.before_backward(layer)
        dy2 = dy.reshape(-1, dy.shape[-1])
        with _weights_of_forward(layer, ctx.weights):
            if ctx.needs_input_grad[0]:
                backend = layer._backend_for(dtype, dy.device, "backward", dy.numel() // layer.out_features, True)
                dx = backend.matmul(dy, layer._operand("backward", dtype, dy.device, backend)).to(ctx.x_dtype)
            if xc is not None:
                layer._accumulate_grad(dy2.t() @ xc.reshape(-1, xc.shape[-1]))
        if holder is not None:
            holder.after_backward(layer)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dbias, None, None, None


class SparseLinear(nn.Module):
    """Double-pruned N:M sparse linear layer (drop-in for ``nn.Linear``; see module docstring).

    Build one with :meth:`from_dense` (what :func:`slope.prune_model` does).

    Attributes:
        values: ``Parameter (out, in·N/M)`` of kept weights (``requires_grad=False``: updated by
            :class:`slope.optimizers.ADAMWSparse`, never by a dense optimizer).
        values_grad: accumulated sparse gradient, same shape/dtype as ``values``, or ``None``.
        values_holder: ``None``, or the :class:`slope.parallel.ShardedValues` that keeps ``values``
            (and the reduced ``values_grad``) on one owner rank; elsewhere both are ``(0, in·N/M)``
            placeholders between the layer's forward and backward computations.
        optimizer_steps: how many steps :class:`slope.optimizers.ADAMWSparse` made of this layer
            (after ``AUTO_CHOOSER.timed_steps`` of them, ``backend="auto"`` times nothing new).
        mask / mask_t: ``bool (out, in)``; ``M`` and the double-pruned ``M_t ⊆ M``, unpacked
            copies of the packed buffers ``mask_bits`` / ``mask_t_bits`` (writing into them
            changes nothing: set masks with :meth:`set_weight` or ``load_state_dict``).
        bias: ordinary ``Parameter (out,)`` (dense optimizer) or ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        compress: bool = False,
        backend: str = "auto",
        tiling: bool = True,
        double_pruning: bool = True,
        mask_type: str = "nm",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features % m or out_features % m:
            raise ValueError(
                f"SparseLinear({in_features}, {out_features}) with {n}:{m}: in_features and out_features "
                f"must be divisible by {m}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.n, self.m = n, m
        self.compress, self.backend_name, self.tiling = compress, backend, tiling
        self.double_pruning, self.mask_type = double_pruning, mask_type
        self.sparse_requires_grad = True
        # Mixed precision without autocast: matmuls run in this dtype, ``values`` keep theirs (master).
        self.compute_dtype: torch.dtype | None = None
        self.layer_name = ""  # set by prune_model, used in messages
        # True when it replaced a module storing (in, out) weights (GPT-2's Conv1D): the dense form
        # of its state dict (slope.serialization.dense_form) stores ``weight`` in that orientation.
        self.weight_transposed = False
        kept = in_features * n // m
        if compress and (n, m) != (2, 4):
            raise ValueError(f"compress=True stores 2:4 only, not {n}:{m}; use compress=False to simulate N:M")
        factory = {"device": device, "dtype": dtype}
        # Ordinary tensors also when built under torch.inference_mode (e.g. pruning a model loaded
        # for evaluation): the operand caches key on their version counters, which inference tensors lack.
        with torch.inference_mode(False):
            self.values = nn.Parameter(torch.zeros(out_features, kept, **factory), requires_grad=False)
            # M and M_t as packed bits (slope.masks.pack_mask); the mask / mask_t properties unpack them.
            empty_mask = pack_mask(torch.zeros(out_features, in_features, dtype=torch.bool, device=device))
            self.register_buffer("mask_bits", empty_mask)
            self.register_buffer("mask_t_bits", empty_mask.clone())
            self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.values_grad: torch.Tensor | None = None
        # None, or what keeps ``values`` on one rank between uses (slope.parallel.ShardedValues)
        self.values_holder = None
        self.optimizer_steps = 0  # counted by ADAMWSparse: backend="auto" stops timing after the first ones
        self._zeroed_grad: tuple[torch.Tensor, int] | None = None  # see zero_values_grad
        self._backwards_since_zero = 0  # backward passes added into values_grad since it was last fresh
        # Mask-update policies (RigL) set keep_dense_grad for a step whose full weight gradient
        # dyᵀx they need: the backward computes it anyway and then also adds it to dense_grad.
        self.keep_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self.lora_rank = 0
        self._operands: dict[tuple, tuple[tuple, Any]] = {}
        # backend metadata of the operands' masks, M forward and M_t backward (see
        # _operand_structure): survives refresh(), which runs after every optimizer step, and is
        # re-derived when that mask's version changes.
        self._structures: dict[tuple, tuple[tuple, Any]] = {}
        self._backends: dict[tuple, SparseBackend] = {}
        self._offsets: tuple[tuple, torch.Tensor] | None = None
        self._validated_mask: tuple | None = None  # key of the M version _check_mask accepted
        # (weak reference, version) of the last state dict's mask_bits found exactly N:M (_state_mask_fits)
        self._fitting_state_mask: tuple | None = None
        registry.register(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> "SparseLinear":
        """Prune ``weight (out, in)`` (and take ``bias (out,)``) into a new layer on the same device."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            layer.set_weight(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace the weights by ``weight (out, in)``, pruning with a fresh mask unless one is given."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"{self.layer_name}: weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        if mask is None:
            if self.mask_type == "transposable":
                mask = transposable_mask(weight, self.n, self.m)
            elif self.mask_type == "nm" and (self.n, self.m) == (2, 4) and kernels.triton_usable(weight):
                mask = kernels.prune_2to4(weight)[1]  # one Triton pass, same mask as nm_mask
            elif self.mask_type == "nm":
                mask = nm_mask(weight, self.n, self.m)
            else:
                raise ValueError(f"unknown mask_type {self.mask_type!r}; use 'nm' or 'transposable'")
        self._set_mask(mask)
        self.values.copy_(self._gather_kept(weight.to(self.values.dtype)))
        self.update_mask_t()

    @property
    def values_shape(self) -> tuple[int, int]:
        """``(out, kept per row)``: the whole shape of ``values`` (also on a rank that holds a
        ``(0, kept)`` placeholder of sharded values)."""
        return (self.out_features, self.values.shape[-1])

    # ------------------------------------------------------------------ the masks, stored packed
    @property
    def mask(self) -> torch.Tensor:
        """``M`` as a fresh ``bool (out, in)`` tensor (unpacked from ``mask_bits``)."""
        return unpack_mask(self.mask_bits, (self.out_features, self.in_features))

    @property
    def mask_t(self) -> torch.Tensor:
        """``M_t`` as a fresh ``bool (out, in)`` tensor (unpacked from ``mask_t_bits``)."""
        return unpack_mask(self.mask_t_bits, (self.out_features, self.in_features))

    def _set_mask(self, mask: torch.Tensor) -> None:
        self.mask_bits.copy_(pack_mask(self._checked_mask(mask, "mask")))

    def _set_mask_t(self, mask_t: torch.Tensor) -> None:
        self.mask_t_bits.copy_(pack_mask(self._checked_mask(mask_t, "mask_t")))

    def _checked_mask(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        if mask.dtype != torch.bool or tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.layer_name or 'SparseLinear'}: {name} must be bool {(self.out_features, self.in_features)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask.to(self.mask_bits.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        from slope.serialization.dense_form import native_entries

        self._upgrade_legacy_masks(state_dict, prefix, error_msgs)
        native_entries(self, state_dict, prefix, error_msgs)  # a Hugging Face save's dense-form entries
        if "mask_t_bits" not in self._buffers:  # inference-only form: a training checkpoint's M_t is not needed
            state_dict.pop(prefix + "mask_t_bits", None)
        state_dict.pop(prefix + "meta", None)  # the 2:4 metadata layers stored before: derived from M
        errors = self.state_errors(state_dict, prefix)
        if errors:  # nothing of a mismatched state is written into this layer
            error_msgs.extend(errors)
            return
        before = self._mask_key()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "mask_bits" in state_dict and self._mask_key() != before:
            self._validated_mask = self._mask_key()  # M is the mask state_errors just found N:M: not checked again at first use
        if self.state_lacks_mask_t(state_dict, prefix) and "mask_t_bits" in self._buffers and self.values_holder is None:
            # M_t of the loaded W⊙M (sharded values: slope.parallel.load_full_model_state_dict asks their owner)
            if self.mask_t_bits.is_meta:  # (built on the meta device, loaded with assign=True)
                self.mask_t_bits = torch.empty_like(self.mask_bits)
            self.update_mask_t()
            if prefix + "mask_t_bits" in missing_keys:
                missing_keys.remove(prefix + "mask_t_bits")

    @staticmethod
    def state_lacks_mask_t(state_dict: dict, prefix: str = "") -> bool:
        """Whether ``state_dict`` holds a layer's whole state (``values`` and ``mask_bits``) but no
        ``M_t`` (the inference-only form's), which loading then recomputes from the loaded ``W⊙M``."""
        return prefix + "mask_bits" in state_dict and prefix + "values" in state_dict and prefix + "mask_t_bits" not in state_dict

    def state_errors(self, state_dict: dict, prefix: str = "") -> list[str]:
        """Why the entries of ``state_dict`` under ``prefix`` cannot load into this layer, one line
        each naming it (``[]`` if they fit): ``values`` of another shape (another N:M or size),
        masks that are not packed ``uint8`` bits of this layer's shape or not exactly N:M."""
        name = self.layer_name or prefix.rstrip(".") or type(self).__name__
        errors = []
        values, whole = state_dict.get(prefix + "values"), self.values_shape
        # whole, or, where another rank holds the values, the placeholder a sharded load gives this rank
        if values is not None and tuple(values.shape) not in (whole, tuple(self.values.shape)):
            errors.append(
                f"{name}: the checkpoint keeps {values.shape[-1]} of {self.in_features} weights per row but this layer is "
                f"{self.n}:{self.m} ({whole[-1]} per row, values {tuple(values.shape)} vs {whole}); "
                "prune the model with the checkpoint's sparsity"
            )
        for key in ("mask_bits", "mask_t_bits"):
            bits = state_dict.get(prefix + key)
            if bits is not None and bits.dtype != torch.uint8:
                errors.append(f"{name}: the checkpoint's {key} is {bits.dtype}, expected packed uint8 bits")
            elif bits is not None and tuple(bits.shape) != tuple(self.mask_bits.shape):
                errors.append(f"{name}: the checkpoint's {key} is {tuple(bits.shape)}, expected {tuple(self.mask_bits.shape)} (a layer of another size)")
        bits = state_dict.get(prefix + "mask_bits")
        if not errors and bits is not None and not self._state_mask_fits(bits):
            errors.append(f"{name}: the checkpoint's mask is not {self.n}:{self.m}; prune the model with the checkpoint's sparsity")
        bits_t = state_dict.get(prefix + "mask_t_bits")
        if not errors and bits is not None and bits_t is not None and not self._state_mask_t_fits(bits_t, bits):
            errors.append(
                f"{name}: the checkpoint's mask_t (M_t) does not fit its mask M (it must lie inside M and, double-pruned, keep "
                f"at most {self.n} of every {self.m} outputs): the file is corrupt; re-save it, or load the state without "
                f"{prefix}mask_t_bits to recompute M_t"
            )
        return errors

    def _state_mask_t_fits(self, bits_t: torch.Tensor, bits: torch.Tensor) -> bool:
        """Whether a state dict's packed ``M_t`` lies inside its packed ``M`` (both this layer's size;
        compared bit by bit) and, where this layer double-prunes, keeps at most N of every M along ``out``."""
        if (bits_t & ~bits.to(bits_t.device)).any():
            return False
        if not self.double_pruning or self.mask_type == "transposable":
            return True
        return packed_keeps_at_most_along_rows(bits_t, (self.out_features, self.in_features), self.n, self.m)

    def _state_mask_fits(self, bits: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
        """Whether a state dict's packed ``mask_bits`` (uint8, this layer's size; ``mask``: them
        unpacked, when the caller has that) keep exactly N of every M. The last tensor found so is
        remembered (a weak reference and its version: an in-place change or another tensor is
        checked afresh), so validating a state dict before loading it
        (:func:`slope.statecheck.check_model_state`, :func:`slope.serialization.dense_form.native_entries`)
        and the load's own check unpack and count each mask once."""
        seen = self._fitting_state_mask
        if seen is not None and seen[0]() is bits and seen[1] == bits._version:
            return True
        shape = (self.out_features, self.in_features)
        if not (packed_is_nm_sparse(bits, shape, self.n, self.m) if mask is None else is_nm_sparse(mask, self.n, self.m, exact=True)):
            return False
        self._fitting_state_mask = (weakref.ref(bits), bits._version)
        return True

    def _upgrade_legacy_masks(self, state_dict: dict, prefix: str, error_msgs: list[str]) -> None:
        """In ``state_dict`` (in place), replace bool ``mask`` / ``mask_t`` entries (checkpoints
        written before masks were stored packed) by packed ``mask_bits`` / ``mask_t_bits``; report
        masks of the wrong dtype or shape in ``error_msgs``. Idempotent (the old entries are popped)."""
        name = self.layer_name or prefix.rstrip(".") or type(self).__name__
        shape = (self.out_features, self.in_features)
        for old, new in (("mask", "mask_bits"), ("mask_t", "mask_t_bits")):
            mask = state_dict.pop(prefix + old, None)  # written before masks were stored packed
            if mask is None:
                continue
            if mask.dtype != torch.bool or tuple(mask.shape) != shape:
                error_msgs.append(
                    f"{name}: the checkpoint's {old} is {mask.dtype} {tuple(mask.shape)}, expected bool {shape}; "
                    "load a checkpoint of this model's layer shapes"
                )
            else:
                state_dict.setdefault(prefix + new, pack_mask(mask))

    # ------------------------------------------------------------------ kept positions
    def _kept_offsets(self) -> torch.Tensor:
        """``int64 (out, in/M, N)``: where, inside each group of M inputs, the N kept entries sit
        (ascending, so gathering them gives ``values``' row order); see :meth:`_kept_offsets_int8`."""
        return self._kept_offsets_int8().long()

    def _kept_offsets_int8(self) -> torch.Tensor:
        """:meth:`_kept_offsets` as int8, cached per mask version; computing it checks that ``M``
        keeps exactly N of every M (so the fused 2:4 kernels, which trust the mask, may call this
        to validate it once per mask change). Gather/scatter with it is ~10x faster than
        ``masked_select``/``masked_scatter``."""
        key = self._mask_key()
        if self._offsets is None or self._offsets[0] != key:
            self._check_mask()
            groups = self.mask.view(self.out_features, -1, self.m)
            order = torch.sort(groups.to(torch.uint8), dim=-1, descending=True, stable=True).indices
            self._offsets = (key, order[..., : self.n].to(torch.int8))
        return self._offsets[1]

    def _mask_key(self) -> tuple:
        """Identifies the current ``M`` (its packed buffer's version): keys the caches derived from it."""
        bits = self.mask_bits
        return (bits._version, bits.data_ptr(), bits.device)

    def _check_mask(self) -> None:
        """Validate that ``M`` keeps exactly N of every M inputs, once per M version (the fused
        kernels and the backend structures trust it)."""
        key = self._mask_key()
        if self._validated_mask == key:
            return
        if not bool((self.mask.view(self.out_features, -1, self.m).sum(-1) == self.n).all()):
            raise ValueError(
                f"{self.layer_name or 'SparseLinear'}: mask does not keep exactly {self.n} of every {self.m} "
                "inputs; load a mask of this layer's sparsity (or re-prune the model)"
            )
        self._validated_mask = key

    def _triton_2to4(self, *tensors: torch.Tensor) -> bool:
        """Whether the one-pass 2:4 Triton kernels of :mod:`slope.kernels` serve this layer for
        ``tensors`` (2:4 and CUDA); they trust ``M``, so this validates it first (once per M version)."""
        if (self.n, self.m) != (2, 4) or not kernels.triton_usable(*tensors):
            return False
        self._check_mask()
        return True

    def _gather_kept(self, full: torch.Tensor) -> torch.Tensor:
        """The kept entries of a dense ``(out, in)`` tensor as ``(out, in·N/M)`` (``values``' layout)."""
        groups = full.reshape(self.out_features, -1, self.m)
        return groups.gather(-1, self._kept_offsets()).reshape(self.out_features, -1)

    # ------------------------------------------------------------------ inspection
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Current ``W ⊙ M`` as a dense ``(out, in)`` tensor (a fresh copy) in ``dtype`` (default:
        ``values``' dtype; built in it directly, without a full-size copy in ``values``' dtype)."""
        dtype = self.values.dtype if dtype is None else dtype
        values = self.values.detach()
        if self._triton_2to4(values):  # one Triton pass on CUDA
            return kernels.scatter_kept_2to4(values, self.mask_bits, dtype)
        return self._scatter_kept(values, dtype)

    def _scatter_kept(self, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`_gather_kept`: a ``(out, in·N/M)`` tensor in ``values``' layout as a
        dense ``(out, in)`` tensor of ``dtype``, zero where ``M`` prunes."""
        if kept.shape[0] != self.out_features and self.values_holder is not None:
            raise RuntimeError(f"{self.layer_name or 'SparseLinear'}: its values are sharded (wrap_fsdp2) and another rank holds "
                               "them; read the whole model with slope.parallel.full_model_state_dict(model) on every rank")
        dense = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=kept.device)
        groups = dense.view(self.out_features, -1, self.m)
        groups.scatter_(-1, self._kept_offsets(), kept.to(dtype).view(self.out_features, -1, self.n))
        return dense

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Change ``M`` to ``mask`` (bool ``(out, in)``, exactly N of every M inputs) between
        optimizer steps (dynamic sparsity: RigL). Weights kept by both masks keep their values;
        entries that join or leave ``M`` are zero. Every tensor in ``values``' layout moves to the
        new positions the same way: :attr:`values_grad` and each per-entry state tensor that
        ``optimizer`` (e.g. :class:`slope.optimizers.ADAMWSparse`) holds for :attr:`values`
        (Adam's moments: carried over where kept, zero where grown). ``M_t`` is recomputed. Returns the bool ``(out, in)`` tensor of changed entries."""
        mask = self._checked_mask(mask, "mask")
        groups = mask.view(self.out_features, -1, self.m).sum(-1)
        if not bool((groups == self.n).all()):
            raise ValueError(
                f"{self.layer_name or 'SparseLinear'}: set_mask needs exactly {self.n} kept of every {self.m} inputs; "
                "build the mask with slope.masks.nm_mask_from_scores"
            )
        changed = mask ^ self.mask
        state = {} if optimizer is None else optimizer.state.get(self.values, {})
        moved = {key: t for key, t in state.items() if torch.is_tensor(t) and t.shape == self.values.shape}
        if self.values_grad is not None:
            moved[None] = self.values_grad
        dense = {key: self._scatter_kept(t, t.dtype).masked_fill_(changed, 0) for key, t in moved.items()}
        weight = self._scatter_kept(self.values.detach(), self.values.dtype).masked_fill_(changed, 0)
        self._set_mask(mask)
        self.values.copy_(self._gather_kept(weight))
        for key, full in dense.items():
            moved[key].copy_(self._gather_kept(full))
        self.update_mask_t()
        return changed

    def backward_weight(self) -> torch.Tensor:
        """Current ``W ⊙ M ⊙ M_t`` as a dense ``(out, in)`` tensor (a fresh copy)."""
        return self.dense_weight() * self.mask_t

    @property
    def weight(self) -> torch.Tensor:
        """Dense view of the effective weight, for code that reads ``layer.weight`` (a copy)."""
        return self.dense_weight()

    @torch.no_grad()
    def update_mask_t(self) -> None:
        """Recompute ``M_t`` from the current ``W ⊙ M`` (``M_t = M`` without double pruning)."""
        if self.double_pruning and self.mask_type != "transposable" and (self.n, self.m) == (2, 4):
            # Triton on CUDA (one pass), else slope.masks.double_prune_mask (the same mask)
            self._set_mask_t(kernels.double_prune_mask_2to4(self.dense_weight(), self.mask_bits))
        elif self.double_pruning and self.mask_type != "transposable":
            self._set_mask_t(double_prune_mask(self.dense_weight(), self.mask, self.n, self.m))
        else:
            self.mask_t_bits.copy_(self.mask_bits)
        self.refresh()

    def refresh(self) -> None:
        """Drop cached backend operands (they are rebuilt on next use). The metadata derived from
        the mask M alone is kept: it is keyed by M's version, so any change of M re-derives it."""
        self._operands.clear()

    # ------------------------------------------------------------------ backend plumbing
    def _backend_for(
        self, dtype: torch.dtype, device: torch.device, which: str = "forward", tokens: int | None = None,
        training: bool = False,
    ) -> SparseBackend:
        """The backend multiplying the ``which`` operand ("forward" ``(out, in)`` or "backward"
        ``(in, out)``) by ``tokens`` rows. Only ``"auto"`` on CUDA can differ between directions
        and token counts: it is timed per operand shape and token bucket against a dense matmul
        (:mod:`slope.backends.auto`; for ``training`` calls the operand's rebuild after each
        optimizer step counts too), so each product is never slower than dense."""
        if self.compress and self.backend_name == "auto" and _auto_is_timed(device):
            from slope.backends.auto import AUTO_CHOOSER

            key = (which, dtype, device, AUTO_CHOOSER.bucket(tokens), training)
            if key not in self._backends:
                shape = (self.out_features, self.in_features) if which == "forward" else (self.in_features, self.out_features)
                self._backends[key] = AUTO_CHOOSER.choose(
                    shape, dtype, device, self.tiling, tokens, direction=which, training=training,
                    allow_timing=self.optimizer_steps < AUTO_CHOOSER.timed_steps,  # never inside a loop's later steps
                )
            return self._backends[key]
        key = ("both", dtype, device)
        if key not in self._backends:
            cls = resolve_backend(self.backend_name, self.compress, device, dtype)
            if not cls.any_nm and (self.n, self.m) != (2, 4):
                raise ValueError(f"{self.layer_name}: backend {cls.name!r} supports 2:4 only, not {self.n}:{self.m}")
            self._backends[key] = cls(tiling=self.tiling)
        return self._backends[key]

    def _operand(self, which: str, dtype: torch.dtype, device: torch.device, backend: SparseBackend | None = None):
        """The cached forward (``W⊙M``) or backward (``(W⊙M⊙M_t)ᵀ``) operand of ``backend``
        (default: the one :meth:`_backend_for` gives for the largest token bucket), rebuilt when
        stale or when it was built for another backend.

        For 2:4 layers on backends that build operands from kept values (``operand_structure``),
        neither operand goes through a dense weight: the forward one is ``values`` cast to
        ``dtype``, the backward one :func:`slope.kernels.transpose_kept_2to4` of them; the metadata
        of each depends on a mask only and is cached per mask version."""
        if backend is None:
            backend = self._backend_for(dtype, device, which, training=which == "backward")
        # One slot per direction: an operand of another backend (auto, another token bucket)
        # replaces it, so a layer never holds more operands than before token buckets existed.
        # The forward operand depends on W and M only (the inference-only form has no M_t).
        version = self._operand_version(which, backend.name)
        key = (which, dtype, device)
        cached = self._operands.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        if which == "backward" and not backend.any_nm and not self.double_pruning:
            raise ValueError(
                f"{self.layer_name}: an exact (not double-pruned) backward is not 2:4 along out; "
                "it needs compress=False"
            )
        buffer = None  # the operand's own kept values, which a fused optimizer step may refresh in place
        with torch.no_grad():
            structure = self._operand_structure(backend, which, dtype, device)
            values = self.values.detach()
            if structure is not None or self._triton_2to4(values):  # from kept values (one Triton pass)
                mask_t = self.mask_t_bits if which == "backward" else None  # the inference-only form has no M_t
                operand, kept = operand_from_kept(backend, which, values, self.mask_bits, mask_t, dtype, structure)
                held = None if kept is None else backend.operand_values(operand)
                if kept is not values and held is not None and held.data_ptr() == kept.data_ptr():
                    buffer = kept
            elif which == "forward":
                operand = backend.make_operand(self.dense_weight(dtype), self.mask)
            else:
                mask_t = self.mask_t
                backward_t = self.dense_weight(dtype).mul_(mask_t).t().contiguous()
                operand = backend.make_operand(backward_t, mask_t.t().contiguous())
        self._operands[key] = (version, operand, buffer)
        return operand

    def _operand_version(self, which: str, backend_name: str) -> tuple:
        """What a cached ``which`` operand depends on: the values and masks it was built from (their
        version counters and storage) and the backend; a cached operand of another key is stale."""
        sources = (self.values, self.mask_bits) + ((self.mask_t_bits,) if which == "backward" else ())
        return (*((t._version, t.data_ptr()) for t in sources), backend_name)

    def operand_buffers(self) -> dict[str, torch.Tensor]:
        """For each direction ("forward" ``(out, in/2)``, "backward" ``(in, out/2)``) whose cached
        operand is current and holds its kept values in a tensor of its own (a compute dtype other
        than ``values``'): that tensor. Writing the operand's new values into it (what
        :func:`slope.kernels.adamw_step_operands_` does) and then calling
        :meth:`operands_written` replaces the rebuild after an optimizer step."""
        found = {}
        for (which, _, _), (version, _, buffer) in self._operands.items():
            if buffer is not None and which not in found and version == self._operand_version(which, version[-1]):
                found[which] = buffer
        return found

    def operands_written(self, written: dict[str, torch.Tensor]) -> None:
        """After the values changed: the operands whose buffers (:meth:`operand_buffers`) are in
        ``written`` hold the new values and stay cached; every other operand is dropped (rebuilt on
        next use). Call it right after changing the values, before anything else changes them."""
        kept = {}
        for key, (version, operand, buffer) in self._operands.items():
            if buffer is not None and written.get(key[0]) is buffer:
                kept[key] = (self._operand_version(key[0], version[-1]), operand, buffer)
        self._operands = kept

    def _operand_structure(self, backend: SparseBackend, which: str, dtype: torch.dtype, device: torch.device):
        """``backend.operand_structure`` of the ``which`` operand's stored pattern, cached per
        version of the mask it depends on (``M`` forward; ``M_t`` backward, whose transpose keeps
        at most 2 of 4 and is completed by :func:`slope.kernels.stored_mask_2to4`). None: the
        backend builds operands with ``make_operand`` (also for every layer that is not 2:4)."""
        if (self.n, self.m) != (2, 4) or self.values.device != device:
            return None
        if type(backend).operand_structure is SparseBackend.operand_structure:
            return None  # builds every operand with make_operand
        self._check_mask()  # the structures and kernels trust M
        stored = self.mask_bits if which == "forward" else self.mask_t_bits
        version = (stored._version, stored.data_ptr())
        key = (which, dtype, device, id(backend))
        cached = self._structures.get(key)
        if cached is None or cached[0] != version:
            pattern = operand_pattern(which, unpack_mask(stored, (self.out_features, self.in_features)))
            cached = (version, backend.operand_structure(pattern, dtype))
            self._structures[key] = cached
        return cached[1]

    @torch.no_grad()
    def _accumulate_grad(self, full_grad: torch.Tensor) -> None:
        """Add ``(dyᵀ x) ⊙ M`` (given dense ``(out, in)``) to :attr:`values_grad`, kept compressed
        in ``values``' dtype (2:4 on CUDA: one Triton gather; the first micro-batch's gradient —
        ``values_grad`` None, or zeroed by :meth:`zero_values_grad` and untouched since — is
        written into a fresh resp. that buffer, never added to zeros; later ones are added).
        With :attr:`keep_dense_grad` also add the whole ``dyᵀ x`` to :attr:`dense_grad` (fp32)."""
        if self.keep_dense_grad:
            if self.dense_grad is None:
                self.dense_grad = full_grad.float()
            else:
                self.dense_grad.add_(full_grad)
        grad, zeroed = self.values_grad, self._grad_is_zero()
        self._zeroed_grad = None
        self._backwards_since_zero = 1 if grad is None or zeroed else self._backwards_since_zero + 1
        if self._backwards_since_zero == UNSTEPPED_BACKWARDS_WARNING:
            warnings.warn(
                f"a SLoPe layer's values_grad has added up {UNSTEPPED_BACKWARDS_WARNING} backward passes without being "
                "zeroed: the 2:4 weights train only through slope.ADAMWSparse(model) (torch optimizers skip them); "
                "step it and call its zero_grad() every iteration, beside your dense optimizer", stacklevel=2)
        if self._triton_2to4(full_grad, self.values):
            if grad is None:
                self.values_grad = kernels.gather_kept_2to4(full_grad, self.mask_bits, dtype=self.values.dtype)
            else:
                kernels.gather_kept_2to4(full_grad, self.mask_bits, out=grad, accumulate=not zeroed)
            return
        kept = self._gather_kept(full_grad).to(self.values.dtype)
        if grad is None:
            self.values_grad = kept
        elif zeroed:
            grad.copy_(kept)
        else:
            grad.add_(kept)

    def zero_values_grad(self, set_to_none: bool = True) -> None:
        """Drop :attr:`values_grad` (``set_to_none``) or zero it; a zeroed gradient that nothing
        changes before the next backward is overwritten there, not added to."""
        if set_to_none or self.values_grad is None:
            self.values_grad = None
            self._zeroed_grad = None
            return
        self.values_grad.zero_()
        self._zeroed_grad = (self.values_grad, self.values_grad._version)

    def _grad_is_zero(self) -> bool:
        """Whether :attr:`values_grad` is the tensor :meth:`zero_values_grad` zeroed, unchanged since."""
        marked = self._zeroed_grad
        grad = self.values_grad
        return marked is not None and marked[0] is grad and grad._version == marked[1]

    # ------------------------------------------------------------------ forward
    # torch.compile runs this forward as it is (a graph break around the layer): its operand caches
    # are keyed on tensor versions and storage, which a traced graph would not re-check. (Calling the
    # wrapper only while compiling saves ~2 µs per eager call, but dynamo then compiles this frame
    # itself, once per grad mode, dtype and requires_grad: twice the frames; not worth it.)
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name or 'SparseLinear'}: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        dtype = _compute_dtype(x, self.values.dtype, self)
        bias = self.bias
        if not torch.is_grad_enabled() or not (
            self.sparse_requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
        ):
            # Nothing to differentiate (inference, evaluation): skip the autograd Function, whose
            # per-call cost shows when decoding a token at a time.
            with _values_held(self):
                y = _sparse_product(self, x.to(dtype), None if bias is None else bias.detach(), training=False)
        else:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{self.layer_name or 'SparseLinear'}: torch.func transforms (grad, vjp, jacrev, vmap, ...) do not run "
                    "through a SLoPe layer's autograd (its weight gradient goes to values_grad): differentiate with "
                    "loss.backward() (vmap runs under torch.no_grad())"
                )
            anchor = None
            if self.sparse_requires_grad:
                # A fresh leaf that requires grad makes autograd run our backward even when neither
                # the input nor the bias needs a gradient (first layer without bias).
                anchor = torch.empty(0, device=x.device, requires_grad=True)
            y = _SparseLinearFunction.apply(x, bias, anchor, self, dtype)
        if self.lora_rank:
            y = y + self._lora_delta(x, dtype)
        return y

    # ------------------------------------------------------------------ lazy low-rank adapters
    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """Attach adapters ``y += (α/r)·(x (A⊙M_A)ᵀ) Bᵀ``: ``lora_A (r, in)`` N:M along ``in``,
        ``lora_B (out, r)`` zero-initialised (so the function is unchanged at attach time)."""
        if self.lora_rank:
            raise RuntimeError(f"{self.layer_name}: adapters already attached (rank {self.lora_rank})")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"lora rank must be a positive int, got {rank!r}")
        if rank >= min(self.in_features, self.out_features):
            warnings.warn(f"{self.layer_name or 'SparseLinear'}: lora rank {rank} >= min(in, out) = "
                          f"{min(self.in_features, self.out_features)} gives no low-rank savings; pick a smaller rank",
                          UserWarning, stacklevel=2)
        factory = {"device": self.values.device, "dtype": self.values.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.register_buffer("lora_A_mask", nm_mask(self.lora_A, self.n, self.m))
        with torch.no_grad():
            self.lora_A.mul_(self.lora_A_mask)
        self.lora_rank = rank
        self.lora_alpha = float(rank if alpha is None else alpha)

    def remove_lora(self) -> None:
        """Detach the adapters :meth:`add_lora` attached: the layer computes ``x(W⊙M)ᵀ + b`` again."""
        if not self.lora_rank:
            raise RuntimeError(f"{self.layer_name or 'SparseLinear'}: no adapters attached")
        del self.lora_A, self.lora_B, self.lora_A_mask
        self.lora_rank = 0

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def _lora_delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        a = (self.lora_A * self.lora_A_mask).to(dtype)
        return F.linear(F.linear(x.to(dtype), a), self.lora_B.to(dtype)) * self.lora_scaling

    # ------------------------------------------------------------------ misc
    def __getstate__(self):
        # Cached operands and backend objects (GPU handles) are rebuilt on use, never copied/pickled.
        state = super().__getstate__()
        state["_operands"], state["_structures"], state["_backends"], state["_offsets"] = {}, {}, {}, None
        state["_validated_mask"] = state["_fitting_state_mask"] = None
        state["_zeroed_grad"] = None
        state["values_holder"] = None  # (a process group is not copied; a sharded layer's copy holds its placeholder)
        return state

    def __setstate__(self, state):
        state.setdefault("_structures", {})  # layers pickled before the cache existed
        state.setdefault("_validated_mask", None)
        state.setdefault("_fitting_state_mask", None)
        state.setdefault("weight_transposed", False)
        state.setdefault("keep_dense_grad", False)  # layers pickled before dynamic sparsity
        state.setdefault("dense_grad", None)
        state.setdefault("_zeroed_grad", None)
        state.setdefault("_backwards_since_zero", 0)
        state.setdefault("optimizer_steps", 0)
        state.setdefault("values_holder", None)
        buffers = state.get("_buffers", {})
        for old, new in (("mask", "mask_bits"), ("mask_t", "mask_t_bits")):  # pickled with bool masks
            if old in buffers:
                buffers[new] = pack_mask(buffers.pop(old))
        super().__setstate__(state)
        registry.register(self)  # copies (copy.deepcopy, pickle) are live layers too

    def _apply(self, fn, recurse=True):
        self._operands.clear()
        self._structures.clear()
        self._backends.clear()
        if self.values_grad is not None:
            self.values_grad = fn(self.values_grad)
        if self.dense_grad is not None:
            self.dense_grad = fn(self.dense_grad)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        backend = "simulated" if not self.compress else self.backend_name
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.n}:{self.m}, backend={backend}, double_pruning={self.double_pruning}"
            + (f", lora_rank={self.lora_rank}" if self.lora_rank else "")
        )
