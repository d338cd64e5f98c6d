"""Host time per layer call: what Python and dispatch cost before the GPU sees a kernel.

Eager decoding (batch 8, one token per step) and small training steps run faster on the GPU
than the host can enqueue them, so there the host time per layer *is* the speed. This measures
it for one layer, dense (``nn.Linear``) against slope's:

- ``decode-stacked`` / ``decode-extended`` / ``decode-fused``: a frozen merged sparse+LoRA layer
  (rank 8, ``slope.lora.freeze_for_inference``; bf16 on CUDA, fp32 on CPU) on ``tokens`` rows, each
  adapter fold and the one-launch decode kernel (``set_decode_kernel(model, "fused")``), no grad;
- ``train-step``: forward, backward and optimizer step of one layer under bf16 autocast with fp32
  master weights (``nn.Linear`` + fused ``torch.optim.AdamW`` against ``SparseLinear`` +
  ``ADAMWSparse``; no ``M_t`` update in the timed steps).

Warm-up (3 calls per side, untimed) builds the operands, autotunes the Triton kernels and lets
``backend="auto"`` time its candidates (CUDA); the sparse figures name the backend each product
ran on (``chosen``; none for the fused decode kernel) and, for ``train-step``, the operands the
optimizer step writes in its one pass (``fused_operands``; otherwise they are rebuilt per step).
On CUDA the calls are real: the host time is ``time.perf_counter`` over back-to-back calls
without synchronizing (on CPU it is the calling thread's CPU time, ``time.thread_time``: the
shared machine's other load hardly moves it, and idle OpenMP workers spinning are not counted). ``drain_us`` is how long the GPU still ran after a round's last call was
enqueued (median): about one call's GPU time when the host was the bottleneck, as it is meant to
be here; much more means the GPU was slower and the figure is not the host's alone.
On CPU this is an **emulation of the CUDA code paths** (needs ``TRITON_INTERPRET=1``): after a
real warm-up, Triton launches and the sparse GEMM become stubs that only count, every other
torch op runs on tiny CPU tensors (their dispatch costs about what a CUDA launch does), so the
figure is slope's own host work plus one stub per launch. Timings on a shared machine move with
its load, so each side also counts, for one call, the Python function calls and the ATen ops it
dispatched (``python_calls``, ``aten_ops``: the same on any machine). The ``reference`` backend stands in
for ``auto``'s choice: it builds operands from kept values, as ``cutlass-sm90`` does (a choice of
``dense`` or ``cusparselt`` on CUDA rebuilds them after each step instead). Ratio ``host_speedup``
= dense host time / sparse host time per call (per step for ``train-step``); records also say
what each call launched (``launches``, CPU).

    python performance_experiments/host_overhead.py                 # CUDA if available
    TRITON_INTERPRET=1 python performance_experiments/host_overhead.py --device cpu
    TRITON_INTERPRET=1 python performance_experiments/host_overhead.py --smoke
"""
from __future__ import annotations

import collections
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from performance_experiments.common import Recorder, base_parser, environment, error_text, make_record, pick_device, ratio

SCRIPT = "host_overhead"
CASES = ("decode-stacked", "decode-extended", "decode-fused", "train-step")
#: timed rounds per side (alternating); ``host_us`` is the least of them (bursts of load on a shared machine only add)
ROUNDS = 15


class _Stubs:
    """On CPU: Triton launches and the reference backend's GEMM replaced by counting stubs."""

    def __init__(self):
        self.launches = collections.Counter()

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import interpreter

        from slope import kernels
        from slope.backends.reference import ReferenceBackend

        launches = self.launches

        def run(fn, *args, grid=None, warmup=False, **kwargs):
            launches[fn.fn.__name__] += 1

        def linear(backend, x, operand, bias=None):
            launches["sparse_gemm"] += 1
            return x.new_empty(*x.shape[:-1], operand[0].shape[0])

        saved = interpreter.InterpretedFunction.run, ReferenceBackend.linear, kernels.triton_usable
        interpreter.InterpretedFunction.run, ReferenceBackend.linear = run, linear
        kernels.triton_usable = lambda *tensors: True
        try:
            yield
        finally:
            interpreter.InterpretedFunction.run, ReferenceBackend.linear, kernels.triton_usable = saved

    @contextlib.contextmanager
    def usable(self):
        """Real kernels (the interpreter), but the CUDA code paths taken (build and warm-up)."""
        from slope import kernels

        saved = kernels.triton_usable
        kernels.triton_usable = lambda *tensors: True
        try:
            yield
        finally:
            kernels.triton_usable = saved


def _merged(features: int, device, dtype, fold: str, decode_kernel: str) -> tuple[nn.Module, nn.Module]:
    """``(nn.Linear, its frozen merged sparse+LoRA copy)`` of ``features × features``."""
    from slope import prune_model
    from slope.lora import freeze_for_inference, set_decode_kernel, set_lora_fold

    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    holder = nn.Sequential(nn.Linear(features, features, bias=False, device=device, dtype=dtype))
    backend = "reference" if device.type == "cpu" else "auto"
    prune_model(holder, backend=backend, add_lora=True, lora_rank=8, merge_lora=True, verbose=False)
    freeze_for_inference(holder)
    set_lora_fold(holder, fold)
    set_decode_kernel(holder, decode_kernel)
    return dense, holder[0]


def _per_call_us(calls: dict, n: int, device, stubs) -> dict:
    """``{side: host µs per call}`` (the least and the median round) over :data:`ROUNDS` rounds of ``n`` back-to-back calls of each side's
    function, the sides alternating round by round (same machine load); on CUDA also the median
    ``drain_us`` (see the module docstring); with ``stubs``, ``{side: launches per call}``."""
    rounds = {side: [] for side in calls}
    drains = {side: [] for side in calls}
    launches = {side: collections.Counter() for side in calls}
    if stubs:
        stubs.launches.clear()  # (a failed case may have left counts)
    for _ in range(ROUNDS):
        for side, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with stubs.active() if stubs else contextlib.nullcontext():
                start, cpu_start = time.perf_counter(), time.thread_time()
                for _ in range(n):
                    fn()
                end, cpu_end = time.perf_counter(), time.thread_time()
                # CPU: this thread's CPU time (other load hardly moves it); CUDA: wall time
                rounds[side].append(((end - start) if device.type == "cuda" else (cpu_end - cpu_start)) / n * 1e6)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                drains[side].append((time.perf_counter() - end) * 1e6)
            if stubs:
                launches[side].update(stubs.launches)
                stubs.launches.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # the least round: host work is a fixed cost, and the shared machine's load only ever adds to it
    figures = {side: {"host_us": round(min(times), 2), "host_us_median": round(statistics.median(times), 2)}
               for side, times in rounds.items()}
    for side, times in drains.items():
        if times:
            figures[side]["drain_us"] = round(statistics.median(times), 2)
    if stubs:
        for side, counter in launches.items():
            figures[side]["launches"] = {k: v / (ROUNDS * n) for k, v in sorted(counter.items())}
    return figures


def _counted(fn, stubs) -> dict:
    """What one call of ``fn`` does on the host, counted (the same on any machine): Python function
    calls (``sys.setprofile``'s call events) and ATen ops dispatched (a ``TorchDispatchMode``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            return func(*args, **(kwargs or {}))

    py_calls = 0

    def profile(frame, event, arg):
        nonlocal py_calls
        py_calls += event == "call"

    with stubs.active() if stubs else contextlib.nullcontext():
        sys.setprofile(profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
        with Ops():
            fn()
    if stubs:
        stubs.launches.clear()
    return {"python_calls": py_calls, "aten_ops": Ops.count}


def _train_pair(features: int, device):
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False, device=device)
    sparse = SparseLinear.from_dense(dense.weight.detach().clone(), None, compress=True,
                                     backend="reference" if device.type == "cpu" else "auto")
    sparse.to(device)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-5, fused=True)  # one kernel (CPU too: the CUDA path emulated)
    sparse_opt = ADAMWSparse(sparse, lr=1e-5, mask_change_freq=10**6)
    return (dense, dense_opt), (sparse, sparse_opt)


def _step(layer, opt, x):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    opt.step()
    opt.zero_grad()


def measure(case: str, device, args, stubs: _Stubs | None) -> dict:
    """Dense and sparse host microseconds per call of ``case`` (and, emulated, what each launched)."""
    features, tokens = args.features, args.tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    emulate = stubs.usable() if stubs else contextlib.nullcontext()
    with emulate:
        if case == "train-step":
            (dense, dense_opt), (sparse, sparse_opt) = _train_pair(features, device)
            x = torch.randn(tokens, features, device=device, requires_grad=True)
            calls = {"dense": lambda: _step(dense, dense_opt, x), "sparse": lambda: _step(sparse, sparse_opt, x)}
            layer = sparse
        else:
            fold = "extended" if case == "decode-extended" else "stacked"
            dense, merged = _merged(features, device, dtype, fold, "fused" if case == "decode-fused" else "gemm")
            layer = merged
            x = torch.randn(tokens, features, device=device, dtype=dtype)
            calls = {"dense": lambda: dense(x), "sparse": lambda: merged(x)}
        with torch.no_grad() if case != "train-step" else contextlib.nullcontext():
            for fn in calls.values():  # warm-up: operands built, autotuning and auto's timing done
                for _ in range(3):
                    fn()
            figures = _per_call_us(calls, args.calls, device, stubs)
            for side, fn in calls.items():
                figures[side].update(_counted(fn, stubs))
    figures["sparse"]["chosen"] = {str(key[0]): backend.name for key, backend in layer._backends.items()}
    if case == "train-step":
        figures["sparse"]["fused_operands"] = sorted(layer.operand_buffers())
    return figures


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=None, help="layer size (default 2048 on CUDA, 64 on CPU)")
    parser.add_argument("--tokens", type=int, default=8, help="rows per call (decode batch)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed round (default 200, smoke 20)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    device = pick_device(args)
    args.features = args.features or (2048 if device.type == "cuda" else 64)
    args.calls = args.calls or (20 if args.smoke else 200)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on CPU this emulates the CUDA code paths with Triton's interpreter: set TRITON_INTERPRET=1")
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    env = environment(device)
    recorder = Recorder(SCRIPT, args.out_dir, device, vars(args))
    stubs = _Stubs() if device.type == "cpu" else None
    for case in cases:
        if case == "decode-fused" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            continue
        backend = "reference" if stubs else "auto"
        config = {"case": case, "features": args.features, "tokens": args.tokens, "calls": args.calls,
                  "dtype": "bf16" if device.type == "cuda" or case == "train-step" else "fp32", "emulated": stubs is not None}
        try:
            figures = measure(case, device, args, stubs)
            recorder(make_record(SCRIPT, env, config, figures["dense"], figures["sparse"], backend=backend, error=None,
                                 host_speedup=ratio(figures["dense"]["host_us"], figures["sparse"]["host_us"])))
        except Exception as exc:  # noqa: BLE001 (recorded; the next case runs)
            recorder(make_record(SCRIPT, env, config, None, None, backend=backend, error=error_text(exc)))
    return recorder.finish()


if __name__ == "__main__":
    main()
