"""slope.peft with Hugging Face: causal LMs of several families (GPT-2's Conv1D included) and
``SftTrainer(Trainer)`` (gradient accumulation, bf16, delta-only checkpoints, resume)."""
from __future__ import annotations

import os

import pytest
import torch
import transformers

from slope.peft import SftAdamW, SftConfig, SftModel, SftSelector, SftTrainer, get_peft_model

VOCAB = 64


def _tiny(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    model = transformers.AutoModelForCausalLM.from_config(cls(intermediate_size=64, num_key_value_heads=2, **common))
    return model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_causal_lm_families_train_and_merge(family):
    model, targets = _tiny(family)
    cfg = SftConfig(task_type="CAUSAL_LM", density=0.03, target_modules=targets, reselection_steps=2, selection_accumulation_steps=1)
    sft = get_peft_model(model, cfg)
    opt = SftAdamW([p for p in sft.parameters() if p.requires_grad], lr=1e-2)
    selector = SftSelector(sft, opt, cfg, 4, 1)
    ids = torch.randint(0, VOCAB, (2, 12))
    losses = []
    for _ in range(4):
        loss = sft(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        selector.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(d.values.abs().sum() > 0 for _, _, d in sft.active_deltas())
    sft.eval()  # GPT-2 has dropout
    with torch.no_grad():
        unmerged = sft(input_ids=ids).logits
        plain = sft.merge_and_unload()
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, algorithm, eval_dataset=None, **args):
    model, targets = _tiny("llama")
    cfg = SftConfig(task_type="CAUSAL_LM", density=0.03, target_modules=targets, selection_algorithm=algorithm,
                    reselection_steps=2, selection_accumulation_steps=1, initial_reselection_rate=0.5)
    sft = get_peft_model(model, cfg)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=1, disable_tqdm=True, **{"save_strategy": "no", **args})
    trainer = SftTrainer(transformers.Trainer)(model=sft, args=targs, train_dataset=_Tokens(), eval_dataset=eval_dataset, sft_config=cfg)
    return trainer, sft


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_trainer_trains_deltas_with_accumulation_and_bf16(tmp_path, algorithm):
    trainer, sft = _trainer(tmp_path, algorithm, max_steps=6, gradient_accumulation_steps=2, bf16=True)
    start = {n: d.indices.clone() for n, _, d in sft.active_deltas()}
    base = {n: p.detach().clone() for n, p in sft.named_parameters() if "sft_delta" not in n}
    trainer.train()
    assert trainer.sft_selector.completed_steps == 6
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      SftAdamW if algorithm == "rigl" else torch.optim.Optimizer)
    assert any(not torch.equal(start[n], d.indices) for n, _, d in sft.active_deltas()), "no reselection happened"
    assert all(torch.equal(p, base[n]) for n, p in sft.named_parameters() if "sft_delta" not in n)
    assert all(d.values.abs().sum() > 0 for _, _, d in sft.active_deltas())


def test_trainer_checkpoints_hold_only_deltas_and_resume(tmp_path):
    trainer, sft = _trainer(tmp_path / "a", "rigl", max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "sft_selector.pt"} <= files
    assert "model.safetensors" not in files
    resumed, sft2 = _trainer(tmp_path / "b", "rigl", max_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (_, _, d1), (_, _, d2) in zip(sft.active_deltas(), sft2.active_deltas()):
        assert torch.equal(d1.indices, d2.indices)
        torch.testing.assert_close(d1.values, d2.values, atol=1e-6, rtol=1e-5)
    loaded = SftModel.from_pretrained(_tiny("llama")[0], tmp_path / "a" / "checkpoint-4")
    assert sum(d.values.numel() for _, _, d in loaded.active_deltas()) == sum(d.values.numel() for _, _, d in sft.active_deltas())


def test_trainer_evaluate_reports_eval_loss_and_gives_metrics_the_labels(tmp_path):
    """SftModel.forward(*args, **kwargs) hides `labels`; the Trainer must read the base model's."""
    seen = {}

    def metrics(pred):
        seen["labels"] = pred.label_ids
        return {"n": float(len(pred.label_ids))}

    trainer, sft = _trainer(tmp_path, "rigl", max_steps=1, per_device_eval_batch_size=4)
    trainer.compute_metrics = metrics
    assert trainer.label_names == ["labels"]
    result = trainer.evaluate(_Tokens(n=4))
    plain = transformers.Trainer(model=_tiny("llama")[0], args=trainer.args).evaluate(_Tokens(n=4))
    assert result["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)  # zero deltas: the base model's loss
    assert torch.equal(torch.as_tensor(seen["labels"]), _Tokens(n=4).ids)


def test_load_best_model_at_end_restores_the_best_checkpoints_deltas(tmp_path):
    trainer, sft = _trainer(tmp_path, "rigl", eval_dataset=_Tokens(n=4), max_steps=4, save_strategy="steps", save_steps=2,
                            eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                            greater_is_better=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")  # the higher loss "wins": the earlier checkpoint
    for path, same in ((best, True), (str(tmp_path / "checkpoint-4"), False)):
        saved = SftModel.from_pretrained(_tiny("llama")[0], path)
        equal = all(torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
                    for (_, _, a), (_, _, b) in zip(sft.active_deltas(), saved.active_deltas()))
        assert equal == same, path


def test_tied_lm_head_is_refused_with_what_to_do():
    model, targets = _tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight.*drop 'lm_head' from target_modules"):
        get_peft_model(model, SftConfig(density=0.01, target_modules=[*targets, "lm_head"]))
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def _bert_classifier(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def test_seq_cls_trains_saves_and_loads_the_classifier_head(tmp_path):
    from slope.peft import TaskType

    cfg = SftConfig(task_type=TaskType.SEQ_CLS, density=0.01, target_modules=["query", "value"])
    sft = get_peft_model(_bert_classifier(), cfg)
    head = sft.base_model.classifier
    assert head.weight.requires_grad and head.bias.requires_grad and sft.saved_parameter_names == ["classifier.bias", "classifier.weight"]
    before = head.weight.detach().clone()
    opt = SftAdamW([p for p in sft.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = torch.randint(0, VOCAB, (4, 8)), torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        sft(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(head.weight, before)
    sft.eval()
    with torch.no_grad():
        trained = sft(input_ids=ids).logits
    sft.save_pretrained(tmp_path)
    fresh = _bert_classifier()
    torch.nn.init.normal_(fresh.classifier.weight)  # a new head, as from_pretrained of a base checkpoint gives
    loaded = SftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="modules_to_save entry 'pooler_head' matches no module"):
        get_peft_model(_bert_classifier(), SftConfig(target_modules=["query"], modules_to_save=["pooler_head"]))
