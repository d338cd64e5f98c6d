"""RigL and gradual pruning (slope.dynamic) against slow references, and their invariants after every update."""
import math

import pytest
import torch
import torch.nn as nn

from slope.dynamic import CubicSchedule, DynamicSparsity, rigl_fraction, rigl_mask
from slope.layer import SparseLinear
from slope.masks import is_nm_sparse, nm_mask
from slope.optimizers import ADAMWSparse


# ---------------------------------------------------------------------- slow references
def _reference_rigl(weight, grad, mask, fraction, structure=None):
    """Evci et al.'s update one entry at a time: drop the d smallest kept |w| (ties: higher flat
    index first), then grow d of the rest by largest |g| (ties: lower index) — over the whole
    tensor, or, with N:M, inside each group as many as that group lost."""
    w, g, old = weight.flatten().tolist(), grad.flatten().tolist(), mask.flatten().tolist()
    kept = [i for i, k in enumerate(old) if k]
    d = round(fraction * len(kept))
    dropped = set(sorted(kept, key=lambda i: (abs(w[i]), -i))[:d])
    new = [k and i not in dropped for i, k in enumerate(old)]
    if structure is None:
        groups, width = [list(range(len(old)))], None
    else:
        width = structure[1]
        groups = [list(range(s, s + width)) for s in range(0, len(old), width)]
    for group in groups:
        lost = sum(1 for i in group if i in dropped) if width else d
        candidates = sorted((i for i in group if not new[i]), key=lambda i: (-abs(g[i]), i))
        for i in candidates[:lost]:
            new[i] = True
    return torch.tensor(new).reshape(mask.shape), d


@pytest.mark.parametrize("structure", [None, (2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 1.0])
def test_rigl_mask_matches_the_reference(structure, fraction):
    weight, grad = torch.randn(8, 16), torch.randn(8, 16)
    mask = nm_mask(weight, *structure) if structure else weight.abs() > weight.abs().median()
    weight = weight * mask
    grad[0, :8] = 0.5  # ties among candidates
    new, dropped = rigl_mask(weight, grad, mask, fraction, structure)
    ref, ref_dropped = _reference_rigl(weight, grad, mask, fraction, structure)
    assert dropped == ref_dropped == round(fraction * int(mask.sum()))
    assert torch.equal(new, ref)
    assert int(new.sum()) == int(mask.sum())
    if structure:
        assert is_nm_sparse(new, *structure, exact=True)


def test_rigl_fraction_is_cosine_decayed():
    assert rigl_fraction(0.3, 0, 100) == pytest.approx(0.3)
    assert rigl_fraction(0.3, 50, 100) == pytest.approx(0.15)
    # off the midpoint a cosine differs from a linear decay (0.225 at t = 25, 0.075 at t = 75)
    assert rigl_fraction(0.3, 25, 100) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert rigl_fraction(0.3, 75, 100) == pytest.approx(0.15 * (1 - math.sqrt(0.5)))
    assert rigl_fraction(0.4, 10, 60) == pytest.approx(0.2 * (1 + math.cos(math.pi / 6)))
    assert rigl_fraction(0.3, 100, 100) == pytest.approx(0.0) and rigl_fraction(0.3, 150, 100) == pytest.approx(0.0)
    values = [rigl_fraction(0.3, t, 100) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------- invariants after every update
def _toy(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.Tanh(), nn.Linear(32, 16, bias=bias), nn.Tanh(), nn.Linear(16, 8, bias=bias))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 16, generator=g), torch.randn(12, 8, generator=g)


def _loss(model, step):
    x, y = _batch(step)
    return ((model(x) - y) ** 2).mean()


def test_unstructured_rigl_invariants_after_every_update():
    model = _toy()
    total, interval, fraction = 20, 3, 0.5
    sp = DynamicSparsity(model, total, sparsity_ratio=0.6, mask_update_interval=interval, mask_update_fraction=fraction,
                         targets=["0", "2", "4"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kept = {name: int(mask.sum()) for name, mask in sp.masked.masks.items()}
    assert all(k == round(0.4 * sp.masked.params[n].numel()) for n, k in kept.items())
    updates = 0
    for step in range(total):
        assert sp.masked.capturing == ((step + 1) % interval == 0 and step + 1 < total)
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        before = {n: m.clone() for n, m in sp.masked.masks.items()}
        records = sp.step(opt)
        for name, param in sp.masked.params.items():
            mask = sp.masked.masks[name]
            assert int(mask.sum()) == kept[name]                      # exact sparsity, never drifts
            assert not bool(param[~mask].any())                       # pruned weights exactly zero
            for state in ("exp_avg", "exp_avg_sq"):
                assert not bool(opt.state[param][state][~mask].any())  # and their moments
        if records:
            updates += 1
            (record,) = records
            f = rigl_fraction(fraction, step + 1, total)
            assert record["step"] == step + 1 and record["fraction"] == pytest.approx(f)
            for name, counts in record["layers"].items():
                assert counts["dropped"] == counts["grown"] == round(f * kept[name])
                grown = sp.masked.masks[name] & ~before[name]
                assert counts["changed"] == 2 * int(grown.sum()) and int(grown.sum()) <= counts["grown"]
                param = sp.masked.params[name]
                assert not bool(param[grown].any())                   # new weights start at zero
                assert not bool(opt.state[param]["exp_avg"][grown].any()) and not bool(opt.state[param]["exp_avg_sq"][grown].any())
    assert updates == len(range(interval, total, interval))
    assert sp.sparsity == pytest.approx(1 - sum(kept.values()) / sum(p.numel() for p in sp.masked.params.values()))


def test_rigl_grows_by_the_gradient_accumulated_over_micro_batches():
    """With gradient accumulation the regrowth ranks the step's whole gradient (the sum over its
    micro-batches), computed here apart from the model (functional_call on detached copies)."""
    model = _toy(seed=3)
    total, interval, micro = 7, 3, 3
    sp = DynamicSparsity(model, total, sparsity_ratio=0.5, mask_update_interval=interval, mask_update_fraction=0.5,
                         targets=["0", "2", "4"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    names, params, updates = list(sp.masked.params), sp.masked.params, 0
    for step in range(total):
        summed = {n: torch.zeros_like(params[n]) for n in names}
        for k in range(micro):
            x, y = _batch(10 * step + k)
            copies = {n: params[n].detach().clone().requires_grad_(True) for n in names}
            out = torch.func.functional_call(model, copies, (x,))
            for n, g in zip(names, torch.autograd.grad(((out - y) ** 2).mean() / micro, list(copies.values()))):
                summed[n] += g
            (((model(x) - y) ** 2).mean() / micro).backward()
        opt.step()
        opt.zero_grad()
        before = {n: (sp.masked.masks[n].clone(), params[n].detach().clone()) for n in names}
        if sp.step(opt):
            updates += 1
            for n in names:
                want, _ = _reference_rigl(before[n][1], summed[n], before[n][0], rigl_fraction(0.5, step + 1, total))
                assert torch.equal(sp.masked.masks[n], want), f"step {step + 1}: {n}"
    assert updates == 2


def _erk_by_bisection(shapes, density, iters=200):
    """ERK the slow way: the one ε whose clipped fractions min(1, ε·(n_in+n_out)/(n_in·n_out)) keep
    ``density`` of all weights, found by bisection (the kept count grows with ε)."""
    raw = {n: (o + i) / (o * i) for n, (o, i) in shapes.items()}
    total = sum(o * i for o, i in shapes.values())

    def kept(eps):
        return sum(min(1.0, eps * raw[n]) * o * i for n, (o, i) in shapes.items())

    lo, hi = 0.0, 1.0
    while kept(hi) < density * total:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < density * total else (lo, mid)
    eps = (lo + hi) / 2
    return {n: min(1.0, eps * raw[n]) for n in shapes}


@pytest.mark.parametrize("seed", range(4))
def test_erk_densities_match_the_bisection_reference(seed):
    from slope.dynamic.distribution import erk_densities

    g = torch.Generator().manual_seed(seed)
    sizes = [4, 8, 16, 64, 256, 1024]
    shapes = {f"l{k}": (sizes[int(torch.randint(0, 6, (1,), generator=g))], sizes[int(torch.randint(0, 6, (1,), generator=g))])
              for k in range(7)}
    shapes["tiny"] = (4, 4)  # saturates: kept dense at any density below 1
    for density in (0.05, 0.2, 0.5, 0.8):
        got, ref = erk_densities(shapes, density), _erk_by_bisection(shapes, density)
        for name in shapes:
            assert got[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), (name, density)
        kept = sum(got[n] * o * i for n, (o, i) in shapes.items())
        assert kept == pytest.approx(density * sum(o * i for o, i in shapes.values()), rel=1e-12)
        assert all(0.0 < d <= 1.0 for d in got.values())


def test_erk_rigl_keeps_each_layers_erk_count():
    from slope.dynamic.distribution import layer_sparsities

    model = _toy()
    sp = DynamicSparsity(model, 9, sparsity_ratio=0.8, mask_update_interval=3, targets=["0", "2", "4"],
                         sparsity_distribution="erk")
    shapes = {n: tuple(m.shape) for n, m in sp.masked.masks.items()}
    want = {n: round((1 - s) * sp.masked.params[n].numel()) for n, s in layer_sparsities(shapes, 0.8, "erk").items()}
    kept = {n: int(m.sum()) for n, m in sp.masked.masks.items()}
    assert kept == want and len(set(1 - k / sp.masked.params[n].numel() for n, k in kept.items())) == 2  # (16,32) and (32,16) alike; (8,16) denser
    assert sp.sparsity == pytest.approx(0.8, abs=2 / sum(p.numel() for p in sp.masked.params.values()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, sp, opt, 9)
    assert {n: int(m.sum()) for n, m in sp.masked.masks.items()} == want  # RigL moves entries, never counts
    with pytest.raises(ValueError, match="sparsity_distribution='erk' spreads an unstructured budget"):
        DynamicSparsity(_toy(), 9, sparsity_type="2:4", sparsity_distribution="erk", targets=["0", "2"])
    with pytest.raises(ValueError, match="unknown sparsity_distribution"):
        DynamicSparsity(_toy(), 9, sparsity_distribution="erdos", targets=["0"])


def _slope_toy(compress):
    model = _toy(bias=False)
    sp = DynamicSparsity(model, 16, sparsity_type="2:4" if compress else "4:8", mask_update_interval=2,
                         mask_update_fraction=0.6, targets=["0", "2", "4"], compress=compress)
    return model, sp


@pytest.mark.parametrize("compress", [True, False])
def test_nm_rigl_on_slope_layers_keeps_groups_and_moves_moments(compress):
    model, sp = _slope_toy(compress)
    layers = sp.masked.layers
    assert all(isinstance(layer, SparseLinear) and layer.compress == compress for layer in layers.values())
    assert all(layer.double_pruning == compress for layer in layers.values())
    opt = ADAMWSparse(model, lr=1e-2)
    n, m = next(iter(layers.values())).n, next(iter(layers.values())).m
    changed_any = False
    for step in range(16):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        before = {name: (layer.mask, layer.dense_weight(torch.float32),
                         {k: layer._scatter_kept(opt.state[layer.values][k], torch.float32) for k in ("exp_avg", "exp_avg_sq")})
                  for name, layer in layers.items()}
        records = sp.step(opt)
        for name, layer in layers.items():
            mask = layer.mask
            assert is_nm_sparse(mask, n, m, exact=True) and layer.values.numel() == mask.numel() * n // m
            assert bool((layer.mask_t <= mask).all())  # M_t recomputed inside the new M
            old_mask, old_w, old_state = before[name]
            stayed, grown = mask & old_mask, mask & ~old_mask
            changed_any |= bool(grown.any())
            assert torch.equal(layer.dense_weight(torch.float32)[stayed], old_w[stayed])  # kept weights carried over
            assert not bool(layer.dense_weight(torch.float32)[grown].any())               # grown start at zero
            for key, dense in old_state.items():
                now = layer._scatter_kept(opt.state[layer.values][key], torch.float32)
                assert torch.equal(now[stayed], dense[stayed]) and not bool(now[grown].any())
        if records:
            f = records[0]["fraction"]
            for name, counts in records[0]["layers"].items():
                assert counts["dropped"] == round(f * layers[name].values.numel())
    assert changed_any


def test_sparse_linear_dense_grad_is_the_full_weight_gradient():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = SparseLinear.from_dense(dense.weight.detach(), dense.bias.detach(), compress=False)
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    assert layer.dense_grad is None  # off by default
    layer.values_grad = None
    layer.keep_dense_grad = True
    for _ in range(2):  # accumulates like a gradient
        layer(x).pow(2).sum().backward()
    w = layer.dense_weight().requires_grad_(True)
    torch.nn.functional.linear(x, w, layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(layer.dense_grad, 2 * w.grad)
    torch.testing.assert_close(layer.values_grad, layer._gather_kept(2 * w.grad))


def test_sparse_linear_set_mask_rejects_a_mask_that_is_not_nm():
    layer = SparseLinear.from_dense(torch.randn(8, 16), compress=False)
    bad = layer.mask.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="exactly 2 kept of every 4"):
        layer.set_mask(bad)
    with pytest.raises(ValueError, match="must be bool"):
        layer.set_mask(layer.mask.float())


# ---------------------------------------------------------------------- equality with a slow reference run
def _reference_run(total, interval, fraction, sparsity, lr):
    """The same training written plainly: dense weights, bool masks, full gradients every step."""
    model = _toy()
    names = ["0.weight", "2.weight", "4.weight"]
    params = dict(model.named_parameters())
    masks = {}
    for name in names:  # magnitude pruning, ties to the lower index
        w = params[name].detach()
        order = sorted(range(w.numel()), key=lambda i: (-abs(w.flatten()[i].item()), i))
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[order[: round((1 - sparsity) * w.numel())]] = True
        masks[name] = keep.reshape(w.shape)
        with torch.no_grad():
            params[name].mul_(masks[name])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(total):
        _loss(model, step).backward()
        full = {name: params[name].grad.clone() for name in names}
        for name in names:
            params[name].grad.mul_(masks[name])
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for name in names:
                params[name].mul_(masks[name])
                for key in ("exp_avg", "exp_avg_sq"):
                    opt.state[params[name]][key].mul_(masks[name])
        done = step + 1
        if done % interval == 0 and done < total:
            f = 0.5 * fraction * (1 + math.cos(math.pi * done / total))
            for name in names:
                new, _ = _reference_rigl(params[name].detach(), full[name], masks[name], f)
                changed = new ^ masks[name]
                with torch.no_grad():
                    params[name][changed] = 0
                    for key in ("exp_avg", "exp_avg_sq"):
                        opt.state[params[name]][key][changed] = 0
                masks[name] = new
    return model, masks


def test_rigl_training_equals_the_slow_reference():
    total, interval, fraction, sparsity, lr = 14, 3, 0.4, 0.7, 2e-2
    ref_model, ref_masks = _reference_run(total, interval, fraction, sparsity, lr)
    model = _toy()
    sp = DynamicSparsity(model, total, sparsity_ratio=sparsity, mask_update_interval=interval, mask_update_fraction=fraction,
                         targets=["0", "2", "4"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for step in range(total):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        sp.step(opt)
    assert len(sp.history) == 1 + len(range(interval, total, interval))
    for name, mask in sp.masked.masks.items():
        assert torch.equal(mask, ref_masks[name]), name
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- resume
def _train(model, sp, opt, steps, sparse_opt=None):
    for step in range(steps):
        _loss(model, sp.steps_done).backward()
        if sparse_opt is not None:
            sparse_opt.step()
            sparse_opt.zero_grad()
        opt.step()
        opt.zero_grad()
        sp.step(sparse_opt or opt)


@pytest.mark.parametrize("kind", ["unstructured-gradual+rigl", "2:4"])
def test_resume_restores_masks_and_schedule(kind):
    def build():
        model = _toy()
        options = dict(sparsity_schedule=lambda s, t: 0.2 + 0.5 * s / t) if kind != "2:4" else dict(sparsity_type="2:4")
        sp = DynamicSparsity(model, 12, mask_update_interval=2, mask_update_fraction=0.5, targets=["0", "2", "4"], **options)
        dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, sp, dense, ADAMWSparse(model, lr=1e-2) if kind == "2:4" else None

    model, sp, dense, sparse = build()
    _train(model, sp, dense, 12, sparse)
    first, sp1, dense1, sparse1 = build()
    _train(first, sp1, dense1, 5, sparse1)
    saved = {"model": first.state_dict(), "sp": sp1.state_dict(), "dense": dense1.state_dict(),
             "sparse": None if sparse1 is None else sparse1.state_dict()}
    resumed, sp2, dense2, sparse2 = build()
    resumed.load_state_dict(saved["model"])
    dense2.load_state_dict(saved["dense"])
    if sparse2 is not None:
        sparse2.load_state_dict(saved["sparse"])
    sp2.load_state_dict(saved["sp"])
    assert sp2.steps_done == 5 and sp2.masked.capturing == sp.policy.needs_dense_grad(5)
    _train(resumed, sp2, dense2, 7, sparse2)
    assert [r["step"] for r in sp2.history] == [r["step"] for r in sp.history]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_is_an_error():
    model = _toy()
    sp = DynamicSparsity(model, 10, mask_update_interval=2, targets=["0"])
    other = DynamicSparsity(_toy(), 10, mask_update_interval=3, targets=["0"])
    with pytest.raises(ValueError, match="resume with the same settings"):
        other.load_state_dict(sp.state_dict())


# ---------------------------------------------------------------------- gradual pruning
def test_cubic_schedule_is_zhu_and_gupta():
    s = CubicSchedule(0.8)  # 0 -> 0.8 over the first 75 % of training
    assert s(0, 100) == 0.0 and s(75, 100) == pytest.approx(0.8) and s(100, 100) == pytest.approx(0.8)
    assert s(25, 100) == pytest.approx(0.8 * (1 - (1 - 25 / 75) ** 3))


def test_seed_linear_schedule_drives_gradual_pruning():
    def sparsity_schedule(step: int, total_steps: int) -> float:
        """Linear increase in sparsity from 0.1 to 0.9"""
        return 0.1 + 0.8 * min(1.0, step / total_steps)

    model = _toy()
    sp = DynamicSparsity(model, 10, use_rigl=False, sparsity_schedule=sparsity_schedule, mask_update_interval=4,
                         targets=["0", "2", "4"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    def check(steps_done):  # every layer at the scheduled sparsity
        for mask in sp.masked.masks.values():
            assert int(mask.sum()) == round((1 - sparsity_schedule(steps_done, 10)) * mask.numel())

    check(0)
    events = [0]
    for step in range(10):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        if sp.step(opt):
            events.append(step + 1)
            check(step + 1)
    assert events == [0, 4, 8, 10]
    assert sp.sparsity == pytest.approx(0.9, abs=2e-3)


def test_gradual_nm_goes_through_k_of_m_stages():
    model = _toy()
    sp = DynamicSparsity(model, 8, sparsity_type="2:4", use_rigl=False, sparsity_schedule="linear", mask_update_interval=2,
                         targets=["0", "2", "4"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per_group = []
    for step in range(8):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        sp.step(opt)
        mask = sp.masked.masks["2.weight"]
        per_group.append(int(mask.reshape(-1, 4).sum(-1).max()))
        assert bool((mask.reshape(-1, 4).sum(-1) == per_group[-1]).all())
    assert per_group[0] == 4 and 3 in per_group and per_group[-1] == 2
    assert all(a >= b for a, b in zip(per_group, per_group[1:]))


def test_decreasing_or_out_of_range_schedules_are_errors():
    with pytest.raises(ValueError, match="outside"):
        DynamicSparsity(_toy(), 10, use_rigl=False, sparsity_schedule=lambda s, t: 1.0, targets=["0"])
    sp = DynamicSparsity(_toy(), 4, use_rigl=False, sparsity_schedule=lambda s, t: 0.5 - 0.1 * s, mask_update_interval=1,
                         targets=["0"])
    with pytest.raises(ValueError, match="cannot un-prune"):
        sp.step()


def test_topk_mask_takes_an_exact_count():
    from slope.masks import topk_mask

    scores = torch.randn(5, 7)
    mask = topk_mask(scores, keep=9)
    assert int(mask.sum()) == 9 and scores[mask].min() >= scores[~mask].max()
    for kwargs, match in ((dict(), "either"), (dict(sparsity=0.5, keep=3), "either"), (dict(keep=36), r"\[0, 35\]")):
        with pytest.raises(ValueError, match=match):
            topk_mask(scores, **kwargs)


def test_nm_step_refuses_a_torch_optimizer():
    """With N:M the weights live in SLoPe layers: AdamW never steps them (they used to stay frozen, silently)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    sparsifier = DynamicSparsity(model, total_steps=4, sparsity_type="2:4")
    with pytest.raises(TypeError, match=r"got AdamW, but the 2:4 weights live in SLoPe layers.*slope.ADAMWSparse"):
        sparsifier.step(torch.optim.AdamW(p for p in model.parameters() if p.requires_grad))
    sparsifier.step(ADAMWSparse(model))
    assert sparsifier.steps_done == 1
