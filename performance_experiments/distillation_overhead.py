"""Memory and time overhead of distillation in :func:`slope.finetune` (recovery after pruning).

A Llama (4 layers, 256 wide, vocabulary 4096) pruned one-shot to 2:4 is fine-tuned for a few steps
with ``ConstantPruningModifier`` alone (the baseline, record key ``dense``) and with an
``OutputDistillationModifier`` from its dense original (record key ``sparse``): ``kl`` on the logits
(``lm_head``: the teacher computes everything) and ``square_head`` on the embeddings, every block and
the final norm (the seed's targets: the teacher stops before its vocabulary projection). Each run is
a fresh process: time per optimizer step (the loop's wall time / steps, best of ``--repeats``
interleaved runs) and memory as the growth of the process's peak resident set (``VmHWM``) over its
size once the student is built — which covers the teacher's weights, its captured outputs and the
larger autograd graph. The teacher's captured outputs per micro-batch are also counted exactly.

::

    .venv/bin/python performance_experiments/distillation_overhead.py          # ~2 minutes on a 2-core CPU

Writes ``performance_experiments/results/cpu/distillation_overhead.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from performance_experiments.common import DEFAULT_OUT_DIR, environment, make_record, ratio, write_results  # noqa: E402

SCRIPT = "distillation_overhead"
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
              vocab_size=4096, max_position_embeddings=512)
DOCS = ["def f%d(x):\n    return [x * %d + i for i in range(%d)]\n" % (i, i, i % 17) for i in range(3000)]


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def recipe(kind: str) -> dict:
    stage = {"pruning_modifiers": {"ConstantPruningModifier": {"start": 0}}}
    if kind == "kl":
        stage["distillation_modifiers"] = {"OutputDistillationModifier": {"targets": ["lm_head"], "comparison": "kl"}}
    elif kind == "square_head":
        targets = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(CONFIG["num_hidden_layers"])] + ["model"]
        stage["distillation_modifiers"] = {"OutputDistillationModifier": {"targets": targets, "comparison": "square_head"}}
    return {"stage": stage}


def child(kind: str, steps: int, batch: int, seq: int) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    import transformers as T

    from slope.pruning import oneshot
    from slope.pruning.loading import shipped_tokenizer
    from slope.recovery.finetune import finetune

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG))
    student = copy.deepcopy(dense)
    oneshot(student, {"s": {"g": {"MagnitudePruningModifier": {"mask_structure": "2:4"}}}}, verbose=False)
    teacher = dense if kind != "none" else None
    if teacher is None:
        del dense
    base_kib = _status_kib("VmRSS")
    model = finetune(student, recipe(kind), DOCS, distill_teacher=teacher, max_steps=steps, per_device_train_batch_size=batch,
                     max_seq_length=seq, eval_batches=1, learning_rate=1e-4, tokenizer=shipped_tokenizer(), device="cpu",
                     progress=False, logging_steps=steps)
    summary = model.finetune_summary
    distill = summary.get("distillation") or {}
    return {"step_ms": 1000 * summary["elapsed_s"] / steps, "peak_growth_mib": (_status_kib("VmHWM") - base_kib) / 1024,
            "teacher_param_mib": 0.0 if teacher is None else sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20,
            "teacher_outputs_mib_per_micro_batch": distill.get("teacher_output_bytes_per_micro_batch", 0) / 2**20,
            "targets": len(distill.get("targets", []))}


def _run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--child", choices=("none", "kl", "square_head"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq)))
        return
    runs: dict[str, list[dict]] = {"none": [], "kl": [], "square_head": []}
    for _ in range(args.repeats):  # interleaved, so that every variant sees the same machine load
        for kind in runs:
            runs[kind].append(_run_child(kind, args))
            print(kind, runs[kind][-1], flush=True)
    best = {kind: min(rs, key=lambda r: r["step_ms"]) for kind, rs in runs.items()}
    env = environment(torch.device("cpu"))
    config = {"model": CONFIG, "steps": args.steps, "batch": args.batch, "seq_len": args.seq, "repeats": args.repeats,
              "student": "one-shot magnitude 2:4, exact-backward SLoPe layers", "threads": 1}
    records = []
    base = best["none"]
    for kind in ("kl", "square_head"):
        d = best[kind]
        records.append(make_record(
            SCRIPT, env, {**config, "comparison": kind, "recipe": recipe(kind)},
            {**base, "all_step_ms": [r["step_ms"] for r in runs["none"]]}, {**d, "all_step_ms": [r["step_ms"] for r in runs[kind]]},
            backend="simulated", labels={"dense": "recovery fine-tuning without distillation", "sparse": f"with {kind} distillation"},
            distill_time_overhead_ratio=ratio(d["step_ms"], base["step_ms"]),
            peak_growth_memory_ratio=ratio(d["peak_growth_mib"], base["peak_growth_mib"])))
    write_results(SCRIPT, records, args.out_dir, torch.device("cpu"), vars(args))
    for r in records:
        print(f"{r['config']['comparison']:<12} step {r['sparse']['step_ms']:.0f} ms vs {r['dense']['step_ms']:.0f} ms "
              f"(x{r['distill_time_overhead_ratio']}), peak growth {r['sparse']['peak_growth_mib']:.0f} MiB vs "
              f"{r['dense']['peak_growth_mib']:.0f} MiB, teacher outputs {r['sparse']['teacher_outputs_mib_per_micro_batch']:.1f} MiB")


if __name__ == "__main__":
    main()
