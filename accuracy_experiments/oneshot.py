"""One-shot pruning of a pretrained dense Llama: magnitude vs Wanda vs SparseGPT (and OWL).

1. Pretrain the dense model with ``slope train --dense`` on the embedded corpus (skipped when the
   run folder already holds its final checkpoint).
2. For every structure (2:4, 4:8, 50 % unstructured; and 70 % unstructured, where OWL is meant to
   help) and method, prune a fresh copy with :func:`slope.oneshot` (the ``slope train`` checkpoint
   loads directly, :func:`slope.pruning.loading.load_model`), calibrating on windows of the *training*
   split, and measure the validation loss with :func:`slope.evaluate.evaluate_loss` on the run's
   held-out split (the windows ``slope eval`` uses, more of them), plus the pruning wall time.

::

    .venv/bin/python accuracy_experiments/oneshot.py             # pretraining ~1.5 min a seed + pruning on a 2-core CPU
    .venv/bin/python accuracy_experiments/oneshot.py --quick     # a smoke run (seconds after training)

Writes ``accuracy_experiments/results/oneshot/oneshot.json`` (DESIGN §7 records: dense and sparse
figures of the same run and their ratio) and ``oneshot.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from performance_experiments.common import environment  # noqa: E402

from slope.checkpoint import read_checkpoint  # noqa: E402
from slope.cli import main as slope_cli  # noqa: E402
from slope.data import load_splits, perplexity, val_batches  # noqa: E402
from slope.evaluate import evaluate_loss  # noqa: E402
from slope.pruning import oneshot  # noqa: E402
from slope.pruning.loading import load_model  # noqa: E402

SCRIPT = "accuracy_experiments/oneshot.py"
OUT = REPO_ROOT / "accuracy_experiments" / "results" / "oneshot"

STRUCTURES = {"2:4": {"mask_structure": "2:4"}, "4:8": {"mask_structure": "4:8"},
              "50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}}
METHODS = {
    "magnitude": ("MagnitudePruningModifier", {}),
    "wanda": ("WandaPruningModifier", {}),
    "sparsegpt": ("SparseGPTModifier", {"block_size": 128, "dampening_frac": 0.01, "sequential_update": True}),
    "wanda-owl": ("WandaPruningModifier", {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08}),
    "sparsegpt-owl": ("SparseGPTModifier", {"block_size": 128, "dampening_frac": 0.01, "sequential_update": True,
                                            "sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08}),
}


def pretrain(run: Path, seed: int, max_steps: int) -> None:
    """``slope train --dense`` into ``run`` unless its final checkpoint is there already."""
    manifest = run / "checkpoint" / "manifest.json"
    if manifest.exists() and read_checkpoint(run / "checkpoint").step == max_steps:
        return
    rc = slope_cli(["train", "--dense", "--out", str(run), "--seed", str(seed), "--max-steps", str(max_steps),
                    "--save-every", "0", "--eval-every", str(max_steps)])
    if rc:
        raise SystemExit(f"slope train failed with status {rc}")


def recipe(method: str, structure: str) -> dict:
    name, params = METHODS[method]
    return {"oneshot_stage": {"pruning_modifiers": {name: {**STRUCTURES[structure], **params}}}}


def cells(quick: bool):
    for structure in STRUCTURES:
        for method in METHODS:
            if "owl" in method and structure in ("2:4", "4:8"):
                continue  # OWL varies the per-layer sparsity, which N:M fixes
            if quick and structure != "2:4":
                continue
            yield structure, method


def run_seed(seed: int, args, env: dict) -> list[dict]:
    run = Path(args.runs) / f"oneshot-dense-seed{seed}"
    pretrain(run, seed, args.max_steps)
    dense, _ = load_model(run)
    cfg = read_checkpoint(run / "checkpoint").config
    data = load_splits(cfg.dataset, cfg.seq_len, cfg.text_field)
    batches = val_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=args.eval_batches)
    device = torch.device("cpu")
    dense_loss = evaluate_loss(dense, batches, device, "fp32")
    calibration = data.train  # 1-D stream: windows spread evenly over the training split
    config = {"seed": seed, "pretrain": {"max_steps": cfg.max_steps, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers, "seq_len": cfg.seq_len,
              "batch_size": cfg.batch_size, "lr": cfg.lr},
              "num_calibration_samples": args.samples, "max_seq_length": cfg.seq_len,
              "val_tokens": sum(y.numel() for _, y in batches)}
    records = []
    for structure, method in cells(args.quick):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        oneshot(model, recipe(method, structure), dataset=calibration, num_calibration_samples=args.samples,
                max_seq_length=cfg.seq_len, verbose=False)
        seconds = time.perf_counter() - start
        loss = evaluate_loss(model, batches, device, "fp32")
        zeros = model.slope_oneshot_report["zero_fraction"]
        print(f"seed {seed} {structure:>4} {method:<14} val loss {loss:.4f} (dense {dense_loss:.4f}, "
              f"{loss - dense_loss:+.4f}) zeros {zeros:.3f}  {seconds:.1f} s", flush=True)
        records.append({
            "script": SCRIPT, **env, "config": {**config, "structure": structure, "method": method,
                                                "recipe": recipe(method, structure)},
            "dense": {"val_loss": dense_loss, "val_ppl": perplexity(dense_loss)},
            "sparse": {"val_loss": loss, "val_ppl": perplexity(loss), "zero_fraction": zeros, "prune_seconds": seconds},
            "loss_increase": loss - dense_loss, "val_ppl_ratio": perplexity(loss) / perplexity(dense_loss),
        })
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structures = [s for s in STRUCTURES if any(r["config"]["structure"] == s for r in records)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.16
    for i, method in enumerate(METHODS):
        xs, ys, errs = [], [], []
        for j, structure in enumerate(structures):
            vals = [r["loss_increase"] for r in records if r["config"]["method"] == method and r["config"]["structure"] == structure]
            if vals:
                xs.append(j + (i - 2) * width)
                ys.append(sum(vals) / len(vals))
                errs.append((max(vals) - min(vals)) / 2)
        if xs:
            ax.bar(xs, ys, width, yerr=errs, label=method, capsize=2)
    ax.set_xticks(range(len(structures)), [s if ":" in s else f"{s} unstructured" for s in structures])
    ax.set_yscale("log")
    ax.set_ylabel("validation loss increase over dense (nats/token, log)")
    seeds = sorted({r["config"]["seed"] for r in records})
    ax.set_title(f"One-shot pruning of a dense Llama pretrained with `slope train --dense` (seeds {seeds}; bar: mean, whisker: range)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    """Markdown: per structure and method, the mean over seeds (and the per-seed values)."""
    seeds = sorted({r["config"]["seed"] for r in records})
    dense = {r["config"]["seed"]: r["dense"]["val_loss"] for r in records}
    lines = [f"dense validation loss: {', '.join(f'seed {s}: {dense[s]:.4f}' for s in seeds)}", "",
             "| structure | method | loss increase over dense (mean; per seed) | ppl ratio (mean) | prune time (s, mean) |",
             "|---|---|---|---|---|"]
    for structure, method in cells(False):
        rows = [r for r in records if r["config"]["structure"] == structure and r["config"]["method"] == method]
        if not rows:
            continue
        inc = [r["loss_increase"] for r in rows]
        lines.append(f"| {structure} | {method} | {sum(inc) / len(inc):.4f} ({'; '.join(f'{v:.4f}' for v in inc)}) | "
                     f"{sum(r['val_ppl_ratio'] for r in rows) / len(rows):.4f} | "
                     f"{sum(r['sparse']['prune_seconds'] for r in rows) / len(rows):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=300, help="pretraining steps of the dense model")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (of the run's seq_len tokens)")
    parser.add_argument("--eval-batches", type=int, default=32, help="validation batches (of the run's batch size)")
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs"), help="where the pretraining runs go")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--quick", action="store_true", help="smoke run: 2:4 only, one seed, 20 steps, few samples")
    parser.add_argument("--report-only", action="store_true", help="print the table and redraw the plot from --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        records = json.loads((out / "oneshot.json").read_text())
        plot(records, out / "oneshot.png")
        print(table(records))
        return
    if args.quick:
        args.seeds, args.max_steps, args.samples, args.eval_batches = args.seeds[:1], 20, 8, 2
    torch.set_num_threads(1)  # the 2-core machine is shared; one thread per process is faster and steadier
    env = environment(torch.device("cpu"))
    env.update({"transformers": __import__("transformers").__version__})
    records = [r for seed in args.seeds for r in run_seed(seed, args, env)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "oneshot.png")
    print(table(records))
    print(f"wrote {out / 'oneshot.json'} and {out / 'oneshot.png'}")


if __name__ == "__main__":
    main()
