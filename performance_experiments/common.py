"""Shared helpers of the benchmarks: environment record, timing, budgets, result files.

Every script builds records with :func:`make_record` (DESIGN §7: script, git commit, device slug,
torch/triton versions, config, the dense and the sparse figure measured in the same run, and their
ratio named ``*_speedup`` or ``*_memory_ratio``) and writes them with :func:`write_results` to
``<out_dir>/<device slug>/<script>.json``.

Timing (:func:`time_fn`, :func:`time_interleaved`): on CUDA each call is bracketed by CUDA events
after warm-up, optionally with the L2 cache flushed (a write over a buffer twice its size) before
every timed call; on CPU ``time.perf_counter``. The median is reported. ``time_interleaved``
alternates dense and sparse calls so that both see the same clocks and machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "performance_experiments" / "results"
#: the ratio keys a record may carry: DESIGN §7's ``*_speedup`` (dense time / sparse time) and
#: ``*_memory_ratio`` (sparse / dense), plus overhead.py's ``*_overhead_ratio`` (cost / dense step).
RATIO_SUFFIXES = ("_speedup", "_memory_ratio", "_overhead_ratio")
SCHEMA_KEYS = ("script", "commit", "device", "device_name", "torch", "triton", "config", "dense", "sparse")

#: (hidden, FFN) of Llama-style models, for the LLM shapes of the benchmarks.
MODELS = {
    "llama-1b": (2048, 5632),
    "llama2-7b": (4096, 11008),
    "llama3-8b": (4096, 14336),
    "llama2-13b": (5120, 13824),
    "llama2-70b": (8192, 28672),
}

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def layer_shape(model: str, layer: str) -> tuple[int, int]:
    """``(out, in)`` of a linear layer of a :data:`MODELS` entry: ``ffn_up``, ``ffn_down`` or ``attn_o``."""
    hidden, ffn = MODELS[model]
    shapes = {"ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn), "attn_o": (hidden, hidden)}
    if layer not in shapes:
        raise ValueError(f"unknown layer {layer!r}; choose one of {sorted(shapes)}")
    return shapes[layer]


# ---------------------------------------------------------------- environment
def device_slug(device: torch.device | str | None = None) -> str:
    """``cpu`` or the slug of the CUDA device's name (see :func:`slugify_device_name`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return device.type
    return slugify_device_name(torch.cuda.get_device_name(device))


def slugify_device_name(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100``: lower-case words up to the model number."""
    slug = []
    for word in filter(None, re.split(r"[^a-z0-9]+", name.lower())):
        slug.append(word)
        if any(ch.isdigit() for ch in word):  # stop at the model number (h100, a100, 4090)
            break
    return "-".join(slug) or "unknown"


def git_commit() -> str:
    """``$SLOPE_GIT_COMMIT`` when set (the GPU machine's copy of the tree may carry a stale ``.git``
    from an earlier commit), else HEAD's short hash (``+dirty`` with local changes outside the results), else "unknown"."""
    if os.environ.get("SLOPE_GIT_COMMIT"):
        return os.environ["SLOPE_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                # results (written by the runs themselves) do not make the measured code dirty
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)performance_experiments/results", ":(exclude)performance_experiments/README.md"],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device) -> dict:
    """The fields of DESIGN §7 that describe where a record was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "device": device_slug(device),
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def make_record(script: str, env: dict, config: dict, dense: dict | None, sparse: dict | None, **extra) -> dict:
    """One DESIGN §7 record. ``dense``/``sparse`` hold the figures of the same run (``None`` where a
    measurement failed, with ``error`` saying why); ``extra`` holds the ratio(s) and labels."""
    record = {"script": script, **env, "config": config, "dense": dense, "sparse": sparse}
    record.update(extra)
    return record


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded, or ``None`` when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 4)


def error_text(exc: BaseException) -> str:
    """A one-line description of a failure for the ``error`` field of a record."""
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    return text + where


def write_results(script: str, records: list[dict], out_dir: str | Path, device: torch.device, args: dict,
                  quiet: bool = False) -> Path:
    """Write ``{"script", "args", "records"}`` to ``<out_dir>/<device slug>/<script>.json``.

    Scripts call it after every case too (``args["partial"] = True``), so a run killed by an
    outer time limit still leaves what it measured.
    """
    path = Path(out_dir) / device_slug(device) / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"script": script, "args": args, "records": records}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)
    if not quiet:
        print(f"[{script}] wrote {len(records)} records to {path}")
    return path


class Recorder:
    """Collects a script's records and rewrites its results file after each one (so a run killed
    by an outer time limit keeps everything measured so far)."""

    def __init__(self, script: str, out_dir: str | Path, device: torch.device, args: dict):
        self.script, self.out_dir, self.device, self.args = script, out_dir, device, args
        self.records: list[dict] = []

    def __call__(self, record: dict, replace_last: bool = False) -> None:
        """Add ``record`` (``replace_last``: in place of the last one, a fuller form of it)."""
        if replace_last:
            self.records.pop()
        self.records.append(record)
        ratios = {k: v for k, v in record.items() if k.endswith(RATIO_SUFFIXES)}
        label = " ".join(str(record["config"].get(k)) for k in ("model", "layer", "tokens", "dtype") if k in record["config"])
        print(f"[{self.script}] {label} {record.get('backend')}: {ratios} {record.get('error') or ''}", flush=True)
        write_results(self.script, self.records, self.out_dir, self.device, {**self.args, "partial": True}, quiet=True)

    def finish(self, **extra) -> list[dict]:
        write_results(self.script, self.records, self.out_dir, self.device, {**self.args, **extra})
        return self.records


# ---------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every script shares: ``--smoke``, ``--budget-s``, ``--out-dir``, ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, a few seconds (used by the tests)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this many seconds")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="results root; files go to <out-dir>/<device>/")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; --smoke forces cpu)")
    return parser


def pick_device(args) -> torch.device:
    if args.smoke:
        return torch.device("cpu")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class Budget:
    """Wall-clock budget: :meth:`expired` turns True ``seconds`` after creation (never if None).

    Scripts check it before starting each case, so a case in flight finishes (the outer
    step limit of ``gpu_evidence.py`` leaves room for that)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


# ---------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flusher:
    """Writes over a buffer twice the L2 size so that the next kernel starts with a cold cache."""

    def __init__(self, device: torch.device):
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
        self.buffer = torch.empty(2 * l2 // 4 + 1, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    reps: int = 20,
    target_s: float = 1.0,
    max_reps: int = 200,
    flush_l2: bool = True,
) -> dict:
    """Median time of ``fn()`` in milliseconds after ``warmup`` calls.

    The number of timed calls is ``reps``, raised up to ``max_reps`` so that the timed calls take
    about ``target_s`` (estimated from the warm-up). Returns ``{"ms", "ms_min", "ms_max", "reps"}``.
    """
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    synchronize(device)
    estimate = (time.perf_counter() - start) / max(warmup, 1)
    reps = int(min(max_reps, max(reps, target_s / max(estimate, 1e-9))))
    times = []
    if device.type == "cuda":
        flush = _L2Flusher(device) if flush_l2 else (lambda: None)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            flush()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "ms": round(statistics.median(times), 5),
        "ms_min": round(min(times), 5),
        "ms_max": round(max(times), 5),
        "reps": reps,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    reps: int = 5,
    flush_l2: bool = False,
) -> dict:
    """Median milliseconds of each ``fns[name]()``, the calls alternating between the functions
    (one call of each per round), so that drifts — a shared CPU's load, a GPU's clocks — hit
    every function alike. CUDA: events around each call (``flush_l2``: L2 flushed before each);
    CPU: ``time.perf_counter`` and also the process's CPU time (``cpu_ms``, all threads), which
    other processes' load hardly changes. Returns ``{name: {"ms", "ms_min", "ms_max", "reps"[, "cpu_ms"]}}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        flush = _L2Flusher(device) if flush_l2 else (lambda: None)
        events = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                flush()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                events[name].append((begin, end))
        torch.cuda.synchronize(device)
        times = {name: [b.elapsed_time(e) for b, e in pairs] for name, pairs in events.items()}
    else:
        cpu_times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu_times[name].append((time.process_time() - c0) * 1e3)
    result = {
        name: {"ms": round(statistics.median(t), 5), "ms_min": round(min(t), 5), "ms_max": round(max(t), 5), "reps": reps}
        for name, t in times.items()
    }
    if device.type != "cuda":  # CPU time of this process (all threads): robust to other processes' load
        for name in fns:
            result[name]["cpu_ms"] = round(statistics.median(cpu_times[name]), 5)
    return result


def free_memory(device: torch.device) -> None:
    """Release cached blocks between measurements (so one case's memory never limits the next)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_backends(names, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict]:
    """``(usable names, {name: why not})`` among backend ``names`` on ``device`` in ``dtype``.

    ``auto`` (``prune_model``'s default: a measured choice per layer shape on CUDA) is always usable.
    """
    from slope.backends import backend_class

    usable, skipped = [], {}
    for name in names:
        if name == "auto":
            usable.append(name)
            continue
        try:
            reason = backend_class(name).unavailable_reason(device, dtype)
        except Exception as exc:  # a backend module that fails to import must not stop the run
            reason = error_text(exc)
        if reason is None:
            usable.append(name)
        else:
            skipped[name] = reason
    return usable, skipped


def backends_used(model) -> list[str]:
    """Names of the backends a pruned model's layers ended up using (``auto`` picks per shape)."""
    from slope import sparse_modules

    names = set()
    for _, layer in sparse_modules(model):
        names.update(backend.name for backend in getattr(layer, "_backends", {}).values())
    return sorted(names)


def prune_kwargs(backend: str) -> dict:
    """``prune_model`` arguments for a backend name (``simulated`` means ``compress=False``)."""
    return {"compress": False} if backend == "simulated" else {"compress": True, "backend": backend}


def default_backends(device: torch.device, include_auto: bool = True) -> list[str]:
    """Backends worth benchmarking: ``auto`` and the sparse GPU ones on CUDA, ``simulated`` and
    ``reference`` elsewhere (``dense``, the masked-dense fallback of ``auto``, is left out)."""
    from slope.backends import BACKEND_NAMES

    if device.type == "cuda":
        return (["auto"] if include_auto else []) + [n for n in BACKEND_NAMES if n not in ("reference", "dense")]
    return ["simulated", "reference"]
