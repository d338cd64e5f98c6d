"""Recipes with several stages: each command runs its stages, in the recipe's order, or says which command runs which."""
import copy
import json

import pytest
import torch
import transformers as T

from slope.masks import is_nm_sparse
from slope.pruning import RecipeError, oneshot, parse_recipe
from slope.pruning.loading import shipped_tokenizer
from slope.pruning.recipe import recipe_stages, skipped_stages
from slope.recovery.finetune import finetune, plan_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]

# llm-compressor's two-stage recipe (prune in one shot, then fine-tune holding the zeros), with
# module-name targets; the second form leaves the run types to the modifiers.
TWO_STAGES = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    MagnitudePruningModifier:
      mask_structure: "2:4"
      targets: ["re:model.layers.\\\\d+$"]
finetuning_stage:
  run_type: train
  finetuning_modifiers:
    ConstantPruningModifier:
      targets: ["re:.*q_proj", "re:.*k_proj", "re:.*v_proj", "re:.*o_proj", "re:.*gate_proj", "re:.*up_proj", "re:.*down_proj"]
      start: 0
"""
INFERRED = {"prune": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5}}},
            "recover": {"pruning_modifiers": {"ConstantPruningModifier": {}},
                        "distillation_modifiers": {"OutputDistillationModifier": {"targets": ["model.layers.0"]}}}}


def tiny_llama():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64)
    return T.LlamaForCausalLM(config)


def test_each_command_reads_its_own_stages():
    for recipe in (TWO_STAGES, INFERRED):
        stages = recipe_stages(recipe)
        assert [s.run_type for s in stages] == ["oneshot", "train"]
        assert {e.stage for e in parse_recipe(recipe, "oneshot")} == {stages[0].name}
        assert {e.stage for e in parse_recipe(recipe, "finetune")} == {stages[1].name}
        assert parse_recipe(recipe, "finetune", stage=stages[1].name) == parse_recipe(recipe, "finetune")
    constant, distill, entries = plan_recipe(INFERRED)
    assert constant.targets is None and distill.targets == ["model.layers.0"] and len(entries) == 2
    assert skipped_stages(INFERRED, "oneshot") == ["recipe stage recover (train) not run here: slope finetune runs it"]
    assert skipped_stages(INFERRED, "finetune") == ["recipe stage prune (oneshot) not run here: slope oneshot runs it"]


def test_prune_then_recover_with_one_recipe_through_both_commands(tmp_path, capsys):
    from slope.cli import main

    tiny_llama().save_pretrained(tmp_path / "dense")
    shipped_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "recipe.yaml").write_text(TWO_STAGES)
    assert main(["oneshot", "--model", str(tmp_path / "dense"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--output-dir", str(tmp_path / "pruned")]) == 0
    assert "recipe stage finetuning_stage (train) not run here: slope finetune runs it" in capsys.readouterr().out
    assert [e.stage for e in parse_recipe(tmp_path / "pruned" / "recipe.yaml")] == ["sparsity_stage"]  # what it ran
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    assert main(["finetune", "--model", str(tmp_path / "pruned"), "--recipe", str(tmp_path / "recipe.yaml"), "--output-dir",
                 str(tmp_path / "recovered"), "--max-steps", "2", "--per-device-train-batch-size", "4", "--max-seq-length", "16",
                 "--eval-batches", "1", "--learning-rate", "0.01", "--dataset", str(tmp_path / "docs.txt")]) == 0
    out = capsys.readouterr().out
    assert "recipe stage sparsity_stage (oneshot) not run here: slope oneshot runs it" in out and "done: 2 steps" in out
    assert "sparsity_stage" not in (tmp_path / "recovered" / "recipe.yaml").read_text()
    pruned = T.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    recovered = T.AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    for name, module in recovered.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            before = pruned.get_submodule(name).weight
            assert is_nm_sparse(before != 0, 2, 4, exact=True), name                 # the oneshot stage pruned it
            assert bool((module.weight[before == 0] == 0).all()), name              # the train stage held its zeros
            assert not torch.equal(module.weight, before), name                     # and trained the rest
    summary = json.loads((tmp_path / "recovered" / "summary.json").read_text())
    assert summary["constant_pruning"]["zero_fraction"] == pytest.approx(0.5)


def test_api_runs_a_stage_by_name():
    recipe = {"first": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.0$"]}}},
              "recover": {"g": {"ConstantPruningModifier": {"start": 0}}},
              "second": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.1$"]}}}}
    model = tiny_llama()
    oneshot(model, recipe, stage="first", verbose=False)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    assert not bool((model.model.layers[1].mlp.up_proj.weight == 0).any())  # the second stage waits its turn
    recovered = finetune(copy.deepcopy(model), recipe, DOCS, stage="recover", tokenizer=shipped_tokenizer(), max_steps=1,
                         per_device_train_batch_size=4, max_seq_length=16, eval_batches=1, progress=False)
    held = recovered.finetune_summary["constant_pruning"]["layers"]
    assert len(held) == 7 and all(name.startswith("model.layers.0.") for name in held)  # the zeros "first" made
    assert "second" not in recovered.finetune_summary["config"]["recipe"]


# ---------------------------------------------------------------------- which command runs which stage
THREE = {"sparsity_stage": {"run_type": "oneshot", "m": {"SparseGPTModifier": {"sparsity": 0.5}}},
         "finetuning_stage": {"run_type": "train", "m": {"ConstantPruningModifier": {"start": 0}}},
         "quantization_stage": {"run_type": "oneshot", "m": {"GPTQModifier": {"bits": 4}}}}


@pytest.mark.parametrize("recipe,kind,stage,match", [
    ({"a": {"g": {"SparseGPTModifier": {"sparsity": 0.5}}}, "b": {"g": {"WandaPruningModifier": {"sparsity": 0.5}}}}, "finetune", None,
     r"no train stage for slope finetune; its stages: a \(oneshot: slope oneshot\), b \(oneshot: slope oneshot\)"),
    ({"a": {"g": {"ConstantPruningModifier": {}}}, "b": {"g": {"OutputDistillationModifier": {"targets": "lm_head"}}}}, "finetune",
     None, "runs one train stage per run.*slope finetune --stage a, slope finetune --stage b"),
    (THREE, "oneshot", "quantization_stage", "GPTQModifier is quantization"),
    (THREE, "oneshot", "finetuning_stage", "is a train stage; run it with slope finetune --stage finetuning_stage"),
    (THREE, "finetune", "sparsity_stage", "is a oneshot stage; run it with slope oneshot --stage sparsity_stage"),
    (THREE, "finetune", "nope", r"no stage 'nope'; its stages: sparsity_stage \(oneshot"),
    ({"s": {"g": {"SparseGPTModifier": {"sparsity": 0.5}}, "h": {"ConstantPruningModifier": {}}}}, "oneshot", None,
     "stage 's' mixes one-shot pruning .*split it"),
    ({"s": {"run_type": "finetune", "g": {"ConstantPruningModifier": {}}}}, "finetune", None, "run_type 'finetune' is not supported"),
    ({"a": {"g": {"SparseGPTModifier": {"sparsity": 0.5}}}, "b": {"g": {"ConstantPruningModifier": {"strat": 0}}}}, "oneshot", None,
     r"b\.g: unknown parameter\(s\) strat of ConstantPruningModifier"),  # a skipped stage's typo fails before anything runs
    ({"a": {"g": {"SparseGPTModifier": {"sparsity": 0.5}}}, "b": {"g": {"FancyModifier": {}}}}, "oneshot", None,
     "b.g: FancyModifier is not a known modifier"),
])
def test_stage_errors_are_one_line_and_name_the_command(recipe, kind, stage, match):
    with pytest.raises(RecipeError, match=match) as info:
        parse_recipe(recipe, kind, stage)
    assert "\n" not in str(info.value)


def test_a_quantization_stage_is_left_to_others_by_finetune():
    assert [e.stage for e in parse_recipe(THREE, "finetune")] == ["finetuning_stage"]
    # oneshot runs what slope supports and says what it leaves out (it listed a command that then refused the stage)
    assert [e.stage for e in parse_recipe(THREE, "oneshot")] == ["sparsity_stage"]
    assert skipped_stages(THREE, "oneshot")[-1] == ("recipe stage quantization_stage (oneshot) not run: GPTQModifier is "
                                                    "quantization, which slope does not support; run it with another tool on "
                                                    "the model slope writes")
    two_oneshot = {**THREE, "pruning_again": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5}}}}
    with pytest.raises(RecipeError, match="slope oneshot --stage sparsity_stage, slope finetune --stage finetuning_stage, "
                       "slope oneshot --stage pruning_again; or run"):
        parse_recipe(two_oneshot, "oneshot")
    assert [e.stage for e in parse_recipe(THREE, "oneshot", "sparsity_stage")] == ["sparsity_stage"]
    with pytest.raises(ValueError, match="no recipe"):
        plan_recipe(None, "finetuning_stage")


# ---------------------------------------------------------------------- modifier objects (llm-compressor's Python recipes)
def test_modifier_objects_are_recipes():
    from slope.pruning import MagnitudePruningModifier, SparseGPTModifier
    from slope.recovery import ConstantPruningModifier, OutputDistillationModifier

    tok = shipped_tokenizer()
    written = {"default_stage": {"default_modifiers": {"SparseGPTModifier": {"mask_structure": "2:4", "targets": ["re:model.layers.0$"]}}}}
    by_yaml, by_object = tiny_llama(), tiny_llama()
    oneshot(by_yaml, written, DOCS, tok, 8, 16, verbose=False)
    oneshot(by_object, SparseGPTModifier(mask_structure="2:4", targets=["re:model.layers.0$"]), DOCS, tok, 8, 16, verbose=False)
    for (name, a), b in zip(by_yaml.state_dict().items(), by_object.state_dict().values()):
        assert torch.equal(a, b), name
    assert float((by_object.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    # a list: consecutive modifiers of one run type form a stage; a repeated modifier gets a group of its own
    mixed = [MagnitudePruningModifier(sparsity=0.5), MagnitudePruningModifier(sparsity=0.6, targets="re:model.layers.1$"),
             ConstantPruningModifier(), OutputDistillationModifier(targets="model.layers.0"), SparseGPTModifier(sparsity=0.7)]
    stages = recipe_stages(mixed)
    assert [(s.name, s.run_type, [m[:2] for m in s.modifiers]) for s in stages] == [
        ("oneshot_stage", "oneshot", [("default_modifiers", "MagnitudePruningModifier"),
                                      ("default_modifiers_2", "MagnitudePruningModifier")]),
        ("train_stage", "train", [("default_modifiers", "ConstantPruningModifier"),
                                  ("default_modifiers", "OutputDistillationModifier")]),
        ("oneshot_stage_2", "oneshot", [("default_modifiers", "SparseGPTModifier")])]
    assert [e.modifier for e in parse_recipe(mixed, "oneshot", "oneshot_stage")] == mixed[:2]
    constant, distill, _ = plan_recipe(mixed, "train_stage")
    assert constant == mixed[2] and distill == mixed[3]
    with pytest.raises(RecipeError, match="cannot run oneshot_stage, oneshot_stage_2 together.*slope apply"):
        parse_recipe(mixed, "oneshot")
    with pytest.raises(RecipeError, match="or modifier objects .e.g. SparseGPTModifier"):
        parse_recipe([1, 2])
