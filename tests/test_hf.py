"""Hugging Face ``Trainer`` integration: ``SparseOptimizerCallback`` on tiny models built from configs."""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import slope.hf  # noqa: E402
from slope import SparseOptimizerCallback, grad_dict, prune_model, sparse_modules  # noqa: E402
from slope.optimizers import ADAMWSparse  # noqa: E402

VOCAB, SEQ, N_SEQ = 128, 16, 16

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch="llama", dtype=torch.float32, **prune_kwargs):
    auto = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    model = auto.from_config(CONFIGS[arch]()).to(dtype)
    prune_model(model, compress=True, verbose=False, **prune_kwargs)
    return model


class TokenSet(torch.utils.data.Dataset):
    """``N_SEQ`` random sequences of ``SEQ`` tokens; labels = inputs (memorisable)."""

    def __init__(self, n=N_SEQ):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(model, tmp_path, callbacks, *, steps=4, batch=8, eval_dataset=None, **kwargs):
    kwargs = {"max_grad_norm": float("inf"), "learning_rate": 3e-3, "lr_scheduler_type": "constant",
              "save_strategy": "no", "logging_strategy": "no", **kwargs}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch, report_to=[], use_cpu=True,
        disable_tqdm=True, **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=TokenSet(), eval_dataset=eval_dataset, callbacks=callbacks)


@torch.no_grad()
def dataset_loss(model):
    ids = TokenSet().ids
    return model(input_ids=ids, labels=ids).loss.float().item()


class RecordingADAMWSparse(ADAMWSparse):
    """Records the sparse gradients it steps with (clones)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append({layer.layer_name: layer.values_grad.clone() for layer in self.layers()})
        return super().step(closure)


class Spy(TrainerCallback):
    """Calls ``fn(event, args, state, **kwargs)`` on the events it is given."""

    def __init__(self, fn, events=("on_step_begin",)):
        for event in events:
            setattr(self, event, lambda args, state, control, _e=event, **kw: fn(_e, args, state, **kw))


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_trainer_trains_sparse_model(arch, dtype, tmp_path):
    model = tiny_model(arch, dtype)
    layers = dict(sparse_modules(model))
    assert layers
    before = {name: (layer.values.detach().clone(), layer.mask.clone()) for name, layer in layers.items()}
    dense_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss0 = dataset_loss(model)
    # The SLoPe README's HF path, with our imports.
    sparse_opt = ADAMWSparse(model, grad_dict)
    trainer = make_trainer(model, tmp_path, [SparseOptimizerCallback(sparse_opt, max_grad_norm=1.0)], steps=12,
                           bf16=dtype == torch.bfloat16)
    trainer.train()
    loss1 = dataset_loss(model)
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    for name, layer in layers.items():
        values, mask = before[name]
        assert not torch.equal(layer.values, values), f"{name} was not updated"
        assert torch.equal(layer.mask, mask), f"{name}: mask changed"
        assert not layer.dense_weight()[~mask].any(), f"{name}: a pruned entry became nonzero"
        assert layer.values_grad is None  # zeroed after every step
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, dense_before[n])]
    assert changed, "the Trainer's dense optimizer updated nothing"
    assert all(state["step"].item() == 12 for state in sparse_opt.state.values())


def test_gradient_accumulation_steps_once_per_update(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(slope.hf, "sync_grads", lambda model=None: synced.append(model))
    grads = {}
    for batch, accumulation in [(8, 1), (4, 2)]:
        torch.manual_seed(0)
        model = tiny_model("llama")
        sparse_opt = RecordingADAMWSparse(model)
        trainer = make_trainer(model, tmp_path, [SparseOptimizerCallback(sparse_opt)], steps=2, batch=batch,
                               gradient_accumulation_steps=accumulation)
        trainer.train()
        assert len(sparse_opt.seen) == 2
        assert all(state["step"].item() == 2 for state in sparse_opt.state.values())
        assert synced[-1] is model
        grads[accumulation] = sparse_opt.seen[0]
    assert len(synced) == 4
    # 2 micro-batches of 4 accumulate the same first-step gradient as one batch of 8.
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-4, atol=1e-6)


def test_the_model_is_walked_once_per_optimizer_step(tmp_path, monkeypatch):
    """The callback's events of one step (exposing gradients, lazy adapters, the sparse step, the
    expert masks) share one walk of the model's modules; a model changed between steps is walked
    afresh."""
    import types

    import slope.moe

    walked, masks_looked_up = [], []
    real_walk, real_expert_masks = slope.hf.sparse_modules, slope.moe.expert_masks
    monkeypatch.setattr(slope.hf, "sparse_modules", lambda model: walked.append(1) or real_walk(model))
    monkeypatch.setattr(slope.moe, "expert_masks", lambda model: masks_looked_up.append(1) or real_expert_masks(model))
    torch.manual_seed(0)
    model = tiny_model("llama")
    callback = SparseOptimizerCallback(ADAMWSparse(model), lazy_lora_fraction=0.5, lora_rank=2)
    make_trainer(model, tmp_path, [callback], steps=4, gradient_accumulation_steps=2, batch=4).train()
    assert len(walked) == 1 + 4 and len(masks_looked_up) == 4  # on_train_begin, then one per step
    assert all(layer.lora_rank == 2 for _, layer in sparse_modules(model))
    # the walk is keyed on the step: layers pruned between steps are found at the next one
    model = tiny_model("llama", targets=["*.mlp.*"])
    state = types.SimpleNamespace(global_step=7)
    assert len(callback._model_parts(model, state)[0]) == 3
    prune_model(model, compress=True, targets=["*.self_attn.*"], verbose=False)
    assert len(callback._model_parts(model, state)[0]) == 3  # same step: the same walk
    state.global_step = 8
    assert len(callback._model_parts(model, state)[0]) == 7


def test_joint_clipping(tmp_path):
    model = tiny_model("gpt2")
    sparse_opt = RecordingADAMWSparse(model)
    max_norm = 1e-2
    pre = []

    def record(event, args, state, model=None, **kw):
        sparse = [layer.values_grad.float().norm() for _, layer in sparse_modules(model)]
        # values.grad (an alias of values_grad, for the Trainer's logged norm) is not a dense gradient
        dense = [p.grad.float().norm() for p in model.parameters() if p.grad is not None and p.requires_grad]
        pre.append((torch.stack(sparse).norm(), torch.stack(dense).norm()))

    callback = SparseOptimizerCallback(sparse_opt, max_grad_norm=max_norm)
    post_dense = []
    after = Spy(lambda e, a, s, model=None, **kw: post_dense.append(
        torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]).norm()),
        events=("on_pre_optimizer_step",))
    trainer = make_trainer(model, tmp_path, [Spy(record, events=("on_pre_optimizer_step",)), callback, after], steps=2)
    trainer.train()
    assert len(pre) == len(post_dense) == len(sparse_opt.seen) == 2
    for (sparse0, dense0), dense1, seen in zip(pre, post_dense, sparse_opt.seen):
        total0 = torch.sqrt(sparse0**2 + dense0**2)
        assert total0 > 10 * max_norm  # clipping is active
        sparse1 = torch.stack([g.float().norm() for g in seen.values()]).norm()
        coef = max_norm / (total0 + 1e-6)
        torch.testing.assert_close(sparse1, sparse0 * coef, rtol=1e-4, atol=0)
        torch.testing.assert_close(dense1, dense0 * coef, rtol=1e-4, atol=0)
        torch.testing.assert_close(torch.sqrt(sparse1**2 + dense1**2), torch.tensor(max_norm), rtol=1e-3, atol=0)
    torch.testing.assert_close(callback.grad_norm, total0)


@pytest.mark.parametrize("max_norm", [1e-2, None], ids=["clipping", "no-clipping"])
def test_logged_grad_norm_is_the_joint_norm(tmp_path, max_norm):
    model = tiny_model("llama")
    norms = []

    def record(event, args, state, model=None, **kw):
        sparse = [layer.values_grad.float().norm() for _, layer in sparse_modules(model)]
        dense = [p.grad.float().norm() for p in model.parameters() if p.grad is not None and p.requires_grad]
        norms.append((torch.stack(sparse).norm().item(), torch.stack(dense).norm().item()))

    seen_by_dense_opt = []
    after = Spy(lambda e, a, s, model=None, **kw: seen_by_dense_opt.append(
        [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]),
        events=("on_pre_optimizer_step",))
    callback = SparseOptimizerCallback(ADAMWSparse(model), max_grad_norm=max_norm)
    trainer = make_trainer(model, tmp_path, [Spy(record, events=("on_pre_optimizer_step",)), callback, after], steps=2,
                           logging_strategy="steps", logging_steps=1, gradient_accumulation_steps=2, batch=4)
    trainer.train()
    logged = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    assert len(logged) == len(norms) == 2
    for value, (sparse, dense) in zip(logged, norms):
        assert sparse > 0.1 * dense  # the sparse part matters
        assert value == pytest.approx(math.hypot(sparse, dense), rel=1e-4)
    if max_norm is not None:
        assert logged[-1] == pytest.approx(callback.grad_norm.item(), rel=1e-5)
    assert seen_by_dense_opt == [[], []]  # the aliases are gone before any optimizer steps


def test_no_clipping_without_max_grad_norm(tmp_path):
    model = tiny_model("llama")
    sparse_opt = RecordingADAMWSparse(model)
    pre = []
    spy = Spy(lambda e, a, s, model=None, **kw: pre.append(
        {layer.layer_name: layer.values_grad.clone() for _, layer in sparse_modules(model)}),
        events=("on_pre_optimizer_step",))
    make_trainer(model, tmp_path, [spy, SparseOptimizerCallback(sparse_opt)], steps=1).train()
    for name, g in pre[0].items():
        assert torch.equal(sparse_opt.seen[0][name], g)


def test_lr_and_weight_decay_follow_trainer(tmp_path):
    model = tiny_model("llama")
    sparse_opt = ADAMWSparse(model, lr=123.0, weight_decay=0.5)
    seen = []
    spy = Spy(lambda e, a, s, optimizer=None, **kw: seen.append(
        (optimizer.param_groups[0]["lr"], sparse_opt.lr, sparse_opt.weight_decay)), events=("on_optimizer_step",))
    make_trainer(model, tmp_path, [SparseOptimizerCallback(sparse_opt), spy], steps=4, lr_scheduler_type="linear",
                 weight_decay=0.03).train()
    assert len(seen) == 4 and len({lr for lr, _, _ in seen}) == 4  # a decaying schedule
    for dense_lr, sparse_lr, wd in seen:
        assert sparse_lr == dense_lr and wd == 0.03


# ---------------------------------------------------------------------------------------------------- lazy LoRA
def test_lazy_lora_attaches_at_the_right_step_and_trains(tmp_path):
    model = tiny_model("llama")
    sparse_opt = ADAMWSparse(model)
    steps, fraction, rank = 8, 0.25, 8
    log = []
    attached = {}

    def record(event, args, state, model=None, optimizer=None, **kw):
        layers = [layer for _, layer in sparse_modules(model)]
        has = [bool(layer.lora_rank) for layer in layers]
        assert len(set(has)) == 1
        log.append((event, state.global_step, has[0]))
        if has[0] and not attached:
            attached.update({layer.layer_name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                             for layer in layers})
        if event == "on_optimizer_step":
            groups = optimizer.param_groups
            assert all(g["lr"] == groups[0]["lr"] for g in groups)

    callback = SparseOptimizerCallback(sparse_opt, lazy_lora_fraction=fraction, lora_rank=rank)
    trainer = make_trainer(model, tmp_path, [callback, Spy(record, events=("on_step_begin", "on_optimizer_step"))],
                           steps=steps, lr_scheduler_type="linear")
    trainer.train()
    first = math.ceil((1 - fraction) * steps)
    assert callback.lora_step == first == 6
    begins = [(step, has) for event, step, has in log if event == "on_step_begin"]
    assert begins == [(s, s >= first) for s in range(steps)]
    groups = trainer.optimizer.param_groups
    assert len(groups) == 3
    lora_params = {id(p) for _, layer in sparse_modules(model) for p in (layer.lora_A, layer.lora_B)}
    assert {id(p) for p in groups[2]["params"]} == lora_params
    assert groups[2]["weight_decay"] == groups[0]["weight_decay"]
    scheduler = trainer.lr_scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == 3
    for name, layer in sparse_modules(model):
        a0, b0 = attached[name]
        assert not b0.any()  # B starts at zero: attaching leaves the function unchanged
        assert layer.lora_B.abs().sum() > 0 and not torch.equal(layer.lora_A, a0), f"{name}: adapters not trained"
        assert not (layer.lora_A * ~layer.lora_A_mask).any()


def test_lazy_lora_fraction_below_one_step_warns(tmp_path):
    model = tiny_model("llama")
    callback = SparseOptimizerCallback(ADAMWSparse(model), lazy_lora_fraction=0.1, lora_rank=4)
    with pytest.warns(UserWarning, match="less than one step"):
        make_trainer(model, tmp_path, [callback], steps=2).train()
    assert not any(layer.lora_rank for _, layer in sparse_modules(model))


def test_resuming_after_lazy_adapters_is_a_clear_error_and_the_new_run_path_works(tmp_path):
    """A checkpoint saved after the adapters were attached cannot be resumed by the Trainer (its
    optimizer is rebuilt without their param group): one line saying what to do, before the
    Trainer drops the adapters as unexpected keys; the advised new run from that checkpoint trains."""

    def run(model, out, steps, resume=None):
        callback = SparseOptimizerCallback(ADAMWSparse(model), lazy_lora_fraction=0.5, lora_rank=4)
        make_trainer(model, out, [callback], steps=steps, save_strategy="steps", save_steps=2).train(resume_from_checkpoint=resume)

    run(tiny_model("llama"), tmp_path / "a", 2)  # adapters attached before step 1; checkpoint-2 holds them
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with pytest.raises(ValueError, match=r"holds lazy LoRA adapters .* resume from a checkpoint saved before they were "
                                         r"attached, or continue as a new run from model = slope.from_pretrained"):
        run(tiny_model("llama"), tmp_path / "b", 4, resume=str(checkpoint))
    model = slope.from_pretrained(checkpoint).train()
    assert all(layer.lora_rank == 4 for _, layer in sparse_modules(model))
    before = {name: layer.lora_B.detach().clone() for name, layer in sparse_modules(model)}
    run(model, tmp_path / "c", 2)
    assert any(not torch.equal(layer.lora_B, before[name]) for name, layer in sparse_modules(model))


def test_load_best_model_at_end_before_the_adapters_gives_that_checkpoints_model(tmp_path):
    """load_best_model_at_end with a best checkpoint saved before the lazy adapters were attached:
    the model after training is that checkpoint's (no adapters), not its weights plus the adapters
    trained afterwards (the Trainer loads it with strict=False and leaves them)."""
    model = tiny_model("llama")
    callback = SparseOptimizerCallback(ADAMWSparse(model), lazy_lora_fraction=0.5, lora_rank=4)
    # eval_loss with greater_is_better: the worst checkpoint (the first, before the adapters) is the "best"
    trainer = make_trainer(model, tmp_path, [callback], steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                           save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                           greater_is_better=True, eval_dataset=TokenSet())
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert not any(layer.lora_rank for _, layer in sparse_modules(model))
    best = slope.from_pretrained(trainer.state.best_model_checkpoint)
    ids = TokenSet().ids
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, best(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- misuse
def test_trainer_max_grad_norm_warns(tmp_path):
    model = tiny_model("llama")
    trainer = make_trainer(model, tmp_path, [SparseOptimizerCallback(ADAMWSparse(model))], steps=1, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="clips only the dense gradients"):
        trainer.train()


def test_trainer_and_callback_clipping_is_an_error(tmp_path):
    model = tiny_model("llama")
    callback = SparseOptimizerCallback(ADAMWSparse(model), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="clipped twice"):
        make_trainer(model, tmp_path, [callback], steps=1, max_grad_norm=1.0).train()


def test_model_without_slope_layers_is_an_error(tmp_path):
    pruned = tiny_model("llama")
    dense = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="no SLoPe layers"):
        make_trainer(dense, tmp_path, [SparseOptimizerCallback(ADAMWSparse(pruned))], steps=1).train()
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="not in the sparse optimizer"):
        make_trainer(other, tmp_path, [SparseOptimizerCallback(ADAMWSparse(pruned))], steps=1).train()


def test_bad_arguments():
    model = tiny_model("llama")
    opt = ADAMWSparse(model)
    with pytest.raises(TypeError, match="sparse optimizer"):
        SparseOptimizerCallback(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="max_grad_norm"):
        SparseOptimizerCallback(opt, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="lazy_lora_fraction must be in"):
        SparseOptimizerCallback(opt, lazy_lora_fraction=1.0, lora_rank=4)
    with pytest.raises(ValueError, match="positive int lora_rank"):
        SparseOptimizerCallback(opt, lazy_lora_fraction=0.1)
    with pytest.raises(ValueError, match="need lazy_lora_fraction"):
        SparseOptimizerCallback(opt, lora_rank=4)


def test_adapter_grads_are_averaged_across_ranks(monkeypatch):
    """Adapters attached mid-run are not in a DDP wrapper: the callback averages their gradients."""

    class FakeDist:  # two ranks; the other rank's flat gradient is all ones
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda group=None: 2)
        all_reduce = staticmethod(lambda flat, group=None: flat.add_(1.0))

    monkeypatch.setattr(slope.hf, "dist", FakeDist)
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.arange(6.0).view(2, 3)  # b has no gradient on this rank: it counts as zeros
    slope.hf._average_grads([a, b])
    torch.testing.assert_close(a.grad, (torch.arange(6.0).view(2, 3) + 1) / 2)
    torch.testing.assert_close(b.grad, torch.full((4,), 0.5))


@pytest.mark.parametrize("into", ["b", "c"], ids=["same-output-dir", "other-output-dir"])
def test_checkpoint_resume_restores_the_sparse_optimizer(tmp_path, into):
    """Resumed from b/checkpoint-2, also by a Trainer whose output_dir is another folder (c): the
    sparse optimizer's state comes from the folder the Trainer resumed from."""

    def run(steps, out, resume=False, save=False):
        torch.manual_seed(0)
        model = tiny_model("llama")
        sparse_opt = ADAMWSparse(model)
        extra = {"save_strategy": "steps", "save_steps": 2} if save else {}
        trainer = make_trainer(model, out, [SparseOptimizerCallback(sparse_opt)], steps=steps, **extra)
        trainer.train(resume_from_checkpoint=resume or None)
        return model, sparse_opt

    straight, _ = run(4, tmp_path / "a")
    run(4, tmp_path / "b", save=True)
    assert (tmp_path / "b" / "checkpoint-2" / slope.hf.SPARSE_OPTIMIZER_NAME).is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, opt = run(4, tmp_path / into, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert not [w for w in caught if "fresh moments" in str(w.message)]
    assert all(state["step"].item() == 4 for state in opt.state.values())
    for (name, a), (_, b) in zip(sparse_modules(straight), sparse_modules(resumed)):
        torch.testing.assert_close(b.values, a.values, rtol=0, atol=0, msg=name)


def test_a_truncated_sparse_optimizer_file_is_an_error_naming_it(tmp_path):
    """torch.load's own error ('PytorchStreamReader failed reading zip archive') names no file, and a
    Trainer checkpoint holds several .pt files."""
    model = tiny_model("llama")
    make_trainer(model, tmp_path / "a", [SparseOptimizerCallback(ADAMWSparse(model))], steps=2, save_strategy="steps",
                 save_steps=2).train()
    path = tmp_path / "a" / "checkpoint-2" / slope.hf.SPARSE_OPTIMIZER_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model = tiny_model("llama")
    trainer = make_trainer(model, tmp_path / "b", [SparseOptimizerCallback(ADAMWSparse(model))], steps=4)
    with pytest.raises(ValueError, match=rf"{path} is corrupt or truncated .*resume from another checkpoint"):
        trainer.train(resume_from_checkpoint=str(path.parent))


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_trainer_callbacks_refuse_fsdp_and_deepspeed(engine, monkeypatch):
    """Masks and SLoPe values live on the model's own parameters; FSDP / DeepSpeed replace them,
    so every slope callback refuses those engines at train begin (one line) instead of holding nothing."""
    from types import SimpleNamespace

    from slope.dynamic import DynamicSparsity, DynamicSparsityCallback
    from slope.peft.trainer import _SelectorCallback
    from slope.recovery.trainer import _HoldWindow, _HoldZeros

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    args = SimpleNamespace(fsdp="full_shard" if engine == "fsdp" else "", deepspeed="ds.json" if engine == "deepspeed" else None)
    if engine.startswith("ACCELERATE"):
        monkeypatch.setenv(engine, "true")
    shown = "FSDP" if "fsdp" in engine.lower() else "DeepSpeed"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    callbacks = {"SparseOptimizerCallback": SparseOptimizerCallback(ADAMWSparse(prune_model(torch.nn.Sequential(torch.nn.Linear(8, 8))))),
                 "DynamicSparsityCallback": DynamicSparsityCallback(DynamicSparsity(model, 4, targets=["0"])),
                 "RecoveryTrainer": _HoldZeros(None, None), "SftTrainer": _SelectorCallback(None)}
    state = SimpleNamespace(max_steps=4, global_step=0)
    for what, callback in [*callbacks.items(), ("RecoveryTrainer", _HoldWindow(model, None))]:
        remedy = "slope.peft.shard_sft_model" if what == "SftTrainer" else "slope finetune --fsdp"  # what shards each instead
        with pytest.raises(ValueError, match=f"{what} does not run under the Trainer's {shown}.*{remedy}"):
            callback.on_train_begin(args, state, None, model=model, train_dataloader=[])
