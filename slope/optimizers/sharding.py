"""Which data-parallel rank keeps each SLoPe layer's optimizer state (ZeRO-1 over whole layers).

Under data parallelism every rank holds the same SLoPe ``values`` and, after the gradient
all-reduce, the same ``values_grad``. With :class:`LayerOwners`, :class:`ADAMWSparse` keeps the
AdamW moments (8 bytes per kept weight) of a layer on its *owner* only: the owner steps the layer
and broadcasts the new values, the other ranks take them and rebuild their operands. Per kept
weight a rank then holds 4 (value) + 4 (gradient) + 8/N bytes instead of 16.

Layers, not rows, are the unit so that an owner keeps the fused step that writes a layer's forward
and backward operands in one pass (:func:`slope.kernels.adamw_step_operands_`). Owners are chosen
by size, largest layer first to the least-loaded rank (ties: the lowest rank), so the ranks hold
nearly equal shares of a transformer's many layers; every rank computes the same assignment.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

__all__ = ["LayerOwners", "balanced_owners"]


def balanced_owners(sizes: Sequence[int], world: int) -> list[int]:
    """The owner rank of each of ``sizes`` (elements per layer): largest first, each to the rank
    holding the fewest elements so far (the lowest such rank); deterministic."""
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    load = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += sizes[index]
    return owners


class LayerOwners:
    """The owners of an optimizer's parameters over the ranks of ``group`` (default: the world).

    Args:
        params: the optimizer's parameters, in the order of its ``state_dict`` numbering; the same
            shapes, in the same order, on every rank.
        group: the data-parallel process group (an initialised ``torch.distributed`` is needed).
    """

    def __init__(self, params: Sequence[torch.Tensor], group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sharding the sparse optimizer state needs torch.distributed: call "
                               "torch.distributed.init_process_group first (torchrun), or use shard_state=False")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.owners = balanced_owners([p.numel() for p in params], self.world)
        self._index = {id(p): i for i, p in enumerate(params)}

    def owner(self, param: torch.Tensor) -> int:
        """The rank (in ``group``) that keeps ``param``'s state."""
        return self.owners[self._index[id(param)]]

    def owns(self, param: torch.Tensor) -> bool:
        return self.owner(param) == self.rank

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @torch.no_grad()
    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Every rank's ``params`` (in one order on all ranks) become their owners' values. A
        receiving rank's tensors get a new version, so operands cached from the old values are
        rebuilt (a collective writes the tensor without autograd seeing it)."""
        works = [dist.broadcast(p, src=self._global(self.owner(p)), group=self.group, async_op=True) for p in params]
        for work in works:
            work.wait()
        for p in params:
            if not self.owns(p):
                increment_version(p)

    @torch.no_grad()
    def gather_to_first(self, params: Sequence[torch.Tensor], states: Sequence[dict], names: Sequence[str],
                        shapes: Sequence[tuple[int, ...]] | None = None) -> list[dict]:
        """Rank 0 receives the tensors ``names`` of the state of every parameter another rank owns
        (``states[i]``: ``params[i]``'s state on this rank, empty on every rank for a parameter not
        stepped yet; ``shapes``: the parameters' whole shapes, default theirs); returns rank 0's
        states completed (each a new dict) and, on the other ranks, ``states`` as they are. Collective."""
        gathered = list(states)
        shapes = [tuple(p.shape) for p in params] if shapes is None else shapes
        for i, (p, state) in enumerate(zip(params, states)):
            owner = self.owner(p)
            if owner == 0 or self.rank not in (0, owner) or not state:  # (no state yet: on no rank)
                continue
            if self.rank == owner:
                for name in names:
                    dist.send(state[name].contiguous(), dst=self._global(0), group=self.group)
            else:
                received = {}
                for name in names:
                    received[name] = torch.empty(shapes[i], dtype=torch.float32, device=p.device)
                    dist.recv(received[name], src=self._global(owner), group=self.group)
                gathered[i] = {**state, **received}
        return gathered
