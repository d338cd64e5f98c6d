"""Running several mask policies on the same masks (gradual pruning, then RigL, on one update step)."""
from __future__ import annotations

from typing import Any

import torch

from slope.sparsity import MaskPolicy

__all__ = ["PolicyChain", "check_schedule"]


def check_schedule(policy, saved: dict[str, Any]) -> None:
    """A resumed run must continue the same schedule: compare ``policy._schedule_state()`` to ``saved``."""
    mine = policy._schedule_state()
    differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"the saved mask-update schedule differs from this run's (saved, now): {differ}; resume with the same settings")


class PolicyChain(MaskPolicy):
    """``policies`` (over the same masks and step count) as one: after a step, each one that is
    due updates the masks, in order (e.g. gradual pruning raises the sparsity, then RigL swaps
    weights at the new sparsity)."""

    def __init__(self, policies: list[MaskPolicy]):
        if not policies:
            raise ValueError("PolicyChain needs at least one policy")
        first = policies[0]
        if any(p.masked is not first.masked or p.total_steps != first.total_steps for p in policies):
            raise ValueError("the policies of a PolicyChain must share their masks and total_steps")
        super().__init__(first.masked, first.total_steps)
        self.policies = list(policies)

    def needs_dense_grad(self, step: int) -> bool:
        return any(p.needs_dense_grad(step) for p in self.policies)

    def due(self, step: int) -> bool:
        return any(p.due(step) for p in self.policies)

    def update(self, step: int, optimizer: torch.optim.Optimizer | None, grads: dict[str, torch.Tensor] | None) -> None:
        for policy in self.policies:
            if policy.due(step):
                policy.update(step, optimizer, grads)

    def state_dict(self) -> dict[str, Any]:
        own = super().state_dict()
        subs = [{k: v for k, v in p.state_dict().items() if k != "masks"} for p in self.policies]
        return {**own, "policies": subs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("policies", [])) != len(self.policies):
            raise ValueError(f"the saved state holds {len(state.get('policies', []))} mask policies, this run {len(self.policies)}")
        for policy, sub in zip(self.policies, state["policies"]):
            policy.load_state_dict({**sub, "masks": state["masks"]})
