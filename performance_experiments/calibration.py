"""The machine's two ceilings, measured in the same run as the benchmarks: copy bandwidth and a dense GEMM.

- ``copy_bandwidth``: a device-to-device copy of a large buffer (``dst.copy_(src)``), bytes read
  plus bytes written over the median time (TB/s);
- ``dense_gemm``: ``a @ b`` of random bf16 8192×8192 matrices (cuBLAS), 2·n³ over the median time (TFLOP/s).

Each is timed with CUDA events after warm-up (median of ``--reps``); the GPU clocks reported by
``nvidia-smi`` before and after are recorded beside them (read, never set). Ratios elsewhere are
read against these: a sparse GEMM beating dense can at most reach 2× the dense rate, and a
memory-bound kernel at most the copy rate.

    python performance_experiments/calibration.py
    python performance_experiments/calibration.py --smoke      # CPU, tiny, seconds
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from performance_experiments.common import base_parser, environment, pick_device, time_fn, write_results

SCRIPT = "calibration"


def gpu_clocks() -> str | None:
    """``nvidia-smi``'s SM / memory clocks, temperature and power now (one CSV line), or None."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict:
    src = torch.randint(0, 2**31 - 1, (nbytes // 4,), device=device, dtype=torch.int32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=reps, max_reps=reps, flush_l2=False)
    if not torch.equal(dst, src):
        raise RuntimeError("the copy did not copy")
    return {"bytes_moved": 2 * nbytes, "value": round(2 * nbytes / t["ms"] / 1e9, 3), "unit": "TB/s", **t}


def dense_gemm(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    t = time_fn(lambda: a @ b, device, warmup=3, reps=reps, max_reps=reps, flush_l2=False)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "value": round(2 * n**3 / t["ms"] / 1e9, 2),
            "unit": "TFLOP/s", **t}


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copied buffer (GiB)")
    parser.add_argument("--gemm-n", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = pick_device(args)
    if device.type == "cpu":  # the smoke run and CPU machines: small enough for seconds
        args.copy_gib, args.gemm_n, args.reps = min(args.copy_gib, 1 / 16), min(args.gemm_n, 512), min(args.reps, 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    records = []
    clocks_before = gpu_clocks() if device.type == "cuda" else None
    for name, measure in (("copy_bandwidth", lambda: copy_bandwidth(device, int(args.copy_gib * 2**30), args.reps)),
                          ("dense_gemm", lambda: dense_gemm(device, args.gemm_n, dtype, args.reps))):
        figures = measure()
        records.append({"script": SCRIPT, **env, "config": {"measure": name}, "measure": name, **figures})
        print(f"[calibration] {name}: {figures['value']} {figures['unit']} (median {figures['ms']} ms of {figures['reps']})",
              flush=True)
        write_results(SCRIPT, records, args.out_dir, device, {**vars(args), "partial": True}, quiet=True)
    for record in records:
        record["gpu_clocks_before"], record["gpu_clocks_after"] = clocks_before, gpu_clocks() if device.type == "cuda" else None
    write_results(SCRIPT, records, args.out_dir, device, vars(args))
    return records


if __name__ == "__main__":
    main()
