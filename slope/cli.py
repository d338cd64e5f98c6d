"""The ``slope`` command: ``slope train``, ``slope eval``, ``slope generate``, ``slope export``,
``slope oneshot``, ``slope sparse-finetune``, ``slope finetune``, ``slope apply`` (also ``python -m slope``)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from slope.config import PRECISIONS, REPORT_TO, SIZE_KEYS, ConfigError, TrainConfig, load_config_file
from slope.masks import MASK_TYPES
from slope.notes import warnings_as_notes
from slope.pruning.loading import LOAD_PRECISIONS

#: ``slope eval`` / ``slope generate --mode`` (same as ``slope.evaluate.MODES``, which imports torch).
INFERENCE_MODES = ("unmerged", "merged", "dense")
MODE_HELP = ("unmerged: the model as trained; merged: adapters merged into one sparse GEMM per layer, "
             "training state dropped (freeze_for_inference); dense: plain nn.Linear with the effective weights")
MODE_DEFAULT_HELP = " (default: unmerged; a model folder: dense; a peft adapter folder: unmerged, or dense on a plain base)"
CHECKPOINT_HELP = ("a checkpoint directory, a run directory holding checkpoint/, a model folder (slope oneshot / finetune / "
                   "sparse-finetune output, any causal LM), or a peft LoRA adapter folder (adapter_config.json; run on its base, "
                   "--base; forms unmerged and dense)")
BASE_HELP = ("with a peft adapter folder: its base model folder (default: adapter_config.json's base_model_name_or_path; "
             "nothing is downloaded)")

#: ``slope export --form`` (same as ``slope.serialization.export.FORMS``, which imports torch).
EXPORT_FORMS = ("dense", "sparse", "merged")

__all__ = ["main", "build_parser", "resolve_train_config"]

TRAIN_HELP = {
    "out": "output directory: metrics.jsonl, loss.png, checkpoint/",
    "max_steps": "optimizer steps; defines the LR schedule and the lazy-LoRA start",
    "stop_after": "stop (saving a checkpoint) after this step, as if interrupted",
    "resume": "continue from OUT/checkpoint up to --max-steps (the checkpoint's settings are the defaults)",
    "seed": "seed of the model init and of the data order",
    "device": "auto (cuda if available), cpu, cuda, cuda:N",
    "log_every": "log a metrics record every K steps",
    "eval_every": "validate every K steps (and at the end)",
    "eval_batches": "validation batches per evaluation",
    "save_every": "checkpoint every K steps (0: only at the end / --stop-after)",
    "keep_checkpoints": "complete checkpoints to keep: checkpoint/ plus the K-1 newest older ones as checkpoint-stepNNNNNN/ (e.g. checkpoint-step000200)",
    "nonfinite_patience": "stop with an error after this many consecutive steps with a non-finite loss or gradients (skipped)",
    "dataset": "'embedded' (Python stdlib source shipped with slope), a .txt/.jsonl(.gz) file, or a Hugging Face dataset name[:config]",
    "text_field": "text field of .jsonl records / Hugging Face datasets",
    "tokenizer": "a Hugging Face tokenizer folder or a tokenizer.json file ('' = the shipped byte-level BPE, trained on "
                 "Python code); the model's vocabulary follows it, and checkpoints keep a copy",
    "model_config": "architecture: '' = Llama; a model type (qwen2, mistral, gpt2, ...) built with the size flags below; "
                    "or a transformers config JSON file / folder, whose sizes are used instead of the flags",
    "report_to": "also log metrics to TensorBoard (OUT/tensorboard; pip install 'slope[tensorboard]') or Weights & Biases "
                 "(offline unless WANDB_MODE=online; pip install 'slope[wandb]')",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per micro-batch (global: split over the ranks under torchrun)",
    "grad_accum": "micro-batches per optimizer step",
    "hidden_size": "model width (multiple of 64)",
    "intermediate_size": "MLP width (multiple of 64)",
    "num_layers": "transformer layers",
    "num_heads": "attention heads",
    "lr": "peak learning rate (both optimizers)",
    "min_lr_ratio": "cosine decays to lr * this",
    "warmup_fraction": "fraction of max-steps of linear warmup",
    "weight_decay": "decoupled weight decay (matrices and SLoPe values)",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2",
    "grad_clip": "max joint norm of sparse + dense gradients (0: off)",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling)",
    "gradient_checkpointing": "activation checkpointing of the model's layers (non-reentrant): their activations are "
                              "recomputed in the backward instead of kept, for one more forward per step",
    "fp16_init_scale": "initial fp16 loss scale",
    "fp16_growth_interval": "clean steps before the fp16 loss scale doubles",
    "fp16_min_scale": "floor of the fp16 loss scale (the initial scale if lower); consecutive overflows count towards --nonfinite-patience",
    "dense": "train the dense baseline (no pruning) in the same loop",
    "sparsity": "N:M kept along the input dimension (compressed: 2:4 only)",
    "compress": "compressed 2:4 storage (reference backend on CPU); --no-compress simulates with masks",
    "backend": "sparse backend for compressed storage (auto, reference, cusparselt, cutlass, cutlass-sm90, triton)",
    "mask_change_freq": "recompute the double-pruned mask every K steps",
    "lazy_lora_fraction": "attach LoRA adapters for this last fraction of steps (0: never)",
    "lora_rank": "rank of the lazy adapters",
    "mask_type": "nm (N:M along the input dimension) or transposable (N:M along both dimensions, exact backward)",
    "double_pruning": "double-prune the backward operand (--no-double-pruning: exact backward, needs --no-compress)",
    "dense_tail_fraction": "train this last fraction of steps dense (W⊙M in nn.Linear) instead of sparse (0: never)",
    "deepspeed": "DeepSpeed config JSON: ZeRO-1/2 for the dense parameters (launch with torchrun; '' = off, "
                 "the default: DDP under torchrun)",
    "shard_sparse_optimizer": "under torchrun (DDP), keep each SLoPe layer's AdamW moments on one rank, which steps it and "
                              "broadcasts its values: 4 + 4 + 8/N bytes per kept weight instead of 16 (DeepSpeed ZeRO-1/2: always)",
    "fsdp": "under torchrun, shard with FSDP2: dense weights, gradients and AdamW state split row-wise over the ranks, each "
            "SLoPe layer's values, gradient and moments on one rank (also under accelerate launch with an FSDP config)",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with the same keys (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{TRAIN_HELP[f.name]} (default: {default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "precision":
            parser.add_argument(flag, choices=PRECISIONS, help=help_text)
        elif f.name == "mask_type":
            parser.add_argument(flag, choices=MASK_TYPES, help=help_text)
        elif f.name == "report_to":
            parser.add_argument(flag, choices=REPORT_TO, help=help_text)
        elif f.name in ("tokenizer", "model_config"):
            parser.add_argument(flag, metavar={"tokenizer": "PATH", "model_config": "PATH_OR_TYPE"}[f.name], help=help_text)
        else:
            kind, metavar = {"int": (int, "N"), "int | None": (int, "N"), "float": (float, "X"), "str": (str, "STR")}[f.type]
            parser.add_argument(flag, type=kind, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from slope import __version__

    parser = argparse.ArgumentParser(prog="slope", description="2:4 sparse pretraining and fine-tuning: SLoPe (double-pruned sparse "
                                     "weights + lazy LoRA), one-shot pruning, recovery and dynamic fine-tuning (sparse-increment "
                                     "fine-tuning, SIFT / SpIEL, is a Python API: slope.peft, see docs/peft.md)")
    parser.add_argument("--version", action="version", version=f"slope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", argument_default=argparse.SUPPRESS, help="pretrain a small Llama or any HF causal LM (default: SLoPe 2:4 on the embedded corpus, ~2 min on a 2-core CPU)",
                           description="Pretrain a small Llama (or any Hugging Face causal LM: --model-config) with SLoPe (or --dense). Precedence: defaults < --config FILE < flags. "
                           "Data parallel: `torchrun --nproc_per_node=N -m slope train ...` (DDP; --deepspeed CONFIG for ZeRO-1/2; --fsdp for FSDP2); "
                           "--batch-size stays the global micro-batch, split over the N ranks, so runs and checkpoints do not depend on N.")
    _add_train_flags(train)

    ev = sub.add_parser("eval", help="validation loss / perplexity of a checkpoint on its run's held-out split")
    ev.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    ev.add_argument("--base", default=None, metavar="DIR", help=BASE_HELP)
    ev.add_argument("--eval-batches", type=int, default=None, help="validation batches (default: the run's)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--mode", choices=INFERENCE_MODES, default=None, help=MODE_HELP + MODE_DEFAULT_HELP)
    ev.add_argument("--compare", action="store_true",
                    help="evaluate every mode and check they agree to fp tolerance (exit status 1 if not)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (Hugging Face generate)")
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    gen.add_argument("--base", default=None, metavar="DIR", help=BASE_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--mode", choices=INFERENCE_MODES, default=None, help=MODE_HELP + MODE_DEFAULT_HELP)
    gen.add_argument("--cuda-graphs", action="store_true",
                     help="decode with a static KV cache under a CUDA graph (one launch per token; CUDA only)")
    gen.add_argument("--compare", action="store_true",
                     help="greedy-decode in every mode (dense, unmerged, merged) and report prefill / decode tokens/s")
    gen.add_argument("--batch", type=int, default=None, help="with --compare: decode the prompt this many times at once (default: 1)")

    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (model, config, tokenizer)",
                         description="Write a `slope train` checkpoint (or a pruned model's Hugging Face folder) as a Hugging Face "
                         "folder with its tokenizer. dense: ordinary layers holding W⊙M (adapters merged), loads with "
                         "transformers.AutoModelForCausalLM and needs no slope; sparse: the model as trained, loads with "
                         "slope.from_pretrained (and as the dense-equivalent model with AutoModelForCausalLM); merged: the "
                         "inference form (adapters merged into the sparse operand, training state dropped), loads with slope.from_pretrained.")
    exp.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, or a run directory holding checkpoint/")
    exp.add_argument("--output-dir", required=True, metavar="DIR", help="the Hugging Face folder to write")
    exp.add_argument("--form", choices=EXPORT_FORMS, default="dense", help="dense, sparse or merged (default: dense)")

    from slope.dynamic.cli import add_parser as add_sparse_finetune

    add_sparse_finetune(sub)
    _add_oneshot_parser(sub)
    from slope.recovery.cli import add_parser as add_finetune

    add_finetune(sub)
    from slope.stages.cli import add_parser as add_apply

    add_apply(sub)
    return parser


def _add_oneshot_parser(sub) -> None:
    from slope.cli_options import bool_text  # SparseML-style booleans: --flag False

    one = sub.add_parser("oneshot", help="prune a pretrained model in one shot with a recipe (magnitude, Wanda, SparseGPT, OWL)",
                         description="One-shot pruning with a SparseML / llm-compressor style recipe; writes a save_pretrained "
                         "folder with its tokenizer, recipe.yaml and sparsity_report.json. See docs/oneshot.md.")
    one.add_argument("--model", required=True, metavar="DIR",
                     help="a Hugging Face model folder, a slope save_pretrained folder, or a `slope train` checkpoint/run folder")
    one.add_argument("--recipe", required=True, metavar="FILE", help="YAML recipe (stage -> modifier group -> ModifierName: {params})")
    one.add_argument("--stage", default=None, metavar="NAME", help="run only this stage of a multi-stage recipe (default: its "
                     "oneshot stages; train stages run with slope finetune)")
    one.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR", help="new (or empty) folder")
    one.add_argument("--dataset", default=None, help="calibration data: 'embedded', a .txt/.jsonl file, or a Hugging Face "
                     "dataset name (needs internet); not needed by MagnitudePruningModifier")
    one.add_argument("--dataset-config-name", "--dataset_config_name", dest="dataset_config_name", default=None,
                     help="config of a Hugging Face dataset (e.g. main)")
    one.add_argument("--text-field", "--text_field", dest="text_field", default="text",
                     help="text field of .jsonl records / Hugging Face datasets")
    one.add_argument("--num-calibration-samples", "--num_calibration_samples", dest="num_calibration_samples", type=int,
                     default=512, metavar="N", help="calibration windows (default: 512)")
    one.add_argument("--max-seq-len", "--max_seq_len", "--max-seq-length", "--max_seq_length", dest="max_seq_len", type=int,
                     default=512, metavar="L", help="tokens per calibration window (default: 512)")
    one.add_argument("--splits", default="train", help="calibration split (only 'train': calibration never reads held-out text)")
    one.add_argument("--concatenate-data", "--concatenate_data", dest="concatenate_data", nargs="?", const=True, default=True,
                     type=bool_text, metavar="BOOL", help="SparseML's flag, accepted: calibration windows are always cut "
                     "from the concatenated text")
    one.add_argument("--pad-to-max-length", "--pad_to_max_length", dest="pad_to_max_length", default=False, type=bool_text,
                     metavar="BOOL", help="SparseML's flag, accepted: every calibration window is a full --max-seq-len "
                     "window, so nothing is padded")
    one.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the model's own)")
    one.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    one.add_argument("--precision", choices=tuple(LOAD_PRECISIONS), default="auto",
                     help="dtype to load and prune the model in (auto: as saved)")


#: ``slope train`` settings that only a sparse run uses.
_SPARSE_ONLY = ("sparsity", "compress", "mask_change_freq", "lazy_lora_fraction", "lora_rank", "mask_type", "double_pruning",
                "shard_sparse_optimizer")


def _refuse_sparse_only_when_dense(given: dict) -> None:
    """A ``ConfigError`` for sparse-only settings given (by flag or config file) to a ``--dense`` run: they would be ignored."""
    if not given.get("dense"):
        return
    ignored = [key for key in _SPARSE_ONLY if key in given]
    if ignored:
        flags = ", ".join("--" + key.replace("_", "-") for key in ignored)
        raise ConfigError(f"{flags} applies to sparse runs and --dense ignores it; drop it, or drop --dense")


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults (or, with ``--resume``, the checkpoint's settings) < ``--config FILE`` < flags."""
    values = vars(args).copy()
    values.pop("command")
    config_file = values.pop("config", None)
    overrides = {**(load_config_file(config_file) if config_file else {}), **values}
    sized = sorted(set(SIZE_KEYS) & set(overrides))
    if overrides.get("model_config") and Path(overrides["model_config"]).expanduser().exists() and sized:
        flags = ", ".join("--" + key.replace("_", "-") for key in sized)
        raise ConfigError(f"{flags}: --model-config {overrides['model_config']} is a config file, which sets the sizes; "
                          "edit the file, or give a model type (e.g. qwen2) to use the size flags")
    _refuse_sparse_only_when_dense(overrides)
    if not overrides.get("resume", False):
        return TrainConfig().updated(overrides)
    from slope.checkpoint import saved_config
    from slope.checkpoint_store import latest_checkpoint

    # The checkpoint's run continues: its settings are the defaults, except where it stopped.
    out = overrides.get("out", TrainConfig.out)
    newest = latest_checkpoint(Path(out) / "checkpoint", "train without --resume first (or point --out at the run's directory)")
    return saved_config(newest).updated({"stop_after": None, **overrides, "out": out})


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def _memory_text(memory: dict) -> str:
    """One line from :meth:`slope.evaluate.LoadedModel.memory_info`."""
    freeze = memory["freeze"]
    text = f"parameter memory {_mib(memory['weight_bytes'])}"
    if freeze is not None:
        text += (f" (freeze_for_inference: {_mib(freeze['total_before'])} -> {_mib(freeze['total_after'])}; parameters "
                 f"{_mib(freeze['parameters_before'])} -> {_mib(freeze['parameters_after'])}, buffers "
                 f"{_mib(freeze['buffers_before'])} -> {_mib(freeze['buffers_after'])})")
    if memory["sparse_layer_bytes"]:
        text += f", of which pruned layers {_mib(memory['sparse_layer_bytes'])}"
    return text


def _nonfinite_exit(results: list[dict]) -> int:
    """1 (with one line on stderr) if any validation loss is not finite: the weights are unusable."""
    bad = [r for r in results if not math.isfinite(r["val_loss"])]
    if bad:
        print(f"slope eval: error: the validation loss is {bad[0]['val_loss']} ({bad[0]['mode']}): the checkpoint's weights "
              "do not compute finite outputs (a diverged run?); use an earlier checkpoint", file=sys.stderr)
        return 1
    return 0


#: Folder kinds ``slope eval`` / ``generate`` read as one plain model, or as adapters on one (:mod:`slope.inference.folder`).
_MODEL_FOLDERS = ("hf", "slope-export-dense", "slope-pretrained", "slope-pretrained-v1", "peft-adapter")


def _model_folder(args: argparse.Namespace, command: str) -> bool:
    """Whether ``--checkpoint`` is a model or adapter folder (not a ``slope train`` checkpoint); a
    :class:`ConfigError` for a folder that holds adapter folders (peft's named adapters: pass one), and
    for the options it cannot take: ``--base`` but for an adapter folder, a
    ``--mode`` it has no form for (:func:`slope.inference.folder.check_mode`), and ``generate``'s
    ``--compare`` / ``--cuda-graphs``."""
    from slope.inference.adapters import adapter_subfolders
    from slope.inference.folder import check_mode
    from slope.serialization.folders import folder_kind

    kind = folder_kind(args.checkpoint)
    named = adapter_subfolders(args.checkpoint) if kind == "unknown" else []
    if named:  # (peft's save_pretrained of an adapter named other than "default")
        raise ConfigError(f"{args.checkpoint} holds peft adapters in a subfolder ({', '.join(named)}): pass --checkpoint "
                          f"{Path(args.checkpoint) / named[0]}")
    if args.base is not None and kind != "peft-adapter":
        raise ConfigError(f"--base {args.base} applies to peft adapter folders (adapter_config.json), and {args.checkpoint} is "
                          "not one; drop --base")
    if kind not in _MODEL_FOLDERS:
        return False
    if args.mode is not None:
        check_mode(args.checkpoint, args.mode, args.base)
    if command == "generate":
        for flag, given in (("--compare", args.compare), ("--cuda-graphs", args.cuda_graphs)):
            if given:
                raise ConfigError(f"slope generate {flag} applies to slope train checkpoints, not to model folders such as "
                                  f"{args.checkpoint}: drop it (slope eval --compare compares a folder's forms)")
    return True


def _folder_title(result: dict, *facts: str) -> str:
    """``"<folder> (model folder, <facts>)"``, or for an adapter folder ``"<folder> (peft adapters on <base>, <facts>)"``."""
    what = "model folder" if result["base"] is None else f"peft adapters on {result['base']}"
    return f"{result['checkpoint']} ({', '.join((what, *facts))})"


def _run_folder_eval(args: argparse.Namespace) -> int:
    from slope.inference.folder import compare_model_folder, default_mode, eval_model_folder

    if args.compare:
        result = compare_model_folder(args.checkpoint, args.device, args.eval_batches, args.base)
        return _print_comparison(args, result, _folder_title(result, result["precision"]))
    mode = args.mode or default_mode(args.checkpoint, args.base)
    result = eval_model_folder(args.checkpoint, args.device, args.eval_batches, mode, args.base)
    if args.json:
        print(json.dumps(result))
        return _nonfinite_exit([result])
    settings = result["settings"]
    source = ("default settings" if not settings["from_run"] else "the run's settings (summary.json)" if settings["split"] == "finetune"
              else "the exported slope train run's held-out split (slope_export in config.json)")
    print(f"{_folder_title(result, result['mode'], settings['precision'])}: validation loss {result['val_loss']:.4f} "
          f"(ppl {result['val_ppl']:.2f}) over {result['val_tokens']:,} tokens of --dataset {settings['dataset']} "
          f"({source}); unigram baseline {result['unigram_loss']:.4f}")
    if result["run_final_val_loss"] is not None:
        print(f"the run reported a final validation loss of {result['run_final_val_loss']:.4f}")
    print(f"{result['tokens_per_s']:,.0f} tokens/s; {_memory_text(result)}")
    return _nonfinite_exit([result])


def _run_eval(args: argparse.Namespace) -> int:
    from slope.evaluate import compare_checkpoint, eval_checkpoint

    if _model_folder(args, "eval"):
        return _run_folder_eval(args)
    if not args.compare:
        result = eval_checkpoint(args.checkpoint, args.device, args.eval_batches, args.mode or "unmerged", progress=None)
        if args.json:
            print(json.dumps(result))
            return _nonfinite_exit([result])
        print(f"step {result['step']} ({result['mode']}): validation loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.2f}) over "
              f"{result['val_tokens']:,} tokens; unigram baseline {result['unigram_loss']:.4f}")
        print(f"{result['tokens_per_s']:,.0f} tokens/s; {_memory_text(result)}")
        if result["note"]:
            print(f"note: {result['note']}")
        return _nonfinite_exit([result])
    result = compare_checkpoint(args.checkpoint, args.device, args.eval_batches, progress=None)
    return _print_comparison(args, result, f"step {result['step']} ({result['precision']})")


def _print_comparison(args: argparse.Namespace, result: dict, title: str) -> int:
    """``slope eval --compare``'s table (or JSON) of ``compare_checkpoint`` / ``compare_model_folder``; the exit status."""
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{title}, {next(iter(result['modes'].values()))['val_tokens']:,} validation tokens; "
              f"unigram baseline {result['unigram_loss']:.4f}")
        print(f"{'mode':<9} {'val loss':>10} {'ppl':>10} {'tokens/s':>10}  memory")
        for mode, r in result["modes"].items():
            print(f"{mode:<9} {r['val_loss']:>10.6f} {r['val_ppl']:>10.3f} {r['tokens_per_s']:>10,.0f}  {_memory_text(r)}")
        for note in [result["note"]] + [r["note"] for r in result["modes"].values()]:
            if note:
                print(f"note: {note}")
        verdict = "agree" if result["agree"] else "DISAGREE"
        print(f"modes {verdict}: max |d loss| {result['max_loss_diff']:.2e} (tolerance {result['loss_tolerance']:g}), "
              f"max |d logit| {result['max_logit_diff']:.2e} (tolerance {result['logit_tolerance']:g})")
    if _nonfinite_exit(list(result["modes"].values())):
        return 1
    if not result["agree"]:
        print("slope eval: error: the inference modes disagree beyond fp tolerance", file=sys.stderr)
        return 1
    return 0


def _run_generate_compare(args: argparse.Namespace) -> None:
    from slope.inference.speed import compare_speed

    rows = compare_speed(args.checkpoint, args.prompt, device=args.device, max_new_tokens=args.max_new_tokens,
                         batch=args.batch or 1, cuda_graphs=args.cuda_graphs)
    print(rows[-1].text)
    graphs = ", CUDA graphs" if args.cuda_graphs else ""
    print(f"greedy, batch {args.batch or 1}, {args.max_new_tokens} new tokens{graphs}:", file=sys.stderr)
    print(f"{'mode':<9} {'prefill tok/s':>14} {'decode tok/s':>13} {'weights MiB':>12}  vs dense (decode)", file=sys.stderr)
    dense = next((r for r in rows if r.mode == "dense"), None)
    for r in rows:
        speedup = f"{r.decode_tokens_per_s / dense.decode_tokens_per_s:.2f}x" if dense else "-"
        print(f"{r.mode:<9} {r.prefill_tokens_per_s:>14,.1f} {r.decode_tokens_per_s:>13,.1f} {r.weight_bytes / 2**20:>12.2f}  {speedup}",
              file=sys.stderr)
    if len({r.text for r in rows}) > 1:
        print("note: the modes' greedy texts differ (rounding ties can flip a token in bf16/fp16)", file=sys.stderr)


def _run_generate(args: argparse.Namespace) -> None:
    from slope.evaluate import generate, load_trained_model

    if _model_folder(args, "generate"):
        from slope.inference.folder import default_mode, generate_from_folder
        from slope.serialization.folders import folder_kind

        mode = args.mode or default_mode(args.checkpoint, args.base)
        text, new_tokens, seconds = generate_from_folder(args.checkpoint, args.prompt, device=args.device,
                                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                                         top_k=args.top_k, seed=args.seed, mode=mode, base=args.base)
        print(text)
        what = "peft adapters" if folder_kind(args.checkpoint) == "peft-adapter" else "model folder"
        print(f"[{what}, {mode}] {new_tokens} new tokens in {seconds:.2f} s ({new_tokens / max(seconds, 1e-9):,.1f} tokens/s)",
              file=sys.stderr)
        return
    if args.compare:
        return _run_generate_compare(args)
    mode = args.mode or "unmerged"
    loaded = load_trained_model(args.checkpoint, args.device, mode)
    gen = generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, progress=None, cuda_graphs=args.cuda_graphs)
    print(gen.text)
    # Statistics go to stderr, so stdout is only the text.
    print(f"[{mode}] {gen.new_tokens} new tokens in {gen.seconds:.2f} s ({gen.tokens_per_s:,.1f} tokens/s); "
          f"{_memory_text(loaded.memory_info())}", file=sys.stderr)
    if loaded.note:
        print(f"note: {loaded.note}", file=sys.stderr)


def _run_export(args: argparse.Namespace) -> None:
    from slope.serialization.export import export_model

    result = export_model(args.checkpoint, args.output_dir, args.form)
    step = "" if result.step is None else f" (step {result.step})"
    print(f"exported {result.source}{step} to {result.output_dir} ({result.form} form)")
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)


def _run_oneshot(args: argparse.Namespace) -> int:
    from slope.data import with_dataset_config
    from slope.evaluate import resolve_device
    from slope.pruning import oneshot
    from slope.pruning.loading import load_model
    from slope.pruning.recipe import parse_recipe
    from slope.pruning.sparsegpt import PruningError
    from slope.parallel import launched_rank
    from slope.serialization.folders import check_new_output_dir

    rank, world = launched_rank()
    if rank != 0:  # under a launcher (the seed's `accelerate launch ... oneshot`) rank 0 prunes alone
        return 0
    if world > 1:
        print(f"note: slope oneshot prunes in one process (calibration runs block by block): rank 0 does the work, the other "
              f"{world - 1} launched process(es) exit")
    if args.splits != "train":
        print(f"slope oneshot: error: --splits {args.splits!r}: calibration reads the 'train' split only (held-out text "
              "stays unseen); use --splits train", file=sys.stderr)
        return 1
    if not args.concatenate_data:
        print("note: --concatenate_data False has no effect: calibration windows are always cut from the concatenated text")
    try:
        parse_recipe(args.recipe, stage=args.stage)  # recipe and output folder errors before the model loads
        check_new_output_dir(args.output_dir)
        model, tokenizer = load_model(args.model, resolve_device(args.device), args.precision)
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        dataset = with_dataset_config(args.dataset, args.dataset_config_name) if args.dataset else args.dataset
        oneshot(model, args.recipe, dataset, tokenizer, args.num_calibration_samples, args.max_seq_len, args.output_dir,
                text_field=args.text_field, stage=args.stage)
    except (ValueError, OSError, PruningError) as e:
        from slope.notes import report_error

        report_error("oneshot", e)
        return 1
    return 0


def _quiet_deepspeed_without_accelerator() -> None:
    """transformers imports DeepSpeed wherever it is installed, and on a machine without any
    accelerator DeepSpeed then warns that it "was unable to detect" one before settling on the
    CPU: name the CPU for it up front (a user's own ``DS_ACCELERATOR`` is kept)."""
    import os

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _resume_advice(args: argparse.Namespace) -> str:
    """What an interrupted command's run can be continued with ("" for commands that train nothing)."""
    if args.command == "train":
        from slope.checkpoint_store import latest_checkpoint

        try:
            out = Path(resolve_train_config(args).out)
        except (ValueError, OSError):
            out = Path(getattr(args, "out", TrainConfig().out))
        try:
            latest_checkpoint(out / "checkpoint")
        except (RuntimeError, ValueError, OSError):  # (CheckpointError: none, or none readable)
            return "; no checkpoint was written yet (run the command again to start over)"
        return f"; the run keeps its last complete checkpoint (continue with: slope train --out {out} --resume)"
    if args.command == "apply":
        return "; finished stages are kept: run the same command again to continue" + (
            "" if getattr(args, "save_steps", None) else " (without --save-steps an interrupted train stage starts again)")
    if args.command not in ("finetune", "sparse-finetune"):
        return ""
    from slope.finetune_run import interrupted_advice

    return interrupted_advice(getattr(args, "output_dir", None), getattr(args, "save_steps", None))


def main(argv: list[str] | None = None) -> int:
    """``slope <command> ...``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_deepspeed_without_accelerator()
    with warnings.catch_warnings():
        warnings.showwarning = warnings_as_notes(warnings.showwarning)
        return _run(parser, args)


def _settings_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's usage line and ``error: message`` (exit status 2), said once under a launcher."""
    from slope.parallel import launched_rank

    if launched_rank()[0] == 0:
        parser.error(message)
    raise SystemExit(2)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command; known errors end in one line and exit status 1."""
    from slope.checkpoint import CheckpointError
    from slope.data import DataError
    from slope.durable import StorageError
    from slope.guard import DivergenceError
    from slope.runlock import RunLockError
    from slope.serialization.folders import OutputDirError

    try:
        if args.command == "train":
            try:
                cfg = resolve_train_config(args)
            except ConfigError as e:
                _settings_error(parser, str(e))
            from slope.train import train

            train(cfg)
        elif args.command == "eval":
            if args.eval_batches is not None and args.eval_batches < 1:
                parser.error("--eval-batches must be >= 1")
            if args.compare and args.mode is not None:
                parser.error("--compare evaluates every mode; drop --mode")
            return _run_eval(args)
        elif args.command == "sparse-finetune":
            from slope.dynamic.cli import run as run_sparse_finetune

            return run_sparse_finetune(args)
        elif args.command == "generate":
            if args.max_new_tokens < 1:
                parser.error("--max-new-tokens must be >= 1")
            if args.compare and args.mode is not None:
                parser.error("--compare decodes in every mode; drop --mode")
            if args.batch is not None and not args.compare:
                parser.error("--batch applies to --compare (one prompt at a time otherwise); add --compare or drop --batch")
            if args.batch is not None and args.batch < 1:
                parser.error("--batch must be >= 1")
            if not args.temperature >= 0:
                parser.error(f"--temperature must be >= 0 (0: greedy decoding), got {args.temperature}")
            if args.top_k < 0:
                parser.error(f"--top-k must be >= 0 (0: no top-k filter), got {args.top_k}")
            _run_generate(args)
        elif args.command == "export":
            _run_export(args)
        elif args.command == "oneshot":
            return _run_oneshot(args)
        elif args.command == "finetune":
            from slope.recovery.cli import run as run_finetune

            return run_finetune(args)
        elif args.command == "apply":
            from slope.stages.cli import run as run_apply

            return run_apply(args)
    except (CheckpointError, DataError, ConfigError, StorageError, DivergenceError, RunLockError, OutputDirError) as e:
        from slope.notes import report_error

        report_error(args.command, e)
        return 1
    except KeyboardInterrupt:
        from slope.parallel import launched_rank

        if launched_rank()[0] == 0:  # (every rank is interrupted alike)
            print(f"slope {args.command}: interrupted{_resume_advice(args)}", file=sys.stderr)
        return 130
    return 0
