"""slope.peft's PEFT-SFT (SpIEL): the delta layer, SftAdamW/SftSM3, reselection, persistence, errors.

The trained deltas are compared with a slow dense-masked reference written from the rules in
slope/peft/selection.py's docstring: dense delta tensors with bool masks, dense Adam / SM3 state,
dense drop-and-grow; on fresh random models, over several steps that include reselections.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers.pytorch_utils import Conv1D

from slope.finetune_loop import enable_activation_checkpointing
from slope.peft import (DeltaSet, SftAdamW, SftConfig, SftLinear, SftModel, SftReselection, SftSelector, SftSM3, TaskType,
                        get_peft_model)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def batch(step: int, rows: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(100 + step))


def config(**kw) -> SftConfig:
    base = dict(task_type=TaskType.CAUSAL_LM, density=0.05, target_modules=TARGETS, reselection_steps=3,
                selection_accumulation_steps=2, initial_reselection_rate=0.5)
    return SftConfig(**{**base, **kw})


def make_optimizer(model: SftModel, cfg: SftConfig, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.selection_algorithm == "sm3":
        return SftSM3(params, {d.values: d for _, _, d in model.active_deltas()}, lr=lr)
    return SftAdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-6)


def train_sft(model: SftModel, cfg: SftConfig, steps: int, on_step=None):
    opt = make_optimizer(model, cfg)
    selector = SftSelector(model, opt, cfg, steps, 1)
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        selector.step()
        if on_step is not None:
            on_step(step, opt, selector)
    return opt, selector


# ---------------------------------------------------------------------- the layer
@pytest.mark.parametrize("conv1d", [False, True])
def test_delta_layer_matches_dense_math(conv1d):
    base = Conv1D(6, 8) if conv1d else nn.Linear(8, 6)
    nn.init.normal_(base.bias)
    indices = torch.randperm(48)[:10]
    layer = SftLinear(base, indices)
    with torch.no_grad():
        layer.sft_delta.values.normal_()
    x = torch.randn(3, 5, 8, requires_grad=True)
    dense_delta = layer.sft_delta.to_dense().clone().requires_grad_(True)
    w = base.weight.detach() + dense_delta
    ref = x @ w + base.bias if conv1d else F.linear(x, w, base.bias)
    (ref * torch.arange(6.0)).sum().backward()
    ref_dx, ref_dvalues = x.grad.clone(), dense_delta.grad.reshape(-1)[indices]
    x.grad = None
    out = layer(x)
    (out * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_dx)
    torch.testing.assert_close(layer.sft_delta.values.grad, ref_dvalues)
    assert base.weight.grad is None and layer.sft_delta.values.grad.shape == (10,)


def test_delta_layer_bf16_autocast_close_to_fp32():
    layer = SftLinear(nn.Linear(16, 8), torch.randperm(128)[:20])
    with torch.no_grad():
        layer.sft_delta.values.normal_()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    grad_bf16 = layer.sft_delta.values.grad.clone()
    layer.sft_delta.values.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(grad_bf16, layer.sft_delta.values.grad, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------- slow dense-masked reference
class DenseReference:
    """SpIEL with dense tensors: one delta D, bool mask, Adam (age, m, v) or SM3 (R, C) per target weight."""

    def __init__(self, base: nn.Module, masks: dict[str, torch.Tensor], cfg: SftConfig, total: int, lr: float = 1e-2):
        self.base, self.cfg, self.total, self.lr = base, cfg, total, lr
        self.weights = {n: dict(base.named_parameters())[n + ".weight"].detach() for n in masks}
        self.mask = {n: m.clone() for n, m in masks.items()}
        self.delta = {n: torch.zeros_like(w) for n, w in self.weights.items()}
        zeros = lambda: {n: torch.zeros_like(w) for n, w in self.weights.items()}  # noqa: E731
        self.m, self.v, self.age = zeros(), zeros(), zeros()
        self.rows = {n: torch.zeros(w.shape[0]) for n, w in self.weights.items()}
        self.cols = {n: torch.zeros(w.shape[1]) for n, w in self.weights.items()}
        self.cand = {}

    def events(self):
        r, g, t = self.cfg.reselection_steps, self.cfg.selection_accumulation_steps, self.total
        ev = {e for e in range(r, t, r)}
        if self.cfg.selection_algorithm == "rigl":
            ev = {e for e in ev if e > g} | {g}
        return sorted(ev)

    def in_window(self, done):  # done: 1-based step
        upcoming = [e for e in self.events() if e >= done]
        return self.cfg.selection_algorithm == "rigl" and bool(upcoming) and upcoming[0] - done < self.cfg.selection_accumulation_steps

    def grads(self, ids):
        leaves = {n: d.clone().requires_grad_(True) for n, d in self.delta.items()}
        params = {n + ".weight": self.weights[n] + leaves[n] for n in leaves}
        torch.func.functional_call(self.base, params, (), {"input_ids": ids, "labels": ids}).loss.backward()
        return {n: leaf.grad for n, leaf in leaves.items()}

    def step(self, done, ids):
        grads = self.grads(ids)
        for n, g in grads.items():
            if self.in_window(done):
                if n not in self.cand:
                    flat = g.reshape(-1).abs()
                    k = int(self.mask[n].sum())
                    top = torch.sort(flat, descending=True, stable=True).indices[:k]
                    self.cand[n] = [torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, top, True).view(g.shape),
                                    torch.zeros_like(g), torch.zeros_like(g), 0]
                c = self.cand[n]
                c[1] += g * c[0]
                c[2] += (g * c[0]) ** 2
                c[3] += 1
            mask = self.mask[n]
            g = g * mask
            if self.cfg.selection_algorithm == "sm3":
                nu = torch.minimum(self.rows[n][:, None], self.cols[n][None, :]) + g * g
                nu_masked = torch.where(mask, nu, torch.full_like(nu, -1.0))
                self.rows[n] = torch.maximum(self.rows[n], nu_masked.amax(1))
                self.cols[n] = torch.maximum(self.cols[n], nu_masked.amax(0))
                self.delta[n] -= torch.where(mask, self.lr * g / (nu.sqrt() + 1e-8), torch.zeros_like(g))
            else:
                b1, b2 = 0.9, 0.99
                self.age[n] += mask.float()
                self.m[n] = torch.where(mask, b1 * self.m[n] + (1 - b1) * g, self.m[n])
                self.v[n] = torch.where(mask, b2 * self.v[n] + (1 - b2) * g * g, self.v[n])
                age = self.age[n].clamp(min=1)
                upd = self.lr * (self.m[n] / (1 - b1**age)) / ((self.v[n] / (1 - b2**age)).sqrt() + 1e-6)
                self.delta[n] -= torch.where(mask, upd, torch.zeros_like(upd))
        if done in self.events():
            rate = 1.0 if (self.cfg.selection_algorithm == "rigl" and done == self.cfg.selection_accumulation_steps) else \
                self.cfg.initial_reselection_rate * (1 - done / self.total)
            for n in self.delta:
                self.reselect(n, int(rate * int(self.mask[n].sum())))
            self.cand = {}

    def smallest(self, n, count):
        flat_mask = self.mask[n].reshape(-1)
        pos = flat_mask.nonzero().reshape(-1)  # ascending index
        mag = self.delta[n].reshape(-1)[pos].abs()
        return pos[torch.sort(mag, stable=True).indices[:count]]

    def reselect(self, n, count):
        if count == 0:
            return
        flat_mask = self.mask[n].reshape(-1)
        if self.cfg.selection_algorithm == "sm3":
            scores = torch.outer(self.rows[n], self.cols[n]).reshape(-1).clone()
            scores[flat_mask] = -1.0
            grown = torch.sort(scores, descending=True, stable=True).indices[:count]
            grown = grown[scores[grown] > 0]
            dropped = self.smallest(n, count)[: grown.numel()]
            self.set(n, dropped, grown, None)
            return
        cand_mask, s, ss, steps = self.cand[n]
        dropped = self.smallest(n, count)
        remaining = flat_mask.clone()
        remaining[dropped] = False
        pool = cand_mask.reshape(-1) & ~remaining
        scores = torch.where(pool, s.reshape(-1).abs(), torch.full_like(s.reshape(-1), -1.0))
        grown = torch.sort(scores, descending=True, stable=True).indices[: min(count, int(pool.sum()))]
        incoming = grown[~torch.isin(grown, dropped)]
        outgoing = dropped[~torch.isin(dropped, grown)][: incoming.numel()]
        incoming = incoming[: outgoing.numel()]
        self.set(n, outgoing, incoming, (s.reshape(-1)[incoming] / steps, ss.reshape(-1)[incoming] / steps, steps))

    def set(self, n, outgoing, incoming, init):
        for t in (self.delta[n], self.m[n], self.v[n], self.age[n]):
            t.view(-1)[outgoing] = 0
        self.mask[n].view(-1)[outgoing] = False
        self.mask[n].view(-1)[incoming] = True
        self.delta[n].view(-1)[incoming] = 0
        if init is not None:
            mean, mean_sq, steps = init
            self.m[n].view(-1)[incoming] = mean * (1 - 0.9**steps)
            self.v[n].view(-1)[incoming] = mean_sq * (1 - 0.99**steps)
            self.age[n].view(-1)[incoming] = float(steps)


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_reselection_schedule_is_the_seeds_linear_decay(algorithm):
    """Reselect after steps r, 2r, ... below T (rigl: and after its first window of γ steps, wholesale),
    a fraction initial_reselection_rate · (1 - t/T) "reduced linearly to zero" (seed 003) — checked
    at every step against the formula, off the midpoint where a cosine decay would agree with it."""
    total, r, gamma, rate0 = 50, 7, 3, 0.3
    cfg = config(selection_algorithm=algorithm, reselection_steps=r, selection_accumulation_steps=gamma,
                 initial_reselection_rate=rate0)
    model = get_peft_model(tiny_llama(), cfg)
    policy = SftReselection(DeltaSet({n: d for n, _, d in model.active_deltas()}), cfg, total)
    events = [t for t in range(1, total) if t % r == 0 and (algorithm == "sm3" or t > gamma)]
    if algorithm == "rigl":
        events = [gamma] + events
    assert [step + 1 for step in range(total) if policy.due(step)] == events
    for t in events:
        want = 1.0 if algorithm == "rigl" and t == gamma else rate0 * (total - t) / total
        assert policy.rate(t - 1) == pytest.approx(want), t


def test_rigl_candidates_sum_each_steps_micro_batches():
    """SpIEL-AG's statistics with gradient accumulation, on fresh random gradients: candidates = the k
    largest |g| of the window's first micro-batch; Σg and Σg² over steps of each step's summed gradient."""
    from slope.peft.selection import Candidates

    g = torch.Generator().manual_seed(5)
    steps = [[torch.randn(6, 10, generator=g) for _ in range(3)] for _ in range(2)]  # 2 steps × 3 micro-batches
    cand = Candidates(k=7)
    for micro in steps:
        for grad in micro:
            cand.observe(grad)
        cand.end_step()
    top = torch.sort(steps[0][0].reshape(-1).abs(), descending=True, stable=True).indices[:7]
    assert torch.equal(cand.indices, torch.sort(top).values) and cand.steps == 2
    sums = [sum(micro).reshape(-1)[cand.indices] for micro in steps]
    torch.testing.assert_close(cand.grad_sum, sums[0] + sums[1])
    torch.testing.assert_close(cand.grad_sq_sum, sums[0] ** 2 + sums[1] ** 2)


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_matches_dense_masked_reference(algorithm):
    steps = 8  # reselections after steps 2 (rigl), 3 and 6: rates off the midpoint of the decay
    cfg = config(selection_algorithm=algorithm)
    model = get_peft_model(tiny_llama(), cfg)
    deltas = DeltaSet({n: d for n, _, d in model.active_deltas()})
    ref = DenseReference(copy.deepcopy(tiny_llama()), deltas.masks, cfg, steps)
    changed_masks = []

    def compare(step, opt, selector):
        ref.step(step + 1, batch(step))
        masks = deltas.masks
        changed_masks.append(any(not torch.equal(masks[n], ref.mask[n]) for n in masks))
        for n, _, delta in model.active_deltas():
            assert torch.equal(masks[n], ref.mask[n]), f"step {step}: {n} selected other entries"
            torch.testing.assert_close(delta.to_dense(), ref.delta[n], atol=2e-6, rtol=1e-4)
            if algorithm == "rigl":
                state = opt.state[delta.values]
                torch.testing.assert_close(state["exp_avg"], ref.m[n].reshape(-1)[delta.indices], atol=1e-7, rtol=1e-4)
                torch.testing.assert_close(state["age"].float(), ref.age[n].reshape(-1)[delta.indices])
            else:
                torch.testing.assert_close(opt.state[delta.values]["accumulator_0"], ref.rows[n], atol=1e-9, rtol=1e-4)

    start = {n: d.indices.clone() for n, _, d in model.active_deltas()}
    train_sft(model, cfg, steps, on_step=compare)
    moved = sum(int((~torch.isin(d.indices, start[n])).sum()) for n, _, d in model.active_deltas())
    assert moved > 0, "the run never reselected anything: the test would not see reselection bugs"


# ---------------------------------------------------------------------- invariants
@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_only_delta_entries_change_and_density_stays_exact(algorithm):
    cfg = config(selection_algorithm=algorithm, reselection_steps=2, selection_accumulation_steps=1, initial_reselection_rate=0.8)
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, cfg)
    sizes = {n: d.indices.numel() for n, _, d in model.active_deltas()}
    total_changed = []

    def check(step, opt, selector):
        for n, _, d in model.active_deltas():
            assert d.indices.numel() == sizes[n] and torch.unique(d.indices).numel() == sizes[n]
            assert int(d.indices.min()) >= 0 and int(d.indices.max()) < d.dense_numel
        for key, state in opt.state.items():
            for name, t in state.items():
                if name.startswith("accumulator"):
                    continue
                assert t.numel() == key.numel(), f"optimizer state {name} has {t.numel()} entries for a {key.numel()}-entry delta"
        total_changed.append(selector.policy.masked.sparsity())

    train_sft(model, cfg, 9, on_step=check)
    assert len(set(total_changed)) == 1
    # the frozen base never moved; merged weights differ from it only at delta entries
    for n, p in model.base_model.named_parameters():
        if "sft_delta" not in n:
            assert torch.equal(p, original[n.replace(".base_layer", "")]), n
    model.merge()
    for name, layer in model.sft_layers():
        diff = (layer.weight != original[name + ".weight"]).reshape(-1).nonzero().reshape(-1)
        assert diff.numel() > 0 and torch.isin(diff, layer.sft_delta.indices).all()
    model.unmerge()


def test_optimizer_state_is_the_size_of_the_delta():
    cfg = config(selection_algorithm="sm3")
    model = get_peft_model(tiny_llama(), cfg)
    opt, _ = train_sft(model, cfg, 2)
    for _, _, d in model.active_deltas():
        state = opt.state[d.values]
        assert state["accumulator_0"].numel() == d.shape[0] and state["accumulator_1"].numel() == d.shape[1]
    cfg = config()
    model = get_peft_model(tiny_llama(), cfg)
    opt, _ = train_sft(model, cfg, 2)
    k = sum(d.values.numel() for _, _, d in model.active_deltas())
    assert sum(t.numel() for s in opt.state.values() for t in s.values()) == 3 * k  # age, exp_avg, exp_avg_sq


def test_print_trainable_parameters_matches_the_count(capsys):
    model = get_peft_model(tiny_llama(), config(num_tunable_weights=1234))
    model.print_trainable_parameters()
    k = sum(d.values.numel() for _, _, d in model.active_deltas())
    assert k == 1234
    total = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == f"trainable params: 1,234 || all params: {total:,d} || trainable%: {100 * 1234 / total:.4f}"
    dense_total = sum(p.numel() for p in tiny_llama().parameters())
    assert sum(d.values.numel() for _, _, d in get_peft_model(tiny_llama(), config(density=0.02)).active_deltas()) == round(0.02 * dense_total)


def test_grad_accumulation_matches_the_full_batch():
    # sm3: no gradient candidates (rigl picks them from the first micro-batch, by design)
    cfg = config(selection_algorithm="sm3")
    a, b = get_peft_model(tiny_llama(), cfg), get_peft_model(tiny_llama(), cfg)
    opt_a, opt_b = make_optimizer(a, cfg), make_optimizer(b, cfg)
    sel_a, sel_b = SftSelector(a, opt_a, cfg, 6, 1), SftSelector(b, opt_b, cfg, 6, 2)
    for step in range(6):
        ids = batch(step, rows=4)
        a(input_ids=ids, labels=ids).loss.backward()
        for half in (ids[:2], ids[2:]):
            (b(input_ids=half, labels=half).loss / 2).backward()
        for opt, sel in ((opt_a, sel_a), (opt_b, sel_b)):
            opt.step()
            opt.zero_grad()
            sel.step()
    for (_, _, da), (_, _, db) in zip(a.active_deltas(), b.active_deltas()):
        assert torch.equal(da.indices, db.indices)
        torch.testing.assert_close(da.values, db.values, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = config()
    plain, ckpt = get_peft_model(tiny_llama(), cfg), get_peft_model(tiny_llama(), cfg)
    enable_activation_checkpointing(ckpt.base_model, use_reentrant=True)
    ckpt.base_model.enable_input_require_grads()
    ckpt.train()
    ids = batch(0)
    for m in (plain, ckpt):
        m(input_ids=ids, labels=ids).loss.backward()
    for (_, _, d1), (_, _, d2) in zip(plain.active_deltas(), ckpt.active_deltas()):
        assert d2.values.grad is not None
        torch.testing.assert_close(d1.values.grad, d2.values.grad)


# ---------------------------------------------------------------------- persistence
def test_save_load_merge_unmerge_round_trip(tmp_path):
    cfg = config()
    model = get_peft_model(tiny_llama(), cfg)
    train_sft(model, cfg, 4)
    ids = batch(99)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    k = sum(d.values.numel() for _, _, d in model.active_deltas())
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 12 * k + 4096  # values + int64 indices only
    assert json.loads((tmp_path / "adapter_config.json").read_text())["selection_algorithm"] == "rigl"

    fresh = tiny_llama()
    original = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    loaded = SftModel.from_pretrained(fresh, tmp_path)
    assert all(not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)
        loaded.merge()
        merged = loaded(input_ids=ids).logits
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        loaded.unmerge()
    for name, layer in loaded.sft_layers():
        assert torch.equal(layer.weight, original[name + ".weight"])  # bit for bit
    plain = loaded.merge_and_unload()
    assert not any(isinstance(m, SftLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, merged, atol=0, rtol=0)
    trainable = SftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == k


def test_a_delta_for_another_base_model_is_an_error(tmp_path):
    model = get_peft_model(tiny_llama(seed=0), config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="differ from those of the base model"):
        SftModel.from_pretrained(tiny_llama(seed=1), tmp_path)
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape"):
        SftModel.from_pretrained(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SftModel.from_pretrained(tiny_llama(), tmp_path / "missing")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_0_1_is_an_error(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        config(density=density)


def test_target_modules_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="match no module.*q_proj"):
        get_peft_model(tiny_llama(), config(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="not nn.Linear"):
        get_peft_model(tiny_llama(), config(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="selection_algorithm"):
        config(selection_algorithm="magnitude")
    with pytest.raises(ValueError, match="selection_accumulation_steps"):
        config(reselection_steps=2, selection_accumulation_steps=5)


def test_get_peft_config_builds_the_sft_config_and_refuses_unknown_keys():
    from slope.peft import SftConfig, TaskType, get_peft_config

    config = get_peft_config({"peft_type": "SFT", "task_type": TaskType.CAUSAL_LM, "density": 0.02, "target_modules": ["q_proj"]})
    assert config == SftConfig(task_type="CAUSAL_LM", density=0.02, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"unknown SftConfig key\(s\) \['densty'\]"):
        get_peft_config({"densty": 0.02, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        get_peft_config({"peft_type": "LORA", "r": 8})
    with pytest.raises(ValueError, match="set it to at most 2"):
        SftConfig(target_modules=["q_proj"], reselection_steps=2)


def test_config_checks_task_type_whole_counts_and_rigl_only_window():
    with pytest.raises(ValueError, match="task_type must be one of"):
        config(task_type="CAUSAL_LMX")
    with pytest.raises(ValueError, match="num_tunable_weights must be a positive whole number"):
        config(num_tunable_weights=2.5)
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        config(modules_to_save="classifier")
    config(selection_algorithm="sm3", reselection_steps=2)  # the window (default 5) is rigl's alone
    with pytest.raises(ValueError, match="selection_accumulation_steps"):
        config(selection_algorithm="rigl", reselection_steps=2, selection_accumulation_steps=5)


def test_sm3_selector_refuses_an_optimizer_that_cannot_reselect():
    cfg = config(selection_algorithm="sm3")
    model = get_peft_model(tiny_llama(), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="deltas mapping lacks 14 of the model's 14 deltas"):
        SftSelector(model, SftSM3(params, {}, lr=1e-2), cfg, 6)
    with pytest.raises(ValueError, match="optimizer is SftAdamW"):
        SftSelector(model, SftAdamW(params, lr=1e-2), cfg, 6)
    with pytest.raises(ValueError, match="num_train_steps"):
        SftSelector(model, make_optimizer(model, cfg), cfg, 0)


def _frozen(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def test_a_failed_get_peft_model_leaves_the_model_as_it_was():
    model = tiny_llama()
    with pytest.raises(ValueError, match="match no module"):
        get_peft_model(model, config(target_modules=["qproj"]))
    assert _frozen(model) == [] and not any(isinstance(m, SftLinear) for m in model.modules())
    with pytest.raises(ValueError, match="do not fit"):
        get_peft_model(model, config(num_tunable_weights=10**9))
    assert _frozen(model) == []


def test_from_pretrained_checks_the_folder_before_touching_the_model(tmp_path):
    model = get_peft_model(tiny_llama(), config())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "target_modules": ["q_proj"]}))  # fewer targets than the deltas
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="deltas for modules .*v_proj.* have no target"):
        SftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, SftLinear) for m in fresh.modules()) and _frozen(fresh) == []
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "base_model"}))
    with pytest.raises(ValueError, match="adapter_config.json lacks the record of the deltas' base model"):
        SftModel.from_pretrained(tiny_llama(), tmp_path)


def test_clear_errors_for_regex_targets_a_second_wrapping_and_corrupt_files(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match=r"regular expression that must match a whole module name.*\['q_proj'\].*'\.\*q_proj'"):
        get_peft_model(tiny_llama(), config(target_modules="q_proj"))
    assert len(list(get_peft_model(tiny_llama(), config(target_modules=r".*\.q_proj")).active_deltas())) == 2
    model = tiny_llama()
    sft = get_peft_model(model, config())
    with pytest.raises(ValueError, match="already has sparse deltas"):
        get_peft_model(model, config(target_modules=r".*proj.*"))
    sft.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".values"))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors lacks the tensor '{key}'"):
        SftModel.from_pretrained(tiny_llama(), tmp_path)
    data = open(weights, "rb").read()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        SftModel.from_pretrained(tiny_llama(), tmp_path)
