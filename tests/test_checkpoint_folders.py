"""The ``checkpoint-<step>/`` folders of a fine-tuning run: which names are checkpoints, which one
``--resume-from-checkpoint latest`` picks, ``--save-total-limit`` on the command line, and the advice
an interrupted command gives."""
import argparse
import signal
import warnings

import pytest
import transformers as T

from slope.cli import _resume_advice, build_parser, main
from slope.finetune_checkpoints import CHECKPOINT_STATE, checkpoint_step, checkpoint_steps, resolve_checkpoint, rotate_checkpoints
from slope.finetune_loop import FinetuneLoop
from slope.finetune_run import check_output_dir
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune
from slope.serialization.folders import OutputDirError, folder_kind

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]


def folder(root, name, complete=True):
    (root / name).mkdir(parents=True)
    if complete:
        (root / name / CHECKPOINT_STATE).write_bytes(b"state")
    return root / name


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("name, step", [("checkpoint-0", 0), ("checkpoint-7", 7), ("checkpoint-120", 120)])
def test_canonical_names_are_checkpoints(name, step):
    assert checkpoint_step(name) == step


@pytest.mark.parametrize("name", ["checkpoint-002", "checkpoint-00", "checkpoint-\u00b2", "checkpoint-\u0663", "checkpoint-\uff13",
                                  "checkpoint-3\n", "checkpoint-", "checkpoint--1", "checkpoint-+1", "checkpoint- 1",
                                  "checkpoint-3.bak", "Checkpoint-3", "checkpoint-best"])
def test_other_names_are_not(name):
    assert checkpoint_step(name) is None


@pytest.mark.parametrize("name", ["checkpoint-\u00b2", "checkpoint-002", "checkpoint-\uff13", "checkpoint-3.bak"])
def test_folder_kind_uses_the_same_rule_for_trainer_checkpoints(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text("{}")
    assert folder_kind(tmp_path) == "unknown"  # isdigit() took checkpoint-\u00b2 and checkpoint-002 for Trainer checkpoints
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "config.json").write_text("{}")
    assert folder_kind(tmp_path) == "checkpoints-only"


def test_odd_names_are_left_alone_by_resume_rotation_and_the_output_dir_check(tmp_path):
    folder(tmp_path, "checkpoint-\u00b2")  # int() fails on it: resume used to crash with "invalid literal for int()"
    folder(tmp_path, "checkpoint-002")   # a user's copy: used to be taken for step 2
    real = [folder(tmp_path, "checkpoint-1"), folder(tmp_path, "checkpoint-2"), folder(tmp_path, "checkpoint-3")]
    assert checkpoint_steps(tmp_path) == {1: real[0], 2: real[1], 3: real[2]}
    assert resolve_checkpoint(tmp_path) == real[2]
    assert rotate_checkpoints(tmp_path, 1, newest=3) == [real[1], real[0]]  # the real checkpoint-2 goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-002", "checkpoint-3", "checkpoint-\u00b2"]
    odd = tmp_path / "odd"
    folder(odd, "checkpoint-\u00b2")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        resolve_checkpoint(odd)
    with pytest.raises(OutputDirError, match="exists and is not an empty folder; choose a new folder or remove it$"):
        check_output_dir(odd)  # a non-empty folder, not an unfinished run


# ---------------------------------------------------------------------- latest
def test_latest_is_the_newest_complete_checkpoint_and_names_the_incomplete_ones(tmp_path):
    four = folder(tmp_path, "checkpoint-4")
    folder(tmp_path, "checkpoint-2")
    folder(tmp_path, "checkpoint-9", complete=False)  # a save that never finished
    folder(tmp_path, "checkpoint-3", complete=False)  # older than the one chosen: not worth a word
    with pytest.warns(UserWarning, match=r"checkpoint-4; skipped newer folders \(incomplete, without slope_finetune_state.pt: "
                                         r"checkpoint-9\)$"):
        assert resolve_checkpoint(tmp_path) == four
        check_output_dir(tmp_path, resume_from=True)  # (the check before any work agrees)


def test_latest_without_a_complete_checkpoint_says_so(tmp_path):
    nine = folder(tmp_path, "checkpoint-9", complete=False)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-<step> folder .* \(incomplete, without slope_finetune_state.pt: "
                                                r"checkpoint-9\)"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9 is incomplete \(no slope_finetune_state.pt"):
        resolve_checkpoint(nine)  # named itself


def run(out, **kw):
    torch_config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
    T.set_seed(0)
    options = dict(max_steps=4, per_device_train_batch_size=2, max_seq_length=16, eval_batches=1, learning_rate=1e-3, logging_steps=1,
                   seed=0, tokenizer=shipped_tokenizer(), progress=False, output_dir=out)
    return finetune(T.LlamaForCausalLM(torch_config), None, DOCS, **{**options, **kw})


def test_a_run_resumes_from_the_newest_complete_checkpoint_next_to_an_empty_newer_one(tmp_path, monkeypatch):
    train_step = FinetuneLoop.train_step

    def stop_after_step_2(self, s):
        result = train_step(self, s)
        if s == 1:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(FinetuneLoop, "train_step", stop_after_step_2)
    out = tmp_path / "run"
    assert run(out, save_steps=1).finetune_summary["stop_checkpoint"] == str(out / "checkpoint-2")
    monkeypatch.setattr(FinetuneLoop, "train_step", train_step)
    (out / "checkpoint-9").mkdir()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        summary = run(out, save_steps=1, resume_from_checkpoint=True).finetune_summary
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["steps"] == 4
    assert any("skipped newer folders" in str(w.message) and "checkpoint-9" in str(w.message) for w in said)


# ---------------------------------------------------------------------- --save-total-limit
@pytest.mark.parametrize("command", [["finetune", "--model", "m"], ["sparse-finetune", "--model", "m"],
                                     ["apply", "--model", "m", "--recipe", "r", "--output-dir", "o"]])
def test_save_total_limit_none_on_the_command_line_keeps_them_all(command, capsys):
    parser = build_parser()
    for text in ("None", "none", "NONE"):
        assert parser.parse_args([*command, "--save-total-limit", text]).save_total_limit is None
    assert parser.parse_args([*command, "--save-total-limit", "2"]).save_total_limit == 2
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--save-total-limit", "all"])
    assert "expected an int >= 1 or None (keep every checkpoint), got 'all'" in capsys.readouterr().err


def test_save_total_limit_without_output_dir_is_one_line_like_save_steps(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^save_total_limit=2 keeps the newest checkpoint-<step> folders of output_dir: give "
                                         r"output_dir \(--output-dir\), or leave save_total_limit out$"):
        check_output_dir(None, save_total_limit=2)
    check_output_dir(None, save_total_limit=None)
    for command in ("finetune", "sparse-finetune"):
        assert main([command, "--model", str(tmp_path / "missing"), "--save-total-limit", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"slope {command}: error: save_total_limit=2 keeps the newest checkpoint-<step> folders of output_dir: "
                       "give output_dir (--output-dir), or leave save_total_limit out"]


# ---------------------------------------------------------------------- an interrupted command's advice
def advice(command, out, save_steps=2):
    return _resume_advice(argparse.Namespace(command=command, output_dir=str(out), save_steps=save_steps))


@pytest.mark.parametrize("command", ["finetune", "sparse-finetune"])
def test_interrupted_advises_resuming_only_a_complete_checkpoint(tmp_path, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    folder(out, "checkpoint-4", complete=False)
    said = advice(command, out)
    assert "--resume-from-checkpoint" not in said
    assert said == (f"; no checkpoint was completed: start again with a new --output-dir, or after removing what the run left in "
                    f"{out} (checkpoint-4, metrics.jsonl)")
    assert advice(command, tmp_path / "never-made") == "; no checkpoint was completed"
    assert advice(command, out, save_steps=None).startswith("; no checkpoint was written (pass --save-steps K")
    folder(out, "checkpoint-2")
    assert advice(command, out) == ("; a run keeps its last complete checkpoint-<step> folder (checkpoint-2: continue with "
                                    "--resume-from-checkpoint latest)")


def test_interrupted_command_prints_the_advice(tmp_path, monkeypatch, capsys):
    import slope.recovery.cli

    out = tmp_path / "run"

    def interrupted(args):  # a second signal during the first stop's save: only the metrics were written
        out.mkdir()
        (out / "metrics.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(slope.recovery.cli, "run", interrupted)
    assert main(["finetune", "--model", "m", "--output-dir", str(out), "--save-steps", "2"]) == 130
    assert capsys.readouterr().err.strip() == ("slope finetune: interrupted; no checkpoint was completed: start again with a new "
                                               f"--output-dir, or after removing what the run left in {out} (metrics.jsonl)")


def test_the_python_front_doors_refuse_save_total_limit_without_output_dir():
    """finetune() and sparse_finetune() check it before loading anything, like the commands."""
    from slope.dynamic import sparse_finetune

    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(ValueError, match="^save_total_limit=2 keeps the newest checkpoint-<step> folders of output_dir"):
        finetune(model, None, DOCS, save_total_limit=2, tokenizer=shipped_tokenizer(), max_steps=1)
    with pytest.raises(ValueError, match="^save_total_limit=2 keeps the newest checkpoint-<step> folders of output_dir"):
        sparse_finetune(model, DOCS, save_total_limit=2, tokenizer=shipped_tokenizer(), max_steps=1)
