"""GPU checks: every Triton kernel and every sparse backend against the references / the
masked-dense oracle on fresh random inputs (fp16 and bf16), a SparseLinear training step per
backend against the simulated layer, and the ``auto`` fallback to dense.

Marked ``gpu`` and skipped without CUDA. Backends a GPU cannot run (e.g. PyTorch's sm8x-only
CUTLASS kernels on Hopper) are skipped with the backend's own reason.
"""
import os
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 is set: unset it to compile Triton kernels on the GPU"
    ),
]

from slope import kernels  # noqa: E402
from slope.backends import backend_class  # noqa: E402
from slope.kernels import reference as ref  # noqa: E402
from slope.masks import double_prune_mask, nm_mask, pack_mask  # noqa: E402

DEV = torch.device("cuda")
HALF = [torch.float16, torch.bfloat16]
BACKENDS = ["triton", "cusparselt", "cutlass", "dense", "reference", "cutlass-sm90"]
# Relative error bound (vs the fp32 oracle, scaled by the oracle's max magnitude).
REL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def assert_rel_close(out, expected, dtype, scale=1.0):
    out, expected = out.float(), expected.float()
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    bound = REL[dtype] * scale * max(expected.abs().max().item(), 1e-6)
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


def ties(shape, dtype):
    """Nonzero values from {±0.5, ±1, ±1.5}: equal magnitudes are frequent. (No zeros: PyTorch's
    CUTLASS converter infers the kept set from the nonzeros, so a kept zero would differ.)"""
    magnitude = torch.randint(1, 4, shape, device=DEV).to(dtype) * 0.5
    return torch.where(torch.rand(shape, device=DEV) < 0.5, -magnitude, magnitude)


def backend_or_skip(name, dtype):
    try:
        cls = backend_class(name)
    except RuntimeError as exc:  # module missing on this checkout / machine
        pytest.skip(str(exc))
    reason = cls.unavailable_reason(DEV, dtype)
    if reason is not None:
        pytest.skip(reason)
    return cls


# ------------------------------------------------------------------------------ Triton kernels
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("m,k,n", [(512, 1024, 768), (129, 257, 65)])
def test_triton_addmm(dtype, m, k, n):
    from slope.kernels import triton_kernels as tk

    a, b = torch.randn(m, k, device=DEV, dtype=dtype), torch.randn(k, n, device=DEV, dtype=dtype)
    c = torch.randn(m, n, device=DEV, dtype=dtype)
    expected = c.float() + 0.5 * (a.float() @ b.float())
    out = c.clone()
    assert tk.addmm(a, b, out, 0.5) is out
    assert_rel_close(out, expected, dtype)
    # The dispatcher sends CUDA tensors to Triton; strided operands give the same result.
    out2 = c.t().contiguous().t()
    kernels.addmm(a.t().contiguous().t(), b, out2, 0.5)
    assert_rel_close(out2, expected, dtype)
    # with the bias fused (the merged LoRA layer's epilogue), fp32 bias on a low-precision c
    bias = torch.randn(n, device=DEV)
    out3 = c.clone()
    kernels.addmm(a, b, out3, 0.5, bias)
    assert_rel_close(out3, expected + bias, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_triton_matvec_add_strided_bit_exact(dtype):
    from slope.kernels import triton_kernels as tk

    views = [
        torch.randn(300, 520, device=DEV, dtype=dtype)[:, ::2],
        torch.randn(260, 300, device=DEV, dtype=dtype).t(),
        torch.randn(4, 6, 260, device=DEV, dtype=dtype).transpose(0, 1),
    ]
    for view in views:
        vec = torch.randn(view.shape[-1], device=DEV, dtype=dtype)
        expected = view.clone().add_(vec)
        tk.matvec_add(view, vec)
        assert torch.equal(view, expected)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("make", ["randn", "ties"])
def test_triton_pruning_kernels_bit_exact(dtype, make):
    from slope.kernels import triton_kernels as tk

    shape = (256, 512)
    w = torch.randn(*shape, device=DEV, dtype=dtype) if make == "randn" else ties(shape, dtype)
    pruned, mask = tk.prune_2to4(w)
    ref_pruned, ref_mask = ref.prune_2to4(w)
    assert torch.equal(mask, ref_mask) and torch.equal(pruned, ref_pruned)
    assert torch.equal(tk.double_prune_mask_2to4(pruned, mask), double_prune_mask(pruned, mask, 2, 4))
    values, meta = tk.prune_compress_2to4(w)
    ref_values, ref_meta = ref.prune_compress_2to4(w)
    assert meta.dtype == ref_meta.dtype and torch.equal(meta, ref_meta) and torch.equal(values, ref_values)
    if dtype != torch.float32:
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        pt_values, pt_meta = sparse_semi_structured_from_dense_cutlass(ref_pruned)
        assert torch.equal(values, pt_values) and torch.equal(meta, pt_meta)
    # Dispatch goes through the same kernels.
    assert torch.equal(kernels.prune_compress_2to4(w)[1], ref_meta)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("shape", [(1024, 2048), (96, 200)])
def test_triton_kept_value_kernels_bit_exact(dtype, shape):
    """Weight-gradient gather and backward-operand values (compiled) against the references."""
    from slope.kernels import triton_kernels as tk

    w = torch.randn(*shape, device=DEV, dtype=dtype)
    mask = nm_mask(w, 2, 4)
    mask_t = double_prune_mask(w * mask, mask, 2, 4)
    full = torch.randn(shape[1], shape[0], device=DEV, dtype=dtype).t()
    assert torch.equal(tk.gather_kept_2to4(full, mask), ref.gather_kept_2to4(full, mask))
    acc = torch.randn(shape[0], shape[1] // 2, device=DEV)
    assert torch.equal(tk.gather_kept_2to4(full, mask, acc.clone()), ref.gather_kept_2to4(full, mask, acc.clone()))
    values = ref.gather_kept_2to4(w.float(), mask)  # fp32 master values, cast by the kernel
    for out_dtype in (dtype, torch.float32):
        expected = ref.transpose_kept_2to4(values, mask, mask_t, out_dtype)
        assert torch.equal(tk.transpose_kept_2to4(values, mask, mask_t, out_dtype), expected)
        assert torch.equal(kernels.transpose_kept_2to4(values, mask, mask_t, out_dtype), expected)
        assert torch.equal(tk.scatter_kept_2to4(values, mask, out_dtype), ref.scatter_kept_2to4(values, mask, out_dtype))
        dense = ref.transpose_kept_2to4(values, mask, mask_t, out_dtype, dense=True)
        assert torch.equal(tk.transpose_kept_2to4(values, mask, mask_t, out_dtype, dense=True), dense)
        # the masks as SLoPe layers store them (packed bits)
        bits, bits_t = pack_mask(mask), pack_mask(mask_t)
        assert torch.equal(tk.transpose_kept_2to4(values, bits, bits_t, out_dtype), expected)
        assert torch.equal(tk.transpose_kept_2to4(values, bits, bits_t, out_dtype, dense=True), dense)
        assert torch.equal(tk.scatter_kept_2to4(values, bits, out_dtype), ref.scatter_kept_2to4(values, mask, out_dtype))
    bits = pack_mask(mask)
    assert torch.equal(tk.gather_kept_2to4(full, bits, acc.clone()), ref.gather_kept_2to4(full, mask, acc.clone()))
    assert torch.equal(tk.double_prune_mask_2to4(w * mask, bits), mask_t)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_triton_adamw_step_matches_reference(dtype):
    """The one-pass AdamW step (compiled) against the reference: moments to fp32 rounding, the
    parameter within one ulp of its dtype (the two round the same fp32 value computed in another order)."""
    from slope.kernels import triton_kernels as tk

    n = 1 << 20
    param = torch.randn(n, device=DEV).to(dtype)
    m, v = torch.randn(n, device=DEV) * 0.1, torch.rand(n, device=DEV) * 0.01
    grad = torch.randn(n, device=DEV).to(dtype)
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=5)
    expected = [param.clone(), m.clone(), v.clone()]
    ref.adamw_step_(expected[0], grad, expected[1], expected[2], **kw)
    got = [param.clone(), m.clone(), v.clone()]
    tk.adamw_step_(got[0], grad, got[1], got[2], **kw)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-8)
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[dtype]
    ulp = 2.0 ** (torch.frexp(expected[0].float())[1].float() - bits)
    assert bool(((got[0].float() - expected[0].float()).abs() <= ulp * 1.01 + 1e-12).all())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1024, 2048), (96, 200)])
def test_triton_sparse_gemm(dtype, shape):
    from slope.kernels.triton_sparse import sparse_linear

    values, meta = ref.prune_compress_2to4(torch.randn(*shape, device=DEV, dtype=dtype))
    x = torch.randn(777, shape[1], device=DEV, dtype=dtype)
    out = sparse_linear(x, values, meta)
    assert_rel_close(out, F.linear(x.float(), ref.decompress_2to4(values, meta).float()), dtype)


# ----------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1024, 4096), (96, 200), (20, 36)])
def test_backend_matmul_vs_masked_dense(name, dtype, shape):
    cls = backend_or_skip(name, dtype)
    backend = cls()
    w = torch.randn(*shape, device=DEV, dtype=dtype)
    mask = nm_mask(w, 2, 4)
    dense = w * mask
    x = torch.randn(3, 37, shape[1], device=DEV, dtype=dtype)
    y = backend.matmul(x, backend.make_operand(dense, mask))
    assert y.dtype == dtype
    assert_rel_close(y, F.linear(x.float(), dense.float()), dtype)
    # The backward operand of a layer: (W⊙M⊙M_t)ᵀ, 2:4 along out.
    mask_t = double_prune_mask(dense, mask, 2, 4)
    bwd = (dense * mask_t).t().contiguous()
    dy = torch.randn(2, 50, shape[0], device=DEV, dtype=dtype)
    dx = backend.matmul(dy, backend.make_operand(bwd, mask_t.t().contiguous()))
    assert_rel_close(dx, dy.float() @ (dense * mask_t).float(), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_cusparselt_in_worker_thread(dtype):
    """cuSPARSELt handles must not cross threads (pytorch#113776): build here, multiply there."""
    cls = backend_or_skip("cusparselt", dtype)
    backend = cls()
    dense, mask = kernels.prune_2to4(torch.randn(256, 512, device=DEV, dtype=dtype))
    operand = backend.make_operand(dense, mask)
    x = torch.randn(64, 512, device=DEV, dtype=dtype)
    result = {}

    def work():
        try:
            result["y"] = backend.matmul(x, operand)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in result, result.get("error")
    assert_rel_close(result["y"], F.linear(x.float(), dense.float()), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_cutlass_operand_is_pytorchs_own_layout(dtype):
    """Our compress_2to4 output is what PyTorch's converter produces (checked on any GPU), and on
    sm8x the cutlass backend's tensor equals SparseSemiStructuredTensorCUTLASS.from_dense."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    dense, mask = kernels.prune_2to4(torch.randn(128, 256, device=DEV, dtype=dtype))
    values, meta = kernels.compress_2to4(dense, mask)
    pt_values, pt_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(values, pt_values) and torch.equal(meta, pt_meta)
    cls = backend_or_skip("cutlass", dtype)
    operand = cls().make_operand(dense, mask)
    theirs = torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(dense)
    assert torch.equal(operand.sparse.packed, theirs.packed) and torch.equal(operand.sparse.meta, theirs.meta)


def test_cutlass_backend_refuses_non_sm8x_clearly():
    cls = backend_class("cutlass")
    if torch.cuda.get_device_capability()[0] == 8:
        pytest.skip("sm8x GPU: PyTorch's CUTLASS kernels are available here")
    reason = cls.unavailable_reason(DEV, torch.bfloat16)
    assert reason is not None and "sm8x" in reason


# ------------------------------------------------------------------- SparseLinear training step
def _step_pair(backend, dtype):
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    w = torch.randn(256, 512, device=DEV, dtype=dtype) * 0.05
    b = torch.randn(256, device=DEV, dtype=dtype)
    fast = SparseLinear.from_dense(w, b, compress=True, backend=backend)
    sim = SparseLinear.from_dense(w, b, compress=False)
    opts = [ADAMWSparse(nn.Sequential(layer), lr=1e-3, weight_decay=0.0) for layer in (fast, sim)]
    return fast, sim, opts


@pytest.mark.parametrize("name", BACKENDS + ["auto"])
@pytest.mark.parametrize("dtype", HALF)
def test_sparse_linear_training_step_matches_simulated(name, dtype):
    if name != "auto":
        backend_or_skip(name, dtype)
    fast, sim, opts = _step_pair(name, dtype)
    for _ in range(2):  # the second step runs on operands rebuilt after the optimizer step
        x = torch.randn(4, 64, 512, device=DEV, dtype=dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [layer(xi) for layer, xi in zip((fast, sim), xs)]
        dy = torch.randn_like(ys[1])
        for y in ys:
            y.backward(dy)  # backward runs on autograd's device thread
        assert_rel_close(ys[0], ys[1], dtype)
        assert_rel_close(xs[0].grad, xs[1].grad, dtype)
        assert_rel_close(fast.values_grad, sim.values_grad, dtype, scale=2.0)
        assert_rel_close(fast.bias.grad, sim.bias.grad, dtype, scale=2.0)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for layer in (fast, sim):
            layer.bias.grad = None
        torch.testing.assert_close(fast.values.float(), sim.values.float(), rtol=0, atol=3e-3)
        assert torch.equal(fast.mask, sim.mask)


# --------------------------------------------------------------------------------- auto choice
def test_auto_falls_back_to_dense_when_sparse_is_slower():
    from slope.backends.auto import AutoBackendChooser
    from slope.backends.dense import DenseBackend

    # The reference backend decompresses on every product: always slower than a dense GEMM.
    chooser = AutoBackendChooser(tokens=2048, candidates=("reference",))
    choice = chooser.choose((2048, 2048), torch.bfloat16, DEV)
    assert isinstance(choice, DenseBackend), chooser.report()


@pytest.mark.parametrize("shape", [(4096, 4096), (768, 768), (11008, 4096), (4096, 512)])
def test_auto_choice_is_never_slower_than_dense(shape):
    from slope.backends.auto import AutoBackendChooser, cuda_event_timer
    from slope.backends.dense import DenseBackend

    chooser = AutoBackendChooser(tokens=4096)
    dtype = torch.bfloat16
    choice = chooser.choose(shape, dtype, DEV, tiling=True)
    (entry,) = chooser.report().values()
    print(f"auto {shape}: {type(choice).__name__} {entry.times_ms} errors={entry.errors}")
    assert entry.times_ms[choice.name] <= entry.times_ms["dense"]
    # Re-time the winner against dense independently: not slower beyond timing noise.
    w = torch.randn(*shape, device=DEV, dtype=dtype)
    dense_w, mask = kernels.prune_2to4(w)
    x = torch.randn(4096, shape[1], device=DEV, dtype=dtype)
    times = {}
    for backend in (choice, DenseBackend()):
        op = backend.make_operand(dense_w, mask)
        times[backend.name] = cuda_event_timer(lambda: backend.matmul(x, op), DEV, warmup=5, reps=20)
        assert_rel_close(backend.matmul(x, op), F.linear(x.float(), dense_w.float()), dtype)
    assert times[choice.name] <= 1.15 * times["dense"], times


def test_auto_layer_uses_the_chooser_per_direction_and_matches_simulated():
    from slope.backends.auto import AUTO_CHOOSER
    from slope.layer import SparseLinear

    w = torch.randn(1024, 256, device=DEV, dtype=torch.bfloat16)
    layer = SparseLinear.from_dense(w, None, compress=True, backend="auto")
    sim = SparseLinear.from_dense(w, None, compress=False)
    x = torch.randn(8, 256, device=DEV, dtype=torch.bfloat16)
    x_fast, x_sim = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_sim = layer(x_fast), sim(x_sim)
    assert_rel_close(y_fast, y_sim, torch.bfloat16)
    dy = torch.randn_like(y_sim)
    y_fast.backward(dy)
    y_sim.backward(dy)
    assert_rel_close(x_fast.grad, x_sim.grad, torch.bfloat16)
    # forward operand (out, in) and input-gradient operand (in, out) are chosen separately, at
    # the call's token bucket (8 tokens: timed at 16), counting their rebuild (training calls)
    assert layer._backend_for(torch.bfloat16, x.device, "forward", 8, True) is AUTO_CHOOSER.choose(
        (1024, 256), torch.bfloat16, x.device, True, 8, direction="forward", training=True
    )
    assert layer._backend_for(torch.bfloat16, x.device, "backward", 8, True) is AUTO_CHOOSER.choose(
        (256, 1024), torch.bfloat16, x.device, True, 16, direction="backward", training=True
    )
    assert ("forward", torch.bfloat16, x.device, 16, True) in layer._backends
