"""cutlass-sm90 (our CUTLASS 3.x sparse GEMM for Hopper) against the masked-dense oracle.

Fresh random inputs each test; runs only on an sm90 GPU with nvcc and the nvidia-cutlass headers
(a build failure there is a test failure, not a skip). The first test builds the extension
(~2-4 min), later ones reuse the cached build.
"""
import pytest
import torch

from slope.backends import backend_class
from slope.kernels import cutlass_sm90
from slope.layer import SparseLinear
from slope.masks import nm_mask

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
# (M = sparse rows / out features, N = tokens, K = reduction / in features)
SHAPES = [
    (4096, 1024, 4096),  # attention projection
    (11008, 512, 4096),  # FFN up (LLaMA-7B)
    (4096, 256, 11008),  # FFN down
    (768, 300, 3072),  # GPT-2 sized, tokens not a tile multiple
    (200, 77, 784),  # nothing aligned to a tile (K % 128 = 16, M % 64 = 8)
]


def _skip_without_sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 (Hopper) GPU")
    problem = cutlass_sm90.build_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def _sm90():
    _skip_without_sm90()


def _sparse(rows, cols, dtype, exact_two=True):
    """A random (rows, cols) tensor on cuda that keeps 2 of every 4 along cols (non-zeros)."""
    w = torch.randn(rows, cols, device="cuda", dtype=torch.float32)
    if exact_two:  # no accidental zeros: every group has exactly two non-zeros
        w = w.sign() * (w.abs() + 0.1)
    return (w * nm_mask(w, 2, 4)).to(dtype)


def _oracle(a, b, bias=None, c=None, alpha=1.0, beta=0.0):
    """fp64 ``alpha * b @ a.T + beta * c + bias`` from the same (rounded) inputs."""
    d = alpha * (b.double() @ a.double().t())
    if bias is not None:
        d = d + bias.double()
    if c is not None:
        d = d + beta * c.double()
    return d


def _assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.abs().max().item()
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-3  # output rounding: 2^-8 resp. 2^-11 relative
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-4 * scale + 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 256), (200, 784), (4096, 4096)])
def test_compressed_values_are_the_kept_entries_in_row_order(shape, dtype):
    a = _sparse(*shape, dtype)
    values, meta = cutlass_sm90.compress(a)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.dtype == torch.uint8 and meta.is_cuda
    kept = a[a != 0].view(shape[0], shape[1] // 2)
    assert torch.equal(values, kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 256), (200, 784), (1024, 2048)])
def test_compress_then_identity_gemm_gives_back_the_dense_operand(shape, dtype):
    """Each output of A·I is one product with 1: exact, so this checks values + metadata bit for bit,
    including groups with fewer than two non-zeros and negative zeros."""
    a = _sparse(*shape, dtype, exact_two=False)
    a[::7, :4] = 0  # whole empty groups
    a[1::5, 2:4] = 0  # groups with a single non-zero at either end
    a[2::5, 0:2] = 0
    a[3::9, 4:8] = -0.0
    values, meta = cutlass_sm90.compress(a)
    eye = torch.eye(shape[1], device="cuda", dtype=dtype)
    back = cutlass_sm90.gemm(values, meta, eye)  # (K, M) = I @ A.T
    assert torch.equal(back.t(), a)


def test_compress_rejects_a_dense_that_is_not_2to4():
    a = torch.randn(128, 256, device="cuda", dtype=torch.float16) + 3
    with pytest.raises(ValueError, match="not 2:4"):
        cutlass_sm90.compress(a)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cutlass_sm90.compress(_sparse(64, 40, torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_gemm_matches_oracle(shape, dtype):
    m, n, k = shape
    a = _sparse(m, k, dtype)
    b = torch.randn(n, k, device="cuda", dtype=dtype)
    values, meta = cutlass_sm90.compress(a)
    _assert_close(cutlass_sm90.gemm(values, meta, b), _oracle(a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 512, 4096), (200, 77, 784)], ids=["4096x512x4096", "200x77x784"])
def test_fused_bias_and_beta_c_epilogue(shape, dtype):
    m, n, k = shape
    a = _sparse(m, k, dtype)
    b = torch.randn(n, k, device="cuda", dtype=dtype)
    bias = torch.randn(m, device="cuda", dtype=dtype)
    c = torch.randn(n, m, device="cuda", dtype=dtype) * 10
    values, meta = cutlass_sm90.compress(a)
    _assert_close(cutlass_sm90.gemm(values, meta, b, bias=bias), _oracle(a, b, bias), dtype)
    _assert_close(cutlass_sm90.gemm(values, meta, b, c=c, beta=0.25), _oracle(a, b, c=c, beta=0.25), dtype)
    out = cutlass_sm90.gemm(values, meta, b, bias=bias, c=c, alpha=0.5, beta=-1.5)
    _assert_close(out, _oracle(a, b, bias, c, alpha=0.5, beta=-1.5), dtype)
    # beta without c means no source term
    _assert_close(cutlass_sm90.gemm(values, meta, b, beta=3.0), _oracle(a, b), dtype)


def test_gemm_rejects_mismatched_inputs():
    a = _sparse(128, 256, torch.bfloat16)
    values, meta = cutlass_sm90.compress(a)
    with pytest.raises(RuntimeError, match="columns"):
        cutlass_sm90.gemm(values, meta, torch.randn(8, 128, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="b is"):
        cutlass_sm90.gemm(values, meta, torch.randn(8, 256, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="bias"):
        cutlass_sm90.gemm(values, meta, torch.randn(8, 256, device="cuda", dtype=torch.bfloat16),
                          bias=torch.randn(64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1024, 4096), (100, 200), (36, 52)])
def test_backend_matmul_and_linear_pad_odd_shapes(rows, cols, dtype):
    cls = backend_class("cutlass-sm90")
    assert cls.unavailable_reason(torch.device("cuda"), dtype) is None
    backend = cls()
    w = _sparse(rows, cols, dtype)
    operand = backend.make_operand(w, w != 0)
    x = torch.randn(3, 5, cols, device="cuda", dtype=dtype)
    y = backend.matmul(x, operand)
    assert y.shape == (3, 5, rows)
    _assert_close(y.reshape(-1, rows), _oracle(w, x.reshape(-1, cols)), dtype)
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    c = torch.randn(3, 5, rows, device="cuda", dtype=dtype)
    fused = backend.linear(x, operand, bias=bias, c=c, alpha=2.0, beta=0.5)
    ref = _oracle(w, x.reshape(-1, cols), bias, c.reshape(-1, rows), alpha=2.0, beta=0.5)
    _assert_close(fused.reshape(-1, rows), ref, dtype)
    assert backend.matmul(x[:, :0], operand).shape == (3, 0, rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_forward_backward_matches_simulated(dtype, bias):
    out_f, in_f = 768, 512
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
    b = torch.randn(out_f, device="cuda", dtype=dtype) if bias else None
    fast = SparseLinear.from_dense(w, b, compress=True, backend="cutlass-sm90")
    sim = SparseLinear.from_dense(w, b, compress=False)
    assert torch.equal(fast.mask, sim.mask) and torch.equal(fast.mask_t, sim.mask_t)
    x = torch.randn(4, 33, in_f, device="cuda", dtype=dtype)
    x_fast, x_sim = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_sim = fast(x_fast), sim(x_sim)
    dy = torch.randn_like(y_sim)
    y_fast.backward(dy)
    y_sim.backward(dy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y_fast, y_sim, **tol)
    torch.testing.assert_close(x_fast.grad, x_sim.grad, **tol)
    torch.testing.assert_close(fast.values_grad, sim.values_grad, **tol)
    if bias:
        torch.testing.assert_close(fast.bias.grad, sim.bias.grad, **tol)
    assert fast._backend_for(dtype, x.device).name == "cutlass-sm90"


@pytest.mark.parametrize("dtype", DTYPES)
def test_operand_from_kept_values_is_the_compressed_operand(dtype):
    """The layer builds forward operands from its kept values + metadata of the mask (compressed
    as ones); that must be byte-identical to compressing the masked dense weight."""
    backend = backend_class("cutlass-sm90")()
    w = torch.randn(1024, 2048, device="cuda", dtype=dtype)
    mask = nm_mask(w, 2, 4)
    dense = w * mask
    dense[0, :8] = 0  # kept entries that are exactly zero keep their slots
    values = dense[mask].view(1024, 1024)
    fast = backend.operand_from_values(values, backend.operand_structure(mask, dtype))
    slow = backend.make_operand(dense, mask)
    assert torch.equal(fast.values, slow.values) and torch.equal(fast.meta, slow.meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64), (200, 784), (1024, 4352)])
def test_operand_mask_reads_back_the_pattern(shape, dtype):
    """``operand_mask`` (identity GEMM over ones, in slices) is the mask of an operand built from
    kept values (kept zeros included), of a padded one and of one over several identity slices."""
    backend = backend_class("cutlass-sm90")()
    rows, cols = shape
    w = torch.randn(rows, cols, device="cuda", dtype=dtype)
    mask = nm_mask(w, 2, 4)
    dense = _sparse(rows, cols, dtype)
    assert torch.equal(backend.operand_mask(backend.make_operand(dense, dense != 0)), dense != 0)
    structure = backend.operand_structure(mask, dtype)
    if structure is not None:  # (an aligned shape)
        values = (w * mask)[mask].view(rows, cols // 2)
        values[0] = 0
        assert torch.equal(backend.operand_mask(backend.operand_from_values(values, structure)), mask)


def test_frozen_merged_layers_hold_their_masks_in_sm90_operands():
    """A frozen merged model on cutlass-sm90 drops mask_bits (and, stacked, lora_A_mask) after its
    first product, with the same outputs and state dict as before."""
    from slope import prune_model, sparse_modules
    from slope.lora import freeze_for_inference, merge_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).cuda().bfloat16()
    prune_model(model, add_lora=True, lora_rank=16, backend="cutlass-sm90", verbose=False)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.1)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items() if "mask_t" not in k}
    with torch.no_grad():
        expected = model(x)
        merge_lora(model)
        freeze_for_inference(model)
        got = model(x)
    for name, layer in sparse_modules(model):
        assert layer._held is not None and "mask_bits" not in dict(layer.named_buffers()), name
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)
    saved = model.state_dict()
    assert list(saved) == list(state) and all(torch.equal(saved[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_forward_operand_follows_optimizer_steps(dtype):
    """After each optimizer step (new values, same mask) the forward product uses the new weights."""
    from slope.optimizers import ADAMWSparse

    layer = SparseLinear.from_dense(torch.randn(512, 768, device="cuda"), compress=True, backend="cutlass-sm90")
    opt = ADAMWSparse(layer, lr=1e-2)
    for _ in range(3):
        with torch.autocast("cuda", dtype=dtype):
            layer(torch.randn(64, 768, device="cuda")).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        x = torch.randn(64, 768, device="cuda", dtype=dtype)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            y = layer(x)
        _assert_close(y, _oracle(layer.dense_weight().to(dtype), x), dtype)
    assert layer._backend_for(dtype, x.device).name == "cutlass-sm90"


def test_a_matching_prebuilt_library_is_what_the_backend_runs():
    """With build/sm90 (or $SLOPE_SM90_LIB) built from these sources, nothing is compiled: the
    kernel's interface is the ctypes library, and its products are the ones checked above."""
    from slope.kernels import cutlass_sm90_lib

    if cutlass_sm90_lib.check() is not None:
        pytest.skip(cutlass_sm90_lib.check())
    assert isinstance(cutlass_sm90.load_extension(), cutlass_sm90_lib.Sm90Library)
