"""Triton kernels (and the ``triton`` backend) under ``TRITON_INTERPRET=1`` on CPU vs the references.

Needs ``TRITON_INTERPRET=1`` in the environment *before* triton is imported (CI exports it for
the whole run); without it every test here is skipped with that reason.

Interpreter caveats the tolerances account for: fp32→bf16 conversion in the interpreter truncates
instead of rounding to nearest, so kernels that *compute* a bf16 result (addmm, matvec_add, the
sparse GEMM) are compared within one bf16 ulp; the pruning / compression kernels only move bits and
are compared exactly.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton runs on CPU only in its interpreter: run with TRITON_INTERPRET=1 (set before triton is imported)",
)

from slope.kernels import reference as ref  # noqa: E402

tk = pytest.importorskip("slope.kernels.triton_kernels")
ts = pytest.importorskip("slope.kernels.triton_sparse")
tf = pytest.importorskip("slope.kernels.triton_fused_step")

BF16_TOL = dict(rtol=1.6e-2, atol=1e-2)


def ties(shape, dtype):
    """Random values from a tiny set (±0..3) so that equal magnitudes are frequent."""
    return (torch.randint(-3, 4, shape).to(dtype)) * 0.5


# ------------------------------------------------------------------------------------ addmm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(40, 70, 50), (1, 33, 7), (64, 32, 96)])
def test_addmm_matches_reference(dtype, m, k, n):
    a, b, c = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    alpha = float(torch.rand(()) * 2 - 1)
    expected = ref.addmm(a.float(), b.float(), c.float().clone(), alpha)
    out = c.clone()
    assert tk.addmm(a, b, out, alpha) is out
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), expected, **BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addmm_with_bias_matches_reference(dtype):
    a, b = torch.randn(37, 24, dtype=dtype), torch.randn(24, 70, dtype=dtype)
    c = torch.randn(37, 140, dtype=dtype)[:, ::2]  # strided output, as the merged layer's view
    bias = torch.randn(140, dtype=torch.float32)[::2]  # strided, another dtype than c
    expected = ref.addmm(a.float(), b.float(), c.float().clone(), 0.3, bias)
    assert torch.allclose(expected, c.float() + 0.3 * (a.float() @ b.float()) + bias, rtol=1e-5, atol=1e-5)
    out = c.clone()
    assert tk.addmm(a, b, out, 0.3, bias) is out
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), expected, **tol)
    with pytest.raises(ValueError, match=r"bias must be \(70,\)"):
        tk.addmm(a, b, out, 0.3, bias[:69])


def test_addmm_strided_operands():
    a = torch.randn(48, 80).t()  # (80, 48), column-major
    b = torch.randn(96, 48)[::2].t()  # (48, 48), strided
    base = torch.randn(80, 100)
    c = base[:, ::2]  # (80, 50) non-contiguous output written in place
    c = c[:, :48]
    expected = ref.addmm(a, b, c.clone(), 0.7)
    tk.addmm(a, b, c, 0.7)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)
    # The in-place write hit the view's storage, and only it.
    torch.testing.assert_close(base[:, ::2][:, :48], expected, rtol=1e-5, atol=1e-5)


def test_addmm_errors():
    with pytest.raises(ValueError, match="a \\(M, K\\)"):
        tk.addmm(torch.randn(4, 5), torch.randn(6, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="one dtype"):
        tk.addmm(torch.randn(4, 5), torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(4, 3))


# ------------------------------------------------------------------------------- matvec_add
def _strided_views(dtype):
    yield torch.randn(37, 53, dtype=dtype)
    yield torch.randn(53, 37, dtype=dtype).t()
    yield torch.randn(3, 5, 64, dtype=dtype)[:, ::2, ::2]
    yield torch.randn(2, 3, 4, 40, dtype=dtype).transpose(0, 2)[..., 5:37]
    yield torch.randn(2, 2, 3, 2, 32, dtype=dtype)  # 5-D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_add_on_strided_views(dtype):
    for view in _strided_views(dtype):
        base = view._base if view._base is not None else view
        snapshot = base.clone()
        vector = torch.randn(view.shape[-1], dtype=dtype)
        expected = ref.matvec_add(view.clone(), vector)
        assert tk.matvec_add(view, vector) is view
        if dtype == torch.float32:
            assert torch.equal(view, expected)
        else:
            torch.testing.assert_close(view.float(), expected.float(), **BF16_TOL)
        # Nothing outside the view changed.
        untouched = torch.ones_like(base, dtype=torch.bool)
        view_mask = torch.zeros_like(base, dtype=torch.bool)
        view_mask.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset()).fill_(True)
        untouched &= ~view_mask
        assert torch.equal(base[untouched], snapshot[untouched])


def test_matvec_add_errors():
    with pytest.raises(ValueError, match="vector \\(N,\\)"):
        tk.matvec_add(torch.randn(4, 5), torch.randn(4))
    with pytest.raises(ValueError, match="broadcast view"):
        tk.matvec_add(torch.randn(5).expand(4, 5), torch.randn(5))


# ------------------------------------------------------------------------------ 2:4 pruning
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [torch.randn, ties], ids=["random", "ties"])
def test_prune_2to4_bit_identical(dtype, make):
    for shape in [(64, 96), (3, 7, 12), (1, 4)]:
        dense = make(shape, dtype=dtype) if make is ties else make(*shape, dtype=dtype)
        pruned, mask = tk.prune_2to4(dense)
        ref_pruned, ref_mask = ref.prune_2to4(dense)
        assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
        assert torch.equal(pruned, ref_pruned)
    noncontig = torch.randn(24, 40, dtype=dtype).t()  # (40, 24)
    assert torch.equal(tk.prune_2to4(noncontig)[1], ref.prune_2to4(noncontig)[1])


def _bits(t):
    """``t``'s bits as integers: torch.equal on them counts equal NaNs as equal."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pruning_kernels_rank_nan_and_inf_as_the_references(dtype):
    """NaN ranks above +inf (torch.sort's order), so a group holding NaN still keeps exactly two;
    a comparison-based selection kept NaN plus two others (3 of 4: not 2:4)."""
    from slope.masks import double_prune_mask

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=gen)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    picks = torch.rand(64, 96, generator=gen) < 0.2
    w[picks] = special[torch.randint(0, 3, (int(picks.sum()),), generator=gen)]
    w = w.to(dtype)
    pruned, mask = tk.prune_2to4(w)
    ref_pruned, ref_mask = ref.prune_2to4(w)
    assert torch.equal(mask, ref_mask) and torch.equal(_bits(pruned), _bits(ref_pruned))
    assert bool((mask.view(64, 24, 4).sum(-1) == 2).all())
    values, meta = tk.prune_compress_2to4(w)
    ref_values, ref_meta = ref.prune_compress_2to4(w)
    assert torch.equal(meta, ref_meta) and torch.equal(_bits(values), _bits(ref_values))
    rand_mask = torch.rand(64, 96, generator=gen) < 0.6
    assert torch.equal(tk.double_prune_mask_2to4(w, rand_mask), double_prune_mask(w, rand_mask, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [torch.randn, ties], ids=["random", "ties"])
@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_double_prune_mask_matches_masks_module(dtype, make, packed):
    from slope.masks import double_prune_mask, nm_mask

    for shape in [(64, 96), (20, 12)]:
        w = make(shape, dtype=dtype) if make is ties else make(*shape, dtype=dtype)
        mask = nm_mask(w, 2, 4)
        expected = double_prune_mask(w * mask, mask, 2, 4)
        got = tk.double_prune_mask_2to4(w * mask, _maybe_packed(mask, packed))
        assert got.dtype == torch.bool and torch.equal(got, expected)
        # Also with an arbitrary (not magnitude-derived) mask.
        rand_mask = torch.rand(shape) < 0.5
        got = tk.double_prune_mask_2to4(w, _maybe_packed(rand_mask, packed))
        assert torch.equal(got, double_prune_mask(w, rand_mask, 2, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 96), (32, 32), (12, 20), (40, 48)])
def test_prune_compress_bit_identical(dtype, shape):
    dense = torch.randn(*shape, dtype=dtype)
    values, meta = tk.prune_compress_2to4(dense)
    ref_values, ref_meta = ref.prune_compress_2to4(dense)
    assert meta.dtype == ref_meta.dtype and torch.equal(meta, ref_meta)
    assert torch.equal(values, ref_values)
    if ref.cutlass_layout_supported(*shape, dtype):
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        pt_values, pt_meta = sparse_semi_structured_from_dense_cutlass(ref.prune_2to4(dense)[0])
        assert torch.equal(values, pt_values) and torch.equal(meta, pt_meta)
    plain_values, plain_meta = tk.prune_compress_2to4(dense, layout="plain")
    assert torch.equal(plain_meta, ref.prune_compress_2to4(dense, layout="plain")[1])
    assert torch.equal(plain_values, values)


def test_prune_compress_errors():
    with pytest.raises(ValueError, match="CUTLASS layout"):
        tk.prune_compress_2to4(torch.randn(12, 20, dtype=torch.bfloat16), layout="cutlass")
    with pytest.raises(ValueError, match="cols % 4"):
        tk.prune_compress_2to4(torch.randn(8, 6))
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        tk.prune_compress_2to4(torch.randint(0, 3, (8, 8), dtype=torch.int8))


# ------------------------------------------------------------- kept-value movement (2:4)
def _maybe_packed(mask, packed):
    """``mask`` as the kernels' packed-bits argument (how SLoPe layers store masks) or as is."""
    from slope.masks import pack_mask

    return pack_mask(mask) if packed else mask


def _layer_masks(rows, cols, dtype, seed):
    from slope.masks import double_prune_mask, nm_mask

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    mask = nm_mask(w, 2, 4)
    return w, mask, double_prune_mask(w * mask, mask, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (36, 20), (4, 4)])
@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_gather_kept_bit_identical(dtype, shape, packed):
    w, mask, _ = _layer_masks(*shape, dtype, seed=shape[0])
    full = torch.randn(shape[1], shape[0]).to(dtype).t()  # strided, as dyᵀ x may be
    arg = _maybe_packed(mask, packed)
    assert torch.equal(tk.gather_kept_2to4(full, arg), ref.gather_kept_2to4(full, mask))
    acc = torch.randn(shape[0], shape[1] // 2)  # fp32 accumulator of a bf16 gradient
    expected = ref.gather_kept_2to4(full, mask, acc.clone())
    out = acc.clone()
    assert tk.gather_kept_2to4(full, arg, out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (36, 20), (4, 4), (100, 8)])
@pytest.mark.parametrize("packed", [(False, False), (True, True), (True, False)], ids=["bool", "packed", "mixed"])
def test_transpose_kept_bit_identical(dtype, shape, packed):
    w, mask, mask_t = _layer_masks(*shape, dtype, seed=shape[1])
    values = ref.gather_kept_2to4(w, mask)
    expected = ref.transpose_kept_2to4(values, mask, mask_t)
    assert bool((mask_t.t().reshape(shape[1], -1, 4).sum(-1) < 2).any())  # filler slots are exercised
    args = (_maybe_packed(mask, packed[0]), _maybe_packed(mask_t, packed[1]))
    assert torch.equal(tk.transpose_kept_2to4(values, *args), expected)
    # fp32 -> fp32 output dtype conversion (fp32 -> bf16 is a truncation in the interpreter)
    assert torch.equal(tk.transpose_kept_2to4(values.float(), *args, torch.float32), expected.float())
    dense = tk.transpose_kept_2to4(values, *args, dense=True)
    assert dense.shape == (shape[1], shape[0]) and torch.equal(dense, ref.transpose_kept_2to4(values, mask, mask_t, dense=True))


@pytest.mark.parametrize("shape", [(64, 96), (36, 20), (4, 4)])
@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_scatter_kept_bit_identical(shape, packed):
    w, mask, _ = _layer_masks(*shape, torch.float32, seed=shape[0] + 1)
    values = ref.gather_kept_2to4(w, mask)
    arg = _maybe_packed(mask, packed)
    for dtype in (None, torch.float32):
        assert torch.equal(tk.scatter_kept_2to4(values, arg, dtype), ref.scatter_kept_2to4(values, mask, dtype))
    bf16 = values.bfloat16()
    assert torch.equal(tk.scatter_kept_2to4(bf16, arg), ref.scatter_kept_2to4(bf16, mask))


def test_kept_kernels_errors():
    w, mask, mask_t = _layer_masks(8, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cols % 4"):
        tk.gather_kept_2to4(torch.randn(8, 6), torch.ones(8, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        tk.gather_kept_2to4(w, mask[:4])
    with pytest.raises(ValueError, match=r"or its packed bits, uint8 \(16,\)"):
        tk.gather_kept_2to4(w, _maybe_packed(mask, True)[:8])
    with pytest.raises(ValueError, match="contiguous tensor of shape"):
        tk.gather_kept_2to4(w, mask, torch.zeros(8, 16))
    values = ref.gather_kept_2to4(w, mask)
    with pytest.raises(ValueError, match="mask_t must be a bool tensor"):
        tk.transpose_kept_2to4(values, mask, mask_t.float())
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        tk.transpose_kept_2to4(values, mask, mask_t, torch.float64)


@pytest.mark.parametrize("compress", [True, False], ids=["from-values", "dense-operands"])
def test_layer_takes_the_fused_kept_paths(monkeypatch, compress):
    """With the Triton paths enabled (as on CUDA), a 2:4 layer's masks, weight gradient and
    backward operand (kept values for the reference backend — built once, then written by the
    fused optimizer step —, the dense transposed weight for the masked-dense one) come from the
    Triton kernels and match the simulated layer."""
    from slope import kernels
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    calls = {"gather": 0, "transpose": 0, "prune": 0, "double_prune": 0}
    real_gather, real_transpose = tk.gather_kept_2to4, tk.transpose_kept_2to4
    real_prune, real_double_prune = tk.prune_2to4, tk.double_prune_mask_2to4

    def prune(*args):
        calls["prune"] += 1
        return real_prune(*args)

    def double_prune(*args):
        calls["double_prune"] += 1
        return real_double_prune(*args)

    def gather(*args, **kwargs):
        calls["gather"] += 1
        return real_gather(*args, **kwargs)

    def transpose(*args):
        calls["transpose"] += 1
        assert args[-1] is not compress  # dense=True exactly for the dense operands
        return real_transpose(*args)

    monkeypatch.setattr(tk, "gather_kept_2to4", gather)
    monkeypatch.setattr(tk, "transpose_kept_2to4", transpose)
    monkeypatch.setattr(tk, "prune_2to4", prune)
    monkeypatch.setattr(tk, "double_prune_mask_2to4", double_prune)
    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    fast = SparseLinear.from_dense(w, compress=compress, backend="reference" if compress else "auto")
    assert calls["prune"] == 1 and calls["double_prune"] == 1
    monkeypatch.undo()  # the oracle runs on the reference paths
    sim = SparseLinear.from_dense(w, compress=False)
    assert torch.equal(fast.mask, sim.mask) and torch.equal(fast.mask_t, sim.mask_t)
    calls.update(prune=0, double_prune=0)
    monkeypatch.setattr(tk, "gather_kept_2to4", gather)
    monkeypatch.setattr(tk, "transpose_kept_2to4", transpose)
    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)
    opts = [ADAMWSparse(fast, lr=1e-2), ADAMWSparse(sim, lr=1e-2)]
    for step in range(2):  # the second step runs on operands rebuilt after the optimizer step
        x = torch.randn(5, 64)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        fast(xs[0]).square().sum().backward()
        with monkeypatch.context() as m:
            m.setattr(kernels, "triton_usable", lambda *tensors: False)
            sim(xs[1]).square().sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.values_grad, sim.values_grad, rtol=1e-5, atol=1e-5)
        # from kept values, the fused optimizer step writes the backward operand after step 1
        transposes = 1 if compress else step + 1
        assert calls == {"gather": step + 1, "transpose": transposes, "prune": 0, "double_prune": 0}
        for opt in opts:
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(fast.values, sim.values, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- AdamW step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(3000, generator=gen).to(dtype)  # more than one block, a partial last one
    m, v = torch.randn(3000, generator=gen) * 0.1, torch.rand(3000, generator=gen) * 0.01
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)
    tensors = [param.clone(), m.clone(), v.clone()]
    grad = torch.randn(3000, generator=gen).to(dtype)
    ref.adamw_step_(tensors[0], grad, tensors[1], tensors[2], **kw)
    out = [param.clone(), m.clone(), v.clone()]
    assert tk.adamw_step_(out[0], grad, out[1], out[2], **kw) is out[0]
    # PyTorch's CPU lerp/addcmul may fuse multiply-adds: ulp-level differences of the operands
    torch.testing.assert_close(out[1], tensors[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[2], tensors[2], rtol=1e-6, atol=1e-8)
    # fp32 -> bf16 truncates in the interpreter (rounds on a GPU): within one bf16 ulp there
    ulp = 2.0 ** (torch.frexp(tensors[0].float())[1].float() - 8) if dtype == torch.bfloat16 else 1e-6
    assert bool(((out[0].float() - tensors[0].float()).abs() <= ulp * 1.01 + 1e-7).all())
    with pytest.raises(ValueError, match="contiguous"):
        tk.adamw_step_(torch.zeros(8, 2).t(), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 8), **kw)


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.9])
def test_adamw_first_moment_is_torch_lerp_for_every_beta1(beta1):
    """exp_avg against torch.lerp (its two formulas: weight below 0.5 or not) with moments far larger
    than the gradient: at beta1 = 0 the moment is the gradient exactly, which m + 1·(g - m) loses."""
    gen = torch.Generator().manual_seed(2)
    m, g = torch.randn(3000, generator=gen) * 10, torch.randn(3000, generator=gen) * 1e-3
    kw = dict(lr=1e-3, beta1=beta1, beta2=0.95, eps=1e-8, weight_decay=0.0, step=3)
    got = m.clone()
    tk.adamw_step_(torch.randn(3000, generator=gen), g, got, torch.rand(3000, generator=gen), **kw)
    torch.testing.assert_close(got, torch.lerp(m, g, 1 - beta1), rtol=1e-6, atol=0)
    values, mask = torch.randn(8, 4, generator=gen), torch.tensor([True, False, True, False]).repeat(8, 2)
    fused = m[:32].view(8, 4).clone()
    tf.adamw_step_operands_(values, g[:32].view(8, 4), fused, torch.rand(8, 4, generator=gen),
                            mask, torch.zeros_like(mask), **kw)
    torch.testing.assert_close(fused, torch.lerp(m[:32], g[:32], 1 - beta1).view(8, 4), rtol=1e-6, atol=0)


def test_sparse_optimizer_takes_the_triton_step_for_bf16_values(monkeypatch):
    """bf16 values step through the Triton kernel where it is usable (as on CUDA): same update as
    the reference loop within a bf16 ulp."""
    import copy

    import torch.nn as nn

    from slope import kernels, prune_model, sparse_modules
    from slope.optimizers import ADAMWSparse

    calls = []
    real = tk.adamw_step_
    monkeypatch.setattr(tk, "adamw_step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).to(torch.bfloat16)
    models = [prune_model(copy.deepcopy(base), verbose=False, compress=False) for _ in range(2)]
    opts = [ADAMWSparse(model, lr=1e-2, weight_decay=0.1) for model in models]
    base_values = {id(layer): layer.values.clone() for _, layer in sparse_modules(models[0])}
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    for use_triton, model, opt in zip((True, False), models, opts):
        with monkeypatch.context() as m:
            m.setattr(kernels, "triton_usable", lambda *tensors: use_triton)
            model(x).float().square().mean().backward()
            opt.step()
    assert len(calls) == 2  # one kernel launch per layer
    for (_, a), (_, b) in zip(sparse_modules(models[0]), sparse_modules(models[1])):
        # the interpreter truncates fp32 -> bf16 where PyTorch rounds: at most one bf16 ulp apart
        ulp = 2.0 ** (torch.frexp(b.values.float())[1].float() - 8)
        assert bool(((a.values.float() - b.values.float()).abs() <= ulp * 1.01).all())
        assert not torch.equal(a.values, base_values[id(a)])  # the step did update the values


# ------------------------------------------------------------------------- sparse GEMM
@pytest.mark.parametrize(
    "dtype,shape,layout",
    [(torch.float32, (48, 36), "plain"), (torch.bfloat16, (64, 96), "cutlass"),
     (torch.bfloat16, (20, 40), "plain"), (torch.float32, (96, 64), "plain")],
)
def test_sparse_linear_matches_decompressed_matmul(dtype, shape, layout):
    values, meta = ref.prune_compress_2to4(torch.randn(*shape, dtype=dtype), layout=layout)
    x = torch.randn(33, shape[1], dtype=dtype)
    out = ts.sparse_linear(x, values, meta)
    expected = F.linear(x.float(), ref.decompress_2to4(values, meta).float())
    assert out.dtype == dtype and out.shape == (33, shape[0])
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), expected, **tol)


def test_sparse_linear_errors():
    values, meta = ref.prune_compress_2to4(torch.randn(32, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="values \\(N, K/2\\)"):
        ts.sparse_linear(torch.randn(4, 30, dtype=torch.bfloat16), values, meta)
    with pytest.raises(ValueError, match="metadata"):
        ts.sparse_linear(torch.randn(4, 32, dtype=torch.bfloat16), values, meta[:, :1])


# ---------------------------------------------------------------------- triton backend / layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_training_step_matches_simulated(dtype):
    from slope.layer import SparseLinear

    w, b = torch.randn(64, 96, dtype=dtype), torch.randn(64, dtype=dtype)
    fast = SparseLinear.from_dense(w, b, compress=True, backend="triton")
    sim = SparseLinear.from_dense(w, b, compress=False)
    x = torch.randn(2, 5, 96, dtype=dtype)
    x_fast, x_sim = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_sim = fast(x_fast), sim(x_sim)
    assert type(fast._backend_for(dtype, x.device)).__name__ == "TritonBackend"
    dy = torch.randn_like(y_sim)
    y_fast.backward(dy)
    y_sim.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y_fast.float(), y_sim.float(), **tol)
    torch.testing.assert_close(x_fast.grad.float(), x_sim.grad.float(), **tol)
    torch.testing.assert_close(fast.values_grad.float(), sim.values_grad.float(), **tol)
    torch.testing.assert_close(fast.bias.grad.float(), sim.bias.grad.float(), **tol)


def test_dispatch_keeps_cpu_tensors_on_the_reference():
    from slope import kernels

    assert not kernels.triton_usable(torch.zeros(4))
    dense = ties((16, 16), torch.float32)
    assert torch.equal(kernels.prune_2to4(dense)[1], ref.prune_2to4(dense)[1])
    assert kernels.reference.prune_compress_2to4 is ref.prune_compress_2to4

