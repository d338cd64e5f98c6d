"""RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners") as a :class:`MaskPolicy`.

Every ``interval`` optimizer steps ``t`` (while ``t < T_end``), in every masked weight with ``k``
kept entries and update fraction ``f_t = rigl_fraction(f, t, T_end)`` (cosine-decayed to 0):

1. drop ``d = round(f_t · k)`` kept weights of smallest ``|w|`` (over the whole weight);
2. grow ``d`` weights of largest ``|dense gradient|`` among those not kept after the drop (the
   paper's ``ArgTopK_{i ∉ θ \\ I_drop}``: a just-dropped weight may come straight back and then
   keeps its value and optimizer state, as it never left the network). With an N:M structure the
   regrowth happens inside each group of M: a group that lost ``j`` weights grows ``j`` of its own,
   so every group keeps exactly N and the weight stays N:M (2:4: accelerable) after the update.

Order within an update step: Evci et al.'s Algorithm 1 skips the SGD step on an update step (the
drop ranks the weights before it); here the optimizer step of that step is taken first and the
update follows, ranking the weights after it by the same step's gradient — so RigL also works as a
``transformers`` callback (``on_optimizer_step`` runs after the step, which it cannot skip).

Newly grown weights start at zero with zero optimizer state (:meth:`MaskedWeights.set_mask` /
:meth:`slope.SparseLinear.set_mask`), and the number of kept weights of every layer never changes:
the budget is per layer (each layer keeps its own sparsity; a global budget could move weights
between layers, which N:M cannot and which starves small layers). The dense gradient is the
gradient of the update step's loss, kept only on update steps (:meth:`RigL.needs_dense_grad`);
under data parallelism (DDP, the Trainer's) it is averaged over the ranks before the regrowth, so
every rank grows the same weights: the masks of N ranks are those of one process with their batch.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from slope.distributed import average_over_ranks
from slope.masks import is_nm_sparse, nm_mask_from_scores, topk_mask
from slope.parallel.env import mean_over_ranks
from slope.parallel.sharded import full_tensor, is_sharded, local_tensor
from slope.sparsity import MaskPolicy
from slope.dynamic.policies import check_schedule
from slope.dynamic.schedules import rigl_fraction

__all__ = ["RigL", "rigl_mask"]


@torch.no_grad()
def rigl_mask(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, fraction: float,
              structure: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """One RigL update of one weight: returns ``(new mask, d)``, ``d`` = dropped = grown count.

    ``weight``, ``grad`` (the dense gradient) and ``mask`` (bool, True = kept) share a shape
    ``(out, in)``; ``structure`` ``(n, m)`` regrows within groups of ``m`` along the last dim
    (``mask`` must then keep exactly ``n`` per group). Ties: the lower index is kept / grown.
    """
    if not weight.shape == grad.shape == mask.shape:
        raise ValueError(f"rigl_mask: weight {tuple(weight.shape)}, grad {tuple(grad.shape)} and mask {tuple(mask.shape)} must share a shape")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rigl_mask: fraction must be in [0, 1], got {fraction!r}")
    if not bool(torch.isfinite(grad).all()):
        raise ValueError("rigl_mask: the dense gradient has inf/nan entries; RigL cannot rank them (lower the learning rate)")
    if structure is not None and not is_nm_sparse(mask, *structure, exact=True):
        raise ValueError(f"rigl_mask: the mask does not keep exactly {structure[0]} of every {structure[1]}")
    kept = int(mask.sum())
    drop = round(fraction * kept)
    if drop == 0:
        return mask.clone(), 0
    # 1. keep the k - d largest |w| among kept entries (pruned ones score -1 < any |w|)
    survivors = topk_mask(weight.detach().abs().float().masked_fill(~mask, -1.0), keep=kept - drop)
    # 2. survivors score +inf, every other entry its |gradient|: the k largest (or the n largest
    #    of each group) are the survivors plus the d (or each group's j) best-gradient candidates
    scores = grad.detach().abs().float().masked_fill(survivors, float("inf"))
    if structure is None:
        return topk_mask(scores, keep=kept), drop
    return nm_mask_from_scores(scores, *structure), drop


class RigL(MaskPolicy):
    """RigL over a :class:`slope.sparsity.MaskedWeights` or :class:`slope.sparsity.SparseLayerMasks`.

    Args:
        interval: ``ΔT``; masks change after optimizer steps ``ΔT, 2ΔT, …`` before ``end_step``.
        fraction: ``α``, the swap fraction of the cosine decay ``f_t = α/2 · (1 + cos(π t / end_step))``:
            ``α`` at step 0, 0 at ``end_step`` (the first update, at ``t = interval``, swaps ``f_interval < α``).
        structure: ``None`` (unstructured) or ``(n, m)``: regrow within groups (N:M stays N:M).
        end_step: ``T_end`` (default: ``total_steps``).

    After each update :attr:`last_update` describes it (``step``, ``fraction``, and per weight
    ``dropped`` = ``grown``, the swap's size; ``regrown``, the dropped weights that the gradient
    picked straight back (they keep their values); ``changed``, the entries whose kept/pruned status
    flipped: ``2 · (dropped − regrown)``).
    """

    kind = "rigl"

    def __init__(self, masked, total_steps: int, *, interval: int = 100, fraction: float = 0.3,
                 structure: tuple[int, int] | None = None, end_step: int | None = None):
        super().__init__(masked, total_steps)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"RigL: the mask update interval must be a positive int of optimizer steps, got {interval!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"RigL: the update fraction must be in (0, 1], got {fraction!r}")
        self.interval, self.fraction, self.structure = interval, float(fraction), structure
        self.end_step = self.total_steps if end_step is None else int(end_step)
        self.last_update: dict[str, Any] | None = None

    def fraction_at(self, steps_done: int) -> float:
        """``f_t`` after ``steps_done`` optimizer steps."""
        return rigl_fraction(self.fraction, steps_done, self.end_step)

    def due(self, step: int) -> bool:
        done = step + 1
        return done % self.interval == 0 and done < self.end_step

    def needs_dense_grad(self, step: int) -> bool:
        return self.due(step)

    @property
    def update_count(self) -> int:
        """Mask updates of a whole run: after steps ``ΔT, 2ΔT, …`` below ``end_step``."""
        return len(range(self.interval, self.end_step, self.interval))

    def update(self, step: int, optimizer: torch.optim.Optimizer | None, grads: dict[str, torch.Tensor] | None) -> None:
        grads = self.masked.dense_grads if grads is None else grads
        # Data-parallel ranks captured the gradients of their own rows: regrow by their mean (the
        # gradient of the whole batch), so every rank picks the same entries and the masks stay equal.
        # (Gradients of FSDP2-sharded weights are averaged already; RigL ranks whole tensors: gathered.)
        average_over_ranks([grads[name] for name in self.masked.masks if name in grads and not is_sharded(grads[name])])
        fraction = self.fraction_at(step + 1)
        record: dict[str, Any] = {"step": step + 1, "kind": self.kind, "fraction": fraction, "layers": {}}
        finite = all(bool(torch.isfinite(local_tensor(g)).all()) for g in grads.values())
        if any(is_sharded(g) for g in grads.values()):  # (each rank checked its shards: agree)
            finite = mean_over_ranks(float(not finite)) == 0
        if not finite:
            # an fp16 overflow step: its gradients rank nothing; the masks stay as they are
            warnings.warn(f"RigL: the dense gradients of step {step + 1} are not finite; this mask update is skipped", RuntimeWarning, stacklevel=2)
            self.last_update = {**record, "skipped": "non-finite dense gradient"}
            return
        for name, mask in self.masked.masks.items():
            if name not in grads:
                raise RuntimeError(
                    f"RigL: no dense gradient of {name} at step {step + 1}; turn on capture_dense_grads before the "
                    "backward of every step where needs_dense_grad(step) is True (DynamicSparsity does this for you)"
                )
            out_in = self.masked.out_in  # (out, in) views: N:M groups run along the input dimension
            new, dropped = rigl_mask(out_in(name, self.masked.weight(name)), out_in(name, full_tensor(grads[name])),
                                     out_in(name, full_tensor(mask)), fraction, self.structure)
            changed = int(self.masked.set_mask(name, out_in(name, new).contiguous(), optimizer).sum())
            record["layers"][name] = {"dropped": dropped, "grown": dropped, "regrown": dropped - changed // 2, "changed": changed}
        self.last_update = record

    def _schedule_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "interval": self.interval, "fraction": self.fraction, "end_step": self.end_step,
                "structure": None if self.structure is None else list(self.structure)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self._schedule_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_schedule(self, state["schedule"])
        super().load_state_dict(state)

