"""Sparse vs dense GEMM on LLM shapes: ``y = x Wᵀ`` with ``x (tokens, in)``, ``W (out, in)`` 2:4.

For every shape the dense figure is ``F.linear`` (cuBLAS on CUDA) and every available backend's
``matmul`` is timed against it with the calls alternating (dense, sparse, dense, ...; CUDA
events, L2 flushed before each call), plus ``auto``, recording which backend it picked. TFLOP/s
count the dense work ``2·tokens·out·in`` for both, so the ratio of TFLOP/s equals the speedup.
Every sparse result is checked against the dense product (``rel_error``).

    python performance_experiments/gemm.py                     # GPU: LLM shapes, bf16 then fp16
    python performance_experiments/gemm.py --budget-s 90       # stop starting shapes after 90 s
    python performance_experiments/gemm.py --smoke             # CPU, tiny, seconds
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from performance_experiments.common import (
    MODELS,
    Budget,
    Recorder,
    available_backends,
    base_parser,
    default_backends,
    environment,
    error_text,
    free_memory,
    layer_shape,
    make_record,
    parse_dtype,
    pick_device,
    ratio,
    time_fn,
    time_interleaved,
)
from slope.backends import backend_class, resolve_backend
from slope.masks import nm_mask

SCRIPT = "gemm"
TOKENS = (8192, 16384, 2048, 512)


def llm_cases(models, tokens, dtypes, layers=("ffn_up", "ffn_down", "attn_o")) -> list[dict]:
    """Shapes in priority order (what a budget cuts comes last): token counts in the given order,
    then layers, then dtypes, then models."""
    cases = []
    for t in tokens:
        for layer in layers:
            for dtype in dtypes:
                for model in models:
                    out, inp = layer_shape(model, layer)
                    cases.append({"model": model, "layer": layer, "tokens": t, "out": out, "in": inp, "dtype": dtype})
    return cases


def smoke_cases() -> list[dict]:
    return [
        {"model": "tiny", "layer": "ffn_up", "tokens": 64, "out": 128, "in": 64, "dtype": "fp32"},
        {"model": "tiny", "layer": "ffn_down", "tokens": 64, "out": 64, "in": 128, "dtype": "bf16"},
    ]


def cpu_cases() -> list[dict]:
    return [
        {"model": "small", "layer": layer, "tokens": 512, "out": out, "in": inp, "dtype": dtype}
        for dtype in ("fp32", "bf16")
        for layer, out, inp in (("ffn_up", 2816, 1024), ("ffn_down", 1024, 2816))
    ]


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _auto_backend(case, dtype, device):
    """What ``backend="auto"`` runs for this layer shape and token count (a timed choice per token
    bucket, dense fallback included)."""
    try:
        from slope.backends.auto import AUTO_CHOOSER
    except ImportError:
        return resolve_backend("auto", True, device, dtype)(tiling=True)
    return AUTO_CHOOSER.choose((case["out"], case["in"]), dtype, device, True, case["tokens"])


def run_case(case: dict, backend_names, device, env, budget, timing, emit) -> None:
    """Dense and every backend on one shape; one record per backend to ``emit`` (errors recorded)."""
    dtype = parse_dtype(case["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(case["out"], case["in"], device=device, dtype=dtype, generator=gen)
    mask = nm_mask(weight, 2, 4)
    dense_weight = weight * mask
    del weight
    x = torch.randn(case["tokens"], case["in"], device=device, dtype=dtype, generator=gen)
    flop = 2.0 * case["tokens"] * case["out"] * case["in"]
    reference = F.linear(x, dense_weight)

    def figures(t: dict) -> dict:
        return {"time_ms": t["ms"], "tflops": round(flop / t["ms"] / 1e9, 3), "ms_min": t["ms_min"],
                "ms_max": t["ms_max"], "reps": t["reps"]}

    dense_fn = lambda: F.linear(x, dense_weight)  # noqa: E731
    dense = figures(time_fn(dense_fn, device, max_reps=timing["reps"], **timing))  # for records without a sparse figure

    names, skipped = available_backends([n for n in backend_names if n != "auto"], device, dtype)
    entries = [(name, backend_class(name)(tiling=True)) for name in names]
    if device.type == "cuda" and "auto" in backend_names:
        try:
            entries.append(("auto", _auto_backend(case, dtype, device)))
        except Exception as exc:  # noqa: BLE001 (recorded)
            skipped["auto"] = error_text(exc)
    config = dict(case)
    for label, reason in skipped.items():
        emit(make_record(SCRIPT, env, config, dense, None, backend=label, gemm_speedup=None, error=f"unavailable: {reason}"))
    for label, backend in entries:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, dense, None, backend=label, gemm_speedup=None, error="skipped: budget"))
            continue
        extra = {"backend": label}
        if label == "auto":
            extra["auto_choice"] = backend.name
        try:
            compress_t = time_fn(lambda: backend.make_operand(dense_weight, mask), device, warmup=1, reps=3, max_reps=3, flush_l2=False)
            operand = backend.make_operand(dense_weight, mask)
            err = _rel_error(backend.matmul(x, operand), reference)
            # Dense and sparse calls alternate (same clocks and thermal state for both).
            t = time_interleaved({"dense": dense_fn, "sparse": lambda: backend.matmul(x, operand)}, device, **timing)
            pair_dense, sparse = figures(t["dense"]), {**figures(t["sparse"]), "make_operand_ms": compress_t["ms"]}
            emit(make_record(SCRIPT, env, config, pair_dense, sparse, gemm_speedup=ratio(pair_dense["time_ms"], sparse["time_ms"]),
                             rel_error=round(err, 6), error=None, **extra))
            del operand
        except Exception as exc:  # noqa: BLE001 (a failing backend must not stop the benchmark)
            emit(make_record(SCRIPT, env, config, dense, None, gemm_speedup=None, error=error_text(exc), **extra))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--dtypes", default="bf16,fp16", help="GPU dtypes in priority order")
    parser.add_argument("--models", default="llama2-7b,llama3-8b,llama2-70b,llama2-13b,llama-1b",
                        help=f"comma list of {list(MODELS)}, in priority order")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts in priority order")
    parser.add_argument("--layers", default="ffn_up,ffn_down,attn_o")
    parser.add_argument("--shapes", default=None,
                        help="comma list of model:layer pairs (e.g. llama2-7b:ffn_up) instead of --models x --layers")
    args = parser.parse_args(argv)
    device = pick_device(args)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.smoke:
        cases, timing = smoke_cases(), {"warmup": 1, "reps": 2}
    elif device.type == "cpu":
        cases, timing = cpu_cases(), {"warmup": 2, "reps": 9}
    else:
        tokens, dtypes = [int(t) for t in args.tokens.split(",")], args.dtypes.split(",")
        if args.shapes:
            pairs = [pair.split(":") for pair in args.shapes.split(",")]
            if any(len(p) != 2 for p in pairs):
                parser.error(f"--shapes takes model:layer pairs, got {args.shapes!r}")
            cases = [c for model, layer in pairs for c in llm_cases([model], tokens, dtypes, [layer])]
        else:
            cases = llm_cases(args.models.split(","), tokens, dtypes, args.layers.split(","))
        timing = {"warmup": 5, "reps": 30, "flush_l2": True}
    env, budget = environment(device), Budget(args.budget_s)
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for case in cases:
        if budget.expired():
            skipped += 1
            continue
        try:
            run_case(case, backends, device, env, budget, timing, emit)
        except Exception as exc:  # noqa: BLE001 (dense failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, dict(case), None, None, backend="dense", gemm_speedup=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[gemm] budget reached: {skipped} of {len(cases)} shapes not measured")
    return emit.finish(shapes_not_measured=skipped)


if __name__ == "__main__":
    main()
