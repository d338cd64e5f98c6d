"""``sparse_finetune``: seed 000's one call — dynamic sparse fine-tuning of a causal LM.

Per optimizer step ``s`` (0-based, ``total_steps`` in all)::

    lr = linear warmup over warmup_steps, then linear decay to 0
    gradient_accumulation_steps × { micro-batch(seed, s, micro) → forward (autocast) → backward }
    unscale (fp16; overflow → step skipped) → clip the joint norm → sparse_opt.step(); opt.step()
    sparsifier.step(...)          keeps pruned entries zero; RigL / gradual pruning when due

On RigL update steps the backward also keeps the dense weight gradients (see
:class:`slope.dynamic.DynamicSparsity`). ``output_dir`` receives the fine-tuned model as a plain
Hugging Face folder (a new or empty one, unless ``resume_from_checkpoint`` continues the run there;
pruned entries are exact zeros; N:M models are exported with
:func:`slope.export_dense`), its tokenizer, ``metrics.jsonl``, ``summary.json``, ``loss.png`` and
``dynamic_sparsity.pt`` (masks and mask-update history); with ``save_steps``, ``checkpoint-<step>/``
folders that ``resume_from_checkpoint`` continues from exactly (:mod:`slope.finetune_checkpoints`; the
newest ``save_total_limit`` kept). SIGINT / SIGTERM end the run after the current step with a
``checkpoint-<step>/`` (no other output) and the call returns, ``finetune_summary["stopped_by"]`` naming the signal.
Under ``torchrun`` it trains with DDP, ``batch_size`` rows per process (RigL averages the ranks'
dense gradients, so the masks stay equal on every rank); rank 0 writes the outputs. With
``fsdp=True`` (or under ``accelerate launch`` with an FSDP config) FSDP2 shards the model instead.
Masked ``nn.Linear`` weights (unstructured, gradual N:M): each mask is split like its weight, the
gradients FSDP2 averages are RigL's dense gradients, and every mask update ranks each layer's
whole weight, gathered one layer at a time. SLoPe layers (N:M RigL): each layer's values live on
one rank (:class:`slope.parallel.ShardedValues`), fetched to rank them; the owner moves its values
and moments to the new mask, the others receive its metadata.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slope.dynamic.data import load_finetune_data, resolve_tokenizer
from slope.dynamic.sparsifier import DynamicSparsity, DynamicSparsityConfig
from slope.finetune_checkpoints import LoopCheckpoints
from slope.finetune_loop import FinetuneLoop, LoopSettings, enable_activation_checkpointing
from slope.finetune_run import (build_optimizers, check_int, check_output_dir, check_positions, check_positive, check_save_total_limit,
                                dataset_name, ddp_forward_model, fsdp_settings, launcher_mixed_precision, output_folder, plain_config,
                                precision_mode, run_resumable, save_model_folder, seed_everything)
from slope.interrupt import GracefulStop
from slope.sparsity import MaskedWeights, SparseLayerMasks

__all__ = ["sparse_finetune", "FinetuneArgs"]

#: ``**kw`` that :func:`sparse_finetune` accepts, with their defaults.
EXTRA_DEFAULTS: dict[str, Any] = {
    "max_steps": None, "tokenizer": None, "seed": 0, "max_seq_length": 256, "eval_batches": 8, "eval_steps": None,
    "logging_steps": 10, "max_grad_norm": 1.0, "weight_decay": 0.0, "text_field": "text", "device": "auto",
    "targets": None, "skip": None, "compress": None, "double_pruning": None, "progress": None,
    "save_steps": None, "save_total_limit": None, "resume_from_checkpoint": None, "sparsity_distribution": "uniform",
    "fsdp": False,
}

#: What a resumed run must share with the run that wrote its checkpoint.
RESUME_KEYS = ("total_steps", "sparsity", "learning_rate", "batch_size", "warmup_steps", "gradient_accumulation_steps",
               "precision", "seed", "max_seq_length", "max_grad_norm", "weight_decay")


@dataclass
class FinetuneArgs:
    """The training settings of a :func:`sparse_finetune` call (validated by :meth:`validate`)."""

    learning_rate: float
    batch_size: int
    num_epochs: int
    warmup_steps: int
    gradient_accumulation_steps: int
    fp16: bool
    bf16: bool
    gradient_checkpointing: bool
    use_topk_attention: bool
    topk_ratio: float
    extra: dict[str, Any]

    def validate(self) -> "FinetuneArgs":
        check_positive("learning_rate", self.learning_rate)
        check_int("batch_size", self.batch_size)
        check_int("num_epochs", self.num_epochs)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        check_int("max_seq_length", self.extra["max_seq_length"], 2)
        check_int("eval_batches", self.extra["eval_batches"])
        check_int("logging_steps", self.extra["logging_steps"])
        for name in ("max_steps", "eval_steps", "save_steps"):
            if self.extra[name] is not None:
                check_int(name, self.extra[name])
        check_save_total_limit(self.extra["save_total_limit"])
        precision_mode(self.fp16, self.bf16)
        if self.use_topk_attention and not (isinstance(self.topk_ratio, (int, float)) and 0 < self.topk_ratio <= 1):
            raise ValueError(f"topk_ratio must be in (0, 1] (the fraction of keys each query attends to), got {self.topk_ratio!r}")
        return self

    @property
    def precision(self) -> str:
        return precision_mode(self.fp16, self.bf16)


# ---------------------------------------------------------------------- model and optimizers
def load_model(model_name, device: torch.device) -> nn.Module:
    """A causal LM from an ``nn.Module``, a Hugging Face folder (or hub name), or a ``slope train``
    run / checkpoint directory (loaded as trained: dense, or with its SLoPe layers)."""
    if isinstance(model_name, nn.Module):
        return model_name.to(device)
    if not isinstance(model_name, (str, Path)):
        raise TypeError(f"model_name must be a model, a Hugging Face folder or a slope train run directory, got {type(model_name).__name__}")
    path = Path(model_name).expanduser()
    _check_model_path(path, str(model_name))
    if (path / "manifest.json").exists() or (path / "checkpoint" / "manifest.json").exists():
        from slope.evaluate import load_trained_model

        return load_trained_model(path, str(device)).model.train()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_name), dtype=torch.float32).to(device)


def _check_model_path(path: Path, name: str) -> None:
    """A one-line ``FileNotFoundError`` for a local path that holds no model (a name that cannot be
    a Hugging Face hub id: absolute, ``./``, ``~``, or more than one ``/``), before transformers
    reads it as a hub id ("Repo id must be in the form ...")."""
    local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
    if local and not path.exists():
        raise FileNotFoundError(f"no model folder at {path} (model_name / --model): give a Hugging Face model folder, "
                                "a slope train run directory or a hub name")
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "manifest.json", "checkpoint/manifest.json")):
        from slope.serialization.folders import describe_folder, folder_kind

        if folder_kind(path) in ("slope-apply", "checkpoints-only", "peft-adapter"):  # (what it is, as slope oneshot says)
            raise FileNotFoundError(f"model_name / --model: {describe_folder(path)}")
        raise FileNotFoundError(f"no model in {path}: a Hugging Face model folder holds config.json, a slope train run "
                                "directory manifest.json")


@dataclass
class _Run:
    """Everything one fine-tuning run holds (the loop is :class:`slope.finetune_loop.FinetuneLoop`)."""

    args: FinetuneArgs
    model: nn.Module
    sparsifier: DynamicSparsity
    loop: FinetuneLoop


def _checkpoints(ctx: _Run, out: Path | None, main: bool = True) -> LoopCheckpoints:
    """``out/checkpoint-<step>/`` of this run: the loop's state and the dynamic-sparsity schedule."""
    args = ctx.args
    fingerprint = {"total_steps": ctx.loop.total_steps, "sparsity": ctx.sparsifier.config.summary(),
                   "learning_rate": args.learning_rate, "batch_size": ctx.loop.data.batch_size, "warmup_steps": args.warmup_steps,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps, "precision": args.precision,
                   **{k: args.extra[k] for k in ("seed", "max_seq_length", "max_grad_norm", "weight_decay")}}
    return LoopCheckpoints(out, ctx.loop, {"sparsifier": ctx.sparsifier}, fingerprint, RESUME_KEYS, main, writer="sparse_finetune",
                           save_total_limit=args.extra["save_total_limit"])


def _loop(ctx: _Run, out: Path | None, main: bool = True) -> dict[str, Any]:
    """Train all steps (from a checkpoint when ``resume_from_checkpoint`` says so); log metrics (to
    ``out/metrics.jsonl`` when given), write ``checkpoint-<step>/`` every ``save_steps``; returns the summary."""
    sparsifier, extra = ctx.sparsifier, ctx.args.extra
    summary = run_resumable(ctx.loop, _checkpoints(ctx, out, main), out, extra["resume_from_checkpoint"], extra["save_steps"],
                            records=[{"event": "mask_update", **event} for event in sparsifier.history], main_process=main)
    summary["final_sparsity"] = sparsifier.sparsity
    summary.update(count_mask_updates(summary["records"]))
    return summary


def count_mask_updates(records: list[dict[str, Any]]) -> dict[str, int]:
    """``mask_updates``: the RigL / gradual-pruning updates made after a training step (the pruning at
    step 0 is not one: it is the run's ``initial_prune``), and ``mask_updates_skipped`` (RigL updates
    skipped for a non-finite dense gradient)."""
    updates = [r for r in records if r.get("event") == "mask_update" and r["step"] > 0]
    skipped = sum(1 for r in updates if r.get("skipped"))
    return {"mask_updates": len(updates) - skipped, "mask_updates_skipped": skipped}


def _save(ctx: _Run, tokenizer, out: Path, summary: dict[str, Any], main_process: bool) -> None:
    """The HF folder (plain transformers; zeros where pruned), tokenizer, masks, summary and plot.
    Every rank calls it (sharded masks and weights are gathered); the main process writes."""
    state = ctx.sparsifier.state_dict()
    if main_process:
        torch.save(state, out / "dynamic_sparsity.pt")
    kind = ctx.sparsifier.config.sparsity_type + (" RigL" if ctx.sparsifier.config.use_rigl else "")
    save_model_folder(ctx.model, tokenizer, out, summary, f"sparse fine-tuning ({kind})", main_process=main_process)


def _shard(model: nn.Module, sparsifier: DynamicSparsity, fsdp: dict, main_process: bool) -> nn.Module:
    """``model`` sharded in place by FSDP2 (``fsdp``: its settings, said in a note when they come
    from an accelerate config); the masks follow its new (sharded) parameters. Returns it: it runs
    its own forward."""
    from slope.parallel import accelerate_fsdp_note, launched_with_fsdp, wrap_fsdp2

    if launched_with_fsdp() and main_process:
        warnings.warn(accelerate_fsdp_note(fsdp), UserWarning, stacklevel=3)

    wrap_fsdp2(model, reshard_after_forward=fsdp["reshard_after_forward"], require_sparse=False)
    if isinstance(sparsifier.masked, MaskedWeights):  # (SLoPe layers keep their masks; their values are sharded by layer)
        params = dict(model.named_parameters())
        sparsifier.masked.rebind({name: params[name] for name in sparsifier.masked.params})
    return model


# ---------------------------------------------------------------------- the one call
def sparse_finetune(model_name, dataset, sparsity_ratio: float | None = None, sparsity_type: str = "unstructured",
                    mask_update_interval: int = 100, mask_update_fraction: float = 0.3, use_rigl: bool = True,
                    sparsity_schedule=None, learning_rate: float = 5e-5, batch_size: int = 8, num_epochs: int = 3,
                    warmup_steps: int = 100, gradient_accumulation_steps: int = 4, fp16: bool = False, bf16: bool = False,
                    gradient_checkpointing: bool = True, output_dir=None, pruning_method=None,
                    use_topk_attention: bool = False, topk_ratio: float = 0.1, **kw) -> nn.Module:
    """Fine-tune ``model_name`` on ``dataset`` with dynamic sparsity; returns the fine-tuned model.

    Every parameter of seed 000 (see ``docs/dynamic_sparsity.md``). ``model_name``: a model, a
    Hugging Face folder (or hub name) or a ``slope train`` run directory; ``dataset``:
    ``"embedded"``, a .txt/.jsonl file, a list of strings or an HF dataset name. ``**kw``:
    ``max_steps`` (overrides ``num_epochs``), ``tokenizer``, ``seed``, ``max_seq_length`` (256),
    ``eval_batches`` (8), ``eval_steps``, ``logging_steps`` (10), ``max_grad_norm`` (1.0),
    ``weight_decay`` (0.0), ``text_field``, ``device`` ("auto"), ``targets`` / ``skip`` (layers),
    ``compress`` / ``double_pruning`` (N:M SLoPe layers), ``progress`` (True: tqdm bar, False: none;
    default: a bar on a terminal, plain lines with rate and ETA otherwise), ``save_steps`` (write
    ``output_dir/checkpoint-<step>/`` every K steps: model, masks, schedule, optimizers, RNG states),
    ``resume_from_checkpoint`` (such a folder, or ``True`` for the newest in ``output_dir``: continues
    exactly; a checkpoint of other settings is refused), ``save_total_limit`` (keep only the newest N
    checkpoints; ``None``: all), ``sparsity_distribution`` (``"uniform"`` or
    ``"erk"``: RigL's Erdős–Rényi-Kernel spread of the unstructured budget over the layers).

    The returned model keeps its sparse form: unstructured masks as zeros in ``nn.Linear`` weights,
    N:M as :class:`slope.SparseLinear` layers (2:4: accelerable); under FSDP it is still sharded:
    :func:`slope.parallel.full_model_state_dict` gathers it, which needs the process group — one this
    call started itself ends with it, so create the group first (``torch.distributed.init_process_group()``)
    to go on using the sharded model, else load ``output_dir``. Its ``dynamic_sparsity`` attribute
    is the :class:`DynamicSparsity` (masks, history) and ``finetune_summary`` the run's summary. A run
    stopped by SIGINT / SIGTERM returns the model after step ``finetune_summary["stopped_at"]`` with
    ``stopped_by`` the signal's name and ``stop_checkpoint`` the folder to resume from (nothing else is
    written; see :func:`slope.finetune_run.run_resumable`).
    """
    from slope import parallel
    from slope.evaluate import resolve_device

    unknown = sorted(set(kw) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"sparse_finetune got unknown keyword arguments {unknown}; accepted extras: {sorted(EXTRA_DEFAULTS)}")
    extra = {**EXTRA_DEFAULTS, **kw}
    fp16, bf16 = launcher_mixed_precision(fp16, bf16)
    args = FinetuneArgs(learning_rate, batch_size, num_epochs, warmup_steps, gradient_accumulation_steps, fp16, bf16,
                        gradient_checkpointing, use_topk_attention, topk_ratio, extra).validate()
    config = DynamicSparsityConfig(sparsity_ratio, sparsity_type, mask_update_interval, mask_update_fraction, use_rigl,
                                   sparsity_schedule, pruning_method, extra["targets"], extra["skip"], extra["compress"],
                                   extra["double_pruning"], sparsity_distribution=extra["sparsity_distribution"]).validate()
    check_output_dir(output_dir, extra["resume_from_checkpoint"], extra["save_steps"], save_total_limit=extra["save_total_limit"])
    env = parallel.init_distributed(device=resolve_device(extra["device"]))
    try:
        with GracefulStop():  # from here SIGINT / SIGTERM stop after a step; one after the last step lets the outputs be written
            return _train(model_name, dataset, args, config, output_dir, env)
    finally:
        parallel.destroy_distributed(env)


def _train(model_name, dataset, args: FinetuneArgs, config: DynamicSparsityConfig, output_dir, env) -> nn.Module:
    """The run of :func:`sparse_finetune` on this process (one of ``env.world_size`` under a launcher:
    DDP over ``batch_size`` rows per process; RigL averages the ranks' dense gradients, so every
    rank keeps the same masks)."""
    from slope.train import LossScaler

    extra, device = args.extra, env.device
    fsdp = fsdp_settings(extra["fsdp"], args.fp16, env)
    seed_everything(extra["seed"])
    model = load_model(model_name, device)
    check_positions(model, extra["max_seq_length"])
    tokenizer = resolve_tokenizer(extra["tokenizer"], model_name)
    data = load_finetune_data(dataset, tokenizer, seq_len=extra["max_seq_length"], batch_size=args.batch_size * env.world_size,
                              seed=extra["seed"], eval_batches=extra["eval_batches"],
                              vocab_size=model.get_input_embeddings().num_embeddings, text_field=extra["text_field"],
                              length_name="max_seq_length (--max-seq-length)")
    total = extra["max_steps"] or args.num_epochs * math.ceil(data.micro_batches_per_epoch / args.gradient_accumulation_steps)
    sparsifier = DynamicSparsity(model, total, config)
    model.to(device)
    if args.use_topk_attention:
        from slope.dynamic.attention import enable_topk_attention

        enable_topk_attention(model, args.topk_ratio)
    if args.gradient_checkpointing or (fsdp or {}).get("activation_checkpointing"):
        enable_activation_checkpointing(model)
    forward_model = _shard(model, sparsifier, fsdp, env.is_main) if fsdp is not None else ddp_forward_model(model, env)
    dense_opt, sparse_opt = build_optimizers(model, args.learning_rate, extra["weight_decay"],
                                             sparse=isinstance(sparsifier.masked, SparseLayerMasks))  # N:M on SLoPe layers
    settings = LoopSettings(args.learning_rate, args.warmup_steps, "linear", args.gradient_accumulation_steps, args.precision,
                            extra["max_grad_norm"], extra["logging_steps"], extra["eval_steps"], extra["progress"],
                            "sparse-finetune")
    loop = FinetuneLoop(model, data, dense_opt, sparse_opt, LossScaler(args.fp16), device, total, settings,
                        after_step=lambda step, skipped: [{"event": "mask_update", **event} for event in
                                                          sparsifier.step(sparse_opt or dense_opt, skipped=skipped)],
                        status=lambda: {"sparsity": sparsifier.sparsity}, forward_model=forward_model,
                        before_update=getattr(sparsifier.masked, "mask_grads_", None) if fsdp is not None else None)
    ctx = _Run(args, model, sparsifier, loop)
    out = output_folder(output_dir, env.is_main)
    summary = _loop(ctx, out, env.is_main)
    if summary.get("already_finished") or summary["stopped_by"]:  # (stopped: its checkpoint continues it)
        return _finish(ctx, summary)
    summary["config"] = {**sparsifier.config_dict(), "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                         "num_epochs": args.num_epochs, "warmup_steps": args.warmup_steps,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps, "precision": args.precision,
                         "gradient_checkpointing": args.gradient_checkpointing or bool((fsdp or {}).get("activation_checkpointing")), "use_topk_attention": args.use_topk_attention,
                         "topk_ratio": args.topk_ratio, **plain_config(extra), "dataset": dataset_name(dataset),
                         "global_batch": args.batch_size * env.world_size, "world_size": env.world_size, "fsdp": fsdp is not None}
    if out is not None:  # (every rank: a sharded model and its masks are gathered; the main process writes)
        _save(ctx, tokenizer, out, summary, env.is_main)
    return _finish(ctx, summary)


def _finish(ctx: _Run, summary: dict[str, Any]) -> nn.Module:
    """The trained model, its hooks removed, with ``dynamic_sparsity`` and ``finetune_summary``."""
    if hasattr(ctx.sparsifier.masked, "remove_hooks"):
        ctx.sparsifier.masked.remove_hooks()
    ctx.model.dynamic_sparsity, ctx.model.finetune_summary = ctx.sparsifier, {k: v for k, v in summary.items() if k != "records"}
    return ctx.model.eval()
