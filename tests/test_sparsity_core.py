"""The shared mask core: score-based masks (slope.masks) and MaskedWeights / MaskPolicy (slope.sparsity)."""
import pytest
import torch
import torch.nn as nn

from slope.masks import mask_from_scores, nm_mask, nm_mask_from_scores, parse_structure, topk_mask
from slope.sparsity import MaskedWeights, MaskPolicy, StaticMask


def _reference_nm(scores, n, m):
    """One group at a time: the n largest of each group (ties: lower index)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            group = [(-float(scores[r, g + j]), j) for j in range(m)]
            for _, j in sorted(group)[:n]:
                out[r, g + j] = True
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_mask_from_scores_matches_a_loop(n, m):
    scores = torch.randn(6, 4 * m)
    scores[0, :m] = 1.0  # ties
    assert torch.equal(nm_mask_from_scores(scores, n, m), _reference_nm(scores, n, m))
    weight = torch.randn(6, 4 * m)
    assert torch.equal(nm_mask(weight, n, m), _reference_nm(weight.abs(), n, m))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_topk_mask_keeps_the_largest(sparsity):
    scores = torch.randn(7, 9)
    mask = topk_mask(scores, sparsity)
    keep = round((1 - sparsity) * scores.numel())
    assert int(mask.sum()) == keep
    if 0 < keep < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


def test_structures_and_errors():
    assert parse_structure("0:0") is None and parse_structure(None) is None and parse_structure("unstructured") is None
    assert parse_structure("2:4") == (2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_structure("4:4")
    with pytest.raises(ValueError, match="disagrees"):
        mask_from_scores(torch.randn(4, 8), 0.7, "2:4")
    with pytest.raises(ValueError, match="needs a sparsity"):
        mask_from_scores(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        topk_mask(torch.randn(4), 1.5)
    assert torch.equal(mask_from_scores(torch.arange(8.0).reshape(1, 8), 0.5, "2:4"), nm_mask_from_scores(torch.arange(8.0).reshape(1, 8), 2, 4))


def _model_and_masked(optimizer_cls=torch.optim.AdamW, **opt_kw):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = {name: topk_mask(p.detach().abs(), 0.5) for name, p in params.items()}
    masked = MaskedWeights(params, masks)
    masked.apply_()
    optimizer = optimizer_cls(model.parameters(), **opt_kw)
    return model, masked, optimizer


@pytest.mark.parametrize("optimizer_cls,kw", [(torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.1}),
                                              (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})])
def test_pruned_entries_stay_zero_through_training(optimizer_cls, kw):
    model, masked, optimizer = _model_and_masked(optimizer_cls, **kw)
    policy = StaticMask(masked, total_steps=5)
    for step in range(5):
        loss = model(torch.randn(3, 8)).pow(2).sum()
        loss.backward()
        for name, p in masked.params.items():
            assert not p.grad[~masked.masks[name]].any()  # the hook masks gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        assert not policy.step(step, optimizer)
        for name, p in masked.params.items():
            assert not p[~masked.masks[name]].any()
            for value in optimizer.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert not value[~masked.masks[name]].any()
    assert masked.sparsity() == pytest.approx(0.5)


def test_set_mask_restarts_changed_entries_and_state_round_trips():
    model, masked, optimizer = _model_and_masked(lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    name, p = "0.weight", model[0].weight
    old = masked.masks[name].clone()
    new = old.clone()
    kept, pruned = old.nonzero()[0], (~old).nonzero()[0]
    new[tuple(kept)], new[tuple(pruned)] = False, True  # drop one, grow one: same count
    changed = masked.set_mask(name, new, optimizer)
    assert int(changed.sum()) == 2
    assert p[tuple(kept)] == 0 and p[tuple(pruned)] == 0
    assert optimizer.state[p]["exp_avg"][tuple(pruned)] == 0
    saved = masked.state_dict()
    other = MaskedWeights({name: nn.Parameter(torch.randn(16, 8)), "2.weight": nn.Parameter(torch.randn(4, 16))})
    other.load_state_dict(saved)
    assert torch.equal(other.masks[name], new)
    assert not other.params[name][~new].any()
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict({name: saved[name]})


def test_from_zeros_and_bad_masks():
    weight = nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    masked = MaskedWeights.from_zeros({"w": weight})
    assert torch.equal(masked.masks["w"], torch.tensor([[False, True], [True, False]]))
    with pytest.raises(ValueError, match="bool of the weight's shape"):
        MaskedWeights({"w": weight}, {"w": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="total_steps"):
        MaskPolicy(masked, 0)


def test_policy_state_must_match_schedule():
    _, masked, _ = _model_and_masked()
    state = StaticMask(masked, total_steps=10).state_dict()
    with pytest.raises(ValueError, match="same number of training steps"):
        StaticMask(masked, total_steps=20).load_state_dict(state)
    StaticMask(masked, total_steps=10).load_state_dict(state)
