"""Tile-configuration sweep of slope's sm90 2:4 sparse GEMM (``cutlass-sm90``) against cuBLAS.

Builds one shared library per configuration of ``slope/kernels/csrc/sm90_sparse_gemm_kernels.h``
(tile M×N×K, cluster M×N, cooperative or ping-pong schedule, pipeline stages, persistent or
stream-K tile scheduler) from
``performance_experiments/sm90_tune/sm90_tune_variant.cu``, all in parallel with nvcc, loads each
with ctypes and, for every LLM shape ``y (tokens, out) = x (tokens, in) @ Wᵀ`` in bf16:

- checks the variant's output against the dense product ``F.linear(x, W⊙M)`` (cuBLAS) on fresh
  random inputs (relative Frobenius error, bf16 tolerance 2e-2; the output is poisoned first),
- times it with CUDA events for each scheduler option (swizzle 1/2/4/8 × raster heuristic/M/N),
  interleaved with the dense product, and records ``gemm_speedup`` = median dense ms (all of the
  variant's dense calls) / median sparse ms of its fastest option (see :func:`measure`).

Writes ``<out-dir>/<device>/sm90_tune.json`` (one record per variant and shape) and prints a table.
Needs an sm90 GPU, nvcc and the CUTLASS headers (``nvidia-cutlass`` wheel or SLOPE_CUTLASS_DIR).

    python performance_experiments/sm90_tune.py [--variants 128x128x128_1x2,...] [--budget-s 300]
    python performance_experiments/sm90_tune.py --build-only   # compile only (CPU), e.g. beside other GPU work
"""
from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from performance_experiments.common import (  # noqa: E402
    Recorder, base_parser, environment, error_text, layer_shape, make_record, ratio,
)
from slope.kernels import cutlass_sm90  # noqa: E402
from slope.masks import nm_mask  # noqa: E402

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sm90_tune" / "sm90_tune_variant.cu"


class TileConfig(NamedTuple):
    """One configuration of the kernel template (the macros of sm90_tune_variant.cu)."""

    tm: int  # tile M (sparse rows)
    tn: int  # tile N (tokens)
    tk: int  # tile K (logical, before compression)
    cm: int  # cluster M
    cn: int  # cluster N
    pingpong: int = 0  # 1: ping-pong schedule, 0: cooperative
    stages: int = 0  # mainloop pipeline stages, 0: as many as fit beside the epilogue
    streamk: int = 0  # 1: stream-K tile scheduler, 0: persistent


#: name -> configuration; a name is ``{tm}x{tn}x{tk}_{cm}x{cn}`` + ``_s{stages}`` + ``_sk`` + ``_pp``
#: (the suffixes only where set). 128x256x64 with auto stages has 4 (s4 is the same kernel) and 5
#: stages do not fit its shared memory, so only s3 is listed.
VARIANTS = {
    "128x128x128_1x2": TileConfig(128, 128, 128, 1, 2),
    "128x256x128_1x2": TileConfig(128, 256, 128, 1, 2),
    "128x256x128_2x1": TileConfig(128, 256, 128, 2, 1),
    "256x128x128_1x2": TileConfig(256, 128, 128, 1, 2),
    "256x128x128_2x1": TileConfig(256, 128, 128, 2, 1),
    "128x128x128_2x1": TileConfig(128, 128, 128, 2, 1),
    "128x128x128_1x1": TileConfig(128, 128, 128, 1, 1),
    "128x256x64_1x2": TileConfig(128, 256, 64, 1, 2),
    "64x256x128_1x2_pp": TileConfig(64, 256, 128, 1, 2, pingpong=1),
    "64x128x128_1x2_pp": TileConfig(64, 128, 128, 1, 2, pingpong=1),
    "256x128x64_1x2": TileConfig(256, 128, 64, 1, 2),
    "128x256x64_2x1": TileConfig(128, 256, 64, 2, 1),
    "128x128x64_1x2": TileConfig(128, 128, 64, 1, 2),
    "128x256x64_1x1": TileConfig(128, 256, 64, 1, 1),
    "256x128x64_2x1": TileConfig(256, 128, 64, 2, 1),
    "256x128x64_1x1": TileConfig(256, 128, 64, 1, 1),
    "128x256x64_1x1_s3": TileConfig(128, 256, 64, 1, 1, stages=3),
    "128x256x64_1x1_sk": TileConfig(128, 256, 64, 1, 1, streamk=1),
    "256x128x64_1x1_sk": TileConfig(256, 128, 64, 1, 1, streamk=1),
    # ping-pong with a full 128-row tile per consumer warp group (the 64-row ones above were slow)
    "128x128x64_1x1_pp": TileConfig(128, 128, 64, 1, 1, pingpong=1),
}
#: the configuration of slope/kernels/csrc/sm90_sparse_gemm_kernels.h's DefaultConfig (the baseline column).
DEFAULT_VARIANT = "128x256x64_1x1"
SCHEDULER_OPTIONS = [(s, r) for s in (1, 2, 4, 8) for r in (0, 1, 2)]
DEFAULT_SHAPES = [(m, layer) for m in ("llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b", "llama-1b")
                  for layer in ("ffn_up", "ffn_down")]


def build_variant(name: str, build_dir: Path) -> tuple[Path | None, str | None, float]:
    """Compile one variant into ``build_dir/<name>.so``; (path, None, seconds) or (None, why, seconds)."""
    c = VARIANTS[name]
    out = build_dir / f"sm90_tune_{name}.so"
    if out.is_file() and out.stat().st_mtime > max(SOURCE.stat().st_mtime, (cutlass_sm90.CUDA_SOURCES / "sm90_sparse_gemm_kernels.h").stat().st_mtime):
        return out, None, 0.0  # built earlier (e.g. by --build-only while the GPU tests ran)
    includes = [f"-I{d}" for d in cutlass_sm90.cutlass_include_dirs()] + [f"-I{cutlass_sm90.CUDA_SOURCES}"]
    cmd = [cutlass_sm90.nvcc_path() or "nvcc", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
           *cutlass_sm90.nvcc_flags(), *includes,
           f"-DTUNE_TM={c.tm}", f"-DTUNE_TN={c.tn}", f"-DTUNE_TK={c.tk}", f"-DTUNE_CM={c.cm}", f"-DTUNE_CN={c.cn}",
           f"-DTUNE_PINGPONG={c.pingpong}", f"-DTUNE_STAGES={c.stages}", f"-DTUNE_STREAMK={c.streamk}",
           str(SOURCE), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        errors = [line for line in (proc.stderr or proc.stdout).splitlines() if "error" in line][:3]
        return None, "nvcc failed: " + " | ".join(errors)[:600], seconds
    return out, None, seconds


class Variant:
    """A built variant loaded with ctypes; methods raise RuntimeError with the library's message."""

    def __init__(self, name: str, path: Path):
        self.name, self.lib = name, ctypes.CDLL(str(path))
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        self.lib.tune_compressed_sizes.argtypes = [i, i, ctypes.POINTER(ll)]
        self.lib.tune_compress.argtypes = [p, i, i, p, p, p, ctypes.c_char_p, i]
        self.lib.tune_workspace_size.argtypes = [i, i, i, i, i]
        self.lib.tune_workspace_size.restype = ctypes.c_size_t
        self.lib.tune_gemm.argtypes = [p, p, p, p, i, i, i, p, i, i, p, ctypes.c_char_p, i]
        self._err = ctypes.create_string_buffer(1024)

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{self.name}: {self._err.value.decode(errors='replace')}")

    def compress(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = dense.shape
        sizes = (ctypes.c_longlong * 4)()
        self.lib.tune_compressed_sizes(m, k, sizes)
        values = torch.empty(sizes[0], sizes[1], device=dense.device, dtype=dense.dtype)
        meta = torch.empty(sizes[2], sizes[3], device=dense.device, dtype=torch.uint8)
        stream = torch.cuda.current_stream(dense.device).cuda_stream
        self._check(self.lib.tune_compress(dense.data_ptr(), m, k, values.data_ptr(), meta.data_ptr(), stream,
                                           self._err, len(self._err)))
        return values, meta

    def gemm_fn(self, values, meta, b, d, m, swizzle, raster):
        """A no-argument callable computing ``d (N, M) = b @ A.T`` with the given scheduler options."""
        n, k = b.shape
        ws_bytes = self.lib.tune_workspace_size(m, n, k, swizzle, raster)
        ws = torch.empty(max(1, ws_bytes), device=b.device, dtype=torch.uint8)
        stream = torch.cuda.current_stream(b.device).cuda_stream
        args = (values.data_ptr(), meta.data_ptr(), b.data_ptr(), d.data_ptr(), m, n, k, ws.data_ptr(),
                swizzle, raster, stream, self._err, len(self._err))

        def run():
            self._check(self.lib.tune_gemm(*args))
        run.workspace = ws  # keep it alive with the callable
        return run


def time_pair(dense_fn, sparse_fn, reps: int) -> tuple[list[float], list[float]]:
    """Per-call ms of dense and sparse calls, interleaved (same clocks for both), after warm-up."""
    for _ in range(3):
        dense_fn(), sparse_fn()
    times = {"dense": [], "sparse": []}
    for _ in range(reps):
        for key, fn in (("dense", dense_fn), ("sparse", sparse_fn)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end))
    return times["dense"], times["sparse"]


def measure(variant: Variant, w: torch.Tensor, x: torch.Tensor, reference: torch.Tensor, reps: int) -> dict:
    """Correctness and the fastest scheduler option of one variant on one shape.

    The option is chosen by its own median sparse time, and the speedup is taken against the
    median of *all* dense calls of the variant (``len(SCHEDULER_OPTIONS) * reps`` of them): picking
    the option with the best dense/sparse ratio instead would favour options whose interleaved
    dense calls happened to be slow (the first sweep's records were chosen that way; one of them
    reported an impossible 2.79x because its dense median doubled)."""
    m = w.shape[0]
    values, meta = variant.compress(w)
    d = torch.full_like(reference, float("nan"))
    variant.gemm_fn(values, meta, x, d, m, 1, 0)()
    torch.cuda.synchronize()
    rel_err = float((d.float() - reference.float()).norm() / reference.float().norm())
    result = {"rel_err": rel_err, "all_written": bool(torch.isfinite(d).all())}
    if not result["all_written"] or rel_err > 2e-2:
        result["error"] = f"wrong result: relative error {rel_err:.3g}, all written {result['all_written']}"
        return result
    dense_all, options = [], []
    for swizzle, raster in SCHEDULER_OPTIONS:
        dense, sparse = time_pair(lambda: F.linear(x, w), variant.gemm_fn(values, meta, x, d, m, swizzle, raster), reps)
        dense_all += dense
        options.append({"swizzle": swizzle, "raster": raster, "sparse_ms": statistics.median(sparse)})
    best = min(options, key=lambda o: o["sparse_ms"])
    result.update(best, dense_ms=statistics.median(dense_all), options=options)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", default=os.environ.get("SLOPE_TUNE_VARIANTS", ",".join(VARIANTS)),
                        help="comma-separated names of VARIANTS (default: $SLOPE_TUNE_VARIANTS or all)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--build-dir", default=os.environ.get("SLOPE_TUNE_BUILD_DIR", "/tmp/slope_sm90_tune"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--build-only", action="store_true", help="compile the variants (no GPU work) and stop")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    device = torch.device("cuda")
    problem = None if args.build_only else cutlass_sm90.build_problem(device)
    if problem is not None:
        print(f"[sm90_tune] nothing to do: {problem}")
        return 0
    started = time.perf_counter()
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        built = dict(zip(names, pool.map(lambda n: build_variant(n, build_dir), names)))
    if args.build_only:
        for name, (path, why, seconds) in built.items():
            print(f"[sm90_tune] build {name}: {'ok' if path else why} ({seconds:.0f}s)")
        return 0
    env = environment(device)
    recorder = Recorder("sm90_tune", args.out_dir, device, vars(args))
    variants = []
    for name, (path, why, seconds) in built.items():
        print(f"[sm90_tune] build {name}: {'ok' if path else why} ({seconds:.0f}s)")
        if path is not None:
            variants.append(Variant(name, path))
        else:
            recorder(make_record("sm90_tune", env, {"variant": name}, None, None, gemm_speedup=None, error=why))
    gen = torch.Generator(device=device).manual_seed(0)
    for model, layer in DEFAULT_SHAPES:
        out_f, in_f = layer_shape(model, layer)
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=gen)
        w = w * nm_mask(w, 2, 4)
        x = torch.randn(args.tokens, in_f, device=device, dtype=torch.bfloat16, generator=gen)
        reference = F.linear(x, w)
        for variant in variants:
            config = {"variant": variant.name, "model": model, "layer": layer, "tokens": args.tokens,
                      "out": out_f, "in": in_f, "dtype": "bf16"}
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                recorder(make_record("sm90_tune", env, config, None, None, gemm_speedup=None, error="skipped: budget"))
                continue
            try:
                res = measure(variant, w, x, reference, args.reps)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the sweep
                res = {"error": error_text(exc)}
            flops = 2.0 * args.tokens * out_f * in_f
            dense = {"ms": res["dense_ms"], "tflops": flops / res["dense_ms"] / 1e9} if "dense_ms" in res else None
            sparse = ({"ms": res["sparse_ms"], "tflops_dense_equiv": flops / res["sparse_ms"] / 1e9,
                       "swizzle": res["swizzle"], "raster": res["raster"], "rel_err": res["rel_err"],
                       "options": res["options"]}
                      if "sparse_ms" in res else None)
            speedup = ratio(res.get("dense_ms"), res.get("sparse_ms"))
            recorder(make_record("sm90_tune", env, config, dense, sparse, gemm_speedup=speedup, error=res.get("error"),
                                 backend=variant.name))
        del w, x, reference
        torch.cuda.empty_cache()
    records = recorder.finish()
    print("\n[sm90_tune] best variant per shape (gemm_speedup = cuBLAS dense ms / sparse ms):")
    by_shape: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("gemm_speedup") is not None:
            by_shape.setdefault((r["config"]["model"], r["config"]["layer"]), []).append(r)
    for (model, layer), rs in by_shape.items():
        best = max(rs, key=lambda r: r["gemm_speedup"])
        base = next((r["gemm_speedup"] for r in rs if r["config"]["variant"] == DEFAULT_VARIANT), None)
        print(f"  {model:11s} {layer:8s} best {best['config']['variant']:20s} {best['gemm_speedup']:.3f}x "
              f"(swizzle {best['sparse']['swizzle']}, raster {best['sparse']['raster']}); default config {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
