"""slope.dynamic front doors: custom criteria, top-k attention, sparse_finetune + CLI, Trainer callback, bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.prune import BasePruningMethod, L1Unstructured, RandomUnstructured

from slope.dynamic import DynamicSparsity, sparse_finetune
from slope.dynamic.attention import enable_topk_attention, topk_attention
from slope.dynamic.criteria import criterion_mask, resolve_pruning_method
from slope.masks import is_nm_sparse, topk_mask


class MagnitudePruning(BasePruningMethod):  # seed 000's example, as written
    PRUNING_TYPE = 'unstructured'

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        num_params = t.numel()
        k = int(num_params * (1 - self.amount))
        if k == 0:
            return mask

        # Keep the k largest magnitude weights
        topk = torch.topk(t.abs().view(-1), k=k, largest=True)
        mask.view(-1)[topk.indices] = 1
        return mask


def _llama(layers=2, vocab=4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(200)]


# ---------------------------------------------------------------------- custom criteria
@pytest.mark.parametrize("method", [MagnitudePruning, MagnitudePruning(), L1Unstructured(amount=0.9), L1Unstructured])
def test_pruning_methods_keep_the_largest_magnitudes(method):
    weight = torch.randn(16, 24)
    mask = torch.ones_like(weight, dtype=torch.bool)
    resolved = resolve_pruning_method(method)
    new = criterion_mask(resolved, weight, mask, 0.6)
    keep = int(weight.numel() * 0.4) if isinstance(resolved, MagnitudePruning) else round(weight.numel() * 0.4)
    assert torch.equal(new, topk_mask(weight.abs(), keep=keep))
    # a second, sparser pruning never revives pruned weights
    again = criterion_mask(resolved, weight * new, new, 0.8)
    assert bool((again <= new).all()) and int(again.sum()) in (int(weight.numel() * 0.2), round(weight.numel() * 0.2))


def test_random_criterion_and_bad_methods():
    weight, mask = torch.randn(10, 10), torch.ones(10, 10, dtype=torch.bool)
    assert int(criterion_mask(RandomUnstructured(amount=0.1), weight, mask, 0.3).sum()) == 70

    class Nothing(BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask

    class WrongShape(Nothing):
        def compute_mask(self, t, default_mask):
            return default_mask[0]

    with pytest.raises(ValueError, match="kept 0 of 100 weights"):
        criterion_mask(Nothing(), weight, mask, 0.5)
    with pytest.raises(ValueError, match="weight's shape"):
        criterion_mask(WrongShape(), weight, mask, 0.5)
    with pytest.raises(TypeError, match="BasePruningMethod"):
        resolve_pruning_method("l1")


# ---------------------------------------------------------------------- top-k attention
def _reference_attention(q, k, v, allowed, ratio, scaling):
    """One query at a time: softmax over the ceil(ratio * L) best-scoring keys it may see (all of them if fewer)."""
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, lq, h, d)
    keep = math.ceil(ratio * k.shape[2])
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                scores = [(float(q[bi, hi, i] @ k[bi, hi // groups, j]) * scaling, j) for j in range(k.shape[2])]
                visible = [(s, j) for s, j in scores if allowed[bi, 0, i, j]]
                best = [j for s, j in sorted(visible, key=lambda t: -t[0])[:keep]]
                if not best:
                    continue
                w = torch.softmax(torch.tensor([scores[j][0] for j in best]), 0)
                out[bi, i, hi] = sum(wj * v[bi, hi // groups, j] for wj, j in zip(w, best))
    return out


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_topk_attention_matches_the_reference(ratio, mask_kind):
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed = causal.expand(2, 1, 7, 7).clone()
    allowed[1, :, :, :2] = False  # left padding of the second sequence
    allowed[1, :, :2, 0] = True   # (a padded query still sees something)
    mask = {"none": None, "bool": allowed,
            "float": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    if mask is None:
        allowed = causal.expand(2, 1, 7, 7)
    module = nn.Module()
    module.config, module.is_causal = type("C", (), {"topk_attention_ratio": ratio})(), True
    out, weights = topk_attention(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(out, _reference_attention(q, k, v, allowed, ratio, 0.3), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 7, 4, 8) and weights.shape == (2, 4, 7, 7)
    assert bool(((weights > 0).sum(-1) <= math.ceil(ratio * 7)).all())


def test_llama_uses_topk_attention_through_transformers():
    torch.manual_seed(0)
    model = _llama(vocab=64).eval()
    model.set_attn_implementation("eager")
    x = torch.randint(0, 64, (2, 12))
    eager = model(x).logits
    enable_topk_attention(model, 1.0)
    assert model.config._attn_implementation == "slope_topk"
    torch.testing.assert_close(model(x).logits, eager)  # all keys kept = exact attention
    enable_topk_attention(model, 0.25)
    assert (model(x).logits - eager).abs().max() > 1e-3
    with pytest.raises(ValueError, match="topk_ratio"):
        enable_topk_attention(model, 0.0)


# ---------------------------------------------------------------------- sparse_finetune and the CLI
def _run(tmp_path, **kw):
    torch.manual_seed(0)
    options = dict(mask_update_interval=2, max_steps=5, batch_size=4, gradient_accumulation_steps=2, warmup_steps=1,
                   learning_rate=1e-3, max_seq_length=16, eval_batches=1, output_dir=tmp_path)
    return sparse_finetune(_llama(), DOCS, **{**options, **kw})


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_sparse_finetune_writes_a_loadable_sparse_model(tmp_path, sparsity_type):
    from transformers import AutoModelForCausalLM

    model = _run(tmp_path, sparsity_type=sparsity_type, use_topk_attention=True, topk_ratio=0.5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_sparsity"] == pytest.approx(0.5)
    assert summary["mask_updates"] == 2  # RigL after steps 2 and 4 (the initial pruning is not counted)
    for name in ("loss.png", "metrics.jsonl", "dynamic_sparsity.pt", "config.json", "tokenizer.json"):
        assert (tmp_path / name).exists(), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    weight = loaded.model.layers[0].mlp.up_proj.weight
    if sparsity_type == "2:4":
        assert is_nm_sparse(weight != 0, 2, 4, exact=True)
    else:
        assert (weight == 0).float().mean() == pytest.approx(0.5, abs=1e-3)
    x = torch.randint(0, 4096, (1, 8))
    enable_topk_attention(loaded, 0.5)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_sparse_finetune_resolves_the_seed_defaults(tmp_path):
    with pytest.warns(UserWarning, match="100% of the schedule's pruning happens after the last of the run's 5 steps"):
        model = _run(tmp_path, use_rigl=False, sparsity_schedule=None, output_dir=None, mask_update_interval=10)
    history = model.dynamic_sparsity.history
    assert [r["kind"] for r in history] == ["gradual", "gradual"]  # cubic from 0, last step at 50 %
    assert history[0]["sparsity"] == 0.0 and model.finetune_summary["final_sparsity"] == pytest.approx(0.5)


def test_cli_sparse_finetune(tmp_path, capsys):
    from slope.cli import main

    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    _llama().save_pretrained(model_dir)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    args = ["sparse-finetune", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
            "--sparsity-type", "4:8", "--mask-update-interval", "2", "--max-steps", "3", "--batch-size", "4",
            "--gradient-accumulation-steps", "1", "--max-seq-length", "16", "--eval-batches", "1", "--learning-rate", "1e-3",
            "--no-gradient-checkpointing", "--warmup-steps", "1"]
    assert main(args) == 0
    assert "sparsity 0.5000" in capsys.readouterr().out
    assert main(args[:-2] + ["--sparsity-ratio", "1.5"]) == 1
    assert "sparsity_ratio must be" in capsys.readouterr().err


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_sparse_finetune_resumes_exactly(tmp_path, sparsity_type):
    """A run stopped after step 3 and resumed from its checkpoint ends where an uninterrupted one
    does: weights, masks, mask-update history and logged records (RigL updates after steps 2 and 4)."""
    kw = dict(sparsity_type=sparsity_type, max_steps=6, save_steps=3, gradient_accumulation_steps=1)
    whole = _run(tmp_path / "whole", **kw)
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = _run(tmp_path / "resumed", **kw, resume_from_checkpoint=tmp_path / "whole" / "checkpoint-3")
    assert [r["step"] for r in resumed.dynamic_sparsity.history] == [r["step"] for r in whole.dynamic_sparsity.history] == [0, 2, 4]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.finetune_summary["val_curve"] == whole.finetune_summary["val_curve"]
    lines = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines("resumed") == lines("whole")
    with pytest.raises(ValueError, match="learning_rate"):
        _run(tmp_path / "other", **kw, learning_rate=2e-3, resume_from_checkpoint=tmp_path / "whole")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        _run(tmp_path / "none", **kw, resume_from_checkpoint=True)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(sparsity_ratio=1.0), "sparsity_ratio must be"),
    (dict(sparsity_ratio=-0.1), "sparsity_ratio must be"),
    (dict(sparsity_type="4:4"), "0 < N < M"),
    (dict(sparsity_type="5:4"), "0 < N < M"),
    (dict(sparsity_type="blocky"), "N:M"),
    (dict(mask_update_interval=0), "mask_update_interval"),
    (dict(mask_update_fraction=0.0), "mask_update_fraction"),
    (dict(sparsity_schedule="exponential"), "unknown sparsity_schedule"),
    (dict(sparsity_type="2:4", sparsity_schedule="cubic"), "cannot run with use_rigl"),
    (dict(sparsity_type="2:4", pruning_method=L1Unstructured), "pruning_method applies to unstructured"),
    (dict(sparsity_type="4:8", compress=True), "2:4 only"),
])
def test_bad_dynamic_sparsity_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsity(_llama(layers=1, vocab=64), 10, **kw)


def test_bad_sparse_finetune_arguments():
    with pytest.raises(TypeError, match="unknown keyword"):
        sparse_finetune(_llama(layers=1, vocab=64), DOCS, max_stepz=3)
    with pytest.raises(ValueError, match="exclusive"):
        sparse_finetune(_llama(layers=1, vocab=64), DOCS, fp16=True, bf16=True)
    with pytest.raises(ValueError, match="topk_ratio"):
        sparse_finetune(_llama(layers=1, vocab=64), DOCS, use_topk_attention=True, topk_ratio=0)
    with pytest.raises(ValueError, match="total_steps"):
        DynamicSparsity(_llama(layers=1, vocab=64), 0)
    from slope.data import DataError

    with pytest.raises(DataError, match="vocabulary"):  # the shipped tokenizer's ids exceed a 64-entry vocabulary
        sparse_finetune(_llama(layers=1, vocab=64), DOCS, max_steps=1, max_seq_length=16)


# ---------------------------------------------------------------------- transformers.Trainer
def _trainer(tmp_path, model, sparsifier, max_steps, **args):
    from transformers import Trainer, TrainingArguments

    from slope.dynamic import DynamicSparsityCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, 64, (16,), generator=g)
            return {"input_ids": ids, "labels": ids}

    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                              report_to=[], save_strategy="steps", save_steps=3, logging_steps=1, use_cpu=True,
                              dataloader_num_workers=0, seed=0, **args)
    return Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=[DynamicSparsityCallback(sparsifier)])


def test_trainer_callback_updates_masks_and_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(0)
        model = _llama(layers=1, vocab=64)
        return model, DynamicSparsity(model, 6, sparsity_ratio=0.5, mask_update_interval=2, mask_update_fraction=0.5)

    model, sp = build()
    _trainer(tmp_path / "a", model, sp, 6).train()
    assert [r["step"] for r in sp.history] == [0, 2, 4] and sp.steps_done == 6
    assert all(int(m.sum()) == m.numel() // 2 for m in sp.masked.masks.values())
    resumed, sp2 = build()
    first, sp1 = build()
    _trainer(tmp_path / "b", first, sp1, 6).train()  # writes checkpoint-3 and checkpoint-6
    # resumed by a Trainer writing elsewhere (c): the state comes from the folder it resumes from
    _trainer(tmp_path / "c", resumed, sp2, 6).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert sp2.steps_done == 6 and [r["step"] for r in sp2.history] == [0, 2, 4]
    for name, mask in sp.masked.masks.items():
        assert torch.equal(mask, sp2.masked.masks[name])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
