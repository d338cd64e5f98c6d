"""``slope apply``: every stage of a recipe in one command (:func:`slope.stages.apply`).

The flags are those of ``slope oneshot`` (calibration) and ``slope finetune`` (training), with dashes
or underscores; the seed's two SparseML commands become one::

    slope apply --model dense --recipe recipe.yaml --dataset embedded --output-dir out \\
        --num-calibration-samples 512 --max-seq-len 512 --distill-teacher dense --max-steps 200 --bf16 True

Running it again with the same flags continues an interrupted run (finished stages are kept). SIGINT /
SIGTERM during a train stage stop it after the current step with a checkpoint (exit status 0), which
the same command continues from.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from slope.cli_options import add_flag as _flag

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``apply`` subcommand to ``sub`` (an argparse subparsers object)."""
    from slope.recovery.cli import add_training_flags

    p = sub.add_parser("apply", help="run every stage of a recipe in turn: one-shot pruning and fine-tuning stages, in the "
                       "recipe's order", description="Run every stage of a multi-stage recipe (oneshot and train stages, in "
                       "order), each on the model the stage before wrote: stage <name> writes OUTPUT_DIR/stage_<name>/, and "
                       "OUTPUT_DIR/apply.json records the settings and the finished stages, so that the same command continues "
                       "an interrupted run (SIGINT / SIGTERM in a train stage: stopped after the current step with a "
                       "checkpoint, exit status 0). See docs/oneshot.md.")
    _flag(p, "model", required=True, metavar="DIR", help="the model the first stage starts from: a Hugging Face model folder, a "
          "slope save_pretrained folder or a `slope train` checkpoint/run folder")
    _flag(p, "recipe", required=True, metavar="FILE", help="YAML recipe with one or more stages (oneshot and train)")
    _flag(p, "output_dir", required=True, metavar="DIR", help="the run's folder: new or empty, or that of the run to continue")
    _flag(p, "dataset", default="embedded", help="'embedded', a .txt/.jsonl(.gz) file or a Hugging Face dataset name: "
          "calibration data of the oneshot stages, training data of the train stages")
    _flag(p, "dataset_config_name", default=None, help="config of a Hugging Face dataset (e.g. main)")
    _flag(p, "splits", default="train", help="dataset split (only 'train'; validation is held out of it)")
    _flag(p, "distill_teacher", default=None, metavar="DIR", help="the teacher model folder (stages with an "
          "OutputDistillationModifier)")
    _flag(p, "num_calibration_samples", type=int, default=512, metavar="N", help="calibration windows of oneshot stages")
    _flag(p, "max_seq_len", type=int, default=None, metavar="L", help="tokens per calibration window (default: --max-seq-length)")
    add_training_flags(p, checkpoints_in="OUTPUT_DIR/stage_<name>")
    return p


def _done_line(model) -> str:
    summary = model.apply_summary
    seconds = sum(s["seconds"] or 0.0 for s in summary["stages"] if s["name"] in summary["ran_now"])
    return (f"done: {len(summary['stages'])} stages ({len(summary['ran_now'])} run now, {seconds:.1f} s) | outputs in "
            f"{Path(summary['final_model']).parent}")


def _stopped_line(model) -> str | None:
    """The closing line of a run stopped in a train stage by SIGINT / SIGTERM (``None`` otherwise)."""
    from slope.finetune_run import stopped_line

    stopped = model.apply_summary["stopped"]
    if stopped is None:
        return None
    if stopped.get("after_stage"):
        return (f"slope apply: stopped by {stopped['stopped_by']} after stage {stopped['stage']} (finished and kept); "
                "continue with the same command again")
    return stopped_line("apply", stopped, again="the same command again", what=f" of stage {stopped['stage']}")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (1 with a one-line error for bad input)."""
    from slope.finetune_run import command_options, run_command

    def call():
        from slope.data import with_dataset_config
        from slope.stages.runner import apply

        options = command_options(args)
        model, recipe, dataset, output_dir = options.pop("model"), options.pop("recipe"), options.pop("dataset"), options.pop("output_dir")
        config, split = options.pop("dataset_config_name"), options.pop("splits")
        if split != "train":
            raise ValueError(f"--splits {split!r}: slope apply reads the 'train' split (validation is held out of it)")
        return apply(model, recipe, with_dataset_config(dataset, config), output_dir, options.pop("distill_teacher"),
                     num_calibration_samples=options.pop("num_calibration_samples"), max_seq_len=options.pop("max_seq_len"),
                     **options)

    return run_command("apply", call, args.output_dir, done_line=_done_line, stopped=_stopped_line)
