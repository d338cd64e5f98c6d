"""ConstantPruningModifier with start > 0 and end: the held-zeros window against hand-written loops."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

from slope.dynamic.data import load_finetune_data
from slope.finetune_loop import lr_at
from slope.pruning import RecipeError, oneshot
from slope.pruning.loading import shipped_tokenizer
from slope.recovery import ConstantPruningModifier
from slope.recovery.finetune import finetune
from slope.recovery.schedule import HeldZeros, epoch_to_step

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
OPTIONS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_seq_length=16, eval_batches=1,
               learning_rate=1e-2, warmup_steps=1, logging_steps=1, seed=0, max_grad_norm=None, progress=False)


# ---------------------------------------------------------------------- epochs → steps
@pytest.mark.parametrize("epoch,per_epoch", [(0.3, 10), (0.1, 3), (0.7, 10), (1.0, 7), (2 / 3, 3), (0.5, 4.5), (0, 5), (1e-9, 2)])
def test_epoch_to_step_is_the_first_step_at_or_past_the_epoch(epoch, per_epoch):
    first = next(s for s in range(10_000) if s / per_epoch >= epoch)  # the event index of llm-compressor, step by step
    assert epoch_to_step(epoch, per_epoch) == first


# ---------------------------------------------------------------------- the window, against a hand-written loop
def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:, ::3] = 0  # "one-shot" zeros of the held layer
    return model


def _zeros_after(step: int, shape) -> torch.Tensor:
    """The entries a pruner running alongside zeroes after optimizer step ``step`` (new ones every step)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(100 + step)) < 0.1


def _train(model, steps, per_step):
    """Adam on a fixed regression task; after each optimizer step, fresh zeros appear in layer 0,
    then ``per_step(step, optimizer)`` runs. Returns the final weights of layer 0."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    for step in range(steps):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model[0].weight[_zeros_after(step, model[0].weight.shape)] = 0
        per_step(step, opt)
    return model[0].weight.detach().clone()


def _reference(steps, start, end):
    """The obvious loop: at the top of step ``start`` take mask = (w != 0); on steps [start, end) mask
    the gradient, step, then zero the pruned weights and Adam moments; dense otherwise."""
    model = _tiny()
    w = model[0].weight
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    mask = None
    for step in range(steps):
        if step == start:
            mask = w.detach() != 0
        if step == end:
            mask = None
        F.mse_loss(model(x), y).backward()
        if mask is not None:
            w.grad *= mask
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if mask is not None:
                w *= mask
                for moment in ("exp_avg", "exp_avg_sq"):
                    opt.state[w][moment] *= mask
            w[_zeros_after(step, w.shape)] = 0
    return w.detach().clone()


def test_zeros_are_held_from_start_step_to_end_step_exactly():
    # 2 steps per epoch: start 1.5 -> step 3, end 3 -> step 6, of 9 steps
    model = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every target holds zeros at the start: no warning
        held = HeldZeros(model, ConstantPruningModifier(targets=["0"], start=1.5, end=3), steps_per_epoch=2, total_steps=9)
    assert (held.start_step, held.end_step, held.phase, held.constant) == (3, 6, "before", None)
    phases = []

    def per_step(step, opt):
        held.after_step(step, opt)
        phases.append(held.phase)

    ours = _train(model, 9, per_step)
    assert phases == ["before"] * 2 + ["holding"] * 3 + ["released"] * 4
    torch.testing.assert_close(ours, _reference(9, 3, 6), rtol=0, atol=1e-6)
    for start, end in ((2, 6), (4, 6), (3, 5), (3, 7), (0, 6), (3, None)):  # a step early or late is visible
        assert (ours - _reference(9, start, end)).abs().max() > 1e-3, (start, end)
    summary = held.summary()
    assert summary["phase"] == "released" and summary["layers"]["0"]["kind"] == "masked"
    # held: the zeros present at the top of step 3, i.e. those made after step 2 (dense steps refilled the older ones)
    assert summary["zero_fraction"] == pytest.approx(float(_zeros_after(2, (16, 8)).float().mean()))


def test_whole_run_window_is_the_constant_masks_of_before():
    model = _tiny()
    held = HeldZeros(model, ConstantPruningModifier(targets=["0"], start=0, end=-1), steps_per_epoch=2, total_steps=9)
    assert held.whole_run and held.phase == "holding" and held.end_step is None
    torch.testing.assert_close(_train(model, 9, lambda step, opt: held.after_step(step, opt)), _reference(9, 0, None),
                               rtol=0, atol=1e-6)
    late_end = HeldZeros(_tiny(), ConstantPruningModifier(targets=["0"], end=5), steps_per_epoch=2, total_steps=9)
    assert late_end.whole_run  # an end after the last step never releases: the whole run
    with pytest.warns(UserWarning, match="holds no step of this run"):
        HeldZeros(_tiny(), ConstantPruningModifier(targets=["0"], start=5), steps_per_epoch=2, total_steps=9)


# ---------------------------------------------------------------------- slope.finetune, against a hand-written loop
def _pair():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64)
    teacher = T.LlamaForCausalLM(config)
    student = copy.deepcopy(teacher)
    oneshot(student, {"s": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.0$"]}}}}, verbose=False)
    return student


def _recipe(**params):
    return {"recovery_stage": {"pruning_modifiers": {"ConstantPruningModifier": {"targets": ["re:model.layers.0$"], **params}}}}


def _finetune_reference(model, steps: int, start: int, end: int | None) -> dict:
    """slope.finetune's step written out (fp32, no clipping, 1 micro-batch): AdamW (matrices decay),
    linear warmup/decay, and the held zeros of layer 0's linears on steps [start, end)."""
    tokenizer = shipped_tokenizer()
    data = load_finetune_data(DOCS, tokenizer, seq_len=16, batch_size=4, seed=0, eval_batches=1, vocab_size=4096)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    linears = {n: m.weight for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)}
    masks = None
    model.train()
    for step in range(steps):
        if step == start:
            masks = {n: w.detach() != 0 for n, w in linears.items()}
        if step == end:
            masks = None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-2, 1, steps, "linear")
        x, y = data.batch(step, 0, 1)
        F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten()).backward()
        if masks is not None:
            for n, w in linears.items():
                w.grad *= masks[n]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masks is not None:
            with torch.no_grad():
                for n, w in linears.items():
                    w *= masks[n]
                    for moment in ("exp_avg", "exp_avg_sq"):
                        opt.state[w][moment] *= masks[n]
    return {n: w.detach().clone() for n, w in linears.items()}


def _steps_per_epoch() -> float:
    data = load_finetune_data(DOCS, shipped_tokenizer(), seq_len=16, batch_size=4, seed=0, eval_batches=1, vocab_size=4096)
    return data.micro_batches_per_epoch / OPTIONS["gradient_accumulation_steps"]


def _layer0(model) -> dict:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)}


def _close(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_finetune_end_releases_the_zeros_after_the_right_step(tmp_path):
    per_epoch = _steps_per_epoch()
    end_epoch = 3.5 / per_epoch  # between steps 3 and 4: held on steps 0..3
    end = epoch_to_step(end_epoch, per_epoch)
    assert end == 4
    student = _pair()
    zeros = {n: w == 0 for n, w in _layer0(student).items()}
    model = finetune(copy.deepcopy(student), _recipe(start=0, end=end_epoch), DOCS, tokenizer=shipped_tokenizer(), max_steps=7,
                     output_dir=tmp_path, save_steps=4, **OPTIONS)
    held = model.finetune_summary["constant_pruning"]
    assert (held["start_step"], held["end_step"], held["phase"]) == (0, 4, "released")
    assert {v["kind"] for v in held["layers"].values()} == {"masked"}  # a partial window never converts to SLoPe layers
    ours = _layer0(model)
    assert _close(ours, _finetune_reference(copy.deepcopy(student), 7, 0, 4)) < 1e-5
    for wrong in (3, 5, None):
        assert _close(ours, _finetune_reference(copy.deepcopy(student), 7, 0, wrong)) > 1e-4, wrong
    at_end = torch.load(tmp_path / "checkpoint-4" / "slope_finetune_state.pt", weights_only=False)["model"]
    assert all(bool((at_end[n + ".weight"][z] == 0).all()) for n, z in zeros.items())  # held through step 3
    assert all(bool((ours[n][z] != 0).any()) for n, z in zeros.items())  # and free to grow after


def test_finetune_later_start_trains_dense_until_then(tmp_path):
    per_epoch = _steps_per_epoch()
    start_epoch = 3.5 / per_epoch  # between steps 3 and 4
    start = epoch_to_step(start_epoch, per_epoch)
    assert start == 4
    student = _pair()
    with pytest.warns(UserWarning, match=f"starts at step {start}: .* hold no exact zeros then"):
        model = finetune(copy.deepcopy(student), _recipe(start=start_epoch), DOCS, tokenizer=shipped_tokenizer(), max_steps=7,
                         output_dir=tmp_path / "held", save_steps=start, **OPTIONS)
    held = model.finetune_summary["constant_pruning"]
    assert (held["start_step"], held["end_step"], held["phase"]) == (start, None, "holding")
    ours = _layer0(model)
    assert _close(ours, _finetune_reference(copy.deepcopy(student), 7, start, None)) < 1e-5
    assert _close(ours, _finetune_reference(copy.deepcopy(student), 7, 0, None)) > 1e-3  # holding from step 0 is visible
    with pytest.warns(UserWarning, match="no ConstantPruningModifier target covers"):
        finetune(copy.deepcopy(student), None, DOCS, tokenizer=shipped_tokenizer(), max_steps=7, output_dir=tmp_path / "plain",
                 save_steps=start, **OPTIONS)
    held_then, plain_then = (torch.load(tmp_path / run / f"checkpoint-{start}" / "slope_finetune_state.pt",
                                        weights_only=False)["model"] for run in ("held", "plain"))
    for name, value in plain_then.items():  # until its start the modifier does nothing: plain dense fine-tuning
        assert torch.equal(held_then[name], value), name
    assert all(bool((held_then[n + ".weight"] != 0).all()) for n in ours)  # the one-shot zeros filled in by then


@pytest.mark.parametrize("resume_at", [1, 3, 6])  # before the window, inside it, after it
def test_resume_across_the_window_is_exact(tmp_path, resume_at):
    per_epoch = _steps_per_epoch()
    recipe = _recipe(start=1.5 / per_epoch, end=4.5 / per_epoch)  # held on steps 2..4
    student = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = finetune(copy.deepcopy(student), recipe, DOCS, tokenizer=shipped_tokenizer(), max_steps=7,
                         output_dir=tmp_path / "whole", save_steps=1, **OPTIONS)
        resumed = finetune(copy.deepcopy(student), recipe, DOCS, tokenizer=shipped_tokenizer(), max_steps=7,
                           output_dir=tmp_path / "resumed", resume_from_checkpoint=tmp_path / "whole" / f"checkpoint-{resume_at}",
                           **OPTIONS)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert whole.finetune_summary["constant_pruning"] == resumed.finetune_summary["constant_pruning"]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("params,match", [
    ({"start": 1, "end": 1}, "end must be an epoch after start"),
    ({"start": 2, "end": 0.5}, "end must be an epoch after start"),
    ({"end": "later"}, "end must be"),
    ({"start": -3}, "start must be an epoch"),
    ({"stop": 1}, "unknown parameter"),
])
def test_bad_windows(params, match):
    from slope.recovery.finetune import plan_recipe

    with pytest.raises(RecipeError, match=match):
        plan_recipe({"s": {"g": {"ConstantPruningModifier": params}}})


class _Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 16  # 4 micro-batches of 4 per epoch

    def __getitem__(self, i):
        ids = torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _trainer_held_steps(tmp_path, params: dict, inject_at: int | None = None) -> list[bool]:
    """A 6-step RecoveryTrainer run (4 steps per epoch) with ``ConstantPruningModifier`` ``params``;
    for each optimizer step, whether the tracked entries of layer 0's linears are still all zero
    after it. The tracked entries are the one-shot zeros, or (``inject_at``) a set zeroed after that
    step by a callback that runs before the recipe's (as a pruner running alongside would)."""
    from transformers import TrainerCallback

    from slope.recovery import RecoveryTrainer

    student = _pair()
    linears = {n: m for n, m in student.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)}
    tracked = {n: (m.weight == 0) if inject_at is None else
               torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(7)) < 0.2 for n, m in linears.items()}
    held: list[bool] = []

    class Track(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == inject_at:
                with torch.no_grad():
                    for n, m in linears.items():
                        m.weight[tracked[n]] = 0

        def on_step_end(self, args, state, control, **kwargs):
            held.append(all(bool((m.weight[tracked[n]] == 0).all()) for n, m in linears.items()))

    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                               report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    RecoveryTrainer(model=student, args=args, train_dataset=_Windows(), recipe=_recipe(**params), callbacks=[Track()]).train()
    return held


def test_recovery_trainer_holds_an_end_window(tmp_path):
    """end 0.9 epoch of 4 steps: held on steps 0..3 (4 / 4 >= 0.9 releases after step 3), dense after."""
    assert epoch_to_step(0.9, 4) == 4
    assert _trainer_held_steps(tmp_path, {"start": 0, "end": 0.9}) == [True] * 4 + [False] * 2
    assert _trainer_held_steps(tmp_path, {"start": 0, "end": 0.5}) == [True] * 2 + [False] * 4


def test_recovery_trainer_holds_from_a_later_start(tmp_path):
    """start 0.4 epoch of 4 steps = step 2: the zeros present after step 1 are held from then on; the
    one-shot zeros train dense before."""
    assert epoch_to_step(0.4, 4) == 2
    assert _trainer_held_steps(tmp_path, {"start": 0.4}, inject_at=1) == [False] + [True] * 5
    with pytest.warns(UserWarning, match="hold no exact zeros"):  # one step too late: nothing to hold at the start
        assert _trainer_held_steps(tmp_path, {"start": 0.4}, inject_at=2)[2:] == [True] + [False] * 3
    with pytest.warns(UserWarning, match="hold no exact zeros"):  # the one-shot zeros trained dense before the start
        assert _trainer_held_steps(tmp_path, {"start": 0.4})[0] is False


def test_recovery_trainer_resumes_inside_a_window(tmp_path):
    """start 0.4 epoch (step 2), zeros appearing after step 1, saved at step 4 while holding and
    resumed by a fresh trainer (writing into another folder): the same weights as the run that went straight through. (Without the
    window's state the resumed run would be "before" its start forever and hold nothing.)"""
    from transformers import TrainerCallback

    from slope.recovery import RecoveryTrainer

    class ZerosAfterStep1(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    for n, m in model.named_modules():
                        if n.startswith("model.layers.0.") and isinstance(m, nn.Linear):
                            m.weight[torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(7)) < 0.2] = 0

    def trainer(out=tmp_path):
        args = T.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                                   report_to=[], save_strategy="steps", save_steps=4, use_cpu=True, dataloader_num_workers=0,
                                   seed=0)
        return RecoveryTrainer(model=_pair(), args=args, train_dataset=_Windows(), recipe=_recipe(start=0.4),
                               callbacks=[ZerosAfterStep1()])

    straight = trainer()
    straight.train()
    assert (tmp_path / "checkpoint-4" / "slope_held_zeros.pt").is_file()
    resumed = trainer(tmp_path / "elsewhere")  # resumed into another output_dir: the state comes from the folder resumed
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert _close(_layer0(resumed.model), _layer0(straight.model)) < 1e-6
