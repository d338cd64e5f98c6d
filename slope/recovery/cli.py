"""``slope finetune``: :func:`slope.recovery.finetune` from the command line, with the seed's flags.

The SparseML command of seed 002 runs with ``slope`` in place of its launcher: flags take dashes or
underscores (``--output-dir`` / ``--output_dir``), booleans may carry a value (``--bf16 True``),
``--max-grad-norm None`` turns clipping off, ``--precision bfloat16`` loads the model in bf16. Under
``torchrun --nproc_per_node=N -m slope finetune ...`` it trains with DDP, with ``--fsdp`` sharded by
FSDP2; ``accelerate launch --config_file <FSDP config> --no_python slope finetune ...`` (the seed's
launch) shards by FSDP2 too.
"""
from __future__ import annotations

import argparse

from slope.finetune_loop import LR_SCHEDULES
from slope.cli_options import add_flag as _flag
from slope.finetune_run import save_total_limit_text
from slope.cli_options import bool_text as _bool
from slope.pruning.loading import LOAD_PRECISIONS

__all__ = ["add_parser", "add_training_flags", "run"]


def _norm(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or None, got {text!r}") from None


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model with a recipe: constant masks, distillation from a teacher",
                       description="Fine-tune a causal LM (seed 002 steps 1 and 3): plain fine-tuning without --recipe; with a "
                       "recipe, ConstantPruningModifier keeps the pruned zeros and OutputDistillationModifier distils from "
                       "--distill-teacher. Writes the model (plain Hugging Face folder), metrics.jsonl, summary.json and "
                       "loss.png to --output-dir. SIGINT / SIGTERM stop it after the current step with a "
                       "checkpoint-<step> in --output-dir (exit status 0; continue with --resume-from-checkpoint). See "
                       "docs/recovery.md.")
    _flag(p, "model", required=True, metavar="DIR", help="a Hugging Face model folder, a slope save_pretrained folder or a "
          "`slope train` checkpoint/run folder")
    _flag(p, "dataset", default="embedded", help="'embedded', a .txt/.jsonl(.gz) file or a Hugging Face dataset name")
    _flag(p, "dataset_config_name", default=None, help="config of a Hugging Face dataset (e.g. main)")
    _flag(p, "splits", default="train", help="dataset split to train on (only 'train'; validation is held out of it)")
    _flag(p, "recipe", default=None, metavar="FILE", help="finetune recipe (ConstantPruningModifier, OutputDistillationModifier)")
    _flag(p, "stage", default=None, metavar="NAME", help="the stage of a multi-stage recipe to run (default: its one train stage; "
          "oneshot stages run with slope oneshot)")
    _flag(p, "output_dir", default=None, metavar="DIR", help="where the model, metrics and checkpoints go")
    _flag(p, "distill_teacher", default=None, metavar="DIR", help="the teacher model folder (OutputDistillationModifier)")
    add_training_flags(p)
    _flag(p, "resume_from_checkpoint", default=None, metavar="DIR", help="a checkpoint-<step> folder ('latest': the newest "
          "in --output-dir)")
    return p


def add_training_flags(p: argparse.ArgumentParser, checkpoints_in: str = "OUTPUT_DIR") -> None:
    """The training flags of ``slope finetune`` (``transformers.TrainingArguments`` names; also those of ``slope apply``,
    whose ``checkpoint-<step>`` folders go ``checkpoints_in``)."""
    _flag(p, "num_train_epochs", type=float, default=3.0)
    _flag(p, "max_steps", type=int, default=None, help="optimizer steps (overrides --num-train-epochs)")
    _flag(p, "learning_rate", type=float, default=5e-5)
    _flag(p, "lr_scheduler_type", choices=LR_SCHEDULES, default="linear")
    _flag(p, "warmup_steps", type=int, default=0)
    _flag(p, "per_device_train_batch_size", type=int, default=8, help="sequences per micro-batch on each process")
    _flag(p, "gradient_accumulation_steps", type=int, default=1)
    _flag(p, "max_seq_length", type=int, default=512, help="tokens per training sequence")
    _flag(p, "bf16", type=_bool, nargs="?", const=True, default=False, help="bf16 autocast ('--bf16' or '--bf16 True')")
    _flag(p, "fp16", type=_bool, nargs="?", const=True, default=False, help="fp16 autocast with dynamic loss scaling")
    _flag(p, "gradient_checkpointing", type=_bool, nargs="?", const=True, default=False)
    _flag(p, "max_grad_norm", type=_norm, default=1.0, help="joint gradient-norm bound; None (or 0): no clipping")
    _flag(p, "weight_decay", type=float, default=0.0)
    _flag(p, "seed", type=int, default=42)
    _flag(p, "logging_steps", type=int, default=10)
    _flag(p, "eval_steps", type=int, default=None, help="validate every K steps (and at the end)")
    _flag(p, "eval_batches", type=int, default=8)
    _flag(p, "save_steps", type=int, default=None, help=f"write {checkpoints_in}/checkpoint-<step> every K steps")
    _flag(p, "save_total_limit", type=save_total_limit_text, default=None, metavar="N",
          help="keep only the newest N checkpoint-<step> folders (default, or None: all)")
    _flag(p, "tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the model's, else slope's shipped one)")
    _flag(p, "text_field", default="text")
    _flag(p, "device", default="auto")
    _flag(p, "precision", choices=tuple(LOAD_PRECISIONS), default="auto",
          help="dtype to load the model and teacher in (auto: as saved)")
    _flag(p, "double_pruning", type=_bool, nargs="?", const=True, default=False,
          help="2:4 layers compressed on the accelerated path with SLoPe's double-pruned backward (default: exact backward)")
    _flag(p, "backend", default="auto", help="sparse backend of compressed 2:4 layers (with --double-pruning)")
    _flag(p, "fsdp", type=_bool, nargs="?", const=True, default=False,
          help="under torchrun, shard the model with FSDP2 instead of DDP (automatic under accelerate launch with an FSDP config)")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (1 with a one-line error for bad input)."""
    from slope.finetune_run import check_save_options, command_options, run_command

    def call():
        from slope.data import with_dataset_config
        from slope.parallel import launched_rank
        from slope.recovery.finetune import finetune

        check_save_options(args.output_dir, args.save_steps, args.save_total_limit)
        options = command_options(args)
        model, recipe, dataset, stage = options.pop("model"), options.pop("recipe"), options.pop("dataset"), options.pop("stage")
        teacher, output_dir = options.pop("distill_teacher"), options.pop("output_dir")
        config, split = options.pop("dataset_config_name"), options.pop("splits")
        if split != "train":
            raise ValueError(f"--splits {split!r}: slope finetune trains on the 'train' split (validation is held out of it)")
        dataset = with_dataset_config(dataset, config)
        if recipe is not None and launched_rank()[0] == 0:  # the stages left to slope oneshot, said once
            from slope.pruning.recipe import skipped_stages

            for note in skipped_stages(recipe, "finetune", stage):
                print(note)
        return finetune(model, recipe, dataset, distill_teacher=teacher, output_dir=output_dir, stage=stage, **options)

    return run_command("finetune", call, args.output_dir)
