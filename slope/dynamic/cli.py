"""``slope sparse-finetune``: :func:`slope.dynamic.sparse_finetune` from the command line (same options)."""
from __future__ import annotations

import argparse
import importlib

from slope.cli_options import add_flag as _flag
from slope.finetune_run import save_total_limit_text
from slope.dynamic.schedules import SCHEDULES

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``sparse-finetune`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("sparse-finetune", help="dynamic sparse fine-tuning (RigL / gradual pruning, unstructured or N:M)",
                       description="Fine-tune a causal LM with dynamic sparsity (seed 000's sparse_finetune); writes the model "
                       "(plain Hugging Face folder), metrics.jsonl, summary.json and loss.png to --output-dir. SIGINT / "
                       "SIGTERM stop it after the current step with a checkpoint-<step> in --output-dir (exit status 0; "
                       "continue with --resume-from-checkpoint).")
    _flag(p, "model", required=True, help="Hugging Face folder (or hub name) or a `slope train` run directory")
    _flag(p, "dataset", default="embedded", help="'embedded', a .txt/.jsonl(.gz) file or a Hugging Face dataset name")
    _flag(p, "output_dir", default=None, help="where the fine-tuned model and metrics go")
    _flag(p, "sparsity_ratio", type=float, default=None,
          help="fraction of weights pruned per layer (unstructured; default: 0.5; N:M prunes 1 - N/M)")
    _flag(p, "sparsity_type", default="unstructured", help="'unstructured' or N:M ('2:4', '4:8', ...)")
    _flag(p, "mask_update_interval", type=int, default=100, help="optimizer steps between mask updates")
    _flag(p, "mask_update_fraction", type=float, default=0.3,
          help="RigL's alpha: the swap fraction at step 0, cosine-decayed to 0 at the end "
          "(the first update, after --mask-update-interval steps, swaps a little less)")
    _flag(p, "use_rigl", action=argparse.BooleanOptionalAction, default=True, help="RigL drop/grow at every update")
    _flag(p, "sparsity_schedule", choices=sorted(SCHEDULES), default=None,
          help="gradual pruning schedule (default: cubic without RigL, none with RigL)")
    _flag(p, "pruning_method", default=None, metavar="MODULE:CLASS",
          help="a torch.nn.utils.prune.BasePruningMethod subclass, e.g. torch.nn.utils.prune:L1Unstructured")
    _flag(p, "learning_rate", type=float, default=5e-5)
    _flag(p, "batch_size", type=int, default=8)
    _flag(p, "num_epochs", type=int, default=3)
    _flag(p, "warmup_steps", type=int, default=100)
    _flag(p, "gradient_accumulation_steps", type=int, default=4)
    _flag(p, "fp16", action="store_true", help="fp16 autocast with dynamic loss scaling")
    _flag(p, "bf16", action="store_true", help="bf16 autocast")
    _flag(p, "gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    _flag(p, "use_topk_attention", action="store_true", help="each query attends to its top ceil(topk_ratio * L) keys")
    _flag(p, "topk_ratio", type=float, default=0.1)
    _flag(p, "max_steps", type=int, default=None, help="optimizer steps (overrides --num-epochs)")
    _flag(p, "tokenizer", default=None, help="tokenizer folder (default: the model's, else slope's shipped one)")
    _flag(p, "seed", type=int, default=0)
    _flag(p, "max_seq_length", type=int, default=256)
    _flag(p, "eval_batches", type=int, default=8)
    _flag(p, "eval_steps", type=int, default=None, help="validate every K steps (and at the end)")
    _flag(p, "logging_steps", type=int, default=10)
    _flag(p, "max_grad_norm", type=float, default=1.0, help="0: no clipping")
    _flag(p, "weight_decay", type=float, default=0.0)
    _flag(p, "device", default="auto")
    _flag(p, "text_field", default="text", help="text field of .jsonl records / Hugging Face datasets")
    _flag(p, "compress", action=argparse.BooleanOptionalAction, default=None,
          help="N:M layers stored compressed on the accelerated 2:4 path (default: 2:4 yes, other N:M no)")
    _flag(p, "double_pruning", action=argparse.BooleanOptionalAction, default=None,
          help="SLoPe's double-pruned backward of N:M layers (default: with --compress; --no-double-pruning: exact backward)")
    _flag(p, "progress", action=argparse.BooleanOptionalAction, default=None,
          help="a progress bar (--no-progress: none; default: a bar on a terminal, plain lines otherwise)")
    _flag(p, "targets", nargs="+", default=None, help="only these linear layers (names, suffixes or globs)")
    _flag(p, "skip", nargs="+", default=None, help="leave these linear layers dense")
    _flag(p, "sparsity_distribution", choices=("uniform", "erk"), default="uniform",
          help="spread of an unstructured budget over the layers: the same in each, or RigL's ERK")
    _flag(p, "save_steps", type=int, default=None, help="write OUTPUT_DIR/checkpoint-<step> every K steps")
    _flag(p, "save_total_limit", type=save_total_limit_text, default=None, metavar="N",
          help="keep only the newest N checkpoint-<step> folders (default, or None: all)")
    _flag(p, "resume_from_checkpoint", default=None, metavar="DIR",
          help="a checkpoint-<step> folder ('latest': the newest in --output-dir)")
    _flag(p, "fsdp", action="store_true",
          help="under torchrun, shard the model with FSDP2 instead of DDP (automatic under accelerate launch with an FSDP config)")
    return p


def _import_method(spec: str):
    """The pruning method class ``MODULE:CLASS`` names, built without arguments (as ``sparse_finetune`` builds it)."""
    from slope.dynamic.criteria import resolve_pruning_method

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--pruning-method {spec!r}: give MODULE:CLASS, e.g. torch.nn.utils.prune:L1Unstructured")
    try:
        method = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--pruning-method {spec!r}: cannot import it ({e})") from None
    try:
        resolve_pruning_method(method)
    except TypeError as e:
        raise ValueError(f"--pruning-method {spec!r}: the command line takes a torch.nn.utils.prune.BasePruningMethod class that "
                         "builds without arguments (e.g. torch.nn.utils.prune:L1Unstructured); for one that needs arguments, "
                         f"pass an instance to slope.dynamic.sparse_finetune ({e})") from None
    return method


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (1 with a one-line error for bad input)."""
    from slope.finetune_run import check_save_options, command_options, run_command

    def call():
        from slope.dynamic.finetune import sparse_finetune

        check_save_options(args.output_dir, args.save_steps, args.save_total_limit)
        if args.resume_from_checkpoint == "latest" and args.output_dir is None:
            raise ValueError("--resume-from-checkpoint latest resumes the newest checkpoint in --output-dir: give --output-dir")
        options = command_options(args)
        if options["pruning_method"] is not None:
            options["pruning_method"] = _import_method(options["pruning_method"])
        return sparse_finetune(options.pop("model"), options.pop("dataset"), **options)

    return run_command("sparse-finetune", call, args.output_dir, _result_line)


def _result_line(summary: dict) -> str:
    """`` | sparsity 0.5000 | initial prune + 2 mask updates`` (``, 1 skipped``: a RigL update skipped
    for a non-finite gradient)."""
    skipped = summary.get("mask_updates_skipped", 0)
    return (f" | sparsity {summary['final_sparsity']:.4f} | initial prune + {summary['mask_updates']} mask updates"
            + (f" ({skipped} skipped)" if skipped else ""))
