"""The cutlass-sm90 backend's own logic (padding, reshapes, fused epilogue arguments, errors) on CPU.

The compiled extension needs a Hopper GPU; here it is replaced by a stand-in that honours the
same contract with the reference kernels (``compress(dense (M, K)) -> (values (M, K/2), meta)``,
``gemm(values, meta, b, bias, c, alpha, beta) -> alpha·b@Aᵀ + beta·c + bias``, ``K % 16 == 0``,
``M % 8 == 0``), so the backend is checked against the dense oracle. The real kernels are
checked on the GPU by tests/gpu/test_cutlass_sm90.py.
"""
import pytest
import torch
import torch.nn.functional as F

from slope.backends.cutlass_sm90 import CutlassSm90Backend
from slope.kernels import compress_2to4, cutlass_sm90, decompress_2to4
from slope.masks import nm_mask


class FakeExtension:
    """CPU stand-in for the compiled module; records the shapes the kernel would see."""

    def __init__(self):
        self.calls = []

    def compress(self, dense):
        if dense.shape[1] % 16:
            return None, None, "cutlass-sm90 compress: cols must be a positive multiple of 16"
        assert dense.is_contiguous()
        return (*compress_2to4(dense, layout="plain"), "")

    def gemm(self, values, meta, b, bias, c, alpha, beta):
        m, k = values.shape[0], values.shape[1] * 2
        assert m % 8 == 0 and b.shape[1] == k and b.is_contiguous() and b.data_ptr() % 16 == 0
        assert bias is None or bias.shape == (m,)
        assert c is None or c.shape == (b.shape[0], m)
        self.calls.append((m, b.shape[0], k))
        d = alpha * (b.float() @ decompress_2to4(values, meta).float().t())
        if bias is not None:
            d = d + bias.float()
        if c is not None:
            d = d + beta * c.float()
        return d.to(b.dtype), ""


@pytest.fixture
def fake(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(cutlass_sm90, "load_extension", lambda verbose=False: ext)
    monkeypatch.setattr(cutlass_sm90, "_require_cuda", lambda t, name: None)  # the stand-in runs on CPU
    return ext


def _sparse(rows, cols, dtype=torch.bfloat16):
    w = torch.randn(rows, cols)
    return (w * nm_mask(w, 2, 4)).to(dtype)


@pytest.mark.parametrize("rows,cols", [(64, 128), (36, 52), (100, 200)])
def test_matmul_pads_to_the_kernel_alignment_and_slices_back(fake, rows, cols):
    backend = CutlassSm90Backend()
    w = _sparse(rows, cols)
    operand = backend.make_operand(w, w != 0)
    padded = (-(-rows // 8) * 8, -(-cols // 16) * 16)
    assert operand.padded_shape == padded and (operand.rows, operand.cols) == (rows, cols)
    x = torch.randn(2, 7, cols, dtype=torch.bfloat16)
    y = backend.matmul(x, operand)
    assert y.shape == (2, 7, rows) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x.float(), w.float()).to(y.dtype), rtol=1e-2, atol=1e-2)
    assert fake.calls == [(padded[0], 14, padded[1])]


def test_linear_fuses_bias_and_scaled_c(fake):
    backend = CutlassSm90Backend()
    w = _sparse(36, 52)
    operand = backend.make_operand(w, w != 0)
    x = torch.randn(5, 52, dtype=torch.bfloat16)
    bias = torch.randn(36, dtype=torch.bfloat16)
    c = torch.randn(5, 36, dtype=torch.bfloat16)
    y = backend.linear(x, operand, bias=bias, c=c, alpha=0.5, beta=2.0)
    ref = 0.5 * F.linear(x.float(), w.float()) + bias.float() + 2.0 * c.float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_misaligned_and_strided_inputs_are_copied_not_rejected(fake):
    backend = CutlassSm90Backend()
    w = _sparse(64, 128)
    operand = backend.make_operand(w, w != 0)
    big = torch.randn(4 * 128 + 1, dtype=torch.bfloat16)
    x = big[1:].view(4, 128)  # 2-byte offset: not 16-byte aligned
    xt = torch.randn(128, 4, dtype=torch.bfloat16).t()  # non-contiguous
    for inp in (x, xt):
        torch.testing.assert_close(backend.matmul(inp, operand).float(), F.linear(inp.float(), w.float()),
                                   rtol=2e-2, atol=2e-2)


def test_empty_batch_and_bad_inputs(fake):
    backend = CutlassSm90Backend()
    w = _sparse(64, 128)
    operand = backend.make_operand(w, w != 0)
    assert backend.matmul(torch.randn(0, 128, dtype=torch.bfloat16), operand).shape == (0, 64)
    assert fake.calls == []
    with pytest.raises(ValueError, match="features"):
        backend.matmul(torch.randn(3, 64, dtype=torch.bfloat16), operand)
    with pytest.raises(ValueError, match="dtype|built in"):
        backend.matmul(torch.randn(3, 128, dtype=torch.float16), operand)
    with pytest.raises(ValueError, match="bias"):
        backend.linear(torch.randn(3, 128, dtype=torch.bfloat16), operand, bias=torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        backend.make_operand(w.float(), w != 0)


def test_module_wrappers_check_2to4_and_raise_the_extension_errors(fake):
    with pytest.raises(ValueError, match="not 2:4"):
        cutlass_sm90.compress(torch.randn(8, 32, dtype=torch.bfloat16) + 5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cutlass_sm90.compress(_sparse(8, 40))
    values, meta = cutlass_sm90.compress(_sparse(8, 32))
    assert values.shape == (8, 16)


@pytest.mark.parametrize("device", [None, 0, torch.device("cuda"), torch.device("cuda", 1), "cuda:1"])
def test_build_problem_accepts_every_device_spelling(monkeypatch, device):
    # On the H100 a torch.device argument once raised TypeError inside the availability check.
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: seen.append(index) or (8, 0))
    reason = cutlass_sm90.build_problem(device)
    expected = 1 if device in (torch.device("cuda", 1), "cuda:1") else 0
    assert seen == [expected]
    assert "needs a Hopper GPU" in reason and f"cuda:{expected}" in reason


def test_wrapper_rejects_bad_input_before_calling_the_extension(monkeypatch):
    """Every input check is in Python: an error raised inside the extension crashed the GPU machine."""

    def no_extension(verbose=False):
        raise AssertionError("the extension must not be reached with bad input")

    monkeypatch.setattr(cutlass_sm90, "load_extension", no_extension)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cutlass_sm90.compress(_sparse(64, 128))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        cutlass_sm90.compress(_sparse(64, 128, torch.float32))
    with pytest.raises(RuntimeError, match="2-D"):
        cutlass_sm90.compress(_sparse(64, 128)[0])
    monkeypatch.setattr(cutlass_sm90, "_require_cuda", lambda t, name: None)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cutlass_sm90.compress(_sparse(64, 40))
    values, meta = compress_2to4(_sparse(64, 128), layout="plain")
    b = torch.randn(8, 128, dtype=torch.bfloat16)
    cases = [
        (dict(b=torch.randn(8, 64, dtype=torch.bfloat16)), "columns"),
        (dict(b=b.half()), "b is"),
        (dict(b=b, bias=torch.randn(32, dtype=torch.bfloat16)), "bias"),
        (dict(b=b, c=torch.randn(64, 8, dtype=torch.bfloat16)), "c must have shape"),
        (dict(b=torch.empty(8 * 128 + 1, dtype=torch.bfloat16)[1:].view(8, 128)), "16-byte aligned"),
        (dict(b=b, meta=meta.to(torch.int16)), "uint8"),
    ]
    for kwargs, message in cases:
        args = {"values": values, "meta": meta, **kwargs}
        with pytest.raises(RuntimeError, match=message):
            cutlass_sm90.gemm(**args)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cutlass_sm90.gemm(values[:60], meta, b)


def test_operand_from_kept_values_matches_the_dense_oracle(fake):
    backend = CutlassSm90Backend()
    w = torch.randn(64, 128)
    mask = nm_mask(w, 2, 4)
    dense = (w * mask).to(torch.bfloat16)
    values = dense[mask].view(64, 64)  # kept entries, row order, ascending column in a group
    structure = backend.operand_structure(mask, torch.bfloat16)
    operand = backend.operand_from_values(values, structure)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(backend.matmul(x, operand).float(), F.linear(x.float(), dense.float()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="values must have shape"):
        backend.operand_from_values(values[:, :32], structure)
    # shapes that need padding keep the make_operand path
    assert backend.operand_structure(nm_mask(torch.randn(36, 52), 2, 4), torch.bfloat16) is None


def test_fp32_master_layer_steps_and_multiplies_under_autocast(fake, monkeypatch):
    """tests/gpu/test_cutlass_sm90.py::test_layer_forward_operand_follows_optimizer_steps on the
    stand-in: an fp32 layer trained under autocast multiplies a low-precision input under autocast
    too (outside it such an input is refused) and follows each optimizer step."""
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    monkeypatch.setattr(CutlassSm90Backend, "unavailable_reason", classmethod(lambda cls, device, dtype: None))
    dtype = torch.bfloat16
    layer = SparseLinear.from_dense(torch.randn(512, 768), compress=True, backend="cutlass-sm90")
    opt = ADAMWSparse(layer, lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=dtype):
            layer(torch.randn(64, 768)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        x = torch.randn(64, 768, dtype=dtype)
        with torch.no_grad(), pytest.raises(TypeError, match="does not match the weight dtype"):
            layer(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        expected = x.double() @ layer.dense_weight().to(dtype).double().t()
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), expected, rtol=8e-3, atol=1e-4 * expected.abs().max().item() + 1e-3)
    assert layer._backend_for(dtype, x.device).name == "cutlass-sm90" and fake.calls
