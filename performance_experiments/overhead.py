"""SLoPe's one-off and periodic costs next to a dense training step of the same model.

- ``prune_ms``: ``prune_model`` once (N:M masks, ``M_t``, compression) — one-off;
- ``mask_t_refresh_ms``: ``update_mask_t()`` of every layer once — every ``mask_change_freq`` steps;
- ``operand_rebuild_ms``: every layer's forward and backward backend operands rebuilt after the
  values changed (masks unchanged) — after every optimizer step. For 2:4 layers on backends that
  build operands from kept values (reference, triton, cutlass-sm90) that is a cast of ``values``
  (forward) and :func:`slope.kernels.transpose_kept_2to4` (backward) with cached metadata; other
  backends scatter to a dense weight and ``make_operand`` it. Median of 3, after one untimed
  rebuild (the first after an ``M_t`` refresh also re-derives the backward metadata).

Each is compared with the dense model's training step (``dense.step_ms``, measured in the same
run): ``prune_overhead_ratio`` (prune / step), ``mask_refresh_overhead_ratio`` (refresh /
``mask_change_freq`` / step, i.e. per step amortised) and ``operand_rebuild_overhead_ratio``
(rebuild / step).

    python performance_experiments/overhead.py --budget-s 40
    python performance_experiments/overhead.py --smoke
"""
from __future__ import annotations

import sys
import time
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
    prune_kwargs,
    ratio,
    synchronize,
    time_fn,
)
from performance_experiments.models import Trainer, build_model, describe, random_tokens
from slope import prune_model, sparse_modules

SCRIPT = "overhead"


def _elapsed_ms(fn, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def sparse_costs(name, backend, device, precision, dtype) -> dict:
    model = build_model(name, "dense", device, precision)
    prune_ms = _elapsed_ms(lambda: prune_model(model, verbose=False, **prune_kwargs(backend)), device)
    layers = [m for _, m in sparse_modules(model)]

    def refresh_all():
        for layer in layers:
            layer.update_mask_t()

    def rebuild_all():
        # What every training step pays after the optimizer changed the values (mask unchanged):
        # the layer's own rebuild of its forward and input-gradient operands (auto: per direction).
        for layer in layers:
            with torch.no_grad():
                layer.values.mul_(1.0)  # a new version of the values, as after opt.step()
            layer.refresh()
            layer._operand("forward", dtype, device)
            layer._operand("backward", dtype, device)

    refresh_all()  # warm-up (kernel compilation, allocator)
    refresh_ms = _elapsed_ms(refresh_all, device)
    # Timed after the refresh's own first rebuild: the metadata derived from M_t is re-derived
    # once per M_t change (every mask_change_freq steps), not per step.
    rebuild = time_fn(rebuild_all, device, warmup=1, reps=3, max_reps=3, flush_l2=False)
    return {
        "prune_ms": round(prune_ms, 3),
        "mask_t_refresh_ms": round(refresh_ms, 3),
        "operand_rebuild_ms": round(rebuild["ms"], 3),
        "sparse_layers": len(layers),
        "backends_used": backends_used(model),
    }


def run_model(name, backends, device, env, budget, args, timing, emit) -> None:
    config = {**describe(name), "batch": args.batch, "seq": args.seq, "precision": args.precision,
              "mask_change_freq": args.mask_change_freq}
    model = build_model(name, "dense", device, args.precision)
    trainer = Trainer(model, device, args.precision, random_tokens(describe(name)["vocab"], args.batch, args.seq, device))
    dense = {"step_ms": time_fn(trainer.step, device, flush_l2=False, **timing)["ms"]}
    del trainer, model
    free_memory(device)
    dtype = torch.bfloat16 if args.precision in ("autocast", "bf16") else torch.float32
    names, skipped = available_backends(backends, device, dtype)
    for n, why in skipped.items():
        emit(make_record(SCRIPT, env, config, dense, None, backend=n, prune_overhead_ratio=None, error=f"unavailable: {why}"))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, prune_overhead_ratio=None, error="skipped: budget"))
            continue
        try:
            sparse = sparse_costs(name, backend, device, args.precision, dtype)
            emit(make_record(
                SCRIPT, env, config, dense, sparse, backend=backend, error=None,
                prune_overhead_ratio=ratio(sparse["prune_ms"], dense["step_ms"]),
                mask_refresh_overhead_ratio=ratio(sparse["mask_t_refresh_ms"] / args.mask_change_freq, dense["step_ms"]),
                operand_rebuild_overhead_ratio=ratio(sparse["operand_rebuild_ms"], dense["step_ms"]),
            ))
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, prune_overhead_ratio=None, error=error_text(exc)))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--models", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=("autocast", "bf16", "fp32"))
    parser.add_argument("--mask-change-freq", type=int, default=100)
    args = parser.parse_args(argv)
    device = pick_device(args)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.smoke:
        defaults, timing = ("llama-smoke", 2, 32, "fp32"), {"warmup": 1, "reps": 1, "max_reps": 1}
    elif device.type == "cpu":
        defaults, timing = ("llama-cpu-20m", 4, 128, "fp32"), {"warmup": 1, "reps": 3, "max_reps": 3}
    else:
        defaults, timing = ("llama-1b", 4, 2048, "autocast"), {"warmup": 2, "reps": 5, "max_reps": 5}
    for key, value in zip(("models", "batch", "seq", "precision"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    env, budget = environment(device), Budget(args.budget_s)
    models = args.models.split(",")
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for name in models:
        if budget.expired():
            skipped += 1
            continue
        try:
            run_model(name, backends, device, env, budget, args, timing, emit)
        except Exception as exc:  # noqa: BLE001 (the dense baseline failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, describe(name), None, None, backend="dense", prune_overhead_ratio=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[overhead] budget reached: {skipped} of {len(models)} models not measured")
    return emit.finish(models_not_measured=skipped)


if __name__ == "__main__":
    main()
