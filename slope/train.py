"""``slope train``: pretrain a small Llama (or any Hugging Face causal LM) with SLoPe (or dense, as
the baseline) in one readable loop.

Per step ``s`` (1-based, up to ``max_steps``)::

    lr = warmup + cosine(s)                     set on both optimizers
    grad_accum × { batch(seed, s, micro) → forward (autocast) → (loss · scale / grad_accum).backward() }
    unscale dense and sparse grads (fp16)       overflow → skip both optimizers, shrink the scale
    clip the joint norm of sparse + dense grads non-finite loss or norm → skip both optimizers
    sparse_opt.step(); dense_opt.step()         ADAMWSparse for SLoPe values, AdamW for the rest
    log / validate / checkpoint                 SIGINT/SIGTERM → checkpoint and stop

Lazy LoRA (DESIGN §5): after step ``ceil((1 - F) · max_steps)`` adapters are attached to every
SLoPe layer and join the dense optimizer as a new parameter group on the same schedule.
The batches of step ``s`` depend only on ``(seed, s)``, and checkpoints hold every other piece of
state, so ``--resume`` reproduces the uninterrupted run's losses exactly.

Data parallel (``torchrun --nproc_per_node=N -m slope train``; ``slope.parallel``): every rank
draws the same global micro-batch and trains on its ``batch_size/N`` rows, under DDP, with
``--deepspeed CONFIG`` under DeepSpeed ZeRO-1/2 (which then clips dense and sparse gradients
separately), or with ``--fsdp`` sharded by FSDP2 (:mod:`slope.train_fsdp`). Gradients are
averaged over the ranks, so the run — and its checkpoints, written by rank 0 in the
single-process format — do not depend on N: resume on any number of ranks.
Rank 0 alone logs and writes files.

No fault loses a run (``docs/robustness.md``): the output folder is locked (:mod:`slope.runlock`),
saves are crash-safe and a resume finds the newest complete checkpoint (:mod:`slope.checkpoint_store`),
more than ``nonfinite_patience`` skipped steps in a row stop the run and a checkpoint never holds
non-finite numbers (:mod:`slope.guard`), SIGINT/SIGTERM save and exit cleanly (:mod:`slope.interrupt`),
and ``metrics.jsonl`` is appended line-atomically (:mod:`slope.metrics_log`).

Around the loop: the architecture (``--model-config``: :mod:`slope.model_config`) and the tokenizer
(``--tokenizer``: :mod:`slope.data.tokenizer`) are stored in every checkpoint; metrics also go to
TensorBoard or W&B (``--report-to``: :mod:`slope.reporting`); progress is a bar on a terminal and
the step lines (with ETA) otherwise (:mod:`slope.progress`).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slope import parallel
from slope.checkpoint import (
    Checkpoint, CheckpointError, attach_lora, build_model, check_compatible, check_model_config, check_state_fits, read_checkpoint, restore_rng,
    save_checkpoint, saved_config,
)
from slope.checkpoint_store import latest_checkpoint, recover
from slope.config import PATH_KEYS, ConfigError, TrainConfig, absolute_if_local
from slope.data import TokenSplits, load_splits, open_tokenizer, perplexity, train_batch, unigram_cross_entropy, val_batches
from slope.data.tokenizer import tokenizer_files
from slope.evaluate import autocast, evaluate_loss, resolve_device
from slope.finetune_loop import enable_activation_checkpointing
from slope.guard import FiniteGuard, check_finite
from slope.interrupt import GracefulStop
from slope.metrics_log import MetricsLog, read_records
from slope.model_config import causal_lm_config, check_sparse_sizes, describe
from slope.parallel.sharded import full_tensor, held_bytes
from slope.progress import Progress
from slope.registry import sparse_modules
from slope.reporting import open_reporter
from slope.runlock import RunLock, RunLockError
from slope.serialization.jsonfile import read_json_object
from slope.train_fsdp import average_replicated_grads, broadcast_adapters, fsdp_settings, requested_fsdp, shard_model

__all__ = ["LossScaler", "lr_at", "train"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (1-based) ``step``: linear warmup, then cosine decay to ``lr · min_lr_ratio``."""
    warmup = cfg.warmup_steps
    if step <= warmup:
        return cfg.lr * step / warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


class LossScaler:
    """Dynamic loss scaling for fp16 that treats dense and sparse gradients alike.

    The loss is multiplied by ``scale`` before backward; :meth:`unscale_` divides every gradient
    (``p.grad`` of the dense parameters and the SLoPe layers' compressed ``values_grad``) by it and
    reports an inf/nan anywhere. On overflow the step is skipped and the scale halves (never below
    ``min_scale``); after ``growth_interval`` clean steps it doubles. Disabled (fp32/bf16): scale 1,
    never skips.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 200, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min(float(min_scale), self.scale)
        self.good_steps = 0

    @torch.no_grad()
    def unscale_(self, dense_params, sparse_opt) -> bool:
        """Divide all gradients by the scale in place; return True if any is not finite."""
        if not self.enabled:
            return False
        inv = 1.0 / self.scale
        grads = [p.grad for p in dense_params if p.grad is not None]
        found_inf = False
        if grads:  # one device read for all of them
            for g in grads:
                g.mul_(inv)
            found_inf = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if sparse_opt is not None:
            found_inf = sparse_opt.unscale_(inv) or found_inf
        return found_inf

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale * 0.5, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def _dense_param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups over every trainable parameter (the SLoPe values are not: ADAMWSparse owns them):
    matrices and embeddings decay, norms and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _add_lora(model, dense_opt, cfg: TrainConfig) -> int:
    """Attach the lazy adapters and give them to the dense optimizer; returns their parameter count."""
    params = attach_lora(model, cfg.lora_rank)
    dense_opt.add_param_group({"params": params, "weight_decay": cfg.weight_decay})
    return sum(p.numel() for p in params)


def _densify(model, dense_opt, cfg: TrainConfig) -> tuple[int, int]:
    """Final dense phase: replace the SLoPe layers by dense ``nn.Linear`` holding ``W⊙M`` (adapters
    merged in) whose weights join the dense optimizer (fresh moments); returns (layers, weights)."""
    from slope.prune import densify

    params = densify(model)
    dense_opt.add_param_group({"params": params, "weight_decay": cfg.weight_decay})
    return len(params), sum(p.numel() for p in params)


def plot_losses(metrics_file: Path, png: Path, unigram: float | None = None) -> None:
    """``loss.png``: train and validation loss against step, lazy-LoRA start and unigram baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_file)
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lora = [r["step"] for r in records if r.get("event") == "lora_start"]
    tail = [r["step"] for r in records if r.get("event") == "dense_tail_start"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1.2)
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation loss", lw=1.5)
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", label=f"unigram baseline ({unigram:.2f})")
    for step in lora:
        ax.axvline(step, color="red", ls="--", label=f"lazy LoRA attached (after step {step})")
    for step in tail:
        ax.axvline(step, color="purple", ls="--", label=f"dense tail (after step {step})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _print(line: str) -> None:
    print(line, flush=True)  # line by line also when stdout is a file or a pipe


def _silent(line: str) -> None:
    """The log of ranks other than 0."""


def _grow(runner, model, dense_opt, cfg: TrainConfig, add, ds_config: dict | None):
    """``add(model, dense_opt, cfg)`` adds parameters (lazy LoRA, dense tail) to the dense optimizer;
    a DDP wrapper or DeepSpeed engine fixes its parameter list when built, so rebuild it (DeepSpeed:
    with a new optimizer of the same groups, keeping weights and state); FSDP2 leaves the adapters
    unsharded (:mod:`slope.train_fsdp`). Returns
    ``(runner, dense_opt, add's result)``."""
    if ds_config is None:
        result = add(model, dense_opt, cfg)
        if parallel.is_fsdp2(model):  # the adapters are not FSDP's: whole on every rank, as on rank 0
            broadcast_adapters(model)
        elif runner is not model:
            runner = parallel.rewrap_ddp(runner)
        return runner, dense_opt, result
    made = {}

    def optimizer_with_new_parameters(module):
        made["opt"] = torch.optim.AdamW(_dense_param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        made["result"] = add(module, made["opt"], cfg)
        return made["opt"]

    runner, _, _ = parallel.deepspeed_rebuild(runner, ds_config, optimizer_with_new_parameters)
    return runner, made["opt"], made["result"]


def _deepspeed_step(engine, sparse_opt, loss: float) -> tuple[bool, float | None]:
    """The step under DeepSpeed (it clipped the dense gradients, the sparse sync the sparse ones).

    A non-finite step changes no weight: ZeRO-1/2 skip a dense step whose gradient norm is not
    finite (in bf16 too: :func:`slope.parallel.deepspeed_train_config` keeps its check on), and the
    sparse optimizer steps only when the engine applied its step and the loss and the sparse
    gradient norm are finite. Returns ``(skipped, joint gradient norm before clipping)`` (the norm
    None on a skipped step or when DeepSpeed reported none)."""
    sparse_norm = 0.0
    if sparse_opt is not None:
        sync = engine.slope_sparse_sync
        sparse_norm = sync.last_norm if sync.clip_norm is not None else float(sparse_opt.clip_grad_norm(math.inf))
    engine.step()
    skipped = not (engine.was_step_applied() and math.isfinite(loss) and math.isfinite(sparse_norm))
    if skipped:
        return True, None
    if sparse_opt is not None:
        sparse_opt.step()
    dense_norm = engine.get_global_grad_norm()
    return False, None if dense_norm is None else math.hypot(float(dense_norm), sparse_norm)


def _output_dir(name: str) -> Path:
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out = {name!r} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out = {name!r}: cannot create the folder ({e.strerror or e}); choose another --out") from e
    return out


def _lock_and_recover(out: Path, env, cfg: TrainConfig, log) -> RunLock | None:
    """Rank 0 locks ``out``, finishes any save a crash interrupted and, for a new run, checks that
    it replaces no unfinished one; every rank fails alike if it cannot (collective). Returns the
    held lock (rank 0) or None."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(out, note=log)
            lock.acquire()
            for note in recover(out / "checkpoint", cfg.keep_checkpoints):
                log(f"note: {note}")
            if not cfg.resume:
                _refuse_to_replace_unfinished(out)
        except (RunLockError, ConfigError) as e:
            error = e
            if lock is not None:
                lock.release()
            lock = None
    if parallel.mean_over_ranks(0.0 if error else 1.0) < 1.0:  # (also a barrier after the recovery)
        parallel.destroy_distributed(env)
        raise error or RunLockError(f"rank 0 stopped before training in {out}; see its error")
    return lock


def _refuse_to_replace_unfinished(out: Path) -> None:
    """A new run (no ``--resume``) would replace the checkpoints and metrics in ``out``: refuse when
    they belong to a run that stopped before its last step (interrupted, ``--stop-after``) or cannot
    be read (a damaged newest checkpoint)."""
    newest = out / "checkpoint"  # (recover() has just published any interrupted save, or the newest kept copy, here)
    if not newest.exists():
        return  # nothing resumable to protect
    advice = "continue it with --resume, or choose another --out (or delete the folder) to start a new run"
    step = (read_json_object(newest / "manifest.json") or {}).get("step")  # no hashing: nothing is read but two JSON files
    try:
        planned = saved_config(newest).max_steps
    except CheckpointError:
        planned = None
    if not isinstance(step, int) or planned is None:
        raise ConfigError(f"out = {str(out)!r} holds a checkpoint that cannot be read (its manifest.json or config.json is "
                          f"missing or damaged): {advice}")
    if step < planned:
        raise ConfigError(f"out = {str(out)!r} holds an unfinished run (its checkpoint is at step {step} of {planned}): {advice}")


def _clip_and_step(dense_opt, sparse_opt, dense_params: list, grad_clip: float) -> float | None:
    """Clip the joint norm of the sparse and dense gradients and step both optimizers; returns the
    norm before clipping, or None (and nothing is updated) when it is not finite."""
    max_norm = grad_clip if grad_clip > 0 else math.inf
    if sparse_opt is not None:
        grad_norm = float(sparse_opt.clip_grad_norm(max_norm, dense_parameters=dense_params))
    else:
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(dense_params, max_norm)))  # (FSDP2: a DTensor)
    if not math.isfinite(grad_norm):
        return None
    if sparse_opt is not None:
        sparse_opt.step()
    dense_opt.step()
    return grad_norm


def _checked_resume(cfg: TrainConfig, out: Path) -> Checkpoint | None:
    """With ``--resume``: the newest complete checkpoint of ``out``, checked against ``cfg`` (settings,
    architecture, ``--stop-after`` / ``--max-steps`` beyond its step); ``None`` otherwise."""
    if not cfg.resume:
        return None
    ckpt = read_checkpoint(latest_checkpoint(out / "checkpoint", "train without --resume first (or point --out at the run's directory)"))
    check_compatible(ckpt.config, cfg)
    check_model_config(ckpt)
    if cfg.stop_after is not None and cfg.stop_after <= ckpt.step:
        raise ConfigError(f"stop_after = {cfg.stop_after} is invalid: the checkpoint is already at step {ckpt.step}")
    if cfg.max_steps < ckpt.step:
        raise ConfigError(f"max_steps = {cfg.max_steps} is invalid: the checkpoint is already at step {ckpt.step}; "
                          f"drop --max-steps to finish the run's {ckpt.config.max_steps} steps, or raise it")
    return ckpt


def _changed_on_resume(saved: TrainConfig, cfg: TrainConfig) -> str:
    """The settings a resumed run was given anew with other values (``lr 0.003 -> 0.001, ...``);
    the run-control ones (resume, stop_after) and the folder (a run may move) are left out."""
    keys = [k for k in TrainConfig.keys() if k not in ("resume", "stop_after", "out")]
    return ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in keys if getattr(saved, k) != getattr(cfg, k))


def _optimizers(model, cfg: TrainConfig, shard_sparse_state: bool = False):
    """``(AdamW over the dense parameters, ADAMWSparse over the SLoPe layers or None for --dense)``;
    ``shard_sparse_state``: each SLoPe layer's moments on one rank (``ADAMWSparse(shard_state=True)``)."""
    dense_opt = torch.optim.AdamW(_dense_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.dense:
        return dense_opt, None
    from slope.optimizers import ADAMWSparse

    return dense_opt, ADAMWSparse(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  mask_change_freq=cfg.mask_change_freq, shard_state=shard_sparse_state)


def _zero_stage(ds_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without one)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0) or 0)


def _shards_sparse_state(ds_config: dict | None, env, cfg: TrainConfig, fsdp: dict | None = None) -> bool:
    """Whether ADAMWSparse splits its state over the ranks, by layer (:mod:`slope.optimizers.sharding`):
    with ``--shard-sparse-optimizer``, and always under DeepSpeed with ZeRO stage 1 or more (it
    partitions the dense optimizer state). Under FSDP the moments follow the sharded values instead."""
    return not cfg.dense and env.world_size > 1 and fsdp is None and (cfg.shard_sparse_optimizer or _zero_stage(ds_config) >= 1)


def _restore(ckpt: Checkpoint, model, dense_opt, sparse_opt, scaler: LossScaler, cfg: TrainConfig) -> tuple[bool, bool]:
    """Load the checkpoint's model, optimizers, loss scaler and RNG states (the model grown as it was:
    adapters, dense tail); returns ``(lora_attached, densified)``. Every shape is checked first."""
    if ckpt.lora_attached:
        _add_lora(model, dense_opt, cfg)
    if ckpt.dense_tail:
        _densify(model, dense_opt, cfg)
    check_state_fits(ckpt, model, None if cfg.deepspeed else dense_opt, sparse_opt)  # before anything is loaded
    if parallel.is_fsdp2(model):  # (collective: each rank keeps its shards)
        parallel.load_full_model_state_dict(model, ckpt.model_state)
        parallel.load_full_optimizer_state_dict(model, dense_opt, ckpt.optimizers["dense"])
    else:
        model.load_state_dict(ckpt.model_state)
    if not (cfg.deepspeed or parallel.is_fsdp2(model)):  # (DeepSpeed partitions the state: loaded into its engine by _data_parallel)
        dense_opt.load_state_dict(ckpt.optimizers["dense"])
    if sparse_opt is not None:
        sparse_opt.load_state_dict(ckpt.optimizers["sparse"], checked=True)  # by check_state_fits above
    scaler.load_state_dict(ckpt.trainer_state["scaler"])
    restore_rng(ckpt.rng_tensors, ckpt.trainer_state["rng"])
    return bool(ckpt.lora_attached), bool(ckpt.dense_tail)


def _data_parallel(model, dense_opt, ds_config: dict | None, ckpt: Checkpoint | None, cfg: TrainConfig, env, log):
    """What runs the forward: a DeepSpeed engine (``--deepspeed``; a resumed state loaded into it),
    DDP under torchrun, or ``model`` itself (one process, or sharded by FSDP2 already)."""
    runner = model
    if ds_config is not None:
        try:
            runner, _, _ = parallel.deepspeed_initialize(model, ds_config, optimizer=dense_opt)
        except ImportError as e:
            parallel.destroy_distributed(env)
            raise ConfigError(f"deepspeed = {cfg.deepspeed!r}: {e}") from e
        if ckpt is not None:
            parallel.load_full_model_state_dict(runner, ckpt.model_state)
            parallel.load_full_optimizer_state_dict(runner, None, ckpt.optimizers["dense"])
    elif env.distributed and not parallel.is_fsdp2(model):
        runner = parallel.wrap_ddp(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, require_sparse=not cfg.dense)
    if parallel.is_fsdp2(model):
        how = "FSDP2: dense weights, gradients and AdamW moments split row-wise" + (
            "" if cfg.dense else "; each SLoPe layer's values, gradient and moments on one rank")
        if cfg.shard_sparse_optimizer:
            log("note: --shard-sparse-optimizer is implied by FSDP (the moments follow the sharded values)")
    elif env.distributed or ds_config is not None:
        how = f"DeepSpeed ZeRO-{_zero_stage(ds_config)}" if ds_config else "DDP"
        if _shards_sparse_state(ds_config, env, cfg):
            how += "; each SLoPe layer's optimizer moments on one rank"
    if env.distributed or ds_config is not None:
        log(f"data parallel: {env.world_size} ranks ({how}), "
            f"{cfg.batch_size // env.world_size} of the {cfg.batch_size} sequences of each micro-batch per rank")
    elif cfg.shard_sparse_optimizer:
        log("note: --shard-sparse-optimizer has nothing to split in one process (launch with torchrun --nproc_per_node=N)")
    return runner


def _forward_backward(runner, train_tokens: torch.Tensor, step: int, cfg: TrainConfig, env, scaler: LossScaler, deepspeed: bool) -> float:
    """Forward and backward over the ``cfg.grad_accum`` micro-batches of ``step`` (this rank's rows;
    sparse gradients accumulate in the layers, DDP averages on the last one); the step's loss,
    averaged over ranks."""
    loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = train_batch(train_tokens, seed=cfg.seed, step=step, micro=micro, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        x, y = (parallel.rank_slice(t, env.rank, env.world_size).to(env.device) for t in (x, y))
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last else parallel.no_sync(runner):  # gradients are averaged on the last one
            with autocast(env.device, cfg.precision):
                logits = runner(input_ids=x, use_cache=False).logits  # training keeps no KV cache
            micro_loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
            if deepspeed:
                runner.backward(micro_loss, scale_wrt_gas=False)
                if not last:
                    runner.step()  # counts the micro-batch; the update happens on the last one
            else:
                (micro_loss * scaler.scale).backward()
        loss += micro_loss.item()
    return parallel.mean_over_ranks(loss)


def _update(runner, dense_opt, sparse_opt, scaler: LossScaler, loss: float, cfg: TrainConfig, deepspeed: bool) -> tuple[bool, float | None]:
    """Unscale (fp16), then skip the step on an overflow or a non-finite loss or gradient norm, else
    clip and update both optimizers; gradients are zeroed either way. Returns ``(skipped, grad_norm)``.
    (DeepSpeed, never fp16, calls its engine's step anyway, which counts the micro-batches; see
    :func:`_deepspeed_step` for how a non-finite step then changes nothing.)"""
    dense_params = [p for group in dense_opt.param_groups for p in group["params"]]
    if parallel.is_fsdp2(runner):
        average_replicated_grads(dense_opt)  # the adapters' (FSDP2 reduced its own parameters' gradients)
    skipped = scaler.unscale_(dense_params, sparse_opt) or not math.isfinite(loss)
    grad_norm = None
    if deepspeed:
        skipped, grad_norm = _deepspeed_step(runner, sparse_opt, loss)
    elif not skipped:
        grad_norm = _clip_and_step(dense_opt, sparse_opt, dense_params, cfg.grad_clip)
        skipped = grad_norm is None
    scaler.update(skipped)
    dense_opt.zero_grad(set_to_none=True)
    if sparse_opt is not None:
        sparse_opt.zero_grad()
    return skipped, grad_norm


def _step_line(step: int, max_steps: int, loss: float, lr: float, tokens: int, elapsed: float, eta: str,
               scaler: LossScaler, skipped: bool) -> str:
    """The plain progress line of a logged step (``step 10/300 | loss … | lr … | tok/s | s | ETA``)."""
    line = f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens / max(elapsed, 1e-9):,.0f} tok/s | {elapsed:.1f} s"
    if step < max_steps:
        line += f" | ETA {eta}"
    if skipped:
        line += (f" | overflow: step skipped, loss scale now {scaler.scale:g}" if scaler.enabled
                 else " | non-finite loss or gradients: step skipped")
    return line


def _recorded_summary(out: Path, step: int) -> dict | None:
    """The summary record of ``step`` in ``out/metrics.jsonl``, or None."""
    recorded = [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "summary" and r.get("step") == step]
    return recorded[-1] if recorded else None


def _finished_summary(run: _Run, out: Path) -> dict:
    """The summary of a run resumed at its last step, written again as it was recorded (the
    metrics file is as before), or, had the run ended before recording one, made from its last
    records and the checkpoint."""
    summary = run.finished_summary
    if summary is not None:
        summary = {**summary, "out": str(out)}  # (the folder may have been copied or moved since)
    else:
        records = read_records(out / "metrics.jsonl")

        def last(key: str):
            return next((r[key] for r in reversed(records) if r.get("step") == run.step and key in r), None)

        summary = {"step": run.step, "event": "summary", "finished": True, "final_train_loss": last("loss"),
                   "final_val_loss": last("val_loss"), "unigram_loss": run.unigram, "tokens": run.tokens,
                   "elapsed_s": round(run.elapsed_before, 3), "out": str(out), "stopped_by": None}
    run.metrics.write(summary)
    return summary


def _final_line(summary: dict, max_steps: int) -> str:
    """The run's last line: done (with its losses), or stopped early and how to continue."""
    step, out, elapsed = summary["step"], summary["out"], summary["elapsed_s"]
    resume = f"checkpoint in {out}/checkpoint; continue with: slope train --out {out} --resume"
    if summary["stopped_by"]:
        return f"stopped by {summary['stopped_by']} after step {step} of {max_steps}: {resume.replace('checkpoint in', 'checkpoint saved in', 1)}"
    if step < max_steps:
        return f"stopped after step {step} of {max_steps} ({elapsed:.1f} s); {resume}"
    val_loss = summary["final_val_loss"]
    val = f"val loss {val_loss:.4f} (ppl {perplexity(val_loss):.1f})" if val_loss is not None else "no validation"
    train_loss = summary["final_train_loss"]
    train = f"train loss {train_loss:.4f}" if train_loss is not None else "train loss not recorded"
    return (f"done: {step} steps, {summary['tokens']:,} tokens in {elapsed:.1f} s | {train} | {val} | "
            f"unigram baseline {summary['unigram_loss']:.4f} | outputs in {out}/ (metrics.jsonl, loss.png, checkpoint/)")


def _absolute_sources(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local ``dataset`` / ``tokenizer`` / ``model_config`` paths made absolute, so
    that the checkpoint's settings name them from any working directory (``--resume`` elsewhere)."""
    absolute = {key: absolute_if_local(getattr(cfg, key)) for key in PATH_KEYS}
    changed = {key: value for key, value in absolute.items() if value != getattr(cfg, key)}
    return cfg.updated(changed) if changed else cfg


def train(cfg: TrainConfig, *, progress: bool | None = None, log=_print, plot: bool = True) -> dict:
    """Run (or resume) the training job described by ``cfg``; returns the final summary record.

    ``progress``: tqdm bar (default: when stderr is a terminal); otherwise a plain line with rate
    and ETA is logged every ``log_every`` steps through ``log`` (:mod:`slope.progress`).
    ``plot=False`` skips ``loss.png`` (callers that run many jobs in-process, e.g.
    ``accuracy_experiments/run.py``). Holds the lock of ``cfg.out`` while it runs; SIGINT/SIGTERM
    end it after the current step with a checkpoint.
    """
    cfg.validate()
    cfg = _absolute_sources(cfg)
    _check_launcher_precision(cfg)
    fsdp = requested_fsdp(cfg)  # (--fsdp, or an accelerate FSDP config)
    new_folder = not Path(cfg.out).exists()
    out = _output_dir(cfg.out)
    try:
        # torchrun: join the process group (DeepSpeed needs one even for a single process).
        env = parallel.init_distributed(device=resolve_device(cfg.device), single_process_group=bool(cfg.deepspeed))
        lock = _lock_and_recover(out, env, cfg, log if env.is_main else _silent)
        try:
            with GracefulStop() as stop, ExitStack() as cleanup:  # cleanup: the progress bar and the --report-to backend
                return _train(cfg, out, env, stop, cleanup, fsdp, progress=progress, log=log, plot=plot)
        finally:
            if lock is not None:
                lock.release()
    except BaseException:
        if new_folder:  # a run refused before it wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                out.rmdir()  # (only if empty; another rank may have removed it already)
        raise


def _check_launcher_precision(cfg: TrainConfig) -> None:
    """``accelerate launch`` with ``mixed_precision: bf16`` / ``fp16`` in its config: slope train's
    precision is its own ``--precision``, so a different one is a one-line error, not ignored."""
    launched = parallel.accelerate_mixed_precision()
    if launched is not None and launched != cfg.precision:
        raise ConfigError(f"precision = {cfg.precision!r} is invalid here: the accelerate config sets mixed_precision: {launched}; "
                          f"pass --precision {launched} (or set mixed_precision: no)")


@dataclass
class _Run:
    """What the loop of :func:`_train` works on, made by :func:`_setup`: the run's settings, data and
    model, what trains it (``runner``: the model, its DDP wrapper or DeepSpeed engine; ``dense_opt``
    and ``runner`` are replaced when the model grows), and where it starts (``step``, ``tokens`` and
    ``elapsed_before``: the seconds of earlier sessions, from a resumed checkpoint)."""

    cfg: TrainConfig
    out: Path
    env: parallel.DistEnv
    ds_config: dict | None
    arch: dict  # the architecture, stored in every checkpoint
    tokenizer_copy: dict[str, bytes] | None  # the --tokenizer's files, saved in checkpoints
    data: TokenSplits
    val_set: list[tuple[torch.Tensor, torch.Tensor]]
    unigram: float
    model: torch.nn.Module
    runner: torch.nn.Module
    dense_opt: torch.optim.Optimizer
    sparse_opt: object | None  # ADAMWSparse (None for --dense)
    scaler: LossScaler
    guard: FiniteGuard
    metrics: MetricsLog
    lora_start: int
    dense_tail_start: int
    step: int
    tokens: int
    elapsed_before: float
    lora_attached: bool
    densified: bool
    finished_summary: dict | None = None  # a run resumed at --max-steps: the summary it recorded
    save_pending: bool = False  # a checkpoint was due while steps were being skipped (see _save_when_good)
    replaces_finished: bool = False  # a new run in a finished run's folder: its first save retires that run's checkpoints


def _deepspeed_config(cfg: TrainConfig, env) -> dict | None:
    """The DeepSpeed config of ``--deepspeed`` (checked against the batch settings), or None."""
    if not cfg.deepspeed:
        return None
    try:
        return parallel.deepspeed_train_config(cfg.deepspeed, global_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                                               world_size=env.world_size, gradient_clipping=cfg.grad_clip)
    except ValueError as e:
        parallel.destroy_distributed(env)
        raise ConfigError(f"deepspeed = {cfg.deepspeed!r}: {e}") from e


def _read_data(cfg: TrainConfig, ckpt: Checkpoint | None, log) -> tuple[TokenSplits, list, float]:
    """``(splits, validation batches, unigram baseline)`` of ``--dataset``; a resumed run's data must
    be the checkpoint's."""
    data = load_splits(cfg.dataset, cfg.seq_len, cfg.text_field, cfg.tokenizer)
    if ckpt is not None and ckpt.trainer_state["data_fingerprint"] != data.fingerprint:
        raise CheckpointError(f"--dataset {cfg.dataset}: the data differ from the checkpoint's (its files, or the --tokenizer's, changed); "
                              "cannot resume exactly")
    val_set = val_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)
    unigram = unigram_cross_entropy(data.train, data.val, data.vocab_size)
    tokenized_by = f" (tokenizer {cfg.tokenizer})" if cfg.tokenizer else ""
    log(f"data: {cfg.dataset}: {len(data.train):,} train / {len(data.val):,} validation tokens, vocab {data.vocab_size}{tokenized_by}; "
        f"unigram baseline (validation cross-entropy of train-split token frequencies) {unigram:.4f}")
    return data, val_set, unigram


def _resume_position(ckpt: Checkpoint | None, model, dense_opt, sparse_opt, scaler: LossScaler, cfg: TrainConfig, out: Path, log):
    """Restore ``ckpt`` (if any) into the model, optimizers and scaler; returns
    ``(step, tokens, elapsed_before, lora_attached, densified)`` where the run starts."""
    if ckpt is None:
        if (out / "checkpoint").exists():
            log(f"note: starting a new run in {out}; the finished run's metrics there are replaced, and its checkpoint (with "
                "any kept copies) at the new run's first save")
        return 0, 0, 0.0, False, False
    lora_attached, densified = _restore(ckpt, model, dense_opt, sparse_opt, scaler, cfg)
    step, tokens, elapsed_before = ckpt.step, ckpt.trainer_state["tokens"], ckpt.trainer_state["elapsed_s"]
    log(f"resumed from {ckpt.path} at step {step}")
    changed = _changed_on_resume(ckpt.config, cfg)
    if changed and step < cfg.max_steps:
        log(f"note: resuming with changed settings ({changed}); they apply from step {step + 1} on")
    return step, tokens, elapsed_before, lora_attached, densified


def _setup(cfg: TrainConfig, out: Path, env, cleanup: ExitStack, fsdp: dict | None, log) -> _Run:
    """Everything before the loop, in this order: check the settings (batch split, DeepSpeed config,
    the checkpoint to resume), open the tokenizer, architecture and ``--report-to`` backend (into
    ``cleanup``), read the data, seed the RNGs and build the model and optimizers, restore the
    checkpoint, open ``metrics.jsonl``, wrap the model for data parallelism, announce the growth.
    ``fsdp``: the FSDP settings asked for (:func:`slope.train_fsdp.requested_fsdp`), applied as soon
    as the model is built."""
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size = {cfg.batch_size} is invalid: the global batch must split evenly over the {env.world_size} ranks")
    ds_config = _deepspeed_config(cfg, env)
    if cfg.precision == "fp16" and env.device.type == "cpu":
        log("note: fp16 matmuls are very slow on CPUs; prefer --precision bf16 or fp32 there")

    ckpt = _checked_resume(cfg, out)  # verified before anything else is done
    fsdp = fsdp_settings(fsdp, env, log)
    if ckpt is not None and ckpt.dense_tail and (fsdp is not None or ds_config is not None):
        engine, off = ("FSDP", "--no-fsdp") if fsdp is not None else ("DeepSpeed", "--deepspeed ''")
        raise ConfigError(f"{ckpt.path} is in the run's dense tail (its SLoPe layers became dense nn.Linear), which {engine} "
                          f"cannot resume: continue it with {off}")

    # ---- tokenizer, architecture and --report-to backend: checked before the data are read -----
    tokenizer = open_tokenizer(cfg.tokenizer)
    arch = ckpt.model_config if ckpt is not None else None
    if not arch:
        config = causal_lm_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
        if (note := check_sparse_sizes(cfg, config)) is not None:
            log(note)
        arch = config.to_dict()
    tokenizer_copy = tokenizer_files(tokenizer, "tokenizer", cfg.seq_len) if cfg.tokenizer and env.is_main else None  # saved in checkpoints
    reporter = cleanup.enter_context(open_reporter(cfg.report_to if env.is_main else "none", out, cfg, ckpt.step if ckpt else 0))

    data, val_set, unigram = _read_data(cfg, ckpt, log)

    # ---- model and optimizers ----------------------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size, data.eos_id, model_config=arch).to(env.device)
    if cfg.gradient_checkpointing and not enable_activation_checkpointing(model):
        raise ConfigError(f"gradient_checkpointing = True is invalid: {type(model).__name__} does not support activation "
                          "checkpointing (transformers' supports_gradient_checkpointing); drop --gradient-checkpointing")
    n_params = sum(p.numel() for p in model.parameters())
    pruned = sum(m.out_features * m.in_features - m.values.numel() for _, m in sparse_modules(model))
    if fsdp is not None:  # before the optimizers, which then hold the shards
        shard_model(model, fsdp, cfg, log)
    dense_opt, sparse_opt = _optimizers(model, cfg, _shards_sparse_state(ds_config, env, cfg, fsdp))
    scaler = LossScaler(cfg.precision == "fp16", cfg.fp16_init_scale, cfg.fp16_growth_interval, cfg.fp16_min_scale)
    guard = FiniteGuard(cfg.nonfinite_patience)
    kind = "dense baseline" if cfg.dense else f"SLoPe {cfg.sparsity} ({'compressed' if cfg.compress else 'simulated'})"
    stored = f"{n_params:,} parameters stored (of {n_params + pruned:,} dense)" if pruned else f"{n_params:,} parameters"
    log(f"model: {describe(model.config)}, {stored}, {kind}, {cfg.precision}, device {env.device}")

    step, tokens, elapsed_before, lora_attached, densified = _resume_position(ckpt, model, dense_opt, sparse_opt, scaler, cfg, out, log)
    # a finished run's summary, read before the reopened metrics file drops it
    finished = _recorded_summary(out, step) if ckpt is not None and step >= cfg.max_steps else None
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=step, enabled=env.is_main, note=log, reporter=reporter)

    # ---- data parallel: DDP under torchrun, or a DeepSpeed engine ------------------------------
    runner = _data_parallel(model, dense_opt, ds_config, ckpt, cfg, env, log)
    lora_start = cfg.lora_start if not cfg.dense else cfg.max_steps
    dense_tail_start = cfg.dense_tail_start if not cfg.dense else cfg.max_steps
    if lora_start < cfg.max_steps and not lora_attached and lora_start >= dense_tail_start and not densified:
        log(f"note: no LoRA adapters attach: the dense tail starts after step {dense_tail_start}, before the adapters' step "
            f"{lora_start} (the dense tail takes precedence; lower --dense-tail-fraction below --lazy-lora-fraction for both)")
    elif lora_start < cfg.max_steps and not lora_attached:
        log(f"lazy LoRA: rank-{cfg.lora_rank} adapters will be attached after step {lora_start} (last {cfg.lazy_lora_fraction:.1%} of steps)")
    elif not cfg.dense and cfg.lazy_lora_fraction > 0 and not lora_attached and step < cfg.max_steps:
        log(f"note: --lazy-lora-fraction {cfg.lazy_lora_fraction:g} of {cfg.max_steps} steps is less than one step: no adapters are "
            f"attached; raise it to at least {1 / cfg.max_steps:.3g} (or set 0 to say so)")
    if dense_tail_start < cfg.max_steps and not densified:
        log(f"dense tail: the SLoPe layers become dense after step {dense_tail_start} (last {cfg.dense_tail_fraction:.1%} of steps)"
            + ("; adapters attached before then are merged into the dense weights, none attach after" if lora_start < cfg.max_steps else ""))
    return _Run(cfg=cfg, out=out, env=env, ds_config=ds_config, arch=arch, tokenizer_copy=tokenizer_copy, data=data, val_set=val_set,
                unigram=unigram, model=model, runner=runner, dense_opt=dense_opt, sparse_opt=sparse_opt, scaler=scaler, guard=guard,
                metrics=metrics, lora_start=lora_start, dense_tail_start=dense_tail_start, step=step, tokens=tokens,
                elapsed_before=elapsed_before, lora_attached=lora_attached, densified=densified,
                finished_summary=finished, replaces_finished=ckpt is None and (out / "checkpoint").exists())


def _save(run: _Run, step_done: int, loss: float, tokens: int, t0: float) -> None:
    """Checkpoint the run after ``step_done`` (``t0``: when this session's loop started). Every rank
    checks the values are finite (a collective under DeepSpeed); rank 0 writes."""
    cfg = run.cfg
    fsdp = parallel.is_fsdp2(run.model)
    if run.ds_config is not None:  # gather ZeRO's partitions (collective), in the single-process layout
        model_state = parallel.full_model_state_dict(run.runner)
        dense_state = parallel.full_optimizer_state_dict(run.runner, None, index_keys=True)
    elif fsdp:  # gathered onto rank 0's CPU (collective), in the single-process layout; {} elsewhere
        model_state = parallel.full_model_state_dict(run.model, rank0_only=True)
        dense_state = parallel.full_optimizer_state_dict(run.model, run.dense_opt, index_keys=True, rank0_only=True)
    else:  # built once: checked here, then written
        model_state, dense_state = run.model.state_dict(), run.dense_opt.state_dict()
    # Never a checkpoint with non-finite numbers (every rank checks the same values, or its own
    # shard of the sparse moments, or rank 0 the gathered state, and then agrees with the others:
    # all stop alike).
    sharded = fsdp or getattr(run.sparse_opt, "owners", None) is not None
    check_finite(step_done, loss, {"model": model_state, "AdamW": dense_state,
                                   "ADAMWSparse": run.sparse_opt.state_dict() if run.sparse_opt is not None else {}},
                 agree=sharded)
    sparse_state = run.sparse_opt.full_state_dict() if run.sparse_opt is not None else None  # (gathered to rank 0 if sharded)
    if not run.env.is_main:
        return
    save_checkpoint(run.out / "checkpoint", model=run.model, dense_opt=run.dense_opt, sparse_opt=run.sparse_opt, config=cfg,
                    keep=1 if run.replaces_finished else cfg.keep_checkpoints, model_state=model_state, dense_state=dense_state, sparse_state=sparse_state,
                    extra_files=run.tokenizer_copy, trainer_state={
        "step": step_done, "tokens": tokens, "elapsed_s": run.elapsed_before + time.perf_counter() - t0,
        "lora_attached": run.lora_attached, "dense_tail": run.densified, "scaler": run.scaler.state_dict(),
        "scheduler": {"kind": "warmup_cosine", "last_step": step_done, "last_lr": lr_at(max(step_done, 1), cfg)},
        "data_seed": cfg.seed, "data_next_step": step_done + 1, "data_fingerprint": run.data.fingerprint,
        "vocab_size": run.data.vocab_size, "eos_id": run.data.eos_id, "model_config": run.arch,
    })


def _save_when_good(run: _Run, step: int, due: bool, loss: float, tokens: int, t0: float, write) -> bool:
    """Write the checkpoint of ``step`` when one is ``due`` or was put off; returns whether it did.

    Without fp16 loss scaling a skipped step means non-finite numbers: the run has begun to diverge,
    often after an update that left the weights finite but ruined. While such skipped steps run on,
    no checkpoint is written, so the last good one stays to resume from; the put-off one is written
    at the next step that succeeds. (fp16's overflow skips are routine and change no weights.)"""
    run.save_pending = run.save_pending or due
    if not run.save_pending:
        return False
    if run.guard.streak and not run.scaler.enabled:
        if due:
            write(f"step {step}: no checkpoint while steps are skipped for non-finite numbers ({run.guard.streak} in a row): "
                  "the last one written stays; it is written at the next step that succeeds")
        return False
    _save(run, step, loss, tokens, t0)
    run.save_pending = run.replaces_finished = False
    return True


def _grow_if_due(run: _Run, step: int, write) -> None:
    """Before ``step``: the dense tail once ``dense_tail_start`` steps are done (it takes precedence
    over LoRA), else lazy LoRA once ``lora_start`` steps are done; each once, recorded and written."""
    cfg = run.cfg
    if step > run.dense_tail_start and not run.densified:
        run.runner, run.dense_opt, (n_layers, n_dense) = _grow(run.runner, run.model, run.dense_opt, cfg, _densify, run.ds_config)
        run.densified = True
        run.metrics.write({"step": step - 1, "event": "dense_tail_start", "dense_layers": n_layers, "dense_params": n_dense})
        write(f"step {step - 1}: dense tail: {n_layers} SLoPe layers replaced by dense nn.Linear (W⊙M), {n_dense:,} weights join AdamW")
    if step > run.lora_start and not run.lora_attached and not run.densified:
        run.runner, run.dense_opt, n_lora = _grow(run.runner, run.model, run.dense_opt, cfg, _add_lora, run.ds_config)
        run.lora_attached = True
        run.metrics.write({"step": step - 1, "event": "lora_start", "lora_rank": cfg.lora_rank, "lora_params": n_lora})
        write(f"step {step - 1}: lazy LoRA attached: rank {cfg.lora_rank}, {n_lora:,} adapter parameters join AdamW")


def _log_step(run: _Run, bar: Progress, step: int, loss: float, lr: float, tokens: int, elapsed: float,
              skipped: bool, grad_norm: float | None) -> None:
    """The metrics record of a logged step and, without a bar, its progress line."""
    record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "elapsed_s": round(elapsed, 3), "grad_norm": grad_norm}
    if run.scaler.enabled:
        record.update(loss_scale=run.scaler.scale, skipped=skipped)
    elif skipped:
        record["skipped"] = True
    run.metrics.write(record)
    if bar.display != "bar":
        bar.write(_step_line(step, run.cfg.max_steps, loss, lr, tokens, elapsed, bar.eta(), run.scaler, skipped))


def _validate(run: _Run, step: int, tokens: int, t0: float, write) -> float:
    """Validation loss after ``step``, recorded and written; returns it."""
    val_loss = evaluate_loss(run.model, run.val_set, run.env.device, run.cfg.precision, across_ranks=run.env.distributed)
    run.metrics.write({"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss), "tokens": tokens,
                       "elapsed_s": round(run.elapsed_before + time.perf_counter() - t0, 3)})
    write(f"step {step}: validation loss {val_loss:.4f} (ppl {perplexity(val_loss):.1f}; unigram baseline {run.unigram:.4f})")
    return val_loss


def _train(cfg: TrainConfig, out: Path, env, stop: GracefulStop, cleanup: ExitStack, fsdp: dict | None, *, progress: bool | None,
           log, plot: bool) -> dict:
    if not env.is_main:
        log, progress, plot = _silent, False, False
    run = _setup(cfg, out, env, cleanup, fsdp, log)
    step, tokens = run.step, run.tokens

    # ---- the loop ------------------------------------------------------------------------------
    if step >= cfg.max_steps:
        log(f"the checkpoint is already at step {step} = --max-steps; raise --max-steps to train further")
        summary = _finished_summary(run, out)
        log(_final_line(summary, cfg.max_steps))
        parallel.destroy_distributed(env)
        return summary
    # A bar on a terminal (or on request); otherwise the step lines below are the progress lines.
    bar = cleanup.enter_context(Progress(cfg.max_steps, "slope train", unit="step", initial=step, interval_s=None, log=log,
                                         display={None: "auto", True: "bar", False: "lines"}[progress]))
    write = bar.write
    run.model.train()
    t0 = time.perf_counter()
    last_stop = cfg.stop_after if cfg.stop_after is not None else cfg.max_steps
    val_loss = stopped_by = None
    loss = float("nan")
    while step < last_stop:
        step += 1
        # Dense tail or lazy LoRA: grow the model once ceil((1-F)·max_steps) steps are done.
        _grow_if_due(run, step, write)

        # Learning rate of this step, on both optimizers.
        lr = lr_at(step, cfg)
        for group in run.dense_opt.param_groups:
            group["lr"] = lr
        if run.sparse_opt is not None:
            run.sparse_opt.lr = lr

        # Forward and backward over the micro-batches, then the update (or a skipped step).
        loss = _forward_backward(run.runner, run.data.train, step, cfg, env, run.scaler, run.ds_config is not None)
        tokens += cfg.grad_accum * cfg.batch_size * cfg.seq_len
        skipped, grad_norm = _update(run.runner, run.dense_opt, run.sparse_opt, run.scaler, loss, cfg, run.ds_config is not None)

        bar.update(1, loss=f"{loss:.3f}", lr=f"{lr:.1e}")

        # Logging, validation, checkpoints.
        elapsed = run.elapsed_before + time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == last_stop or skipped:
            _log_step(run, bar, step, loss, lr, tokens, elapsed, skipped, grad_norm)
        run.guard.record(step, loss, skipped, f"fp16 loss scale {run.scaler.scale:g}, floor {run.scaler.min_scale:g}" if run.scaler.enabled else "")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val_loss = _validate(run, step, tokens, t0, write)
        due = step == last_stop or bool(cfg.save_every and step % cfg.save_every == 0)
        saved = _save_when_good(run, step, due, loss, tokens, t0, write)
        # SIGINT / SIGTERM: end here with a checkpoint (the last step ends the run anyway).
        stopped_by = stop.agreed() if step < last_stop else None  # (a collective under torchrun)
        if stopped_by:
            if not saved:
                _save_when_good(run, step, True, loss, tokens, t0, write)
            break
    bar.close()

    if plot and not stopped_by:
        plot_losses(out / "metrics.jsonl", out / "loss.png", run.unigram)
    elapsed = run.elapsed_before + time.perf_counter() - t0
    summary = {"step": step, "event": "summary", "finished": step >= cfg.max_steps, "final_train_loss": loss, "final_val_loss": val_loss,
               "unigram_loss": run.unigram, "tokens": tokens, "elapsed_s": round(elapsed, 3), "out": str(out), "stopped_by": stopped_by,
               # (DeepSpeed's engine holds its partitions of the dense optimizer state: not counted)
               "memory_per_rank": None if run.ds_config is not None else held_bytes(run.model, run.dense_opt, run.sparse_opt)}
    run.metrics.write(summary)
    log(_final_line(summary, cfg.max_steps))
    parallel.destroy_distributed(env)
    return summary
