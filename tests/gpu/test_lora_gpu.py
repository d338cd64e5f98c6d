"""GPU checks of merged sparse+LoRA inference (slope.lora): the merged path on every backend that
runs here against the float64 oracle and against the unmerged reference layer, and a tiny HF
Llama whose merged and unmerged logits agree on CUDA. Marked ``gpu``; skipped without CUDA."""
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
from slope.layer import SparseLinear  # noqa: E402
from slope.lora import MergedSparseLinear, freeze_for_inference, merge_lora  # noqa: E402

DEV = torch.device("cuda")
REL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _layer(backend, dtype, out_features, in_features, rank, bias):
    if backend != "auto":
        try:
            cls = backend_class(backend)
        except RuntimeError as exc:
            pytest.skip(str(exc))
        reason = cls.unavailable_reason(DEV, dtype)
        if reason is not None:
            pytest.skip(reason)
    weight = torch.randn(out_features, in_features, device=DEV, dtype=dtype) / in_features**0.5
    bias_t = torch.randn(out_features, device=DEV, dtype=dtype) if bias else None
    layer = SparseLinear.from_dense(weight, bias_t, compress=True, backend=backend)
    layer.add_lora(rank, alpha=2.0 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    return layer


def _oracle(layer, x):
    x = x.double()
    a = (layer.lora_A * layer.lora_A_mask).double()
    y = x @ layer.dense_weight().double().t() + layer.lora_scaling * (x @ a.t()) @ layer.lora_B.double().t()
    return y if layer.bias is None else y + layer.bias.double()


def _rel_err(got, expected):
    return (got.double() - expected.double()).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("backend", ["auto", "reference", "cusparselt", "cutlass", "cutlass-sm90", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank, bias", [(16, True), (64, False)])
@pytest.mark.parametrize("tokens", [(3, 37), (1, 1)], ids=["prefill", "decode"])
def test_merged_layer_matches_oracle_and_reference(backend, dtype, rank, bias, tokens):
    layer = _layer(backend, dtype, 512, 256, rank, bias)
    x = torch.randn(*tokens, 256, device=DEV, dtype=dtype)
    with torch.no_grad():
        reference = SparseLinear.from_dense(layer.dense_weight(), layer.bias, compress=True, backend="reference")
        reference.add_lora(rank, alpha=2.0 * rank)
        reference.lora_A.copy_(layer.lora_A)
        reference.lora_B.copy_(layer.lora_B)
        reference.lora_A_mask.copy_(layer.lora_A_mask)
        unmerged_reference = reference(x)
        merged = merge_lora(torch.nn.Sequential(layer))[0]
        assert isinstance(merged, MergedSparseLinear)
        got = merged(x)
        got_again = merged(x)  # cached operand
    assert got.shape == (*tokens, 512) and got.dtype == dtype
    oracle = _oracle(layer, x)
    assert _rel_err(got, oracle) <= REL[dtype]
    assert _rel_err(got, unmerged_reference) <= 2 * REL[dtype]
    assert _rel_err(got_again, got) <= 1e-3


def test_tiny_llama_merged_matches_unmerged_on_cuda():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).to(DEV, torch.float16).eval()
    prune_model(model, compress=True, add_lora=True, lora_rank=32, verbose=False)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.05)
    ids = torch.randint(1, 256, (2, 16), device=DEV)
    with torch.no_grad():
        expected = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
        report = freeze_for_inference(model)
        frozen = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert _rel_err(merged, expected) <= 2e-2
    assert _rel_err(frozen, merged) <= 1e-3
    assert report.total_after < report.total_before
    assert tokens.shape == (2, 24)
