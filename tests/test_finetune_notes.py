"""What the fine-tuning doors say about settings that do nothing: a ``sparsity_ratio`` that N:M ignores
(only when set, once), a warmup as long as the run, and ``slope finetune``'s ``--backend``."""
import warnings

import pytest
import torch
import transformers as T

from slope.cli import main
from slope.dynamic import sparse_finetune
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
SPARSE = dict(batch_size=4, gradient_accumulation_steps=1, max_seq_length=16, eval_batches=1, learning_rate=1e-3,
              mask_update_interval=2, progress=False, gradient_checkpointing=False)


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def caught_messages(call, match: str):
    """``(call()'s result, [messages of the warnings it raised that contain match])``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if match in str(w.message)]


def test_an_unset_sparsity_ratio_is_not_warned_of_and_a_set_one_once(caplog):
    model, unused = caught_messages(lambda: sparse_finetune(tiny_llama(), DOCS, sparsity_type="1:4", max_steps=1, warmup_steps=0,
                                                            **SPARSE), "is not used")
    assert unused == [] and "is not used" not in caplog.text
    assert model.dynamic_sparsity.config.sparsity_ratio == model.finetune_summary["final_sparsity"] == pytest.approx(0.75)
    _, unused = caught_messages(lambda: sparse_finetune(tiny_llama(), DOCS, sparsity_type="1:4", sparsity_ratio=0.5, max_steps=1,
                                                        warmup_steps=0, **SPARSE), "is not used")
    assert unused == ["sparsity_type 1:4 prunes 0.75 of each layer; sparsity_ratio=0.5 is not used"]


def test_a_warmup_as_long_as_the_run_is_warned_of_once():
    model, notes = caught_messages(lambda: sparse_finetune(tiny_llama(), DOCS, max_steps=4, **SPARSE), "warmup_steps")
    assert notes == ["warmup_steps=100 >= the run's 4 optimizer steps: the learning rate only warms up, reaching 4% of "
                     "learning_rate at the last step; lower warmup_steps (e.g. to 0)"]
    assert model.finetune_summary["config"]["warmup_steps"] == 100
    _, notes = caught_messages(lambda: sparse_finetune(tiny_llama(), DOCS, max_steps=4, warmup_steps=3, **SPARSE), "warmup_steps")
    assert notes == []
    _, notes = caught_messages(lambda: finetune(tiny_llama(), None, DOCS, max_steps=2, warmup_steps=5, lr_scheduler_type="constant",
                                                per_device_train_batch_size=4, max_seq_length=16, eval_batches=1,
                                                tokenizer=shipped_tokenizer(), progress=False), "warmup_steps")
    assert notes == []  # the constant schedule has no warmup


def test_finetune_checks_the_backend_before_loading(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=r"^unknown backend 'bogus'; choose one of auto, reference, cusparselt, cutlass"):
        finetune(missing, backend="bogus")
    for double_pruning, expected in ((False, ["backend='reference' is not used: it runs the compressed 2:4 layers of "
                                              "double_pruning=True (--double-pruning); without it 2:4 layers train with an exact "
                                              "backward"]), (True, [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(OSError):  # the model folder is missing: the backend passed the check
                finetune(missing, backend="reference", double_pruning=double_pruning)
        assert [str(w.message) for w in caught if str(w.message).startswith("backend=")] == expected


def test_the_command_prints_notes_and_one_line_errors(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    shipped_tokenizer().save_pretrained(model_dir)
    capsys.readouterr()
    assert main(["finetune", "--model", str(tmp_path / "no-such-model"), "--backend", "bogus"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slope finetune: error: unknown backend 'bogus'; choose one of auto, reference")
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                 "--warmup-steps", "5", "--backend", "reference", "--per-device-train-batch-size", "4", "--max-seq-length", "16",
                 "--eval-batches", "1"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "warmup_steps" in line or "backend" in line]
    assert notes == ["note: backend='reference' is not used: it runs the compressed 2:4 layers of double_pruning=True "
                     "(--double-pruning); without it 2:4 layers train with an exact backward",
                     "note: warmup_steps=5 >= the run's 2 optimizer steps: the learning rate only warms up, reaching 40% of "
                     "learning_rate at the last step; lower warmup_steps (e.g. to 0)"]
    assert "done: 2 steps" in captured.out


def test_resuming_says_so_and_its_errors_name_the_flags(tmp_path, capsys, monkeypatch):
    """A resume is named in the closing line; a resume with nothing to resume fails before anything
    loads (no folder left behind); another global batch is explained; a dataset config of a local
    corpus is ignored with a note; under a launcher only rank 0 speaks."""
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    shipped_tokenizer().save_pretrained(model_dir)
    run = ["finetune", "--model", str(model_dir), "--per-device-train-batch-size", "4", "--max-seq-length", "16",
           "--eval-batches", "1", "--max-steps", "4", "--save-steps", "2"]
    capsys.readouterr()
    assert main([*run, "--output-dir", str(tmp_path / "nothing"), "--resume-from-checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert "error: resume_from_checkpoint (--resume-from-checkpoint): no checkpoint-<step> folder" in err and "--save-steps" in err
    assert not (tmp_path / "nothing").exists()
    assert main([*run, "--output-dir", str(tmp_path / "out"), "--dataset", "embedded", "--dataset_config_name", "main"]) == 0
    captured = capsys.readouterr()
    assert "note: --dataset_config_name 'main' applies to Hugging Face datasets; ignored for --dataset embedded" in captured.err
    assert "resumed" not in captured.out
    assert main([*run, "--output-dir", str(tmp_path / "out"), "--resume-from-checkpoint", str(tmp_path / "out" / "checkpoint-2")]) == 0
    assert f"done: 4 steps (resumed from {tmp_path / 'out' / 'checkpoint-2'})" in capsys.readouterr().out
    wider = [a if a != "4" or i != run.index("--per-device-train-batch-size") + 1 else "8" for i, a in enumerate(run)]
    assert main([*wider, "--output-dir", str(tmp_path / "out"), "--resume-from-checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert "global_batch: 4 there, 8 here" in err and "set per_device_train_batch_size to keep it" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # (no process group: the error comes before one is made)
    assert main([*run, "--output-dir", str(tmp_path / "out"), "--backend", "bogus"]) == 1
    assert capsys.readouterr().err == ""


def test_interrupted_commands_name_the_resume_that_works(tmp_path):
    from argparse import Namespace

    from slope.cli import _resume_advice
    from slope.finetune_checkpoints import CHECKPOINT_STATE

    run = tmp_path / "run"
    assert _resume_advice(Namespace(command="train", out=str(run))) == (
        "; no checkpoint was written yet (run the command again to start over)")  # (not a resume that would fail)
    from slope.cli import main

    assert main(["train", "--out", str(run), "--max-steps", "1", "--hidden-size", "64", "--intermediate-size", "128",
                 "--num-layers", "1", "--num-heads", "2", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1",
                 "--device", "cpu"]) == 0
    assert _resume_advice(Namespace(command="train", out=str(run))).endswith(f"(continue with: slope train --out {run} --resume)")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / CHECKPOINT_STATE).write_bytes(b"")
    assert _resume_advice(Namespace(command="finetune", save_steps=5, output_dir=str(tmp_path))).endswith(
        "(checkpoint-5: continue with --resume-from-checkpoint latest)")
    assert "no checkpoint was completed" in _resume_advice(Namespace(command="finetune", save_steps=5))
    assert "pass --save-steps K" in _resume_advice(Namespace(command="sparse-finetune", save_steps=None))
    assert _resume_advice(Namespace(command="oneshot")) == ""
