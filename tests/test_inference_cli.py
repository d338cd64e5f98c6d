"""``slope eval`` / ``slope generate --mode {unmerged,merged,dense}``, ``slope eval --compare`` and
scripts/inference.sh on tiny checkpoints trained in-process (one module-scoped set of runs)."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from slope.checkpoint import CheckpointError
from slope.cli import INFERENCE_MODES, main
from slope.config import ConfigError, TrainConfig
from slope.evaluate import (
    LOSS_TOLERANCE,
    MODES,
    compare_checkpoint,
    eval_checkpoint,
    evaluate_loss,
    generate,
    load_trained_model,
    model_from_checkpoint,
    open_checkpoint,
)
from slope.lora import MergedSparseLinear, freeze_for_inference
from slope.registry import sparse_modules
from slope.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, seq_len=16, batch_size=2,
            eval_batches=2, log_every=100, save_every=0)
RUNS = {
    # adapters attached after step 3 and trained for 3 steps (lora_B no longer zero)
    "lora": dict(max_steps=6, eval_every=6, lazy_lora_fraction=0.5, lora_rank=4, lr=1e-2),
    "plain": dict(max_steps=2, eval_every=2, lazy_lora_fraction=0.0),
    "bf16": dict(max_steps=4, eval_every=4, lazy_lora_fraction=0.5, lora_rank=4, precision="bf16"),
    "dense": dict(max_steps=2, eval_every=2, dense=True),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is faster than two, especially on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    for name, settings in RUNS.items():
        train(TrainConfig(out=str(root / name), **TINY, **settings), progress=False, log=lambda line: None)
    return root


def last_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]["val_loss"]


def test_cli_modes_match_the_library():
    assert INFERENCE_MODES == MODES == ("unmerged", "merged", "dense")


def test_modes_build_their_forms_and_give_the_same_loss(runs):
    ckpt = open_checkpoint(runs / "lora")  # the run directory resolves to its checkpoint/
    assert ckpt.lora_attached and ckpt.path == runs / "lora" / "checkpoint"
    results = {}
    for mode in MODES:
        loaded = model_from_checkpoint(ckpt, mode, "cpu")
        layers = [m for _, m in sparse_modules(loaded.model)]
        if mode == "unmerged":
            assert layers and not any(isinstance(m, MergedSparseLinear) for m in layers)
            # the adapters were trained, so merging them is not a no-op
            assert all(m.lora_rank == 4 and m.lora_B.abs().max() > 0 for m in layers)
        elif mode == "merged":
            assert layers and all(isinstance(m, MergedSparseLinear) and m.inference_only and m.lora_rank == 4 for m in layers)
            assert loaded.memory.total_after < loaded.memory.total_before
        else:
            assert not layers
            assert all(isinstance(loaded.model.get_submodule(name), nn.Linear) for name in loaded.sparse_layers)
        assert len(loaded.sparse_layers) == 7  # q, k, v, o, gate, up, down of the one layer
        results[mode] = eval_checkpoint(runs / "lora", "cpu", mode=mode)
    assert results["unmerged"]["val_loss"] == pytest.approx(last_val_loss(runs / "lora"), rel=1e-6)
    for mode in ("merged", "dense"):
        assert results[mode]["val_loss"] == pytest.approx(results["unmerged"]["val_loss"], abs=1e-5)
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["val_tokens"] == 2 * 2 * 16 and r["sparse_layer_bytes"] > 0
    unmerged, merged, dense = (results[m] for m in MODES)
    assert merged["freeze"]["total_after"] < unmerged["weight_bytes"]  # mask_t dropped
    # after evaluating, the operands hold the merged layers' masks (slope.inference.operand_held)
    stacked, extended = [(64, 64)] * 4 + [(64, 128)], [(128, 64)] * 2  # (out, in): q k v o down; gate up
    # mask_bits, lora_A (fp32, rank 4) and lora_A_mask (bool) of every layer (both folds)
    held = sum(o * i // 8 + 4 * 4 * i + 4 * i for o, i in stacked + extended)
    assert merged["weight_bytes"] == merged["freeze"]["total_after"] - held
    assert dense["sparse_layer_bytes"] == sum(4 * (o * i) for o, i in [(64, 64)] * 4 + [(128, 64), (128, 64), (64, 128)])


def test_the_adapters_matter_beyond_the_tolerance(runs):
    """Dropping the trained adapters moves the loss by more than LOSS_TOLERANCE: agreement within it is meaningful."""
    loaded = load_trained_model(runs / "lora", "cpu")
    data_loss = eval_checkpoint(runs / "lora", "cpu")["val_loss"]
    from slope.evaluate import _validation

    _, batches = _validation(loaded.config, None)
    with torch.no_grad():
        for _, layer in sparse_modules(loaded.model):
            layer.lora_B.zero_()
    delta = abs(evaluate_loss(loaded.model, batches, loaded.device, "fp32") - data_loss)
    print(f"dropping the adapters changes the loss by {delta:.2e}")
    assert delta > 10 * LOSS_TOLERANCE["fp32"]


@pytest.mark.parametrize("run", ["lora", "bf16"])
def test_eval_compare_agrees(runs, capsys, run):
    assert main(["eval", "--checkpoint", str(runs / run), "--compare", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["modes"]) == list(MODES) and result["agree"] is True
    assert result["max_loss_diff"] <= result["loss_tolerance"] and result["max_logit_diff"] <= result["logit_tolerance"]
    losses = [r["val_loss"] for r in result["modes"].values()]
    assert result["max_loss_diff"] == max(abs(loss - losses[0]) for loss in losses)
    assert result["precision"] == ("bf16" if run == "bf16" else "fp32")
    assert main(["eval", "--checkpoint", str(runs / run), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "modes agree" in out and out.count("tokens/s") == 1 and out.count("parameter memory") == 3
    assert "freeze_for_inference" in out


def test_eval_compare_reports_a_disagreement(runs, capsys, monkeypatch):
    """A merged model that lost its adapters' contribution is caught: exit status 1, DISAGREE."""
    import slope.evaluate

    def freeze_and_break(model):
        report = freeze_for_inference(model)
        with torch.no_grad():
            for _, layer in sparse_modules(model):
                layer.lora_B.zero_()
        return report

    monkeypatch.setattr(slope.evaluate, "freeze_for_inference", freeze_and_break)
    assert main(["eval", "--checkpoint", str(runs / "lora"), "--compare"]) == 1
    captured = capsys.readouterr()
    assert "modes DISAGREE" in captured.out and "the inference modes disagree" in captured.err


def test_eval_single_mode_prints_throughput_and_memory(runs, capsys):
    assert main(["eval", "--checkpoint", str(runs / "lora" / "checkpoint"), "--mode", "merged"]) == 0
    out = capsys.readouterr().out
    assert "step 6 (merged): validation loss" in out and "tokens/s" in out
    assert "freeze_for_inference:" in out and "of which pruned layers" in out
    assert "note:" not in out


def test_merged_without_adapters_falls_back(runs, capsys):
    assert main(["eval", "--checkpoint", str(runs / "plain"), "--mode", "merged", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert "no LoRA adapters" in merged["note"]
    assert merged["val_loss"] == pytest.approx(last_val_loss(runs / "plain"), abs=1e-5)
    loaded = load_trained_model(runs / "plain", "cpu", "merged")
    layers = [m for _, m in sparse_modules(loaded.model)]
    assert layers and all(isinstance(m, MergedSparseLinear) and m.inference_only and m.lora_rank == 0 for m in layers)
    assert main(["generate", "--checkpoint", str(runs / "plain"), "--mode", "merged", "--prompt", "x =",
                 "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert "no LoRA adapters" in capsys.readouterr().err


def test_generate_greedy_is_the_same_in_every_mode(runs, capsys):
    texts = {}
    for mode in MODES:
        args = ["generate", "--checkpoint", str(runs / "lora"), "--prompt", "def main(", "--max-new-tokens", "6",
                "--temperature", "0", "--mode", mode]
        assert main(args) == 0
        captured = capsys.readouterr()
        texts[mode] = captured.out
        assert captured.out.startswith("def main(") and len(captured.out) > len("def main(\n")
        assert f"[{mode}]" in captured.err and "tokens/s" in captured.err and "parameter memory" in captured.err
    assert texts["merged"] == texts["unmerged"] == texts["dense"]
    # token level, with the KV cache: the merged model emits the unmerged model's tokens
    gens = {mode: generate(load_trained_model(runs / "lora", "cpu", mode), "import os", max_new_tokens=5, temperature=0)
            for mode in ("unmerged", "merged")}
    assert gens["merged"].text == gens["unmerged"].text and gens["merged"].prompt_tokens > 0
    assert 0 < gens["merged"].new_tokens <= 5 and gens["merged"].tokens_per_s > 0


def test_sampling_depends_on_the_seed_not_the_mode(runs):
    merged = load_trained_model(runs / "lora", "cpu", "merged")
    unmerged = load_trained_model(runs / "lora", "cpu", "unmerged")
    a = generate(merged, "for i in", max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(unmerged, "for i in", max_new_tokens=8, temperature=1.0, seed=3)
    assert a.text == b.text


def test_errors(runs, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "slope eval: error: no checkpoint at" in err and "slope train --out" in err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    for command in (["eval"], ["generate", "--prompt", "x"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--checkpoint", str(runs / "lora"), "--mode", "fused"])
        assert e.value.code == 2
        assert "invalid choice: 'fused'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(runs / "lora"), "--compare", "--mode", "dense"])
    assert e.value.code == 2 and "--compare evaluates every mode; drop --mode" in capsys.readouterr().err
    for flags, message in ((["--compare", "--mode", "dense"], "--compare decodes in every mode; drop --mode"),
                           (["--batch", "2"], "--batch applies to --compare")):  # were silently ignored
        with pytest.raises(SystemExit) as e:
            main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "x", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    with pytest.raises(ConfigError, match="mode 'fused' is not an inference mode; choose one of unmerged, merged, dense"):
        model_from_checkpoint(open_checkpoint(runs / "lora"), "fused", "cpu")
    with pytest.raises(CheckpointError, match="not a slope checkpoint"):
        open_checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(runs / "dense"), "--mode", "merged"]) == 1
    assert "is a dense checkpoint (--dense)" in capsys.readouterr().err
    for form in ("merged", "sparse"):  # export's advice names its own option
        assert main(["export", str(runs / "dense"), "--output-dir", str(tmp_path / form), "--form", form]) == 1
        err = capsys.readouterr().err
        assert f"is a dense checkpoint (--dense, or its dense tail was reached): it has no {form} form; export it with --form dense" in err
        assert "--mode" not in err and not (tmp_path / form).exists()
    assert main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "", "--mode", "merged"]) == 1
    assert "--prompt is empty" in capsys.readouterr().err


def test_dense_checkpoint_compares_its_one_form(runs):
    result = compare_checkpoint(runs / "dense", "cpu")
    assert list(result["modes"]) == ["dense"] and result["agree"] and "one form" in result["note"]
    assert result["modes"]["dense"]["val_loss"] == pytest.approx(last_val_loss(runs / "dense"), rel=1e-6)


def test_inference_script_reports_a_missing_checkpoint(tmp_path):
    out = subprocess.run(["bash", str(REPO / "scripts" / "inference.sh"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no checkpoint at" in out.stderr and "scripts/train.sh" in out.stderr


def test_generate_compare_reports_tokens_per_s_of_every_mode(runs, capsys):
    assert main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "def main(", "--compare",
                 "--max-new-tokens", "5", "--batch", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def main(")
    rows = {line.split()[0]: line.split() for line in captured.err.splitlines() if line.split() and line.split()[0] in MODES}
    assert set(rows) == set(MODES)
    for mode, row in rows.items():
        prefill, decode = (float(v.replace(",", "")) for v in row[1:3])
        assert prefill > 0 and decode > 0, row
    assert rows["dense"][-1] == "1.00x" and "differ" not in captured.err  # greedy texts of the modes agree
    # a dense checkpoint has one form
    assert main(["generate", "--checkpoint", str(runs / "dense"), "--prompt", "x", "--compare",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().err.splitlines()[2:]] == ["dense"]


def test_static_decode_matches_hugging_face_generate(runs):
    """The static-KV-cache loop behind --compare / --cuda-graphs emits generate's greedy tokens."""
    from slope.inference.decode import static_decode

    for mode in ("merged", "unmerged"):
        loaded = load_trained_model(runs / "lora", "cpu", mode)
        ids = torch.tensor([[5, 9, 2, 7], [1, 3, 3, 8]])
        hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   min_new_tokens=6, pad_token_id=0)
        run = static_decode(loaded.model, ids, 6)
        assert torch.equal(run.tokens, hf) and run.decode_tokens_per_s > 0 and not run.cuda_graphs
        sampled = [static_decode(loaded.model, ids, 4, temperature=1.0, top_k=20, seed=s).tokens for s in (1, 1, 2)]
        assert torch.equal(sampled[0], sampled[1])


def test_cuda_graphs_without_cuda_is_a_clear_error(runs, capsys):
    from slope.inference.decode import static_decode

    assert main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "x", "--cuda-graphs", "--device", "cpu"]) == 1
    assert "--cuda-graphs needs a CUDA device, not cpu" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "x", "--compare", "--cuda-graphs",
                 "--device", "cpu"]) == 1
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        static_decode(load_trained_model(runs / "lora", "cpu", "merged").model, torch.tensor([[1, 2]]), 2, cuda_graphs=True)
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(runs / "lora"), "--prompt", "x", "--compare", "--batch", "0"])
    assert "--batch must be >= 1" in capsys.readouterr().err
