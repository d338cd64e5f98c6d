"""slope.recovery: constant masks, SquareHead / KL / MSE distillation, slope.finetune + CLI, RecoveryTrainer, resume, DDP."""
import copy
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T

import slope
from slope.finetune_loop import lr_at
from slope.masks import is_nm_sparse
from slope.pruning import RecipeError, oneshot, parse_recipe
from slope.pruning.loading import shipped_tokenizer
from slope.recovery import DistillationError, Distiller, OutputDistillationModifier, kl_divergence, mse, square_head
from slope.recovery.finetune import CHECKPOINT_STATE, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED_RECIPE = """
test_stage:
  pruning_modifiers:
    ConstantPruningModifier:
      targets: [
        "re:.*self_attn.q_proj",
        "re:.*self_attn.k_proj",
        "re:.*self_attn.v_proj",
        "re:.*self_attn.o_proj",
        "re:.*mlp.gate_proj",
        "re:.*mlp.up_proj"
      ]
      start: 0
  distillation_modifiers:
    OutputDistillationModifier:
      targets: [
        "model.embed_tokens",
%s
        "model"
      ]
      comparison: "square_head"
      start: 0
      orig_scale: 1.0
      distill_scale: 1.0
""" % "\n".join(f'        "model.layers.{i}",' for i in range(31))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers=2, vocab=4096, hidden=32, seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return T.LlamaForCausalLM(config)


def pruned_pair(layers=2, mixed=True):
    """``(student, teacher)``: the teacher dense, the student magnitude-pruned — block 0 at 2:4 and, with
    ``mixed``, block 1 unstructured 50 % (trained under masks)."""
    teacher = tiny_llama(layers)
    student = copy.deepcopy(teacher)
    recipe = {"s": {"g": {"MagnitudePruningModifier": {"mask_structure": "2:4", "targets": ["re:model.layers.0$"] if mixed else None}}}}
    if mixed:
        recipe["s"]["h"] = {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.[1-9]$"]}}
    oneshot(student, recipe, verbose=False)
    return student, teacher


def recipe(constant=True, distill=None, **distill_params):
    text = {}
    if constant:
        text.setdefault("stage", {})["pruning_modifiers"] = {"ConstantPruningModifier": {"start": 0}}
    if distill:
        params = {"targets": distill, "comparison": "square_head", **distill_params}
        text.setdefault("stage", {})["distillation_modifiers"] = {"OutputDistillationModifier": params}
    return text


def dense_weights(model) -> dict:
    """``{linear name: (out, in) weight}`` of the block linears, SLoPe layers as ``W⊙M``."""
    out = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEARS:
            out[name] = (module.dense_weight() if isinstance(module, slope.SparseLinear) else module.weight).detach().clone()
    return out


def run(model, tmp_path=None, teacher=None, rec=None, **kw):
    options = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_seq_length=16, eval_batches=1,
                   learning_rate=1e-2, warmup_steps=1, logging_steps=1, seed=0, tokenizer=shipped_tokenizer(), progress=False)
    return finetune(model, rec, DOCS, distill_teacher=teacher, output_dir=tmp_path, **{**options, **kw})


# ---------------------------------------------------------------------- comparisons against loops
def _loop_square_head(s, t, keep):
    num = den = 0.0
    count = 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if keep[b, i]:
                for k in range(s.shape[2]):
                    num += (float(s[b, i, k]) - float(t[b, i, k])) ** 2
                    den += float(t[b, i, k]) ** 2
                    count += 1
    return (num / count) / (den / count), num / count


def _loop_kl(s, t, keep):
    import math

    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not keep[b, i]:
                continue
            zs = [math.exp(float(v)) for v in s[b, i]]
            zt = [math.exp(float(v)) for v in t[b, i]]
            ps, pt = [v / sum(zs) for v in zs], [v / sum(zt) for v in zt]
            total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
            count += 1
    return total / count


@pytest.mark.parametrize("masked", [False, True])
def test_comparisons_equal_their_formulas_on_random_tensors(masked):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    keep = torch.rand(3, 5, generator=g) > 0.3 if masked else torch.ones(3, 5, dtype=torch.bool)
    mask = keep if masked else None
    sq, ms = _loop_square_head(s, t, keep)
    assert float(square_head(s, t, mask)) == pytest.approx(sq, rel=1e-6)
    assert float(mse(s, t, mask)) == pytest.approx(ms, rel=1e-6)
    assert float(kl_divergence(s, t, mask)) == pytest.approx(_loop_kl(s, t, keep), rel=1e-5)
    assert float(kl_divergence(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert square_head(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_distillation_loss_is_the_mean_over_targets_of_the_formula():
    student, teacher = pruned_pair()
    targets = ["model.embed_tokens", "model.layers.0", "model", "lm_head"]
    x = torch.randint(0, 4096, (2, 12))
    hs_s = student(x, output_hidden_states=True)
    hs_t = teacher(x, output_hidden_states=True)
    for comparison, fn in (("square_head", square_head), ("kl", kl_divergence), ("mse", mse)):
        distiller = Distiller(student, teacher, OutputDistillationModifier(targets=targets, comparison=comparison))
        with distiller.student_capture.capture() as outs:
            student(input_ids=x)
        got = distiller.loss(outs, distiller.teacher_outputs(x))
        pairs = [(hs_s.hidden_states[0], hs_t.hidden_states[0]), (hs_s.hidden_states[1], hs_t.hidden_states[1]),
                 (hs_s.hidden_states[-1], hs_t.hidden_states[-1]), (hs_s.logits, hs_t.logits)]
        want = sum(fn(a, b) for a, b in pairs) / 4
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)
        distiller.remove()


def test_training_loss_is_the_recipes_combination_of_task_loss_and_square_head():
    """slope.finetune's training loss against one written from Kurtic et al. on fresh random tokens:
    orig_scale · cross-entropy + distill_scale · mean over targets of ‖h_s − h_t‖² / ‖h_t‖² (each
    target's whole output: embeddings, block 0, the final hidden state) — values and gradients."""
    from slope.recovery.finetune import _loss_fn

    student, teacher = pruned_pair()
    targets, (orig, scale) = ["model.embed_tokens", "model.layers.0", "model"], (0.5, 2.0)
    distiller = Distiller(student, teacher, OutputDistillationModifier(targets=targets, orig_scale=orig, distill_scale=scale))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 4096, (2, 12), generator=g), torch.randint(0, 4096, (2, 12), generator=g)
    weight = student.model.layers[0].mlp.up_proj.weight
    loss, parts = _loss_fn(distiller)(student, x, y, 0)
    (got_grad,) = torch.autograd.grad(loss, weight)
    distiller.remove()
    with torch.no_grad():
        h_t = teacher(x, output_hidden_states=True).hidden_states
    out = student(x, output_hidden_states=True)
    h_s = out.hidden_states
    task = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
    square_heads = [((h_s[i] - h_t[i]) ** 2).sum() / (h_t[i] ** 2).sum() for i in (0, 1, -1)]
    want = orig * task + scale * sum(square_heads) / 3
    (want_grad,) = torch.autograd.grad(want, weight)
    assert parts["task_loss"] == pytest.approx(float(task), rel=1e-5)
    assert parts["distill_loss"] == pytest.approx(float(sum(square_heads) / 3), rel=1e-5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-8)


def test_teacher_runs_without_gradients_and_stops_after_its_last_target():
    student, teacher = pruned_pair()
    calls = []
    teacher.lm_head.register_forward_hook(lambda *a: calls.append(1))
    teacher.model.layers[1].register_forward_hook(lambda *a: calls.append(2))
    distiller = Distiller(student, teacher, OutputDistillationModifier(targets=["model.layers.0"]))
    outs = distiller.teacher_outputs(torch.randint(0, 4096, (2, 8)))
    assert calls == [] and not teacher.training  # layer 1 and the logits are never computed
    assert not outs["model.layers.0"].requires_grad and all(not p.requires_grad for p in teacher.parameters())
    assert distiller.teacher_bytes == 2 * 8 * 32 * 4


@pytest.mark.parametrize("targets,logits", [(["model.layers.0", "model"], 0), (["model.layers.0", "lm_head"], 8)])
def test_a_teacher_that_runs_its_whole_forward_computes_logits_only_for_a_target(targets, logits):
    """stop_early=False (a teacher sharded by FSDP2) runs every layer, and its vocabulary projection on
    no position unless a target needs the logits; the captured outputs equal those of a full forward."""
    student, teacher = pruned_pair()
    seen = []
    teacher.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    x = torch.randint(0, 4096, (2, 8))
    full = teacher(x, output_hidden_states=True)
    seen.clear()
    distiller = Distiller(student, teacher, OutputDistillationModifier(targets=targets), stop_early=False)
    outs = distiller.teacher_outputs(x)
    assert seen == [logits] and distiller.skip_logits == (logits == 0)
    if "model" in outs:
        assert torch.equal(outs["model"], full.hidden_states[-1])
    if "lm_head" in outs:
        assert torch.equal(outs["lm_head"], full.logits)


# ---------------------------------------------------------------------- zeros stay zero
@pytest.mark.parametrize("double_pruning,precision", [(False, "bf16"), (True, "fp16")])
def test_finetune_never_changes_the_masks(tmp_path, double_pruning, precision):
    student, teacher = pruned_pair()
    layer = student.model.layers[0].mlp.up_proj
    with torch.no_grad():  # a group with a single nonzero: its second kept entry is an exact zero ("pinned")
        row = layer.weight[0, :4]
        row[row != 0] = torch.tensor([0.0, 0.5])
    before = dense_weights(student)
    model = run(student, tmp_path, teacher, recipe(distill=["model.layers.1", "lm_head"], comparison="kl"), weight_decay=0.1,
                max_grad_norm=0.05, save_steps=4, double_pruning=double_pruning, **{precision: True})
    after = dense_weights(model)
    kinds = model.finetune_summary["constant_pruning"]["layers"]
    assert {kinds[n]["kind"] for n in kinds if ".layers.0." in n} == {"2:4 SLoPe"}
    assert {kinds[n]["kind"] for n in kinds if ".layers.1." in n} == {"masked"}
    for name, w in before.items():
        assert bool((after[name][w == 0] == 0).all()), name          # every zero stays exactly zero
        assert bool((after[name][w != 0] != w[w != 0]).any()), name   # and the kept weights trained
    for name, sparse in slope.sparse_modules(model):
        assert is_nm_sparse(sparse.mask, 2, 4, exact=True) and bool(sparse.mask[before[name] != 0].all()), name
        assert sparse.compress == double_pruning and sparse.double_pruning == double_pruning
    moments = torch.load(tmp_path / "checkpoint-4" / CHECKPOINT_STATE, weights_only=False)["dense_opt"]["state"]
    matrices = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]  # the dense optimizer's group 0
    checked = 0
    for index, name in enumerate(matrices):
        module = name.rpartition(".")[0]
        if module in before and kinds[module]["kind"] == "masked":
            zero = before[module] == 0
            assert bool((moments[index]["exp_avg"][zero] == 0).all()) and bool((moments[index]["exp_avg_sq"][zero] == 0).all())
            assert bool((moments[index]["exp_avg_sq"][~zero] > 0).any())
            checked += 1
    assert checked == 7
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, w in before.items():
        assert bool((loaded.get_submodule(name).weight[w == 0] == 0).all()), name
    assert json.loads((tmp_path / "summary.json").read_text())["distillation"]["comparison"] == "kl"



def pruned_mixtral():
    """A tiny Mixtral whose fused expert tensors (transformers 5: 3-D, no nn.Linear) are 2:4 per expert, as
    ``prune_model(experts=True)`` leaves them and a plain load of its folder gives them; its linears dense."""
    from slope.masks import nm_mask_from_scores

    torch.manual_seed(0)
    config = T.MixtralConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = T.MixtralForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.mul_(nm_mask_from_scores(p.abs(), 2, 4))
    return model


@pytest.mark.parametrize("targets", [None, ["re:model.layers.\\d+$"], ["re:.*experts$"]])
def test_the_zeros_of_fused_moe_experts_are_held(tmp_path, targets):
    """By default, and when a target reaches their module, fused expert tensors keep their zeros (they
    trained dense: 50 % -> 0 % zeros, with no warning)."""
    student = pruned_mixtral()
    experts = {n: p.detach().clone() for n, p in student.named_parameters() if p.dim() == 3}
    assert len(experts) == 4 and all(float((w == 0).float().mean()) == 0.5 for w in experts.values())
    rec = {"stage": {"pruning_modifiers": {"ConstantPruningModifier": {"start": 0, "targets": targets}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (targets naming blocks: their dense linears "hold no zeros")
        model = run(student, tmp_path, rec=rec, weight_decay=0.1)
    layers = model.finetune_summary["constant_pruning"]["layers"]
    for name, before in experts.items():
        after = model.get_parameter(name)
        assert layers[name] == {"kind": "masked", "zero_fraction": 0.5}, name
        assert bool((after[before == 0] == 0).all()) and bool((after[before != 0] != before[before != 0]).any()), name


def test_fused_moe_experts_left_out_of_the_targets_are_warned_about(tmp_path):
    student = pruned_mixtral()
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.q_proj.weight[:, ::2] = 0
    rec = {"stage": {"pruning_modifiers": {"ConstantPruningModifier": {"start": 0, "targets": ["re:.*q_proj"]}}}}
    with pytest.warns(UserWarning, match=r"mlp.experts.gate_up_proj"):
        run(student, tmp_path, rec=rec)

# ---------------------------------------------------------------------- equalities
def test_distill_scale_zero_equals_plain_finetuning():
    assert slope.finetune is finetune
    plain = run(pruned_pair()[0], rec=recipe())
    student, teacher = pruned_pair()
    zero = run(student, teacher=teacher, rec=recipe(distill=["model.layers.0", "model"], distill_scale=0.0))
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    assert plain.finetune_summary["val_curve"] == zero.finetune_summary["val_curve"]


def test_resume_is_exact(tmp_path):
    student, teacher = pruned_pair()
    full = run(student, tmp_path / "full", teacher, recipe(distill=["model.layers.0", "model"]), save_steps=2)
    student, teacher = pruned_pair()
    resumed = run(student, tmp_path / "resumed", teacher, recipe(distill=["model.layers.0", "model"]), save_steps=2,
                  resume_from_checkpoint=tmp_path / "full" / "checkpoint-2")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.finetune_summary["val_curve"] == resumed.finetune_summary["val_curve"]
    latest = run(pruned_pair()[0], tmp_path / "latest", None, recipe(), save_steps=2, max_steps=2)
    written = {p.name: p.read_bytes() for p in (tmp_path / "latest").iterdir() if p.is_file()}
    again = run(pruned_pair()[0], tmp_path / "latest", None, recipe(), save_steps=2, max_steps=2, resume_from_checkpoint=True)
    assert again.finetune_summary["val_curve"] == json.loads(json.dumps(latest.finetune_summary["val_curve"]))  # nothing to train
    assert again.finetune_summary["final_train_loss"] == latest.finetune_summary["final_train_loss"]  # the recorded summary
    assert {p.name: p.read_bytes() for p in (tmp_path / "latest").iterdir() if p.is_file()} == written  # the folder as it was
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        run(pruned_pair()[0], tmp_path / "none", None, recipe(), resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="learning_rate"):
        run(pruned_pair()[0], tmp_path / "other", None, recipe(), learning_rate=1e-3,
            resume_from_checkpoint=tmp_path / "full" / "checkpoint-2")


def test_half_precision_students_train_fp32_master_weights_under_autocast():
    """The guide loads the model in bf16 (`--precision bfloat16`) and trains with `--bf16 True`: the
    weights train as fp32 masters (as accelerate's mixed precision does); without autocast it is said."""
    student, _ = pruned_pair()
    zeros = {n: p == 0 for n, p in student.named_parameters() if p.dim() == 2}
    with pytest.warns(UserWarning, match="bfloat16 weights train as fp32 master weights under bf16 autocast"):
        model = run(student.to(torch.bfloat16), rec=recipe(), bf16=True, max_steps=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, weight in dense_weights(model).items():
        assert not bool(weight[zeros[name + ".weight"]].any()), name  # the held zeros survived the upcast
    with pytest.warns(UserWarning, match="weights train in bfloat16 .* add --bf16"):
        run(pruned_pair()[0].to(torch.bfloat16), rec=recipe(), max_steps=1)


def test_lr_schedules():
    assert [lr_at(s, 1.0, 2, 6, "linear") for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_at(s, 1.0, 2, 6, "constant_with_warmup") for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert [lr_at(s, 1.0, 2, 6, "constant") for s in range(2)] == [1.0, 1.0]
    assert lr_at(4, 1.0, 2, 6, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        lr_at(0, 1.0, 0, 6, "polynomial")


# ---------------------------------------------------------------------- recipes and bad input
def test_the_seed_recipe_runs_verbatim():
    student, teacher = pruned_pair(layers=31, mixed=False)
    entries = parse_recipe(SEED_RECIPE, kind="finetune")
    assert [e.modifier.name for e in entries] == ["ConstantPruningModifier", "OutputDistillationModifier"]
    with pytest.warns(UserWarning, match="down_proj"):  # the seed holds every linear but down_proj
        model = run(student, teacher=teacher, rec=SEED_RECIPE, max_steps=1, gradient_accumulation_steps=1)
    assert len(model.finetune_summary["distillation"]["targets"]) == 33
    assert len(list(slope.sparse_modules(model))) == 31 * 6


@pytest.mark.parametrize("bad,match", [
    ({"s": {"g": {"SparseGPTModifier": {"sparsity": 0.5}}}}, "one-shot pruning modifier.*slope oneshot"),
    ({"s": {"g": {"ConstantPruningModifier": {"start": 1, "end": 1}}}}, "end must be an epoch after start"),
    ({"s": {"g": {"ConstantPruningModifier": {"stop": 1}}}}, "unknown parameter"),
    ({"s": {"g": {"OutputDistillationModifier": {"targets": ["lm_head"], "comparison": "cosine"}}}}, "comparison must be"),
    ({"s": {"g": {"OutputDistillationModifier": {"comparison": "kl"}}}}, "give targets"),
    ({"s": {"g": {"OutputDistillationModifier": {"targets": "lm_head", "distill_scale": -1}}}}, "distill_scale"),
    ({"s": {"run_type": "oneshot", "g": {"ConstantPruningModifier": {}}}}, "run_type"),
    ({"s": {"g": {"ConstantPruningModifier": {}}, "h": {"ConstantPruningModifier": {}}}}, "two ConstantPruningModifier"),
])
def test_bad_finetune_recipes(bad, match):
    with pytest.raises(RecipeError, match=match):
        from slope.recovery.finetune import plan_recipe

        plan_recipe(bad)


def test_clear_errors_for_teachers_and_targets():
    student, teacher = pruned_pair()
    with pytest.raises(DistillationError, match="vocabulary has 1024 entries"):
        Distiller(student, tiny_llama(vocab=1024), OutputDistillationModifier(targets=["lm_head"]))
    with pytest.raises(DistillationError, match="student's output is .*32.*64"):
        Distiller(student, tiny_llama(hidden=64), OutputDistillationModifier(targets=["model.layers.0"])).check(
            torch.randint(0, 4096, (1, 4)))
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=4096, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(DistillationError, match="gpt2 model and the student a llama"):
        Distiller(student, gpt2, OutputDistillationModifier(targets=["lm_head"]))
    with pytest.raises(RecipeError, match="'model.layers.7' matches no module"):
        Distiller(student, teacher, OutputDistillationModifier(targets=["model.layers.7"]))
    with pytest.raises(RecipeError, match="matches no module"):
        run(student, rec={"s": {"g": {"ConstantPruningModifier": {"targets": ["re:.*qproj"]}}}})
    with pytest.raises(ValueError, match="needs distill_teacher"):
        run(student, rec=recipe(distill=["lm_head"]))
    with pytest.raises(ValueError, match="no OutputDistillationModifier"):
        run(student, teacher=teacher, rec=recipe())
    with pytest.raises(TypeError, match="unknown training arguments"):
        run(student, rec=recipe(), num_epochs=1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        run(student, rec=recipe(), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="save_steps=2 writes checkpoint-<step> folders into output_dir"):
        run(student, rec=recipe(), save_steps=2)  # no output_dir: the checkpoints would go nowhere


# ---------------------------------------------------------------------- the CLI, with the seed's flags
def test_cli_finetune_with_the_seed_flags(tmp_path, capsys):
    from slope.cli import main

    student, teacher = pruned_pair()
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        shipped_tokenizer().save_pretrained(tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe(distill=["model.layers.0", "model.layers.1", "model"])))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    args = ["finetune", "--model", str(tmp_path / "student"), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
            "--splits", "train", "--num_train_epochs", "2", "--precision", "bfloat16", "--gradient_checkpointing", "True",
            "--bf16", "True", "--learning_rate", "0.00005", "--lr_scheduler_type", "linear", "--max_seq_length", "16",
            "--per_device_train_batch_size", "4", "--max_grad_norm", "None", "--warmup_steps", "1",
            "--distill_teacher", str(tmp_path / "teacher"), "--recipe", str(tmp_path / "recipe.yaml"), "--max-steps", "2",
            "--eval-batches", "1"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "done: 2 steps" in out and "note: the model's bfloat16 weights train as fp32 master weights under bf16 autocast" in err
    saved = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert saved.dtype == torch.float32  # the masters, as accelerate's mixed precision saves them
    assert is_nm_sparse(saved.model.layers[0].mlp.up_proj.weight != 0, 2, 4, exact=True)
    again = [str(tmp_path / "out2") if a == str(tmp_path / "out") else a for a in args[:-4]]  # "out" now holds a run
    assert main(again + ["--distill_teacher", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slope finetune: error:") and "not a Hugging Face model folder" in err


# ---------------------------------------------------------------------- transformers.Trainer
class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path, student, teacher, **kw):
    from slope.recovery import RecoveryTrainer

    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                               gradient_accumulation_steps=2, max_grad_norm=1.0, weight_decay=0.1, report_to=[],
                               save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True, dataloader_num_workers=0,
                               seed=0, **kw)
    return RecoveryTrainer(model=student, args=args, train_dataset=_Tokens(), distill_teacher=teacher,
                           recipe=recipe(distill=["model.layers.0", "model"]))


def test_recovery_trainer_keeps_zeros_and_resumes_exactly(tmp_path):
    student, teacher = pruned_pair()
    before = dense_weights(student)
    trainer = _trainer(tmp_path / "a", student, teacher)
    assert trainer.args.max_grad_norm == float("inf") and trainer.sparse_optimizer is not None  # joint clipping in the callback
    trainer.train()
    after = dense_weights(trainer.model)
    for name, w in before.items():
        assert bool((after[name][w == 0] == 0).all()) and bool((after[name] != w).any()), name
    student2, teacher2 = pruned_pair()
    resumed = _trainer(tmp_path / "a", student2, teacher2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------- DDP (2 gloo processes)
# Adam's first steps move a weight by ~lr·g/(|g|+eps): with eps=1e-8 a gradient that cancels to ~1e-9 turns
# float32 summation-order noise (2 ranks vs 1) into visible updates; a larger eps keeps "same result" checkable.
# MSE is a mean over the batch, so 2 ranks × b equal 1 × 2b exactly; SquareHead divides by the teacher's mean
# square of each rank's micro-batch, a per-batch normalisation that does not split (documented).
DDP_OPTIONS = dict(adam_epsilon=1e-4, device="cpu", rec=recipe(distill=["model.layers.0", "model"], comparison="mse"))


def _ddp_worker(out: str) -> None:
    student, teacher = pruned_pair()
    model = run(student, teacher=teacher, per_device_train_batch_size=2, **DDP_OPTIONS)
    if int(os.environ["RANK"]) == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


@pytest.mark.distributed
def test_ddp_two_ranks_match_one_process(tmp_path):
    launch([__file__, str(tmp_path / "ddp.pt")], tmp_path)
    student, teacher = pruned_pair()
    single = run(student, teacher=teacher, per_device_train_batch_size=4, **DDP_OPTIONS)
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


if __name__ == "__main__":  # a DDP worker (launched by the test above)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    warnings.simplefilter("ignore")
    _ddp_worker(sys.argv[1])


def test_fp16_weights_without_autocast_train_as_fp32(tmp_path):
    """A model held in fp16 (``--precision fp16``) without --fp16 would step AdamW in fp16 weights and end
    in NaN: it trains as fp32, said in a note, and stays finite."""
    student, _ = pruned_pair()
    with pytest.warns(UserWarning, match="float16 weights cannot train without loss scaling"):
        model = run(student.half(), tmp_path / "out", rec=recipe())
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert math.isfinite(model.finetune_summary["final_val_loss"])


def test_a_diverged_run_writes_no_model(tmp_path):
    student, _ = pruned_pair()
    with pytest.raises(ValueError, match="the run diverged: .* holds inf/nan, so the model is not written"):
        run(student, tmp_path / "out", rec=recipe(), learning_rate=1e30, max_grad_norm=None)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sequences_longer_than_the_models_positions_are_refused_before_anything_is_written(tmp_path):
    student, _ = pruned_pair()  # 64 positions
    with pytest.raises(ValueError, match=r"max_seq_length = 128 tokens exceeds the model's 64 positions; pass max_seq_length "
                       r"\(--max-seq-length\) <= 64"):
        run(student, tmp_path / "out", rec=recipe(), max_seq_length=128)
    assert not (tmp_path / "out").exists()


def test_a_missing_teacher_folder_is_named_as_the_teacher(tmp_path):
    student, _ = pruned_pair()
    with pytest.raises(FileNotFoundError, match=r"^--distill-teacher .*nowhere: not a Hugging Face model folder"):
        run(student, tmp_path / "out", teacher=str(tmp_path / "nowhere"), rec=recipe(distill=["model.layers.0"]))


def test_settings_that_cannot_act_are_said(tmp_path):
    student, teacher = pruned_pair()
    with pytest.warns(UserWarning, match="double_pruning applies to the 2:4 layers a ConstantPruningModifier holds"):
        run(copy.deepcopy(student), rec=recipe(constant=False, distill=["model.layers.0"]), teacher=teacher, double_pruning=True)
    with pytest.warns(UserWarning, match=r"OutputDistillationModifier start 5 \(epochs\) is step \d+, at or after the run's 4 "
                      "steps: it never distils"):
        run(student, rec=recipe(distill=["model.layers.0"], start=5), teacher=teacher)
