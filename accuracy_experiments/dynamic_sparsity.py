"""Dynamic sparse fine-tuning: static magnitude masks vs gradual pruning vs RigL (issue 18).

From one dense pretrained checkpoint (``slope train --dense`` on the embedded corpus, 2 layers of
width 128, trained here first), fine-tune on the same corpus with :func:`slope.dynamic.sparse_finetune` for the same number
of steps, batches and learning-rate schedule, and compare the validation loss at the end:

- ``dense``: no pruning (the fine-tuning control);
- ``static``: prune once by magnitude at step 0 (``sparsity_schedule="constant"``), fixed mask;
- ``gradual``: cubic schedule 0 → target over the first 75 % of steps (Zhu & Gupta), magnitude;
- ``rigl``: prune once at step 0, then RigL every ``interval`` steps (fraction 0.3, cosine-decayed);
- at 50 % unstructured and at 2:4. Static and RigL 2:4 run simulated with the exact backward
  (``compress=False, double_pruning=False``) so that they differ from gradual 2:4 (masked dense
  weights) only by the mask policy; ``rigl-slope`` is RigL 2:4 on the accelerated SLoPe layer
  (compressed, double-pruned backward), the path a GPU user gets by default.

Writes ``results/dynamic_sparsity/summary.json`` (per run and per method: validation loss
before and after fine-tuning, curves, environment) and ``val_loss.png``.

    OMP_NUM_THREADS=1 .venv/bin/python accuracy_experiments/dynamic_sparsity.py          # ~20 min on this shared 2-core CPU
    OMP_NUM_THREADS=1 .venv/bin/python accuracy_experiments/dynamic_sparsity.py --quick  # seconds (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from accuracy_experiments.run import environment  # noqa: E402

SCRIPT = "accuracy_experiments/dynamic_sparsity.py"

#: method -> sparse_finetune options (on top of the shared ones)
METHODS = {
    "dense": dict(sparsity_ratio=0.0, use_rigl=False, sparsity_schedule="constant"),
    "static-50%": dict(use_rigl=False, sparsity_schedule="constant"),
    "gradual-50%": dict(use_rigl=False, sparsity_schedule="cubic"),
    "rigl-50%": dict(use_rigl=True, sparsity_schedule=None),
    "static-2:4": dict(sparsity_type="2:4", use_rigl=False, sparsity_schedule="constant", compress=False, double_pruning=False),
    "gradual-2:4": dict(sparsity_type="2:4", use_rigl=False, sparsity_schedule="cubic"),
    "rigl-2:4": dict(sparsity_type="2:4", use_rigl=True, compress=False, double_pruning=False),
    "rigl-2:4-slope": dict(sparsity_type="2:4", use_rigl=True),
}


def pretrain(work: Path, steps: int, log) -> Path:
    """The dense checkpoint every method starts from (reused when present)."""
    from slope.config import TrainConfig
    from slope.train import train

    out = work / f"dense-pretrain-{steps}"
    if (out / "checkpoint" / "manifest.json").exists():
        log(f"reusing the dense checkpoint in {out}")
        return out
    cfg = TrainConfig(out=str(out), dense=True, max_steps=steps, eval_every=steps, save_every=0, seed=0, num_layers=2, batch_size=8)
    summary = train(cfg, progress=False, log=lambda line: None, plot=False)
    log(f"pretrained dense: {steps} steps, validation loss {summary['final_val_loss']:.4f}")
    return out


def finetune(checkpoint: Path, method: str, seed: int, args) -> dict:
    from slope.dynamic import sparse_finetune

    t0 = time.perf_counter()
    model = sparse_finetune(
        str(checkpoint), "embedded", mask_update_interval=args.interval, mask_update_fraction=0.3,
        learning_rate=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup, gradient_accumulation_steps=1,
        gradient_checkpointing=False, max_steps=args.steps, seed=seed, max_seq_length=128, eval_batches=args.eval_batches,
        eval_steps=args.eval_every, logging_steps=10, device="cpu", progress=False, **METHODS[method])
    s = model.finetune_summary
    return {"method": method, "seed": seed, "initial_val_loss": s["initial_val_loss"], "final_val_loss": s["final_val_loss"],
            "final_train_loss": s["final_train_loss"], "final_sparsity": s["final_sparsity"], "mask_updates": s["mask_updates"],
            "val_curve": s["val_curve"], "wall_s": round(time.perf_counter() - t0, 1), "options": {k: v for k, v in METHODS[method].items()}}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    dense = [r["final_val_loss"] for r in runs if r["method"] == "dense"]
    dense_mean = statistics.mean(dense) if dense else None
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        final = [r["final_val_loss"] for r in mine]
        mean = statistics.mean(final)
        rows.append({"method": method, "seeds": [r["seed"] for r in mine], "final_val_loss_mean": mean,
                     "final_val_loss_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                     "val_loss_after_pruning_mean": statistics.mean(r["initial_val_loss"] for r in mine),
                     "final_sparsity": mine[0]["final_sparsity"],
                     "gap_to_dense_finetune": None if dense_mean is None else mean - dense_mean})
    return rows


def plot(runs: list[dict], rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method and r["val_curve"]]
        if mine:
            steps, losses = zip(*mine[0]["val_curve"])
            left.plot(steps, losses, "o-", ms=3, label=f"{method} (seed {mine[0]['seed']})")
    left.set(xlabel="fine-tuning step", ylabel="validation loss (nats/token)", title="validation loss during fine-tuning")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [r["method"] for r in rows]
    right.barh(names, [r["final_val_loss_mean"] for r in rows], xerr=[r["final_val_loss_std"] for r in rows], color="tab:blue")
    right.invert_yaxis()
    lo = min(r["final_val_loss_mean"] for r in rows)
    right.set_xlim(lo - 0.1, max(r["final_val_loss_mean"] for r in rows) + 0.05)
    right.set(xlabel="final validation loss (mean over seeds)", title="after equal fine-tuning steps")
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (not for conclusions)")
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "dynamic_sparsity")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "dynamic_sparsity")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps, args.interval, args.eval_batches, args.eval_every, args.seeds = 20, 8, 3, 2, 4, [0]
    torch.set_num_threads(1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = pretrain(args.work, args.pretrain_steps, log)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            run = finetune(checkpoint, method, seed, args)
            runs.append(run)
            log(f"seed {seed} {method:>15}: val loss {run['initial_val_loss']:.4f} (after pruning) -> {run['final_val_loss']:.4f} "
                f"| sparsity {run['final_sparsity']:.3f} | {run['mask_updates']} mask changes | {run['wall_s']} s")
    rows = summarize(runs)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"script": SCRIPT, **environment("cpu"), "threads": 1, "config": config, "summary": rows, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(runs, rows, args.results / "val_loss.png")
    for row in rows:
        log(f"{row['method']:>15}: {row['final_val_loss_mean']:.4f} ± {row['final_val_loss_std']:.4f} (after pruning "
            f"{row['val_loss_after_pruning_mean']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
