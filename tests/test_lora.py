"""Merged sparse+LoRA inference (slope.lora): equality with the unmerged layer, the state-dict path,
the inference-only form, HF generate(), and the error messages. CPU: reference + simulated backends."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slope import prune_model, sparse_modules
from slope.kernels import decompress_2to4
from slope.layer import SparseLinear
from slope.lora import MergedSparseLinear, effective_weight, freeze_for_inference, merge_lora
from slope.optimizers import ADAMWSparse

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self, bias=True, dims=(64, 96, 64)):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1], bias=bias)
        self.fc2 = nn.Linear(dims[1], dims[2], bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _randomize_adapters(model, std=0.2):
    """Give every adapter a non-zero B (fresh adapters are zero) and a non-zero bias."""
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.lora_B.normal_(0.0, std)
            if layer.bias is not None:
                layer.bias.normal_()


def _oracle(layer, x):
    """``x (W⊙M)ᵀ + (α/r)(x (A⊙M_A)ᵀ) Bᵀ + b`` in float64 from the layer's tensors."""
    x = x.double()
    y = x @ layer.dense_weight().double().t()
    if layer.lora_rank:
        a = (layer.lora_A * layer.lora_A_mask).double()
        y = y + layer.lora_scaling * (x @ a.t()) @ layer.lora_B.double().t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def _pruned_mlp(compress, bias=True, rank=8, dtype=torch.float32, alpha=None):
    model = prune_model(MLP(bias).to(dtype), compress=compress, add_lora=True, lora_rank=rank, lora_alpha=alpha, verbose=False)
    _randomize_adapters(model)
    return model


def _train(model, steps=2):
    """A few real SLoPe steps: sparse optimizer for W, AdamW for adapters and biases."""
    sparse_opt = ADAMWSparse(model, lr=1e-2, mask_change_freq=1)
    dense_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(torch.randn(4, 64)).square().mean().backward()
        sparse_opt.step()
        dense_opt.step()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()


# ---------------------------------------------------------------------------- layer equality
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [8, 32])
def test_merged_equals_unmerged_fp32(compress, bias, rank):
    model = _pruned_mlp(compress, bias, rank, alpha=2.0 * rank)
    x = torch.randn(3, 5, 64)
    expected = model(x).detach()
    oracle = _oracle(model.fc2, torch.relu(_oracle(model.fc1, x)))
    assert merge_lora(model) is model
    assert all(isinstance(m, MergedSparseLinear) for _, m in sparse_modules(model))
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape == (3, 5, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_merged_equals_unmerged_bf16(compress, bias):
    model = _pruned_mlp(compress, bias, rank=8, dtype=torch.bfloat16)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    expected = model(x).detach()
    oracle = _oracle(model.fc2, torch.relu(_oracle(model.fc1, x)).bfloat16())
    merge_lora(model)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.bfloat16
    scale = oracle.abs().max().item()
    assert (got.double() - oracle).abs().max().item() <= 2e-2 * scale
    assert (got.double() - expected.double()).abs().max().item() <= 2e-2 * scale


def test_merged_under_autocast_matches_unmerged():
    model = _pruned_mlp(compress=True)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x).detach()
        merge_lora(model)
        got = model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("compress", [True, False])
def test_one_stacked_operand(compress):
    """The stacked fold multiplies by one operand [W⊙M ; A⊙M_A] (out=96, r=8)."""
    model = merge_lora(_pruned_mlp(compress), fold="stacked")
    with torch.no_grad():
        model(torch.randn(2, 64))
    layer = model.fc1
    assert list(layer._operands) == [("merged", torch.float32, torch.device("cpu"))]
    operand = layer._operands[("merged", torch.float32, torch.device("cpu"))][1]
    dense = decompress_2to4(*operand) if compress else operand
    assert dense.shape == (104, 64)
    torch.testing.assert_close(dense[:96], layer.dense_weight(), rtol=0, atol=0)
    torch.testing.assert_close(dense[96:], layer.lora_A * layer.lora_A_mask, rtol=0, atol=0)


def test_operand_follows_in_place_updates():
    """The cached operand is rebuilt when values, lora_A or the masks change (version-keyed)."""
    model = merge_lora(_pruned_mlp(compress=True))
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)
        model.fc1.values.mul_(-2.0)
        model.fc1.lora_A.add_(1.0)
        model.fc2.lora_B.mul_(3.0)
        got = model(x)
    torch.testing.assert_close(got.double(), _oracle(model.fc2, torch.relu(_oracle(model.fc1, x))), rtol=1e-5, atol=1e-5)


def test_backward_through_merged_layer_is_a_clear_error():
    model = merge_lora(_pruned_mlp(compress=True))
    x = torch.randn(4, 64, requires_grad=True)
    y = model(x)  # forward works with autograd on (plain eval code without no_grad)
    torch.testing.assert_close(y.detach().double(), _oracle(model.fc2, torch.relu(_oracle(model.fc1, x.detach()))), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged inference form.*merge_lora=False"):
        y.sum().backward()


def test_training_a_merged_model_is_a_clear_error():
    """In training mode a backward through merged layers names the inference-only form even when
    nothing before them requires grad (was torch's "element 0 ... does not require grad"), and
    ADAMWSparse refuses merged or frozen layers (its step would silently change nothing)."""
    x = torch.randn(4, 64)
    model = prune_model(MLP(), compress=True, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    assert model.training
    with pytest.raises(RuntimeError, match="merged inference form.*train the unmerged model"):
        model(x).sum().backward()
    with pytest.raises(ValueError, match=r"ADAMWSparse: 2 SLoPe layers of MLP \(e.g. fc1\) are in the merged inference-only "
                                         r"form .* train the unmerged model"):
        ADAMWSparse(model)
    model.eval()  # evaluation with autograd on: outputs stay plain tensors
    assert not model(x).requires_grad
    frozen = prune_model(MLP(), compress=True, verbose=False)
    freeze_for_inference(frozen)
    with pytest.raises(ValueError, match="merged inference-only form"):
        ADAMWSparse(frozen)
    # a merged backbone with its own tensors frozen, under a trainable head, trains the head in training mode
    backbone = prune_model(MLP(), compress=True, add_lora=True, lora_rank=8, merge_lora=True, verbose=False).requires_grad_(False)
    head = nn.Linear(64, 3)
    nn.Sequential(backbone, head).train()(x).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- errors
def test_merge_without_adapters_is_an_error():
    model = prune_model(MLP(), compress=True, verbose=False)
    with pytest.raises(ValueError, match="no SLoPe layer of this model has adapters"):
        merge_lora(model)
    with pytest.raises(ValueError, match="no SLoPe layers"):
        merge_lora(MLP())


def test_merge_twice_is_an_error():
    model = merge_lora(_pruned_mlp(compress=True))
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)


# ---------------------------------------------------------------------------- the SLoPe state-dict path
@pytest.mark.parametrize("compress", [True, False])
def test_build_merged_then_load_equals_train_then_merge(compress):
    trained = prune_model(MLP(), compress=compress, add_lora=True, lora_rank=8, verbose=False)
    _randomize_adapters(trained)
    _train(trained)
    state = trained.state_dict()
    x = torch.randn(5, 64)
    with torch.no_grad():
        unmerged = trained(x)
        merged = merge_lora(trained)(x)

    torch.manual_seed(123)  # another initialisation: everything must come from the checkpoint
    fresh = prune_model(MLP(), compress=compress, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    assert isinstance(fresh.fc1, MergedSparseLinear)
    assert list(fresh.state_dict()) == list(state)
    with torch.no_grad():
        before = fresh(x)  # builds (and caches) the operand of the random weights
        fresh.load_state_dict(state)
        after = fresh(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, merged, rtol=0, atol=0)
    torch.testing.assert_close(after, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["bf16 merged", "compress=False", "compress=True from compress=False"])
def test_a_state_loads_across_dtypes_and_storage(target):
    """The 2:4 metadata is rebuilt on load: a trained fp32 state loads into a bf16 merged model (the
    seed's inference recipe) and across compressed / simulated storage."""
    source_compress = target != "compress=True from compress=False"
    trained = prune_model(MLP(), compress=source_compress, add_lora=True, lora_rank=8, verbose=False)
    _randomize_adapters(trained)
    _train(trained)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = trained(x)
    torch.manual_seed(123)
    dtype = torch.bfloat16 if target == "bf16 merged" else torch.float32
    fresh = prune_model(MLP().to(dtype), compress=not source_compress if target != "bf16 merged" else True, add_lora=True,
                        lora_rank=8, merge_lora=target == "bf16 merged", verbose=False)
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        got = fresh(x.to(dtype)).float()
    tolerance = 3e-2 * expected.abs().max().item() if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def test_loading_another_rank_is_a_clear_error():
    state = _pruned_mlp(compress=True, rank=8).state_dict()
    model = prune_model(MLP(), compress=True, add_lora=True, lora_rank=16, merge_lora=True, verbose=False)
    with pytest.raises(RuntimeError, match="rank 8 but this model was built with lora_rank=16; pass lora_rank=8"):
        model.load_state_dict(state)


def test_loading_another_sparsity_is_a_clear_error():
    state = prune_model(MLP(), compress=False, sparsity="1:4", add_lora=True, lora_rank=8, verbose=False).state_dict()
    model = prune_model(MLP(), compress=True, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    with pytest.raises(RuntimeError, match="keeps 16 of 64 weights per row but this layer is 2:4"):
        model.load_state_dict(state)
    state = prune_model(MLP(), compress=False, sparsity="4:8", add_lora=True, lora_rank=8, verbose=False).state_dict()
    model = prune_model(MLP(), compress=False, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    with pytest.raises(RuntimeError, match="mask is not 2:4"):
        model.load_state_dict(state)


def test_loading_a_checkpoint_without_adapters_is_a_clear_error():
    state = prune_model(MLP(), compress=True, verbose=False).state_dict()
    model = prune_model(MLP(), compress=True, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    with pytest.raises(RuntimeError, match="has no adapters"):
        model.load_state_dict(state)


# ---------------------------------------------------------------------------- inference-only form
@pytest.mark.parametrize("adapters", [True, False])
def test_freeze_for_inference(adapters):
    model = prune_model(MLP(), compress=True, add_lora=adapters, lora_rank=8 if adapters else 0, verbose=False)
    if adapters:
        _randomize_adapters(model)
    _train(model, steps=1)
    model(torch.randn(4, 64)).sum().backward()  # leave gradients behind, as mid-training
    state = model.state_dict()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    mask_t_bytes = sum(m.mask_t.numel() // 8 for _, m in sparse_modules(model))  # stored as packed bits
    grad_bytes = sum(m.values_grad.numel() * 4 for _, m in sparse_modules(model))
    grad_bytes += sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)

    report = freeze_for_inference(model)

    assert report.gradients_before == grad_bytes > 0 and report.gradients_after == 0
    assert report.buffers_before - report.buffers_after == mask_t_bytes > 0
    assert report.parameters_after == report.parameters_before
    assert report.total_after < report.total_before and "MiB" in str(report)
    assert not any(k.endswith(("mask_t_bits", "meta")) for k in model.state_dict())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    for _, layer in sparse_modules(model):
        assert isinstance(layer, MergedSparseLinear) and layer.inference_only and layer.values_grad is None
        assert all(key[0] == "merged" for key in layer._operands)
    got = model(x)  # no no_grad needed any more
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.load_state_dict(state)  # a training checkpoint (with M_t) still loads
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="dropped by freeze_for_inference"):
        model.fc1.update_mask_t()


# ---------------------------------------------------------------------------- HF generate()
def _llama(tie, bias):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=None, pad_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _dense_equivalent(dense, pruned):
    """Copy each pruned layer's effective weight W⊙M + (α/r)B(A⊙M_A) (and bias) into the dense model."""
    with torch.no_grad():
        for name, layer in sparse_modules(pruned):
            target = dense.get_submodule(name)
            weight = effective_weight(layer)
            target.weight.copy_(weight if isinstance(target, nn.Linear) else weight.t())  # HF Conv1D is (in, out)
            if layer.bias is not None:
                target.bias.copy_(layer.bias)
    return dense


def _generate(model, ids, use_cache=True):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=use_cache)


@pytest.mark.parametrize(
    "build, compress",
    [
        (lambda: _llama(tie=True, bias=False), True),
        (lambda: _llama(tie=False, bias=True), False),
        (_gpt2, True),
    ],
    ids=["llama-tied-nobias-compressed", "llama-untied-bias-simulated", "gpt2-conv1d-bias-compressed"],
)
def test_generate_dense_unmerged_merged_agree(build, compress):
    dense = build().eval()
    pruned = copy.deepcopy(dense)
    prune_model(pruned, compress=compress, add_lora=True, lora_rank=16, verbose=False)
    assert len(list(sparse_modules(pruned))) == (14 if "Llama" in type(dense).__name__ else 8)
    _randomize_adapters(pruned, std=0.5)
    _dense_equivalent(dense, pruned)
    ids = torch.randint(1, 128, (2, 6))
    with torch.no_grad():
        dense_logits = dense(ids).logits
        unmerged_logits = pruned(ids).logits
    expected = _generate(dense, ids)
    unmerged = _generate(pruned, ids)

    merge_lora(pruned)
    with torch.no_grad():
        merged_logits = pruned(ids).logits
    merged = _generate(pruned, ids)
    merged_no_cache = _generate(pruned, ids, use_cache=False)
    freeze_for_inference(pruned)
    frozen = _generate(pruned, ids)

    torch.testing.assert_close(unmerged_logits, dense_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert expected.shape == (2, 14)
    for tokens in (unmerged, merged, merged_no_cache, frozen):
        assert torch.equal(tokens, expected)


def test_tied_embeddings_stay_tied_and_dense():
    model = _llama(tie=True, bias=False)
    prune_model(model, compress=True, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SparseLinear)


def test_llama_bf16_merged_logits_match_unmerged():
    model = _llama(tie=False, bias=False).to(torch.bfloat16)
    prune_model(model, compress=True, add_lora=True, lora_rank=8, verbose=False)
    _randomize_adapters(model)
    ids = torch.randint(1, 128, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits.float()
        got = merge_lora(model)(ids).logits.float()
    assert (got - expected).abs().max().item() <= 3e-2 * expected.abs().max().item()


def test_frozen_layers_keep_the_packed_mask_and_load_new_masks():
    trained = prune_model(MLP(), compress=True, verbose=False)
    _train(trained, steps=2)
    other = prune_model(MLP(), compress=True, verbose=False)  # different weights and masks
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected_trained, expected_other = trained(x), other(x)
    frozen = prune_model(MLP(), compress=True, verbose=False)
    frozen.load_state_dict(trained.state_dict())
    freeze_for_inference(frozen)
    for (_, a), (_, b) in zip(sparse_modules(frozen), sparse_modules(trained)):
        assert a.mask_bits.numel() * 8 == a.mask.numel() and "mask_t_bits" not in a._buffers
        assert torch.equal(a.mask, b.mask)
    state = frozen.state_dict()
    assert all(state[k].dtype == torch.uint8 for k in state if k.endswith(".mask_bits"))
    assert not any(k.endswith("mask_t_bits") for k in state)
    torch.testing.assert_close(frozen(x), expected_trained, rtol=1e-5, atol=1e-5)
    frozen.load_state_dict(other.state_dict())  # new masks reach the packed bits and the operand
    torch.testing.assert_close(frozen(x), expected_other, rtol=1e-5, atol=1e-5)
    for (_, a), (_, b) in zip(sparse_modules(frozen), sparse_modules(other)):
        assert torch.equal(a.mask, b.mask)


def test_frozen_layers_without_adapters_share_the_weights_with_their_operand():
    model = prune_model(MLP(), compress=True, verbose=False)  # reference backend on CPU
    _train(model, steps=1)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    freeze_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    for _, layer in sparse_modules(model):
        (_, (values, meta), _), = layer._operands.values()  # the one cached operand: (values, meta)
        assert values.data_ptr() == layer.values.data_ptr()  # no second copy of the kept weights
        with torch.no_grad():
            layer.values.mul_(2)  # an in-place change reaches the output (version-keyed cache)
    with torch.no_grad():
        w1, w2 = effective_weight(model.fc1), effective_weight(model.fc2)
        oracle = F.linear(torch.relu(F.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias)
        torch.testing.assert_close(model(x), oracle, rtol=1e-5, atol=1e-5)
