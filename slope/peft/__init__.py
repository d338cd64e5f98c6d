"""Sparse-increment fine-tuning of frozen models (DESIGN §8.4): SIFT and PEFT-SFT / SpIEL.

Ports of the two seeds change only their imports::

    from slope.peft import SIFT                                   # SIFT (Song et al. 2023)
    from slope.peft import (get_peft_config, get_peft_model,      # PEFT-SFT (Ansell et al. 2024)
                            SftConfig, TaskType,
                            SftTrainer, SftAdamW, SftSM3, SftSelector)

Both train a small sparse delta (indices + values) per target weight; gradients and optimizer state
exist only for the delta's entries. See docs/peft.md.

peft's LoRA on a pruned (2:4) model: ``get_peft_model(model, peft.LoraConfig(...))`` from here makes
SLoPe layers valid targets, ``load_peft_model`` loads such adapters (:mod:`slope.peft.peft_lora`).
"""
from slope.peft.config import SftConfig, TaskType, get_peft_config
from slope.peft.delta import SftLinear, SparseDelta
from slope.peft.model import SftModel, get_peft_model
from slope.peft.optim import SftAdamW, SftSM3
from slope.peft.parallel import shard_sft_model
from slope.peft.selection import DeltaSet, SftReselection
from slope.peft.selector import SftSelector
from slope.peft.sift import SIFT
from slope.peft.sift_io import load_sift

__all__ = [
    "DeltaSet",
    "SIFT",
    "SftAdamW",
    "SftConfig",
    "SftLinear",
    "SftModel",
    "SftReselection",
    "SftSM3",
    "SftSelector",
    "SftTrainer",
    "SparseDelta",
    "TaskType",
    "get_peft_config",
    "get_peft_model",
    "load_peft_model",
    "load_sift",
    "shard_sft_model",
    "sparse_lora_config",
]


def __getattr__(name):
    # Imported lazily: the Trainer subclass pulls in transformers' Trainer (and accelerate), the LoRA
    # interop the peft package (an optional dependency).
    if name == "SftTrainer":
        from slope.peft.trainer import SftTrainer

        return SftTrainer
    if name in ("load_peft_model", "sparse_lora_config"):
        from slope.peft import peft_lora

        return getattr(peft_lora, name)
    raise AttributeError(f"module 'slope.peft' has no attribute {name!r}")
