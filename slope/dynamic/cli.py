"""``slope sparse-finetune``: :func:`slope.dynamic.sparse_finetune` from the command line (same options)."""
from __future__ import annotations

import argparse
import importlib

from slope.dynamic.schedules import SCHEDULES

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``sparse-finetune`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("sparse-finetune", help="dynamic sparse fine-tuning (RigL / gradual pruning, unstructured or N:M)",
                       description="Fine-tune a causal LM with dynamic sparsity (seed 000's sparse_finetune); writes the model "
                       "(plain Hugging Face folder), metrics.jsonl, summary.json and loss.png to --output-dir.")
    p.add_argument("--model", required=True, help="Hugging Face folder (or hub name) or a `slope train` run directory")
    p.add_argument("--dataset", default="embedded", help="'embedded', a .txt/.jsonl(.gz) file or a Hugging Face dataset name")
    p.add_argument("--output-dir", default=None, help="where the fine-tuned model and metrics go")
    p.add_argument("--sparsity-ratio", type=float, default=None,
                   help="fraction of weights pruned per layer (unstructured; default: 0.5; N:M prunes 1 - N/M)")
    p.add_argument("--sparsity-type", default="unstructured", help="'unstructured' or N:M ('2:4', '4:8', ...)")
    p.add_argument("--mask-update-interval", type=int, default=100, help="optimizer steps between mask updates")
    p.add_argument("--mask-update-fraction", type=float, default=0.3, help="RigL's initial swap fraction (cosine-decayed to 0)")
    p.add_argument("--use-rigl", action=argparse.BooleanOptionalAction, default=True, help="RigL drop/grow at every update")
    p.add_argument("--sparsity-schedule", choices=sorted(SCHEDULES), default=None,
                   help="gradual pruning schedule (default: cubic without RigL, none with RigL)")
    p.add_argument("--pruning-method", default=None, metavar="MODULE:CLASS",
                   help="a torch.nn.utils.prune.BasePruningMethod subclass, e.g. torch.nn.utils.prune:L1Unstructured")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-epochs", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--gradient-accumulation-steps", type=int, default=4)
    p.add_argument("--fp16", action="store_true", help="fp16 autocast with dynamic loss scaling")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--use-topk-attention", action="store_true", help="each query attends to its top ceil(topk_ratio * L) keys")
    p.add_argument("--topk-ratio", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --num-epochs)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, else slope's shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-steps", type=int, default=None, help="validate every K steps (and at the end)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--targets", nargs="+", default=None, help="only these linear layers (names, suffixes or globs)")
    p.add_argument("--skip", nargs="+", default=None, help="leave these linear layers dense")
    p.add_argument("--sparsity-distribution", choices=("uniform", "erk"), default="uniform",
                   help="spread of an unstructured budget over the layers: the same in each, or RigL's ERK")
    p.add_argument("--save-steps", type=int, default=None, help="write OUTPUT_DIR/checkpoint-<step> every K steps")
    p.add_argument("--resume-from-checkpoint", default=None, metavar="DIR",
                   help="a checkpoint-<step> folder ('latest': the newest in --output-dir)")
    return p


def _import_method(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--pruning-method {spec!r}: give MODULE:CLASS, e.g. torch.nn.utils.prune:L1Unstructured")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--pruning-method {spec!r}: cannot import it ({e})") from None


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (1 with a one-line error for bad input)."""
    from slope.finetune_run import command_options, run_command

    def call():
        from slope.dynamic.finetune import sparse_finetune

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
