"""``MaskPolicy``: the one interface for when and how masks change during training."""
from __future__ import annotations

from typing import Any

import torch

from slope.sparsity.masked import MaskedWeights

__all__ = ["MaskPolicy", "StaticMask"]


class MaskPolicy:
    """Decides when and how the masks of a :class:`MaskedWeights` change.

    A training loop (or a Trainer callback) drives it with 0-based optimizer-step counts:

    1. before the backward of step ``step``: if :meth:`needs_dense_grad` says so, it keeps the
       full gradients of the masked weights for this step (RigL's regrowth needs them; a mask hook
       would zero them);
    2. after ``optimizer.step()``: :meth:`step` — which keeps pruned entries zero (via
       :meth:`MaskedWeights.after_step`) and, when :meth:`due` says so, calls :meth:`update`.

    ``masked`` is a :class:`MaskedWeights` or anything with its interface (``masks``, ``weight``,
    ``out_in``, ``set_mask``, ``after_step``, ``capture_dense_grads`` / ``dense_grads``, ``state_dict``), such as
    :class:`slope.sparsity.SparseLayerMasks` over SLoPe layers.
    Subclasses implement :meth:`due` and :meth:`update`; the base class is a static mask.
    :meth:`state_dict` / :meth:`load_state_dict` carry the masks and the policy's own schedule
    state so a resumed run continues exactly.
    """

    def __init__(self, masked: MaskedWeights, total_steps: int):
        if int(total_steps) <= 0:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}")
        self.masked = masked
        self.total_steps = int(total_steps)

    def needs_dense_grad(self, step: int) -> bool:  # noqa: ARG002
        """Whether step ``step``'s backward must keep the masked weights' full gradients."""
        return False

    def due(self, step: int) -> bool:  # noqa: ARG002
        """Whether the masks change after optimizer step ``step``."""
        return False

    def update(self, step: int, optimizer: torch.optim.Optimizer | None, grads: dict[str, torch.Tensor] | None) -> None:
        """Change the masks (through :meth:`MaskedWeights.set_mask`) after step ``step``."""
        raise NotImplementedError

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None,
             grads: dict[str, torch.Tensor] | None = None) -> bool:
        """Call after every ``optimizer.step()``; returns whether the masks changed."""
        self.masked.after_step(optimizer)
        if not self.due(step):
            return False
        self.update(step, optimizer, grads)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masked.state_dict(), "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["total_steps"]) != self.total_steps:
            raise ValueError(
                f"the saved mask schedule spans {state['total_steps']} steps, this run {self.total_steps}: "
                "resume with the same number of training steps"
            )
        self.masked.load_state_dict(state["masks"])


class StaticMask(MaskPolicy):
    """Masks fixed for the whole run (constant pruning: the zeros present at the start stay zero)."""
