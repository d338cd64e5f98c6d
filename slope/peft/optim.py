"""Optimizers for sparse deltas: ``SftAdamW`` (per-entry ages) and ``SftSM3`` (row/column accumulators).

Both keep state only for the delta entries (``(k,)`` tensors) — SM3 adds one accumulator per
row and per column of each delta's weight. ``per_entry_state`` names the state tensors that
belong to individual entries; reselection (:mod:`slope.peft.selection`) carries them over for kept
entries and initialises them for new ones.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from slope.peft.delta import SparseDelta

__all__ = ["SftAdamW", "SftSM3"]


class SftAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bias correction counts steps per entry (``age``).

    An entry grown at a reselection starts with the moments of the gradient seen over the
    accumulation window and the age of that window (see :mod:`slope.peft.selection`), so its first
    update is not a cold Adam start. State: ``age`` (int32), ``exp_avg``, ``exp_avg_sq``
    (``momentum_dtype``, default float32), each of the parameter's shape.
    """

    per_entry_state = ("age", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, momentum_dtype: torch.dtype | None = torch.float32):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}: it must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.momentum_dtype = momentum_dtype or torch.float32

    def init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["age"] = torch.zeros(param.shape, dtype=torch.int32, device=param.device)
            state["exp_avg"] = torch.zeros(param.shape, dtype=self.momentum_dtype, device=param.device)
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=self.momentum_dtype, device=param.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.init_state(p)
                grad = p.grad.to(self.momentum_dtype)
                age, exp_avg, exp_avg_sq = state["age"], state["exp_avg"], state["exp_avg_sq"]
                age.add_(1)
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if group["correct_bias"]:
                    steps = age.to(self.momentum_dtype)
                    m_hat = exp_avg / (1.0 - torch.pow(beta1, steps))
                    v_hat = exp_avg_sq / (1.0 - torch.pow(beta2, steps))
                else:
                    m_hat, v_hat = exp_avg, exp_avg_sq
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.sub_((group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])).to(p.dtype))
        return loss


class SftSM3(torch.optim.Optimizer):
    """SM3-II (Anil et al. 2019) with a row/column cover for sparse deltas (SpIEL-MA's optimizer).

    ``deltas`` maps each delta's ``values`` parameter to its :class:`SparseDelta` (as
    ``{delta.values: delta for _, _, delta in model.active_deltas()}``). For a delta entry at
    (row ``i``, column ``j``) of the weight's stored layout with gradient ``g``:
    ``ν = min(R[i], C[j]) + g²`` (with ``beta``: ``β·min(R[i], C[j]) + (1-β)·g²``), then
    ``R[i] = max(R[i], ν)``, ``C[j] = max(C[j], ν)`` over the row's / column's entries, and
    ``u = g / (√ν + eps)``; the update is ``-lr·u`` (or ``-lr·m`` with ``m = momentum·m + (1-momentum)·u``).
    ``R`` (``accumulator_0``, one per row) and ``C`` (``accumulator_1``, one per column) cover
    every weight entry, which is what SpIEL-MA ranks non-active entries by (``R[i]·C[j]``).
    Other parameters get SM3's cover by dimensions (a 1-D parameter: Adagrad).
    """

    per_entry_state = ("momentum_buffer",)

    def __init__(self, params, deltas: Mapping[torch.Tensor, SparseDelta], lr: float = 0.1, momentum: float = 0.0,
                 beta: float = 0.0, eps: float = 1e-8):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        if not 0.0 <= momentum < 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum ({momentum}) and beta ({beta}) must be in [0, 1)")
        super().__init__(params, dict(lr=lr, momentum=momentum, beta=beta, eps=eps))
        self.deltas = dict(deltas)
        for delta in self.deltas.values():
            if len(delta.shape) != 2:
                raise ValueError(f"SftSM3 covers 2-D weights by rows and columns; got a delta of shape {delta.shape}")

    def _accumulators(self, p: torch.Tensor, shape: Iterable[int]) -> list[torch.Tensor]:
        state = self.state[p]
        shape = list(shape)
        for d, size in enumerate(shape):
            state.setdefault(f"accumulator_{d}", torch.zeros(size, dtype=torch.float32, device=p.device))
        return [state[f"accumulator_{d}"] for d in range(len(shape))]

    def _delta_nu(self, p, grad, beta) -> torch.Tensor:
        delta = self.deltas[p]
        rows_acc, cols_acc = self._accumulators(p, delta.shape)
        rows, cols = delta.indices // delta.shape[1], delta.indices % delta.shape[1]
        nu = torch.minimum(rows_acc[rows], cols_acc[cols])
        nu = nu.mul_(beta).addcmul_(grad, grad, value=1.0 - beta) if beta else nu.addcmul_(grad, grad)
        rows_acc.scatter_reduce_(0, rows, nu, "amax", include_self=True)
        cols_acc.scatter_reduce_(0, cols, nu, "amax", include_self=True)
        return nu

    def _dense_nu(self, p, grad, beta) -> torch.Tensor:
        accs = self._accumulators(p, p.shape)
        nu = None
        for d, acc in enumerate(accs):
            view = acc.view([-1 if e == d else 1 for e in range(p.dim())])
            nu = view.expand(p.shape) if nu is None else torch.minimum(nu, view)
        nu = nu.clone() if nu is not None else torch.zeros_like(grad)
        nu = nu.mul_(beta).addcmul_(grad, grad, value=1.0 - beta) if beta else nu.addcmul_(grad, grad)
        for d, acc in enumerate(accs):
            others = [e for e in range(p.dim()) if e != d]
            acc.copy_(torch.maximum(acc, nu.amax(dim=others) if others else nu))
        return nu

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                nu = self._delta_nu(p, grad, group["beta"]) if p in self.deltas else self._dense_nu(p, grad, group["beta"])
                update = grad / (nu.sqrt() + group["eps"])
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(update))
                    update = buf.mul_(group["momentum"]).add_(update, alpha=1.0 - group["momentum"])
                p.sub_((group["lr"] * update).to(p.dtype))
        return loss
