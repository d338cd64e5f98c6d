"""One SLoPe linear layer vs ``nn.Linear``: forward, forward+backward, and a full training step.

Dense: ``nn.Linear(in, out, bias=False)`` + ``torch.optim.AdamW`` (fused on CUDA). Sparse: the
same layer after ``prune_model`` (each backend) + ``ADAMWSparse``. The input requires grad (a
middle layer), so the backward computes both ``dx`` and the weight gradient.

Precision (``--master``): ``fp32`` (the default on CUDA) keeps fp32 master weights and runs the
layer under ``torch.autocast`` in the benchmark dtype — the usual mixed-precision training, where
both optimizers run PyTorch's fused AdamW kernel; ``same`` puts the parameters in the benchmark
dtype (pure bf16/fp16: ``ADAMWSparse`` then keeps fp32 moments and updates in an unfused loop,
``AdamW`` keeps moments in the parameter dtype, so the step comparison is not like for like).

A sparse training step rebuilds the backend operands (the weights changed), and every
``mask_change_freq`` steps recomputes ``M_t``: that refresh is timed on its own and added
amortised (``refresh / mask_change_freq``) to the sparse step time.

Dense and sparse calls alternate (one of each per round), so that both see the same clocks and
machine load; each record's dense figure comes from the same rounds as its sparse figure.

Ratios: ``layer_fwd_speedup``, ``layer_speedup`` (forward+backward), ``layer_step_speedup``
(forward+backward+optimizer step, amortised refresh included).

    python performance_experiments/layer.py --budget-s 60
    python performance_experiments/layer.py --smoke
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

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
    layer_shape,
    make_record,
    parse_dtype,
    pick_device,
    prune_kwargs,
    ratio,
    time_fn,
    time_interleaved,
)
from slope import prune_model
from slope.optimizers import ADAMWSparse

SCRIPT = "layer"


def _case(model, layer, tokens, dtype):
    out, inp = layer_shape(model, layer)
    return {"model": model, "layer": layer, "tokens": tokens, "out": out, "in": inp, "dtype": dtype}


def gpu_cases(models, layers, tokens, dtypes) -> list[dict]:
    return [_case(m, layer, t, d) for d in dtypes for t in tokens for m in models for layer in layers]


def smoke_cases() -> list[dict]:
    return [{"model": "tiny", "layer": "ffn_up", "tokens": 32, "out": 128, "in": 64, "dtype": "fp32"}]


def cpu_cases() -> list[dict]:
    return [{"model": "small", "layer": "ffn_up", "tokens": 512, "out": 2816, "in": 1024, "dtype": "fp32"},
            {"model": "small", "layer": "ffn_down", "tokens": 512, "out": 1024, "in": 2816, "dtype": "fp32"}]


class _Workload:
    """Forward / forward+backward / step closures over one layer (dense or sparse); with
    ``autocast`` (a dtype) the layer runs under ``torch.autocast`` in it."""

    def __init__(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, step, autocast: torch.dtype | None):
        self.module, self.x, self.dy, self._step, self.autocast = module, x, dy, step, autocast

    def _context(self):
        return torch.autocast(self.x.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def forward(self):
        with torch.no_grad(), self._context():
            return self.module(self.x)

    def forward_backward(self):
        self.x.grad = None
        with self._context():
            y = self.module(self.x)
        y.backward(self.dy)

    def train_step(self):
        self.forward_backward()
        self._step()


_PHASES = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward_backward"), ("step_ms", "train_step"))


def _measure_pair(dense: _Workload, sparse: _Workload, device, timing) -> tuple[dict, dict]:
    """Dense and sparse figures of each phase, their calls alternated (same clocks, same load)."""
    out = ({}, {})
    for key, phase in _PHASES:
        t = time_interleaved({"dense": getattr(dense, phase), "sparse": getattr(sparse, phase)}, device, **timing)
        for figures, name in zip(out, ("dense", "sparse")):
            figures[key], figures["reps"] = t[name]["ms"], t[name]["reps"]
    return out


def _precision(case) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) of a case."""
    dtype = parse_dtype(case["dtype"])
    if case["master"] == "fp32" and dtype != torch.float32:
        return torch.float32, dtype
    return dtype, None


def _dense_workload(case, device, x, dy) -> _Workload:
    param_dtype, autocast = _precision(case)
    linear = nn.Linear(case["in"], case["out"], bias=False, device=device, dtype=param_dtype)
    fused = device.type == "cuda" and param_dtype == torch.float32
    opt = torch.optim.AdamW(linear.parameters(), lr=1e-5, fused=fused or None)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _Workload(linear, x, dy, step, autocast)


def _sparse_workload(case, backend, device, x, dy, mask_change_freq):
    param_dtype, autocast = _precision(case)
    model = nn.Sequential(nn.Linear(case["in"], case["out"], bias=False, device=device, dtype=param_dtype))
    prune_model(model, verbose=False, **prune_kwargs(backend))
    opt = ADAMWSparse(model, lr=1e-5, mask_change_freq=mask_change_freq)

    def step():
        opt.step()
        opt.zero_grad()

    return _Workload(model, x, dy, step, autocast)


def run_case(case, backends, device, env, budget, timing, mask_change_freq, emit) -> None:
    dtype = parse_dtype(case["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case["tokens"], case["in"], device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(case["tokens"], case["out"], device=device, dtype=dtype, generator=gen)
    config = {**case, "mask_change_freq": mask_change_freq}
    dense_work = _dense_workload(case, device, x, dy)
    dense = None  # measured beside each backend
    names, skipped = available_backends(backends, device, dtype)
    for name, why in skipped.items():
        emit(make_record(SCRIPT, env, config, dense, None, backend=name, layer_speedup=None, error=f"unavailable: {why}"))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, layer_speedup=None, error="skipped: budget"))
            continue
        try:
            work = _sparse_workload(case, backend, device, x, dy, mask_change_freq)
            dense, sparse = _measure_pair(dense_work, work, device, timing)
            layer = work.module[0]
            refresh = time_fn(layer.update_mask_t, device, warmup=1, reps=3, max_reps=3, flush_l2=False)
            sparse["mask_t_refresh_ms"] = refresh["ms"]
            sparse["step_ms_amortised"] = round(sparse["step_ms"] + refresh["ms"] / mask_change_freq, 5)
            sparse["backends_used"] = backends_used(work.module)
            emit(make_record(
                SCRIPT, env, config, dense, sparse, backend=backend,
                layer_fwd_speedup=ratio(dense["fwd_ms"], sparse["fwd_ms"]),
                layer_speedup=ratio(dense["fwd_bwd_ms"], sparse["fwd_bwd_ms"]),
                layer_step_speedup=ratio(dense["step_ms"], sparse["step_ms_amortised"]),
                error=None,
            ))
            del work, layer
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
            emit(make_record(SCRIPT, env, config, dense, None, backend=backend, layer_speedup=None, error=error_text(exc)))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--models", default="llama2-7b,llama3-8b,llama-1b,llama2-70b")
    parser.add_argument("--layers", default="ffn_up,ffn_down")
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--mask-change-freq", type=int, default=100)
    parser.add_argument("--master", choices=("fp32", "same"), default=None,
                        help="fp32 master weights under autocast (default on CUDA) or parameters in the benchmark dtype")
    args = parser.parse_args(argv)
    device = pick_device(args)
    master = args.master or ("fp32" if device.type == "cuda" else "same")
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.smoke:
        cases, timing = smoke_cases(), {"warmup": 1, "reps": 2}
    elif device.type == "cpu":
        cases, timing = cpu_cases(), {"warmup": 2, "reps": 7}
    else:
        cases = gpu_cases(args.models.split(","), args.layers.split(","), [int(t) for t in args.tokens.split(",")], args.dtypes.split(","))
        timing = {"warmup": 3, "reps": 20}
    env, budget = environment(device), Budget(args.budget_s)
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for case in cases:
        case["master"] = master
        if budget.expired():
            skipped += 1
            continue
        try:
            run_case(case, backends, device, env, budget, timing, args.mask_change_freq, emit)
        except Exception as exc:  # noqa: BLE001 (the dense baseline failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, dict(case), None, None, backend="dense", layer_speedup=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[layer] budget reached: {skipped} of {len(cases)} shapes not measured")
    return emit.finish(shapes_not_measured=skipped)


if __name__ == "__main__":
    main()
