"""``ADAMWSparse``: AdamW over the kept weights of SLoPe layers (installed as ``slope.optimizers``)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from slope import kernels
from slope.registry import GradDict, live_layers, sparse_modules

__all__ = ["ADAMWSparse"]

#: PyTorch's fused AdamW kernel (CPU and CUDA; the one ``torch.optim.AdamW(fused=True)`` runs),
#: or None on a PyTorch without it.
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


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
        self._layer_of: dict[int, nn.Module] = {id(layer.values): layer for layer in layers}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mask_change_freq=mask_change_freq)
        super().__init__([layer.values for layer in layers], defaults)

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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # fp32 values with fp32 gradients go through PyTorch's fused AdamW kernel, one launch
            # per (device, step count) bucket; anything else (bf16/fp16 values) is stepped per
            # tensor by slope.kernels.adamw_step_ (one Triton pass on CUDA).
            fused: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                layer = self._layer_of[id(p)]
                grad = layer.values_grad
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                if _FUSED_ADAMW is not None and p.dtype == grad.dtype == torch.float32 and p.device == grad.device:
                    fused.setdefault((p.device, int(state["step"].item())), []).append(p)
                else:
                    self._step_one(p, grad, state, group)
            for (device, step), params in fused.items():
                self._step_fused(params, device, step, group)
            for p in group["params"]:
                layer = self._layer_of[id(p)]
                if layer.values_grad is None:
                    continue
                if int(self.state[p]["step"].item()) % group["mask_change_freq"] == 0:
                    layer.update_mask_t()
                layer.refresh()
        return loss

    def _step_fused(self, params: list[torch.Tensor], device: torch.device, step: int, group: dict) -> None:
        """PyTorch's fused AdamW over fp32 ``params`` that share ``device`` and their step count."""
        beta1, beta2 = group["betas"]
        grads = [self._layer_of[id(p)].values_grad for p in params]
        steps = [torch.tensor(float(step), device=device)] * len(params)  # read only, never advanced
        _FUSED_ADAMW(
            params, grads,
            [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params],
            [], steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            amsgrad=False, maximize=False,
        )

    @staticmethod
    def _step_one(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        """One AdamW step of ``p`` (any float dtype; moments and arithmetic in fp32): one Triton
        pass on CUDA, else :func:`slope.kernels.reference.adamw_step_`."""
        beta1, beta2 = group["betas"]
        kernels.adamw_step_(
            p, g, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], step=int(state["step"].item()),
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layer in self.layers():
            if set_to_none or layer.values_grad is None:
                layer.values_grad = None
            else:
                layer.values_grad.zero_()

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
        grads = self.sparse_grads()
        if dense_parameters is not None:
            grads += [p.grad for p in dense_parameters if p.grad is not None]
        if not grads:
            return torch.zeros(())
        device = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g.float(), norm_type).to(device) for g in grads])
        total = torch.linalg.vector_norm(norms, norm_type)
        if max_norm is not None and math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return total

    @torch.no_grad()
    def unscale_(self, inv_scale: float | torch.Tensor) -> bool:
        """Multiply the sparse gradients by ``inv_scale`` (fp16 loss scaling); True if any is inf/nan."""
        found_inf = False
        for g in self.sparse_grads():
            g.mul_(inv_scale)
            found_inf = found_inf or not bool(torch.isfinite(g).all())
        return found_inf

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer over layers of the same shapes and sparsity; anything
        else (another N:M, another model) is a ``ValueError`` naming the layer, raised before any
        state changes (wrong-shaped moments would corrupt memory in the fused step)."""
        from slope.statecheck import check_optimizer_state

        check_optimizer_state(self, state_dict, [layer.layer_name or f"layer {i}" for i, layer in enumerate(self.layers())])
        # torch casts floating state to the parameter dtype on load; our moments stay fp32.
        saved = {k: {name: v for name, v in s.items() if torch.is_tensor(v)} for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, tensors in saved.items():
            p = params[int(index)]
            for name, value in tensors.items():
                self.state[p][name] = value.to(device=p.device) if name != "step" else value
