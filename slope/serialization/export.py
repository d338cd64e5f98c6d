"""``slope export``: a checkpoint → a Hugging Face folder (model, config, generation config, tokenizer).

Forms (``--form``):

- ``dense``: every SLoPe layer an ``nn.Linear`` holding its effective weight ``W⊙M + (α/r)·B(A⊙M_A)``
  (:func:`slope.evaluate.load_trained_model` in ``dense`` mode); an ordinary model that needs no
  slope: ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``.
- ``sparse``: the model as trained, in slope's Hugging Face format (:func:`slope.save_pretrained`):
  ``slope.from_pretrained(DIR)`` gives the sparse model (masks, adapters), and plain transformers
  still loads the dense-equivalent model from the same folder.
- ``merged``: the inference form (adapters merged into one sparse operand per layer, training
  state dropped: :func:`slope.lora.freeze_for_inference`), same format as ``sparse``.

The source is a ``slope train`` checkpoint (or its run directory) or a pruned model's Hugging Face
folder (:func:`slope.from_pretrained`). The tokenizer: the one the run trained with (its
``--tokenizer``, from the checkpoint's copy, or else the embedded corpus's byte-level BPE, as a
fast tokenizer with ``<|endoftext|>`` as its BOS/EOS/PAD), or the one in the source folder.
``config.json`` records the export in a ``slope_export`` entry: form, source, step and, for a
``slope train`` source, the run's ``validation`` settings, so that ``slope eval`` on the folder
validates on the run's held-out split (:func:`validation_record`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

__all__ = ["FORMS", "ExportResult", "drop_export_record", "export_model", "validation_record"]

FORMS = ("dense", "sparse", "merged")
_TRAIN_MODE = {"dense": "dense", "sparse": "unmerged", "merged": "merged"}


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: the folder, the form, the source and its step (``None`` for a
    Hugging Face source), and a note when the form fell back (merged without adapters)."""

    output_dir: str
    form: str
    source: str
    step: int | None
    note: str | None = None


def _from_train_checkpoint(source: str, form: str):
    from slope.checkpoint import CheckpointError
    from slope.evaluate import model_from_checkpoint, open_checkpoint

    checkpoint = open_checkpoint(source)
    if form != "dense" and (checkpoint.config.dense or checkpoint.dense_tail):  # before loading (its advice is eval's)
        raise CheckpointError(
            f"{checkpoint.path} is a dense checkpoint (--dense, or its dense tail was reached): it has no "
            f"{form} form; export it with --form dense"
        )
    loaded = model_from_checkpoint(checkpoint, _TRAIN_MODE[form], "cpu")
    from slope.data import open_tokenizer

    # the run's --tokenizer (the checkpoint's copy), or the shipped BPE: EOS as BOS/EOS/PAD
    tokenizer = open_tokenizer(loaded.checkpoint.tokenizer).to_hf(loaded.config.seq_len)
    return loaded.model, tokenizer, str(loaded.checkpoint.path), loaded.checkpoint.step, loaded.note, validation_record(loaded.config)


def drop_export_record(model: nn.Module) -> None:
    """Forget that ``model`` was loaded from a ``slope export`` folder (its config's ``slope_export``
    entry): what oneshot and fine-tuning write from it is a model of its own, not that export."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "slope_export"):
        del config.slope_export


def validation_record(cfg) -> dict:
    """What ``slope eval`` needs to validate an export of a ``slope train`` run on that run's
    held-out split (:func:`slope.inference.folder.eval_model_folder`): its data and batch settings."""
    from slope.config import absolute_if_local

    return {"dataset": absolute_if_local(cfg.dataset), "seq_len": cfg.seq_len, "text_field": cfg.text_field, "batch_size": cfg.batch_size,
            "eval_batches": cfg.eval_batches, "precision": cfg.precision}


def _from_pretrained_folder(source: str, form: str):
    from slope.checkpoint import CheckpointError
    from slope.io import from_pretrained
    from slope.lora import MergedSparseLinear, freeze_for_inference
    from slope.prune import densify

    try:
        model = from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from e
    earlier = getattr(model.config, "slope_export", None)  # an export exported again: its run's step and validation carry over
    earlier = earlier if isinstance(earlier, dict) else {}
    validation, step = earlier.get("validation"), earlier.get("step")
    note = None
    if form == "sparse" and any(isinstance(layer, MergedSparseLinear) for _, layer in _sparse(model)):
        raise CheckpointError(f"{source} holds the merged form (adapters folded in, inference-only), which cannot become the "
                              "sparse (training) form again: export it with --form merged or --form dense, or export the "
                              "slope train checkpoint with --form sparse")
    if form == "dense":
        densify(model)
    elif form == "merged":
        if not any(layer.lora_rank for _, layer in _sparse(model)):
            note = "the model has no LoRA adapters: the merged form is the inference-only sparse model without adapters"
        freeze_for_inference(model)
    tokenizer = None
    if any(Path(source, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer, source, step, note, validation


def _is_checkpoint_name(name: str) -> bool:
    """A folder a run keeps checkpoints in (:mod:`slope.checkpoint_store`): ``checkpoint``, ``checkpoint.tmp``,
    ``checkpoint.old``, ``checkpoint-stepN``."""
    return name == "checkpoint" or name.startswith(("checkpoint.", "checkpoint-step"))


def _run_checkpoint_holding(source: str, output_dir: str) -> Path | None:
    """The checkpoint folder of the ``slope train`` checkpoint ``source`` (or of its run) that ``output_dir``
    lies inside, else ``None``: the source checkpoint itself, or, for a checkpoint of a run folder, any
    folder that run keeps checkpoints in (``slope train --resume`` replaces and rotates them)."""
    src = Path(source).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    checkpoint = src if (src / "manifest.json").is_file() else src / "checkpoint"
    if out.is_relative_to(checkpoint):
        return checkpoint
    run = checkpoint.parent
    if not _is_checkpoint_name(checkpoint.name) or out == run or not out.is_relative_to(run):
        return None
    top = run / out.relative_to(run).parts[0]
    return top if _is_checkpoint_name(top.name) else None


def _sparse(model: nn.Module):
    from slope.registry import sparse_modules

    return sparse_modules(model)


def export_model(source: str | os.PathLike, output_dir: str | os.PathLike, form: str = "dense") -> ExportResult:
    """Write ``source`` (a ``slope train`` checkpoint or a pruned model's folder) to ``output_dir`` as a
    Hugging Face folder in ``form`` (module docstring). Errors (:class:`slope.checkpoint.CheckpointError`)
    say what a source of another kind is and how to load it; an ``output_dir`` that holds files is refused
    (:class:`slope.serialization.folders.OutputDirError`) before anything loads."""
    from slope.checkpoint import CheckpointError
    from slope.io import save_pretrained
    from slope.serialization.folders import check_new_output_dir, describe_folder, folder_kind

    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; choose one of {', '.join(FORMS)}")
    source, output_dir = os.fspath(source), os.fspath(output_dir)
    kind = folder_kind(source)
    if kind == "missing":
        raise CheckpointError(f"no checkpoint at {source}; pass a `slope train` checkpoint (RUN/checkpoint) or its run directory")
    if os.path.abspath(source) == os.path.abspath(output_dir):
        raise CheckpointError(f"--output-dir {output_dir} is the checkpoint itself; pick another folder")
    replaced = _run_checkpoint_holding(source, output_dir) if kind == "slope-train" else None
    if replaced is not None:
        raise CheckpointError(f"--output-dir {output_dir} is inside the checkpoint folder {replaced}, which `slope train` "
                              "replaces or removes at its next save (deleting the export); pick a folder outside it")
    check_new_output_dir(output_dir, advice="choose a new folder for this export (one form per folder) or remove it")
    if kind == "slope-train":
        model, tokenizer, where, step, note, validation = _from_train_checkpoint(source, form)
    elif kind in ("slope-pretrained", "slope-pretrained-v1"):
        model, tokenizer, where, step, note, validation = _from_pretrained_folder(source, form)
    else:
        raise CheckpointError(f"cannot export: {describe_folder(source, kind)}")
    model.config.slope_export = {"form": form, "source": where, "step": step,
                                 **({"validation": validation} if validation is not None else {})}
    try:
        if any(True for _ in _sparse(model)):
            save_pretrained(model, output_dir)
        else:
            model.save_pretrained(output_dir)
    finally:
        del model.config.slope_export
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return ExportResult(output_dir, form, where, step, note)
