"""slope eval / generate on model folders (what oneshot, finetune and sparse-finetune write, slope export): the
validation loss of a fine-tuning run's folder is the run's final validation loss again; a pruned model's
folder (sparse or merged export) runs in each of its forms (--mode, --compare), all with that loss."""
import json

import pytest
import torch
import transformers as T

from slope.checkpoint import CheckpointError
from slope.cli import main
from slope.dynamic import sparse_finetune
from slope.inference.folder import eval_model_folder
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(200)]


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def test_eval_of_a_finetune_folder_is_its_runs_final_validation_loss(tmp_path, data_file, capsys):
    finetune(tiny_llama(), None, str(data_file), output_dir=tmp_path / "out", max_steps=3, per_device_train_batch_size=3,
             max_seq_length=24, eval_batches=2, learning_rate=1e-3, tokenizer=shipped_tokenizer(), progress=False, seed=3)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    result = eval_model_folder(tmp_path / "out", "cpu")
    assert result["settings"]["from_run"] and result["settings"]["dataset"] == str(data_file)
    assert result["val_tokens"] == 2 * 3 * 24
    assert result["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert result["val_loss"] != pytest.approx(summary["initial_val_loss"], rel=1e-3)  # the trained weights, not the start
    assert main(["eval", "--checkpoint", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"validation loss {summary['final_val_loss']:.4f}" in out and "the run's settings (summary.json)" in out
    assert main(["generate", "--checkpoint", str(tmp_path / "out"), "--prompt", "def f1(x):", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f1(x):") and "[model folder, dense] 4 new tokens" in captured.err
    assert main(["eval", "--checkpoint", str(tmp_path / "out"), "--compare", "--device", "cpu"]) == 0  # its one form
    assert "note: a plain model folder: it has one (dense) form" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "out"), "--mode", "merged"]) == 1
    err = capsys.readouterr().err
    assert "--mode merged: " in err and "has one (dense) form; use --mode dense" in err


def test_eval_of_a_sparse_finetune_folder_and_of_a_foreign_folder(tmp_path, data_file):
    model = sparse_finetune(tiny_llama(), str(data_file), sparsity_type="2:4", max_steps=2, batch_size=2, max_seq_length=16,
                            eval_batches=2, gradient_accumulation_steps=1, warmup_steps=0, output_dir=tmp_path / "sparse",
                            tokenizer=shipped_tokenizer(), progress=False, gradient_checkpointing=False)
    result = eval_model_folder(tmp_path / "sparse", "cpu")
    assert result["val_loss"] == pytest.approx(model.finetune_summary["final_val_loss"], rel=1e-6)
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)  # no tokenizer, no summary: slope's tokenizer, the embedded corpus
    result = eval_model_folder(plain, "cpu", eval_batches=1)
    assert not result["settings"]["from_run"] and result["settings"]["dataset"] == "embedded"
    assert result["settings"]["seq_len"] == 63 and result["val_tokens"] == 8 * 63


def test_eval_of_a_top_k_attention_folder_runs_top_k_attention(tmp_path, data_file):
    """sparse-finetune --use-topk-attention saves its ratio in config.json: eval runs with it again
    (said in a note), so the folder's loss is the run's final validation loss."""
    model = sparse_finetune(tiny_llama(), str(data_file), max_steps=2, batch_size=2, max_seq_length=16, eval_batches=2,
                            gradient_accumulation_steps=1, warmup_steps=0, output_dir=tmp_path / "topk", use_topk_attention=True,
                            topk_ratio=0.5, tokenizer=shipped_tokenizer(), progress=False, gradient_checkpointing=False)
    with pytest.warns(UserWarning, match="fine-tuned with top-k attention"):
        result = eval_model_folder(tmp_path / "topk", "cpu")
    assert result["val_loss"] == pytest.approx(model.finetune_summary["final_val_loss"], rel=1e-6)


def test_generate_from_a_folder_checks_learned_positions(tmp_path, capsys):
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=4096, n_embd=32, n_layer=1, n_head=2, n_positions=12)).save_pretrained(tmp_path / "gpt2")
    args = ["generate", "--checkpoint", str(tmp_path / "gpt2"), "--prompt", "def f1(x):", "--temperature", "0", "--device", "cpu"]
    assert main([*args, "--max-new-tokens", "40"]) == 1
    assert "exceed the model's 12 learned positions" in capsys.readouterr().err
    assert main([*args, "--max-new-tokens", "2"]) == 0
    assert "[model folder, dense] 2 new tokens" in capsys.readouterr().err


def test_a_tokenizer_that_does_not_fit_the_model_is_a_one_line_error(tmp_path, capsys):
    """A model whose vocabulary is smaller than the tokenizer's: eval and generate refuse it in one line that
    says to put the model's tokenizer in the folder (generate crashed with an IndexError, or garbled text)."""
    torch.manual_seed(0)
    small = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    small.save_pretrained(tmp_path / "bare")  # no tokenizer files: slope's shipped 4096-token tokenizer would be used
    small.save_pretrained(tmp_path / "with_tok")
    shipped_tokenizer().save_pretrained(tmp_path / "with_tok")  # a tokenizer of the folder that is not the model's
    advice = "put the model's own tokenizer files (tokenizer.json, tokenizer_config.json"
    for folder, reason in (("bare", "has no tokenizer files, and slope's shipped tokenizer (4096 tokens) is not the model's"),
                           ("with_tok", "but the model's vocabulary has 512 entries")):
        for command in (["generate", "--prompt", "def f1(xyz): return xyz.upper()", "--max-new-tokens", "2"], ["eval", "--eval-batches", "1"]):
            assert main([command[0], "--checkpoint", str(tmp_path / folder), *command[1:], "--device", "cpu"]) == 1
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("slope ")]  # (beside loading progress bars)
            assert "Traceback" not in err and len(lines) == 1, (folder, command[0], err)
            assert lines[0].startswith(f"slope {command[0]}: error: ") and reason in lines[0] and advice in lines[0], lines


def test_eval_of_a_slope_train_export_is_the_checkpoints_eval(tmp_path, capfd):
    """A dense export of a `slope train` run validates on that run's held-out split, as the checkpoint does."""
    from slope.config import TrainConfig
    from slope.evaluate import eval_checkpoint
    from slope.serialization.export import export_model
    from slope.train import train

    cfg = TrainConfig().updated(dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, seq_len=16, batch_size=2,
                                     eval_batches=3, log_every=1, eval_every=4, save_every=0, max_steps=2,
                                     out=str(tmp_path / "run")))
    train(cfg, plot=False, log=lambda line: None)
    export_model(tmp_path / "run", tmp_path / "dense", "dense")
    want = eval_checkpoint(tmp_path / "run", "cpu")
    got = eval_model_folder(tmp_path / "dense", "cpu")
    assert got["settings"]["split"] == "train" and got["step"] == want["step"] == 2
    assert got["val_tokens"] == want["val_tokens"] == 3 * 2 * 16
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["unigram_loss"] == pytest.approx(want["unigram_loss"], rel=1e-9)
    assert main(["eval", "--checkpoint", str(tmp_path / "dense"), "--device", "cpu"]) == 0
    assert "the exported slope train run's held-out split" in capfd.readouterr().out
    # re-saved by plain transformers without its tokenizer: slope's shipped tokenizer (the run's) is used
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").save_pretrained(tmp_path / "resaved")
    assert not list((tmp_path / "resaved").glob("tokenizer*"))
    assert eval_model_folder(tmp_path / "resaved", "cpu")["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert main(["eval", "--checkpoint", str(tmp_path / "resaved"), "--device", "cpu"]) == 0
    assert "the exported slope train run's held-out split" in capfd.readouterr().out
    # exported sparse, then that folder exported dense: the run's validation settings carry over
    export_model(tmp_path / "run", tmp_path / "sparse", "sparse")
    import logging

    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert eval_model_folder(tmp_path / "sparse", "cpu")["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in reports if "LOAD REPORT" in r]  # the SLoPe entries transformers does not know are expected
    export_model(tmp_path / "sparse", tmp_path / "dense_again", "dense")
    assert eval_model_folder(tmp_path / "dense_again", "cpu")["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert json.loads((tmp_path / "dense_again" / "config.json").read_text())["slope_export"]["step"] == 2  # the run's step
    export_model(tmp_path / "run", tmp_path / "merged", "merged")
    _check_forms(tmp_path, capfd, want)
    with pytest.raises(CheckpointError, match="holds the merged form .* cannot become the sparse .training. form"):
        export_model(tmp_path / "merged", tmp_path / "unmerged", "sparse")
    assert not (tmp_path / "unmerged").exists()
    config = json.loads((tmp_path / "dense_again" / "config.json").read_text())
    del config["slope_export"]["validation"]["precision"]
    (tmp_path / "dense_again" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"slope_export.validation lacks \['precision'\]"):
        eval_model_folder(tmp_path / "dense_again", "cpu")
    # what oneshot and finetune write from the export is theirs: no export record, their own run's settings
    from slope.pruning import oneshot
    from slope.serialization.folders import folder_kind

    oneshot(str(tmp_path / "dense"), {"s": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5}}}}, output_dir=tmp_path / "pruned",
            verbose=False)
    tuned = finetune(str(tmp_path / "pruned"), None, "embedded", output_dir=tmp_path / "tuned", max_steps=2,
                     per_device_train_batch_size=2, max_seq_length=16, eval_batches=2, progress=False)
    for folder in ("pruned", "tuned"):
        assert "slope_export" not in json.loads((tmp_path / folder / "config.json").read_text()), folder
        assert folder_kind(tmp_path / folder) != "slope-export-dense", folder
    result = eval_model_folder(tmp_path / "tuned", "cpu")
    assert result["settings"]["split"] == "finetune"
    assert result["val_loss"] == pytest.approx(tuned.finetune_summary["final_val_loss"], rel=1e-6)


def _check_forms(root, capfd, want: dict) -> None:
    """The sparse and merged exports of a run (``root/sparse``, ``root/merged``) run in every form they
    hold, each with the checkpoint's validation loss: ``--mode``, ``--compare``, and refusals."""
    from slope.inference.folder import compare_model_folder, folder_modes
    from slope.lora import MergedSparseLinear
    from slope.registry import sparse_modules

    assert folder_modes(root / "sparse") == ("unmerged", "merged", "dense")
    assert folder_modes(root / "merged") == ("merged", "dense") and folder_modes(root / "dense") == ("dense",)
    for folder, modes in (("sparse", ("unmerged", "merged", "dense")), ("merged", ("merged", "dense"))):
        compared = compare_model_folder(root / folder, "cpu")
        assert tuple(compared["modes"]) == modes and compared["agree"], compared
        for mode, result in compared["modes"].items():
            assert result["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5), (folder, mode)
        assert (compared["modes"]["merged"]["sparse_layer_bytes"] > 0) and compared["modes"]["dense"]["sparse_layer_bytes"] == 0
    from slope.inference.folder import load_folder_model

    model, _, _ = load_folder_model(root / "sparse", "cpu", "merged")
    layers = [m for _, m in sparse_modules(model)]
    assert layers and all(isinstance(m, MergedSparseLinear) and m.inference_only for m in layers)
    assert main(["eval", "--checkpoint", str(root / "merged"), "--mode", "unmerged", "--device", "cpu"]) == 1
    assert "holds the forms merged, dense; use --mode merged or dense" in capfd.readouterr().err
    assert main(["eval", "--checkpoint", str(root / "sparse"), "--compare", "--device", "cpu"]) == 0
    assert "modes agree" in capfd.readouterr().out
    texts = {}
    for mode in ("unmerged", "dense"):
        assert main(["generate", "--checkpoint", str(root / "sparse"), "--prompt", "def f(", "--max-new-tokens", "4",
                     "--temperature", "0", "--device", "cpu", "--mode", mode]) == 0
        out, err = capfd.readouterr()
        texts[mode] = out
        assert f"[model folder, {mode}] 4 new tokens" in err
    assert texts["unmerged"] == texts["dense"]
    assert main(["generate", "--checkpoint", str(root / "sparse"), "--prompt", "x", "--compare"]) == 1
    assert "slope generate --compare applies to slope train checkpoints" in capfd.readouterr().err


def test_pruned_folders_run_sparse_where_they_can(tmp_path, capsys):
    """A bf16 pruned folder's forms agree at bf16 tolerance; a folder saved with a backend this
    machine lacks runs on ``auto``; one re-saved by plain transformers, or whose record cannot be
    read, runs dense (the other forms: one line)."""
    import slope
    from slope.inference.folder import compare_model_folder, folder_modes

    model = slope.prune_model(tiny_llama().to(torch.bfloat16), add_lora=True, lora_rank=4, verbose=False)
    with torch.no_grad():
        for _, layer in slope.sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.05)
    model.save_pretrained(tmp_path / "bf16")
    compared = compare_model_folder(tmp_path / "bf16", "cpu", eval_batches=1)
    assert tuple(compared["modes"]) == ("unmerged", "merged", "dense") and compared["precision"] == "bf16" and compared["agree"]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    for record in config["slope_config"]["layers"].values():
        record["backend"] = "cusparselt"  # (CUDA only)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    got = eval_model_folder(tmp_path / "bf16", "cpu", eval_batches=1, mode="unmerged")
    assert got["val_loss"] == pytest.approx(compared["modes"]["unmerged"]["val_loss"], rel=1e-6)
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").save_pretrained(tmp_path / "resaved")
    assert folder_modes(tmp_path / "resaved") == ("dense",)
    assert main(["eval", "--checkpoint", str(tmp_path / "resaved"), "--mode", "merged", "--device", "cpu"]) == 1
    assert "is a plain model folder: it has one (dense) form; use --mode dense" in capsys.readouterr().err
    config["slope_config"]["version"] = 99
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(tmp_path / "bf16"), "--mode", "dense", "--device", "cpu", "--eval-batches", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "bf16"), "--compare", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "its slope record cannot be read" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
