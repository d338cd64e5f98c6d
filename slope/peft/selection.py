"""SpIEL's reselection (Ansell et al. 2024) as a :class:`slope.sparsity.MaskPolicy`.

Every ``reselection_steps`` optimizer steps (not after the last), each delta of ``k`` entries
replaces a fraction ``rate = initial_reselection_rate · (1 - t / T)`` of them (``t``: completed
steps, ``T``: total), keeping its size ``k`` exactly:

- **drop**: the ``⌊rate·k⌋`` entries whose delta values have the smallest magnitude (ties: the
  lower weight index);
- **grow**, ``rigl`` (SpIEL-AG): candidates are the ``k`` entries of largest ``|gradient|`` in the
  first backward of an accumulation window of ``selection_accumulation_steps`` (γ) optimizer
  steps ending at the reselection; their per-step gradients are summed over the window and the
  dropped slots go to the candidates of largest ``|Σ g|`` that are not among the remaining
  entries (a dropped entry that wins again simply stays). A grown entry starts at value 0 with
  the moments of its window: for :class:`SftAdamW`, ``age = n`` window steps,
  ``exp_avg = (1-β₁ⁿ)·mean(g)``, ``exp_avg_sq = (1-β₂ⁿ)·mean(g²)`` — exactly Adam's state after
  ``n`` steps of that gradient, so bias correction restores ``mean(g)`` and ``mean(g²)``.
  The initial indices (random) are reselected wholesale (``rate = 1``) after the first γ steps;
- **grow**, ``sm3`` (SpIEL-MA): non-active entries are ranked by ``R[i]·C[j]``, the product of
  :class:`SftSM3`'s row and column accumulators (the rank-1 estimate of their squared gradient,
  which needs no gradient outside the delta); only entries with a positive estimate are grown.

Kept entries keep their values and optimizer state untouched. Dense masks would cost a byte per
base weight (a quarter of an fp32 base model), so the deltas keep their masks as indices and
:class:`DeltaSet` does for them what :class:`slope.sparsity.MaskedWeights` does for dense masks;
:class:`SftReselection` is the mask policy over it.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from slope.masks import topk_mask
from slope.peft.config import SftConfig
from slope.peft.delta import SparseDelta
from slope.peft.optim import SftAdamW, SftSM3
from slope.sparsity import MaskPolicy

__all__ = ["Candidates", "DeltaSet", "SftReselection", "largest", "per_entry_state"]


def largest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Positions (int64, ascending) of the ``n`` largest entries of 1-D ``scores`` (ties: lower
    position), through the shared mask core's :func:`slope.masks.topk_mask`."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return topk_mask(scores, 1.0 - n / scores.numel()).nonzero().reshape(-1)


def _unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def per_entry_state(optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param`` that hold one value per delta entry."""
    optimizer = _unwrap_optimizer(optimizer)
    state = optimizer.state.get(param, {})
    keys = getattr(optimizer, "per_entry_state", None)
    if keys is None:  # any other optimizer: its tensors of the parameter's shape (Adam's moments ...)
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]
    return {k: state[k] for k in keys if k in state}


class DeltaSet:
    """Index-form masks: the duties of :class:`slope.sparsity.MaskedWeights` for sparse deltas.

    Entries outside a delta have no storage, so nothing can move them (:meth:`after_step` has
    nothing to do); :meth:`replace` is ``set_mask`` for indices.
    """

    def __init__(self, deltas: Mapping[str, SparseDelta]):
        self.deltas = dict(deltas)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Dense bool masks (True = in the delta), built on demand for inspection and checks."""
        out = {}
        for name, delta in self.deltas.items():
            mask = torch.zeros(delta.dense_numel, dtype=torch.bool, device=delta.indices.device)
            out[name] = mask.index_fill_(0, delta.indices, True).view(delta.shape)
        return out

    def after_step(self, optimizer=None) -> None:  # noqa: ARG002
        """Nothing to zero: only delta entries exist."""

    def sparsity(self, names=None) -> float:
        names = list(self.deltas if names is None else names)
        total = sum(self.deltas[n].dense_numel for n in names)
        return 1.0 - sum(self.deltas[n].indices.numel() for n in names) / total if total else 0.0

    @torch.no_grad()
    def replace(self, name: str, slots: torch.Tensor, new_indices: torch.Tensor, optimizer=None,
                init_state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Give the delta entries at ``slots`` the weight positions ``new_indices``: value 0, per-entry
        optimizer state from ``init_state`` (missing keys: 0); every other entry is left as it is."""
        delta = self.deltas[name]
        delta.indices[slots] = new_indices.to(delta.indices.dtype)
        delta.values[slots] = 0
        if delta.values.grad is not None:
            delta.values.grad[slots] = 0
        if optimizer is not None:
            for key, tensor in per_entry_state(optimizer, delta.values).items():
                init = (init_state or {}).get(key)
                tensor[slots] = 0 if init is None else init.to(tensor.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: delta.indices.cpu().clone() for name, delta in self.deltas.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.deltas):
            raise ValueError(f"saved delta indices are for modules {sorted(state)}, not {sorted(self.deltas)}")
        for name, indices in state.items():
            delta = self.deltas[name]
            if indices.shape != delta.indices.shape:
                raise ValueError(f"{name}: saved delta has {indices.numel()} entries, this one {delta.indices.numel()}")
            delta.indices.copy_(indices)


class Candidates:
    """SpIEL-AG's growth candidates of one weight over one accumulation window.

    :meth:`observe` (the layer's gradient observer; every backward) picks the ``k`` entries of
    largest ``|g|`` at the window's first backward and adds ``g`` at them to this step's sum;
    :meth:`end_step` (after each optimizer step) folds the step's gradient into ``Σ g`` and
    ``Σ g²``. With ``group`` (a process group), the first gradient and each step's sum are
    averaged over the ranks, so every rank makes the same choice (DDP averages gradients too).
    """

    def __init__(self, k: int, group=None):
        self.k, self.group = k, group
        self.indices: torch.Tensor | None = None
        self.step_sum = self.grad_sum = self.grad_sq_sum = None
        self.steps = 0

    def _all_average(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
            t.div_(dist.get_world_size(self.group))
        return t

    @torch.no_grad()
    def observe(self, full_grad: torch.Tensor) -> None:
        flat = full_grad.reshape(-1)
        if self.indices is None:
            first = self._all_average(flat.float().clone())
            self.indices = largest(first.abs(), min(self.k, flat.numel()))
            self.step_sum = torch.zeros(self.indices.numel(), dtype=torch.float32, device=flat.device)
            self.grad_sum, self.grad_sq_sum = torch.zeros_like(self.step_sum), torch.zeros_like(self.step_sum)
        self.step_sum += flat[self.indices].float()

    @torch.no_grad()
    def end_step(self) -> None:
        if self.indices is None:
            return
        self._all_average(self.step_sum)
        self.grad_sum += self.step_sum
        self.grad_sq_sum += self.step_sum.square()
        self.step_sum.zero_()
        self.steps += 1


class SftReselection(MaskPolicy):
    """SpIEL's schedule and drop/grow rules (module docstring) for the deltas in ``deltas.deltas``.

    Driven like every :class:`MaskPolicy` with 0-based optimizer-step counts: ``needs_dense_grad``
    (``rigl``: the step belongs to an accumulation window, so the layers must report their full
    gradients to :attr:`candidates`), then :meth:`step` after ``optimizer.step()``.
    """

    def __init__(self, deltas: DeltaSet, config: SftConfig, total_steps: int, group=None):
        super().__init__(deltas, total_steps)
        self.config = config
        self.candidates = {name: Candidates(d.indices.numel(), group) for name, d in deltas.deltas.items()}

    # ------------------------------------------------------------------ schedule
    def _events(self) -> list[int]:
        """Completed-step counts after which a reselection happens."""
        r, gamma, total = self.config.reselection_steps, self.config.selection_accumulation_steps, self.total_steps
        events = set(range(r, total, r))
        if self.config.selection_algorithm == "rigl" and gamma < total:
            events = {e for e in events if e > gamma} | {gamma}
        return sorted(events)

    def due(self, step: int) -> bool:
        return step + 1 in self._events()

    def rate(self, step: int) -> float:
        """The fraction of each delta reselected after (0-based) step ``step``."""
        done = step + 1
        if self.config.selection_algorithm == "rigl" and done == self.config.selection_accumulation_steps:
            return 1.0
        return float(self.config.initial_reselection_rate) * (1.0 - done / self.total_steps)

    def needs_dense_grad(self, step: int) -> bool:
        if self.config.selection_algorithm != "rigl":
            return False
        done = step + 1
        upcoming = [e for e in self._events() if e >= done]
        return bool(upcoming) and upcoming[0] - done < self.config.selection_accumulation_steps

    # ------------------------------------------------------------------ drop and grow
    def update(self, step: int, optimizer, grads=None) -> None:  # noqa: ARG002 (gradients come from candidates)
        rate = self.rate(step)
        for name, delta in self.masked.deltas.items():
            n = int(rate * delta.indices.numel())
            if self.config.selection_algorithm == "rigl":
                self._regrow_rigl(name, delta, n, optimizer)
            else:
                self._regrow_sm3(name, delta, n, optimizer)
        self.candidates = {name: Candidates(c.k, c.group) for name, c in self.candidates.items()}

    @staticmethod
    def _drop(delta: SparseDelta, n: int) -> torch.Tensor:
        """Slots of the ``n`` smallest ``|values|`` (ties: lower weight index), smallest first."""
        by_index = torch.sort(delta.indices).indices
        magnitude = delta.values.detach().abs().float()[by_index]
        return by_index[torch.sort(magnitude, stable=True).indices[:n]]

    def _regrow_rigl(self, name: str, delta: SparseDelta, n: int, optimizer) -> None:
        cand = self.candidates[name]
        if n == 0 or cand.indices is None or cand.steps == 0:
            return
        dropped = self._drop(delta, n)
        keep = torch.ones(delta.indices.numel(), dtype=torch.bool, device=dropped.device)
        keep[dropped] = False
        pool = (~torch.isin(cand.indices, delta.indices[keep])).nonzero().reshape(-1)  # not a remaining entry
        scores = cand.grad_sum[pool].abs()
        top = largest(scores, min(n, pool.numel()))
        grown = pool[top[torch.sort(scores[top], descending=True, stable=True).indices]]  # best first
        incoming = grown[~torch.isin(cand.indices[grown], delta.indices[dropped])]
        outgoing = dropped[~torch.isin(delta.indices[dropped], cand.indices[grown])][: incoming.numel()]
        incoming = incoming[: outgoing.numel()]
        self.masked.replace(name, outgoing, cand.indices[incoming], optimizer, self._grown_state(cand, incoming, optimizer, delta))

    def _grown_state(self, cand: Candidates, chosen: torch.Tensor, optimizer, delta: SparseDelta) -> dict[str, torch.Tensor]:
        n = cand.steps
        mean, mean_sq = cand.grad_sum[chosen] / n, cand.grad_sq_sum[chosen] / n
        opt = _unwrap_optimizer(optimizer)
        if isinstance(opt, SftAdamW):
            opt.init_state(delta.values)
        beta1, beta2 = _betas(opt, delta.values)
        return {
            "age": torch.full_like(mean, n),
            "exp_avg": mean * (1.0 - beta1**n),
            "exp_avg_sq": mean_sq * (1.0 - beta2**n),
        }

    def _regrow_sm3(self, name: str, delta: SparseDelta, n: int, optimizer) -> None:
        opt = _unwrap_optimizer(optimizer)
        if n and not isinstance(opt, SftSM3):
            raise TypeError("selection_algorithm='sm3' grows from SftSM3's accumulators: train with slope.peft.SftSM3")
        state = opt.state.get(delta.values, {}) if n else {}
        if "accumulator_1" not in state:  # nothing to reselect, or no step taken yet
            return
        scores = torch.outer(state["accumulator_0"], state["accumulator_1"]).reshape(-1)
        scores[delta.indices] = -1.0  # active entries cannot be grown
        grown = largest(scores, n)  # ties: lower weight index
        grown = grown[scores[grown] > 0]
        grown = grown[torch.sort(scores[grown], descending=True, stable=True).indices]
        dropped = self._drop(delta, n)[: grown.numel()]
        self.masked.replace(name, dropped, grown, optimizer)


def _betas(optimizer, param) -> tuple[float, float]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return tuple(group.get("betas", (0.0, 0.0)))
    return 0.0, 0.0
