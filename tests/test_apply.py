"""``slope apply``: every stage of a recipe in one run, equal to running its commands stage by stage."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

import slope
from slope.finetune_checkpoints import LoopCheckpoints
from slope.masks import is_nm_sparse
from slope.pruning import RecipeError, oneshot
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune
from slope.serialization.folders import OutputDirError
from slope.stages import RECORD_NAME, apply

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch, run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]

# Prune unstructured, recover with distillation, prune again to 2:4, recover again: four stages in
# an order no single command runs (oneshot stages with train stages between them).
FOUR = {
    "prune_half": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.\\d+$"]}}},
    "recover": {"g": {"ConstantPruningModifier": {"start": 0}},
                "d": {"OutputDistillationModifier": {"targets": ["model.layers.1"], "comparison": "square_head"}}},
    "prune_24": {"run_type": "oneshot",
                 "g": {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4", "targets": ["re:model.layers.\\d+$"]}}},
    "recover_again": {"run_type": "train", "g": {"ConstantPruningModifier": {"start": 0}}},
}
TRAINING = dict(max_steps=3, per_device_train_batch_size=4, max_seq_length=16, eval_batches=1, learning_rate=1e-2,
                progress=False)
CALIBRATION = dict(num_calibration_samples=8, max_seq_len=16)


@pytest.fixture
def dense(tmp_path):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    shipped_tokenizer().save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _weights(folder):
    return T.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _linears(folder):
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


def _stage_by_stage(dense, out):
    """The reference: each stage by its own command's function, on the folder the stage before wrote."""
    tok = shipped_tokenizer()
    oneshot(str(dense), FOUR, DOCS, tok, 8, 16, out / "a", stage="prune_half", verbose=False)
    finetune(str(out / "a"), FOUR, DOCS, distill_teacher=str(dense), output_dir=out / "b", stage="recover", **TRAINING)
    oneshot(str(out / "b"), FOUR, DOCS, tok, 8, 16, out / "c", stage="prune_24", verbose=False)
    finetune(str(out / "c"), FOUR, DOCS, output_dir=out / "d", stage="recover_again", **TRAINING)
    return [out / s for s in "abcd"]


def test_apply_equals_the_stages_run_one_by_one(tmp_path, dense, capsys):
    model = apply(str(dense), FOUR, DOCS, tmp_path / "run", distill_teacher=str(dense), **CALIBRATION, **TRAINING)
    folders = [tmp_path / "run" / f"stage_{name}" for name in FOUR]
    for ours, ref in zip(folders, _stage_by_stage(dense, tmp_path / "ref")):
        for (name, a), b in zip(_weights(ours).items(), _weights(ref).values()):
            assert torch.equal(a, b), (ours.name, name)
    half, held, final = _linears(folders[0]), _linears(folders[1]), _linears(folders[3])
    for name, weight in final.items():
        assert is_nm_sparse(_linears(folders[2])[name] != 0, 2, 4, exact=False), name   # prune_24 made it 2:4
        assert bool((held[name][half[name] == 0] == 0).all()), name                   # recover held prune_half's zeros
        assert bool((weight[_linears(folders[2])[name] == 0] == 0).all()), name       # recover_again held prune_24's
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    assert [(s["name"], s["run_type"], s["done"]) for s in record["stages"]] == [
        ("prune_half", "oneshot", True), ("recover", "train", True), ("prune_24", "oneshot", True), ("recover_again", "train", True)]
    assert record["stages"][0]["result"]["zero_fraction"] == pytest.approx(0.5)
    assert record["stages"][3]["result"]["steps"] == 3
    # the stage folder records its own stage only; the returned model is the last stage's, in its training form
    assert list(yaml.safe_load((folders[1] / "recipe.yaml").read_text())) == ["recover"]
    assert model.finetune_summary["steps"] == 3 and model.apply_summary["final_model"] == str(folders[3])
    out = capsys.readouterr().out
    assert "apply: stage 3/4 prune_24 (oneshot)" in out and "final model: " in out


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, dense, monkeypatch, capsys):
    """Stopped after checkpoint-2 of the last stage, the same call keeps the finished stages and resumes
    that stage from its checkpoint: the run ends as an uninterrupted one does."""
    recipe = {k: FOUR[k] for k in ("prune_half", "recover_again")}
    kw = dict(**CALIBRATION, **{**TRAINING, "max_steps": 4}, save_steps=2)
    whole = apply(str(dense), recipe, DOCS, tmp_path / "whole", **kw)
    save = LoopCheckpoints.save

    def stop_after_two(self, step, records):
        save(self, step, records)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(LoopCheckpoints, "save", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        apply(str(dense), recipe, DOCS, tmp_path / "run", **kw)
    monkeypatch.setattr(LoopCheckpoints, "save", save)
    pruned = tmp_path / "run" / "stage_prune_half" / "model.safetensors"
    stamp = os.stat(pruned).st_mtime_ns
    capsys.readouterr()
    again = apply(str(dense), recipe, DOCS, tmp_path / "run", **kw)
    out = capsys.readouterr().out
    assert "stage 1/2 prune_half (oneshot): done earlier" in out and "resumes from its newest checkpoint" in out
    assert os.stat(pruned).st_mtime_ns == stamp                                      # not pruned again
    assert again.finetune_summary["resumed_from"].endswith("checkpoint-2")
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # a third call finds everything done: it runs nothing and returns the final folder's model
    done = apply(str(dense), recipe, DOCS, tmp_path / "run", **kw)
    assert all(s["done"] for s in done.apply_summary["stages"])
    for (name, a), b in zip(_weights(tmp_path / "run" / "stage_recover_again").items(), done.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stage_finished_but_not_recorded_is_kept(tmp_path, dense):
    recipe = {"prune_half": FOUR["prune_half"]}
    apply(str(dense), recipe, DOCS, tmp_path / "run", **CALIBRATION, **TRAINING)
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    record["stages"][0].update(done=False, seconds=None, result=None)  # stopped between the stage and the record
    (tmp_path / "run" / RECORD_NAME).write_text(json.dumps(record))
    again = apply(str(dense), recipe, DOCS, tmp_path / "run", **CALIBRATION, **TRAINING, verbose=False)
    entry = again.apply_summary["stages"][0]
    assert entry["done"] and entry["seconds"] is None and entry["result"]["zero_fraction"] == pytest.approx(0.5)


def test_a_model_in_memory_is_pruned_in_place_and_not_reused(tmp_path, dense, capsys):
    model = T.AutoModelForCausalLM.from_pretrained(dense)
    apply(model, PRUNE_THEN_TRAIN, DOCS, tmp_path / "run", tokenizer=shipped_tokenizer(), **CALIBRATION, **TRAINING, verbose=False)
    up = model.model.layers[0].mlp.up_proj.weight
    assert float((up == 0).float().mean()) == pytest.approx(0.5)  # as oneshot does: in place
    capsys.readouterr()
    again = apply(T.AutoModelForCausalLM.from_pretrained(dense), PRUNE_THEN_TRAIN, DOCS, tmp_path / "run",
                  tokenizer=shipped_tokenizer(), **CALIBRATION, **TRAINING)
    assert again.apply_summary["ran_now"] == [] and "the model given in memory is not used" in capsys.readouterr().out


def test_a_list_of_modifier_objects_runs_as_its_stages(tmp_path, dense):
    """llm-compressor's Python recipe: the same run as the dict recipe with the stage names it gets."""
    from slope.pruning import MagnitudePruningModifier
    from slope.recovery import ConstantPruningModifier

    objects = [MagnitudePruningModifier(sparsity=0.5, targets=["re:model.layers.\\d+$"]), ConstantPruningModifier(start=0)]
    written = {"oneshot_stage": FOUR["prune_half"], "train_stage": FOUR["recover_again"]}
    a = apply(str(dense), objects, DOCS, tmp_path / "objects", **CALIBRATION, **TRAINING, verbose=False)
    b = apply(str(dense), written, DOCS, tmp_path / "written", **CALIBRATION, **TRAINING, verbose=False)
    assert [s["folder"] for s in a.apply_summary["stages"]] == ["stage_oneshot_stage", "stage_train_stage"]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_stages_named_by_numbers(tmp_path, dense):
    """YAML keys a stage `1:` by the number 1: its folder is stage_1."""
    text = "1:\n  g:\n    MagnitudePruningModifier: {sparsity: 0.5}\n2:\n  g:\n    ConstantPruningModifier: {start: 0}\n"
    model = apply(str(dense), text, DOCS, tmp_path / "run", **CALIBRATION, **TRAINING, verbose=False)
    assert [s["folder"] for s in model.apply_summary["stages"]] == ["stage_1", "stage_2"]
    assert model.finetune_summary["constant_pruning"]["zero_fraction"] == pytest.approx(0.5)


def test_the_run_folder_points_to_its_stage_folders(tmp_path, dense, capsys):
    from slope.cli import main

    apply(str(dense), {"prune_half": FOUR["prune_half"]}, DOCS, tmp_path / "run", **CALIBRATION, **TRAINING, verbose=False)
    for argv in (["eval", "--checkpoint", str(tmp_path / "run")],
                 ["finetune", "--model", str(tmp_path / "run"), "--output-dir", str(tmp_path / "x"), "--max-steps", "1"]):
        capsys.readouterr()
        assert main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and "the run folder of `slope apply`" in errors[0] and "pass that folder" in errors[0], errors
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "stage_prune_half"), "--eval-batches", "1"]) == 0
    # a Trainer's output_dir (checkpoint-<step>/ model folders, no model of its own) says to pass one
    trainer_out = tmp_path / "trainer_out"
    shutil.copytree(tmp_path / "run" / "stage_prune_half", trainer_out / "checkpoint-500")
    for argv in (["eval", "--checkpoint", str(trainer_out)], ["finetune", "--model", str(trainer_out), "--max-steps", "1"]):
        capsys.readouterr()
        assert main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and "its models are the checkpoint-<step>/ folders inside it; pass one" in errors[0], errors


PRUNE_THEN_TRAIN = {k: FOUR[k] for k in ("prune_half", "recover_again")}


def test_settings_that_would_lose_a_finished_stage_are_refused(tmp_path, dense):
    run = tmp_path / "run"
    apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **TRAINING, verbose=False)
    with pytest.raises(OutputDirError, match=r"finished stage recover_again, but its settings changed \(learning_rate: 0.01 "
                       r"there, 0.02 now\); continue the run with its settings, or choose a new folder"):
        apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **{**TRAINING, "learning_rate": 2e-2})
    other = {**PRUNE_THEN_TRAIN, "prune_half": {"g": {"MagnitudePruningModifier": {"sparsity": 0.6}}}}
    with pytest.raises(OutputDirError, match=r"finished stage prune_half, but its settings changed \(recipe: its modifiers"):
        apply(str(dense), other, DOCS, run, **CALIBRATION, **TRAINING)
    with pytest.raises(OutputDirError, match=r"finished stage prune_half, but its settings changed \(num_calibration_samples: "
                       "8 there, 4 now"):
        apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **{**CALIBRATION, "num_calibration_samples": 4}, **TRAINING)
    with pytest.raises(OutputDirError, match="finished stage recover_again, but the recipe no longer holds it"):
        apply(str(dense), {"prune_half": FOUR["prune_half"]}, DOCS, run, **CALIBRATION, **TRAINING)
    kept = apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **{**TRAINING, "logging_steps": 5, "eval_batches": 2},
                 verbose=False)  # flags that change no result
    assert kept.apply_summary["ran_now"] == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not an empty folder"):
        apply(str(dense), PRUNE_THEN_TRAIN, DOCS, tmp_path / "full", **CALIBRATION, **TRAINING)
    shutil.copytree(run, tmp_path / "gone")  # the first stage's folder gone: changing it would lose the stage after it
    shutil.rmtree(tmp_path / "gone" / "stage_prune_half")
    with pytest.raises(OutputDirError, match="finished stage recover_again, but stage prune_half before it changed"):
        apply(str(dense), PRUNE_THEN_TRAIN, DOCS, tmp_path / "gone", **{**CALIBRATION, "num_calibration_samples": 4}, **TRAINING)
    (run / RECORD_NAME).write_text("{not json")
    with pytest.raises(OutputDirError, match="is corrupt"):
        apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **TRAINING)


def test_a_failed_run_continues_with_corrected_settings(tmp_path, dense, capsys, monkeypatch):
    """What no stage finished (or checkpointed) under the first settings runs under the corrected ones;
    what did stays."""
    run, recipe = tmp_path / "run", {k: FOUR[k] for k in ("prune_24", "recover_again")}  # SparseGPT calibrates
    too_long = "max_seq_length = 100 tokens exceeds the model.s 64 positions; pass max_seq_length .--max-seq-len"
    with pytest.raises(ValueError, match=too_long):  # the first stage fails
        apply(str(dense), recipe, DOCS, run, **{**CALIBRATION, "max_seq_len": 100}, **TRAINING, verbose=False)
    import slope.recovery.finetune as recovery

    def diverges(*args, **kwargs):
        raise ValueError("the loss diverged")

    monkeypatch.setattr(recovery, "finetune", diverges)  # the train stage fails, after the oneshot stage finished
    with pytest.raises(ValueError, match="diverged"):
        apply(str(dense), recipe, DOCS, run, **CALIBRATION, **{**TRAINING, "learning_rate": 5.0}, verbose=False)
    monkeypatch.undo()
    stamp = os.stat(run / "stage_prune_24" / "model.safetensors").st_mtime_ns
    fixed = apply(str(dense), recipe, DOCS, run, **CALIBRATION, **TRAINING)
    assert fixed.apply_summary["ran_now"] == ["recover_again"]
    assert os.stat(run / "stage_prune_24" / "model.safetensors").st_mtime_ns == stamp
    assert "stage 1/2 prune_24 (oneshot): done earlier" in capsys.readouterr().out
    reference = apply(str(dense), recipe, DOCS, tmp_path / "ref", **CALIBRATION, **TRAINING, verbose=False)
    for (name, a), b in zip(reference.state_dict().items(), fixed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stage_whose_folder_is_gone_runs_again(tmp_path, dense, capsys):
    run = tmp_path / "run"
    apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **TRAINING, verbose=False)
    final = _weights(run / "stage_recover_again")
    shutil.rmtree(run / "stage_prune_half")  # the middle of the run: the last stage, after it, stays
    assert apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **TRAINING).apply_summary["ran_now"] == []
    assert "its folder is gone; stage recover_again after it is kept" in capsys.readouterr().out
    shutil.rmtree(run / "stage_recover_again")  # the last stage: it runs again, from the first one (run again too)
    again = apply(str(dense), PRUNE_THEN_TRAIN, DOCS, run, **CALIBRATION, **TRAINING, verbose=False)
    assert again.apply_summary["ran_now"] == ["prune_half", "recover_again"]
    for name, value in _weights(run / "stage_recover_again").items():
        assert torch.equal(value, final[name]), name


@pytest.mark.parametrize("kw,error,match", [
    (dict(recipe={"q": {"g": {"GPTQModifier": {"bits": 4}}}}), RecipeError, "holds no stages slope runs"),
    (dict(recipe={"a": {"g": {"ConstantPruningModifier": {"strat": 0}}}}), RecipeError, "unknown parameter"),
    (dict(recipe={}), RecipeError, "holds no stages"),
    (dict(recipe={"a/b": FOUR["prune_half"]}), RecipeError, r"stage name 'a/b' cannot name its folder \(stage_a/b\)"),
    (dict(recipe={"..": FOUR["prune_half"]}), RecipeError, "stage name '..' cannot"),
    (dict(recipe={1: FOUR["prune_half"], "1": FOUR["recover_again"]}), RecipeError, "two stages share a name"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, model="nowhere"), FileNotFoundError, "model nowhere is missing"),
    (dict(recipe=FOUR, distill_teacher="nowhere"), FileNotFoundError, "distill_teacher nowhere is missing"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, tokenizer="nowhere"), FileNotFoundError, "tokenizer nowhere is missing"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, learning_rat=1), TypeError, "apply got unknown .*did you mean 'learning_rate'"),
    (dict(recipe=FOUR), ValueError, "stage recover distils .* needs distill_teacher"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, distill_teacher="x"), ValueError, "no stage of the recipe has an Output"),
    (dict(recipe=FOUR, resume_from_checkpoint=True), ValueError, "call it again with the same settings"),
    (dict(recipe=FOUR, output_dir=None), ValueError, "give output_dir"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, learning_rate=-1), ValueError, "learning_rate"),
    (dict(recipe={"prune_half": FOUR["prune_half"]}, num_calibration_samples=0), ValueError, "num_calibration_samples"),
])
def test_bad_input_fails_before_any_stage_runs(tmp_path, dense, kw, error, match):
    kw = {"output_dir": tmp_path / "run", "model": str(dense), **kw}
    with pytest.raises(error, match=match) as info:
        apply(kw.pop("model"), kw.pop("recipe"), DOCS, kw.pop("output_dir"), **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_the_command_runs_the_seeds_flow_in_one_line(tmp_path, dense, capsys):
    from slope.cli import main

    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({k: FOUR[k] for k in ("prune_24", "recover")}))
    argv = ["apply", "--model", str(dense), "--recipe", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "run"),
            "--dataset", str(tmp_path / "docs.txt"), "--distill-teacher", str(dense), "--num-calibration-samples", "8",
            "--max-seq-len", "16", "--max-steps", "2", "--per-device-train-batch-size", "4", "--max_seq_length", "16",
            "--eval-batches", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done: 2 stages (2 run now" in out and f"| outputs in {tmp_path / 'run'}" in out
    assert f"final model: {tmp_path / 'run' / 'stage_recover'}" in out
    assert main(argv) == 0
    assert "done: 2 stages (0 run now" in capsys.readouterr().out
    assert main(argv[:-2] + ["--eval-batches", "1", "--learning-rate", "1"]) == 1
    assert "slope apply: error: output_dir" in capsys.readouterr().err
    assert slope.apply is apply
    # the single commands point to slope apply for recipes they cannot run in one go
    with pytest.raises(RecipeError, match="run them all with one command: slope apply"):
        finetune(str(dense), FOUR, DOCS, distill_teacher=str(dense), **TRAINING)


# Prune to 2:4 on rank 0, then recover on every rank with DDP (MSE distillation: a mean over rows,
# so the ranks' halves average to the batch's; AdamW's epsilon large enough not to magnify the
# ranks' float-rounding differences in gradients near zero).
RANKS = dict(device="cpu", adam_epsilon=1e-4, **CALIBRATION)
TWO = {"prune_24": FOUR["prune_24"],
       "recover": {"g": {"ConstantPruningModifier": {"start": 0}},
                   "d": {"OutputDistillationModifier": {"targets": ["model.layers.1"], "comparison": "mse"}}}}


# What `accelerate launch --config_file <FSDP config>` exports (seed 002's launch): train stages shard by FSDP2.
ACCELERATE_FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "1"}


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_run_the_stages_of_one_process(tmp_path, dense, engine):
    """Under torchrun the oneshot stage runs on rank 0 while rank 1 waits, and the train stage runs on
    both (half the batch each; DDP, or FSDP2 under an accelerate FSDP launch): the folders equal those
    of one process."""
    launch([__file__, str(dense), str(tmp_path / "ddp")], tmp_path, name="apply",
           env=ACCELERATE_FSDP if engine == "fsdp" else None)
    apply(str(dense), TWO, DOCS, tmp_path / "single", distill_teacher=str(dense), **RANKS, **TRAINING)
    for name in TWO:
        single, ddp = _weights(tmp_path / "single" / f"stage_{name}"), _weights(tmp_path / "ddp" / f"stage_{name}")
        for key, value in single.items():
            torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=2e-6, msg=lambda m, k=key: f"{name} {k}: {m}")
    record = json.loads((tmp_path / "ddp" / RECORD_NAME).read_text())
    assert [s["done"] for s in record["stages"]] == [True, True]
    summary = json.loads((tmp_path / "ddp" / "stage_recover" / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["config"]["data_parallel"] == engine
    assert "apply: stage 1/2 prune_24" not in (tmp_path / "apply_rank1.log").read_text()  # rank 0 speaks
    # the run continues in one process (same global batch, without the engine flag): nothing is refused or run again
    again = apply(str(dense), TWO, DOCS, tmp_path / "ddp", distill_teacher=str(dense), **RANKS, **TRAINING, verbose=False)
    assert again.apply_summary["ran_now"] == []


@pytest.mark.distributed
def test_a_stage_failing_on_rank_0_stops_every_rank(tmp_path, dense):
    """The oneshot stage fails on rank 0 (calibration windows longer than the model's positions): rank 1,
    waiting for it, stops too instead of hanging; the error is said once."""
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(TWO))
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    failure = run_ranks([__file__, str(dense), str(tmp_path / "run"), "too-long", str(tmp_path / "two.yaml"),
                         str(tmp_path / "docs.txt")], tmp_path, name="apply", timeout=120, stop_peers=False)
    assert "rank 0 exited with 1" in failure and "rank 1 exited with 1" in failure
    logs = [(tmp_path / f"apply_rank{r}.log").read_text() for r in (0, 1)]
    assert "slope apply: error: max_seq_length = 100 tokens exceeds the model's 64 positions" in logs[0]
    assert "error" not in logs[1]
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    assert [s["done"] for s in record["stages"]] == [False, False]


if __name__ == "__main__":  # a rank of the tests above
    import warnings

    warnings.simplefilter("ignore")
    if sys.argv[3:4] == ["too-long"]:
        from slope.cli import main

        sys.exit(main(["apply", "--model", sys.argv[1], "--recipe", sys.argv[4], "--output-dir", sys.argv[2], "--dataset",
                       sys.argv[5], "--distill-teacher", sys.argv[1], "--device", "cpu", "--max-seq-len", "100"]))
    apply(sys.argv[1], TWO, DOCS, sys.argv[2], distill_teacher=sys.argv[1], **RANKS, **{**TRAINING, "per_device_train_batch_size": 2})
