"""Memory of training and inference, dense vs SLoPe (each backend), Llama-style models.

Training: the model, its optimizers (``AdamW``; SLoPe adds ``ADAMWSparse`` for the sparse weights)
after one warm-up step, then one measured step. Inference: a fresh model in eval mode (a pruned
one converted by ``slope.lora.freeze_for_inference`` where that exists: no ``M_t``, no training
state; ``inference_form`` says which), one no-grad forward over the prompt batch.

- On CUDA the peak comes from the caching allocator (``torch.cuda.max_memory_allocated`` over
  the measured step / forward; ``method = "allocator"``).
- Everywhere the bytes held between steps are counted tensor by tensor
  (:func:`performance_experiments.models.state_bytes`: weights incl. masks/metadata, gradients,
  optimizer state, cached backend operands). On CPU those counts are the figures
  (``method = "counted"``).

Ratios (sparse / dense): ``train_memory_ratio`` (peak on CUDA, counted state on CPU),
``optimizer_memory_ratio``, ``weights_memory_ratio``, ``inference_memory_ratio``.

    python performance_experiments/memory.py --budget-s 60
    python performance_experiments/memory.py --smoke
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from performance_experiments.common import (
    Budget,
    Recorder,
    available_backends,
    base_parser,
    default_backends,
    environment,
    error_text,
    free_memory,
    make_record,
    pick_device,
    ratio,
    synchronize,
)
from performance_experiments.models import Trainer, autocast, build_model, describe, random_tokens, state_bytes

SCRIPT = "memory"


def _reset_peak(device) -> int:
    synchronize(device)
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device) -> int | None:
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _inference_form(model) -> str:
    """Convert a pruned model to slope's inference-only form where that exists (drops ``M_t`` and
    training state); returns which form is measured."""
    try:
        from slope.lora import freeze_for_inference
    except ImportError:
        return "training-layers"
    freeze_for_inference(model)
    return "freeze_for_inference"


def measure(name, variant, device, precision, batch, seq) -> dict:
    """Training and inference memory figures of one variant (bytes)."""
    free_memory(device)
    ids = random_tokens(describe(name)["vocab"], batch, seq, device)
    model = build_model(name, variant, device, precision)
    trainer = Trainer(model, device, precision, ids)
    trainer.step()  # optimizer state exists from here on
    at_rest = _reset_peak(device)
    trainer.step()
    train_peak = _peak(device)
    train_state = state_bytes(model, trainer.optimizers())
    del trainer, model
    free_memory(device)

    model = build_model(name, variant, device, precision).eval()
    inference_form = "dense" if variant == "dense" else _inference_form(model)
    at_rest_inference = _reset_peak(device)
    with torch.no_grad(), autocast(device, precision):
        model(input_ids=ids, use_cache=False)
    infer_peak = _peak(device)
    infer_state = state_bytes(model)
    del model
    free_memory(device)
    return {
        "train_peak_bytes": train_peak,
        "train_at_rest_bytes": at_rest if device.type == "cuda" else None,
        "train_state_bytes": train_state,
        "inference_peak_bytes": infer_peak,
        "inference_at_rest_bytes": at_rest_inference if device.type == "cuda" else None,
        "inference_state_bytes": infer_state,
        "inference_form": inference_form,
    }


def ratios(dense: dict, sparse: dict, on_gpu: bool) -> dict:
    d_train, s_train = dense["train_state_bytes"], sparse["train_state_bytes"]
    d_inf, s_inf = dense["inference_state_bytes"], sparse["inference_state_bytes"]
    return {
        "train_memory_ratio": ratio(sparse["train_peak_bytes"], dense["train_peak_bytes"]) if on_gpu
        else ratio(s_train["total"], d_train["total"]),
        "train_state_memory_ratio": ratio(s_train["total"], d_train["total"]),
        "optimizer_memory_ratio": ratio(s_train["optimizer"], d_train["optimizer"]),
        "weights_memory_ratio": ratio(s_inf["weights"] + s_inf["operands"], d_inf["weights"]),
        "inference_memory_ratio": ratio(sparse["inference_peak_bytes"], dense["inference_peak_bytes"]) if on_gpu
        else ratio(s_inf["total"], d_inf["total"]),
    }


def run_model(name, backends, device, env, budget, args, emit) -> None:
    on_gpu = device.type == "cuda"
    config = {**describe(name), "batch": args.batch, "seq": args.seq, "precision": args.precision,
              "method": "allocator" if on_gpu else "counted"}
    dense = measure(name, "dense", device, args.precision, args.batch, args.seq)
    dtype = torch.bfloat16 if args.precision in ("autocast", "bf16") else torch.float32
    names, skipped = available_backends(backends, device, dtype)
    for n, why in skipped.items():
        emit(make_record(SCRIPT, env, config, dense, None, backend=n, train_memory_ratio=None, error=f"unavailable: {why}"))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, train_memory_ratio=None, error="skipped: budget"))
            continue
        try:
            sparse = measure(name, backend, device, args.precision, args.batch, args.seq)
            emit(make_record(SCRIPT, env, config, dense, sparse, backend=backend, error=None, **ratios(dense, sparse, on_gpu)))
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, train_memory_ratio=None, error=error_text(exc)))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--models", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=("autocast", "bf16", "fp32"))
    args = parser.parse_args(argv)
    device = pick_device(args)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.smoke:
        defaults = ("llama-smoke", 2, 32, "fp32")
    elif device.type == "cpu":
        defaults = ("llama-cpu-20m", 4, 128, "fp32")
    else:
        defaults = ("llama-1b,llama2-7b-4L", 4, 2048, "autocast")
    models = (args.models or defaults[0]).split(",")
    args.batch, args.seq = args.batch or defaults[1], args.seq or defaults[2]
    args.precision = args.precision or defaults[3]
    env, budget = environment(device), Budget(args.budget_s)
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for name in models:
        if budget.expired():
            skipped += 1
            continue
        try:
            run_model(name, backends, device, env, budget, args, emit)
        except Exception as exc:  # noqa: BLE001 (the dense baseline failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, describe(name), None, None, backend="dense", train_memory_ratio=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[memory] budget reached: {skipped} of {len(models)} models not measured")
    return emit.finish(models_not_measured=skipped)


if __name__ == "__main__":
    main()
