"""The fused optimizer step (AdamW + both operands' values in one pass) and the weight gradient
written compressed, under ``TRITON_INTERPRET=1`` on CPU against the references.

The kernel is checked on fresh random inputs against (a) the unfused Triton chain it replaces —
``adamw_step_`` then a cast then ``transpose_kept_2to4`` — bit for bit, and (b) the PyTorch
reference (moments and values to fp32 rounding, fp16 operands bit for bit; bf16 operands within one
ulp: the interpreter truncates fp32 → bf16 where a GPU rounds). The layer tests take the Triton
paths by patching ``slope.kernels.triton_usable`` (as on CUDA) and compare with a twin layer on the
unfused path.
"""
import os

import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton runs on CPU only in its interpreter: run with TRITON_INTERPRET=1 (set before triton is imported)",
)

from slope import kernels  # noqa: E402
from slope.kernels import reference as ref  # noqa: E402
from slope.masks import double_prune_mask, nm_mask, pack_mask  # noqa: E402

tk = pytest.importorskip("slope.kernels.triton_kernels")
tf = pytest.importorskip("slope.kernels.triton_fused_step")

KW = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)


def _state(rows, cols, seed, master=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    mask = nm_mask(w, 2, 4)
    mask_t = double_prune_mask(w * mask, mask, 2, 4)
    values = ref.gather_kept_2to4(w, mask).to(master)
    grad = torch.randn(values.shape, generator=gen)
    m = torch.randn(values.shape, generator=gen) * 0.1
    v = torch.rand(values.shape, generator=gen) * 0.01
    return values, grad, m, v, mask, mask_t


def _within_one_ulp(got, expected, bits):
    ulp = 2.0 ** (torch.frexp(expected.float())[1].float() - bits)
    return bool(((got.float() - expected.float()).abs() <= ulp * 1.01 + 1e-12).all())


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# rows/cols not multiples of the program tile (64 x 128), a single group, more than one program
# along each axis, a tall one; masks packed (as layers store them) or bool
CASES = [((64, 96), F16, True), ((64, 96), BF16, False), ((36, 20), F32, True), ((36, 20), F16, False),
         ((4, 4), BF16, True), ((132, 264), F16, True), ((200, 8), BF16, True)]


@pytest.mark.parametrize("shape,op_dtype,packed", CASES)
def test_fused_step_equals_the_unfused_chain_bit_for_bit(shape, op_dtype, packed):
    rows, cols = shape
    values, grad, m, v, mask, mask_t = _state(rows, cols, seed=rows * 1000 + cols)
    args = (pack_mask(mask), pack_mask(mask_t)) if packed else (mask, mask_t)
    assert bool((mask_t.t().reshape(cols, -1, 4).sum(-1) < 2).any())  # filler slots are exercised
    # unfused: AdamW, then the cast and the transpose of the new values
    chain = [values.clone(), m.clone(), v.clone()]
    tk.adamw_step_(chain[0], grad, chain[1], chain[2], **KW)
    fwd_expected = chain[0].to(op_dtype)
    bwd_expected = tk.transpose_kept_2to4(chain[0], *args, op_dtype)
    # fused, outputs poisoned first so an unwritten element cannot pass
    fused = [values.clone(), m.clone(), v.clone()]
    fwd = torch.full((rows, cols // 2), float("nan"), dtype=op_dtype)
    bwd = torch.full((cols, rows // 2), float("nan"), dtype=op_dtype)
    assert tf.adamw_step_operands_(fused[0], grad, fused[1], fused[2], *args, fwd=fwd, bwd=bwd, **KW) is fused[0]
    for a, b in zip(chain, fused):
        assert torch.equal(a, b)
    assert torch.equal(bwd, bwd_expected)
    if op_dtype == torch.bfloat16:  # torch rounds, the interpreter truncates
        assert _within_one_ulp(fwd, chain[0], 8)
        assert torch.equal(fwd, tk.scatter_kept_2to4(chain[0], mask, op_dtype)[mask].view(rows, -1))
    else:
        assert torch.equal(fwd, fwd_expected)


@pytest.mark.parametrize("shape", [(64, 96), (36, 20)])
def test_fused_step_matches_the_reference(shape):
    rows, cols = shape
    values, grad, m, v, mask, mask_t = _state(rows, cols, seed=7 + rows)
    expected = [values.clone(), m.clone(), v.clone()]
    exp_fwd, exp_bwd = torch.empty(rows, cols // 2, dtype=torch.float16), torch.empty(cols, rows // 2, dtype=torch.float16)
    ref.adamw_step_operands_(expected[0], grad, expected[1], expected[2], mask, mask_t, fwd=exp_fwd, bwd=exp_bwd, **KW)
    # the reference itself against its definition: the step, then the cast and the transpose
    oracle = [values.clone(), m.clone(), v.clone()]
    ref.adamw_step_(oracle[0], grad, oracle[1], oracle[2], **KW)
    assert all(torch.equal(a, b) for a, b in zip(oracle, expected))
    assert torch.equal(exp_bwd, ref.transpose_kept_2to4(oracle[0], mask, mask_t, torch.float16))
    got = [values.clone(), m.clone(), v.clone()]
    fwd, bwd = torch.full_like(exp_fwd, float("nan")), torch.full_like(exp_bwd, float("nan"))
    kernels_args = (pack_mask(mask), pack_mask(mask_t))
    tf.adamw_step_operands_(got[0], grad, got[1], got[2], *kernels_args, fwd=fwd, bwd=bwd, **KW)
    # PyTorch's CPU lerp/addcmul may fuse multiply-adds: ulp-level differences
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-8)
    assert _within_one_ulp(fwd, expected[0], 11)
    assert _within_one_ulp(bwd, exp_bwd, 11)


def test_fused_step_writes_only_the_operands_asked_for():
    values, grad, m, v, mask, mask_t = _state(32, 48, seed=3)
    bits = (pack_mask(mask), pack_mask(mask_t))
    full = [values.clone(), m.clone(), v.clone()]
    bwd_full = torch.empty(48, 16, dtype=torch.float16)
    tf.adamw_step_operands_(full[0], grad, full[1], full[2], *bits, bwd=bwd_full, **KW)
    only_bwd = [values.clone(), m.clone(), v.clone()]
    bwd = torch.full((48, 16), float("nan"), dtype=torch.float16)
    tf.adamw_step_operands_(only_bwd[0], grad, only_bwd[1], only_bwd[2], *bits, bwd=bwd, **KW)
    assert torch.equal(bwd, bwd_full) and torch.equal(only_bwd[0], full[0])
    bf16_master = [values.bfloat16(), m.clone(), v.clone()]  # bf16 master values: the fwd operand may be fp32
    fwd = torch.full((32, 24), float("nan"))
    tf.adamw_step_operands_(bf16_master[0], grad, bf16_master[1], bf16_master[2], *bits, fwd=fwd, **KW)
    assert torch.equal(fwd, bf16_master[0].float())
    none = [values.clone(), m.clone(), v.clone()]
    tf.adamw_step_operands_(none[0], grad, none[1], none[2], *bits, **KW)  # a plain AdamW step
    assert torch.equal(none[0], full[0])


def test_fused_step_errors():
    values, grad, m, v, mask, mask_t = _state(8, 16, seed=0)
    with pytest.raises(ValueError, match=r"bwd must be a contiguous fp16/bf16/fp32 tensor of shape \(16, 4\)"):
        tf.adamw_step_operands_(values, grad, m, v, mask, mask_t, bwd=torch.empty(8, 8), **KW)
    with pytest.raises(ValueError, match="mask_t must be a bool tensor"):
        tf.adamw_step_operands_(values, grad, m, v, mask, mask_t[:4], **KW)
    with pytest.raises(ValueError, match="rows, cols divisible by 4"):
        tf.adamw_step_operands_(values[:6], grad[:6], m[:6], v[:6], mask[:6], mask_t[:6], **KW)
    with pytest.raises(TypeError, match="moments must be float32"):
        tf.adamw_step_operands_(values, grad, m.double(), v, mask, mask_t, **KW)


# ----------------------------------------------------------------------- the layer and ADAMWSparse
def _layers(compute_dtype):
    from slope.layer import SparseLinear

    torch.manual_seed(0)
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48)
    layers = [SparseLinear.from_dense(w, b, compress=True, backend="reference") for _ in range(2)]
    for layer in layers:
        layer.compute_dtype = compute_dtype  # fp32 master values, products in compute_dtype
    return layers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_operands_come_from_the_fused_step(monkeypatch, dtype):
    """With the Triton paths (as on CUDA), each step's optimizer pass writes the operands: they are
    built once per M_t version, the cached operand objects survive the steps, their values equal a
    rebuild from the new master values, and training matches a twin layer on the unfused path."""
    from slope.optimizers import ADAMWSparse

    fast, slow = _layers(dtype)
    opts = [ADAMWSparse(nn.Sequential(layer), lr=1e-2, weight_decay=0.1, mask_change_freq=3) for layer in (fast, slow)]
    calls = {"fused": 0, "transpose": 0}
    real_fused, real_transpose = tf.adamw_step_operands_, tk.transpose_kept_2to4

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return real_fused(*args, **kwargs)

    def transpose(*args, **kwargs):
        calls["transpose"] += 1
        return real_transpose(*args, **kwargs)

    monkeypatch.setattr(tf, "adamw_step_operands_", fused)
    monkeypatch.setattr(tk, "transpose_kept_2to4", transpose)
    operand_ids = []
    for step in range(1, 6):
        x, dy = torch.randn(5, 64, requires_grad=True), torch.randn(5, 48)
        with monkeypatch.context() as m:
            m.setattr(kernels, "triton_usable", lambda *tensors: True)
            y_fast = fast(x)
            y_fast.backward(dy.to(y_fast.dtype))
            operand_ids.append([id(fast._operands[(d, dtype, x.device)][1]) for d in ("forward", "backward")])
            opts[0].step()
            opts[0].zero_grad()
        y_slow = slow(x)
        y_slow.backward(dy.to(y_slow.dtype))
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # operands one rounding of ulp-close values apart
        torch.testing.assert_close(y_fast.float(), y_slow.float(), rtol=tol, atol=tol)
        opts[1].step()
        opts[1].zero_grad()
        torch.testing.assert_close(fast.values, slow.values, rtol=2e-6, atol=1e-7)
        buffers = fast.operand_buffers()
        if step % 3 == 0:  # M_t refreshed after this step: the operands are rebuilt on next use
            assert buffers == {}
            continue
        assert set(buffers) == {"forward", "backward"}
        bits, bits_t = fast.mask_bits, fast.mask_t_bits
        assert torch.equal(buffers["backward"], real_transpose(fast.values.detach(), bits, bits_t, dtype))
        if dtype == torch.float16:
            assert torch.equal(buffers["forward"], fast.values.detach().to(dtype))
        else:
            assert _within_one_ulp(buffers["forward"], fast.values.detach(), 8)
    assert calls["fused"] == 5
    assert calls["transpose"] == 2  # built at step 1 and after the M_t refresh of step 3, never rebuilt otherwise
    assert operand_ids[0] == operand_ids[1] == operand_ids[2] and operand_ids[3] == operand_ids[4]


def test_unfused_devices_keep_the_rebuild_path():
    """On CPU (no Triton path) the optimizer keeps PyTorch's fused AdamW and the operands are rebuilt."""
    from slope.optimizers import ADAMWSparse

    layer, _ = _layers(torch.bfloat16)
    opt = ADAMWSparse(nn.Sequential(layer), lr=1e-2)
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert set(layer.operand_buffers()) == {"forward", "backward"}  # built from kept values
    opt.step()
    assert layer.operand_buffers() == {} and layer._operands == {}


# ----------------------------------------------------------------------- weight gradient, compressed
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "bool"])
def test_gather_writes_a_fresh_fp32_buffer_or_overwrites(packed):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(36, 40, generator=gen)
    mask = nm_mask(w, 2, 4)
    arg = pack_mask(mask) if packed else mask
    full = torch.randn(40, 36, generator=gen).bfloat16().t()  # strided bf16 dyᵀx
    expected = ref.gather_kept_2to4(full, mask).float()
    fresh = tk.gather_kept_2to4(full, arg, dtype=torch.float32)
    assert fresh.dtype == torch.float32 and torch.equal(fresh, expected)
    assert torch.equal(ref.gather_kept_2to4(full, mask, dtype=torch.float32), expected)
    poisoned = torch.full((36, 20), float("nan"))
    assert tk.gather_kept_2to4(full, arg, poisoned, accumulate=False) is poisoned and torch.equal(poisoned, expected)
    assert torch.equal(ref.gather_kept_2to4(full, mask, torch.full((36, 20), float("nan")), accumulate=False), expected)
    acc = torch.randn(36, 20, generator=gen)
    assert torch.equal(tk.gather_kept_2to4(full, arg, acc.clone()), acc + expected)


@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "reference"])
def test_first_micro_batch_writes_the_gradient_later_ones_add(monkeypatch, triton_path):
    """values_grad (fp32, compressed) is written by the first micro-batch — a fresh buffer, or the
    zeroed one, never read (a NaN hidden in it does not survive) — and added to by the next ones."""
    from slope.optimizers import ADAMWSparse

    layer, _ = _layers(torch.bfloat16)
    opt = ADAMWSparse(nn.Sequential(layer), lr=1e-2)
    gathers = []
    real = tk.gather_kept_2to4

    def gather(full, mask, out=None, **kwargs):
        gathers.append((out is None, kwargs.get("dtype"), kwargs.get("accumulate", True)))
        return real(full, mask, out, **kwargs)

    monkeypatch.setattr(tk, "gather_kept_2to4", gather)
    if triton_path:
        monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)
    xs = [torch.randn(4, 64) for _ in range(2)]

    def expected(micro_batches):
        total = torch.zeros(48, 32)
        for x in micro_batches:
            dy = torch.ones(4, 48, dtype=torch.bfloat16)
            total += ref.gather_kept_2to4((dy.t() @ x.bfloat16()), layer.mask).float()
        return total

    for x in xs:
        layer(x).sum().backward()
    assert layer.values_grad.dtype == torch.float32
    torch.testing.assert_close(layer.values_grad, expected(xs), rtol=0, atol=0)
    if triton_path:
        assert gathers == [(True, torch.float32, True), (False, None, True)]  # a fresh fp32 buffer, then added to
    opt.zero_grad(set_to_none=False)
    assert not bool(layer.values_grad.any())
    layer.values_grad.data.fill_(float("nan"))  # .data: a write the zeroed tensor's version does not see
    gathers.clear()
    layer(xs[0]).sum().backward()
    torch.testing.assert_close(layer.values_grad, expected(xs[:1]), rtol=0, atol=0)
    if triton_path:
        assert gathers == [(False, None, False)]  # written into the zeroed buffer
    layer.values_grad.add_(1.0)  # a visible change: the next backward adds again
    layer(xs[1]).sum().backward()
    torch.testing.assert_close(layer.values_grad, expected(xs) + 1.0, rtol=0, atol=1e-5)
