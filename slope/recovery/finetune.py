"""``slope.finetune``: fine-tune a (pruned) causal LM with a recipe — seed 002, steps 1 and 3.

::

    finetune("llama-2of4", "recipe.yaml", "embedded", distill_teacher="llama-dense", output_dir="recovered",
             num_train_epochs=2, learning_rate=5e-5, lr_scheduler_type="linear", warmup_steps=20,
             per_device_train_batch_size=32, max_seq_length=1024, bf16=True, max_grad_norm=None)

Without a recipe it is plain (dense) fine-tuning (the seed's step 1). With a
``ConstantPruningModifier`` the zeros of its targets stay zero from its ``start`` to its ``end``
(:class:`slope.recovery.schedule.HeldZeros` over :class:`slope.recovery.ConstantMasks`:
2:4 layers train on SLoPe layers with an exact backward, or compressed and double-pruned with
``double_pruning=True``; others under masks); with an ``OutputDistillationModifier`` the loss adds
the comparison with ``distill_teacher`` (:class:`slope.recovery.Distiller`). The optimizer-step loop
is :class:`slope.finetune_loop.FinetuneLoop` (shared with ``sparse_finetune``); the data is that of
:mod:`slope.dynamic.data` (windows of ``max_seq_length`` tokens; every 20th chunk is validation).

``output_dir`` (new or empty, unless ``resume_from_checkpoint`` continues the run there: checked
before anything loads) receives the model as a plain Hugging Face folder (pruned entries are exact zeros),
its tokenizer, ``recipe.yaml`` (defaults filled in), ``metrics.jsonl``, ``summary.json``,
``loss.png`` and, every ``save_steps``, ``checkpoint-<step>/`` (weights, masks, both optimizers, loss
scaler, RNG states, records; only the newest ``save_total_limit`` are kept): ``resume_from_checkpoint``
continues exactly as if never stopped. SIGINT / SIGTERM end the run after the current step with a
``checkpoint-<step>/`` (without ``output_dir``: nothing saved), and ``finetune`` returns normally, the
summary saying ``stopped_by`` (a second signal raises ``KeyboardInterrupt`` at once).
Under ``torchrun`` it trains data-parallel (``per_device_train_batch_size`` per rank): with DDP,
or with ``fsdp=True`` (``--fsdp``; also under ``accelerate launch`` with an FSDP config, as in the
seed) sharded by FSDP2 (:func:`slope.parallel.wrap_fsdp2`: dense weights, gradients and AdamW state
sharded; 2:4 SLoPe layers' kept values replicated). Every launch gives the run of one process
(same losses and weights to float rounding), and its checkpoints resume on any number of ranks.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.finetune_checkpoints import CHECKPOINT_STATE, LoopCheckpoints
from slope.finetune_loop import LR_SCHEDULES, FinetuneLoop, LoopSettings, cross_entropy_loss, enable_activation_checkpointing
from slope.finetune_run import (build_optimizers, check_int, check_output_dir, check_positions, check_positive, check_save_total_limit,
                                dataset_name, ddp_forward_model, fsdp_settings, launcher_mixed_precision, output_folder, plain_config,
                                precision_mode, run_resumable, save_model_folder, seed_everything)
from slope.pruning.loading import LOAD_PRECISIONS
from slope.pruning.recipe import parse_recipe, recipe_yaml
from slope.recovery.constant import _warn_uncovered
from slope.recovery.distill import DistillationError, Distiller
from slope.recovery.modifiers import ConstantPruningModifier, OutputDistillationModifier
from slope.recovery.schedule import HeldZeros, epoch_to_step

__all__ = ["TRAINING_DEFAULTS", "finetune", "CHECKPOINT_STATE"]

#: ``**training_args`` of :func:`finetune` and their defaults (``transformers.TrainingArguments`` names).
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3.0, "max_steps": None, "learning_rate": 5e-5, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_seq_length": 512, "bf16": False,
    "fp16": False, "gradient_checkpointing": False, "max_grad_norm": 1.0, "weight_decay": 0.0, "adam_beta1": 0.9,
    "adam_beta2": 0.999, "adam_epsilon": 1e-8, "seed": 42,
    "logging_steps": 10, "eval_steps": None, "eval_batches": 8, "save_steps": None, "save_total_limit": None,
    "resume_from_checkpoint": None,
    "tokenizer": None, "text_field": "text", "device": "auto", "precision": "auto", "double_pruning": False,
    "backend": "auto", "progress": None, "fsdp": False,
}

#: File in each ``checkpoint-<step>`` folder holding the run's state.
#: Settings a resumed run must share with the checkpoint's run.
_RESUME_KEYS = ("total_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "global_batch",
                "gradient_accumulation_steps", "max_seq_length", "seed", "recipe", "double_pruning", "precision_mode",
                "max_grad_norm", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


# ---------------------------------------------------------------------- settings
def _check_backend(backend, double_pruning: bool) -> None:
    """A ``ValueError`` for an unknown backend name; a warning for one that ``double_pruning=False`` leaves unused."""
    from slope.backends import BACKEND_NAMES

    if backend not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(('auto', *BACKEND_NAMES))}")
    if backend != "auto" and not double_pruning:
        warnings.warn(f"backend={backend!r} is not used: it runs the compressed 2:4 layers of double_pruning=True "
                      "(--double-pruning); without it 2:4 layers train with an exact backward", UserWarning, stacklevel=4)


def checked_training_args(training_args: dict[str, Any], caller: str = "finetune") -> dict[str, Any]:
    """``training_args`` with :data:`TRAINING_DEFAULTS` filled in, each checked (one-line errors), plus
    ``precision_mode`` (``"fp32"`` / ``"bf16"`` / ``"fp16"``) and ``precision`` as a dtype name."""
    unknown = sorted(set(training_args) - set(TRAINING_DEFAULTS))
    if unknown:
        from difflib import get_close_matches

        close = get_close_matches(unknown[0], TRAINING_DEFAULTS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TypeError(f"{caller} got unknown training arguments {unknown}; {hint}accepted: {sorted(TRAINING_DEFAULTS)}")
    args = {**TRAINING_DEFAULTS, **training_args}
    for name, minimum in (("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 1), ("warmup_steps", 0),
                          ("max_seq_length", 2), ("logging_steps", 1), ("eval_batches", 1)):
        check_int(name, args[name], minimum)
    for name in ("max_steps", "eval_steps", "save_steps"):
        if args[name] is not None:
            check_int(name, args[name])
    check_save_total_limit(args["save_total_limit"])
    for name in ("learning_rate", "num_train_epochs", "adam_epsilon"):
        check_positive(name, args[name])
    if args["lr_scheduler_type"] not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULES)}, got {args['lr_scheduler_type']!r}")
    norm = args["max_grad_norm"]
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or norm < 0):
        raise ValueError(f"max_grad_norm must be a non-negative number or None (no clipping), got {norm!r}")
    _check_backend(args["backend"], args["double_pruning"])
    args["fp16"], args["bf16"] = launcher_mixed_precision(args["fp16"], args["bf16"])
    mode = precision_mode(args["fp16"], args["bf16"])
    if not isinstance(args["fsdp"], bool):
        raise ValueError(f"fsdp must be True or False, got {args['fsdp']!r}")
    if args["precision"] not in LOAD_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(LOAD_PRECISIONS)}, got {args['precision']!r}")
    args["precision"] = LOAD_PRECISIONS[args["precision"]]
    args["precision_mode"] = mode
    return args


def plan_recipe(recipe, stage: str | None = None) -> tuple[ConstantPruningModifier | None, OutputDistillationModifier | None, list]:
    """``(constant, distillation, entries)`` of a finetune recipe's train stage (or of ``stage``;
    ``None``: no recipe)."""
    if recipe is None:
        if stage is not None:
            raise ValueError(f"stage {stage!r} is given but no recipe; pass the recipe that holds it")
        return None, None, []
    entries = parse_recipe(recipe, kind="finetune", stage=stage)
    found: dict[type, Any] = {}
    for entry in entries:
        if type(entry.modifier) in found:
            from slope.pruning.modifiers import RecipeError

            raise RecipeError(f"{entry.where}: the recipe holds two {entry.modifier.name}s; give one (list all targets in it)")
        found[type(entry.modifier)] = entry.modifier
    return found.get(ConstantPruningModifier), found.get(OutputDistillationModifier), entries


# ---------------------------------------------------------------------- models
def _load(source, device: torch.device, precision: str, what: str):
    """``(model, tokenizer or None)`` from a model or a folder (see :func:`slope.pruning.loading.load_model`)."""
    if isinstance(source, nn.Module):
        return source.to(device), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a model or a model folder, got {type(source).__name__}")
    from slope.pruning.loading import load_model

    return load_model(source, device, precision, flag="--distill-teacher" if what == "distill_teacher" else "--model")


def _check_tokenizers(student_tok, teacher_tok) -> None:
    if student_tok is None or teacher_tok is None or not hasattr(teacher_tok, "get_vocab"):
        return
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise DistillationError("the teacher's tokenizer differs from the student's (other tokens or ids); distil from a "
                                "teacher trained with the student's tokenizer (the dense model it was pruned from)")


def _optimizers(model: nn.Module, args: dict[str, Any]):
    """AdamW over the trainable parameters and ADAMWSparse over the SLoPe layers (when there are any)."""
    from slope.registry import sparse_modules

    return build_optimizers(model, args["learning_rate"], args["weight_decay"], sparse=any(True for _ in sparse_modules(model)),
                            betas=(args["adam_beta1"], args["adam_beta2"]), eps=args["adam_epsilon"])


def _loss_fn(distiller: Distiller | None):
    """The loop's loss: cross-entropy, plus the distillation term from the distiller's start step on."""
    def loss_fn(model, x, y, step):
        if distiller is None or not distiller.active(step):
            return cross_entropy_loss(model, x, y, step)
        with distiller.student_capture.capture() as student:
            logits = model(input_ids=x, use_cache=False).logits
        task = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        distill = distiller.loss(student, distiller.teacher_outputs(x))
        return distiller.combine(task, distill), {"task_loss": task.item(), "distill_loss": distill.item()}

    return loss_fn


# ---------------------------------------------------------------------- outputs
def _save_outputs(model: nn.Module, tokenizer, out: Path, entries: list, summary: dict, main_process: bool) -> None:
    """The HF folder (plain transformers; zeros where pruned), tokenizer, recipe, summary and plot
    (every rank calls it: a sharded model is gathered; the main process writes)."""
    if entries and main_process:
        (out / "recipe.yaml").write_text(recipe_yaml(entries), encoding="utf-8")
    save_model_folder(model, tokenizer, out, summary, "fine-tuning" + (" (recipe)" if entries else ""), main_process=main_process)


# ---------------------------------------------------------------------- the one call
def _master_weights(model: nn.Module, mode: str) -> None:
    """Keep fp32 master weights under autocast (``mode`` bf16 / fp16), as accelerate's mixed
    precision does: a student loaded in half precision (``precision="bf16"``, the guide's
    ``--precision bfloat16``) is upcast, since AdamW's small updates vanish in bf16 weights. Without
    autocast its weights train in their own dtype, which is said."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)})
    if not low:
        return
    if mode in ("bf16", "fp16"):
        model.float()
        warnings.warn(f"the model's {'/'.join(low)} weights train as fp32 master weights under {mode} autocast (as accelerate's "
                      "mixed precision does); the output folder holds them in fp32", UserWarning, stacklevel=4)
    elif "float16" in low:  # AdamW in fp16 weights without loss scaling ends in inf/nan within steps
        model.float()
        warnings.warn("the model's float16 weights cannot train without loss scaling: they train as fp32 (add --fp16 for fp16 "
                      "autocast with loss scaling, or --bf16); the output folder holds them in fp32", UserWarning, stacklevel=4)
    else:
        warnings.warn(f"the model's weights train in {'/'.join(low)} (loaded so, without --bf16 / --fp16 autocast): updates "
                      "below its resolution are lost; add --bf16 to train fp32 master weights with bf16 compute",
                      UserWarning, stacklevel=4)


def _prepare_student(model, args, device, constant_mod):
    """Load the student for training (fp32 master weights under autocast); ``(model, tokenizer or None)``."""
    model, tokenizer = _load(model, device, args["precision"], "model")
    _master_weights(model, args["precision_mode"])
    model.requires_grad_(True).train()
    if constant_mod is None:
        _warn_uncovered(model, dict(model.named_modules()), set())
    return model, tokenizer


def _prepare_teacher(model, teacher, distill_mod, args, device, steps_per_epoch: float, tokenizer, sample, fsdp):
    """The :class:`Distiller` of ``distill_mod`` (``None`` without one) with the teacher loaded in
    ``precision``; under FSDP (``fsdp``: its settings) the teacher is sharded like the student, its
    weights gathered one block at a time for its forward."""
    if distill_mod is None:
        if teacher is not None:
            raise ValueError("distill_teacher is given but the recipe has no OutputDistillationModifier; add one (e.g. "
                             "comparison: square_head) or drop the teacher")
        return None
    if teacher is None:
        raise ValueError("the recipe's OutputDistillationModifier needs distill_teacher (the dense model, e.g. the one "
                         "that was pruned)")
    teacher, teacher_tokenizer = _load(teacher, device, args["precision"], "distill_teacher")
    _check_tokenizers(tokenizer, teacher_tokenizer)
    distiller = Distiller(model, teacher, distill_mod, start_step=epoch_to_step(distill_mod.start, steps_per_epoch),
                          stop_early=fsdp is None)
    if fsdp is not None:
        from slope import parallel

        parallel.wrap_fsdp2(teacher, reshard_after_forward=True, require_sparse=False, sync_sparse=False)
    distiller.check(sample)
    return distiller


@dataclass
class _Recovery:
    """Everything one :func:`finetune` run holds."""

    model: nn.Module
    tokenizer: Any
    held: HeldZeros | None
    distiller: Distiller | None
    loop: FinetuneLoop
    checkpoints: LoopCheckpoints
    out: Path | None


def _wrap(model, held, env, fsdp):
    """``forward_model``: the student sharded in place by FSDP2 (``fsdp``; held masks follow its
    new parameters), wrapped in DDP under ``torchrun``, or itself."""
    from slope import parallel

    if fsdp is not None:
        parallel.wrap_fsdp2(model, reshard_after_forward=fsdp["reshard_after_forward"], require_sparse=False)
        if held is not None:
            held.rebind()
        return model
    return ddp_forward_model(model, env)


def _build(model, dataset, teacher, output_dir, args, env, constant_mod, distill_mod, entries, fsdp) -> _Recovery:
    """Load and prepare the models, data, optimizers and loop of a run (module docstring)."""
    from slope.dynamic.data import load_finetune_data, resolve_tokenizer
    from slope.train import LossScaler

    model, own_tokenizer = _prepare_student(model, args, env.device, constant_mod)
    check_positions(model, args["max_seq_length"])
    tokenizer = resolve_tokenizer(args["tokenizer"] if args["tokenizer"] is not None else own_tokenizer, model_source=None)
    global_batch = args["per_device_train_batch_size"] * env.world_size
    data = load_finetune_data(dataset, tokenizer, seq_len=args["max_seq_length"], batch_size=global_batch, seed=args["seed"],
                              eval_batches=args["eval_batches"], vocab_size=model.get_input_embeddings().num_embeddings,
                              text_field=args["text_field"])
    accum = args["gradient_accumulation_steps"]
    steps_per_epoch = data.micro_batches_per_epoch / accum
    total = args["max_steps"] or max(1, math.ceil(args["num_train_epochs"] * steps_per_epoch))
    held = None if constant_mod is None else HeldZeros(model, constant_mod, steps_per_epoch, total,
                                                       double_pruning=args["double_pruning"], backend=args["backend"])
    distiller = _prepare_teacher(model, teacher, distill_mod, args, env.device, steps_per_epoch, tokenizer,
                                 data.val[0][0][:1, :32].to(env.device), fsdp)
    if distiller is not None and distiller.start_step >= total:
        warnings.warn(f"OutputDistillationModifier start {distill_mod.start:g} (epochs) is step {distiller.start_step}, at or after "
                      f"the run's {total} steps: it never distils; lower start (or train longer)", UserWarning, stacklevel=3)
    if args["gradient_checkpointing"] or (fsdp or {}).get("activation_checkpointing"):
        enable_activation_checkpointing(model)
    forward_model = _wrap(model, held, env, fsdp)
    dense_opt, sparse_opt = _optimizers(model, args)  # after sharding: over the sharded parameters
    settings = LoopSettings(args["learning_rate"], args["warmup_steps"], args["lr_scheduler_type"], accum, args["precision_mode"],
                            args["max_grad_norm"], args["logging_steps"], args["eval_steps"], args["progress"], "finetune")
    def after_step(step, skipped):  # noqa: ARG001
        if held is not None:
            held.after_step(step, dense_opt, sparse_opt)
        return []

    loop = FinetuneLoop(model, data, dense_opt, sparse_opt, LossScaler(args["fp16"]), env.device, total, settings,
                        loss_fn=_loss_fn(distiller), after_step=after_step,
                        status=lambda: {} if held is None else {"held_zero_fraction": held.zero_fraction}, forward_model=forward_model,
                        before_update=None if held is None else held.before_update)
    out = output_folder(output_dir, env.is_main)
    fingerprint = {"total_steps": total, "global_batch": global_batch, "recipe": recipe_yaml(entries) if entries else None,
                   **{k: args[k] for k in _RESUME_KEYS if k in args}}
    checkpoints = LoopCheckpoints(out, loop, {"constant": held}, fingerprint, _RESUME_KEYS, env.is_main,
                                  save_total_limit=args["save_total_limit"])
    return _Recovery(model, tokenizer, held, distiller, loop, checkpoints, out)


def _train(run: _Recovery, args: dict[str, Any], entries: list, env, dataset) -> dict[str, Any]:
    """Resume if asked, train, and write the outputs (none for a run stopped by a signal: its checkpoint
    continues it); returns the summary."""
    summary = run_resumable(run.loop, run.checkpoints, run.out, args["resume_from_checkpoint"], args["save_steps"],
                            main_process=env.is_main)
    if summary.get("already_finished") or summary["stopped_by"]:
        return summary
    from slope.parallel import is_fsdp2
    from slope.parallel.sharded import local_bytes

    sharded = is_fsdp2(run.model)  # also under an FSDP accelerate launch without --fsdp
    summary["config"] = {**plain_config(args), **run.checkpoints.fingerprint, "dataset": dataset_name(dataset),
                         "world_size": env.world_size, "fsdp": sharded,
                         "data_parallel": "fsdp" if sharded else "ddp" if env.distributed else None}
    if run.held is not None:
        summary["constant_pruning"] = run.held.summary()
        masked = run.held.constant.masked if run.held.constant is not None else None
        summary["memory_per_rank"]["masks"] = 0 if masked is None else local_bytes(masked.masks.values())
    if run.distiller is not None:
        summary["memory_per_rank"]["teacher"] = local_bytes([*run.distiller.teacher.parameters(), *run.distiller.teacher.buffers()])
        summary["distillation"] = {"targets": run.distiller.names, "comparison": run.distiller.modifier.comparison,
                                   "teacher_output_bytes_per_micro_batch": run.distiller.teacher_bytes}
    if run.out is not None:
        _save_outputs(run.model, run.tokenizer, run.out, entries, summary, env.is_main)
    return summary


def finetune(model, recipe=None, dataset="embedded", distill_teacher=None, output_dir=None, *, stage: str | None = None,
             **training_args) -> nn.Module:
    """Fine-tune ``model`` with ``recipe`` on ``dataset``; returns the fine-tuned model (module docstring).

    Args:
        model: a causal LM, a Hugging Face folder, a slope ``save_pretrained`` folder or a ``slope
            train`` checkpoint (:func:`slope.pruning.loading.load_model`).
        recipe: ``None`` (plain fine-tuning) or a finetune recipe (YAML path, YAML text or dict) with a
            ``ConstantPruningModifier`` and/or an ``OutputDistillationModifier``; of a multi-stage
            recipe, its one ``train`` stage runs (``oneshot`` stages are for :func:`slope.oneshot`).
        stage: the stage of a multi-stage recipe to run, by name.
        dataset: ``"embedded"``, a ``.txt`` / ``.jsonl`` file, a list of strings, or an HF dataset name.
        distill_teacher: the teacher (model or folder) an ``OutputDistillationModifier`` needs.
        output_dir: where the model and metrics go: a new or empty folder, or that of the run
            ``resume_from_checkpoint`` continues (module docstring).
        training_args: :data:`TRAINING_DEFAULTS` (``transformers.TrainingArguments`` names, plus
            ``max_seq_length``, ``eval_batches``, ``tokenizer``, ``text_field``, ``device``, ``precision``
            (dtype to load folders in), ``double_pruning`` (2:4 layers compressed with SLoPe's
            backward), ``backend``, ``progress``, ``fsdp`` (shard with FSDP2 under ``torchrun``)).
            ``max_grad_norm=None`` or 0: no clipping. ``save_total_limit``: keep only the newest N
            ``checkpoint-<step>/`` folders (``None``: all).

    The returned model keeps its training form (2:4 layers as :class:`slope.SparseLinear`; under
    FSDP still sharded: :func:`slope.parallel.full_model_state_dict` gathers it, which needs the
    process group — one this call started itself ends with it, so create the group first, e.g.
    ``torch.distributed.init_process_group()``, to go on using the sharded model; else load
    ``output_dir``) and holds the run's
    summary in ``finetune_summary``. A run stopped by SIGINT / SIGTERM returns the model as it stands after
    step ``finetune_summary["stopped_at"]``, with ``stopped_by`` the signal's name (``None`` for a run that
    trained all its steps) and ``stop_checkpoint`` the ``checkpoint-<step>/`` it wrote (``None`` without
    ``output_dir``); ``output_dir`` then holds that checkpoint and ``metrics.jsonl`` only, and a call with
    ``resume_from_checkpoint`` continues the run exactly.
    """
    from slope import parallel
    from slope.evaluate import resolve_device
    from slope.interrupt import GracefulStop

    args = checked_training_args(training_args)
    constant_mod, distill_mod, entries = plan_recipe(recipe, stage)
    if args["double_pruning"] and constant_mod is None:
        warnings.warn("double_pruning applies to the 2:4 layers a ConstantPruningModifier holds; the recipe has none, so it "
                      "is not used (add one, or drop --double-pruning)", UserWarning, stacklevel=2)
    check_output_dir(output_dir, args["resume_from_checkpoint"], args["save_steps"], save_total_limit=args["save_total_limit"])
    env = parallel.init_distributed(device=resolve_device(args["device"]))
    seed_everything(args["seed"])
    run = None
    try:
        fsdp = fsdp_settings(args["fsdp"], args["fp16"], env)
        if (fsdp or {}).get("activation_checkpointing"):  # (the accelerate config's): recorded as such
            args = {**args, "gradient_checkpointing": True}
        with GracefulStop():  # from here SIGINT / SIGTERM stop after a step; one after the last step lets the outputs be written
            run = _build(model, dataset, distill_teacher, output_dir, args, env, constant_mod, distill_mod, entries, fsdp)
            summary = _train(run, args, entries, env, dataset)
    finally:
        parallel.destroy_distributed(env)
        if run is not None and run.distiller is not None:
            run.distiller.remove()
        if run is not None and run.held is not None:
            run.held.remove_hooks()
    run.model.finetune_summary = {k: v for k, v in summary.items() if k != "records"}
    return run.model.eval()
