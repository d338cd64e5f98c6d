"""End-to-end training step of Llama-style models: dense vs SLoPe (each backend).

A step is forward + loss + backward + ``ADAMWSparse`` (sparse weights) + ``AdamW`` (the rest);
dense uses ``AdamW`` for everything. Step time is the median over timed steps after warm-up; the
ratio is ``e2e_speedup`` (dense step time / sparse step time); on CPU also
``e2e_cputime_speedup``, the same in process CPU time (robust to a shared machine's load); on GPU
also ``train_peak_memory_ratio`` (sparse / dense peak allocated memory over the timed steps).
On CUDA both sides train with PyTorch's fused AdamW (the sparse values through ``ADAMWSparse``).
``M_t`` refreshes happen inside the timed steps at their natural rate (every
``--mask-change-freq`` steps). ``--gradient-checkpointing`` runs both models with activation
checkpointing (``slope train --gradient-checkpointing``): the activations no longer dominate the
peak, so ``train_peak_memory_ratio`` shows what the weights, gradients, optimizer state and
operands cost.

    python performance_experiments/e2e.py --budget-s 120      # GPU: llama-1b, 7B/8B layers, 125M
    python performance_experiments/e2e.py                     # CPU: small model, simulated + reference
    python performance_experiments/e2e.py --smoke
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
    backends_used,
    base_parser,
    default_backends,
    environment,
    error_text,
    free_memory,
    make_record,
    pick_device,
    ratio,
    time_fn,
    time_interleaved,
)
from performance_experiments.models import Trainer, build_model, describe, random_tokens

SCRIPT = "e2e"


def prepare(name, variant, device, args) -> Trainer:
    """A model variant with its optimizers after one step (so optimizer state exists)."""
    precision, batch, seq, mask_change_freq = args.precision, args.batch, args.seq, args.mask_change_freq
    model = build_model(name, variant, device, precision)
    if args.gradient_checkpointing:
        from slope.finetune_loop import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    trainer = Trainer(model, device, precision, random_tokens(describe(name)["vocab"], batch, seq, device), mask_change_freq)
    trainer.step()
    return trainer


def figures(trainer: Trainer, t: dict, batch: int, seq: int) -> dict:
    loss = float(trainer.loss)
    if loss != loss:  # NaN: the timings would be meaningless
        raise FloatingPointError("loss is NaN")
    result = {"step_ms": t["ms"], "tokens_per_s": round(batch * seq / t["ms"] * 1e3, 1), "reps": t["reps"],
              "loss": round(loss, 4), "parameters": sum(p.numel() for p in trainer.model.parameters()),
              "backends_used": backends_used(trainer.model)}
    if "cpu_ms" in t:
        result["step_cpu_ms"] = t["cpu_ms"]
    return result


def measure_gpu(name, variant, device, args, timing) -> dict:
    """One variant alone on the GPU: median step time, tokens/s, loss, peak memory (of the whole
    measurement, set-up included, and of the timed steps alone), and the memory growth over the
    timed steps (growth would be a leak)."""
    torch.cuda.reset_peak_memory_stats(device)
    trainer = prepare(name, variant, device, args)
    setup_peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    result = figures(trainer, time_fn(trainer.step, device, flush_l2=False, **timing), args.batch, args.seq)
    result["peak_step_bytes"] = torch.cuda.max_memory_allocated(device)
    result["peak_allocated_bytes"] = max(setup_peak, result["peak_step_bytes"])
    result["allocated_growth_bytes"] = torch.cuda.memory_allocated(device) - allocated
    return result


def run_model(name, backends, device, env, budget, args, timing, emit) -> None:
    """GPU: dense, then each backend alone. CPU (shared, drifting load): dense and each backend
    built side by side and their steps alternated, so the dense figure of each record comes from
    the same rounds as its sparse figure."""
    config = {**describe(name), "batch": args.batch, "seq": args.seq, "precision": args.precision,
              "mask_change_freq": args.mask_change_freq, "gradient_checkpointing": args.gradient_checkpointing, "timing": "sequential" if device.type == "cuda" else "interleaved"}
    on_gpu = device.type == "cuda"
    if on_gpu:
        dense = measure_gpu(name, "dense", device, args, timing)
        free_memory(device)
    else:
        dense_trainer = prepare(name, "dense", device, args)
        dense = None
    dtype = torch.bfloat16 if args.precision in ("autocast", "bf16") else torch.float32
    names, skipped = available_backends(backends, device, dtype)
    for n, why in skipped.items():
        emit(make_record(SCRIPT, env, config, dense, None, backend=n, e2e_speedup=None, error=f"unavailable: {why}"))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, e2e_speedup=None, error="skipped: budget"))
            continue
        try:
            if on_gpu:
                sparse = measure_gpu(name, backend, device, args, timing)
            else:
                trainer = prepare(name, backend, device, args)
                t = time_interleaved({"dense": dense_trainer.step, "sparse": trainer.step}, device,
                                     warmup=timing["warmup"], reps=timing["reps"])
                dense, sparse = figures(dense_trainer, t["dense"], args.batch, args.seq), figures(trainer, t["sparse"], args.batch, args.seq)
                del trainer
            extra = {}
            if "peak_step_bytes" in sparse:  # GPU: peak memory of a training step, sparse / dense
                extra["train_peak_memory_ratio"] = ratio(sparse["peak_step_bytes"], dense["peak_step_bytes"])
            if "step_cpu_ms" in sparse:  # CPU: the same ratio in process CPU time (load-independent)
                extra["e2e_cputime_speedup"] = ratio(dense["step_cpu_ms"], sparse["step_cpu_ms"])
            emit(make_record(SCRIPT, env, config, dense, sparse, backend=backend,
                             e2e_speedup=ratio(dense["step_ms"], sparse["step_ms"]), error=None, **extra))
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, e2e_speedup=None, error=error_text(exc)))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--models", default=None, help="comma list of performance_experiments.models.LLAMA_CONFIGS")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=("autocast", "bf16", "fp32"))
    parser.add_argument("--mask-change-freq", type=int, default=100)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on both sides")
    args = parser.parse_args(argv)
    device = pick_device(args)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.smoke:
        defaults = ("llama-smoke", 2, 32, "fp32")
        timing = {"warmup": 1, "reps": 1, "max_reps": 1}
    elif device.type == "cpu":
        defaults = ("llama-cpu-20m", 4, 128, "fp32")
        timing = {"warmup": 2, "reps": 5, "max_reps": 5}
    else:
        defaults = ("llama-1b,llama2-7b-4L,llama-125m,llama3-8b-4L", 4, 2048, "autocast")
        timing = {"warmup": 3, "reps": 10, "max_reps": 10}
    models = (args.models or defaults[0]).split(",")
    args.batch = args.batch or defaults[1]
    args.seq = args.seq or defaults[2]
    args.precision = args.precision or defaults[3]
    env, budget = environment(device), Budget(args.budget_s)
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for name in models:
        if budget.expired():
            skipped += 1
            continue
        try:
            run_model(name, backends, device, env, budget, args, timing, emit)
        except Exception as exc:  # noqa: BLE001 (the dense baseline failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, describe(name), None, None, backend="dense", e2e_speedup=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[e2e] budget reached: {skipped} of {len(models)} models not measured")
    return emit.finish(models_not_measured=skipped)


if __name__ == "__main__":
    main()
