"""Where the time of a SLoPe training step and of a decode step goes: ``torch.profiler`` tables.

A diagnostic beside the ratio benchmarks (``layer.py`` and ``inference.py`` say *how much* slower
or faster; this says *why*). For each workload, dense and sparse:

- ``layer_step``: one linear layer's training step (forward, backward with input gradient,
  optimizer step; fp32 master weights under autocast), as in ``layer.py``;
- ``decode``: one greedy decode step with the KV cache of a Llama-style model (sparse: merged
  sparse+LoRA inference form), as in ``inference.py``.

Each runs a few warm-up iterations, then ``--iters`` iterations under the profiler. A record holds,
per side, the profiled wall time per iteration and the ``--top`` operators by self time on the
device (CUDA) or the CPU, per iteration (name, calls, self ms, and CPU ms spent launching them),
and on CUDA the peak allocated memory of the workload (model, optimizer state, activations).
Results go to ``results/<device>/breakdown.json`` (not rendered by ``summarize.py``); the tables
are printed.

    python performance_experiments/breakdown.py --budget-s 60
    python performance_experiments/breakdown.py --smoke
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from performance_experiments.common import (
    Budget, Recorder, base_parser, environment, error_text, free_memory, make_record, parse_dtype, pick_device,
    prune_kwargs, ratio, synchronize,
)
from performance_experiments.models import build_model, describe, random_tokens
from slope import prune_model
from slope.inference.decode import cache_keyword
from slope.optimizers import ADAMWSparse

SCRIPT = "breakdown"


def profile_iterations(fn, device: torch.device, iters: int, warmup: int, top: int) -> dict:
    """Wall ms per iteration and the ``top`` operators by self time (device time on CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    on_device = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # older PyTorch
            device_us = getattr(event, "self_cuda_time_total", 0)
        rows.append({
            "name": event.key,
            "calls_per_iter": event.count / iters,
            "self_ms_per_iter": round((device_us if on_device else event.self_cpu_time_total) / 1e3 / iters, 4),
            "cpu_ms_per_iter": round(event.self_cpu_time_total / 1e3 / iters, 4),
        })
    rows.sort(key=lambda r: r["self_ms_per_iter"], reverse=True)
    total = sum(r["self_ms_per_iter"] for r in rows)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_device else None
    return {"wall_ms_per_iter": round(wall_ms, 4), "self_ms_total_per_iter": round(total, 4),
            "time_base": "device" if on_device else "cpu", "peak_mib": peak and round(peak, 1), "top_ops": rows[:top]}


def layer_step(shape: tuple[int, int], tokens: int, dtype: torch.dtype, device: torch.device, backend: str | None):
    """A closure running one training step of ``nn.Linear(in, out)`` (``backend=None``: dense) with
    fp32 master weights, under autocast in ``dtype`` unless that is fp32 (as ``layer.py`` on CUDA)."""
    out_features, in_features = shape
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device=device))
    if backend is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=(device.type == "cuda") or None)
    else:
        prune_model(model, verbose=False, **prune_kwargs(backend))
        opt = ADAMWSparse(model, lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, generator=gen, requires_grad=True)
    dy = torch.randn(tokens, out_features, device=device, dtype=dtype, generator=gen)

    def step():
        x.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = model(x)
        y.backward(dy)
        opt.step()
        opt.zero_grad()

    return step


def decode_step(name: str, backend: str | None, device: torch.device, batch: int, prompt: int, lora_rank: int):
    """A closure running one greedy decode step with the KV cache after a ``prompt``-token prefill."""
    if backend is None:
        model = build_model(name, "dense", device, "bf16" if device.type == "cuda" else "fp32")
    else:
        model = build_model(name, backend, device, "bf16" if device.type == "cuda" else "fp32",
                            lora_rank=lora_rank, merge_lora=True)
    model.eval()
    ids = random_tokens(describe(name)["vocab"], batch, prompt, device)
    cache = cache_keyword(model)  # "cache" (transformers >= 5.25) or "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    state = {"cache": out[cache], "token": out.logits[:, -1:].argmax(-1)}

    @torch.no_grad()
    def step():
        # The cache grows by one token per step, as in real decoding.
        result = model(input_ids=state["token"], **{cache: state["cache"]}, use_cache=True)
        state["cache"], state["token"] = result[cache], result.logits[:, -1:].argmax(-1)

    return step


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="sparse backend to profile (default: auto)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--layer-shape", default="11008x4096", help="OUTxIN of the layer_step workload (GPU)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the layer_step workload (GPU)")
    parser.add_argument("--dtype", default="bf16", help="compute dtype on GPU (CPU: fp32 and smaller shapes)")
    parser.add_argument("--decode-model", default="llama-1b", help="model of the decode workload (GPU)")
    args = parser.parse_args(argv)
    device = pick_device(args)
    if args.smoke:
        args.layer_shape, args.tokens, args.dtype, args.decode_model = "128x64", 32, "fp32", "llama-smoke"
        args.iters, args.warmup, args.backend = 2, 1, "reference"
    elif device.type == "cpu":  # the CPU shapes of layer.py / inference.py, in fp32
        args.layer_shape, args.tokens, args.dtype, args.decode_model = "2816x1024", 512, "fp32", "llama-cpu-20m"
    shape = tuple(int(v) for v in args.layer_shape.split("x"))
    dtype = parse_dtype(args.dtype)
    env, budget = environment(device), Budget(args.budget_s)
    recorder = Recorder(SCRIPT, args.out_dir, device, vars(args))
    workloads = {
        "layer_step": (lambda backend: layer_step(shape, args.tokens, dtype, device, backend),
                       {"out": shape[0], "in": shape[1], "tokens": args.tokens, "dtype": args.dtype}),
        "decode": (lambda backend: decode_step(args.decode_model, backend, device, 1, 32, 16),
                   {"model": args.decode_model, "batch": 1, "prompt": 32, "lora_rank": 16}),
    }
    for workload, (make, config) in workloads.items():
        if budget.expired():
            break
        figures, error = {}, None
        for side, backend in (("dense", None), ("sparse", args.backend)):
            try:
                figures[side] = profile_iterations(make(backend), device, args.iters, args.warmup, args.top)
            except Exception as exc:  # noqa: BLE001 (recorded; the next workload still runs)
                figures[side], error = None, error_text(exc)
            free_memory(device)
        dense, sparse = figures["dense"], figures["sparse"]
        recorder(make_record(
            SCRIPT, env, {"workload": workload, **config}, dense, sparse, backend=args.backend, error=error,
            breakdown_speedup=ratio(dense and dense["wall_ms_per_iter"], sparse and sparse["wall_ms_per_iter"]),
        ))
        for side, fig in figures.items():
            if fig is None:
                continue
            print(f"--- {workload} {side}: {fig['wall_ms_per_iter']:.3f} ms/iter wall, "
                  f"{fig['self_ms_total_per_iter']:.3f} ms/iter self {fig['time_base']} time")
            for row in fig["top_ops"]:
                print(f"  {row['self_ms_per_iter']:9.4f} ms  x{row['calls_per_iter']:<6g} "
                      f"(cpu {row['cpu_ms_per_iter']:8.4f} ms)  {row['name'][:90]}")
    return recorder.finish()


if __name__ == "__main__":
    main()
