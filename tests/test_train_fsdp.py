"""``slope train --fsdp``: 2 gloo ranks under torchrun give the run of one process (losses and
final weights), through the lazy adapters' start (they join a sharded model whole on every rank),
and its checkpoints resume in either layout; the settings FSDP cannot honour are refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_runs import CLI_TINY, assert_same_run, cli, torchrun  # noqa: E402

pytestmark = pytest.mark.distributed

DENSE_TINY = CLI_TINY[:CLI_TINY.index("--lazy-lora-fraction")] + ["--dense"]  # (--dense has no adapters)
FSDP_LINE = ("2 ranks (FSDP2: dense weights, gradients and AdamW moments split row-wise; each SLoPe layer's values, "
             "gradient and moments on one rank)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 4, accumulation 2, adapters from step 3 (and the dense baseline)."""
    root = tmp_path_factory.mktemp("train_fsdp")
    cli("--out", str(root / "ref"), *CLI_TINY)
    cli("--out", str(root / "ref_dense"), *DENSE_TINY)
    return root


def test_two_ranks_match_one_process_through_the_adapters_start(reference):
    stdout = torchrun("--out", str(reference / "fsdp"), *CLI_TINY, "--fsdp")
    assert FSDP_LINE in stdout
    assert stdout.count("step 2: lazy LoRA attached") == 1  # rank 0 logs alone
    assert_same_run(reference / "fsdp", reference / "ref")
    # What rank 0 holds between steps (the summary's counted bytes): about half of one process's.
    held, whole = _memory_per_rank(reference / "fsdp"), _memory_per_rank(reference / "ref")
    for part in ("parameters", "sparse_values", "dense_optimizer", "sparse_optimizer"):
        assert 0.4 < held[part] / whole[part] < 0.65, (part, held[part], whole[part])


def _memory_per_rank(out: Path) -> dict[str, int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "summary")["memory_per_rank"]


def test_resume_across_layouts(reference):
    """Stopped after step 3 (adapters attached mid-run to the sharded model): FSDP resumes it, and
    one process does; a one-process checkpoint of step 3 resumes under FSDP. Each is the run."""
    root = reference
    torchrun("--out", str(root / "fsdp_to_fsdp"), *CLI_TINY, "--fsdp", "--stop-after", "3")
    stdout = torchrun("--out", str(root / "fsdp_to_fsdp"), "--resume")  # (--fsdp is the checkpoint's setting)
    assert FSDP_LINE in stdout and "resumed from" in stdout
    assert_same_run(root / "fsdp_to_fsdp", root / "ref")

    torchrun("--out", str(root / "fsdp_to_one"), *CLI_TINY, "--fsdp", "--stop-after", "3")
    cli("--out", str(root / "fsdp_to_one"), "--resume")  # (says FSDP has nothing to shard in one process)
    assert_same_run(root / "fsdp_to_one", root / "ref")

    cli("--out", str(root / "one_to_fsdp"), *CLI_TINY, "--stop-after", "3")
    torchrun("--out", str(root / "one_to_fsdp"), "--resume", "--fsdp", "--gradient-checkpointing")  # (recomputing changes nothing)
    assert_same_run(root / "one_to_fsdp", root / "ref")


def test_accelerate_fsdp_launch_with_activation_checkpointing(reference):
    """An accelerate FSDP config (SHARD_GRAD_OP, activation checkpointing) shards without --fsdp;
    recomputing the activations changes no number."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    stdout = torchrun("--out", str(reference / "accelerate"), *CLI_TINY, env=env)
    assert FSDP_LINE in stdout
    assert_same_run(reference / "accelerate", reference / "ref")


def test_dense_baseline_under_fsdp(reference):
    stdout = torchrun("--out", str(reference / "dense"), *DENSE_TINY, "--fsdp")
    assert "2 ranks (FSDP2: dense weights, gradients and AdamW moments split row-wise)" in stdout
    assert_same_run(reference / "dense", reference / "ref_dense")


def test_one_process_trains_unsharded_and_says_so(tmp_path, capsys):
    cli("--out", str(tmp_path / "run"), *CLI_TINY, "--fsdp", "--max-steps", "1", "--lazy-lora-fraction", "0")
    assert "FSDP in one process has nothing to shard" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16"], "not fp16"),
    (["--dense-tail-fraction", "0.5"], "dense tail"),
])
def test_refused_settings(tmp_path, capsys, flags, message):
    from slope.cli import main

    with pytest.raises(SystemExit) as exit_info:  # (argparse's usage error: checked before any work)
        main(["train", "--out", str(tmp_path / "run"), *CLI_TINY, "--fsdp", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("slope: error: fsdp = True is invalid") and message in error
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_refused_with_deepspeed_and_under_an_accelerate_fsdp_launch(tmp_path, monkeypatch):
    from slope.config import ConfigError, TrainConfig
    from slope.train import train

    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(fsdp=True, deepspeed=str(ds_json)).validate()
    # An accelerate FSDP config asks for FSDP without --fsdp: the same refusals, before any work.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="not fp16"):
        train(TrainConfig(out=str(tmp_path / "run"), precision="fp16", max_steps=1))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        train(TrainConfig(out=str(tmp_path / "run"), max_steps=1))
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_tied_embeddings_are_stored_once(reference):
    """GPT-2 ties lm_head to the input embedding: the gathered FSDP checkpoint keeps one tensor under
    both names, as one process does (dropout off: N ranks then give the run of one process)."""
    config = reference / "gpt2.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2, "n_positions": 64,
                                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}))
    sizes = {"--hidden-size", "--intermediate-size", "--num-layers", "--num-heads"}  # (the file sets them)
    flags = [f for i, f in enumerate(CLI_TINY) if f not in sizes and CLI_TINY[i - 1] not in sizes] + ["--model-config", str(config)]
    cli("--out", str(reference / "gpt2_ref"), *flags)
    torchrun("--out", str(reference / "gpt2_fsdp"), *flags, "--fsdp")
    assert_same_run(reference / "gpt2_fsdp", reference / "gpt2_ref")  # (the same keys: lm_head.weight is an alias)
    sizes = [(reference / run / "checkpoint" / "model.safetensors").stat().st_size for run in ("gpt2_ref", "gpt2_fsdp")]
    assert sizes[0] == sizes[1]


def test_a_dense_tail_checkpoint_is_not_resumed_under_fsdp(reference):
    """A run stopped in its dense tail has dense layers: FSDP refuses to resume it in one line."""
    out = reference / "dense_tail"
    tail = [*CLI_TINY[:CLI_TINY.index("--lazy-lora-fraction")], "--lazy-lora-fraction", "0", "--dense-tail-fraction", "0.5"]
    cli("--out", str(out), *tail, "--stop-after", "3")
    output = torchrun("--out", str(out), "--resume", "--fsdp", "--dense-tail-fraction", "0", fails=True)
    assert "is in the run's dense tail (its SLoPe layers became dense nn.Linear), which FSDP cannot resume: continue it with --no-fsdp" in output
    assert "Traceback" not in output.split("slope train: error")[0]


def test_refused_before_any_folder_is_made(tmp_path, monkeypatch):
    """An accelerate config's mixed precision other than --precision, or a setting refused during
    set-up, leaves no --out folder behind."""
    from slope.config import ConfigError, TrainConfig
    from slope.train import train

    with pytest.raises(Exception, match="tokenizer"):
        train(TrainConfig(out=str(tmp_path / "tok"), tokenizer=str(tmp_path / "missing" / "tokenizer.json"), max_steps=1))
    assert not (tmp_path / "tok").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision: bf16; pass --precision bf16"):
        train(TrainConfig(out=str(tmp_path / "run"), max_steps=1))
    assert not (tmp_path / "run").exists()


def test_an_accelerate_config_checkpointing_a_model_without_support_is_refused(monkeypatch):
    import transformers

    from slope.config import ConfigError, TrainConfig
    from slope.train_fsdp import shard_model

    monkeypatch.setattr(transformers.LlamaForCausalLM, "supports_gradient_checkpointing", False)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match="does not support it"):
        shard_model(model, {"activation_checkpointing": True, "reshard_after_forward": True}, TrainConfig(), lambda line: None)
