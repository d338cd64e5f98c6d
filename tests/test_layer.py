"""``SparseLinear`` against a masked-dense oracle written from DESIGN §2, by hand:

forward ``y = x (W⊙M)ᵀ + b``, input grad ``dx = dy (W⊙M⊙M_t)`` with the current weights,
weight grad ``dW = (dyᵀ x) ⊙ M`` (compressed in ``values_grad``), bias grad ``dy.sum``.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slope import prune_model, sparse_modules
from slope.kernels import compress_2to4
from slope.layer import SparseLinear
from slope.masks import double_prune_mask, is_nm_sparse, nm_mask, pack_mask
from slope.optimizers import ADAMWSparse

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: {}}

# (compress, n, m): compress=True runs the reference backend (2:4 only).
MODES = [(False, 2, 4), (False, 2, 8), (False, 4, 8), (True, 2, 4)]
MODE_IDS = ["sim-2:4", "sim-2:8", "sim-4:8", "reference-2:4"]


class OracleLinear(torch.autograd.Function):
    """DESIGN §2 on dense tensors: the gradient of ``w`` is ``(dyᵀx)⊙M``, dx uses ``W⊙M⊙M_t``."""

    @staticmethod
    def forward(ctx, x, w, b, mask, mask_t):
        ctx.save_for_backward(x, w, mask, mask_t)
        y = F.linear(x, w * mask)
        return y if b is None else y + b

    @staticmethod
    def backward(ctx, dy):
        x, w, mask, mask_t = ctx.saved_tensors
        dx = dy @ (w * mask * mask_t)
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dw = (dy2.t() @ x2) * mask
        return dx, dw, dy2.sum(0) if ctx.needs_input_grad[2] else None, None, None


def make_layer(out_f, in_f, n, m, compress, dtype=torch.float32, bias=True, **kw):
    w = torch.randn(out_f, in_f, dtype=dtype)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    backend = "reference" if compress else "auto"
    return SparseLinear.from_dense(w, b, n=n, m=m, compress=compress, backend=backend, **kw), w, b


@pytest.mark.parametrize("compress,n,m", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_oracle(compress, n, m, dtype, bias):
    layer, w, b = make_layer(32, 64, n, m, compress, dtype, bias)
    mask, mask_t = layer.mask, layer.mask_t
    assert torch.equal(mask, nm_mask(w, n, m))
    assert torch.equal(mask_t, double_prune_mask(w * mask, mask, n, m))
    assert torch.equal(layer.dense_weight(), w * mask)
    assert torch.equal(layer.backward_weight(), w * mask * mask_t)

    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)  # 3-D input
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.clone().requires_grad_()
    b_ref = b.clone().requires_grad_() if bias else None
    y_ref = OracleLinear.apply(x_ref, w_ref, b_ref, mask, mask_t)
    assert y.shape == (3, 5, 32) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])

    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    assert layer.values.grad is None and layer.values_grad.shape == layer.values.shape
    assert layer.values_grad.dtype == dtype
    torch.testing.assert_close(layer.values_grad, w_ref.grad.masked_select(mask).view_as(layer.values), **TOL[dtype])
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **TOL[dtype])


def test_double_pruned_backward_differs_from_exact():
    """Guards the oracle test: dy(W⊙M⊙M_t) really differs from the exact dy(W⊙M)."""
    layer, w, _ = make_layer(8, 16, 2, 4, False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    exact = torch.ones(4, 8) @ (w * layer.mask)
    assert not torch.allclose(x.grad, exact)
    assert (layer.mask_t.sum() < layer.mask.sum()) and is_nm_sparse(layer.mask_t, 2, 4, dim=0)


@pytest.mark.parametrize("compress", [False, True])
def test_backward_uses_current_weights(compress):
    layer, _, _ = make_layer(16, 32, 2, 4, compress)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x)  # build and cache the operands
    y = layer(x)
    with torch.no_grad():
        layer.values.mul_(-3.0)  # an in-place update between forward and backward
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ layer.backward_weight())
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight()) + layer.bias)


def test_gradcheck_float64_exact_backward():
    """With double_pruning=False the layer is an exact linear map: gradcheck input and bias."""
    layer, _, _ = make_layer(8, 16, 2, 4, False, torch.float64, double_pruning=False)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, bias):
        return torch.func.functional_call(layer, {"bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, bias))


def test_gradcheck_float64_double_pruned_bias_and_fd_values_grad():
    layer, _, _ = make_layer(8, 16, 2, 4, False, torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    bias = layer.bias.detach().clone().requires_grad_()
    # The bias gradient is exact even with double pruning (x needs no grad here).
    assert torch.autograd.gradcheck(lambda b: torch.func.functional_call(layer, {"bias": b}, (x,)), (bias,))

    g = torch.randn(2, 3, 8, dtype=torch.float64)
    layer.values_grad = None
    (layer(x) * g).sum().backward()
    analytic = layer.values_grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    with torch.no_grad():
        flat = layer.values.view(-1)
        for i in range(flat.numel()):  # a finite difference per kept weight (64 of them)
            flat[i] += eps
            plus = (layer(x) * g).sum()
            flat[i] -= 2 * eps
            minus = (layer(x) * g).sum()
            flat[i] += eps
            numeric.view(-1)[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compress", [False, True])
def test_first_layer_without_bias_gets_values_grad(compress):
    layer, w, _ = make_layer(16, 32, 2, 4, compress, bias=False)
    x = torch.randn(4, 32)  # needs no grad, and there is no bias
    dy = torch.randn(4, 16)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.values_grad, ((dy.t() @ x) * layer.mask).masked_select(layer.mask).view(16, 16))


def test_no_graph_without_grad_mode():
    layer, _, _ = make_layer(8, 16, 2, 4, False, bias=False)
    with torch.no_grad():
        assert not layer(torch.randn(2, 16)).requires_grad
    layer.sparse_requires_grad = False
    assert not layer(torch.randn(2, 16)).requires_grad


def test_grad_accumulation_sums():
    layer, _, _ = make_layer(16, 32, 2, 4, True)
    x1, x2 = torch.randn(4, 32), torch.randn(6, 32)
    layer(x1).sum().backward()
    g1 = layer.values_grad.clone()
    layer(x2).sum().backward()
    layer.values_grad, total = None, layer.values_grad.clone()
    layer(x2).sum().backward()
    torch.testing.assert_close(total, g1 + layer.values_grad)


@pytest.mark.parametrize("compress", [False, True])
def test_bf16_autocast_over_fp32_weights(compress):
    layer, w, b = make_layer(32, 64, 2, 4, compress)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = F.linear(x, w * layer.mask, b)
    assert y.dtype == torch.bfloat16 and layer.values.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad.dtype == torch.float32 and layer.values_grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    dyf = dy.float()
    torch.testing.assert_close(x.grad, dyf @ layer.backward_weight(), **TOL[torch.bfloat16])
    torch.testing.assert_close(
        layer.values_grad, (dyf.t() @ x.detach()).masked_select(layer.mask).view_as(layer.values), rtol=3e-2, atol=5e-2
    )


def test_dense_optimizer_never_touches_sparse_values():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    prune_model(model, compress=False, verbose=False)
    layers = [mod for _, mod in sparse_modules(model)]
    before = [layer.values.detach().clone() for layer in layers]
    bias_before = layers[0].bias.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(4, 32)).pow(2).sum().backward()
    opt.step()
    for layer, old in zip(layers, before):
        assert layer.values.grad is None and not layer.values.requires_grad
        assert layer.values_grad is not None
        assert torch.equal(layer.values, old)
    assert not torch.equal(layers[0].bias, bias_before)


def test_input_errors():
    layer, _, _ = make_layer(8, 16, 2, 4, False)
    layer.layer_name = "blocks.0.fc"
    with pytest.raises(ValueError, match=r"blocks.0.fc.*\(\.\.\., 16\)"):
        layer(torch.randn(2, 12))
    with pytest.raises(TypeError, match="blocks.0.fc.*autocast"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="divisible by 4"):
        SparseLinear(18, 8)
    with pytest.raises(ValueError, match="2:4 only"):
        SparseLinear(16, 8, n=2, m=8, compress=True)


# ----------------------------------------------------------------------------- training vs oracle
def _oracle_adamw_(w, g, state, lr, betas, eps, wd):
    """One AdamW step on a dense tensor (moments in fp32), in place."""
    state["step"] += 1
    t = state["step"]
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g.float()
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g.float() ** 2
    master = w.float() * (1 - lr * wd)
    denom = (state["v"] / (1 - betas[1] ** t)).sqrt() + eps
    master = master - lr / (1 - betas[0] ** t) * state["m"] / denom
    w.copy_(master.to(w.dtype))


@pytest.mark.parametrize("compress,n,m", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_matches_oracle(compress, n, m, dtype):
    lr, betas, eps, wd, freq, steps = 1e-2, (0.9, 0.99), 1e-8, 0.05, 2, 5
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16, bias=False)).to(dtype)
    dense = [(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()) for lin in (model[0], model[2])]
    prune_model(model, compress=compress, backend="reference" if compress else "auto", sparsity=f"{n}:{m}", verbose=False)
    layers = [model[0], model[2]]
    sparse_opt = ADAMWSparse(model, lr=lr, betas=betas, eps=eps, weight_decay=wd, mask_change_freq=freq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps, weight_decay=wd)

    ws = [(w * layer.mask).clone() for (w, _), layer in zip(dense, layers)]
    masks = [layer.mask.clone() for layer in layers]
    masks_t = [double_prune_mask(w, mk, n, m) for w, mk in zip(ws, masks)]
    b0 = dense[0][1].clone().requires_grad_()
    ref_opt = torch.optim.AdamW([b0], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    states = [dict(step=0, m=torch.zeros(w.shape), v=torch.zeros(w.shape)) for w in ws]

    for step in range(1, steps + 1):
        x, target = torch.randn(4, 3, 64, dtype=dtype), torch.randn(4, 3, 16, dtype=dtype)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        w_refs = [w.clone().requires_grad_() for w in ws]
        h = F.gelu(OracleLinear.apply(x, w_refs[0], b0, masks[0], masks_t[0]))
        ref_loss = F.mse_loss(OracleLinear.apply(h, w_refs[1], None, masks[1], masks_t[1]), target)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
        for layer, wr, mk in zip(layers, w_refs, masks):
            torch.testing.assert_close(layer.values_grad, wr.grad.masked_select(mk).view_as(layer.values), **TOL[dtype])

        sparse_opt.step()
        opt.step()
        sparse_opt.zero_grad()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for i, wr in enumerate(w_refs):
                _oracle_adamw_(ws[i], wr.grad, states[i], lr, betas, eps, wd)
                if step % freq == 0:
                    masks_t[i] = double_prune_mask(ws[i], masks[i], n, m)

        for layer, w, mk, mt in zip(layers, ws, masks, masks_t):
            assert layer.values_grad is None
            assert torch.equal(layer.mask, mk)
            dw = layer.dense_weight()
            assert (dw[~mk] == 0).all() and (w[~mk] == 0).all()  # pruned entries stay exactly zero
            torch.testing.assert_close(dw, w, **TOL[dtype])
            assert torch.equal(layer.mask_t, mt)
        torch.testing.assert_close(layers[0].bias, b0.detach(), **TOL[dtype])


def test_mask_t_refreshes_exactly_every_freq_steps():
    freq, steps = 3, 7
    layer, _, _ = make_layer(16, 32, 2, 4, True)
    model = nn.Sequential(layer)
    opt = ADAMWSparse(model, lr=0.5, weight_decay=0.0, mask_change_freq=freq)
    calls = []
    original = layer.update_mask_t
    layer.update_mask_t = lambda: (calls.append(len(calls)), original())
    refreshed_at, changed = [], False
    for step in range(1, steps + 1):
        before = layer.mask_t.clone()
        layer(torch.randn(8, 32)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        if step % freq == 0:
            refreshed_at.append(step)
            assert torch.equal(layer.mask_t, double_prune_mask(layer.dense_weight(), layer.mask, 2, 4))
            changed = changed or not torch.equal(layer.mask_t, before)
        else:
            assert torch.equal(layer.mask_t, before)
    assert len(calls) == len(refreshed_at) == steps // freq
    assert changed, "the weights moved enough that some refresh changed M_t"


def test_copies_are_live_layers_without_cached_operands():
    import copy
    import pickle

    import slope

    model = prune_model(nn.Sequential(nn.Linear(16, 16)), compress=True, backend="reference", verbose=False)
    x = torch.randn(2, 16)
    model(x)
    assert model[0]._operands  # the forward operand is cached
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not clone[0]._operands
        assert torch.equal(clone(x), model(x))
        clone(x).sum().backward()
        assert any(layer is clone[0] for layer in slope.grad_dict)  # global-style calls see copies


def test_dtype_move_rebuilds_operands_in_the_new_layout():
    layer, _, _ = make_layer(32, 64, 2, 4, True)
    x = torch.randn(3, 64)
    layer(x)
    layer.to(torch.bfloat16)  # the operand's metadata layout changes with the dtype (plain → CUTLASS)
    assert layer.values.dtype == torch.bfloat16
    xb = x.bfloat16()
    torch.testing.assert_close(layer(xb), F.linear(xb, layer.dense_weight(), layer.bias), **TOL[torch.bfloat16])
    layer.float()
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias), **TOL[torch.float32])


def test_layers_store_no_metadata_and_load_states_that_hold_it():
    """The 2:4 metadata is derived from M by each backend: a layer stores none, and a state dict
    written when layers stored ``meta`` (one more entry per layer) still loads strictly."""
    layer, w, _ = make_layer(32, 64, 2, 4, True)
    state = layer.state_dict()
    assert "meta" not in state and "meta" not in dict(layer.named_buffers())
    legacy = {**state, "meta": compress_2to4(w * layer.mask, layer.mask)[1]}
    fresh, _, _ = make_layer(32, 64, 2, 4, True)
    assert not torch.equal(fresh.mask, layer.mask) or not torch.equal(fresh.values, layer.values)
    fresh.load_state_dict(legacy)  # strict
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.mask_t, layer.mask_t)


def test_mask_with_wrong_counts_per_group_is_a_clear_error():
    # 2 kept per row of 8 but 0 and 2... per group of 4 would misplace values silently if accepted.
    layer = make_layer(8, 8, 2, 4, compress=False)[0]
    bad = torch.zeros(8, 8, dtype=torch.bool)
    bad[:, [0, 1, 2, 3]] = True  # 4 in the first group, 0 in the second
    state = layer.state_dict()
    state["mask_bits"] = pack_mask(bad)  # a checkpoint of another sparsity
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="mask is not 2:4"):  # refused at load, before anything is written
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.mask_bits.copy_(pack_mask(bad))  # written behind the loader's back: still caught at use
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        layer.dense_weight()


@pytest.mark.parametrize("double_pruning", [True, False])
def test_a_double_pruned_mask_that_does_not_fit_is_a_clear_error_at_load(double_pruning):
    """M_t must lie inside M and, double-pruned, keep at most N of every M outputs: a corrupt one
    (here all ones) is refused at load naming the layer, not a bare kernel error at the first backward."""
    layer = make_layer(8, 8, 2, 4, compress=True, double_pruning=double_pruning)[0]
    state = layer.state_dict()
    state["mask_t_bits"] = pack_mask(torch.ones(8, 8, dtype=torch.bool))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="mask_t .* does not fit"):
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("n,m,compress", [(2, 4, True), (2, 4, False), (1, 4, False)])
def test_masks_are_stored_as_packed_bits(n, m, compress):
    layer = make_layer(12, 20, n, m, compress=compress)[0]
    mask, mask_t = layer.mask, layer.mask_t
    assert mask.dtype == torch.bool and mask.shape == (12, 20) and not torch.equal(mask, mask_t)
    # storage: 1/8 byte per weight and mask; no bool (out, in) buffer
    assert layer.mask_bits.dtype == torch.uint8 and layer.mask_bits.numel() == 12 * 20 // 8
    assert all(b.dtype != torch.bool for b in layer.buffers())
    state = layer.state_dict()
    assert torch.equal(state["mask_bits"], pack_mask(mask)) and torch.equal(state["mask_t_bits"], pack_mask(mask_t))
    # another layer takes the masks (and the values they place) from the state dict, and from a
    # checkpoint written with bool masks (before they were stored packed)
    legacy = {k: v for k, v in state.items() if not k.endswith("_bits")} | {"mask": mask, "mask_t": mask_t}
    for source in (state, legacy):
        other = make_layer(12, 20, n, m, compress=compress)[0]
        assert not torch.equal(other.mask, mask)
        other.load_state_dict(source)
        assert torch.equal(other.mask, mask) and torch.equal(other.mask_t, mask_t)
        x = torch.randn(3, 20)
        torch.testing.assert_close(other(x), layer(x))
        torch.testing.assert_close(other.backward_weight(), layer.dense_weight() * mask_t)


def test_a_checkpoint_mask_of_the_wrong_shape_or_dtype_is_a_clear_error():
    layer = make_layer(8, 8, 2, 4, compress=False)[0]
    legacy = {k: v for k, v in layer.state_dict().items() if not k.endswith("_bits")} | {"mask": layer.mask}
    for bad in (torch.ones(8, 12, dtype=torch.bool), layer.mask.float()):
        with pytest.raises(RuntimeError, match="mask_t is .* expected bool"):
            layer.load_state_dict(legacy | {"mask_t": bad})
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="mask_t_bits is torch.bool, expected packed uint8"):
        layer.load_state_dict(state | {"mask_t_bits": state["mask_t_bits"].bool()})
    with pytest.raises(RuntimeError, match=r"mask_bits is \(4,\), expected \(8,\) \(a layer of another size\)"):
        layer.load_state_dict(state | {"mask_bits": state["mask_bits"][:4]})
    del state["mask_bits"]
    with pytest.raises(RuntimeError, match="Missing key.*mask_bits"):
        layer.load_state_dict(state)
    before = layer.mask
    layer.load_state_dict(state, strict=False)  # the layer keeps its mask
    assert torch.equal(layer.mask, before)


def test_mask_updates_reach_the_cached_operands():
    layer = make_layer(8, 16, 2, 4, compress=True)[0]
    x = torch.randn(4, 16)
    layer(x)  # caches the forward operand
    weight = torch.randn(8, 16)
    layer.set_weight(weight)  # new mask and values
    torch.testing.assert_close(layer(x), F.linear(x, weight * nm_mask(weight), layer.bias))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_gather_scatter_of_kept_entries_match_masked_select(n, m):
    layer = make_layer(16, 32, n, m, compress=False)[0]
    full = torch.randn(16, 32)
    assert torch.equal(layer._gather_kept(full), full.masked_select(layer.mask).view(16, -1))
    expected = torch.zeros(16, 32).masked_scatter_(layer.mask, layer.values.detach())
    assert torch.equal(layer.dense_weight(), expected)


# ---------------------------------------------------------------- forward operand from kept values
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((64, 96), torch.float32), ((64, 128), torch.bfloat16), ((40, 52), torch.bfloat16)],
    ids=["fp32-plain", "bf16-cutlass-layout", "bf16-plain"],
)
def test_operand_from_values_equals_the_compressed_dense(backend_name, shape, dtype):
    from slope.backends import backend_class

    backend = backend_class(backend_name)()
    layer = SparseLinear.from_dense(torch.randn(*shape), compress=True, backend="reference")
    layer.values.data[0, :2] = 0.0  # kept entries that are exactly zero must keep their slots
    structure = backend.operand_structure(layer.mask, dtype)
    fast = backend.operand_from_values(layer.values.detach().to(dtype), structure)
    slow = backend.make_operand(layer.dense_weight().to(dtype), layer.mask)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_operands_skip_the_dense_detour_and_cache_their_structures(monkeypatch):
    from slope.backends.reference import ReferenceBackend

    calls = {"structure": 0, "make_operand": 0}
    real_structure, real_make = ReferenceBackend.operand_structure, ReferenceBackend.make_operand

    def counting_structure(self, mask, dtype):
        calls["structure"] += 1
        return real_structure(self, mask, dtype)

    def counting_make(self, dense, mask):
        calls["make_operand"] += 1
        return real_make(self, dense, mask)

    monkeypatch.setattr(ReferenceBackend, "operand_structure", counting_structure)
    monkeypatch.setattr(ReferenceBackend, "make_operand", counting_make)
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    fast = SparseLinear.from_dense(w, compress=True, backend="reference")
    sim = SparseLinear.from_dense(w, compress=False)
    opt_fast = ADAMWSparse(fast, lr=1e-2)
    opt_sim = ADAMWSparse(sim, lr=1e-2)
    for _ in range(3):
        x = torch.randn(5, 64, requires_grad=True)  # an input gradient needs the backward operand
        for layer, opt in ((fast, opt_fast), (sim, opt_sim)):
            layer(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(fast.dense_weight(), sim.dense_weight(), rtol=1e-6, atol=1e-6)
    # the values changed every step, the masks never: one structure per operand, no make_operand
    assert calls["structure"] == 2 and calls["make_operand"] == 0
    x = torch.randn(5, 64)
    torch.testing.assert_close(fast(x), sim(x), rtol=1e-5, atol=1e-5)
    # a new mask (here: a re-prune) invalidates the structure
    with torch.no_grad():
        fast.set_weight(torch.randn(48, 64))
        sim.set_weight(fast.dense_weight())
    torch.testing.assert_close(fast(x), F.linear(x, fast.dense_weight()), rtol=1e-5, atol=1e-5)
    assert calls["structure"] == 3  # the forward one (M changed; M_t too, used at the next backward)
    x.requires_grad_(True)
    fast(x).sum().backward()
    assert calls["structure"] == 4
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ fast.backward_weight(), rtol=1e-5, atol=1e-5)


def test_forward_operand_of_other_sparsities_uses_make_operand():
    layer = SparseLinear.from_dense(torch.randn(16, 32), compress=False, n=2, m=8)
    backend = layer._backend_for(torch.float32, torch.device("cpu"))
    for which in ("forward", "backward"):
        assert layer._operand_structure(backend, which, torch.float32, torch.device("cpu")) is None
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cutlass_backend_builds_operands_from_kept_values(dtype):
    """PyTorch's CUTLASS tensors (sm8x; built here on CPU) from a layer's kept values equal the
    ones make_operand builds from the dense weight; padded shapes fall back to make_operand."""
    from slope.backends.torch_semi_structured import CutlassBackend

    backend = CutlassBackend()
    layer = SparseLinear.from_dense(torch.randn(64, 128), compress=False)
    dense = layer.dense_weight().to(dtype)
    structure = backend.operand_structure(layer.mask, dtype)
    fast = backend.operand_from_values(layer.values.detach().to(dtype), structure)
    slow = backend.make_operand(dense, layer.mask)
    assert (fast.rows, fast.cols, fast.pad_cols) == (slow.rows, slow.cols, slow.pad_cols) == (64, 128, 0)
    assert torch.equal(fast.sparse.packed, slow.sparse.packed) and torch.equal(fast.sparse.meta, slow.sparse.meta)
    assert backend.operand_structure(layer.mask[:, :96], dtype) is None  # 96 columns need padding to 64s
    with pytest.raises(ValueError, match="do not match metadata"):
        backend.operand_from_values(layer.values.detach().to(dtype)[:32], structure)


@pytest.mark.parametrize("compress", [False, True])
def test_inference_skips_the_autograd_function_and_matches(monkeypatch, compress):
    """Without autograd (no_grad / inference) the layer computes the same output directly (with
    the bias fused into the backend's product); with autograd it goes through the Function."""
    import slope.layer as layer_module

    calls = []
    real_apply = layer_module._SparseLinearFunction.apply
    monkeypatch.setattr(layer_module._SparseLinearFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    layer = SparseLinear.from_dense(torch.randn(32, 64), torch.randn(32), compress=compress, backend="reference")
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, layer.dense_weight(), layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert calls == []
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # trains: the Function runs
    assert calls == [1]


def test_dense_weight_in_another_dtype_is_the_cast_copy():
    layer = SparseLinear.from_dense(torch.randn(16, 32), compress=False)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        dense = layer.dense_weight(dtype)
        assert dense.dtype == dtype and torch.equal(dense, layer.dense_weight().to(dtype))


def test_a_layer_warns_when_its_gradient_is_never_stepped(monkeypatch):
    """prune_model + a torch optimizer alone: the 2:4 values never train; after many backward passes
    into one un-zeroed values_grad the layer says why. An ADAMWSparse loop never hears it."""
    import warnings

    import slope.layer as layer_module

    monkeypatch.setattr(layer_module, "UNSTEPPED_BACKWARDS_WARNING", 4)
    x = torch.randn(8, 64)

    def layer():
        torch.manual_seed(0)
        return prune_model(nn.Sequential(nn.Linear(64, 64)), verbose=False)

    model = layer()
    with pytest.warns(UserWarning, match="added up 4 backward passes without being zeroed.*slope.ADAMWSparse"):
        for _ in range(4):
            model(x).sum().backward()
    model = layer()
    opt = ADAMWSparse(model, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("compress", [False, True], ids=["sim", "reference"])
def test_a_model_pruned_under_inference_mode_runs_and_trains_like_one_pruned_outside(compress):
    """Pruning under ``torch.inference_mode()`` (a model loaded for evaluation) gives layers of
    ordinary tensors (the operand caches key on version counters, which inference tensors lack)."""
    kw = dict(compress=compress, backend="reference" if compress else "auto", verbose=False)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(4, 32)
    with torch.inference_mode():
        model = prune_model(copy.deepcopy(base), **kw)
        y_inference = model(x)
    reference = prune_model(copy.deepcopy(base), **kw)
    torch.testing.assert_close(y_inference, reference(x), rtol=0, atol=0)
    opts = [ADAMWSparse(model, lr=1e-2, mask_change_freq=1), ADAMWSparse(reference, lr=1e-2, mask_change_freq=1)]
    for mod, opt in zip((model, reference), opts):
        mod(x).square().mean().backward()
        opt.step()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_functional_call_with_other_weights_differentiates_those_weights():
    """``torch.func.functional_call`` with another layer's values and masks: the backward (run after
    it restored the layer's own) uses the ones the forward used, like that other layer does."""
    torch.manual_seed(0)
    layer, _, _ = make_layer(16, 32, 2, 4, compress=True)
    other, _, _ = make_layer(16, 32, 2, 4, compress=True)
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    x = torch.randn(4, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x).sum().backward()  # caches the layer's own operands first
    layer.zero_values_grad()
    y = torch.func.functional_call(layer, state, (x1,))
    y.square().sum().backward()
    other(x2).square().sum().backward()
    torch.testing.assert_close(y, other(x), rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.values_grad, other.values_grad, rtol=0, atol=0)


def test_torch_func_transforms_are_refused_clearly():
    layer, _, _ = make_layer(16, 32, 2, 4, compress=True)
    params = dict(layer.named_parameters())
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda p, x: torch.func.functional_call(layer, p, (x,)).sum())(params, torch.randn(4, 32))
