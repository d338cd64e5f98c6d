"""``prune_model``: layer replacement (nn.Linear and HF GPT-2 Conv1D), skip rules and summary,
state_dict round trips, and clear errors."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from slope import SparseLinear, prune_model, sparse_modules
from slope.masks import is_nm_sparse


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


class Toy(nn.Module):
    """An embedding, a tied head with an unusual name, a vocabulary head, a non-divisible layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.fc1 = nn.Linear(32, 64)
        self.odd = nn.Linear(64, 30)
        self.fc2 = nn.Linear(30, 32, bias=False)
        self.decoder = nn.Linear(32, 40, bias=False)
        self.decoder.weight = self.embed.weight
        self.lm_head = nn.Linear(32, 40)

    def forward(self, ids):
        h = self.fc2(torch.relu(self.odd(torch.relu(self.fc1(self.embed(ids))))))
        return self.lm_head(h) + self.decoder(h)


@pytest.mark.parametrize("compress", [False, True])
def test_gpt2_conv1d_pruned_and_equal_to_masked_dense(compress):
    model = _gpt2()
    dense = copy.deepcopy(model)
    assert prune_model(model, compress=compress, verbose=False) is model
    pruned = dict(sparse_modules(model))
    assert sorted(pruned) == sorted(
        f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    for name, layer in pruned.items():
        conv = dense.get_submodule(name)
        assert layer.mask.shape == conv.weight.t().shape and is_nm_sparse(layer.mask, 2, 4, exact=True)
        assert layer.compress == compress
        with torch.no_grad():
            conv.weight.copy_(layer.dense_weight().t())  # Conv1D holds (in, out)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    # and it trains: the sparse gradients reach every pruned layer
    model(ids, labels=ids).loss.backward()
    assert all(layer.values_grad is not None for layer in pruned.values())


def test_default_skips_are_shown_in_summary(capsys):
    model = Toy()
    prune_model(model, compress=False)
    printed = capsys.readouterr().out
    decisions = {d.name: d for d in model.slope_prune_summary}
    assert set(decisions) == {"fc1", "odd", "fc2", "decoder", "lm_head"}
    assert decisions["fc1"].pruned and isinstance(model.fc1, SparseLinear)
    for name, reason in [("lm_head", "vocabulary"), ("decoder", "tied"), ("odd", "divisible"), ("fc2", "divisible")]:
        assert not decisions[name].pruned and reason in decisions[name].reason
        assert isinstance(getattr(model, name), nn.Linear) and not isinstance(getattr(model, name), SparseLinear)
        assert name in printed and reason in printed
    assert "1 of 5 linear layers pruned" in printed


def test_targets_and_skip_patterns():
    model = nn.Sequential()
    model.add_module("block", nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16), "mlp": nn.Linear(16, 32)}))
    model.add_module("head", nn.Linear(32, 8))
    prune_model(model, compress=False, targets=["q", "block.mlp"], verbose=False)
    assert {name for name, _ in sparse_modules(model)} == {"block.q", "block.mlp"}

    model2 = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8))
    prune_model(model2, compress=False, skip=["1", "*2"], verbose=False)
    assert [name for name, _ in sparse_modules(model2)] == ["0"]
    assert [d.reason for d in model2.slope_prune_summary if not d.pruned] == ["skip pattern", "skip pattern"]


def test_state_dict_round_trip_into_fresh_pruned_model():
    model = _gpt2(seed=0)
    prune_model(model, compress=True, verbose=False)
    with torch.no_grad():  # make the sparse weights differ from anything a fresh init could give
        for _, layer in sparse_modules(model):
            layer.values.add_(0.01)
    state = model.state_dict()
    keys = [k for k in state if k.startswith("transformer.h.0.attn.c_attn.")]
    assert {k.rpartition(".")[2] for k in keys} == {"values", "mask_bits", "mask_t_bits", "bias"}
    fresh = _gpt2(seed=1)
    prune_model(fresh, compress=True, verbose=False)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, model(ids).logits)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    for (_, a), (_, b) in zip(sparse_modules(model), sparse_modules(fresh)):
        assert torch.equal(a.mask_t, b.mask_t)


def test_transposable_and_exact_backward_options():
    model = prune_model(nn.Sequential(nn.Linear(16, 8)), compress=False, mask_type="transposable", verbose=False)
    layer = model[0]
    assert is_nm_sparse(layer.mask, 2, 4, dim=0, exact=True) and is_nm_sparse(layer.mask, 2, 4, dim=1, exact=True)
    assert torch.equal(layer.mask_t, layer.mask)
    model = prune_model(nn.Sequential(nn.Linear(16, 8)), compress=False, double_pruning=False, tiling=False, verbose=False)
    assert torch.equal(model[0].mask_t, model[0].mask)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: prune_model(Toy(), compress=False, targets=["odd"]), ValueError, r"'odd'.*divisible by M=4"),
        (lambda: prune_model(Toy(), compress=False, targets=["fc1", "decoder"]), ValueError, "'decoder'.*tied"),
        (lambda: prune_model(Toy(), sparsity="4:4"), ValueError, "0 < N < M"),
        (lambda: prune_model(Toy(), sparsity="5:4"), ValueError, "0 < N < M"),
        (lambda: prune_model(Toy(), sparsity="two:four"), ValueError, "'N:M'"),
        (lambda: prune_model(Toy().double(), compress=True), TypeError, r"'fc1'.*float64.*compress=False"),
        (lambda: prune_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), ValueError, "no nn.Linear"),
        (lambda: prune_model(Toy(), compress=True, backend="magic"), ValueError, "unknown backend 'magic'"),
        (lambda: prune_model(Toy(), compress=True, sparsity="2:8"), ValueError, "2:4 only.*compress=False"),
        (lambda: prune_model(Toy(), compress=False, backend="reference"), ValueError, "compress=True"),
        (lambda: prune_model(Toy(), compress=True, double_pruning=False), ValueError, "compress=False"),
        (lambda: prune_model(Toy(), mask_type="random"), ValueError, "mask_type"),
        (lambda: prune_model(Toy(), skip=["fc1"]), ValueError, "pruned none"),
        (lambda: prune_model(Toy(), merge_lora=True), ValueError, "add_lora"),
        (lambda: prune_model(Toy(), add_lora=True, lora_rank=0), ValueError, "lora_rank"),
        (lambda: prune_model(Toy(), lora_rank=4), ValueError, r"^lora_rank=4 attaches no adapters without add_lora=True"),
        (lambda: prune_model(Toy(), lora_alpha=8.0), ValueError, r"^lora_alpha=8.0 attaches no adapters without add_lora"),
    ],
)
def test_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lora_rank_without_savings_warns():
    """An adapter of rank >= min(in, out) holds as many weights as a dense update: said once, still attached."""
    layer = prune_model(nn.Sequential(nn.Linear(32, 16)), verbose=False)[0]
    with pytest.warns(UserWarning, match=r"lora rank 16 >= min\(in, out\) = 16 gives no low-rank savings"):
        layer.add_lora(16)
    assert layer.lora_rank == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_model(nn.Sequential(nn.Linear(32, 16)), verbose=False)[0].add_lora(15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU failure mode")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_backend_on_cpu_fails_at_prune_time(backend):
    """Said when pruning (naming the missing GPU), not as a dtype complaint at the first forward."""
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run on this machine \\(no CUDA GPU\\).*needs a CUDA device"):
        prune_model(model, compress=True, backend=backend, verbose=False)
    assert isinstance(model[0], nn.Linear)  # left as it was


def test_second_prune_and_meta_models_are_clear_errors():
    model = prune_model(Toy(), compress=False, verbose=False)
    with pytest.raises(ValueError, match="Toy is already pruned .* runs once per model"):
        prune_model(model, compress=False, verbose=False)
    with pytest.raises(ValueError, match="already pruned .*'fc1'"):
        prune_model(model, compress=False, targets=["fc1"], verbose=False)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="'0' .* meta device: it has no weights to prune yet"):
        prune_model(meta, verbose=False)


def test_multihead_attention_out_proj_is_left_dense():
    """nn.MultiheadAttention reads out_proj.weight directly: pruning it would silently drop its gradient."""
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    prune_model(enc, compress=False, verbose=False)
    assert type(enc.self_attn.out_proj) is not SparseLinear
    assert {name for name, _ in sparse_modules(enc)} == {"linear1", "linear2"}
    enc(torch.randn(2, 5, 16)).sum().backward()
    assert enc.linear1.values_grad is not None and enc.self_attn.out_proj.weight.grad is not None
    with pytest.raises(ValueError, match="out_proj.*MultiheadAttention"):
        prune_model(nn.TransformerEncoderLayer(16, 2, 32), compress=False, targets=["out_proj"], verbose=False)


def test_failed_prune_leaves_model_untouched():
    model = Toy()  # fc1 comes before the failing layer
    with pytest.raises(ValueError, match="'odd'"):
        prune_model(model, compress=False, targets=["fc1", "odd"])
    assert type(model.fc1) is nn.Linear and not list(sparse_modules(model))
    mixed = Toy()
    mixed.fc2 = nn.Linear(64, 32).double()
    with pytest.raises(TypeError, match="'fc2'"):
        prune_model(mixed, compress=True, skip=["odd"])
    assert type(mixed.fc1) is nn.Linear


# ---------------------------------------------------------------------------------------------- PEFT-like targets
def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))


def _peft_list_rule(name, targets):
    """PEFT's ``target_modules`` list rule (``check_target_module_exists``): exact name or dotted suffix."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def _pruned_names(targets):
    model = _llama()
    prune_model(model, compress=False, targets=targets, verbose=False)
    return {name for name, _ in sparse_modules(model)}


def test_targets_follow_peft_semantics():
    import re

    linear = [name for name, m in _llama().named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for targets in (["q_proj", "v_proj"], ["mlp.down_proj"], ["layers.1.self_attn.o_proj", "gate_proj"], projections):
        assert _pruned_names(targets) == {n for n in linear if _peft_list_rule(n, targets)}, targets
    # PEFT's string form (a regex that must match the full name) is written 're:<regex>'
    regex = r".*\.(q|v)_proj"
    assert _pruned_names("re:" + regex) == {n for n in linear if re.fullmatch(regex, n)} == _pruned_names(["q_proj", "v_proj"])
    # globs match the full name or a dotted suffix: 'mlp.*' is every layer under an mlp
    assert _pruned_names(["mlp.*"]) == {n for n in linear if ".mlp." in n} != set()
    assert _pruned_names(["layers.0.*"]) == {n for n in linear if n.startswith("model.layers.0.")}
    assert _pruned_names(["*_proj"]) == set(linear)
    with pytest.raises(ValueError, match="pruned none"):  # a regex must match the whole name
        _pruned_names(["re:mlp.*"])


def test_target_pattern_errors_and_warnings():
    with pytest.warns(UserWarning, match=r"targets \['qproj'\] match no linear layer"):
        assert _pruned_names(["q_proj", "qproj"]) != set()
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _pruned_names(["re:(q"])
    with pytest.raises(TypeError, match="non-empty strings"):
        _pruned_names([3])
    model = _llama()
    prune_model(model, compress=False, skip=["re:.*layers\\.1\\..*", "mlp.*"], verbose=False)
    assert {name for name, _ in sparse_modules(model)} == {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
