"""Merged sparse+LoRA inference folds (slope.inference.fold): the extended reduction
``[x | ũ]·[W⊙M | B̃]ᵀ`` against the unmerged model and a float64 oracle, on fresh random inputs,
with the reference, simulated and Triton (interpreter) backends, fp32 and bf16; its operand;
``lowrank_concat``; shared weights of frozen layers; ``auto``'s sparse-only choice for them."""
import os

import pytest
import torch
import torch.nn as nn

from slope import prune_model, sparse_modules
from slope.inference.fold import choose_fold, extended_weight, padded_rank
from slope.kernels import decompress_2to4, lowrank_concat, reference
from slope.lora import freeze_for_inference, merge_lora, set_lora_fold

BACKENDS = ["reference", "simulated"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


class MLP(nn.Module):
    def __init__(self, dims=(64, 96, 32), bias=True):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1], bias=bias)
        self.fc2 = nn.Linear(dims[1], dims[2], bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _model(backend, rank, dtype, bias=True, alpha=None, seed=0):
    torch.manual_seed(seed)
    kw = {"compress": False} if backend == "simulated" else {"backend": backend}
    model = prune_model(MLP(bias=bias).to(dtype), add_lora=True, lora_rank=rank, lora_alpha=alpha, verbose=False, **kw)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.3)
            if layer.bias is not None:
                layer.bias.normal_()
    return model


def _oracle(layer, x):
    x = x.double()
    a = (layer.lora_A * layer.lora_A_mask).double()
    y = x @ layer.dense_weight().double().t() + layer.lora_scaling * (x @ a.t()) @ layer.lora_B.double().t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,bias", [(8, True), (5, False), (12, True)])
def test_extended_fold_equals_unmerged_fp32(backend, rank, bias):
    model = _model(backend, rank, torch.float32, bias, alpha=3.0 * rank)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        expected = model(x)
        oracle = _oracle(model.fc2, torch.relu(_oracle(model.fc1, x)))
        merge_lora(model, fold="extended")
        assert model.fc1.fold == model.fc2.fold == "extended"
        got = model(x)
    assert got.shape == (3, 7, 32) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", ["extended", "stacked", "auto"])
def test_folds_equal_unmerged_bf16(backend, fold):
    model = _model(backend, 8, torch.bfloat16)
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x).double()
        oracle = _oracle(model.fc2, torch.relu(_oracle(model.fc1, x)).bfloat16())
        merge_lora(model, fold=fold)
        freeze_for_inference(model)
        got = model(x)
    assert got.dtype == torch.bfloat16
    scale = oracle.abs().max().item()
    assert (got.double() - oracle).abs().max().item() <= 2e-2 * scale
    assert (got.double() - expected).abs().max().item() <= 2e-2 * scale


def test_extended_operand_is_2to4_and_holds_w_and_b():
    model = merge_lora(_model("reference", 5, torch.float32), fold="extended")
    layer = model.fc1
    with torch.no_grad():
        model(torch.randn(2, 64))
    (operand, a_scaled), = [v[1] for k, v in layer._operands.items() if k[0] == "merged"]
    dense = decompress_2to4(*operand)
    big_r = padded_rank(5)
    assert big_r == 8 and dense.shape == (96, 64 + 16)
    torch.testing.assert_close(dense[:, :64], layer.dense_weight(), rtol=0, atol=0)
    tail = dense[:, 64:].reshape(96, big_r, 2)
    torch.testing.assert_close(tail[:, :5, 0], layer.lora_B.detach(), rtol=0, atol=0)
    assert not tail[:, 5:].any() and not tail[..., 1].any()
    _, mask = extended_weight(layer)
    assert (mask.reshape(96, -1, 4).sum(-1) == 2).all()
    expected_a = (layer.lora_A * layer.lora_A_mask).detach() * layer.lora_scaling
    torch.testing.assert_close(a_scaled[:5], expected_a, rtol=0, atol=0)
    assert not a_scaled[5:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,r", [(1, 64, 8), (37, 96, 16), (130, 128, 24)])
def test_lowrank_concat_matches_its_definition(dtype, m, k, r):
    x, a = torch.randn(m, k, dtype=dtype), torch.randn(r, k, dtype=dtype)
    got = reference.lowrank_concat(x, a)
    assert got.shape == (m, k + 2 * r)
    assert torch.equal(got[:, :k], x) and not got[:, k + 1 :: 2].any()
    u = x.double() @ a.double().t()
    torch.testing.assert_close(got[:, k::2].double(), u, rtol=2e-2, atol=2e-2 * u.abs().max().item())
    assert torch.equal(lowrank_concat(x, a), got)  # CPU dispatch: the reference
    with pytest.raises(ValueError, match="a \\(R, K\\)"):
        reference.lowrank_concat(x, a[:, 1:])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_lowrank_concat_matches_reference(dtype):
    from slope.kernels.triton_lowrank import lowrank_concat as triton_concat

    x = torch.randn(70, 160, dtype=dtype)[:, :128]  # strided rows
    a = torch.randn(24, 128, dtype=dtype)
    got, ref = triton_concat(x, a), reference.lowrank_concat(x.float(), a.float())
    assert torch.equal(got[:, :128], x) and not got[:, 129::2].any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
    torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=tol)


def test_auto_fold_follows_the_byte_count_and_non_2to4_layers_stay_stacked():
    assert choose_fold("auto", 2048, 8192, 64) == "extended"  # gate/up: in + 2R <= out + r
    assert choose_fold("auto", 8192, 2048, 64) == "stacked"  # down
    assert choose_fold("auto", 2048, 2048, 64) == "stacked"  # q/o: 2176 > 2112
    with pytest.raises(ValueError, match="choose one of auto, stacked, extended"):
        choose_fold("fused", 8, 8, 8)
    with pytest.raises(ValueError, match="fold 'fused' unknown"):
        merge_lora(_model("reference", 8, torch.float32), fold="fused")
    model = prune_model(MLP(), add_lora=True, lora_rank=8, sparsity="1:4", compress=False, verbose=False)
    merge_lora(model, fold="extended")
    assert model.fc1.fold == "stacked"


def test_set_lora_fold_switches_and_rebuilds():
    model = merge_lora(_model("reference", 8, torch.float32), fold="stacked")
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
        set_lora_fold(model, "extended")
        assert model.fc1.fold == "extended"
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merge_lora"):
        set_lora_fold(_model("reference", 8, torch.float32), "extended")


@pytest.mark.parametrize("fold", ["extended", "stacked"])
def test_frozen_layer_keeps_its_weights_once_and_still_loads(fold):
    model = _model("reference", 8, torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, fold=fold)
    freeze_for_inference(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        first = model(x)
        layer = model.fc1
        (operand,) = [v[1] for k, v in layer._operands.items() if k[0] == "merged"]
        held = operand[0][0] if fold == "extended" else operand[0]
        assert layer.values.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()  # one copy
        # extended: B is the operand's kept values after W's (B̃ keeps entries 0 and 2 of each 4)
        b_shared = layer.lora_B.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
        assert b_shared == (fold == "extended")
        assert "fc1.meta" not in model.state_dict()  # no stored metadata (derived from M)
        for name in ("values", "lora_B"):
            saved = model.state_dict()["fc1." + name]
            assert saved.is_contiguous() and saved.untyped_storage().nbytes() == saved.numel() * saved.element_size()
            torch.testing.assert_close(saved, getattr(layer, name), rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()["fc1.lora_B"], state["fc1.lora_B"], rtol=0, atol=0)
        assert model.state_dict(keep_vars=True)["fc1.values"] is layer.values  # the parameters themselves
        torch.testing.assert_close(layer.dense_weight(), decompress_2to4(*(operand[0] if fold == "extended" else operand))[:96, :64])
        torch.testing.assert_close(model(x), first, rtol=0, atol=0)  # no rebuild loop, same result
        # the frozen model's state dict (no M_t) loads into an unmerged model, strictly: same
        # outputs, M_t rebuilt from the loaded W⊙M (here the source's own M_t: its weights
        # have not changed since M_t was computed)
        unmerged = _model("reference", 8, torch.float32, seed=1)
        unmerged.load_state_dict(model.state_dict())
        torch.testing.assert_close(unmerged(x), first, rtol=1e-5, atol=1e-5)
        for name in ("fc1", "fc2"):
            assert torch.equal(getattr(unmerged, name).mask_t_bits, state[f"{name}.mask_t_bits"]), name
        # new weights load into the shared views and the operand follows
        state = {k: (v * 0.5 if k.endswith(("values", "lora_B")) else v) for k, v in state.items() if "mask_t" not in k}
        model.load_state_dict(state, strict=False)
        reloaded = model(x)
    reference_model = _model("reference", 8, torch.float32)
    reference_model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded, reference_model(x), rtol=1e-5, atol=1e-5)


def test_frozen_fold_switch_releases_the_old_operand():
    """``lora_B`` shared with an extended operand gets its own storage again once the layer folds
    ``stacked`` (the old operand's storage is not kept alive by it); outputs stay the unmerged ones."""
    model = _model("reference", 8, torch.float32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    merge_lora(model, fold="extended")
    freeze_for_inference(model)
    layer = model.fc1
    with torch.no_grad():
        model(x)
        old = layer.lora_B.untyped_storage().data_ptr()
        assert old == layer.values.untyped_storage().data_ptr()
        set_lora_fold(model, "stacked")
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.lora_B.untyped_storage().nbytes() == layer.lora_B.numel() * layer.lora_B.element_size()
    assert layer.lora_B.untyped_storage().data_ptr() != old and layer.values.untyped_storage().data_ptr() != old


def test_auto_on_frozen_merged_layers_never_picks_dense(monkeypatch):
    """Timed auto (as on CUDA; a fake timer here) keeps a sparse backend for an inference-only
    merged layer even where dense is faster, so no dense copy of the weights is held."""
    import slope.backends.auto as auto_module
    import slope.layer as layer_module
    from slope.backends.auto import AutoBackendChooser

    times = iter([1.0, 5.0] * 20)  # dense 1 ms, reference 5 ms: plain auto would pick dense

    def timer(fn, device):
        fn()
        return next(times)

    monkeypatch.setattr(auto_module, "AUTO_CHOOSER", AutoBackendChooser(tokens=64, timer=timer, candidates=("reference",)))
    monkeypatch.setattr(layer_module, "_auto_is_timed", lambda device: True)
    model = _model("auto", 8, torch.float32)
    merge_lora(model, fold="extended")
    freeze_for_inference(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        model(torch.randn(40, 64))
        y = model(x)  # a decode-sized call keeps the one backend (and operand) chosen at the prefill size
    assert [type(b).__name__ for b in model.fc1._backends.values()] == ["ReferenceBackend"]
    assert {key[4] for key in auto_module.AUTO_CHOOSER.report()} == {64}  # timed at the largest bucket only
    torch.testing.assert_close(y.double(), _oracle(model.fc2, torch.relu(_oracle(model.fc1, x))), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- fused decode kernel
def _decode_case(dtype, m, n, k, r, layout, strided, seed=0):
    from slope.kernels import compress_2to4, prune_2to4

    gen = torch.Generator().manual_seed(seed)
    w, mask = prune_2to4(torch.randn(n, k, generator=gen).to(dtype))
    values, meta = compress_2to4(w, mask, layout=layout)
    if strided:  # the kept values as a view into a wider operand's storage (frozen layers share them)
        wide = torch.zeros(n, k // 2 + 16, dtype=dtype)
        wide[:, : k // 2] = values
        values = wide[:, : k // 2]
    x = torch.randn(m, k, generator=gen).to(dtype)
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, r, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    if strided:  # and the bias a strided view (the kernel read it as contiguous)
        bias = torch.stack([bias, torch.zeros_like(bias)], dim=1)[:, 0]
    oracle = x.double() @ w.double().t() + (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    return (x, values, meta, a, b, bias), oracle


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "plain"), (torch.bfloat16, "cutlass"), (torch.bfloat16, "plain")])
@pytest.mark.parametrize("m,n,k,r,strided", [(1, 64, 128, 8, False), (5, 96, 64, 4, True), (16, 64, 256, 24, True)])
def test_triton_merged_decode_matches_reference_and_oracle(dtype, layout, m, n, k, r, strided):
    from slope.kernels.triton_merged_decode import merged_decode

    if layout == "cutlass" and (n % 32 or k % 32):
        pytest.skip("the CUTLASS metadata layout needs rows and cols % 32")
    args, oracle = _decode_case(dtype, m, n, k, r, layout, strided)
    got, ref = merged_decode(*args), reference.merged_decode(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = oracle.abs().max().item()
    assert got.shape == (m, n) and got.dtype == dtype
    assert (got.double() - oracle).abs().max().item() <= tol * scale
    assert (got.double() - ref.double()).abs().max().item() <= tol * scale
    without_bias = merged_decode(*args[:5])
    assert (without_bias.double() + args[5].double() - got.double()).abs().max().item() <= tol * scale
    with pytest.raises(ValueError, match="at most 16 rows"):
        merged_decode(torch.zeros(17, k, dtype=dtype), *args[1:])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on CPU only under TRITON_INTERPRET=1")
def test_fused_decode_layers_take_one_launch_and_equal_unmerged(monkeypatch):
    import slope.kernels as kernels
    from slope.lora import set_decode_kernel

    model = _model("reference", 8, torch.float32)
    x_decode, x_prefill = torch.randn(3, 64), torch.randn(17, 64)
    with torch.no_grad():
        expected = [model(x_decode), model(x_prefill)]
    merge_lora(model, fold="extended")
    freeze_for_inference(model)
    assert model.fc1.decode_kernel == "gemm"
    set_decode_kernel(model, "fused")
    calls = []
    fused = kernels.merged_decode
    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)  # Triton on CPU tensors (interpreter)
    monkeypatch.setattr(kernels, "merged_decode", lambda *args: calls.append(args[0].shape) or fused(*args))
    with torch.no_grad():
        got = [model(x_decode), model(x_prefill)]
    assert calls == [(3, 64), (3, 96)]  # both layers, decode-sized input only
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="choose one of gemm, fused"):
        set_decode_kernel(model, "cublas")


def test_decode_operands_are_built_once_until_a_source_changes(monkeypatch):
    """The fused decode's operands (metadata of M, s·A⊙M_A, B) are cached per version of the mask
    and adapters: repeated decode steps build them once; an in-place change of A rebuilds them."""
    import slope.kernels as kernels

    model = _model("reference", 8, torch.float32)
    merge_lora(model)
    freeze_for_inference(model)
    layer, cpu = model.fc1, torch.device("cpu")
    built, compress = [], kernels.compress_2to4
    monkeypatch.setattr(kernels, "compress_2to4", lambda *args, **kw: built.append(1) or compress(*args, **kw))
    meta, a_scaled, b = layer._decode_operands(torch.float32, cpu)
    for _ in range(3):
        assert all(x is y for x, y in zip(layer._decode_operands(torch.float32, cpu), (meta, a_scaled, b)))
    assert len(built) == 1
    assert torch.equal(meta, compress(layer.mask.float(), layer.mask)[1])
    with torch.no_grad():
        layer.lora_A.mul_(2)
    torch.testing.assert_close(layer._decode_operands(torch.float32, cpu)[1], 2 * a_scaled, rtol=0, atol=0)


def test_a_meta_device_layer_gets_the_m_t_of_an_inference_only_state():
    """Built on the meta device and loaded with ``assign=True`` from a frozen layer's state (no M_t):
    M_t is computed from the loaded weights, not left on the meta device."""
    from slope.layer import SparseLinear

    torch.manual_seed(0)
    source = SparseLinear.from_dense(torch.randn(16, 32), compress=False)
    want = source.mask_t_bits.clone()
    frozen = torch.nn.Sequential(source)
    freeze_for_inference(frozen)
    with torch.device("meta"):
        target = torch.nn.Sequential(SparseLinear(32, 16, bias=False, compress=False))
    target.load_state_dict(frozen.state_dict(), assign=True)
    assert not target[0].mask_t_bits.is_meta and torch.equal(target[0].mask_t_bits, want)
