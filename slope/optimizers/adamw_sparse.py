"""``ADAMWSparse``: AdamW over the kept weights of SLoPe layers (installed as ``slope.optimizers``)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from slope import kernels
from slope.optimizers.sharding import LayerOwners
from slope.parallel.sharded import full_tensor, is_sharded, local_tensor
from slope.registry import GradDict, live_layers, sparse_modules

__all__ = ["ADAMWSparse"]

#: PyTorch's fused AdamW kernel (CPU and CUDA; the one ``torch.optim.AdamW(fused=True)`` runs),
#: or None on a PyTorch without it.
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


def _refuse_merged(model: nn.Module, layers: list[nn.Module]) -> None:
    """A one-line ``ValueError`` when ``model``'s SLoPe layers are in the merged inference-only form
    (they get no gradients: a step would silently change nothing)."""
    from slope.lora import MergedSparseLinear

    merged = [layer.layer_name or "?" for layer in layers if isinstance(layer, MergedSparseLinear)]
    if merged:
        raise ValueError(
            f"ADAMWSparse: {len(merged)} SLoPe layers of {type(model).__name__} (e.g. {merged[0]}) are in the merged "
            "inference-only form (merge_lora / freeze_for_inference), which does not train: train the unmerged model "
            "(prune_model(..., add_lora=True) without merge_lora) and merge after training"
        )


def _values_holder(layers):
    """:func:`slope.parallel.sharded_values.values_holder_of` (imported on use: that module imports this package's)."""
    from slope.parallel.sharded_values import values_holder_of as holder_of

    return holder_of(layers)


class ADAMWSparse(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose parameters are the SLoPe layers' kept values.

    Gradients come from each layer's compressed ``values_grad`` (never ``param.grad``), so passing
    ``model.parameters()`` to a dense optimizer as well never updates the sparse weights twice.
    State (fp32 ``exp_avg``/``exp_avg_sq``) exists only for kept entries: ``(out, in·N/M)`` each.
    After every ``mask_change_freq``-th step the layers' double-pruned masks ``M_t`` are
    recomputed from the updated weights.

    Args:
        model: the pruned model, or ``None`` for every live SLoPe layer (SLoPe's global style).
        grad_dict: accepted for SLoPe compatibility (``slope.grad_dict``); gradients are always
            read from the layers themselves.
        shard_state: under data parallelism (gradients already averaged over the ranks), keep each
            layer's moments on one rank only, which steps it and broadcasts its new values
            (:mod:`slope.optimizers.sharding`; collective: every rank of ``process_group`` calls
            :meth:`step`). :meth:`state_dict` is then this rank's part: save
            :meth:`full_state_dict`; :meth:`load_state_dict` takes a full one.
        process_group: the data-parallel group of ``shard_state`` (default: the world).

    On a model whose values are sharded (:func:`slope.parallel.wrap_fsdp2`, ``shard_values``:
    each layer's values on one rank) the state follows them: each layer's moments live with its
    values, whatever ``shard_state`` says, and nothing is broadcast after a step.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        grad_dict: GradDict | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        mask_change_freq: int = 100,
        *,
        shard_state: bool = False,
        process_group=None,
    ):
        if grad_dict is not None and not isinstance(grad_dict, GradDict):
            raise TypeError(f"grad_dict must be slope.grad_dict (a GradDict), got {type(grad_dict).__name__}")
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not isinstance(mask_change_freq, int) or mask_change_freq < 1:
            raise ValueError(f"mask_change_freq must be a positive int, got {mask_change_freq!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"ADAMWSparse expects the pruned model (nn.Module), got {type(model).__name__}")
        layers = live_layers() if model is None else [m for _, m in sparse_modules(model)]
        if not layers:
            raise ValueError("ADAMWSparse found no SLoPe layers; call slope.prune_model(model) first")
        if model is not None:
            _refuse_merged(model, layers)
        if not any(layer.sparse_requires_grad for layer in layers):  # (they get no values_grad: no step would change anything)
            raise ValueError(
                f"ADAMWSparse: every SLoPe layer{'' if model is None else ' of ' + type(model).__name__} is frozen "
                "(sparse_requires_grad=False, e.g. under peft's LoRA from slope.peft.get_peft_model, which trains the "
                "adapters only): build it on the pruned model without peft adapters (or after unload())"
            )
        self._layer_of: dict[int, nn.Module] = {id(layer.values): layer for layer in layers}
        # per parameter (id): (its state's step tensor, the host's count of it), so that no step
        # reads the device counter (the count is trusted while the state holds that same tensor)
        self._host_steps: dict[int, tuple[torch.Tensor | None, int]] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mask_change_freq=mask_change_freq)
        super().__init__([layer.values for layer in layers], defaults)
        self.owners = LayerOwners(self._params(), process_group) if shard_state else None

    def __getstate__(self):
        # torch.optim.Optimizer pickles defaults, state and param_groups only: the layers of the
        # parameters (keyed by id, which a copy changes) travel along and are re-keyed on load.
        return {**super().__getstate__(), "_layers": self.layers(), "owners": self.owners}

    def __setstate__(self, state):
        layers = state.pop("_layers", None)
        super().__setstate__(state)  # (also what torch's load_state_dict calls, without "_layers")
        if layers is None:
            return
        self._layer_of = {id(layer.values): layer for layer in layers}
        self._host_steps = {}  # read again from the state's step counters at the next step
        if self.owners is not None:
            self.owners._index = {id(p): i for i, p in enumerate(self._params())}

    def _params(self) -> list[torch.Tensor]:
        """The parameters in ``state_dict``'s numbering."""
        return [p for group in self.param_groups for p in group["params"]]

    def owns(self, p: torch.Tensor) -> bool:
        """Whether this rank keeps (and steps) ``p``'s moments: always, unless ``shard_state`` or
        sharded values (then: ``p``'s owner)."""
        holder = self._layer_of[id(p)].values_holder
        if holder is not None:
            return holder.owns(self._layer_of[id(p)])
        return self.owners is None or self.owners.owns(p)

    def _owners(self) -> LayerOwners | None:
        """Who keeps each parameter's state: the values' owners when they are sharded, else
        ``shard_state``'s (``None``: every rank keeps all)."""
        holder = _values_holder(self.layers())
        return self.owners if holder is None else holder.owners

    def param_shapes(self) -> list[tuple[int, int]]:
        """The whole shape of each parameter, in ``state_dict`` numbering (sharded values are
        ``(0, kept)`` placeholders on the ranks that do not own them)."""
        return [(layer.out_features, layer.values.shape[-1]) for layer in self.layers()]

    # SLoPe-compatible attribute setters: ``sparse_opt.lr = x`` sets every group's value.
    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        for group in self.param_groups:
            group["weight_decay"] = value

    def layers(self) -> list[nn.Module]:
        return [self._layer_of[id(p)] for group in self.param_groups for p in group["params"]]

    def sparse_grads(self) -> list[torch.Tensor]:
        return [layer.values_grad for layer in self.layers() if layer.values_grad is not None]

    #: ``torch.amp.GradScaler.step`` then hands this optimizer to :meth:`step` instead of unscaling
    #: ``param.grad`` (the sparse gradients are never there), so :meth:`step` can refuse it clearly.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """One AdamW step of every layer that has a gradient. Per layer, the first that applies:

        - the layer holds current operands built from its kept values in a compute dtype of their
          own (CUDA, bf16/fp16 compute, fp32 master; :meth:`slope.layer.SparseLinear.operand_buffers`):
          :func:`slope.kernels.adamw_step_operands_` updates values and moments *and* writes the new
          forward and backward operand values in one pass, and the operands stay cached;
        - fp32 values with fp32 gradients: PyTorch's fused AdamW kernel, one launch per (device,
          step count) bucket; the layer's operands are rebuilt on next use;
        - anything else: :func:`slope.kernels.adamw_step_` per tensor.

        With ``shard_state`` a rank steps the layers it owns, then every layer's values are
        broadcast from its owner (other ranks rebuild that layer's operands on next use); sharded
        values are stepped by their owner only (the other ranks count the step).

        Nothing here reads a device tensor on the host: the step count kernels see lives on the
        values' device and the host keeps its own count (for the bias corrections and
        ``mask_change_freq``).

        ``torch.amp.GradScaler`` (``scaler.step(sparse_opt)``) is refused: it unscales and checks
        ``param.grad`` only; fp16 loss scaling of both optimizers is :class:`slope.train.LossScaler`."""
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "ADAMWSparse: torch.amp.GradScaler cannot unscale its gradients (the SLoPe layers' values_grad, never "
                "param.grad); for fp16 use slope.train.LossScaler: backward of loss * scaler.scale, then "
                "found_inf = scaler.unscale_(dense_params, sparse_opt), step both unless found_inf, scaler.update(found_inf)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused: dict[tuple, list[torch.Tensor]] = {}
            stepped: list[tuple[nn.Module, int, dict]] = []
            for p in group["params"]:
                layer = self._layer_of[id(p)]
                grad = layer.values_grad
                if grad is None:
                    continue
                state = self.state[p]
                count = self._advance(p, state)
                owned = self.owns(p)  # else its owner steps it and the new values arrive below
                buffers = self._operand_buffers(layer, p, grad, state) if owned else {}
                if buffers:
                    self._step_with_operands(layer, p, grad, state, group, count, buffers)
                elif owned and _FUSED_ADAMW is not None and p.dtype == grad.dtype == torch.float32 and p.device == grad.device:
                    fused.setdefault((p.device, count), []).append(p)
                elif owned:
                    self._step_one(p, grad, state, group, count)
                stepped.append((layer, count, buffers))
            for (device, count), params in fused.items():
                self._step_fused(params, group)
            if self.owners is not None:  # (sharded values stay with their owner)
                self.owners.broadcast([layer.values for layer, _, _ in stepped if layer.values_holder is None])
            for layer, count, buffers in stepped:
                layer.operands_written(buffers)  # the others are rebuilt on next use
                layer.optimizer_steps += 1  # backend="auto" times nothing for it after its first steps
                if count % group["mask_change_freq"] == 0 and layer.values_holder is not None:
                    layer.values_holder.update_mask_t(layer)  # (collective)
                elif count % group["mask_change_freq"] == 0:
                    layer.update_mask_t()
        return loss

    def _advance(self, p: torch.Tensor, state: dict) -> int:
        """Count one more step of ``p``: ``state["step"]`` (fp32, on ``p``'s device: what the fused
        kernels read) and the host's count, which is returned. The host count starts from the
        state's once (a loaded state dict: the one read of the device counter)."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if self.owns(p):  # elsewhere only the step count, for the mask updates
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            self._host_steps[id(p)] = (state["step"], 0)
        counter, count = self._host_steps.get(id(p), (None, 0))
        if counter is not state["step"]:  # a state that was loaded or replaced: read its counter once
            count = int(state["step"].item())
        state["step"] += 1
        self._host_steps[id(p)] = (state["step"], count + 1)
        return count + 1

    @staticmethod
    def _operand_buffers(layer: nn.Module, p: torch.Tensor, grad: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
        """The layer's operand buffers the fused operand step can write (empty: it does not apply)."""
        if (layer.n, layer.m) != (2, 4):
            return {}
        buffers = layer.operand_buffers()
        tensors = (p, grad, state["exp_avg"], state["exp_avg_sq"], layer.mask_bits, layer.mask_t_bits, *buffers.values())
        if not buffers or not kernels.triton_usable(p, grad, state["exp_avg"], state["exp_avg_sq"], *buffers.values()):
            return {}
        if len({t.device for t in tensors}) != 1 or not all(t.is_contiguous() for t in tensors):
            return {}
        return buffers

    @staticmethod
    def _step_with_operands(layer, p, grad, state, group, count: int, buffers: dict[str, torch.Tensor]) -> None:
        """:func:`slope.kernels.adamw_step_operands_`: AdamW and both operands' new values, one pass."""
        beta1, beta2 = group["betas"]
        kernels.adamw_step_operands_(
            p, grad, state["exp_avg"], state["exp_avg_sq"], layer.mask_bits, layer.mask_t_bits,
            fwd=buffers.get("forward"), bwd=buffers.get("backward"), lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], step=count,
        )

    def _step_fused(self, params: list[torch.Tensor], group: dict) -> None:
        """PyTorch's fused AdamW over fp32 ``params`` that share a device and their step count
        (each ``state["step"]``, already advanced, on that device: nothing is copied per step)."""
        beta1, beta2 = group["betas"]
        grads = [self._layer_of[id(p)].values_grad for p in params]
        _FUSED_ADAMW(
            params, grads,
            [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params],
            [], [self.state[p]["step"] for p in params],
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            amsgrad=False, maximize=False,
        )

    @staticmethod
    def _step_one(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, count: int) -> None:
        """One AdamW step of ``p`` (any float dtype; moments and arithmetic in fp32): one Triton
        pass on CUDA, else :func:`slope.kernels.reference.adamw_step_`."""
        beta1, beta2 = group["betas"]
        kernels.adamw_step_(
            p, g, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], step=count,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layer in self.layers():
            layer.zero_values_grad(set_to_none)

    @torch.no_grad()
    def clip_grad_norm(
        self,
        max_norm: float,
        dense_parameters: Iterable[torch.Tensor] | None = None,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        """Clip sparse gradients (and, if given, the dense parameters' ``.grad``) by their joint norm.

        Returns the total norm before clipping (like ``torch.nn.utils.clip_grad_norm_``).
        """
        layers = [layer for layer in self.layers() if layer.values_grad is not None]
        held = [layer.values_grad for layer in layers if layer.values_holder is not None]  # on their owners
        grads = [layer.values_grad for layer in layers if layer.values_holder is None]
        if dense_parameters is not None:
            grads += [p.grad for p in dense_parameters if p.grad is not None]
        if not grads + held:
            return torch.zeros(())
        device = local_tensor((grads + held)[0]).device
        norms = [torch.linalg.vector_norm(g.float(), norm_type).to(device) for g in grads if not is_sharded(g)]
        sharded = [g for g in grads if is_sharded(g)]
        if sharded:  # FSDP2's dense gradients (DTensors): their joint norm, reduced over the ranks once
            norms.append(full_tensor(torch.nn.utils.get_total_norm(sharded, norm_type)).float().to(device))
        if held:  # sharded values' gradients, each on its owner (placeholders elsewhere): reduced once
            local = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float(), norm_type).to(device) for g in held]),
                                             norm_type)
            norms.append(_values_holder(layers).total_norm(local, norm_type))
        grads += held
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if max_norm is not None and math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                local_tensor(g).mul_(coef.to(g.dtype))
        return total

    @torch.no_grad()
    def unscale_(self, inv_scale: float | torch.Tensor) -> bool:
        """Multiply the sparse gradients by ``inv_scale`` (fp16 loss scaling); True if any is inf/nan.
        The answer is a host bool, so this reads the device once (one flag for all gradients)."""
        grads = self.sparse_grads()
        if not grads:
            return False
        finite = []
        for g in grads:
            g.mul_(inv_scale)
            finite.append(torch.isfinite(g).all().to(grads[0].device))
        found = not bool(torch.stack(finite).all())
        holder = _values_holder(self.layers())
        return found if holder is None else holder.any_rank(found, grads[0].device)  # (each owner saw its own)

    def full_state_dict(self) -> dict | None:
        """:meth:`state_dict` of the whole optimizer, as one process would have it. With
        ``shard_state`` this is collective: rank 0 gets it (the moments of other owners sent to
        it), the other ranks ``None``."""
        state = self.state_dict()
        owners = self._owners()
        if owners is None:
            return state
        params = self._params()
        local = [state["state"].get(i, {}) for i in range(len(params))]
        complete = owners.gather_to_first(params, local, ("exp_avg", "exp_avg_sq"), self.param_shapes())
        if owners.rank != 0:
            return None
        return {**state, "state": {i: s for i, s in enumerate(complete) if s}}

    def load_state_dict(self, state_dict: dict, *, checked: bool = False) -> None:
        """Load a state dict of this optimizer over layers of the same shapes and sparsity; anything
        else (another N:M, another model) is a ``ValueError`` naming the layer, raised before any
        state changes (wrong-shaped moments would corrupt memory in the fused step). ``checked``:
        the caller has just validated ``state_dict`` against this optimizer
        (:func:`slope.checkpoint.check_state_fits`), so it is not validated twice."""
        from slope.statecheck import check_optimizer_state

        names = [layer.layer_name or f"layer {i}" for i, layer in enumerate(self.layers())]
        if not checked:
            check_optimizer_state(self, state_dict, names, shapes=self.param_shapes())
        partial = [int(k) for k, s in state_dict["state"].items() if "step" in s and not {"exp_avg", "exp_avg_sq"} <= set(s)]
        if partial:
            raise ValueError(f"ADAMWSparse.load_state_dict: {names[partial[0]]} has a step count but no moments: this is one rank's "
                             "part of a sharded state (shard_state=True, or values sharded by wrap_fsdp2); save and load full_state_dict() instead")
        params = self._params()
        # only what this rank keeps (with shard_state: its layers' moments, every step count), before torch copies it
        kept = {k: {name: v for name, v in s.items() if name == "step" or self.owns(params[int(k)])}
                for k, s in state_dict["state"].items()}
        # torch casts floating state to the parameter dtype on load; our moments stay fp32.
        saved = {k: {name: v for name, v in s.items() if torch.is_tensor(v)} for k, s in kept.items()}
        super().load_state_dict({**state_dict, "state": kept})
        self._host_steps.clear()  # read again from the loaded counters at the next step
        for index, tensors in saved.items():
            p = params[int(index)]
            for name, value in tensors.items():
                # the step counter too lives on the values' device (fp32: what the fused kernels read)
                self.state[p][name] = value.to(device=p.device, dtype=torch.float32) if name == "step" else value.to(device=p.device)
