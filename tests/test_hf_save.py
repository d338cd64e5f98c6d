"""Every Hugging Face save path of a pruned model round-trips (issue 21): ``model.save_pretrained``,
sharded saves, the ``Trainer``'s ``checkpoint-N`` (and resuming from it), ``slope export``; plain
transformers loads the dense-equivalent model with no missing key, slope the exact sparse model;
every other kind of folder is an error that says what it is."""
import copy
import json
import pickle
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig  # noqa: E402

import slope  # noqa: E402
from slope import from_pretrained, prune_model, sparse_modules  # noqa: E402
from slope.checkpoint import CheckpointError  # noqa: E402
from slope.cli import main  # noqa: E402
from slope.evaluate import open_checkpoint  # noqa: E402
from slope.lora import MergedSparseLinear, effective_weight  # noqa: E402
from slope.serialization.folders import folder_kind  # noqa: E402

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def llama():
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def gpt2():
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                                       bos_token_id=0, eos_token_id=0))


def pruned(build=llama, **kwargs):
    """A pruned model whose weights and adapters differ from any fresh init."""
    torch.manual_seed(0)
    model = build()
    prune_model(model, verbose=False, **{"compress": True, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for _, layer in sparse_modules(model):
            layer.values.add_(0.01)
            if layer.lora_rank:
                layer.lora_A.mul_(layer.lora_A_mask)
            layer.refresh()
    return model.eval()


def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model):
    return model(input_ids=ids()).logits


def load_plain(folder):
    """Plain transformers: the dense-equivalent model and its loading report."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_dense_equivalent(dense, model):
    """Every SLoPe layer of ``model`` is an ordinary layer of ``dense`` holding its effective weight."""
    for name, layer in sparse_modules(model):
        weight = dense.get_submodule(name).weight
        weight = weight.t() if type(dense.get_submodule(name)).__name__ == "Conv1D" else weight
        assert torch.equal(weight, effective_weight(layer)), name
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-5, atol=1e-5)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(logits(a), logits(b))


# ---------------------------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("build,kwargs", [
    (llama, {}),
    (gpt2, {"add_lora": True, "lora_rank": 4}),  # Conv1D (in, out) weights; adapters merged into weight
    (llama, {"compress": False, "sparsity": "2:8", "add_lora": True, "lora_rank": 4, "merge_lora": True}),
], ids=["llama", "gpt2-lora", "llama-sim-2:8-merged"])
def test_plain_save_pretrained_round_trips(build, kwargs, tmp_path):
    model = pruned(build, **kwargs)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["slope_config"]
    assert set(record["layers"]) == {name for name, _ in sparse_modules(model)}
    assert not hasattr(model.config, "slope_config")  # written to the file only
    assert_dense_equivalent(load_plain(tmp_path), model)
    loaded = from_pretrained(tmp_path)
    assert_same_model(model, loaded)
    assert [type(m) for _, m in sparse_modules(loaded)] == [type(m) for _, m in sparse_modules(model)]
    if kwargs.get("merge_lora"):
        assert all(isinstance(m, MergedSparseLinear) for _, m in sparse_modules(loaded))


@pytest.mark.parametrize("fold", ["extended", "stacked"])
def test_a_merged_models_fold_survives_save_and_load(fold, tmp_path):
    from slope.lora import merge_lora, set_lora_fold

    model = merge_lora(pruned(llama, add_lora=True, lora_rank=4), fold="stacked" if fold == "extended" else "extended")
    set_lora_fold(model, fold)  # after merging: the record keeps this choice, not merge_lora's
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert {m.fold for _, m in sparse_modules(loaded)} == {fold}
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_sharded_save_and_load_state_dict(tmp_path):
    model = pruned(llama)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_dense_equivalent(load_plain(tmp_path), model)
    assert_same_model(model, from_pretrained(tmp_path))
    # the dense form also loads through load_state_dict (the Trainer's resume path)
    from slope.serialization.dense_form import dense_form_state_dict

    fresh = prune_model(llama(), verbose=False)
    fresh.load_state_dict(dense_form_state_dict(model))
    assert_same_model(model, fresh)


def test_save_hook_follows_copies_and_densify(tmp_path):
    model = pruned(llama)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.save_pretrained.model is twin
    twin.save_pretrained(tmp_path / "twin")
    assert_same_model(model, from_pretrained(tmp_path / "twin"))
    slope.prune.densify(model)  # no SLoPe layers left: a plain save, no slope_config
    model.save_pretrained(tmp_path / "dense")
    assert folder_kind(tmp_path / "dense") == "hf"


# ---------------------------------------------------------------------------------------------- the Trainer
def test_trainer_checkpoints_round_trip_and_resume(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from slope import SparseOptimizerCallback
    from slope.optimizers import ADAMWSparse

    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    def trainer(model, steps):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                                 learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True, max_grad_norm=float("inf"),
                                 disable_tqdm=True, logging_steps=1)
        return Trainer(model=model, args=args, train_dataset=Tokens(),
                       callbacks=[SparseOptimizerCallback(ADAMWSparse(model, lr=1e-2), max_grad_norm=1.0)])

    model = pruned(llama)
    trainer(model, 2).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert folder_kind(ckpt) == "slope-pretrained"
    assert_dense_equivalent(load_plain(ckpt), model.eval())
    assert_same_model(model, from_pretrained(ckpt))
    # resuming loads the checkpoint's dense-form weights into a freshly pruned (differently initialised) model
    runs = {}
    for name, resume in (("straight", None), ("resumed", str(ckpt))):
        torch.manual_seed(1)
        fresh = prune_model(llama(), verbose=False)
        if resume is None:
            fresh.load_state_dict(from_pretrained(ckpt).state_dict())
        trainer(fresh, 3).train(resume_from_checkpoint=resume)
        runs[name] = fresh
    assert_same_model(runs["straight"].eval(), runs["resumed"].eval())


# ---------------------------------------------------------------------------------------------- folder kinds
def test_each_kind_of_folder_gets_its_advice(tmp_path):
    model = pruned(llama)
    model.save_pretrained(tmp_path / "pruned")
    # re-saved by plain transformers: dense weights, the masks are gone -> loud, never random weights
    load_plain(tmp_path / "pruned").save_pretrained(tmp_path / "resaved")
    resaved = (r"resaved is a pruned model's folder re-saved by plain transformers: .* record of 7 pruned layers.*"
               r"dense model now; load it with transformers.AutoModelForCausalLM.*slope.prune_model")
    with pytest.raises(ValueError, match=resaved) as info:
        from_pretrained(tmp_path / "resaved")
    assert "\n" not in str(info.value) and len(str(info.value)) < 600 and str(info.value).count("mask_bits") == 1
    dense = load_plain(tmp_path / "resaved")  # the advice works: the dense model loads and prunes again
    assert len(list(sparse_modules(prune_model(dense, verbose=False)))) == 7
    # a plain Hugging Face folder
    llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain Hugging Face folder.*AutoModelForCausalLM.*prune_model"):
        from_pretrained(tmp_path / "plain")
    # a pruned model saved around slope's save_pretrained (slope's keys, no record)
    type(model).save_pretrained(model, tmp_path / "bypassed")
    assert folder_kind(tmp_path / "bypassed") == "hf-pruned"
    with pytest.raises(ValueError, match="without slope's record.*same slope.prune_model arguments"):
        from_pretrained(tmp_path / "bypassed")
    # slope eval on a Hugging Face folder
    with pytest.raises(CheckpointError, match="not a `slope train` checkpoint.*slope.from_pretrained"):
        open_checkpoint(tmp_path / "pruned")


def test_version_1_folders_still_load(tmp_path, capsys):
    """The folder slope.save_pretrained wrote before the dense form: slope_config.json + slope's own keys
    (then with each compressed layer's 2:4 ``meta``, which layers no longer store)."""
    from safetensors.torch import load_file, save_file, save_model

    from slope.io import _derived_buffer_dtypes, _layer_record
    from slope.kernels import compress_2to4

    model = pruned(llama, add_lora=True, lora_rank=4)
    model.config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    saved = load_file(tmp_path / "model.safetensors")
    metas = {f"{name}.meta": compress_2to4(layer.dense_weight(), layer.mask)[1] for name, layer in sparse_modules(model)
             if layer.compress}
    assert metas
    save_file({**saved, **metas}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    record = {"format": "slope-pretrained", "version": 1, "architecture": type(model).__name__,
              "layers": {name: _layer_record(layer) for name, layer in sparse_modules(model)},
              "buffer_dtypes": _derived_buffer_dtypes(model)}
    (tmp_path / "slope_config.json").write_text(json.dumps(record))
    assert_same_model(model, from_pretrained(tmp_path))
    # slope eval takes it as a pruned model's folder (its forms; here it stops at the tokenizer: the folder has
    # none, and slope's shipped one does not fit this 128-token vocabulary)
    from slope.inference.folder import folder_modes

    assert folder_modes(tmp_path) == ("unmerged", "merged", "dense")
    assert main(["eval", "--checkpoint", str(tmp_path), "--mode", "merged", "--device", "cpu"]) == 1
    assert "has no tokenizer files, and slope's shipped tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- slope export
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny `slope train` run whose adapters were attached (and trained) for its last 2 of 4 steps."""
    root = tmp_path_factory.mktemp("export")
    text = root / "text.txt"  # a small dataset: tokenizing the embedded corpus would dominate the test
    text.write_text(open(slope.io.__file__).read())
    tiny = ["--dataset", str(text), "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--log-every", "100", "--eval-every", "4", "--save-every", "0"]
    assert main(["train", "--out", str(root / "run"), *tiny, "--max-steps", "4", "--lazy-lora-fraction", "0.5",
                 "--lora-rank", "4", "--lr", "1e-2"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def gpt2_run(run):
    """The same tiny run with a GPT-2 model, whose Conv1D layers store their weights (in, out)."""
    root = run.parent
    tiny = ["--dataset", str(root / "text.txt"), "--model-config", "gpt2", "--hidden-size", "64", "--intermediate-size", "128",
            "--num-layers", "1", "--num-heads", "2", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1",
            "--log-every", "100", "--eval-every", "4", "--save-every", "0"]
    assert main(["train", "--out", str(root / "gpt2-run"), *tiny, "--max-steps", "4", "--lazy-lora-fraction", "0.5",
                 "--lora-rank", "4", "--lr", "1e-2"]) == 0
    return root / "gpt2-run"


@pytest.mark.parametrize("which", ["run", "gpt2_run"])
def test_export_forms_load_back_with_the_same_logits(which, request, tmp_path, capsys):
    from slope.data import load_tokenizer
    from slope.evaluate import load_trained_model

    run = request.getfixturevalue(which)
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = load_trained_model(run, "cpu", "unmerged").model
        assert all(m.lora_rank for _, m in sparse_modules(trained))
        reference = trained(x).logits
    for form in ("dense", "sparse", "merged"):
        out = tmp_path / form
        assert main(["export", str(run), "--output-dir", str(out), "--form", form]) == 0
        assert f"({form} form)" in capsys.readouterr().out
        with torch.no_grad():
            plain = load_plain(out)  # every form loads in plain transformers as the dense-equivalent model
            torch.testing.assert_close(plain(x).logits, reference, rtol=1e-5, atol=1e-5)
            if form == "dense":
                assert folder_kind(out) == "slope-export-dense" and not list(sparse_modules(plain))
                continue
            sparse = from_pretrained(out)
            kinds = {type(m) for _, m in sparse_modules(sparse)}
            assert kinds == ({MergedSparseLinear} if form == "merged" else {slope.SparseLinear})
            if form == "sparse":
                assert torch.equal(sparse(x).logits, reference)
            else:
                torch.testing.assert_close(sparse(x).logits, reference, rtol=1e-5, atol=1e-5)
    # the sparse folder exported again as dense: a plain model again
    assert main(["export", str(tmp_path / "sparse"), "--output-dir", str(tmp_path / "redense")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_plain(tmp_path / "redense")(x).logits, reference, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dense")
    text = "def area(r):\n    return 3.14 * r * r\n"
    assert tokenizer(text).input_ids == load_tokenizer().encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token_id == plain.config.eos_token_id == 0


def test_dense_tail_gpt2_run_exports_a_plain_model(gpt2_run, tmp_path):
    """A GPT-2 run whose last steps trained dense (Conv1D layers again) exports a folder plain transformers loads."""
    from slope.evaluate import load_trained_model

    root = gpt2_run.parent
    assert main(["train", "--out", str(tmp_path / "tail"), "--dataset", str(root / "text.txt"), "--model-config", "gpt2",
                 "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
                 "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--log-every", "100", "--eval-every", "2",
                 "--save-every", "0", "--max-steps", "2", "--lazy-lora-fraction", "0", "--dense-tail-fraction", "0.5"]) == 0
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = load_trained_model(tmp_path / "tail", "cpu", "unmerged").model
        assert {type(trained.get_submodule(n)).__name__ for n in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc")} == {"Conv1D"}
        assert main(["export", str(tmp_path / "tail"), "--output-dir", str(tmp_path / "d")]) == 0
        torch.testing.assert_close(load_plain(tmp_path / "d")(x).logits, trained(x).logits, rtol=1e-5, atol=1e-5)


def test_export_errors(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="`slope train` checkpoint: evaluate it with `slope eval.*slope export"):
        from_pretrained(run / "checkpoint")
    assert main(["export", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "x")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["export", str(run), "--output-dir", str(tmp_path / "d")]) == 0
    assert main(["export", str(tmp_path / "d"), "--output-dir", str(tmp_path / "x")]) == 1
    assert "dense `slope export` folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), "--output-dir", str(tmp_path / "x"), "--form", "compressed"])


def test_export_refuses_a_folder_the_run_replaces_and_a_file_in_the_way(run, tmp_path, capsys):
    """Inside the run's checkpoint folders `slope train --resume` would delete the export; under a file it cannot be made."""
    checkpoint = run / "checkpoint"
    before = sorted(p.name for p in checkpoint.iterdir())
    for source, output in ((run, checkpoint / "hf"), (checkpoint, checkpoint / "hf"), (checkpoint, run / "checkpoint-step000002" / "hf"),
                           (run, run / "checkpoint.tmp")):
        assert main(["export", str(source), "--output-dir", str(output)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is inside the checkpoint folder" in err[0] and "pick a folder outside it" in err[0], err
        assert not output.exists()
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    (tmp_path / "file").write_text("x")
    assert main(["export", str(run), "--output-dir", str(tmp_path / "file" / "d")]) == 1  # refused before loading
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slope export: error: output_dir {str(tmp_path / 'file' / 'd')!r} cannot be made: {tmp_path / 'file'} "
                   "is a file, not a folder; choose a folder elsewhere"]
    assert main(["export", str(run), "--output-dir", str(run / "hf")]) == 0  # beside the checkpoint is fine
    shutil.rmtree(run / "hf")  # (the run is shared by this module's tests)


def test_export_refuses_a_folder_that_holds_files(run, tmp_path, capsys):
    from slope.serialization.export import export_model

    pruned_dir = tmp_path / "pruned"  # what slope oneshot leaves: an export there would sit beside an unrelated report
    pruned_dir.mkdir()
    (pruned_dir / "sparsity_report.json").write_text("{}")
    refusal = f"output_dir {str(pruned_dir)!r} exists and is not an empty folder; choose a new folder for this export"
    assert main(["export", str(run), "--output-dir", str(pruned_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"slope export: error: {refusal} (one form per folder) or remove it"]
    assert [p.name for p in pruned_dir.iterdir()] == ["sparsity_report.json"]
    fake = tmp_path / "fake"  # a pruned model's folder without weights: refused before it loads
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"slope_config": {}}))
    with pytest.raises(ValueError, match=refusal):
        export_model(fake, pruned_dir)
    (tmp_path / "d").mkdir()  # an empty folder is fine
    assert main(["export", str(run), "--output-dir", str(tmp_path / "d")]) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    assert main(["export", str(run), "--output-dir", str(tmp_path / "d"), "--form", "sparse"]) == 1
    assert "one form per folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == written
