"""Which rank keeps each SLoPe layer's optimizer state (slope.optimizers.sharding); the 2-rank
equality of sharded and unsharded ADAMWSparse is in test_distributed.py."""
import itertools
import random

import pytest
import torch
import torch.nn as nn

import slope
from slope.optimizers import ADAMWSparse
from slope.optimizers.sharding import balanced_owners


def _makespan(sizes, owners, world):
    return max(sum(s for s, o in zip(sizes, owners) if o == rank) for rank in range(world))


def _optimal_makespan(sizes, world):
    """Brute force over every assignment (small inputs only)."""
    return min(_makespan(sizes, owners, world) for owners in itertools.product(range(world), repeat=len(sizes)))


@pytest.mark.parametrize("seed", range(6))
def test_balanced_owners_is_within_the_greedy_bound_of_the_best_split(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3])
    sizes = [rng.choice([256, 512, 1024, 4096]) * rng.randint(1, 4) for _ in range(rng.randint(3, 8))]
    owners = balanced_owners(sizes, world)
    assert len(owners) == len(sizes) and set(owners) <= set(range(world))
    assert owners == balanced_owners(sizes, world)  # every rank computes the same assignment
    best = _optimal_makespan(sizes, world)
    assert _makespan(sizes, owners, world) <= best * (4 / 3 - 1 / (3 * world)) + 1e-9  # Graham's bound for largest-first


def test_balanced_owners_edge_cases():
    assert balanced_owners([5, 7, 1], 1) == [0, 0, 0]
    assert sorted(balanced_owners([5, 7], 4)) == [0, 1]  # more ranks than layers: one layer each, others none
    assert balanced_owners([4, 4, 4, 4], 2) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="world must be at least 1"):
        balanced_owners([1], 0)


def test_sharding_the_state_needs_torch_distributed():
    model = slope.prune_model(nn.Sequential(nn.Linear(16, 16)), compress=True, verbose=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group first"):
        ADAMWSparse(model, shard_state=True)
    state = ADAMWSparse(model).full_state_dict()  # unsharded: the ordinary state dict, no collective
    assert state.keys() == {"state", "param_groups"}
