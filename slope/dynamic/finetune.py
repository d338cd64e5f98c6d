"""``sparse_finetune``: seed 000's one call — dynamic sparse fine-tuning of a causal LM.

Per optimizer step ``s`` (0-based, ``total_steps`` in all)::

    lr = linear warmup over warmup_steps, then linear decay to 0
    gradient_accumulation_steps × { micro-batch(seed, s, micro) → forward (autocast) → backward }
    unscale (fp16; overflow → step skipped) → clip the joint norm → sparse_opt.step(); opt.step()
    sparsifier.step(...)          keeps pruned entries zero; RigL / gradual pruning when due

On RigL update steps the backward also keeps the dense weight gradients (see
:class:`slope.dynamic.DynamicSparsity`). ``output_dir`` receives the fine-tuned model as a plain
Hugging Face folder (pruned entries are exact zeros; N:M models are exported with
:func:`slope.export_dense`), its tokenizer, ``metrics.jsonl``, ``summary.json``, ``loss.png`` and
``dynamic_sparsity.pt`` (masks and mask-update history).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.dynamic.data import FinetuneData, load_finetune_data, resolve_tokenizer
from slope.dynamic.sparsifier import DynamicSparsity, DynamicSparsityConfig
from slope.sparsity import SparseLayerMasks

__all__ = ["sparse_finetune", "FinetuneArgs"]

#: ``**kw`` that :func:`sparse_finetune` accepts, with their defaults.
EXTRA_DEFAULTS: dict[str, Any] = {
    "max_steps": None, "tokenizer": None, "seed": 0, "max_seq_length": 256, "eval_batches": 8, "eval_steps": None,
    "logging_steps": 10, "max_grad_norm": 1.0, "weight_decay": 0.0, "text_field": "text", "device": "auto",
    "targets": None, "skip": None, "compress": None, "double_pruning": None, "progress": None,
}


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
        def positive_int(name, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        positive_int("batch_size", self.batch_size)
        positive_int("num_epochs", self.num_epochs)
        positive_int("warmup_steps", self.warmup_steps, 0)
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        positive_int("max_seq_length", self.extra["max_seq_length"], 2)
        positive_int("eval_batches", self.extra["eval_batches"])
        positive_int("logging_steps", self.extra["logging_steps"])
        if self.extra["max_steps"] is not None:
            positive_int("max_steps", self.extra["max_steps"])
        if self.extra["eval_steps"] is not None:
            positive_int("eval_steps", self.extra["eval_steps"])
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are exclusive; choose one (or neither for fp32)")
        if self.use_topk_attention and not (isinstance(self.topk_ratio, (int, float)) and 0 < self.topk_ratio <= 1):
            raise ValueError(f"topk_ratio must be in (0, 1] (the fraction of keys each query attends to), got {self.topk_ratio!r}")
        return self

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


# ---------------------------------------------------------------------- model and optimizers
def load_model(model_name, device: torch.device) -> nn.Module:
    """A causal LM from an ``nn.Module``, a Hugging Face folder (or hub name), or a ``slope train``
    run / checkpoint directory (loaded as trained: dense, or with its SLoPe layers)."""
    if isinstance(model_name, nn.Module):
        return model_name.to(device)
    if not isinstance(model_name, (str, Path)):
        raise TypeError(f"model_name must be a model, a Hugging Face folder or a slope train run directory, got {type(model_name).__name__}")
    path = Path(model_name)
    if (path / "manifest.json").exists() or (path / "checkpoint" / "manifest.json").exists():
        from slope.evaluate import load_trained_model

        return load_trained_model(path, str(device)).model.train()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_name), dtype=torch.float32).to(device)


def _optimizers(model: nn.Module, sparsifier: DynamicSparsity, lr: float, weight_decay: float):
    """AdamW over the trainable parameters (matrices decay, vectors do not) and, for N:M, ADAMWSparse."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    sparse = None
    if isinstance(sparsifier.masked, SparseLayerMasks):  # N:M on SLoPe layers
        from slope.optimizers import ADAMWSparse

        sparse = ADAMWSparse(model, lr=lr, weight_decay=weight_decay)
    return dense, sparse


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based step ``step``: linear warmup over ``warmup`` steps, then linear decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# ---------------------------------------------------------------------- one optimizer step
def _train_step(ctx: "_Run", step: int) -> tuple[float, bool]:
    """Forward/backward over the micro-batches of ``step``, then the optimizer steps; returns
    ``(mean loss, skipped)`` (skipped: an fp16 overflow)."""
    from slope.evaluate import autocast

    args, model = ctx.args, ctx.model
    lr = lr_at(step, args.learning_rate, args.warmup_steps, ctx.total_steps)
    for group in ctx.dense_opt.param_groups:
        group["lr"] = lr
    if ctx.sparse_opt is not None:
        ctx.sparse_opt.lr = lr
    accum, loss = args.gradient_accumulation_steps, 0.0
    for micro in range(accum):
        x, y = (t.to(ctx.device) for t in ctx.data.batch(step, micro, accum))
        with autocast(ctx.device, args.precision):
            logits = model(input_ids=x).logits
        micro_loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
        (micro_loss * ctx.scaler.scale).backward()
        loss += micro_loss.item()
    dense_params = [p for group in ctx.dense_opt.param_groups for p in group["params"]]
    skipped = ctx.scaler.unscale_(dense_params, ctx.sparse_opt)
    if not skipped:
        max_norm = args.extra["max_grad_norm"] or math.inf
        if ctx.sparse_opt is not None:
            ctx.sparse_opt.clip_grad_norm(max_norm, dense_parameters=dense_params)
            ctx.sparse_opt.step()
        else:
            torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
        ctx.dense_opt.step()
    ctx.scaler.update(skipped)
    ctx.dense_opt.zero_grad(set_to_none=True)
    if ctx.sparse_opt is not None:
        ctx.sparse_opt.zero_grad()
    ctx.last_lr = lr
    return loss, skipped


@dataclass
class _Run:
    """Everything one fine-tuning run holds."""

    args: FinetuneArgs
    model: nn.Module
    sparsifier: DynamicSparsity
    data: FinetuneData
    dense_opt: torch.optim.Optimizer
    sparse_opt: torch.optim.Optimizer | None
    scaler: Any
    device: torch.device
    total_steps: int
    last_lr: float = 0.0


def _loop(ctx: _Run, out: Path | None) -> dict[str, Any]:
    """Train all steps; log metrics (to ``out/metrics.jsonl`` when given); returns the summary."""
    from slope.evaluate import evaluate_loss

    args, sparsifier, records = ctx.args, ctx.sparsifier, []
    log = (out / "metrics.jsonl").open("w") if out is not None else None

    def write(record):
        records.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    for event in sparsifier.history:
        write({"event": "mask_update", **event})
    from slope.progress import Progress, display_for

    bar = Progress(ctx.total_steps, "sparse-finetune", unit="step", display=display_for(args.extra["progress"]))
    initial_val = evaluate_loss(ctx.model, ctx.data.val, ctx.device, args.precision)
    write({"step": 0, "val_loss": initial_val, "sparsity": sparsifier.sparsity})
    t0, eval_steps, loss = time.perf_counter(), args.extra["eval_steps"], float("nan")
    ctx.model.train()
    for step in range(ctx.total_steps):
        loss, skipped = _train_step(ctx, step)
        for event in sparsifier.step(ctx.sparse_opt or ctx.dense_opt, skipped=skipped):
            write({"event": "mask_update", **event})
        done = step + 1
        if done % args.extra["logging_steps"] == 0 or done == ctx.total_steps or skipped:
            write({"step": done, "loss": loss, "lr": ctx.last_lr, "sparsity": sparsifier.sparsity, "skipped": skipped})
        if (eval_steps and done % eval_steps == 0) or done == ctx.total_steps:
            write({"step": done, "val_loss": evaluate_loss(ctx.model, ctx.data.val, ctx.device, args.precision),
                   "sparsity": sparsifier.sparsity})
        bar.update(1, loss=f"{loss:.3f}", sparsity=f"{sparsifier.sparsity:.3f}")
    bar.close()
    if log is not None:
        log.close()
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"steps": ctx.total_steps, "initial_val_loss": initial_val, "final_val_loss": vals[-1][1], "val_curve": vals, "final_train_loss": loss,
            "final_sparsity": sparsifier.sparsity, "mask_updates": sum(1 for r in records if r.get("event") == "mask_update"),
            "elapsed_s": round(time.perf_counter() - t0, 3), "records": records}


# ---------------------------------------------------------------------- outputs
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


def _save(ctx: _Run, tokenizer, out: Path, summary: dict[str, Any]) -> None:
    """The HF folder (plain transformers; zeros where pruned), tokenizer, masks, summary and plot."""
    from slope.registry import sparse_modules

    if any(True for _ in sparse_modules(ctx.model)):
        from slope.io import export_dense

        export_dense(ctx.model, out)
    else:
        ctx.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.save(ctx.sparsifier.state_dict(), out / "dynamic_sparsity.pt")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2) + "\n")
    kind = ctx.sparsifier.config.sparsity_type + (" RigL" if ctx.sparsifier.config.use_rigl else "")
    plot_run(summary["records"], out / "loss.png", f"sparse fine-tuning ({kind})")


# ---------------------------------------------------------------------- the one call
def sparse_finetune(model_name, dataset, sparsity_ratio: float = 0.5, sparsity_type: str = "unstructured",
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
    default: a bar on a terminal, plain lines with rate and ETA otherwise: :mod:`slope.progress`).

    The returned model keeps its sparse form: unstructured masks as zeros in ``nn.Linear`` weights,
    N:M as :class:`slope.SparseLinear` layers (2:4: accelerable). Its ``dynamic_sparsity`` attribute
    is the :class:`DynamicSparsity` (masks, history) and ``finetune_summary`` the run's summary.
    """
    from slope.evaluate import resolve_device
    from slope.train import LossScaler

    unknown = sorted(set(kw) - set(EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"sparse_finetune got unknown keyword arguments {unknown}; accepted extras: {sorted(EXTRA_DEFAULTS)}")
    extra = {**EXTRA_DEFAULTS, **kw}
    args = FinetuneArgs(learning_rate, batch_size, num_epochs, warmup_steps, gradient_accumulation_steps, fp16, bf16,
                        gradient_checkpointing, use_topk_attention, topk_ratio, extra).validate()
    config = DynamicSparsityConfig(sparsity_ratio, sparsity_type, mask_update_interval, mask_update_fraction, use_rigl,
                                   sparsity_schedule, pruning_method, extra["targets"], extra["skip"], extra["compress"],
                                   extra["double_pruning"]).validate()
    device = resolve_device(extra["device"])
    random.seed(extra["seed"])
    np.random.seed(extra["seed"])
    torch.manual_seed(extra["seed"])
    model = load_model(model_name, device)
    tokenizer = resolve_tokenizer(extra["tokenizer"], model_name)
    data = load_finetune_data(dataset, tokenizer, seq_len=extra["max_seq_length"], batch_size=batch_size, seed=extra["seed"],
                              eval_batches=extra["eval_batches"], vocab_size=model.get_input_embeddings().num_embeddings,
                              text_field=extra["text_field"])
    total = extra["max_steps"] or num_epochs * math.ceil(data.micro_batches_per_epoch / gradient_accumulation_steps)
    sparsifier = DynamicSparsity(model, total, config)
    model.to(device)
    if use_topk_attention:
        from slope.dynamic.attention import enable_topk_attention

        enable_topk_attention(model, topk_ratio)
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dense_opt, sparse_opt = _optimizers(model, sparsifier, learning_rate, extra["weight_decay"])
    ctx = _Run(args, model, sparsifier, data, dense_opt, sparse_opt, LossScaler(fp16), device, total)
    out = None if output_dir is None else Path(output_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    summary = _loop(ctx, out)
    summary["config"] = {**sparsifier.config_dict(), "learning_rate": learning_rate, "batch_size": batch_size,
                         "num_epochs": num_epochs, "warmup_steps": warmup_steps,
                         "gradient_accumulation_steps": gradient_accumulation_steps, "precision": args.precision,
                         "gradient_checkpointing": gradient_checkpointing, "use_topk_attention": use_topk_attention,
                         "topk_ratio": topk_ratio, **{k: v for k, v in extra.items() if k != "tokenizer"}}
    if out is not None:
        _save(ctx, tokenizer, out, summary)
    if hasattr(sparsifier.masked, "remove_hooks"):
        sparsifier.masked.remove_hooks()
    model.dynamic_sparsity, model.finetune_summary = sparsifier, {k: v for k, v in summary.items() if k != "records"}
    return model.eval()
