"""Loading the model that ``slope oneshot --model`` names, with its tokenizer.

``--model`` may be

- a Hugging Face model folder (``config.json`` + weights, from ``save_pretrained``): built with the
  class its config names (``architectures``), else ``AutoModelForCausalLM``; its tokenizer is
  loaded when the folder has one;
- a ``slope train`` checkpoint (a folder with ``manifest.json``, or a run folder holding
  ``checkpoint/``): loaded with :func:`slope.evaluate.load_trained_model` in ``dense`` form (plain
  ``nn.Linear`` layers; a sparse run's effective weights ``W⊙M``), with the tokenizer the run was
  trained with (the shipped BPE, or the checkpoint's copy of its ``--tokenizer``);
- a slope ``save_pretrained`` folder (``slope_config.json``): :func:`slope.from_pretrained`, then
  densified.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["DTYPES", "LOAD_PRECISIONS", "load_model", "shipped_tokenizer"]

#: ``precision`` names (SparseML's ``--precision bfloat16`` spelling too) and the short name each stands for.
LOAD_PRECISIONS = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
              "float16": "fp16"}
#: The dtype each ``precision`` name loads a model in (``None``: as saved).
DTYPES = {name: {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[short]
          for name, short in LOAD_PRECISIONS.items()}


def shipped_tokenizer():
    """slope's byte-level BPE (the one ``slope train`` uses) as a ``transformers`` fast tokenizer. It pads
    on the left (:meth:`slope.data.TextTokenizer.to_hf`), so ``model.generate(**tokenizer(prompts,
    padding=True, return_tensors="pt"))`` over prompts of different lengths continues each as alone."""
    from slope.data import open_tokenizer

    return open_tokenizer("").to_hf()


def _hf_model(path: Path, dtype):
    """The folder's model with transformers. A pruned model's folder (``slope_config`` in its config)
    loads as its dense-equivalent model; transformers' load report, which would list every SLoPe
    entry (``values``, ``mask_bits``, adapters) as unexpected, is not shown for it."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or AutoModelForCausalLM
    pruned = getattr(config, "slope_config", None) is not None
    verbosity = hf_logging.get_verbosity()
    if pruned:
        hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
    finally:
        hf_logging.set_verbosity(verbosity)


def _hf_tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path, device: str = "cpu", precision: str = "auto", flag: str = "--model") -> tuple[nn.Module, object | None]:
    """``(model, tokenizer or None)`` for ``path`` (see the module docstring), on ``device`` in ``precision``
    (``auto``: as saved; ``fp32``, ``bf16``, ``fp16``). ``flag``: the option that named it, for errors."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    root = Path(path).expanduser()
    if (root / "manifest.json").is_file() or (root / "checkpoint" / "manifest.json").is_file():
        from slope.data import open_tokenizer
        from slope.evaluate import load_trained_model

        loaded = load_trained_model(root, device="cpu", mode="dense")
        model, tokenizer = loaded.model, open_tokenizer(loaded.checkpoint.tokenizer).to_hf()  # the run's (shipped unless --tokenizer)
    elif (root / "slope_config.json").is_file():
        from slope.io import from_pretrained
        from slope.prune import densify

        model, tokenizer = from_pretrained(root), _hf_tokenizer(root)
        densify(model)
    elif (root / "config.json").is_file():
        model, tokenizer = _hf_model(root, dtype), _hf_tokenizer(root)
    else:
        from slope.serialization.folders import describe_folder, folder_kind

        if folder_kind(root) in ("slope-apply", "checkpoints-only", "peft-adapter"):
            raise FileNotFoundError(f"{flag} {describe_folder(root)}")
        raise FileNotFoundError(
            f"{flag} {path}: not a Hugging Face model folder (config.json), a slope save_pretrained folder "
            "(slope_config.json) or a slope train checkpoint (manifest.json); models are loaded from local folders"
        )
    if dtype is not None:
        model.to(dtype)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer
