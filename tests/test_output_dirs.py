"""Output folders: ``slope finetune`` / ``sparse-finetune`` / ``oneshot`` (API and CLI) refuse a folder
that holds files, before any work, except the run resumed there (``slope export``: tests/test_hf_save.py)."""
import shutil

import pytest
import torch
import transformers as T

from slope.cli import main
from slope.dynamic import sparse_finetune
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune
from slope.serialization.folders import OutputDirError, check_new_output_dir

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
RECIPE = "s:\n  g:\n    MagnitudePruningModifier:\n      mask_structure: '2:4'\n"


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def used(folder):
    """``folder`` holding the file another run left there."""
    folder.mkdir()
    (folder / "recipe.yaml").write_text("from another run\n")
    return folder


def refusal(folder) -> str:
    return f"output_dir {str(folder)!r} exists and is not an empty folder; choose a new folder or remove it"


def test_check_new_output_dir(tmp_path):
    assert check_new_output_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_new_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is a file"):
        check_new_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="^" + refusal(used(tmp_path / "full")) + "$") as error:
        check_new_output_dir(tmp_path / "full")
    assert isinstance(error.value, FileExistsError)  # slope.oneshot's error type before the check was shared
    with pytest.raises(OutputDirError, match="not an empty folder; resume it"):
        check_new_output_dir(tmp_path / "full", advice="resume it")


FINETUNE = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_seq_length=16, eval_batches=1,
                learning_rate=1e-2, warmup_steps=1, seed=0, tokenizer=shipped_tokenizer(), progress=False)
SPARSE = dict(max_steps=4, batch_size=4, gradient_accumulation_steps=1, max_seq_length=16, eval_batches=1, learning_rate=1e-3,
              warmup_steps=1, mask_update_interval=2, progress=False)
DOORS = {"finetune": lambda model, **kw: finetune(model, None, DOCS, **{**FINETUNE, **kw}),
         "sparse_finetune": lambda model, **kw: sparse_finetune(model, DOCS, **{**SPARSE, **kw})}


@pytest.mark.parametrize("door", sorted(DOORS))
def test_the_fine_tuning_doors_refuse_a_used_folder_before_loading(tmp_path, door):
    out = used(tmp_path / "out")
    with pytest.raises(ValueError, match="^" + refusal(out) + "$"):
        DOORS[door](str(tmp_path / "no-such-model"), output_dir=out)  # refused before the (missing) model loads
    assert [p.name for p in out.iterdir()] == ["recipe.yaml"]


@pytest.mark.parametrize("door", sorted(DOORS))
def test_an_unfinished_run_is_resumed_not_replaced(tmp_path, door):
    out = tmp_path / "out"
    whole = DOORS[door](tiny_llama(), output_dir=out, save_steps=2)
    for path in out.iterdir():  # what a run killed after its step-2 checkpoint leaves
        if path.name not in ("checkpoint-2", "metrics.jsonl"):
            (path.unlink if path.is_file() else shutil.rmtree)(path)
    with pytest.raises(ValueError, match=r"not an empty folder; it holds an unfinished run \(checkpoint-2/\): continue it "
                       r"with resume_from_checkpoint=True \(--resume-from-checkpoint latest\), or choose a new folder"):
        DOORS[door](tiny_llama(), output_dir=out, save_steps=2)
    with pytest.raises(ValueError, match="^" + refusal(used(tmp_path / "other")) + "$"):  # resuming elsewhere: a new folder
        DOORS[door](tiny_llama(), output_dir=tmp_path / "other", save_steps=2, resume_from_checkpoint=out / "checkpoint-2")
    resumed = DOORS[door](tiny_llama(), output_dir=out, save_steps=2, resume_from_checkpoint=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (out / "summary.json").is_file()
    with pytest.raises(ValueError, match="^" + refusal(out) + "$"):  # a finished run: nothing to resume
        DOORS[door](tiny_llama(), output_dir=out, save_steps=2)


def test_the_commands_refuse_a_used_folder_in_one_line_before_loading(tmp_path, capsys):
    out, missing = used(tmp_path / "out"), str(tmp_path / "no-such-model")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    commands = {"finetune": ["--model", missing], "sparse-finetune": ["--model", missing],
                "oneshot": ["--model", missing, "--recipe", str(tmp_path / "recipe.yaml")]}
    for name, args in commands.items():
        assert main([name, *args, "--output-dir", str(out)]) == 1, name
        assert capsys.readouterr().err.strip().splitlines() == [f"slope {name}: error: {refusal(out)}"]
    assert [p.name for p in out.iterdir()] == ["recipe.yaml"]
