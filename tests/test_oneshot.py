"""slope.oneshot end to end: recipes, block-by-block calibration on each architecture against full
forwards, saving / reloading, prune_model on the result, bad inputs, and the CLI."""
import json

import pytest
import torch
import torch.nn as nn
import transformers as T

import slope
from slope.cli import main
from slope.masks import is_nm_sparse
from slope.pruning import RecipeError, oneshot, parse_recipe
from slope.pruning.calibration import BlockRunner, CalibrationError, LayerStats, attach_stats, calibration_samples, capture_block_calls
from slope.pruning.layers import find_blocks, is_linear, match_targets, read_weight, select_layers
from slope.pruning.loading import shipped_tokenizer
from slope.pruning.sparsegpt import sparsegpt_prune
from slope.pruning.wanda import wanda_mask

SEED_RECIPE = """
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      block_size: 128
      sequential_update: False
      quantize: False
      targets: [
        "re:model.layers.\\\\d+$"
      ]
"""
SEED_OWL_RECIPE = """
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      sparsity_profile: "OWL"
      owl_m: 5
      owl_lmbda: 0.08
      block_size: 128
      sequential_update: False
      quantize: False
      targets: [
        "re:model.layers.\\\\d+$"
      ]
"""


def recipe(name, **params):
    return {"pruning_stage": {"pruning_modifiers": {name: params}}}


def tiny_llama(vocab=64, hidden=32, layers=2, heads=4, dtype=torch.float32):
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=64)
    return T.LlamaForCausalLM(config).to(dtype).eval()


ARCHS = {
    "llama": tiny_llama,
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=8)),
    "qwen2-sliding": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(  # layers of two attention types (per-block masks)
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, max_position_embeddings=64)),
}


def token_ids(n=4, length=16, vocab=64):
    return torch.randint(0, vocab, (n, length))


def block_linears(model):
    name, blocks = find_blocks(model)
    return {n: m for n, m in model.named_modules() if n.startswith(name + ".") and is_linear(m)}


# ---------------------------------------------------------------------- calibration on each architecture
@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_replay_gives_the_statistics_of_a_full_forward(arch):
    """Replaying block by block (dense) sees exactly the inputs a whole-model forward gives each linear."""
    model = ARCHS[arch]().eval()
    samples = [row[None] for row in token_ids()]
    linears = block_linears(model)
    full = {n: LayerStats(n, read_weight(m).shape[1], "norms", torch.device("cpu")) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, a, o, s=full[n]: s.add(a[0])) for n, m in linears.items()]
    with torch.no_grad():
        for s in samples:
            model(input_ids=s)
    for h in handles:
        h.remove()
    _, blocks = find_blocks(model)
    hidden, calls = capture_block_calls(model, blocks, samples, torch.device("cpu"))
    runner = BlockRunner(blocks, calls)
    plans, _ = select_layers(model, slope.pruning.WandaPruningModifier(sparsity=0.5))
    assert {p.name for p in plans} == set(linears)
    for k in range(len(blocks)):
        stats, handles = attach_stats([p for p in plans if p.block == k], "norms", torch.device("cpu"))
        hidden = runner.run(k, hidden)
        for h in handles:
            h.remove()
        for name, s in stats.items():
            torch.testing.assert_close(s.squared_norms(), full[name].squared_norms(), rtol=1e-5, atol=1e-5)
            assert s.tokens == full[name].tokens == 4 * 16


@pytest.mark.parametrize("arch", list(ARCHS))
def test_oneshot_wanda_2to4_on_every_architecture(arch):
    model = ARCHS[arch]().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    oneshot(model, recipe("WandaPruningModifier", mask_structure="2:4"), dataset=token_ids(), verbose=False)
    linears = block_linears(model)
    for name, module in linears.items():
        weight = read_weight(module)  # (out, in), also for GPT-2's Conv1D
        assert is_nm_sparse(weight != 0, 2, 4, exact=True), name
    pruned = {n + ".weight" for n in linears}
    for name, p in model.named_parameters():  # embeddings, norms, biases, heads untouched
        if name not in pruned:
            assert torch.equal(p, before[name]), name
    assert model.slope_oneshot_report["pruned_layers"] == len(linears)


# ---------------------------------------------------------------------- the pipeline against full forwards
def _reference_pipeline(model, samples, prune, kind, propagate):
    """Slow and obvious: statistics from hooks during whole-model forwards; when ``propagate``, one
    forward per block, after pruning the blocks before it; else one forward of the dense model."""
    _, blocks = find_blocks(model)
    groups = [[(n, m) for n, m in block.named_modules() if is_linear(m)] for block in blocks]
    rounds = [[g] for g in groups] if propagate else [groups]
    for round_ in rounds:
        layers = [(n, m) for g in round_ for n, m in g]
        stats = {id(m): LayerStats(n, read_weight(m).shape[1], kind, torch.device("cpu")) for n, m in layers}
        handles = [m.register_forward_hook(lambda mod, a, o: stats[id(mod)].add(a[0])) for _, m in layers]
        with torch.no_grad():
            for s in samples:
                model(input_ids=s[None])
        for h in handles:
            h.remove()
        new = {id(m): prune(read_weight(m), stats[id(m)]) for _, m in layers}
        with torch.no_grad():
            for _, m in layers:
                read_weight(m).copy_(new[id(m)])


@pytest.mark.parametrize("name,params,kind,propagate", [
    ("WandaPruningModifier", {"sparsity": 0.5}, "norms", True),
    ("SparseGPTModifier", {"mask_structure": "2:4", "sequential_update": True, "block_size": 16}, "hessian", True),
    ("SparseGPTModifier", {"sparsity": 0.6, "sequential_update": False, "block_size": 16}, "hessian", False),
])
def test_pipeline_matches_whole_model_reference(name, params, kind, propagate):
    model = tiny_llama()
    ref = tiny_llama()
    ref.load_state_dict(model.state_dict())
    samples = token_ids(3, 16)
    oneshot(model, recipe(name, **params), dataset=samples, verbose=False)
    if kind == "norms":
        def prune(w, s):
            return w * wanda_mask(w, s.squared_norms(), 0.5)
    else:
        structure = (2, 4) if "mask_structure" in params else None
        def prune(w, s):
            return sparsegpt_prune(w, s.hessian(), params.get("sparsity", 0.5), structure, 16, 0.01)[0]
    _reference_pipeline(ref, samples, prune, kind, propagate)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name,params", [("WandaPruningModifier", {"sparsity": 0.5}),
                                         ("SparseGPTModifier", {"sparsity": 0.5, "sequential_update": False})])
def test_calibration_holds_one_block_of_activations(name, params):
    """At any time the pipeline holds at most two blocks' worth of hidden states (a block's inputs and
    its outputs, for every sample): a block whose pruned outputs feed the next does not also keep its
    dense outputs while the pruned ones are computed."""
    import weakref

    model, samples = tiny_llama(layers=3), token_ids(4, 16)
    live, peak = [], [0]

    def count(module, args, out):
        live.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
        peak[0] = max(peak[0], sum(r() is not None for r in live))

    for block in model.model.layers:
        block.register_forward_hook(count)
    oneshot(model, recipe(name, **params), dataset=samples, verbose=False)
    assert 0 < peak[0] <= 2 * len(samples)


@pytest.mark.parametrize("name", ["SparseGPTModifier", "WandaPruningModifier"])
def test_a_linear_no_calibration_token_reaches_is_pruned_by_magnitude(name):
    """A linear the calibration forward never runs (an expert the router never chose) has no
    statistics: it is pruned by magnitude, with a warning, not zeroed whole (SparseGPT's dead inputs)."""
    model = tiny_llama()
    unused = model.model.layers[0].mlp.unused = nn.Linear(32, 16)  # inside a block, never called
    original = unused.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"no calibration token reached model.layers.0.mlp.unused; pruned by magnitude"):
        oneshot(model, recipe(name, mask_structure="2:4"), dataset=token_ids(), verbose=False)
    expected = slope.masks.nm_mask(original, 2, 4)
    assert torch.equal(unused.weight.detach(), original * expected)
    rows = {r["name"]: r for r in model.slope_oneshot_report["layers"]}
    assert rows["model.layers.0.mlp.unused"]["modifier"] == "MagnitudePruningModifier"
    assert rows["model.layers.0.mlp.up_proj"]["modifier"] == name


# ---------------------------------------------------------------------- recipes
def test_seed_recipes_work_verbatim_and_with_mask_structure():
    model = tiny_llama()
    oneshot(model, SEED_RECIPE, dataset=token_ids(), verbose=False)
    assert {round(r["zeros"], 2) for r in model.slope_oneshot_report["layers"]} == {0.5}
    model = tiny_llama()
    oneshot(model, SEED_RECIPE.replace("block_size: 128", 'block_size: 128\n      mask_structure: "2:4"'),
            dataset=token_ids(), verbose=False)
    assert all(is_nm_sparse(read_weight(m) != 0, 2, 4, exact=True) for m in block_linears(model).values())
    model = tiny_llama()
    oneshot(model, SEED_OWL_RECIPE, dataset=token_ids(), verbose=False)
    report = model.slope_oneshot_report
    per_block = {r["name"].split(".")[2]: r["target"] for r in report["layers"]}
    assert len(set(per_block.values())) > 1 and max(per_block.values()) - min(per_block.values()) == pytest.approx(0.16)
    assert report["zero_fraction"] == pytest.approx(0.5, abs=0.01)  # linears differ in size; block means are 0.5


def test_recipe_forms_order_targets_and_ignore(tmp_path):
    text = ("s1:\n  g:\n    MagnitudePruningModifier: {sparsity: 0.3, targets: Linear, ignore: ['re:.*mlp']}\n"
            "s2:\n  run_type: oneshot\n  g:\n    WandaPruningModifier: {mask_structure: '4:8', targets: ['model.layers.1']}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for form in (text, str(path), path):
        entries = parse_recipe(form)
        assert [e.where for e in entries] == ["s1.g.MagnitudePruningModifier", "s2.g.WandaPruningModifier"]
    model = tiny_llama()
    plans, skipped = select_layers(model, entries[0].modifier)
    assert {p.name.split(".", 3)[-1] for p in plans} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert {s.reason for s in skipped} >= {"ignored by the recipe"}
    assert any(s.name == "lm_head" and "vocabulary" in s.reason for s in skipped)  # 'Linear' selects it; default skip
    oneshot(model, text, dataset=token_ids(), verbose=False)
    by_name = {r["name"]: r for r in model.slope_oneshot_report["layers"]}
    assert by_name["model.layers.0.self_attn.q_proj"]["modifier"] == "MagnitudePruningModifier"
    assert by_name["model.layers.1.mlp.up_proj"]["structure"] == "4:8"
    assert "model.layers.0.mlp.up_proj" not in by_name
    assert parse_recipe(slope.pruning.recipe.recipe_yaml(entries))[1].modifier == entries[1].modifier


BAD_RECIPES = [
    (recipe("SparseGPTModifier", sparsity=0.5, quantize=True), "not supported"),
    (recipe("GPTQModifier", bits=4), "quantization"),
    (recipe("ConstantPruningModifier", start=0), "fine-tuning modifier"),
    (recipe("FancyModifier"), "not a known modifier"),
    (recipe("SparseGPTModifier", sparsity=0.5, blocksize=64), "unknown parameter.*blocksize"),
    (recipe("WandaPruningModifier", sparsity=1.0), r"\[0, 1\)"),
    (recipe("WandaPruningModifier", sparsity=-0.1), r"\[0, 1\)"),
    (recipe("WandaPruningModifier", sparsity="half"), r"\[0, 1\)"),
    (recipe("WandaPruningModifier", mask_structure="4:4"), "0 < N < M"),
    (recipe("WandaPruningModifier", mask_structure="8:4"), "0 < N < M"),
    (recipe("WandaPruningModifier", sparsity=0.7, mask_structure="2:4"), "disagrees"),
    (recipe("WandaPruningModifier"), "give `sparsity`"),
    (recipe("WandaPruningModifier", sparsity=0.5, sparsity_profile="owl", mask_structure="2:4"), "owl"),
    (recipe("WandaPruningModifier", sparsity=0.5, sparsity_profile="magic"), "sparsity_profile"),
    (recipe("SparseGPTModifier", mask_structure="4:8", block_size=12), "multiple of M=8"),
    (recipe("SparseGPTModifier", sparsity=0.5, dampening_frac=-1), "dampening_frac"),
    (recipe("SparseGPTModifier", sparsity=0.5, targets=[]), "targets"),
    (recipe("SparseGPTModifier", sparsity=0.5, targets=["re:model.layerz.\\d+$"]), "matches no module"),
    (recipe("SparseGPTModifier", sparsity=0.5, ignore=["re:(unclosed"]), "not a valid regex"),
    (recipe("SparseGPTModifier", sparsity=0.5, ignore=["model.layers.9"]), "matches no module"),
    ("s:\n  g:\n    WandaPruningModifier: {mask_structure: 2:4}\n", "quote it"),
    ({}, "holds no modifiers"),
    ("just: [a, list", "not valid YAML"),
    ("missing_recipe.yaml", "not found"),
    ({"stage": {"group": ["SparseGPTModifier"]}}, "must map modifier names"),
    ({"stage": {"run_type": "train", "g": {"SparseGPTModifier": {"sparsity": 0.5}}}}, "run_type"),
]


@pytest.mark.parametrize("bad,match", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_recipes_are_clear_errors_and_change_nothing(bad, match, tmp_path):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=match) as info:
        oneshot(model, bad, dataset=token_ids(), output_dir=tmp_path / "out", verbose=False)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_bad_calibration_and_outputs(tmp_path):
    model = tiny_llama()
    r = recipe("WandaPruningModifier", sparsity=0.5)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        oneshot(model, r, verbose=False)
    with pytest.raises(CalibrationError, match="empty"):
        oneshot(model, r, dataset=[""], tokenizer=shipped_tokenizer(), verbose=False)
    with pytest.raises(CalibrationError, match="empty"):
        oneshot(model, r, dataset=torch.zeros(0, dtype=torch.int64), verbose=False)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        oneshot(model, r, dataset=["some text"], verbose=False)
    with pytest.raises(CalibrationError, match="positive integer"):
        oneshot(model, r, dataset=token_ids(), num_calibration_samples=0, verbose=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for ids in (torch.randint(60, 100, (2, 8)), torch.full((2, 8), -1)):  # token ids the model's 64 embeddings lack
        with pytest.raises(CalibrationError, match="outside the model's vocabulary .ids 0 to 63.*not the model's"):
            oneshot(model, r, dataset=ids, verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="max_seq_length = 128 tokens exceeds the model.s 64 positions"):
        oneshot(model, r, dataset=torch.randint(0, 64, (1000,)), max_seq_length=128, verbose=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        oneshot(model, r, dataset=token_ids(), output_dir=tmp_path / "full", verbose=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(TypeError, match="save_pretrained"):
        oneshot(model, r, dataset=token_ids(), tokenizer=shipped_tokenizer()._tokenizer, output_dir=tmp_path / "o", verbose=False)
    # magnitude pruning needs no data at all, nor transformer blocks
    oneshot(model, recipe("MagnitudePruningModifier", sparsity=0.5), verbose=False)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    oneshot(mlp, recipe("MagnitudePruningModifier", mask_structure="2:4"), verbose=False)
    assert is_nm_sparse(mlp[0].weight != 0, 2, 4, exact=True) and is_nm_sparse(mlp[2].weight != 0, 2, 4, exact=True)
    with pytest.raises(RecipeError, match="no nn.ModuleList"):
        oneshot(mlp, recipe("WandaPruningModifier", sparsity=0.5), dataset=token_ids(), verbose=False)
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    with pytest.raises(RecipeError, match="encoder-decoder model cannot do.*use MagnitudePruningModifier"):
        oneshot(t5, recipe("SparseGPTModifier", sparsity=0.5), dataset=token_ids(), verbose=False)
    oneshot(t5, recipe("MagnitudePruningModifier", sparsity=0.5), verbose=False)


def test_cli_oneshot_with_a_tokenizer_not_the_models_is_one_line(tmp_path, capsys):
    tiny_llama(vocab=64).save_pretrained(tmp_path / "dense")  # 64 embeddings; the shipped tokenizer has 4096 ids
    shipped_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "r.yaml").write_text("s:\n  g:\n    WandaPruningModifier: {mask_structure: '2:4'}\n")
    assert main(["oneshot", "--model", str(tmp_path / "dense"), "--recipe", str(tmp_path / "r.yaml"), "--dataset", "embedded",
                 "--output-dir", str(tmp_path / "out"), "--num-calibration-samples", "2", "--max-seq-len", "16"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "slope oneshot" in line]  # (transformers' load bars aside)
    assert len(lines) == 1 and "error: calibration token id" in lines[0] and "outside the model's vocabulary" in lines[0]
    assert not (tmp_path / "out").exists()


def test_calibration_windows():
    stream = torch.arange(100)
    windows = calibration_samples(stream, None, 3, 10)
    assert [w.tolist()[0][0] for w in windows] == [0, 30, 60] and all(w.shape == (1, 10) for w in windows)
    assert calibration_samples(stream, None, 50, 200)[0].shape == (1, 100)  # shorter than a window: one sample
    assert [w.shape for w in calibration_samples(torch.ones(4, 30, dtype=torch.int64), None, 2, 16)] == [(1, 16), (1, 16)]
    tok = shipped_tokenizer()
    text = calibration_samples(["def f(x):\n    return x\n"] * 20, tok, 4, 8)
    assert len(text) == 4 and all(w.shape == (1, 8) for w in text)
    ids = tok("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.cat([w[0] for w in text]).tolist() == (ids * 20)[:32]


def test_named_calibration_data_comes_from_the_training_split_only():
    """Calibration on "embedded" never reads the text slope eval holds out: with slope's tokenizer its
    windows are the first windows of the training stream of slope train (48 × 512 tokens reach past
    the first validation chunk, tokens 20480-22527 of the whole stream)."""
    from slope.data import load_splits

    splits = load_splits("embedded", 512)
    windows = calibration_samples("embedded", shipped_tokenizer(), 48, 512)
    assert len(windows) == 48
    assert torch.equal(torch.cat([w[0] for w in windows]), splits.train[: 48 * 512])


def test_non_divisible_layers_are_skipped_with_a_note():
    model = tiny_llama(hidden=36, heads=2)  # in_features 36: not divisible by 8; down_proj (in 64) is
    oneshot(model, recipe("SparseGPTModifier", mask_structure="4:8", block_size=8), dataset=token_ids(), verbose=False)
    report = model.slope_oneshot_report
    assert sorted(r["name"] for r in report["layers"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(report["skipped"]) == 12 and all("not divisible by M=8" in s["reason"] for s in report["skipped"])


def test_fused_moe_experts_are_reported_as_left_dense():
    """transformers 5 stores Mixtral's experts as fused 3-D tensors, not linears: one-shot pruning leaves
    them dense and says so in the report (they are most of the block's weights), unless targets /
    ignore leave them out."""
    model = T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)).eval()
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    oneshot(model, recipe("WandaPruningModifier", mask_structure="2:4"), dataset=token_ids(), verbose=False)
    skipped = {s["name"]: s for s in model.slope_oneshot_report["skipped"]}
    assert set(skipped) == set(experts) and all("fused MoE experts (4 of" in s["reason"] for s in skipped.values())
    assert skipped["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == (4 * 128, 32)
    assert all(torch.equal(p, experts[n]) for n, p in model.named_parameters() if n in experts)
    for params in ({"targets": ["re:.*self_attn"]}, {"ignore": ["re:.*experts$"]}):
        plans_skipped = select_layers(model, slope.pruning.WandaPruningModifier(sparsity=0.5, **params))[1]
        assert not any(".experts." in s.name for s in plans_skipped)
    by_block = select_layers(model, slope.pruning.WandaPruningModifier(sparsity=0.5, targets=["model.layers.1"]))[1]
    assert {s.name for s in by_block} == {n for n in experts if n.startswith("model.layers.1.")}


def test_a_failure_mid_run_restores_every_weight(monkeypatch, tmp_path):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(weight, hessian, *args, **kwargs):
        calls.append(kwargs["layer"])
        if kwargs["layer"] == "model.layers.1.mlp.up_proj":
            raise slope.pruning.sparsegpt.PruningError("boom")
        return sparsegpt_prune(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(slope.pruning.modifiers, "sparsegpt_prune", failing)
    with pytest.raises(slope.pruning.sparsegpt.PruningError):
        oneshot(model, recipe("SparseGPTModifier", sparsity=0.5), dataset=token_ids(), output_dir=tmp_path / "o", verbose=False)
    assert any(c.startswith("model.layers.0") for c in calls)  # block 0 had been written
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- outputs
def test_saved_model_reloads_and_prune_model_reproduces_the_masks(tmp_path):
    model = tiny_llama(vocab=4096)
    out = tmp_path / "pruned"
    oneshot(model, SEED_RECIPE.replace("block_size: 128", 'block_size: 64\n      mask_structure: "2:4"'), dataset="embedded",
            tokenizer=shipped_tokenizer(), num_calibration_samples=4, max_seq_length=32, output_dir=out, verbose=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "sparsity_report.json"} <= names
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["calibration_samples"] == 4 and len(report["layers"]) == 14
    assert parse_recipe(out / "recipe.yaml")[0].modifier.structure == (2, 4)
    loaded = T.AutoModelForCausalLM.from_pretrained(out)
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n
    weights = {n: read_weight(m).detach().clone() for n, m in block_linears(loaded).items()}
    assert T.AutoTokenizer.from_pretrained(out)("def")["input_ids"] == shipped_tokenizer()("def")["input_ids"]
    slope.prune_model(loaded, compress=True, backend="reference", verbose=False)
    layers = dict(slope.sparse_modules(loaded))
    assert set(layers) == set(weights)
    for name, layer in layers.items():
        assert torch.equal(layer.mask, weights[name] != 0), name  # the same 2:4 masks
        assert torch.equal(layer.dense_weight(), weights[name])


def test_prune_model_on_a_kept_exact_zero_keeps_the_function():
    """If a weight the mask kept is itself exactly 0, |W| ties; prune_model keeps the lower index: the
    mask may differ there, but W⊙M (what the layer computes) is the same."""
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 2.0]] * 4))  # group 1 keeps (3, 0.0)
    weight = lin.weight.detach().clone()
    model = slope.prune_model(nn.Sequential(lin), compress=False, verbose=False)
    layer = model[0]
    assert is_nm_sparse(layer.mask, 2, 4, exact=True)
    assert torch.equal(layer.dense_weight(), weight)
    assert bool(layer.mask[:, 2].all()) and bool(layer.mask[:, 4].all()) and bool(layer.mask[:, 7].all())


def test_bf16_model_stays_bf16_with_exact_zeros():
    model = tiny_llama(dtype=torch.bfloat16)
    oneshot(model, recipe("SparseGPTModifier", mask_structure="2:4", block_size=16), dataset=token_ids(), verbose=False)
    for name, module in block_linears(model).items():
        assert module.weight.dtype == torch.bfloat16
        assert is_nm_sparse(read_weight(module) != 0, 2, 4, exact=True), name


def test_cli_oneshot_on_hf_folder_and_train_checkpoint(tmp_path, capsys):
    model_dir = tmp_path / "dense"
    tiny_llama(vocab=4096).save_pretrained(model_dir)
    shipped_tokenizer().save_pretrained(model_dir)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(SEED_RECIPE.replace("sparsity: 0.5", 'sparsity: 0.5\n      mask_structure: "2:4"'))
    args = ["oneshot", "--model", str(model_dir), "--dataset", "embedded", "--recipe", str(recipe_file),
            "--num-calibration-samples", "3", "--max-seq-len", "16", "--device", "cpu"]
    seed_flags = ["--splits", "train", "--pad_to_max_length", "False", "--concatenate_data"]  # seed 002's command
    assert main([*args, *seed_flags, "--output-dir", str(tmp_path / "out")]) == 0
    assert "14 linear layers pruned (50.00% of their weights are zero)" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert main([*args, "--splits", "validation", "--output-dir", str(tmp_path / "held_out")]) == 1
    assert "calibration reads the 'train' split only" in capsys.readouterr().err and not (tmp_path / "held_out").exists()
    recipe_file.write_text(SEED_RECIPE.replace("quantize: False", "quantize: True"))
    assert main([*args, "--output-dir", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantize: True is not supported" in err and not (tmp_path / "bad").exists()
    # a `slope train --dense` run folder is accepted as --model (shipped tokenizer)
    assert main(["train", "--dense", "--out", str(tmp_path / "run"), "--max-steps", "1", "--hidden-size", "64",
                 "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
                 "--batch-size", "2", "--eval-batches", "1", "--save-every", "0"]) == 0
    recipe_file.write_text("s:\n  g:\n    WandaPruningModifier: {mask_structure: '2:4'}\n")
    assert main(["oneshot", "--model", str(tmp_path / "run"), "--dataset", "embedded", "--recipe", str(recipe_file),
                 "--output-dir", str(tmp_path / "from_run"), "--num-calibration-samples", "2", "--max-seq-len", "16"]) == 0
    pruned = T.AutoModelForCausalLM.from_pretrained(tmp_path / "from_run")
    assert is_nm_sparse(pruned.model.layers[0].mlp.up_proj.weight != 0, 2, 4, exact=True)
    assert main(["oneshot", "--model", str(tmp_path / "nowhere"), "--recipe", str(recipe_file),
                 "--output-dir", str(tmp_path / "x")]) == 1
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_cli_oneshot_under_a_launcher_prunes_on_rank_0_alone(tmp_path, capsys, monkeypatch):
    """The seed runs step 2 under `accelerate launch` (N processes): rank 0 prunes and writes the
    folder, the other ranks exit at once instead of pruning the same model into the same folder."""
    model_dir = tmp_path / "dense"
    tiny_llama(vocab=4096).save_pretrained(model_dir)
    shipped_tokenizer().save_pretrained(model_dir)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(SEED_RECIPE)
    args = ["oneshot", "--model", str(model_dir), "--dataset", "embedded", "--recipe", str(recipe_file), "--output-dir",
            str(tmp_path / "out"), "--num-calibration-samples", "2", "--max-seq-len", "16", "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    assert "rank 0 does the work, the other 1 launched process(es) exit" in capsys.readouterr().out
    assert (tmp_path / "out" / "recipe.yaml").exists()


def test_targets_may_name_the_weights_as_sparseml_recipes_do():
    """SparseML recipes name parameters (``re:.*q_proj.weight``): they select the same linears as the
    module names, exact names count as explicit, and a pattern of another parameter still matches nothing."""
    model = tiny_llama()

    def chosen(targets):
        return match_targets(model, targets, "ConstantPruningModifier")

    by_module = chosen(["re:.*self_attn.q_proj", "model.layers.0.mlp.up_proj"])
    by_weight = chosen(["re:.*self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"])
    assert by_weight == by_module and by_weight["model.layers.0.mlp.up_proj"] is True
    assert sum(name.endswith("q_proj") for name in by_weight) == len(model.model.layers)
    with pytest.raises(RecipeError, match="matches no module"):
        chosen(["re:.*q_proj.bias"])


def test_fewer_calibration_windows_than_asked_are_said():
    import transformers as T

    from slope.pruning import oneshot as prune
    from slope.pruning.loading import shipped_tokenizer

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    recipe = {"s": {"g": {"WandaPruningModifier": {"sparsity": 0.5}}}}
    with pytest.warns(UserWarning, match=r"the data gives (\d+) calibration windows of 32 tokens, fewer than the 512 asked"):
        prune(model, recipe, ["a short text, " * 20], shipped_tokenizer(), 512, 32, verbose=False)
