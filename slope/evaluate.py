"""Validation loss of a model, and loading a trained checkpoint for ``slope eval`` / ``slope generate``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.checkpoint import Checkpoint, build_model, read_checkpoint
from slope.config import ConfigError, TrainConfig
from slope.data import load_splits, load_tokenizer, perplexity, unigram_cross_entropy, val_batches

__all__ = ["LoadedModel", "autocast", "evaluate_loss", "eval_checkpoint", "generate_text", "load_trained_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches, device: torch.device, precision: str) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``batches`` of ``(x, y)``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(input_ids=x).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


@dataclass
class LoadedModel:
    model: nn.Module
    config: TrainConfig
    checkpoint: Checkpoint
    device: torch.device


def load_trained_model(checkpoint_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the model of a ``slope train`` checkpoint (pruned, adapters if trained) in eval mode."""
    dev = resolve_device(device)
    ckpt = read_checkpoint(checkpoint_dir)
    cfg = ckpt.config
    vocab_size = ckpt.trainer_state["vocab_size"]
    model = build_model(cfg, vocab_size, ckpt.trainer_state["eos_id"], lora=ckpt.lora_attached, dense_tail=ckpt.dense_tail)
    model.load_state_dict(ckpt.model_state)
    return LoadedModel(model.to(dev).eval(), cfg, ckpt, dev)


def eval_checkpoint(checkpoint_dir: str | Path, device: str = "auto", eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity of a checkpoint on its run's held-out split."""
    loaded = load_trained_model(checkpoint_dir, device)
    cfg = loaded.config
    data = load_splits(cfg.dataset, cfg.seq_len, cfg.text_field)
    batches = val_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=eval_batches or cfg.eval_batches)
    loss = evaluate_loss(loaded.model, batches, loaded.device, cfg.precision)
    return {
        "checkpoint": str(checkpoint_dir),
        "step": loaded.checkpoint.step,
        "val_loss": loss,
        "val_ppl": perplexity(loss),
        "val_tokens": sum(y.numel() for _, y in batches),
        "unigram_loss": unigram_cross_entropy(data.train, data.val, data.vocab_size),
    }


@torch.no_grad()
def generate_text(
    checkpoint_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "auto",
) -> str:
    """Continue ``prompt`` with the checkpoint's model (Hugging Face ``generate``); returns the text
    of prompt + continuation. ``temperature=0`` decodes greedily."""
    loaded = load_trained_model(checkpoint_dir, device)
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--prompt is empty; give some text to continue")
    input_ids = torch.tensor([ids], device=loaded.device)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = loaded.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        top_p=None,
        pad_token_id=loaded.checkpoint.trainer_state["eos_id"],
    )
    return tokenizer.decode(out[0].tolist())
