"""The optimizer-step loop shared by slope's fine-tuning front doors.

:func:`slope.dynamic.sparse_finetune` (dynamic sparsity, seed 000) and :func:`slope.recovery.finetune`
(recovery after one-shot pruning, seed 002) train a causal LM with :class:`FinetuneLoop`; each
brings its own loss (cross-entropy; task + distillation) and its own after-step work (mask updates;
keeping zeros zero). Per optimizer step ``s`` (0-based, ``total_steps`` in all)::

    lr = lr_at(s, ...)                                   linear / cosine / constant (+ warmup)
    accum × { global micro-batch(seed, s, micro) → this rank's rows → loss_fn (autocast) → backward }
    before_update()                                      e.g. mask the gradients of sharded weights
    unscale (fp16; overflow → step skipped) → clip the joint (sparse + dense) norm
    sparse_opt.step(); dense_opt.step(); zero both
    after_step(s, skipped)                               returns event records (mask updates, ...)

Under ``torchrun`` (``forward_model`` a :func:`slope.parallel.wrap_ddp` wrapper, or a model sharded
by :func:`slope.parallel.wrap_fsdp2`) every rank reads the same global micro-batch and keeps its
slice (:func:`slope.parallel.rank_slice`), so N ranks × batch b/N take the step of one process ×
batch b; gradients are reduced on the last micro-batch only.
The micro-batch of a step is a pure function of ``(seed, step, micro)``, and the learning rate of
``step``, so a run resumed from its checkpoint (:mod:`slope.finetune_checkpoints`) continues exactly;
a run asked to stop between two steps (SIGINT / SIGTERM: :func:`slope.finetune_run.run_resumable`)
saves one there.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LR_SCHEDULES", "FinetuneLoop", "LoopSettings", "cross_entropy_loss", "enable_activation_checkpointing", "lr_at", "plot_run"]

#: ``lr_scheduler_type`` values (the names of ``transformers.TrainingArguments``).
LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def lr_at(step: int, lr: float, warmup: int, total: int, kind: str = "linear") -> float:
    """Learning rate of 0-based step ``step``: linear warmup over ``warmup`` steps (not for
    ``"constant"``), then ``kind``: linear decay to 0, cosine decay to 0, or constant."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if kind == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "linear":
        return lr * max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> bool:
    """Activation checkpointing of an HF model's layers, non-reentrant by default; returns whether
    it applies (``False``, nothing done, for a model without support). ``activation_checkpointing_enable``
    is the name since transformers 5.2x, the older ``gradient_checkpointing_enable`` (deprecated
    there) before."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return True


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: ARG001
    """Next-token cross-entropy (fp32) of ``model`` on ``x, y (b, L)`` int64; no extra parts."""
    logits = model(input_ids=x, use_cache=False).logits  # training keeps no KV cache
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}


@dataclass
class LoopSettings:
    """How :class:`FinetuneLoop` steps (validated by the front doors).

    ``max_grad_norm``: ``None`` or 0 = no clipping. ``eval_steps``: validate every K steps (and
    at the end). ``progress``: True a tqdm bar, False none, ``None`` a bar on a terminal and plain
    lines with rate and ETA otherwise (:mod:`slope.progress`). ``desc``: the progress label.
    """

    learning_rate: float
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    gradient_accumulation_steps: int = 1
    precision: str = "fp32"
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    progress: bool | None = None
    desc: str = "finetune"


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


class FinetuneLoop:
    """Trains ``model`` for ``total_steps`` optimizer steps (module docstring).

    Args:
        model: the (unwrapped or FSDP2-sharded) model; ``forward_model``: what runs the forward (a
            DDP wrapper of ``model`` under ``torchrun``; default ``model``).
        data: a :class:`slope.dynamic.data.FinetuneData` (``batch(step, micro, accum)`` gives the
            global micro-batch ``(x, y)``; ``val``: validation batches).
        dense_opt / sparse_opt: the dense optimizer (its param groups get the LR) and
            :class:`slope.optimizers.ADAMWSparse` for SLoPe layers, or ``None``.
        scaler: a :class:`slope.train.LossScaler` (fp16) or a disabled one.
        loss_fn: ``(forward_model, x, y, step) -> (loss, {name: float})`` (default: cross-entropy).
        before_update: ``() -> None``, called after the backward passes of every step, before
            unscaling and clipping.
        after_step: ``(step, skipped) -> [records]``, called after every optimizer step.
        status: ``() -> {name: value}`` added to log records and the progress bar (e.g. sparsity).
    """

    def __init__(self, model: nn.Module, data, dense_opt: torch.optim.Optimizer, sparse_opt, scaler, device: torch.device,
                 total_steps: int, settings: LoopSettings, *, loss_fn: LossFn = cross_entropy_loss,
                 after_step: Callable[[int, bool], list[dict]] | None = None, status: Callable[[], dict] | None = None,
                 forward_model: nn.Module | None = None, before_update: Callable[[], None] | None = None):
        self.model, self.data, self.dense_opt, self.sparse_opt = model, data, dense_opt, sparse_opt
        self.scaler, self.device, self.total_steps, self.settings = scaler, device, total_steps, settings
        self.loss_fn, self.after_step = loss_fn, after_step or (lambda step, skipped: [])
        self.status = status or dict
        self.forward_model = forward_model if forward_model is not None else model
        self.before_update = before_update or (lambda: None)
        from slope.parallel import is_data_parallel

        self.data_parallel = is_data_parallel(self.forward_model)
        self.last_lr = 0.0

    # ------------------------------------------------------------------ one optimizer step
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if self.data_parallel:
            from slope.parallel import rank_slice

            t = rank_slice(t)
        return t.to(self.device)

    def train_step(self, step: int) -> tuple[float, dict[str, float], bool]:
        """Forward/backward over the micro-batches of ``step``, then the optimizer steps; returns
        ``(mean loss, mean loss parts, skipped)`` (skipped: an fp16 overflow)."""
        from slope.evaluate import autocast
        from slope.parallel import no_sync

        s = self.settings
        lr = lr_at(step, s.learning_rate, s.warmup_steps, self.total_steps, s.lr_scheduler_type)
        for group in self.dense_opt.param_groups:
            group["lr"] = lr
        if self.sparse_opt is not None:
            self.sparse_opt.lr = lr
        accum, loss, parts = s.gradient_accumulation_steps, 0.0, {}
        for micro in range(accum):
            x, y = (self._rows(t) for t in self.data.batch(step, micro, accum))
            sync = contextlib.nullcontext() if micro == accum - 1 else no_sync(self.forward_model)
            with sync:
                with autocast(self.device, s.precision):
                    micro_loss, micro_parts = self.loss_fn(self.forward_model, x, y, step)
                micro_loss = micro_loss / accum
                (micro_loss * self.scaler.scale).backward()
            loss += micro_loss.item()
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + value / accum
        self.before_update()
        dense_params = [p for group in self.dense_opt.param_groups for p in group["params"]]
        skipped = self.scaler.unscale_(dense_params, self.sparse_opt)
        if not skipped:
            max_norm = s.max_grad_norm or math.inf
            if self.sparse_opt is not None:
                self.sparse_opt.clip_grad_norm(max_norm, dense_parameters=dense_params)
                self.sparse_opt.step()
            else:
                torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
            self.dense_opt.step()
        self.scaler.update(skipped)
        self.dense_opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad()
        self.last_lr = lr
        return loss, parts, skipped

    # ------------------------------------------------------------------ the run
    def run(self, out: Path | None = None, *, start_step: int = 0, records: list[dict] | None = None,
            save: Callable[[int, list[dict]], None] | None = None, save_steps: int | None = None,
            main_process: bool = True, stop: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """Train steps ``start_step … total_steps - 1``; log to ``out/metrics.jsonl`` (main process);
        ``save(done, records)`` after every ``save_steps`` steps. ``records``: those of the run so
        far (resuming). ``stop()``: called after every step but the last (on every rank: it may be a
        collective, :meth:`slope.interrupt.GracefulStop.agreed`); a name (a signal's) ends the run there,
        after ``save(done, records)`` unless that step saved anyway. Returns the summary (``records``
        included; ``stopped_by``: that name or ``None``, ``stopped_at``: the steps done when stopped)."""
        from slope.evaluate import evaluate_loss
        from slope.parallel import get_world_size, mean_over_ranks
        from slope.progress import Progress, display_for

        s, records = self.settings, list(records or [])
        log = (out / "metrics.jsonl").open("w") if out is not None and main_process else None
        if log is not None:
            for record in records:
                log.write(json.dumps(record) + "\n")

        def write(record):
            records.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        def validate(step):  # each rank evaluates its share of the batches
            loss = evaluate_loss(self.model, self.data.val, self.device, s.precision, across_ranks=get_world_size() > 1)
            write({"step": step, "val_loss": loss, **self.status()})

        if start_step == 0:
            validate(0)
        display = display_for(s.progress) if main_process else "off"
        bar = Progress(self.total_steps, s.desc, unit="step", initial=start_step, display=display)
        t0, loss, stopped_by = time.perf_counter(), float("nan"), None
        shown = {}  # the status on the bar: refreshed on logged steps only (it may read the device)
        self.model.train()
        for step in range(start_step, self.total_steps):
            loss, parts, skipped = self.train_step(step)
            for event in self.after_step(step, skipped):
                write(event)
            done = step + 1
            if done % s.logging_steps == 0 or done == self.total_steps or skipped:
                loss = mean_over_ranks(loss)
                status = self.status()
                shown = {k: f"{v:.3f}" for k, v in status.items() if isinstance(v, float)}
                write({"step": done, "loss": loss, **{k: mean_over_ranks(v) for k, v in parts.items()}, "lr": self.last_lr,
                       **status, "skipped": skipped})
            if (s.eval_steps and done % s.eval_steps == 0) or done == self.total_steps:
                validate(done)
            saved = save is not None and bool(save_steps) and done % save_steps == 0
            if saved:
                save(done, records)
            bar.update(1, loss=f"{loss:.3f}", **shown)
            stopped_by = stop() if stop is not None and done < self.total_steps else None
            if stopped_by:
                if save is not None and not saved:
                    save(done, records)
                break
        bar.close()
        if log is not None:
            log.close()
        vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        return {"steps": self.total_steps, "initial_val_loss": vals[0][1], "final_val_loss": vals[-1][1], "val_curve": vals,
                "final_train_loss": loss, "elapsed_s": round(time.perf_counter() - t0, 3), "records": records,
                "stopped_by": stopped_by, "stopped_at": done if stopped_by else None}


def plot_run(records: list[dict], png: Path, title: str) -> None:
    """``loss.png``: training loss and validation loss against step, mask updates marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    updates = sorted({r["step"] for r in records if r.get("event") == "mask_update" and r["step"] > 0})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    for i, step in enumerate(updates):
        ax.axvline(step, color="gray", ls=":", lw=0.8, label="mask update" if i == 0 else None)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
