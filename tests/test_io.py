"""``slope.save_pretrained`` / ``slope.from_pretrained`` round trips and ``slope.export_dense``."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
)

import slope  # noqa: E402
from slope import export_dense, from_pretrained, prune_model, save_pretrained, sparse_modules  # noqa: E402
from slope.lora import MergedSparseLinear, merge_lora  # noqa: E402
from slope.masks import is_nm_sparse  # noqa: E402

VOCAB = 128
CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=64),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64),
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def auto_class(arch):
    return AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM


def trained_like(model):
    """Perturb every parameter (and give adapters a nonzero B) so nothing equals a fresh init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for _, layer in sparse_modules(model):
            if layer.lora_rank:
                layer.lora_A.mul_(layer.lora_A_mask)
            layer.refresh()
    return model


def tiny(arch="llama", dtype=torch.float32, **prune_kwargs):
    model = auto_class(arch).from_config(CONFIGS[arch]()).to(dtype)
    prune_model(model, verbose=False, **{"compress": True, **prune_kwargs})
    return trained_like(model).eval()


@torch.no_grad()
def logits(model):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    return model(input_ids=ids).logits


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "arch,dtype,kwargs",
    [
        ("llama", torch.float32, {}),
        ("llama", torch.bfloat16, {"add_lora": True, "lora_rank": 8, "lora_alpha": 16.0}),
        ("gpt2", torch.float32, {"add_lora": True, "lora_rank": 4}),  # Conv1D, tied lm_head
        ("bert", torch.bfloat16, {}),
        ("opt", torch.float32, {"compress": False, "sparsity": "1:4", "double_pruning": False}),
    ],
    ids=["llama-fp32", "llama-bf16-lora", "gpt2-lora", "bert-bf16", "opt-sim-1:4"],
)
def test_round_trip_is_exact(arch, dtype, kwargs, tmp_path):
    model = tiny(arch, dtype, **kwargs)
    save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["slope_config"]["version"] == 2
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert_same_state(model, loaded)
    for (name, a), (name_b, b) in zip(sparse_modules(model), sparse_modules(loaded), strict=True):
        assert name == name_b
        assert (a.n, a.m, a.compress, a.double_pruning, a.mask_type, a.lora_rank) == \
               (b.n, b.m, b.compress, b.double_pruning, b.mask_type, b.lora_rank)
        if a.lora_rank:
            assert a.lora_scaling == b.lora_scaling
    assert torch.equal(logits(model), logits(loaded))
    if arch == "gpt2":  # the tie survives
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_loading_counts_each_mask_once(tmp_path, monkeypatch):
    """from_pretrained of a compressed model rebuilds values from the dense form and loads
    them: each layer's mask is checked to be N:M once (not again by gather, scatter, the load or
    the first forward)."""
    import slope.layer
    import slope.serialization.dense_form as dense_form

    model = tiny("llama")
    save_pretrained(model, tmp_path)
    counted, unchecked, real_offsets = [], [], dense_form._kept_offsets
    real_is_nm = slope.layer.is_nm_sparse
    monkeypatch.setattr(slope.layer, "is_nm_sparse", lambda *a, **k: counted.append(1) or real_is_nm(*a, **k))

    def kept_offsets(mask, n, m, checked=False):
        unchecked.extend([] if checked else [1])
        return real_offsets(mask, n, m, checked)

    monkeypatch.setattr(dense_form, "_kept_offsets", kept_offsets)
    loaded = from_pretrained(tmp_path)
    layers = [layer for _, layer in sparse_modules(loaded)]
    assert len(counted) == len(layers) == 7 and not unchecked
    assert all(layer._validated_mask == layer._mask_key() for layer in layers)
    assert torch.equal(logits(model), logits(loaded))


def test_round_trip_mixed_arguments_and_merged_form(tmp_path):
    model = AutoModelForCausalLM.from_config(CONFIGS["mistral"]())
    prune_model(model, compress=True, targets=["*.mlp.*"], add_lora=True, lora_rank=4, verbose=False)
    prune_model(model, compress=False, sparsity="2:8", targets=["*.self_attn.*"], verbose=False)
    trained_like(model).eval()
    merge_lora(model)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert_same_state(model, loaded)
    kinds = {name: (type(layer), layer.n, layer.m, layer.compress, layer.lora_rank) for name, layer in sparse_modules(loaded)}
    assert kinds == {name: (type(layer), layer.n, layer.m, layer.compress, layer.lora_rank)
                     for name, layer in sparse_modules(model)}
    assert any(t is MergedSparseLinear for t, *_ in kinds.values())
    assert torch.equal(logits(model), logits(loaded))
    # the saved backend can be overridden for the compressed layers (the simulated ones keep "auto")
    loaded = from_pretrained(tmp_path, backend="reference")
    assert {(layer.compress, layer.backend_name) for _, layer in sparse_modules(loaded)} == {(True, "reference"), (False, "auto")}
    assert torch.equal(logits(model), logits(loaded))


def test_round_trip_keeps_mixed_dtypes(tmp_path):
    model = tiny("llama", torch.bfloat16)
    model.model.norm.float()  # an fp32 head on a bf16 body
    model.lm_head.float()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == loaded.model.norm.weight.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_state(model, loaded)
    assert torch.equal(logits(model), logits(loaded))


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_export_dense_loads_with_plain_transformers(arch, tmp_path):
    model = tiny(arch, add_lora=arch in ("llama", "gpt2"), lora_rank=4 if arch in ("llama", "gpt2") else 0)
    export_dense(model, tmp_path)
    assert not os.path.exists(tmp_path / "slope_config.json")
    dense = auto_class(arch).from_pretrained(tmp_path)
    assert not list(sparse_modules(dense))
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-5, atol=1e-5)
    for name, layer in sparse_modules(model):
        weight = dense.get_submodule(name).weight
        if type(dense.get_submodule(name)).__name__ == "Conv1D":
            weight = weight.t()
        if layer.lora_rank:
            assert not is_nm_sparse(weight != 0, 2, 4)  # the adapters are merged in
            torch.testing.assert_close(weight, slope.lora.effective_weight(layer))
        else:
            assert torch.equal(weight, layer.dense_weight())


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_and_corrupt_files(tmp_path):
    model = tiny("llama")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere")
    export_dense(model, tmp_path / "plain")
    with pytest.raises(ValueError, match="plain Hugging Face folder.*AutoModelForCausalLM"):
        from_pretrained(tmp_path / "plain")

    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        from_pretrained(ckpt)
    weights.write_bytes(data)
    config = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(ckpt)
    broken = json.loads(config)
    del next(iter(broken["slope_config"]["layers"].values()))["mask_type"]
    (ckpt / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"lacks \['mask_type'\]"):
        from_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        from_pretrained(ckpt)


def test_config_mismatch_is_an_error(tmp_path):
    save_pretrained(tiny("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match config.json"):
        from_pretrained(tmp_path)

    config["intermediate_size"] = 128
    record = config["slope_config"]
    record["layers"]["model.layers.7.mlp.up_proj"] = next(iter(record["layers"].values()))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not exist in the model"):
        from_pretrained(tmp_path)


def test_needs_a_pruned_hf_model(tmp_path):
    with pytest.raises(TypeError, match="Hugging Face model"):
        save_pretrained(torch.nn.Linear(8, 8), tmp_path)
    with pytest.raises(ValueError, match="no SLoPe layers"):
        save_pretrained(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    with pytest.raises(ValueError, match="no SLoPe layers"):
        export_dense(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
