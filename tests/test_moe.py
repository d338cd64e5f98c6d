"""Fused mixture-of-experts weights (transformers 5's Mixtral / Qwen2-MoE ``...Experts`` modules):
listed with their size when left dense, pruned N:M per expert in simulation with ``experts=True``,
kept pruned through training, and saved / loaded with their masks."""
import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig  # noqa: E402

from slope import from_pretrained, prune_model, sparse_modules  # noqa: E402
from slope.moe import expert_masks, find_expert_weights  # noqa: E402

VOCAB = 64
CONFIGS = {
    "mixtral": lambda: MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
}


def build(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def reference_nm_mask(w, n, m):
    """Loop reference: in each row of ``w (out, in)``, each group of m keeps its n largest |w| (lower index on ties)."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            order = sorted(range(m), key=lambda j: (-abs(float(w[r, g + j])), j))
            for j in order[:n]:
                mask[r, g + j] = True
    return mask


def test_experts_are_listed_with_their_size_when_left_dense(capsys):
    model = build("mixtral")
    prune_model(model)
    printed = capsys.readouterr().out
    rows = {d.name: d for d in model.slope_prune_summary}
    fused = [e.name for e in find_expert_weights(model)]
    assert fused == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    for name in fused:
        param = model.get_parameter(name)
        assert not rows[name].pruned and rows[name].params == param.numel() and "fused MoE experts" in rows[name].reason
        assert f"{param.numel():,}" in printed
    dense_experts = sum(model.get_parameter(n).numel() for n in fused)
    pruned = sum(d.params for d in rows.values() if d.pruned)
    assert "0 of 2 fused MoE expert tensors pruned" in printed
    assert f"{pruned:,} of {pruned + sum(d.params for d in rows.values() if not d.pruned):,} weights" in printed
    assert f"{dense_experts:,} in fused expert tensors kept dense" in printed
    assert expert_masks(model) is None


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_experts_pruned_per_expert_in_simulation(arch):
    model = build(arch)
    original = copy.deepcopy(model)
    prune_model(model, compress=False, experts=True, verbose=False)
    masked = expert_masks(model)
    fused = find_expert_weights(model)
    assert set(masked.masks) == {e.name for e in fused} and len(fused) == 2
    for e in fused:
        w0 = original.get_parameter(e.name).detach()
        for expert in range(e.shape[0]):
            expected = reference_nm_mask(w0[expert], 2, 4)
            assert torch.equal(masked.masks[e.name][expert], expected), (e.name, expert)
        assert torch.equal(model.get_parameter(e.name), w0 * masked.masks[e.name])
    # the pruned model computes what the original computes with W⊙M in its experts and linear layers
    with torch.no_grad():
        for e in fused:
            original.get_parameter(e.name).mul_(masked.masks[e.name])
        for name, layer in sparse_modules(model):
            original.get_submodule(name).weight.copy_(layer.dense_weight())
        torch.testing.assert_close(model(ids()).logits, original(ids()).logits, rtol=1e-5, atol=1e-5)


def test_pruned_experts_stay_pruned_through_training(tmp_path):
    model = build("mixtral").train()
    prune_model(model, compress=False, experts=True, targets=["experts.*"], verbose=False)
    assert not list(sparse_modules(model))  # only the experts were targeted
    masked = expert_masks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(input_ids=ids(), labels=ids()).loss.backward()
        for name, param in masked.params.items():
            assert param.grad.abs().sum() > 0 and not param.grad[~masked.masks[name]].any()
        opt.step()
        masked.after_step(opt)
        opt.zero_grad()
    for name, param in masked.params.items():
        assert not param[~masked.masks[name]].any() and param[masked.masks[name]].ne(0).all()
        assert not opt.state[param]["exp_avg"][~masked.masks[name]].any()
    model.eval().save_pretrained(tmp_path)  # experts only: no SLoPe layer, the masks still go with the weights
    loaded = from_pretrained(tmp_path)
    assert all(torch.equal(expert_masks(loaded).masks[k], masked.masks[k]) for k in masked.masks)
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_pruned_experts_round_trip_through_save_pretrained(tmp_path):
    model = build("qwen2_moe")
    prune_model(model, compress=True, experts=True, verbose=False)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-5)
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    a, b = expert_masks(model), expert_masks(loaded)
    assert a.structure == b.structure and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    # load_state_dict of the dense form (a Trainer resuming from checkpoint-N) restores the masks too
    from slope.serialization.dense_form import dense_form_state_dict

    torch.manual_seed(5)
    fresh = AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]()).eval()
    prune_model(fresh, compress=True, experts=True, verbose=False)
    c = expert_masks(fresh)
    assert not all(torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    fresh.load_state_dict(dense_form_state_dict(model))
    assert all(torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert torch.equal(fresh(ids()).logits, model(ids()).logits)


def test_loading_wraps_the_expert_masks_once(tmp_path, monkeypatch):
    """from_pretrained restores all expert masks of one sparsity with one ExpertMasks (it built one
    per tensor, re-wrapping and re-applying the earlier ones each time)."""
    import slope.moe

    model = build("qwen2_moe")
    prune_model(model, compress=True, experts=True, verbose=False)
    model.save_pretrained(tmp_path)
    built, real_init = [], slope.moe.ExpertMasks.__init__

    def counting_init(self, params, masks, structure):
        built.append(sorted(params))
        real_init(self, params, masks, structure)

    monkeypatch.setattr(slope.moe.ExpertMasks, "__init__", counting_init)
    loaded = from_pretrained(tmp_path)
    names = sorted(expert_masks(model).masks)
    assert len(names) >= 2 and built == [names]
    a, b = expert_masks(model), expert_masks(loaded)
    assert a.structure == b.structure and all(torch.equal(a.masks[k], b.masks[k]) for k in names)


def test_transposed_expert_layout_is_masked_along_its_input_dimension():
    class TransposedExperts(nn.Module):  # stored (E, in, out), as transformers' is_transposed experts
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.up = nn.Parameter(torch.randn(3, 8, 12))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.experts = TransposedExperts()

    model = Block()
    w0 = model.experts.up.detach().clone()
    prune_model(model, compress=False, experts=True, verbose=False)
    (e,) = find_expert_weights(model)
    assert e.shape == (3, 12, 8) and e.transposed
    mask = expert_masks(model).masks["experts.up"]
    for expert in range(3):
        assert torch.equal(mask[expert].t(), reference_nm_mask(w0[expert].t(), 2, 4))
