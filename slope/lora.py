"""Merged sparse + low-rank inference (DESIGN §5) and the inference-only form of a pruned model.

A SLoPe layer with adapters computes ``y = x (W⊙M)ᵀ + (α/r)·(x (A⊙M_A)ᵀ) Bᵀ + b`` with
``W (out, in)``, ``A (r, in)``, ``B (out, r)``. Both ``W⊙M`` and ``A⊙M_A`` are N:M along ``in``, so
the merged form stacks them into **one** sparse operand ``S = [W⊙M ; A⊙M_A]`` of shape
``(out + r, in)`` and runs

1. one sparse GEMM ``u = x Sᵀ`` of shape ``(..., out + r)``;
2. one fused add-mm with the bias ``u[..., :out] += (α/r)·u[..., out:] Bᵀ + b``
   (:func:`slope.kernels.addmm`, one Triton pass on CUDA);

and returns the view ``u[..., :out]`` (row stride ``out + r`` or more; no copy). Backends pad
operands to their own alignment themselves. That is the ``stacked`` fold; the ``extended`` fold
instead sums the low-rank term inside the one GEMM, ``[x | ũ] · [W⊙M | B̃]ᵀ + b`` with ``B̃`` stored
2:4 (no add-mm pass, contiguous output; :mod:`slope.inference.fold`, chosen per layer by
``merge_lora(model, fold=...)``).

Usage, the SLoPe way (build the merged model, then load the trained weights)::

    prune_model(model, add_lora=True, lora_rank=r, merge_lora=True)
    model.load_state_dict(trained_state)       # same keys as the unmerged model
    report = freeze_for_inference(model)       # optional: drop M_t, gradients, requires_grad

A merged layer keeps every tensor of the unmerged one (``values``, ``mask_bits``, ``mask_t_bits``,
``bias``, ``lora_A``, ``lora_B``, ``lora_A_mask``), so state dicts move between the two forms; the
stacked operand is derived from them and rebuilt lazily whenever one changes (version-keyed cache).
The inference-only form (:func:`freeze_for_inference`) drops the derived ``mask_t_bits`` and keeps
each weight once: ``values`` (and, extended, ``lora_B``) become views of the operand, whose
operand then holds ``mask_bits`` (and, stacked, ``lora_A`` and ``lora_A_mask``) where the backend
can read them back (:mod:`slope.inference.operand_held`; the state dict still has them).
Merged layers are for inference: their forward works with or without autograd enabled, but a
backward through them is an error (also in training mode when nothing before them requires grad),
and so is :class:`~slope.optimizers.ADAMWSparse` over them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import slope.kernels as kernels
from slope.inference.fold import FOLDS, choose_fold, extended_weight, scaled_lora_a
from slope.inference.operand_held import HeldByOperand
import slope.layer as _layer_module
from slope.layer import SparseLinear, _compute_dtype
from slope.registry import sparse_modules

__all__ = ["FOLDS", "MergedSparseLinear", "MemoryReport", "merge_lora", "set_decode_kernel", "set_lora_fold", "freeze_for_inference", "effective_weight"]

#: decode kernels of merged layers (:func:`set_decode_kernel`), and the most rows ``fused`` takes.
DECODE_KERNELS = ("gemm", "fused")
DECODE_ROWS = kernels.reference.MERGED_DECODE_MAX_ROWS


class _NoBackward(torch.autograd.Function):
    """Runs the merged product when autograd is recording; a backward through it is an error.
    ``anchor``: ``None``, or an empty leaf that requires grad, which makes autograd reach this
    backward (and its error) when neither the input nor anything before it requires grad."""

    @staticmethod
    def forward(ctx, x, layer, dtype, anchor=None):
        ctx.layer_name = layer.layer_name or "MergedSparseLinear"
        return layer._merged_product(x, dtype)

    @staticmethod
    def backward(ctx, du):
        raise RuntimeError(
            f"{ctx.layer_name} is in the merged inference form (slope.lora.merge_lora) and has no backward; "
            "train the unmerged model (prune_model(..., merge_lora=False)) and merge after training"
        )


class MergedSparseLinear(HeldByOperand, SparseLinear):
    """Inference form of :class:`~slope.layer.SparseLinear` (see the module docstring).

    Layers become this class in place (``layer.__class__`` is swapped, as
    ``torch.nn.utils.parametrize`` does), so the object, its tensors, hooks and state-dict keys
    stay the same. :func:`merge_lora` converts layers with adapters; :func:`freeze_for_inference`
    converts every SLoPe layer (one without adapters runs the same path with ``r = 0``) and drops
    ``M_t`` (``mask_t_bits``). Once an inference-only layer has built its operand, the operand
    holds its masks and, stacked, ``lora_A`` (:mod:`slope.inference.operand_held`).
    """

    # ------------------------------------------------------------------ the stacked operand
    @torch.no_grad()
    def stacked_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dense (out + r, in), mask (out + r, in) bool)`` of ``[W⊙M ; A⊙M_A]`` in ``values``' dtype."""
        dense, mask = [self.dense_weight()], [self.mask]
        if self.lora_rank:
            a_mask = self.lora_A_mask
            dense.append(torch.where(a_mask, self.lora_A.detach(), torch.zeros((), dtype=self.lora_A.dtype, device=a_mask.device)).to(self.values.dtype))
            mask.append(a_mask)
        return torch.cat(dense), torch.cat(mask)

    @property
    def fold(self) -> str:
        """``stacked`` or ``extended``: how this layer's adapters enter the GEMM (:mod:`slope.inference.fold`)."""
        return self.__dict__.get("lora_fold", "stacked") if self.lora_rank else "none"

    def _merged_operand(self, dtype: torch.dtype, device: torch.device, backend):
        """``backend``'s operand of the merged weight (:meth:`stacked_weight` or, for the
        ``extended`` fold, :func:`~slope.inference.fold.extended_weight` plus the scaled ``A``) in
        ``dtype``, cached until a source changes. Without adapters that is the layer's forward
        operand, which backends that build operands from kept values share with ``values`` (no
        second copy of the weights when ``dtype`` is theirs). With adapters, an inference-only
        layer whose ``values`` are in ``dtype`` shares them with the operand instead
        (:meth:`_share_values`)."""
        key = ("merged", dtype, device) if self.lora_rank else ("forward", dtype, device)
        cached = self._operands.get(key)
        if cached is not None and cached[0] == self._merged_version_at(key, backend):
            return cached[1]
        self._restore_held()  # the build reads the held tensors as the layer's again; the new operand holds them
        operand = self._build_merged_operand(key, dtype, device, backend)
        self._hold(key, backend)
        return operand

    def _build_merged_operand(self, key: tuple, dtype: torch.dtype, device: torch.device, backend):
        if not self.lora_rank:
            return self._operand("forward", dtype, device, backend)
        fold = self.fold
        with torch.no_grad():
            if fold == "extended":
                dense, mask = extended_weight(self)
                operand = (backend.make_operand(dense.to(dtype), mask), scaled_lora_a(self, dtype))
            else:
                dense, mask = self.stacked_weight()
                operand = backend.make_operand(dense.to(dtype), mask)
            del dense, mask
            self._share_values(backend, operand[0] if fold == "extended" else operand, dtype)
        self._operands[key] = (self._merged_version(backend, fold), operand, None)  # (version, operand, own values buffer: see SparseLinear._operand)
        return operand

    def _source_versions(self, names) -> tuple:
        """``(version, storage)`` of each named tensor but those the operand holds (they change only
        after being given back, :mod:`slope.inference.operand_held`)."""
        held = () if self._held is None else self._held.names
        params, buffers, versions = self._parameters, self._buffers, []
        for name in names:  # the module's own dicts: no __getattr__ chain per tensor and call
            if name not in held:
                tensor = params[name] if name in params else buffers[name] if name in buffers else getattr(self, name)
                versions.append((tensor._version, tensor.data_ptr()))
        return tuple(versions)

    def _merged_version(self, backend, fold: str) -> tuple:
        return (*self._source_versions(("values", "mask_bits", "lora_A", "lora_A_mask", "lora_B")), backend.name, fold)  # one slot (see _operand)

    def _operand_version(self, which: str, backend_name: str) -> tuple:
        names = ("values", "mask_bits") + (("mask_t_bits",) if which == "backward" else ())
        return (*self._source_versions(names), backend_name)

    def _merged_version_at(self, key: tuple, backend) -> tuple:
        """The version the cached operand under ``key`` (``merged``, or ``forward`` without adapters) must carry."""
        return self._merged_version(backend, self.fold) if key[0] == "merged" else self._operand_version("forward", backend.name)

    def _share_values(self, backend, operand, dtype: torch.dtype) -> None:
        """Make ``values`` (and, in the ``extended`` fold, ``lora_B``) views of the operand's kept
        values when those hold them, so that an inference-only layer keeps each weight once, not
        twice. Row ``i`` of the held values starts with the ``in/2`` kept entries of ``W⊙M`` and,
        extended, goes on with ``B[i]`` (``B̃`` keeps entries 0 and 2 of each group of 4); each view
        is taken only where it equals the tensor it replaces (checked here, once per build)."""
        extended = self.fold == "extended"
        if not extended and _borrows_storage(self.lora_B):  # shared with an extended operand before use_fold
            self.lora_B.data = self.lora_B.detach().clone()  # (so that operand's storage can go)
        held = backend.operand_values(operand) if self.inference_only and self.values.dtype == dtype else None
        if held is None or held.dim() != 2 or held.shape[0] < self.out_features:
            return
        half, out = self.in_features // 2, self.out_features
        shares = [(self.values, 0)]
        if extended and self.lora_B.dtype == dtype:
            shares.append((self.lora_B, half))
        for tensor, start in shares:
            width = tensor.shape[1]
            if held.shape[1] >= start + width:
                view = held[:out, start : start + width]
                if view.dtype == tensor.dtype and torch.equal(view, tensor.detach()):
                    tensor.data = view

    # ------------------------------------------------------------------ forward
    def _merged_product(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``u (..., out + r)`` (``extended``: ``(..., out)``) whose first ``out`` columns are the
        layer's output (see module docstring). Call it with autograd off (the in-place adds are not
        differentiable)."""
        if self._derived:
            self._adopt_writes()
        try:
            return self._product(x, dtype)
        finally:
            if self._derived:  # what this product itself read of the held tensors (it writes none)
                self._let_go()

    def _product(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Autograd is off here (_merged_product), so no detach; each op skipped when it would be a
        # no-op: at decode sizes every dispatch shows (performance_experiments/host_overhead.py).
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if (self.lora_rank and x2.shape[0] <= DECODE_ROWS and self.__dict__.get("_decode_kernel") == "fused"  # (decode_kernel, no call)
                and self._fused_decode_runs(x2, dtype)):  # one launch (decoding)
            meta, a_scaled, b = self._decode_operands(dtype, x.device)
            y = kernels.merged_decode(x2, self._own_values(), meta, a_scaled, b, bias)
        else:
            y = self._gemm_product(x2, dtype, bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def _gemm_product(self, x2: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_product` of ``x2 (T, in)`` on the fold's kernels."""
        out, r = self.out_features, self.lora_rank
        backend = self._backend_for(dtype, x2.device, "forward", x2.shape[0])
        operand = self._merged_operand(dtype, x2.device, backend)
        if not r:  # no adapters: the bias add can go into the product (fused where the backend can)
            return backend.linear(x2, operand, bias)
        if self.fold == "extended":  # [x | ũ] · [W⊙M | B̃]ᵀ + b: one GEMM, bias in its epilogue
            weight, a_scaled = operand
            return backend.linear(kernels.lowrank_concat(x2, a_scaled), weight, bias)
        u = backend.matmul(x2, operand)
        b_t = self.lora_B.t()
        if b_t.dtype != dtype:
            b_t = b_t.to(dtype)
        kernels.addmm(u[:, out : out + r], b_t, u[:, :out], alpha=self.lora_scaling, bias=bias)
        return u

    @property
    def decode_kernel(self) -> str:
        """``gemm`` (the fold's kernels at every size) or ``fused`` (inputs of at most
        :data:`DECODE_ROWS` rows take :func:`slope.kernels.merged_decode`: one Triton launch per layer,
        CUDA only); set with :func:`set_decode_kernel`."""
        return self.__dict__.get("_decode_kernel", "gemm")  # (a plain attribute: no __getattr__ miss per call)

    def _fused_decode_runs(self, x2: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether :func:`slope.kernels.merged_decode` can run this layer on ``x2`` (the ``fused``
        decode kernel chosen: checked by the caller)."""
        values = self._own_values()
        return (self.n, self.m) == (2, 4) and values.dtype == dtype and kernels.triton_usable(x2, values)

    def _own_values(self) -> torch.Tensor:
        """``values`` read from the module's dict (no ``__getattr__`` chain per call; an attribute
        lookup where something else keeps it, e.g. a parametrization)."""
        values = self._parameters.get("values")
        return self.values if values is None else values

    def _decode_operands(self, dtype: torch.dtype, device: torch.device):
        """``(meta, s·A⊙M_A (R, in), B (out, r))`` of :func:`slope.kernels.merged_decode` in ``dtype``
        (the kept values are ``values`` themselves), cached until the mask or the adapters change."""
        key = ("decode", dtype, device)
        version = self._source_versions(("mask_bits", "lora_A", "lora_A_mask", "lora_B"))
        cached = self._operands.get(key)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                meta = kernels.compress_2to4(self.mask.to(dtype), self.mask)[1]
                b = self.lora_B.detach().to(dtype).contiguous()
                cached = (version, (meta, scaled_lora_a(self, dtype)[: self.lora_rank].contiguous(), b), None)
            self._operands[key] = cached
        return cached[1]

    def _backend_for(self, dtype, device, which="forward", tokens=None, training=False):
        """As :meth:`SparseLinear._backend_for`, but for an inference-only layer ``auto`` on CUDA
        picks one backend, once, among the sparse ones only, timed at the largest token bucket
        (prefill): a ``dense`` choice would hold a dense copy of the weight beside the compressed
        one (more memory than the dense model), and per-bucket choices would rebuild the layer's one
        operand at every switch between prefill and decode (docs/inference.md)."""
        if not (self.inference_only and self.compress and self.backend_name == "auto" and _layer_module._auto_is_timed(device)):
            return super()._backend_for(dtype, device, which, tokens, training)
        from slope.backends.auto import AUTO_CHOOSER

        key = ("sparse-only", dtype, device)
        if key not in self._backends:
            self._backends[key] = AUTO_CHOOSER.choose(
                (self.out_features, self.in_features), dtype, device, self.tiling, None, sparse_only=True,
            )
        return self._backends[key]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name or 'MergedSparseLinear'}: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        dtype = _compute_dtype(x, self._own_values().dtype, self)
        if not torch.is_grad_enabled():  # inference: no context manager on the per-token path
            u = self._merged_product(x, dtype)
        elif x.requires_grad or (self.training and any(p.requires_grad for p in self.parameters(recurse=False))):
            # training mode with trainable tensors of its own: a backward says this form is inference-only
            # (a frozen merged backbone under a trainable head stays out of the graph)
            anchor = None if x.requires_grad else torch.empty(0, device=x.device, requires_grad=True)
            u = _NoBackward.apply(x, self, dtype, anchor)
        else:
            with torch.no_grad():
                u = self._merged_product(x, dtype)
        return u if u.shape[-1] == self.out_features else u[..., : self.out_features]

    def use_fold(self, fold: str) -> None:
        """Fold the adapters ``stacked`` or ``extended`` from now on (the merged operand is rebuilt on next use)."""
        self._restore_held()
        self.lora_fold = fold
        self._operands.pop(next((k for k in self._operands if k[0] == "merged"), None), None)

    # ------------------------------------------------------------------ training-only API
    @property
    def inference_only(self) -> bool:
        """True once :func:`freeze_for_inference` dropped the training state (``mask_t``)."""
        return "mask_t_bits" not in self._buffers

    def update_mask_t(self) -> None:
        if self.inference_only:
            raise RuntimeError(f"{self.layer_name}: M_t was dropped by freeze_for_inference; the layer cannot train")
        super().update_mask_t()

    def backward_weight(self) -> torch.Tensor:
        if self.inference_only:
            raise RuntimeError(f"{self.layer_name}: M_t was dropped by freeze_for_inference; there is no backward weight")
        return super().backward_weight()

    # ------------------------------------------------------------------ saving and loading checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Saved ``values`` and ``lora_B`` are contiguous tensors of their own, also when they are
        views of the operand (:meth:`_share_values`): a checkpoint holds no operand bytes and shares
        no storage (safetensors refuses shared or strided tensors). ``keep_vars=True`` returns the
        parameters themselves."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("values", "lora_B") if not keep_vars else ():
            tensor = destination.get(prefix + name)
            if tensor is not None and (not tensor.is_contiguous() or _borrows_storage(tensor)):
                destination[prefix + name] = tensor.detach().clone(memory_format=torch.contiguous_format)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        name = self.layer_name or prefix.rstrip(".") or "MergedSparseLinear"
        lora_a = state_dict.get(prefix + "lora_A")
        if lora_a is not None and lora_a.shape[0] != self.lora_rank:
            error_msgs.append(
                f"{name}: the checkpoint's adapters have rank {lora_a.shape[0]} but this model was built with "
                f"lora_rank={self.lora_rank}; pass lora_rank={lora_a.shape[0]} to prune_model"
            )
        elif lora_a is None and self.lora_rank and prefix + "values" in state_dict:
            # (this layer's weights without adapters; a state without this layer at all is a partial
            # load, whose missing keys load_state_dict reports when strict: it passes strict=True here always)
            error_msgs.append(
                f"{name}: the checkpoint has no adapters (lora_A/lora_B) for this layer; load it into a model "
                "pruned without add_lora/merge_lora"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", merged, inference-only" if self.inference_only else ", merged")


def _borrows_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view into a larger storage (e.g. an operand's, :meth:`MergedSparseLinear._share_values`)."""
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()


def _to_merged(layer: SparseLinear, fold: str = "auto") -> None:
    layer.refresh()  # the unmerged forward/backward operands are no longer used
    layer._held, layer._derived = None, {}  # (slope.inference.operand_held)
    layer.__class__ = MergedSparseLinear
    layer.lora_fold = _layer_fold(layer, fold)


def _layer_fold(layer: SparseLinear, fold: str) -> str:
    """The fold of one layer: :func:`~slope.inference.fold.choose_fold`'s, ``stacked`` when the
    layer is not 2:4 (the extended operand's adapter columns are 2:4)."""
    chosen = choose_fold(fold, layer.in_features, layer.out_features, layer.lora_rank)
    return chosen if (layer.n, layer.m) == (2, 4) else "stacked"


def merge_lora(model: nn.Module, fold: str = "auto") -> nn.Module:
    """Convert, in place, every SLoPe layer of ``model`` that has adapters into the merged form.

    ``fold``: how the adapters enter the sparse GEMM, ``stacked``, ``extended`` or ``auto`` (per
    layer, the one moving fewer bytes; :mod:`slope.inference.fold`). Returns ``model``. Outputs
    are unchanged (fp32 to rounding, bf16 to bf16 tolerance). Errors: a model without SLoPe layers
    or without adapters, and a model whose adapters are all merged already.
    """
    choose_fold(fold, 1, 1, 1)  # an unknown fold is an error before anything changes
    layers = [m for _, m in sparse_modules(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLoPe layers; call slope.prune_model(model, add_lora=True, lora_rank=r) first")
    todo = [m for m in layers if m.lora_rank and not isinstance(m, MergedSparseLinear)]
    if not todo:
        if any(m.lora_rank and isinstance(m, MergedSparseLinear) for m in layers):
            raise RuntimeError("the adapters of this model are already merged (merge_lora was called twice)")
        raise ValueError(
            "no SLoPe layer of this model has adapters to merge; attach them with "
            "prune_model(..., add_lora=True, lora_rank=r) (or layer.add_lora(r)) first"
        )
    for layer in todo:
        _to_merged(layer, fold)
    return model


def set_decode_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Decode-sized inputs of every merged layer with adapters run on ``kernel``: ``gemm`` (the
    default: the fold's kernels) or ``fused`` (:func:`slope.kernels.merged_decode`, one Triton launch
    per layer on CUDA; elsewhere the GEMM path). Returns ``model``."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {kernel!r} unknown; choose one of {', '.join(DECODE_KERNELS)}")
    layers = [m for _, m in sparse_modules(model) if isinstance(m, MergedSparseLinear) and m.lora_rank]
    if not layers:
        raise ValueError("the model has no merged layers with adapters; call slope.merge_lora(model) first")
    for layer in layers:
        layer._decode_kernel = kernel
    return model


def set_lora_fold(model: nn.Module, fold: str) -> nn.Module:
    """Switch every merged layer of ``model`` that has adapters to ``fold`` (``stacked``,
    ``extended`` or ``auto``); their operands are rebuilt on next use. Returns ``model``."""
    choose_fold(fold, 1, 1, 1)
    layers = [m for _, m in sparse_modules(model) if isinstance(m, MergedSparseLinear) and m.lora_rank]
    if not layers:
        raise ValueError("the model has no merged layers with adapters; call slope.merge_lora(model) first")
    for layer in layers:
        layer.use_fold(_layer_fold(layer, fold))
    return model


def effective_weight(layer: SparseLinear, state: dict[str, torch.Tensor] | None = None, prefix: str = "") -> torch.Tensor:
    """The dense ``(out, in)`` weight the layer computes with: ``W⊙M + (α/r)·B (A⊙M_A)`` (fp32 math,
    ``values``' dtype), e.g. to export a pruned model as an ordinary dense one. ``state``: take
    ``values``, ``lora_A`` and ``lora_B`` from this whole state dict (keys ``prefix + name``)
    instead of the layer, whose own may be shards (FSDP2, sharded values); the masks are the layer's."""
    def tensor(name: str) -> torch.Tensor:
        return getattr(layer, name).detach() if state is None else state[prefix + name].to(layer.mask_bits.device)

    values = tensor("values")
    # (the layer's own: dense_weight, one Triton pass on CUDA)
    weight = layer.dense_weight(torch.float32) if state is None else layer._scatter_kept(values, torch.float32)
    if layer.lora_rank:
        lora_a = tensor("lora_A")
        a = torch.where(layer.lora_A_mask, lora_a, torch.zeros((), dtype=lora_a.dtype, device=lora_a.device))
        weight = weight + layer.lora_scaling * (tensor("lora_B").float() @ a.float())
    return weight.to(values.dtype)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a model before and after :func:`freeze_for_inference`.

    ``gradients`` counts ``param.grad`` and the SLoPe layers' compressed ``values_grad``.
    """

    parameters_before: int
    buffers_before: int
    gradients_before: int
    parameters_after: int
    buffers_after: int
    gradients_after: int

    @property
    def total_before(self) -> int:
        return self.parameters_before + self.buffers_before + self.gradients_before

    @property
    def total_after(self) -> int:
        return self.parameters_after + self.buffers_after + self.gradients_after

    def __str__(self) -> str:
        rows = [
            ("parameters", self.parameters_before, self.parameters_after),
            ("buffers", self.buffers_before, self.buffers_after),
            ("gradients", self.gradients_before, self.gradients_after),
            ("total", self.total_before, self.total_after),
        ]
        return ", ".join(f"{name} {before / 2**20:.3f} -> {after / 2**20:.3f} MiB" for name, before, after in rows)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _memory(model: nn.Module) -> tuple[int, int, int]:
    grads = [p.grad for p in model.parameters()] + [m.values_grad for _, m in sparse_modules(model)]
    return _nbytes(model.parameters()), _nbytes(model.buffers()), _nbytes(grads)


def freeze_for_inference(model: nn.Module) -> MemoryReport:
    """Turn a pruned model into its inference-only form, in place, and report the memory saved.

    Every SLoPe layer becomes a :class:`MergedSparseLinear` (adapters, where present, merged),
    loses its training state (``mask_t``, the compressed gradient ``values_grad``, cached
    backward operands), and the whole model gets ``requires_grad=False``, no ``.grad`` and
    ``eval()`` mode. Registry entries stay. A training checkpoint still loads into the frozen
    model (its ``mask_t`` entries are ignored), and the frozen model's state dict loads into an
    unmerged one (which rebuilds ``M_t``). Returns a :class:`MemoryReport`.
    """
    layers = [m for _, m in sparse_modules(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLoPe layers; call slope.prune_model(model) first")
    before = _memory(model)
    for layer in layers:
        if not isinstance(layer, MergedSparseLinear):
            _to_merged(layer)
        layer.values_grad = None
        layer.sparse_requires_grad = False
        if not layer.inference_only:
            del layer.mask_t_bits
    for p in model.parameters():
        p.grad = None
    model.requires_grad_(False)
    model.eval()
    return MemoryReport(*before, *_memory(model))
