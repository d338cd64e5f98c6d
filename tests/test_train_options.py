"""``slope train --tokenizer``, ``--model-config``, ``--report-to``: the run uses them, its checkpoint
records them, and eval / generate / export / resume rebuild the same tokenizer and architecture."""
import json
import os
import random
import shutil
import subprocess
import sys
import types

import pytest
import torch

from slope.checkpoint import read_checkpoint
from slope.cli import main
from slope.config import ConfigError, TrainConfig
from slope.data import DataError, load_splits, open_tokenizer
from slope.evaluate import eval_checkpoint, generate, load_trained_model
from slope.train import train

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, seq_len=16, batch_size=2, eval_batches=2,
            log_every=1, eval_every=100, save_every=0, lazy_lora_fraction=0.0)
WORDS = "the a cat dog sat on mat and ran far away over hill quick brown fox jumps lazy river tree house".split()


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """An English .txt dataset, a byte-level BPE trained on it as tokenizer.json (EOS ``</s>``) and the
    same tokenizer as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("english")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(1500))
    (root / "english.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(root / "folder")
    return root


def tiny(tmp_path, name="run", **kw):
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})


def losses(cfg):
    return [r["loss"] for r in map(json.loads, open(f"{cfg.out}/metrics.jsonl")) if "loss" in r and "event" not in r]


# ---------------------------------------------------------------------- --tokenizer
def test_tokenizer_file_and_folder_tokenize_alike(english):
    by_file, by_folder = open_tokenizer(english / "tokenizer.json"), open_tokenizer(english / "folder")
    assert by_file.vocab_size == by_folder.vocab_size == 300 and by_file.eos_id == by_folder.eos_id == 1
    text = "the quick brown fox sat on the mat."
    assert by_file.encode(text) == by_folder.encode(text) and by_file.decode(by_file.encode(text)) == text
    a = load_splits(str(english / "english.txt"), 16, tokenizer=english / "tokenizer.json")
    b = load_splits(str(english / "english.txt"), 16, tokenizer=str(english / "folder"))
    shipped = load_splits(str(english / "english.txt"), 16)
    assert a.fingerprint == b.fingerprint != shipped.fingerprint and a.vocab_size == 300 and shipped.vocab_size == 4096


def test_run_with_a_tokenizer_keeps_it_for_eval_generate_export(english, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(english / "folder", tok_dir)
    cfg = tiny(tmp_path, dataset=str(english / "english.txt"), tokenizer=str(tok_dir), max_steps=3)
    summary = train(cfg, progress=False, log=lambda line: None)
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    assert ckpt.trainer_state["vocab_size"] == 300 and ckpt.trainer_state["eos_id"] == 1
    assert ckpt.model_state["model.embed_tokens.weight"].shape[0] == 300
    assert (ckpt.path / "tokenizer" / "tokenizer.json").is_file()
    shutil.rmtree(tok_dir)  # the checkpoint's copy serves from now on
    result = eval_checkpoint(cfg.out, "cpu")
    assert result["val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6) and result["note"] is None
    loaded = load_trained_model(cfg.out, "cpu")
    gen = generate(loaded, "the cat sat", max_new_tokens=4, temperature=0)
    assert gen.text.startswith("the cat sat") and gen.prompt_tokens == len(open_tokenizer(english / "tokenizer.json").encode("the cat sat"))
    from slope.inference.speed import compare_speed

    (speed,) = compare_speed(cfg.out, "the cat sat", device="cpu", max_new_tokens=3, modes=("dense",))
    assert speed.text.startswith("the cat sat")  # the shipped BPE would encode ids beyond this 300-token vocabulary
    assert main(["export", cfg.out, "--output-dir", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == "</s>" and hf_tok("the dog ran", add_special_tokens=False).input_ids == open_tokenizer(
        english / "tokenizer.json").encode("the dog ran")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([hf_tok("the dog ran over the hill").input_ids])
    torch.testing.assert_close(hf(input_ids=ids).logits, load_trained_model(cfg.out, "cpu", "dense").model(input_ids=ids).logits)


def test_tokenizer_errors_are_one_line(english, tmp_path, capsys):
    no_eos = tmp_path / "no_eos.json"
    data = json.loads((english / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    data["model"]["vocab"].pop("</s>")
    no_eos.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no end-of-text token"):
        open_tokenizer(no_eos)
    (tmp_path / "junk.json").write_text("{}")
    for bad, message in [(tmp_path / "missing", "no such file or folder"), (tmp_path / "junk.json", "not a tokenizers JSON file")]:
        assert main(["train", "--out", str(tmp_path / "r"), "--tokenizer", str(bad), "--max-steps", "1"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("slope train: error: --tokenizer") and message in err and "\n" not in err


def test_a_tokenizer_run_loads_for_oneshot_with_its_own_tokenizer(english, tmp_path):
    from slope.pruning.loading import load_model

    cfg = tiny(tmp_path, tokenizer=str(english / "tokenizer.json"), dataset=str(english / "english.txt"), max_steps=1)
    train(cfg, progress=False, log=lambda line: None)
    model, tok = load_model(cfg.out)
    text = "the quick brown fox sat on the mat."
    assert len(tok) == 300 and tok(text, add_special_tokens=False)["input_ids"] == open_tokenizer(english / "tokenizer.json").encode(text)
    assert model.config.vocab_size == 300 and tok.padding_side == "left"  # (it was the shipped 4096-token BPE)


# ---------------------------------------------------------------------- --model-config
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_model_type_is_built_with_the_size_flags_and_resumes_exactly(kind, english, tmp_path):
    data = str(english / "english.txt")
    full = tiny(tmp_path, "full", model_config=kind, max_steps=4, dataset=data)
    train(full, progress=False, log=lambda line: None)
    part = tiny(tmp_path, "part", model_config=kind, max_steps=4, stop_after=2, dataset=data)
    train(part, progress=False, log=lambda line: None)
    train(part.updated({"stop_after": None, "resume": True}), progress=False, log=lambda line: None)
    assert losses(part) == losses(full)  # the resumed run is the uninterrupted one
    ckpt = read_checkpoint(f"{full.out}/checkpoint")
    stored = ckpt.model_config
    assert stored["model_type"] == kind and stored["vocab_size"] == 4096
    assert (stored.get("hidden_size", stored.get("n_embd")), stored.get("num_hidden_layers", stored.get("n_layer"))) == (64, 1)
    for mode in ("unmerged", "dense"):
        loaded = load_trained_model(full.out, "cpu", mode)
        assert loaded.model.config.model_type == kind
    assert eval_checkpoint(full.out, "cpu")["val_loss"] == pytest.approx(
        [r for r in map(json.loads, open(f"{full.out}/metrics.jsonl")) if "val_loss" in r][-1]["val_loss"], abs=1e-6)


def test_tied_embeddings_are_stored_once_and_resume_exactly(english, tmp_path):
    """A config file that ties the input and output embeddings (GPT-2's default, Qwen2-0.5B): the
    checkpoint stores the shared tensor once and loads it tied again."""
    from safetensors import safe_open

    config = tmp_path / "gpt2"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 2}))
    data = str(english / "english.txt")
    full = tiny(tmp_path, "full", model_config=str(config), max_steps=4, dataset=data)
    train(full, progress=False, log=lambda line: None)
    part = tiny(tmp_path, "part", model_config=str(config), max_steps=4, stop_after=2, dataset=data)
    train(part, progress=False, log=lambda line: None)
    train(part.updated({"stop_after": None, "resume": True}), progress=False, log=lambda line: None)
    assert losses(part) == losses(full)
    with safe_open(f"{full.out}/checkpoint/model.safetensors", "pt") as f:
        stored = set(f.keys())
    ckpt = read_checkpoint(f"{full.out}/checkpoint")
    assert set(ckpt.model_state) - stored == {"lm_head.weight"}  # the tied name, restored on reading
    assert ckpt.model_state["lm_head.weight"] is ckpt.model_state["transformer.wte.weight"]
    model = load_trained_model(full.out, "cpu", "dense").model
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    assert torch.equal(model.lm_head.weight, ckpt.model_state["transformer.wte.weight"])


def test_local_paths_are_stored_absolute_and_resume_from_any_folder(english, tmp_path, monkeypatch):
    """A run started with a relative --dataset / --tokenizer resumes from another working directory,
    and a resume that spells the same file otherwise is the same run."""
    import os

    from slope.checkpoint import saved_config

    monkeypatch.chdir(english)
    cfg = tiny(tmp_path, "run", dataset="english.txt", tokenizer="tokenizer.json", max_steps=4, stop_after=2)
    train(cfg, progress=False, log=lambda line: None)
    saved = saved_config(tmp_path / "run" / "checkpoint")
    assert (saved.dataset, saved.tokenizer) == (str(english / "english.txt"), str(english / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    other_spelling = os.path.relpath(english / "english.txt", tmp_path)
    resumed = saved.updated({"stop_after": None, "resume": True, "dataset": other_spelling, "out": "run"})
    assert train(resumed, progress=False, log=lambda line: None)["step"] == 4


def test_a_dense_tail_before_the_adapters_says_none_attach(tmp_path):
    lines = []
    cfg = tiny(tmp_path, max_steps=10, dense_tail_fraction=0.5, lazy_lora_fraction=0.3, eval_every=100)
    train(cfg, progress=False, log=lines.append)
    assert any("no LoRA adapters attach: the dense tail starts after step 5, before the adapters' step 7" in line for line in lines)
    assert not any(line.startswith("lazy LoRA:") for line in lines)
    assert not any(name.endswith("lora_A") for name, _ in read_checkpoint(f"{cfg.out}/checkpoint").model_state.items())


def test_config_file_sets_the_architecture_and_is_stored(english, tmp_path):
    config = tmp_path / "mistral.json"
    config.write_text(json.dumps({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000, "sliding_window": 8}))
    cfg = tiny(tmp_path, model_config=str(config), max_steps=2, dataset=str(english / "english.txt"))
    train(cfg, progress=False, log=lambda line: None)
    config.unlink()  # eval / export rebuild from the checkpoint's copy
    loaded = load_trained_model(cfg.out, "cpu", "dense")
    c = loaded.model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.sliding_window, c.vocab_size) == (
        "mistral", 64, 2, 2, 8, 4096)  # the file's sizes; the vocabulary is the tokenizer's
    assert loaded.model.model.layers[1].mlp.up_proj.out_features == 192


def test_model_config_errors(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(SystemExit):  # a size flag with a config file: ambiguous
        main(["train", "--out", str(tmp_path / "r"), "--model-config", str(config), "--hidden-size", "128"])
    assert "sets the sizes" in capsys.readouterr().err
    (tmp_path / "typeless.json").write_text("{}")
    for spec, message in [("no_such_type", "neither a file nor a model type"), (str(tmp_path / "typeless.json"), 'no "model_type"'),
                          ("t5", "no causal-LM model"), (str(tmp_path / "nope.json"), "no such file")]:
        assert main(["train", "--out", str(tmp_path / "r"), "--model-config", spec, "--max-steps", "1", "--seq-len", "16"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("slope train: error: model_config") and message in err and "\n" not in err, err


def _llama_file(tmp_path, name, **sizes):
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, **sizes}))
    return str(config)


@pytest.mark.parametrize("sizes, layer", [
    (dict(hidden_size=64, intermediate_size=130, num_attention_heads=2), "model.layers.0.mlp.gate_proj is 130x64 (out x in) (and 2 more"),
    # GQA: one KV head of head_dim 6 makes k_proj / v_proj 6 rows, whatever hidden_size is
    (dict(hidden_size=48, intermediate_size=128, num_attention_heads=8, num_key_value_heads=1), "self_attn.k_proj is 6x48 (out x in)"),
])
def test_config_file_sizes_that_pruning_would_leave_dense_are_refused_before_the_data(sizes, layer, tmp_path, capsys):
    """Such layers used to stay dense silently in a run logged as "SLoPe 2:4" (prune_model skips them)."""
    config = _llama_file(tmp_path, "c", **sizes)
    for extra in ([], ["--no-compress"]):
        assert main(["train", "--out", str(tmp_path / "r"), "--model-config", config, "--max-steps", "1", "--seq-len", "16", *extra]) == 1
        out, err = capsys.readouterr()
        assert err.startswith(f"slope train: error: model_config = {config!r}: layer ") and layer in err and "\n" not in err.strip(), err
        assert "not divisible by 4" in err and "--dense" in err and "data:" not in out  # before the data are read
    assert main(["train", "--out", str(tmp_path / "d"), "--model-config", config, "--max-steps", "1", "--seq-len", "16", "--dense",
                 "--batch-size", "2", "--eval-every", "100", "--save-every", "0"]) == 0  # a dense run takes any size


def test_config_file_sizes_off_64_train_exactly_compressed_with_a_note(english, tmp_path):
    """hidden 96 / MLP 200 (not multiples of 64, which the size flags ask for): every linear but lm_head is
    pruned, the compressed run's losses are the simulated run's, and the log says why it is allowed."""
    config = _llama_file(tmp_path, "odd", hidden_size=96, intermediate_size=200, num_attention_heads=3, num_key_value_heads=1)
    runs = {}
    for compress in (True, False):
        lines = []
        cfg = tiny(tmp_path, f"c{compress}", model_config=config, compress=compress, max_steps=3, dataset=str(english / "english.txt"))
        train(cfg, progress=False, log=lines.append)
        runs[compress] = losses(cfg)
        notes = [line for line in lines if "not a multiple of 64" in line]
        assert len(notes) == compress and all(f"model_config = {config!r}: 7 sparse layers" in n for n in notes), lines
        sparse = [k for k in read_checkpoint(f"{cfg.out}/checkpoint").model_state if k.endswith(".values")]
        assert len(sparse) == 7  # q, k, v, o, gate, up, down
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


def test_config_file_that_transformers_rejects_is_one_line(tmp_path, capsys):
    config = _llama_file(tmp_path, "rope", hidden_size=90, intermediate_size=128, num_attention_heads=2)  # head_dim 45: odd
    assert main(["train", "--out", str(tmp_path / "r"), "--model-config", config, "--max-steps", "1", "--seq-len", "16"]) == 1
    err = capsys.readouterr().err.strip()
    # (transformers before 5.2x accepts an odd RoPE head_dim: then the 90-wide layers are refused, also in one line)
    refusals = ("transformers cannot read it", "layer model.layers.0.self_attn.q_proj is 90x90")
    assert any(err.startswith(f"slope train: error: model_config = {config!r}: {why}") for why in refusals) and "\n" not in err, err


# ---------------------------------------------------------------------- --report-to
def test_tensorboard_event_files_hold_the_metrics(english, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'slope[tensorboard]' to test --report-to tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path, max_steps=4, eval_every=2, stop_after=3, report_to="tensorboard", dataset=str(english / "english.txt"))
    train(cfg, progress=False, log=lambda line: None)
    train(cfg.updated({"stop_after": None, "resume": True}), progress=False, log=lambda line: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r and "event" not in r]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(r["step"], pytest.approx(r["val_loss"])) for r in records if "val_loss" in r]
    assert {"train/lr", "train/grad_norm", "eval/ppl"} <= set(events.Tags()["scalars"])


def test_wandb_runs_offline_and_gets_every_record(english, tmp_path, monkeypatch):
    calls = []

    class Run:
        summary = {}

        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny(tmp_path, max_steps=2, eval_every=2, report_to="wandb", dataset=str(english / "english.txt"))
    train(cfg, progress=False, log=lambda line: None)
    init_kwargs = calls[0]
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == cfg.out and init_kwargs["config"]["max_steps"] == 2
    logged = [c for c in calls[1:] if c != "finish"]
    assert [(step, sorted(v)) for step, v in logged] == [
        (1, ["train/grad_norm", "train/loss", "train/lr", "train/tokens"]), (2, ["train/grad_norm", "train/loss", "train/lr", "train/tokens"]),
        (2, ["eval/loss", "eval/ppl"])]
    assert calls[-1] == "finish" and Run.summary["final_val_loss"] == logged[-1][1]["eval/loss"]


@pytest.mark.parametrize("backend,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_backend_is_a_one_line_error(backend, module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["train", "--out", str(tmp_path / "r"), "--report-to", backend, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"slope train: error: report_to = '{backend}' needs the {backend} package: pip install 'slope[{backend}]' "
                   f"(or pip install {backend}), or drop --report-to")


def test_cli_end_to_end_without_a_traceback(english, tmp_path):
    """A fresh process (the `slope` command's main): train a Qwen2 with an English tokenizer, then
    eval, generate and export it; any traceback fails."""
    run = tmp_path / "run"
    steps = [
        ["train", "--out", str(run), "--model-config", "qwen2", "--tokenizer", str(english / "tokenizer.json"), "--dataset",
         str(english / "english.txt"), "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
         "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--eval-batches", "1", "--report-to", "none"],
        ["eval", "--checkpoint", str(run)],
        ["generate", "--checkpoint", str(run), "--prompt", "the dog", "--max-new-tokens", "3"],
        ["export", str(run), "--output-dir", str(tmp_path / "hf")],
    ]
    script = f"import sys\nfrom slope.cli import main\nfor args in {steps!r}:\n    rc = main(args)\n    if rc:\n        sys.exit(rc)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SLOPE_PROGRESS_INTERVAL": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "model: Qwen2 1x64 (mlp 128)" in out.stdout and "vocab 300 (tokenizer" in out.stdout
    assert "slope eval (unmerged): 1/1 batches" in out.stderr and "validation loss" in out.stdout
    assert "slope generate: 3/3 tokens" in out.stderr and "\nthe dog" in "\n" + out.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2"


# ---------------------------------------------------------------------- --gradient-checkpointing
def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_run(tmp_path, monkeypatch):
    """Every decoder layer's forward runs again in the backward (so its activations were not kept),
    through the adapters' start; losses and weights are those of the run without; a resume may
    switch it either way."""
    from safetensors.torch import load_file

    from slope.layer import SparseLinear

    calls = []
    forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: calls.append(torch.is_grad_enabled()) or forward(self, x))
    runs = {}
    for name, flag in (("plain", False), ("checkpointed", True)):
        calls.clear()
        cfg = tiny(tmp_path, name, max_steps=4, lazy_lora_fraction=0.5, eval_batches=1, gradient_checkpointing=flag)
        train(cfg, progress=False, log=lambda line: None)
        runs[name] = (cfg, sum(calls))  # forwards with autograd on (validation runs without)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs["plain"], runs["checkpointed"]
    assert checkpointed_calls == 2 * plain_calls > 0
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-6)
    want, got = (load_file(f"{c.out}/checkpoint/model.safetensors") for c in (plain, checkpointed))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    part = tiny(tmp_path, "part", max_steps=4, lazy_lora_fraction=0.5, eval_batches=1, gradient_checkpointing=True, stop_after=2)
    train(part, progress=False, log=lambda line: None)
    train(part.updated({"stop_after": None, "resume": True, "gradient_checkpointing": False}), progress=False, log=lambda line: None)
    assert losses(part) == pytest.approx(losses(plain), rel=1e-6)


def test_gradient_checkpointing_on_a_model_without_support_is_refused(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="does not support activation checkpointing"):
        train(tiny(tmp_path, max_steps=2, gradient_checkpointing=True), progress=False, log=lambda line: None)


def test_config_validation():
    with pytest.raises(ConfigError, match="report_to = 'mlflow' is invalid"):
        TrainConfig(report_to="mlflow").validate()


def test_sizes_need_64_only_for_compressed_storage():
    from slope.config import TrainConfig

    TrainConfig(dense=True, hidden_size=60, intermediate_size=90, num_heads=2).validate()  # dense: any size
    TrainConfig(compress=False, sparsity="2:4", hidden_size=60, intermediate_size=100, num_heads=2).validate()  # N:M: multiples of M
