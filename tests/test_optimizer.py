"""``ADAMWSparse``, ``grad_dict`` and ``sync_grads`` (single process)."""
import copy
import gc
import io

import pytest
import torch
import torch.nn as nn

import slope
from slope import GradDict, grad_dict, prune_model, sparse_modules, sync_grads
from slope.optimizers import ADAMWSparse


def _model(dtype=torch.float32, sparsity="2:4", compress=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8)).to(dtype)
    kw = dict(backend="reference") if compress else {}
    return prune_model(model, compress=compress, sparsity=sparsity, verbose=False, **kw)


def _layers(model):
    return [mod for _, mod in sparse_modules(model)]


def _backward(model, x):
    model(x).float().pow(2).mean().backward()


@pytest.mark.parametrize("sparsity,dtype", [("2:4", torch.float32), ("2:8", torch.float32), ("2:4", torch.bfloat16)])
def test_state_only_for_kept_entries_fp32_moments(sparsity, dtype):
    n, m = (int(v) for v in sparsity.split(":"))
    model = _model(dtype, sparsity)
    opt = ADAMWSparse(model, lr=1e-3)
    _backward(model, torch.randn(4, 32, dtype=dtype))
    opt.step()
    for layer in _layers(model):
        state = opt.state[layer.values]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32
            assert state[key].numel() == layer.out_features * layer.in_features * n // m
    assert len(opt.state) == 2


def test_step_matches_torch_adamw_on_kept_values():
    """Torch's AdamW on plain tensors holding the kept values and ``values_grad`` is the oracle."""
    model = _model(compress=True)
    layers = _layers(model)
    hp = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = ADAMWSparse(model, mask_change_freq=1000, **hp)
    shadows = [layer.values.detach().clone().requires_grad_() for layer in layers]
    ref = torch.optim.AdamW(shadows, **hp)
    for _ in range(4):
        _backward(model, torch.randn(6, 32))
        for shadow, layer in zip(shadows, layers):
            shadow.grad = layer.values_grad.clone()
        opt.step()
        opt.zero_grad()
        ref.step()
        for shadow, layer in zip(shadows, layers):
            torch.testing.assert_close(layer.values, shadow.detach(), rtol=1e-6, atol=1e-7)


def test_layer_without_grad_is_skipped():
    model = _model()
    opt = ADAMWSparse(model, lr=0.1)
    first, second = _layers(model)
    before = second.values.detach().clone()
    first(torch.randn(3, 32)).sum().backward()  # only the first layer gets a gradient
    opt.step()
    assert torch.equal(second.values, before) and second.values not in opt.state


def test_freezing_a_layer_needs_sparse_requires_grad():
    """README: requires_grad_(False) does not reach a SLoPe layer's sparse weights (values is never a
    requires_grad parameter); sparse_requires_grad = False freezes them."""
    model = _model()
    opt = ADAMWSparse(model, lr=0.1)
    first, second = _layers(model)
    first.requires_grad_(False)
    before = first.values.detach().clone()
    _backward(model, torch.randn(3, 32))
    opt.step()
    assert not torch.equal(first.values, before)
    first.sparse_requires_grad = False
    opt.zero_grad()
    before = first.values.detach().clone()
    _backward(model, torch.randn(3, 32))
    opt.step()
    assert torch.equal(first.values, before) and second.values_grad is not None


def _train(model, sparse_opt, dense_opt, inputs):
    for x in inputs:
        _backward(model, x)
        sparse_opt.step()
        dense_opt.step()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()


def _optimizers(model):
    sparse_opt = ADAMWSparse(model, lr=1e-2, weight_decay=0.05, mask_change_freq=2)
    dense_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return sparse_opt, dense_opt


@pytest.mark.parametrize("dtype,compress", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_state_dict_round_trip_gives_identical_steps(dtype, compress):
    model = _model(dtype, compress=compress, seed=1)
    sparse_opt, dense_opt = _optimizers(model)
    _train(model, sparse_opt, dense_opt, [torch.randn(4, 32, dtype=dtype) for _ in range(3)])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sparse": sparse_opt.state_dict(), "dense": dense_opt.state_dict()}, buffer)

    later = [torch.randn(4, 32, dtype=dtype) for _ in range(3)]
    _train(model, sparse_opt, dense_opt, later)

    resumed = _model(dtype, compress=compress, seed=2)  # different init, masks, M_t
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    r_sparse, r_dense = _optimizers(resumed)
    r_sparse.load_state_dict(saved["sparse"])
    r_dense.load_state_dict(saved["dense"])
    for layer in _layers(resumed):
        assert r_sparse.state[layer.values]["exp_avg"].dtype == torch.float32
    _train(resumed, r_sparse, r_dense, later)

    for a, b in zip(_layers(model), _layers(resumed)):
        assert torch.equal(a.values, b.values)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.mask_t, b.mask_t)
        assert torch.equal(a.bias, b.bias)
        assert torch.equal(sparse_opt.state[a.values]["exp_avg_sq"], r_sparse.state[b.values]["exp_avg_sq"])
    x = torch.randn(2, 32, dtype=dtype)
    assert torch.equal(model(x), resumed(x))


def test_lambda_lr_scheduler_drives_sparse_lr():
    model = _model()
    opt = ADAMWSparse(model, lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: [1.0, 0.5, 0.0][min(epoch, 2)])
    layer = _layers(model)[0]
    for expected_lr in (0.1, 0.05):
        assert opt.lr == pytest.approx(expected_lr)
        before = layer.values.detach().clone()
        _backward(model, torch.randn(4, 32))
        opt.step()
        opt.zero_grad()
        sched.step()
        assert not torch.equal(layer.values, before)
    assert opt.lr == 0.0
    before = layer.values.detach().clone()
    _backward(model, torch.randn(4, 32))
    opt.step()  # lr 0: neither the gradient nor weight decay moves anything
    assert torch.equal(layer.values, before)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clip_grad_norm_joint_matches_torch(norm_type, max_norm):
    model = _model()
    opt = ADAMWSparse(model)
    _backward(model, torch.randn(8, 32) * 10)
    dense_params = [p for p in model.parameters() if p.requires_grad]
    # The equivalent dense problem: one tensor per sparse gradient plus the dense grads.
    shadows = [layer.values_grad.clone() for layer in _layers(model)] + [p.grad.clone() for p in dense_params]
    shadow_params = [torch.zeros_like(g, requires_grad=True) for g in shadows]
    for p, g in zip(shadow_params, shadows):
        p.grad = g
    expected = torch.nn.utils.clip_grad_norm_(shadow_params, max_norm, norm_type=norm_type)
    total = opt.clip_grad_norm(max_norm, dense_params, norm_type=norm_type)
    torch.testing.assert_close(total, expected)
    got = [layer.values_grad for layer in _layers(model)] + [p.grad for p in dense_params]
    for g, p in zip(got, shadow_params):
        torch.testing.assert_close(g, p.grad)
    assert (total > max_norm) == (max_norm == 1e-3)


def test_lr_weight_decay_setters_and_zero_grad():
    model = _model()
    opt = ADAMWSparse(model, lr=0.1, weight_decay=0.0)
    opt.lr = 0.25
    opt.weight_decay = 0.5
    assert all(g["lr"] == 0.25 and g["weight_decay"] == 0.5 for g in opt.param_groups)
    assert opt.lr == 0.25 and opt.weight_decay == 0.5
    _backward(model, torch.randn(2, 32))
    opt.zero_grad(set_to_none=False)
    assert all(layer.values_grad is not None and not layer.values_grad.any() for layer in _layers(model))
    opt.zero_grad()
    assert all(layer.values_grad is None for layer in _layers(model))


def test_unscale_detects_overflow():
    model = _model()
    opt = ADAMWSparse(model)
    _backward(model, torch.randn(2, 32))
    grads = [layer.values_grad.clone() for layer in _layers(model)]
    assert opt.unscale_(0.5) is False
    for g, layer in zip(grads, _layers(model)):
        torch.testing.assert_close(layer.values_grad, g * 0.5)
    _layers(model)[1].values_grad[0, 0] = float("inf")
    assert opt.unscale_(1.0) is True


def test_constructor_errors():
    with pytest.raises(ValueError, match="prune_model"):
        ADAMWSparse(nn.Sequential(nn.Linear(4, 4)))
    model = _model()
    with pytest.raises(TypeError, match="grad_dict"):
        ADAMWSparse(model, {})
    with pytest.raises(ValueError, match="mask_change_freq"):
        ADAMWSparse(model, mask_change_freq=0)
    with pytest.raises(TypeError, match="nn.Module"):
        ADAMWSparse([torch.zeros(2)])


def test_grad_dict_lists_layers_with_grads_and_global_style():
    gc.collect()
    model = _model()
    layers = _layers(model)
    view = GradDict(model)
    assert len(view) == 0 and list(view) == []
    layers[0](torch.randn(2, 32)).sum().backward()
    assert list(view) == [layers[0]] and view[layers[0]] is layers[0].values_grad
    with pytest.raises(KeyError):
        view[layers[1]]
    assert layers[0] in list(grad_dict) and layers[1] not in list(grad_dict)
    # SLoPe's global style: ADAMWSparse(grad_dict=slope.grad_dict) over every live layer.
    opt = ADAMWSparse(grad_dict=slope.grad_dict, lr=0.1)
    assert all(any(layer is other for other in opt.layers()) for layer in layers)
    before = layers[0].values.detach().clone()
    opt.step()
    assert not torch.equal(layers[0].values, before)


def test_sync_grads_is_a_noop_without_distributed():
    assert not torch.distributed.is_initialized()
    model = _model()
    _backward(model, torch.randn(2, 32))
    grads = [(layer.values_grad, layer.values_grad.clone()) for layer in _layers(model)]
    sync_grads()
    sync_grads(model)
    for (obj, copy), layer in zip(grads, _layers(model)):
        assert layer.values_grad is obj and torch.equal(obj, copy)


def test_fused_and_loop_paths_agree(monkeypatch):
    """fp32 values take PyTorch's fused AdamW kernel; the per-tensor loop (bf16 values, or a
    PyTorch without the kernel) must compute the same update."""
    import slope.optimizers.adamw_sparse as adamw_sparse_module

    calls = []
    real = adamw_sparse_module._FUSED_ADAMW
    if real is None:
        pytest.skip("this PyTorch has no fused AdamW kernel")

    def spy(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    models = [copy.deepcopy(base) for _ in range(2)]
    for model in models:
        prune_model(model, verbose=False, compress=False)
    opts = []
    for fused, model in zip((True, False), models):
        monkeypatch.setattr(adamw_sparse_module, "_FUSED_ADAMW", spy if fused else None)
        opts.append(ADAMWSparse(model, lr=1e-2, weight_decay=0.1, mask_change_freq=2))
    for _ in range(4):
        x = torch.randn(6, 32)
        for fused, model, opt in zip((True, False), models, opts):
            monkeypatch.setattr(adamw_sparse_module, "_FUSED_ADAMW", spy if fused else None)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert calls == [2, 2, 2, 2]  # one fused launch per step for both layers (same device, same step)
    for (_, a), (_, b) in zip(sparse_modules(models[0]), sparse_modules(models[1])):
        torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opts[0].state[a.values]["exp_avg_sq"], opts[1].state[b.values]["exp_avg_sq"])
        assert torch.equal(a.mask_t, b.mask_t)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_model_and_optimizer_mid_training_trains_like_the_original(how):
    """``copy.deepcopy`` / ``torch.save`` of ``(model, sparse_opt)`` between backward and step (``values_grad``
    present, moments held): the copy's optimizer steps the copy's layers, exactly as the original continues."""
    model = _model(compress=True)
    opt = ADAMWSparse(model, lr=1e-2, mask_change_freq=3)
    xs = [torch.randn(4, 32) for _ in range(6)]
    for x in xs[:2]:
        _backward(model, x)
        opt.step()
        opt.zero_grad()
    _backward(model, xs[2])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    for m, o in ((model, opt), (model2, opt2)):
        o.step()
        o.zero_grad()
        for x in xs[3:]:
            _backward(m, x)
            o.step()
            o.zero_grad()
    for a, b in zip(_layers(model), _layers(model2)):
        assert a.values is not b.values
        assert torch.equal(a.values, b.values)
        assert torch.equal(a.mask_t_bits, b.mask_t_bits)
        assert torch.equal(opt.state[a.values]["exp_avg_sq"], opt2.state[b.values]["exp_avg_sq"])


def test_torch_grad_scaler_is_refused_and_the_loss_scaler_is_named():
    """``torch.amp.GradScaler`` sees ``param.grad`` only: stepping ADAMWSparse through it is a clear
    error naming slope.train.LossScaler, before anything moves."""
    import warnings

    from slope.layer import SparseLinear

    layer = SparseLinear.from_dense(torch.randn(16, 32), compress=False)
    opt = ADAMWSparse(layer, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(layer(torch.randn(3, 32)).square().sum()).backward()
    before = layer.values.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch's notice about the grad_scaler argument)
        with pytest.raises(RuntimeError, match="torch.amp.GradScaler cannot unscale .*slope.train.LossScaler"):
            scaler.step(opt)
    assert torch.equal(layer.values, before)
