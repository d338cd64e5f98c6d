"""GPU checks of issue 24's inference paths: both adapter folds (stacked / extended) on every backend
that runs here against the float64 oracle, prefill- and decode-sized; frozen layers sharing their
weights with the operand (the sm90 compressor's kept-value order); the Triton ``lowrank_concat``;
the bound cutlass-sm90 GEMMs (bound once, replayed under a CUDA graph with new inputs); decoding
under CUDA graphs against eager decoding. Marked ``gpu``; skipped without CUDA."""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="unset TRITON_INTERPRET to compile Triton on the GPU"),
]

from slope import prune_model, sparse_modules  # noqa: E402
from slope.backends import backend_class  # noqa: E402
from slope.kernels import reference  # noqa: E402
from slope.layer import SparseLinear  # noqa: E402
from slope.lora import freeze_for_inference, merge_lora  # noqa: E402

DEV = torch.device("cuda")
REL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _available(backend, dtype):
    if backend == "auto":
        return
    try:
        cls = backend_class(backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    reason = cls.unavailable_reason(DEV, dtype)
    if reason is not None:
        pytest.skip(reason)


def _oracle(layer, x):
    x = x.double()
    a = (layer.lora_A * layer.lora_A_mask).double()
    y = x @ layer.dense_weight().double().t() + layer.lora_scaling * (x @ a.t()) @ layer.lora_B.double().t()
    return y if layer.bias is None else y + layer.bias.double()


def _rel_err(got, expected):
    return (got.double() - expected.double()).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("backend", ["auto", "cutlass-sm90", "cusparselt", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fold", ["extended", "stacked"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("tokens", [(4, 250), (8, 1)], ids=["prefill", "decode"])
def test_folds_match_the_oracle(backend, dtype, fold, frozen, tokens):
    _available(backend, dtype)
    out_f, in_f, rank = 768, 512, 64
    weight = torch.randn(out_f, in_f, device=DEV, dtype=dtype) / in_f**0.5
    layer = SparseLinear.from_dense(weight, torch.randn(out_f, device=DEV, dtype=dtype), compress=True, backend=backend)
    layer.add_lora(rank, alpha=2.0 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    before = layer.dense_weight()
    model = merge_lora(torch.nn.Sequential(layer), fold=fold)
    if frozen:
        freeze_for_inference(model)
    x = torch.randn(*tokens, in_f, device=DEV, dtype=dtype)
    with torch.no_grad():
        got = model(x)
        again = model(x)
    assert layer.fold == fold and got.shape == (*tokens, out_f) and got.dtype == dtype
    assert _rel_err(got, _oracle(layer, x)) <= REL[dtype]
    assert torch.equal(got, again)
    assert torch.equal(layer.dense_weight(), before)  # shared values (frozen) still hold W's kept entries
    if frozen:  # a backend that holds kept values shares them with the layer: the weights are kept once
        (operand,) = [v[1] for k, v in layer._operands.items() if k[0] == "merged"]
        (used,) = set(layer._backends.values())
        held = used.operand_values(operand[0] if fold == "extended" else operand)
        if held is not None:
            assert layer.values.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()


def test_auto_keeps_frozen_merged_layers_sparse_at_decode_sizes():
    layer = SparseLinear.from_dense(torch.randn(256, 256, device=DEV, dtype=torch.bfloat16), compress=True, backend="auto")
    layer.add_lora(16)
    model = merge_lora(torch.nn.Sequential(layer))
    freeze_for_inference(model)
    with torch.no_grad():
        for tokens in (1, 8, 4096):
            model(torch.randn(tokens, 256, device=DEV, dtype=torch.bfloat16))
    assert all(b.compressed for b in layer._backends.values()), layer._backends


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,r", [(1, 2048, 64), (8, 512, 8), (1000, 768, 24)])
def test_triton_lowrank_concat(dtype, m, k, r):
    from slope.kernels import lowrank_concat

    x = torch.randn(m, k, device=DEV, dtype=dtype)
    a = torch.randn(r, k, device=DEV, dtype=dtype) / k**0.5
    got = lowrank_concat(x, a)
    ref = reference.lowrank_concat(x.double(), a.double())
    assert torch.equal(got[:, :k], x) and not got[:, k + 1 :: 2].any()
    assert _rel_err(got[:, k:], ref[:, k:]) <= (1e-3 if dtype == torch.float32 else REL[dtype])


def test_bound_cutlass_gemm_is_bound_once_and_replays_under_a_cuda_graph():
    _available("cutlass-sm90", torch.bfloat16)
    from slope.kernels import cutlass_sm90

    library = cutlass_sm90.load_extension()
    if not hasattr(library, "bound_count"):
        pytest.skip("the torch extension is in use, not the prebuilt library")
    dense = reference.prune_2to4(torch.randn(512, 1024, device=DEV, dtype=torch.bfloat16))[0]
    values, meta = cutlass_sm90.compress(dense)
    x = torch.randn(8, 1024, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(8, 512, device=DEV, dtype=torch.bfloat16)
    start = library.bound_count()
    for _ in range(3):
        d, error = library.gemm(values, meta, x, None, None, 1.0, 0.0, out=out)
        assert error == "" and d is out
    assert library.bound_count() == start + 1
    expected = x.double() @ dense.double().t()
    assert _rel_err(out, expected) <= REL[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        library.gemm(values, meta, x, None, None, 1.0, 0.0, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(out, x.double() @ dense.double().t()) <= REL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k,r", [(1, 2048, 2048, 64), (8, 256, 2048, 64), (16, 5632, 2048, 16), (8, 2048, 5632, 64)])
def test_triton_merged_decode(dtype, m, n, k, r):
    """fp32: IEEE products (TF32 would miss the bound by ~100x) unless allow_tf32 is set, as addmm."""
    from slope.kernels import compress_2to4, merged_decode, prune_2to4

    w, mask = prune_2to4(torch.randn(n, k, device=DEV, dtype=dtype))
    values, meta = compress_2to4(w, mask)
    wide = torch.zeros(n, k // 2 + 64, device=DEV, dtype=dtype)  # strided kept values, as frozen layers share them
    wide[:, : k // 2] = values
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    a = torch.randn(r, k, device=DEV, dtype=dtype) / k**0.5
    b = torch.randn(n, r, device=DEV, dtype=dtype) / r**0.5
    bias = torch.randn(n, device=DEV, dtype=dtype)
    got = merged_decode(x, wide[:, : k // 2], meta, a, b, bias)
    oracle = x.double() @ w.double().t() + (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    assert _rel_err(got, oracle) <= (1e-5 if dtype == torch.float32 else REL[dtype])


@pytest.mark.parametrize("backend,decode_kernel", [("auto", "gemm"), ("cutlass-sm90", "gemm"), ("cutlass-sm90", "fused")])
def test_cuda_graph_decode_equals_eager_decode(backend, decode_kernel):
    _available(backend, torch.bfloat16)
    transformers = pytest.importorskip("transformers")
    from slope.inference.decode import static_decode

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEV, torch.bfloat16).eval()
    prune_model(model, backend=backend, add_lora=True, lora_rank=16, merge_lora=True, verbose=False)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.05)
    freeze_for_inference(model)
    from slope.lora import set_decode_kernel

    set_decode_kernel(model, decode_kernel)
    ids = torch.randint(0, 512, (8, 20), device=DEV)
    eager = static_decode(model, ids, 12)
    graphs = static_decode(model, ids, 12, cuda_graphs=True)
    assert graphs.cuda_graphs and torch.equal(graphs.tokens, eager.tokens)
    assert graphs.decode_tokens_per_s > 0
