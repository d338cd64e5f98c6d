"""What slope's fine-tuning front doors do alike around :class:`slope.finetune_loop.FinetuneLoop`.

:func:`slope.dynamic.sparse_finetune` and :func:`slope.recovery.finetune` (and their commands
``slope sparse-finetune`` / ``slope finetune``) differ in their models, losses and after-step work;
they share, from here:

- argument checks (:func:`check_int`, :func:`check_positive`, :func:`precision_mode`), and the
  output folder's (:func:`check_output_dir`: new or empty, unless the run there is resumed);
- the seeding of Python, NumPy and torch (:func:`seed_everything`);
- the optimizers: AdamW over the trainable parameters (matrices decay, vectors do not) and, for
  SLoPe layers, :class:`slope.optimizers.ADAMWSparse` (:func:`build_optimizers`);
- the run: resume from a ``checkpoint-<step>/`` folder when asked, train, save every
  ``save_steps`` keeping the newest ``save_total_limit`` (:func:`check_save_total_limit`), stop with a
  checkpoint on SIGINT / SIGTERM (:func:`run_resumable`; a warmup as long as the run is warned of);
- the outputs: the plain Hugging Face folder (zeros where pruned), tokenizer, ``summary.json`` and
  ``loss.png`` (:func:`output_folder`, :func:`plain_config`, :func:`save_model_folder`);
- the commands' flags, one-line errors and closing line, or the line of a stopped run saying how
  to continue it (:func:`command_options`, :func:`run_command`, :func:`stopped_line`).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slope.finetune_checkpoints import LoopCheckpoints, checkpoint_steps, resolve_checkpoint
from slope.finetune_loop import FinetuneLoop, plot_run
from slope.serialization.folders import check_new_output_dir
from slope.serialization.jsonfile import read_json_object

__all__ = ["build_optimizers", "check_int", "check_output_dir", "check_positions", "check_positive", "check_save_options",
           "check_save_total_limit", "command_options", "dataset_name", "ddp_forward_model", "interrupted_advice",
           "output_folder", "plain_config", "precision_mode", "rank_memory", "run_command", "run_resumable", "save_model_folder",
           "save_total_limit_text", "seed_everything", "stopped_line"]


# ---------------------------------------------------------------------- settings
def check_int(name: str, value, minimum: int = 1) -> None:
    """A ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_positive(name: str, value) -> None:
    """A ``ValueError`` unless ``value`` is a number (not a bool) > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_save_total_limit(value) -> None:
    """A one-line ``ValueError`` unless ``value`` is ``None`` (keep every checkpoint) or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"save_total_limit (--save-total-limit) must be an int >= 1, the number of newest checkpoint-<step> "
                         f"folders kept, or None to keep them all; got {value!r}")


def precision_mode(fp16: bool, bf16: bool) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` (a ``ValueError`` for both flags)."""
    if fp16 and bf16:
        raise ValueError("fp16 and bf16 are exclusive; choose one (or neither for fp32)")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _resumes_in(out: Path, resume_from) -> bool:
    """Whether ``resume_from`` (``True``: the newest checkpoint in ``out``; a path) continues a run in ``out``."""
    if resume_from is True:
        return True
    source = Path(resume_from).expanduser().resolve()
    return out.resolve() in (source, source.parent)


def check_save_options(output_dir, save_steps: int | None = None, save_total_limit: int | None = None) -> None:
    """A one-line ``ValueError`` when ``save_steps`` or ``save_total_limit`` is given without ``output_dir``
    (there is nowhere to write, or rotate, ``checkpoint-<step>`` folders)."""
    if output_dir is not None:
        return
    for name, value, does in (("save_steps", save_steps, "writes checkpoint-<step> folders into"),
                              ("save_total_limit", save_total_limit, "keeps the newest checkpoint-<step> folders of")):
        if value is not None:
            raise ValueError(f"{name}={value} {does} output_dir: give output_dir (--output-dir), or leave {name} out")


def check_output_dir(output_dir, resume_from=None, save_steps: int | None = None, save_total_limit: int | None = None) -> None:
    """Before any work: ``output_dir`` must be new or empty (one-line
    :class:`slope.serialization.folders.OutputDirError`), unless ``resume_from`` continues the run
    there. A folder holding an unfinished run (``checkpoint-<step>/`` without ``summary.json``) is
    refused with the advice to resume it; a ``resume_from`` without a checkpoint is a
    ``FileNotFoundError``; ``save_steps`` or ``save_total_limit`` without ``output_dir`` (nowhere to write) a
    ``ValueError`` (:func:`check_save_options`)."""
    check_save_options(output_dir, save_steps, save_total_limit)
    if resume_from is True and output_dir is None:
        raise ValueError("resume_from_checkpoint=True resumes the newest checkpoint in output_dir: give output_dir")
    if resume_from:  # a checkpoint to resume must exist before anything loads (or a folder is made)
        resolve_checkpoint(Path(output_dir).expanduser() if resume_from is True else Path(resume_from).expanduser())
    if output_dir is None:
        return
    out = Path(output_dir).expanduser()
    if resume_from and _resumes_in(out, resume_from):
        return
    advice = None
    if out.is_dir() and not (out / "summary.json").exists():
        steps = checkpoint_steps(out, complete=True)
        if steps:
            advice = (f"it holds an unfinished run (checkpoint-{max(steps)}/): continue it with resume_from_checkpoint=True "
                      "(--resume-from-checkpoint latest), or choose a new folder")
    check_new_output_dir(out, advice=advice)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- optimizers
def build_optimizers(model: nn.Module, lr: float, weight_decay: float, *, sparse: bool,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """``(dense, sparse)``: AdamW over ``model``'s trainable parameters (matrices decay, vectors do
    not) and, when ``sparse``, :class:`slope.optimizers.ADAMWSparse` over its SLoPe layers (else ``None``).
    For a model sharded by FSDP2 the sparse optimizer shards its state too (``shard_state``: each
    SLoPe layer's moments on one rank)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
    if not sparse:
        return dense, None
    from slope.optimizers import ADAMWSparse
    from slope.parallel import is_fsdp2

    return dense, ADAMWSparse(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, shard_state=is_fsdp2(model))


# ---------------------------------------------------------------------- the run
def ddp_forward_model(model: nn.Module, env) -> nn.Module:
    """What runs the forward: under ``torchrun`` (``env``: a :class:`slope.parallel.DistEnv`)
    ``model`` in DDP (SLoPe layers' sparse gradients averaged too), else ``model`` itself."""
    if not env.distributed:
        return model
    from slope.parallel import wrap_ddp

    return wrap_ddp(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, require_sparse=False)


def launcher_mixed_precision(fp16: bool, bf16: bool) -> tuple[bool, bool]:
    """``(fp16, bf16)`` of a fine-tuning run: ``accelerate launch`` with ``mixed_precision: bf16``
    (or fp16) in its config autocasts as ``bf16=True`` would, unless ``bf16`` / ``fp16`` is given
    (said in a note)."""
    from slope.parallel import accelerate_mixed_precision

    launched = accelerate_mixed_precision()
    if launched is not None and not (bf16 or fp16):
        warnings.warn(f"mixed precision {launched} from the accelerate config: {launched} autocast, fp32 master weights "
                      f"(as --{launched})", UserWarning, stacklevel=4)
        return launched == "fp16", launched == "bf16"
    return fp16, bf16


def fsdp_settings(fsdp: bool, fp16: bool, env) -> dict[str, bool] | None:
    """How a fine-tuning front door shards its model: ``None`` (unsharded: one process, or DDP) or
    the :func:`slope.parallel.wrap_fsdp2` settings of ``fsdp=True`` (FULL_SHARD) or of an
    ``accelerate launch`` with an FSDP config (``{"reshard_after_forward", "activation_checkpointing"}``).
    fp16 is refused; one process is warned of (nothing to shard)."""
    from slope.parallel.env import requested_fsdp

    settings = requested_fsdp(fsdp)
    if settings is None:
        return None
    if fp16:
        raise ValueError("FSDP with fp16 is not supported (the loss scaling does not cover sharded gradients); use bf16 "
                         "(--bf16) or fp32")
    if not env.distributed:
        warnings.warn("FSDP in a single process has nothing to shard: the model trains unsharded; launch with torchrun "
                      "--nproc_per_node=N (or accelerate launch) to shard it", UserWarning, stacklevel=3)
        return None
    return settings


def rank_memory(loop: FinetuneLoop) -> dict[str, int]:
    """Bytes this rank holds (:func:`slope.parallel.sharded.held_bytes` of the loop's model and
    optimizers). (The masks of weights held under :class:`slope.sparsity.MaskedWeights` are not
    module buffers: the front doors add them as ``masks``.)"""
    from slope.parallel.sharded import held_bytes

    return held_bytes(loop.model, loop.dense_opt, loop.sparse_opt)


# ---------------------------------------------------------------------- the run
def run_resumable(loop: FinetuneLoop, checkpoints: LoopCheckpoints, out: Path | None, resume_from, save_steps: int | None, *,
                  records: list[dict] | None = None, main_process: bool = True) -> dict[str, Any]:
    """Train ``loop`` from step 0 (``records``: those logged before training) or, with
    ``resume_from`` (a ``checkpoint-<step>`` folder, or ``True``: the newest in ``out``), from its
    checkpoint; write ``checkpoint-<step>/`` every ``save_steps``. Returns the loop's summary (with
    ``resumed_from``: the checkpoint folder, or ``None``, and ``memory_per_rank``: :func:`rank_memory`). A resume of
    a run that had finished (its last checkpoint, ``summary.json`` in ``out``) trains nothing and returns the
    recorded summary with ``already_finished``: the caller leaves the folder as it is.
    The first SIGINT / SIGTERM (:class:`slope.interrupt.GracefulStop`; under ``torchrun`` the ranks agree
    on the step) ends the run after the current step with ``checkpoint-<step>/`` (when ``out`` is given):
    the summary's ``stopped_by`` names the signal (else ``None``), ``stopped_at`` the steps done and
    ``stop_checkpoint`` that folder (``None`` without ``out``); the caller then writes no outputs, and
    ``resume_from`` that folder continues exactly. A second signal raises ``KeyboardInterrupt`` at once.
    A warmup of at least the run's steps (the learning rate never reaches its peak before the last
    step, nor decays) is warned of (``UserWarning``; a ``note:`` line from the commands)."""
    settings, total = loop.settings, loop.total_steps
    warmup = settings.warmup_steps
    if main_process and settings.lr_scheduler_type != "constant" and warmup > 1 and warmup >= total:
        warnings.warn(f"warmup_steps={warmup} >= the run's {total} optimizer steps: the learning rate only warms up, reaching "
                      f"{total / warmup:.0%} of learning_rate at the last step; lower warmup_steps (e.g. to {max(0, total // 10)})",
                      UserWarning, stacklevel=2)
    start, records, resumed = 0, list(records or []), None
    if resume_from:
        folder = checkpoints.resolve(resume_from)
        start, records = checkpoints.load(folder)  # (a checkpoint-<step> folder: not searched again)
        resumed = str(folder)
        _note_abandoned(out, start, main_process)
        recorded = read_json_object(out / "summary.json") if out is not None and start >= total else None
        if recorded is not None:  # the run had finished: its outputs stay as they are
            return {"stopped_by": None, "stopped_at": None, "stop_checkpoint": None, **recorded, "records": records,
                    "resumed_from": resumed, "memory_per_rank": rank_memory(loop), "already_finished": True}
    from slope.interrupt import GracefulStop

    with GracefulStop() as signals:
        summary = loop.run(out, start_step=start, records=records, save=checkpoints.save, save_steps=save_steps,
                           main_process=main_process, stop=signals.agreed)
    stopped = summary["stopped_by"] is not None and out is not None
    summary["stop_checkpoint"] = str(out / f"checkpoint-{summary['stopped_at']}") if stopped else None
    summary["resumed_from"] = resumed
    summary["memory_per_rank"] = rank_memory(loop)
    return summary


def _note_abandoned(out: Path | None, start: int, main_process: bool) -> None:
    """Warn when ``out`` holds complete checkpoints of later steps than the one resumed: they belong to
    the run this one replaces, and ``latest`` would pick them until this run saves past them."""
    from slope.finetune_checkpoints import checkpoint_steps

    later = sorted(step for step in checkpoint_steps(out, complete=True) if step > start) if out is not None else []
    if later and main_process:
        names = ", ".join(f"checkpoint-{step}" for step in later)
        warnings.warn(f"{out} holds {names}, later than the checkpoint resumed (step {start}): they are the replaced run's, and "
                      "--resume-from-checkpoint latest would pick them; remove them to keep only this run's", UserWarning,
                      stacklevel=3)


# ---------------------------------------------------------------------- outputs
def check_positions(model: nn.Module, length: int, what: str = "max_seq_length (--max-seq-length)") -> None:
    """A one-line ``ValueError`` when sequences of ``length`` tokens exceed the positions the model's config
    gives (``max_position_embeddings`` / GPT-2's ``n_positions``): checked before anything is written."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(f"{what.split(' ')[0]} = {length} tokens exceeds the model's {limit} positions; pass {what} <= {limit}")


def output_folder(output_dir, main_process: bool = True) -> Path | None:
    """``output_dir`` as a ``Path`` (``None`` stays ``None``), created by the main process."""
    if output_dir is None:
        return None
    out = Path(output_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    return out


def plain_config(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for ``summary.json``: plain values as they are, others as ``str``; the tokenizer left out."""
    plain = (int, float, str, bool, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in values.items() if k != "tokenizer"}


def dataset_name(dataset) -> str | None:
    """``dataset`` as ``summary.json`` records it: a name or path (``slope eval`` on the output
    folder validates on its held-out split again), ``None`` for documents given in memory."""
    return str(dataset) if isinstance(dataset, (str, Path)) else None


def save_model_folder(model: nn.Module, tokenizer, out: Path, summary: dict[str, Any], title: str, *,
                      main_process: bool = True) -> None:
    """Write ``out``: the model as a plain Hugging Face folder (SLoPe layers exported dense, exact
    zeros where pruned), its tokenizer (when given), ``summary.json`` (without ``records``) and ``loss.png``.
    Every rank calls it for an FSDP2-sharded model (its weights are gathered); the main process writes."""
    from slope.io import export_dense, save_state_pretrained
    from slope.parallel import full_model_state_dict, is_fsdp2
    from slope.registry import sparse_modules
    from slope.serialization.export import drop_export_record

    state = full_model_state_dict(model, rank0_only=True) if is_fsdp2(model) else None
    if not main_process:
        return
    from slope.guard import first_nonfinite

    bad = first_nonfinite((state if state is not None else model.state_dict()).items())
    if bad is not None:
        raise ValueError(f"the run diverged: {bad} holds inf/nan, so the model is not written; lower learning_rate, or train in "
                         "bf16 (--bf16) or fp32")
    drop_export_record(model)  # fine-tuned from an export: no longer that export
    if any(True for _ in sparse_modules(model)):
        export_dense(model, out, state_dict=state)
    elif state is not None:
        save_state_pretrained(model, state, out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2) + "\n")
    plot_run(summary["records"], out / "loss.png", title)


# ---------------------------------------------------------------------- the commands
def command_options(args) -> dict[str, Any]:
    """A command's parsed flags as keyword arguments: the subcommand's name dropped, and
    ``--resume-from-checkpoint latest`` as ``True`` (the newest checkpoint in the output folder)."""
    options = vars(args).copy()
    options.pop("command", None)
    if options.get("resume_from_checkpoint") == "latest":
        options["resume_from_checkpoint"] = True
    return options


def save_total_limit_text(text: str) -> int | None:
    """``--save-total-limit N`` as argparse's ``type``: an int, or ``None`` (``none`` in any case: keep every
    checkpoint); the front door checks the range (:func:`check_save_total_limit`)."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or None (keep every checkpoint), got {text!r}") from None


def interrupted_advice(output_dir, save_steps: int | None) -> str:
    """What a fine-tuning command interrupted at once (a second signal) can be continued with, as ``"; ..."``:
    ``--resume-from-checkpoint latest`` only when ``output_dir`` holds a complete ``checkpoint-<step>/``;
    else to start again with a new ``--output-dir`` or after removing the files the run left there (naming them)."""
    out = None if output_dir is None else Path(output_dir).expanduser()
    steps = {} if out is None else checkpoint_steps(out, complete=True)
    if steps:
        return (f"; a run keeps its last complete checkpoint-<step> folder (checkpoint-{max(steps)}: continue with "
                "--resume-from-checkpoint latest)")
    left = sorted(p.name for p in out.iterdir()) if out is not None and out.is_dir() else []
    done = ("no checkpoint was written (pass --save-steps K to write checkpoint-<step> folders)" if not save_steps else
            "no checkpoint was completed")
    if not left:
        return f"; {done}"
    return f"; {done}: start again with a new --output-dir, or after removing what the run left in {out} ({', '.join(left)})"


def stopped_line(name: str, summary: dict[str, Any], again: str | None = None, what: str = "") -> str | None:
    """The closing line of a run that a signal stopped (``None`` for one it did not): ``slope <name>: stopped
    by SIGTERM after step 3 of 8<what>: checkpoint saved in D; continue with <again>`` (default: the same
    command with ``--resume-from-checkpoint D``), or that nothing was saved (no output folder)."""
    if not summary.get("stopped_by"):
        return None
    head = f"slope {name}: stopped by {summary['stopped_by']} after step {summary['stopped_at']} of {summary['steps']}{what}"
    checkpoint = summary.get("stop_checkpoint")
    if checkpoint is None:
        return f"{head}; nothing was saved (give --output-dir to have a checkpoint written)"
    again = again or f"the same command with --resume-from-checkpoint {checkpoint}"
    return f"{head}: checkpoint saved in {checkpoint}; continue with {again}"


def run_command(name: str, call: Callable[[], nn.Module], output_dir=None,
                details: Callable[[dict], str] = lambda summary: "", done_line: Callable[[nn.Module], str] | None = None,
                stopped: Callable[[nn.Module], str | None] | None = None) -> int:
    """Run ``call`` (a front door) for ``slope <name>``: bad input, data, checkpoints or storage
    end in one line ``slope <name>: error: ...`` and exit status 1 (slope's warnings are ``note:``
    lines: :mod:`slope.notes`); success prints ``done: ...`` (steps, time, validation loss, ``details(summary)``, the
    output folder; ``done_line(model)``: another closing line) and returns 0. A run stopped by SIGINT / SIGTERM
    ends with one line on stderr instead (``stopped(model)``; default: :func:`stopped_line` of ``finetune_summary``)
    and returns 0 too. Under a launcher, errors, notes and the closing line come from rank 0
    only (every rank meets the same input)."""
    from slope.checkpoint import CheckpointError
    from slope.data import DataError
    from slope.durable import StorageError
    from slope.parallel import launched_rank

    try:
        model = call()
    except (ValueError, TypeError, DataError, CheckpointError, StorageError, OSError) as e:
        from slope.notes import report_error

        report_error(name, e)  # said once (every rank meets the same bad input), recorded by every rank for torchrun
        return 1
    if launched_rank()[0] != 0:  # said once, by the first rank
        return 0
    line = stopped(model) if stopped is not None else stopped_line(name, getattr(model, "finetune_summary", {}))
    if line:
        print(line, file=sys.stderr, flush=True)
        return 0
    if done_line is not None:
        print(done_line(model))
        return 0
    s = model.finetune_summary
    resumed = f" (resumed from {s['resumed_from']})" if s.get("resumed_from") else ""
    print(f"done: {s['steps']} steps{resumed} in {s['elapsed_s']:.1f} s | validation loss {s['initial_val_loss']:.4f} -> "
          f"{s['final_val_loss']:.4f}" + details(s) + (f" | outputs in {output_dir}" if output_dir else ""))
    return 0
