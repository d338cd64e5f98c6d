"""What each rank holds in ``slope train``: DDP vs FSDP2 (``--fsdp``), SLoPe 2:4 and the dense baseline.

A Llama (4 layers, 256 wide, FFN 768, the shipped 4096-token vocabulary) trains for 2 steps on 2 and
on 4 gloo ranks under ``torchrun``, once with DDP and once with ``--fsdp``; SLoPe runs attach their
lazy LoRA adapters after step 1 (so the replicated adapters are counted). The figures are the
``memory_per_rank`` of the run's summary (``metrics.jsonl``; :func:`slope.parallel.sharded.held_bytes`):
the bytes rank 0 holds between steps of parameters (of which ``sparse_values``: the SLoPe layers'
kept values), buffers (packed masks and metadata) and the two optimizers' state; a sharded tensor
counts its shard. Record key ``dense`` is DDP, ``sparse`` is FSDP2; ``*_memory_ratio`` = FSDP2 / DDP.
Counted bytes, not timings: exact and the same on any machine (rank 0 may hold a little more or
less than the mean: whole SLoPe layers go to owners, largest first).

::

    .venv/bin/python performance_experiments/train_memory_per_rank.py     # ~3 minutes on a 2-core CPU

Writes ``performance_experiments/results/cpu/train_memory_per_rank.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from performance_experiments.common import DEFAULT_OUT_DIR, environment, make_record, ratio, write_results  # noqa: E402

SCRIPT = "train_memory_per_rank"
MODEL = ["--hidden-size", "256", "--intermediate-size", "768", "--num-layers", "4", "--num-heads", "4"]
RUN = ["--seq-len", "64", "--batch-size", "8", "--max-steps", "2", "--eval-batches", "1", "--eval-every", "100",
       "--save-every", "0", "--device", "cpu"]
MODES = {"SLoPe 2:4": ["--lazy-lora-fraction", "0.5"], "dense": ["--dense"]}
PARTS = ("parameters", "buffers", "dense_optimizer", "sparse_optimizer")
WORLDS = (2, 4)


def _memory(world: int, flags: list[str]) -> dict[str, float]:
    """Rank 0's ``memory_per_rank`` (MiB) of one ``torchrun`` run of ``slope train`` with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "slope", "train",
               "--out", str(out), *MODEL, *RUN, *flags]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    held = next(r for r in records if r.get("event") == "summary")["memory_per_rank"]
    mib = {part: round(held[part] / 2**20, 4) for part in PARTS}
    return {**mib, "total": round(sum(mib.values()), 4), "sparse_values": round(held["sparse_values"] / 2**20, 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    env = environment(torch.device("cpu"))
    records = []
    for mode, flags in MODES.items():
        for world in WORLDS:
            ddp, fsdp = _memory(world, flags), _memory(world, [*flags, "--fsdp"])
            ratios = {f"{part}_memory_ratio": ratio(fsdp[part], ddp[part]) for part in (*PARTS, "sparse_values", "total")}
            config = {"model": " ".join(MODEL), "run": " ".join(RUN + flags), "mode": mode, "world_size": world, "unit": "MiB on rank 0"}
            records.append(make_record(SCRIPT, env, config, ddp, fsdp, labels={"dense": "DDP", "sparse": "FSDP2 (--fsdp)"}, **ratios))
            print(f"{mode:<10} {world} ranks, rank 0 holds: DDP {ddp['total']:.2f} MiB, FSDP2 {fsdp['total']:.2f} MiB "
                  f"(x{ratios['total_memory_ratio']}); " + ", ".join(f"{part} x{ratios[f'{part}_memory_ratio']}" for part in PARTS),
                  flush=True)
    write_results(SCRIPT, records, args.out_dir, torch.device("cpu"), {"out_dir": args.out_dir})


if __name__ == "__main__":
    main()
