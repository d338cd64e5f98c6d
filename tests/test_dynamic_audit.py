"""slope.dynamic after the seed-000 audit: GPT-2 Conv1D layers, masks that follow the model's device,
gradual N:M without overshoot, warnings for runs too short for their mask updates, honest records."""
import json
import warnings

import pytest
import torch
import torch.nn as nn

from slope.dynamic import DynamicSparsity
from slope.masks import is_nm_sparse
from slope.optimizers import ADAMWSparse
from slope.sparsity import MaskedWeights

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(200)]


def _gpt2(vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _train(model, sp, steps, sparse=False):
    """``steps`` optimizer steps on fixed random tokens; returns the records of the mask changes."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sparse_opt = ADAMWSparse(model, lr=1e-2) if sparse else None
    x = torch.randint(0, 64, (2, 16))
    records = []
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        for o in filter(None, (opt, sparse_opt)):
            o.step()
            o.zero_grad()
        records += sp.step(sparse_opt or opt)
    return records


# ---------------------------------------------------------------------- 1. GPT-2 Conv1D
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_gpt2_unstructured_rigl_masks_conv1d_weights():
    model = _gpt2()
    sp = DynamicSparsity(model, 4, sparsity_ratio=0.5, mask_update_interval=2, mask_update_fraction=0.5)
    assert sorted(sp.masked.masks) == sorted(f"transformer.h.0.{n}.weight" for n in CONV1D)
    records = _train(model, sp, 4)
    assert [r["step"] for r in records] == [2] and all(layer["changed"] > 0 for layer in records[0]["layers"].values())
    for layer in records[0]["layers"].values():  # flips: the dropped that stayed out and as many newly grown
        assert layer["changed"] == 2 * (layer["dropped"] - layer["regrown"]) and layer["grown"] == layer["dropped"]
    for name, mask in sp.masked.masks.items():
        weight = model.get_parameter(name)
        assert int(mask.sum()) == mask.numel() // 2 and not weight[~mask].any()


@pytest.mark.parametrize("structure", [(2, 4), (4, 8)])
def test_gpt2_nm_groups_run_along_the_input_dimension(structure, tmp_path):
    """Conv1D stores (in, out): its groups of M are along dim 0 (gradual masks; SLoPe layers for RigL)."""
    n, m = structure
    gradual = _gpt2()
    sp = DynamicSparsity(gradual, 4, sparsity_type=f"{n}:{m}", use_rigl=False, sparsity_schedule="linear", mask_update_interval=1)
    _train(gradual, sp, 4)
    for name, mask in sp.masked.masks.items():
        assert mask.shape == gradual.get_parameter(name).shape
        assert is_nm_sparse(mask, n, m, dim=0, exact=True) and not is_nm_sparse(mask, n, m, dim=1), name
    rigl = _gpt2()
    sp = DynamicSparsity(rigl, 4, sparsity_type=f"{n}:{m}", mask_update_interval=2, compress=False, double_pruning=False)
    records = _train(rigl, sp, 4, sparse=True)
    assert [r["kind"] for r in records] == ["rigl"]
    from transformers import GPT2LMHeadModel

    from slope.io import export_dense

    export_dense(rigl, tmp_path)
    dense = GPT2LMHeadModel.from_pretrained(tmp_path)
    for name in CONV1D:
        weight = dense.get_submodule(f"transformer.h.0.{name}").weight  # (in, out) again
        assert is_nm_sparse(weight != 0, n, m, dim=0), name


def test_gpt2_sparse_finetune_unstructured(tmp_path):
    from slope.dynamic import sparse_finetune

    model = sparse_finetune(_gpt2(vocab=4096), DOCS, sparsity_ratio=0.5, max_steps=3, batch_size=2, gradient_accumulation_steps=1,
                            max_seq_length=16, eval_batches=1, warmup_steps=0, mask_update_interval=1, progress=False,
                            learning_rate=1e-3, output_dir=tmp_path)
    assert model.finetune_summary["final_sparsity"] == pytest.approx(0.5)
    assert model.finetune_summary["mask_updates"] == 2  # RigL after steps 1 and 2 (not the initial pruning)


# ---------------------------------------------------------------------- 2. masks follow their parameter's device
def test_masks_move_to_their_parameters_device_when_used():
    """A model moved after its masks were set (the Trainer recipe: DynamicSparsity(model), then the
    Trainer moves the model to CUDA). Here the parameter lives on 'meta' and the stale mask on the CPU;
    every path that uses a mask must bring it to the parameter's device first."""
    weight = nn.Parameter(torch.empty(8, 8, device="meta"))
    masked = MaskedWeights({"w": weight})
    stale = torch.rand(8, 8) > 0.5

    masked.masks["w"] = stale
    masked.apply_()
    assert masked.masks["w"].device.type == "meta"

    masked.masks["w"] = stale
    (torch.randn(2, 8, device="meta") @ weight).sum().backward()  # the gradient hook
    assert masked.masks["w"].device.type == "meta" and weight.grad.device.type == "meta"

    masked.masks["w"] = stale
    changed = masked.set_mask("w", torch.rand(8, 8) > 0.5)
    assert changed.device.type == "meta" and masked.masks["w"].device.type == "meta"


@pytest.mark.gpu
def test_dynamic_sparsity_built_on_cpu_trains_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    sp = DynamicSparsity(model, 4, sparsity_ratio=0.5, mask_update_interval=2, mask_update_fraction=0.5)
    model.to("cuda")  # what transformers.Trainer does after the recipe built the sparsifier
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16), device="cuda")
    for _ in range(4):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(opt)
    assert [r["step"] for r in sp.history] == [0, 2]
    for name, mask in sp.masked.masks.items():
        weight = sp.masked.params[name]
        assert mask.device == weight.device and int(mask.sum()) == mask.numel() // 2 and not weight[~mask].any()


# ---------------------------------------------------------------------- 5. gradual N:M: no overshoot, honest records
def _seed_linear(step, total_steps):  # seed 000's example schedule: 0.1 -> 0.9
    return 0.1 + 0.8 * min(1.0, step / total_steps)


def _toy():
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def test_nm_keep_per_group_never_prunes_more_than_asked():
    from slope.dynamic.gradual import nm_keep_per_group

    for n, m in ((2, 4), (1, 4), (4, 8)):
        for i in range(101):
            s = i / 100
            keep = nm_keep_per_group(s, n, m)
            smallest = next(k for k in range(m + 1) if k / m >= 1 - s - 1e-12)  # fewest kept with sparsity <= s
            assert keep == max(n, smallest), (n, m, s)


def test_gradual_nm_steps_through_k_of_m_and_records_the_actual_sparsity():
    model = _toy()
    with pytest.warns(UserWarning, match=r"ends at 0.9, more than 2:4 holds \(0.5\)"):
        sp = DynamicSparsity(model, 8, sparsity_type="2:4", use_rigl=False, sparsity_schedule=_seed_linear, mask_update_interval=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 16)
    for _ in range(8):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step(opt)
    assert [r["step"] for r in sp.history] == [0, 3, 6, 8]
    assert [r["target"] for r in sp.history] == pytest.approx([0.1, 0.4, 0.7, 0.9])
    assert [r["sparsity"] for r in sp.history] == pytest.approx([0.0, 0.25, 0.5, 0.5])  # 4:4, 3:4, 2:4, 2:4


# ---------------------------------------------------------------------- 3. runs too short for their mask updates
def test_runs_too_short_for_their_mask_updates_are_warned_of():
    with pytest.warns(UserWarning, match=r"RigL makes no mask update in this run of 100 steps.*lower mask_update_interval"):
        DynamicSparsity(_toy(), 100)  # updates after steps 100, 200, ...: none below 100
    with pytest.warns(UserWarning, match=r"gradual pruning: 100% of the schedule's pruning happens after the last"):
        DynamicSparsity(_toy(), 5, use_rigl=False, mask_update_interval=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicSparsity(_toy(), 101)  # one RigL update, after step 100
        DynamicSparsity(_toy(), 40, use_rigl=False, mask_update_interval=10)  # cubic: at 50 % by step 30
        DynamicSparsity(_toy(), 10, use_rigl=False, sparsity_schedule=_seed_linear, mask_update_interval=2)


# ---------------------------------------------------------------------- 6, 7. what the summary says
def test_summary_records_the_schedule_and_counts_real_mask_updates(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slope.dynamic import sparse_finetune

    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.warns(UserWarning, match=r"sparsity_ratio=0.7 is not used: the callable sparsity_schedule"):
        sparse_finetune(model, DOCS, sparsity_ratio=0.7, use_rigl=False, sparsity_schedule=_seed_linear, max_steps=4,
                        mask_update_interval=2, batch_size=2, gradient_accumulation_steps=1, max_seq_length=16, eval_batches=1,
                        warmup_steps=0, progress=False, gradient_checkpointing=False, output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["sparsity_ratio"] == pytest.approx(0.9) and summary["config"]["sparsity_ratio_given"] == 0.7
    assert summary["config"]["sparsity_schedule"] == "_seed_linear"
    assert summary["final_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["mask_updates"] == 2 and summary["mask_updates_skipped"] == 0  # after steps 2 and 4


def test_mask_update_count_leaves_out_the_initial_prune_and_skipped_updates():
    from slope.dynamic.cli import _result_line
    from slope.dynamic.finetune import count_mask_updates

    records = [{"event": "mask_update", "step": 0, "kind": "prune"}, {"event": "train", "step": 1},
               {"event": "mask_update", "step": 2, "kind": "rigl"}, {"event": "mask_update", "step": 4, "kind": "rigl", "skipped": "x"},
               {"event": "mask_update", "step": 6, "kind": "rigl"}]
    counts = count_mask_updates(records)
    assert counts == {"mask_updates": 2, "mask_updates_skipped": 1}
    assert count_mask_updates(records[:2]) == {"mask_updates": 0, "mask_updates_skipped": 0}  # a static mask
    line = _result_line({"final_sparsity": 0.5, **counts})
    assert line == " | sparsity 0.5000 | initial prune + 2 mask updates (1 skipped)"


# ---------------------------------------------------------------------- 4, 8, 9, 10, 12. the command line and bad input
def _llama(vocab=4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_cli_takes_text_field_compress_double_pruning_and_progress(tmp_path, capsys):
    from slope.cli import main

    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    _llama().save_pretrained(model_dir)
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    args = ["sparse-finetune", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
            "--text_field", "body", "--sparsity-type", "2:4", "--no-compress", "--no-double-pruning", "--no-progress",
            "--mask-update-interval", "1", "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1",
            "--max-seq-length", "16", "--eval-batches", "1", "--warmup-steps", "0", "--no-gradient-checkpointing"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert "initial prune + 1 mask updates" in out.out
    config = json.loads((tmp_path / "out" / "summary.json").read_text())["config"]
    assert (config["text_field"], config["compress"], config["double_pruning"], config["progress"]) == ("body", False, False, False)


def test_cli_one_line_errors(tmp_path, capsys):
    from slope.cli import main

    base = ["sparse-finetune", "--max-steps", "1"]
    assert main(base + ["--model", str(tmp_path / "nomodel")]) == 1
    assert f"no model folder at {tmp_path / 'nomodel'}" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path), "--resume-from-checkpoint", "latest"]) == 1
    assert "--resume-from-checkpoint latest resumes the newest checkpoint in --output-dir: give --output-dir" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path), "--pruning-method", "torch.nn.utils.prune:LnStructured"]) == 1
    err = capsys.readouterr().err
    assert "the command line takes a torch.nn.utils.prune.BasePruningMethod class that builds without arguments" in err
    assert len(err.strip().splitlines()) == 1


def test_python_api_errors_name_the_api_arguments(tmp_path):
    from slope.data import DataError
    from slope.dynamic import sparse_finetune

    with pytest.raises(DataError, match=r"smaller max_seq_length \(--max-seq-length\)"):
        sparse_finetune(_llama(), ["def f(x): return x"], max_seq_length=64, max_steps=1)
    with pytest.raises(DataError, match=r"^dataset .*missing\.jsonl: no such file"):
        sparse_finetune(_llama(), str(tmp_path / "missing.jsonl"), max_steps=1)
    with pytest.raises(ValueError, match=r"save_steps=2 writes checkpoint-<step> folders into output_dir: give output_dir"):
        sparse_finetune(_llama(), DOCS, max_steps=4, save_steps=2)
    if not torch.cuda.is_available():
        from slope.evaluate import resolve_device

        with pytest.raises(Exception, match=r"use device 'cpu' \(--device cpu\)"):
            resolve_device("cuda")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="mask_update_fraction must be a number in"):
        DynamicSparsity(_toy(), 10, mask_update_fraction="x")
    with pytest.raises(ValueError, match=r"no linear layer can be 2:3 sparse.*divisible by M=3") as info:
        DynamicSparsity(_llama(vocab=64), 10, sparsity_type="2:3")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- 11. the Trainer's log history
def test_trainer_log_history_holds_the_sparsity(tmp_path):
    from transformers import Trainer, TrainingArguments

    from slope.dynamic import DynamicSparsityCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    model = _llama(vocab=64)
    sp = DynamicSparsity(model, 2, sparsity_ratio=0.5, mask_update_interval=1)
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to=[],
                              save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=[DynamicSparsityCallback(sp)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["sparsity"] == pytest.approx(0.5) for entry in logged)


# ---------------------------------------------------------------------- 14. top-k attention and Gemma 2's softcap
def test_topk_attention_keeping_every_key_is_gemma2_eager_attention_with_softcap():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from slope.dynamic.attention import topk_attention

    q, k, v = torch.randn(2, 4, 7, 8) * 3, torch.randn(2, 2, 7, 8) * 3, torch.randn(2, 2, 7, 8)
    mask = torch.where(torch.ones(7, 7, dtype=torch.bool).tril(), 0.0, torch.finfo(torch.float32).min).expand(2, 1, 7, 7)
    module = nn.Module().eval()
    module.config = type("C", (), {"topk_attention_ratio": 1.0})()
    module.is_causal, module.num_key_value_groups, module.head_dim = True, 2, 8
    expected, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=2.0)
    out, _ = topk_attention(module, q, k, v, mask, scaling=0.3, softcap=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"does not support attention sinks \(s_aux"):
        topk_attention(module, q, k, v, mask, scaling=0.3, s_aux=torch.zeros(4))
