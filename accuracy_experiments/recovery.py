"""Recovery after one-shot pruning: how much of the one-shot 2:4 loss gap each fine-tuning variant closes.

Per seed:

1. the dense Llama of ``accuracy_experiments/oneshot.py`` (``slope train --dense``, 4 layers, 128 wide,
   300 steps on the embedded corpus; reused when its run folder exists);
2. one-shot 2:4 of every block linear (:func:`slope.oneshot`): SparseGPT (the seed's method, 64
   calibration windows of 128 tokens from the *training* split) and magnitude (a larger gap);
3. :func:`slope.finetune` for the same number of steps, data and schedule in every variant:

   - ``dense-ft``: the dense model fine-tuned without pruning (the reference: the dense model is not
     converged, so fine-tuning alone lowers its loss too);
   - ``constant``: the 2:4 model with ``ConstantPruningModifier`` only (no distillation);
   - ``kl``: plus ``OutputDistillationModifier(targets=[lm_head], comparison=kl)`` from the dense teacher;
   - ``square_head``: plus ``OutputDistillationModifier(targets=[embed_tokens, every block, model],
     comparison=square_head)`` (the seed's recipe, Kurtic et al. 2023).

Validation loss on the held-out split (the windows of ``slope eval``). The one-shot gap is
``L_oneshot − L_dense``; after recovery the sparse model's remaining gap is measured against the
dense model fine-tuned identically, ``L_variant − L_dense-ft``, and ``gap_closed = 1 − remaining /
one-shot gap`` (1: as good as dense at equal steps; 0: no better than right after pruning, relative
to dense). ``gap_closed_vs_teacher = (L_oneshot − L_variant) / (L_oneshot − L_dense)`` also counts
what fine-tuning alone gains, so it exceeds 1 on this under-trained model.

::

    .venv/bin/python accuracy_experiments/recovery.py            # 2 seeds, ~30 min on a 2-core CPU
    .venv/bin/python accuracy_experiments/recovery.py --quick    # a smoke run

Writes ``accuracy_experiments/results/recovery/recovery.json`` and ``recovery.png``.
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
from accuracy_experiments.oneshot import pretrain  # noqa: E402
from performance_experiments.common import environment  # noqa: E402

from slope.checkpoint import read_checkpoint  # noqa: E402
from slope.data import load_splits, val_batches  # noqa: E402
from slope.evaluate import evaluate_loss  # noqa: E402
from slope.pruning import oneshot  # noqa: E402
from slope.pruning.loading import load_model  # noqa: E402
from slope.recovery.finetune import finetune  # noqa: E402

SCRIPT = "accuracy_experiments/recovery.py"
OUT = REPO_ROOT / "accuracy_experiments" / "results" / "recovery"
VARIANTS = ("constant", "kl", "square_head")
METHODS = {
    "sparsegpt": {"oneshot_stage": {"obcq_modifiers": {"SparseGPTModifier": {
        "sparsity": 0.5, "mask_structure": "2:4", "block_size": 128, "sequential_update": True, "targets": ["re:model.layers.\\d+$"]}}}},
    "magnitude": {"oneshot_stage": {"pruning_modifiers": {"MagnitudePruningModifier": {
        "mask_structure": "2:4", "targets": ["re:model.layers.\\d+$"]}}}},
}


def recovery_recipe(variant: str, layers: int) -> dict | None:
    if variant == "dense-ft":
        return None
    stage = {"pruning_modifiers": {"ConstantPruningModifier": {
        "targets": ["re:.*self_attn.(q|k|v|o)_proj", "re:.*mlp.(gate|up|down)_proj"], "start": 0}}}
    if variant == "kl":
        stage["distillation_modifiers"] = {"OutputDistillationModifier": {"targets": ["lm_head"], "comparison": "kl"}}
    elif variant == "square_head":
        targets = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(layers)] + ["model"]
        stage["distillation_modifiers"] = {"OutputDistillationModifier": {"targets": targets, "comparison": "square_head"}}
    return {"recovery_stage": stage}


def _finetune(student, recipe, teacher, training: dict, batches) -> tuple[float, float, dict]:
    start = time.perf_counter()
    model = finetune(student, recipe, "embedded", distill_teacher=teacher, **training)
    seconds = time.perf_counter() - start
    return evaluate_loss(model, batches, torch.device("cpu"), "fp32"), seconds, model.finetune_summary


def run_seed(seed: int, args, env: dict) -> list[dict]:
    run = Path(args.runs) / f"oneshot-dense-seed{seed}"
    pretrain(run, seed, args.pretrain_steps)
    dense, _ = load_model(run)
    cfg = read_checkpoint(run / "checkpoint").config
    data = load_splits(cfg.dataset, cfg.seq_len, cfg.text_field)
    batches = val_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=args.eval_batches)
    dense_loss = evaluate_loss(dense, batches, torch.device("cpu"), "fp32")
    training = dict(max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup,
                    per_device_train_batch_size=cfg.batch_size, max_seq_length=cfg.seq_len, max_grad_norm=None, seed=seed,
                    eval_steps=args.eval_every, eval_batches=4, device="cpu", progress=False)  # shipped tokenizer, cached splits
    dense_ft, dense_ft_s, dense_ft_summary = _finetune(copy.deepcopy(dense), None, None, training, batches)
    print(f"seed {seed}: dense {dense_loss:.4f}; dense fine-tuned {args.steps} steps {dense_ft:.4f} ({dense_ft_s:.0f} s)", flush=True)
    config = {"seed": seed, "pretrain": {"max_steps": cfg.max_steps, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
              "seq_len": cfg.seq_len, "lr": cfg.lr}, "num_calibration_samples": args.samples,
              "finetune": {k: v for k, v in training.items() if k != "tokenizer"}, "val_tokens": sum(y.numel() for _, y in batches)}
    records = []
    for method, oneshot_recipe in METHODS.items():
        pruned = copy.deepcopy(dense)
        oneshot(pruned, oneshot_recipe, dataset=data.train, num_calibration_samples=args.samples, max_seq_length=cfg.seq_len,
                verbose=False)
        oneshot_loss = evaluate_loss(pruned, batches, torch.device("cpu"), "fp32")
        gap = oneshot_loss - dense_loss
        print(f"seed {seed}: one-shot {method} 2:4 {oneshot_loss:.4f} (gap {gap:.4f})", flush=True)
        for variant in VARIANTS:
            recipe = recovery_recipe(variant, cfg.num_layers)
            teacher = copy.deepcopy(dense) if variant in ("kl", "square_head") else None
            loss, seconds, summary = _finetune(copy.deepcopy(pruned), recipe, teacher, training, batches)
            closed = 1 - (loss - dense_ft) / gap
            print(f"seed {seed} {method:<9} {variant:<12} val loss {loss:.4f}  gap closed {closed:+.3f}  {seconds:.0f} s", flush=True)
            records.append({
                "script": SCRIPT, **env, "config": {**config, "method": method, "oneshot_recipe": oneshot_recipe, "variant": variant,
                                                    "recipe": recipe},
                "dense": {"val_loss": dense_loss, "finetuned_val_loss": dense_ft, "finetune_seconds": dense_ft_s,
                          "val_curve": dense_ft_summary["val_curve"]},
                "oneshot": {"val_loss": oneshot_loss, "gap": gap},
                "sparse": {"val_loss": loss, "seconds": seconds, "val_curve": summary["val_curve"],
                           "distillation": summary.get("distillation")},
                "gap_closed": closed, "gap_closed_vs_teacher": (oneshot_loss - loss) / gap,
                "loss_ratio_to_dense_finetuned": loss / dense_ft,
            })
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["config"]["seed"] for r in records})
    methods = [m for m in METHODS if any(r["config"]["method"] == m for r in records)]
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(5 * (1 + len(methods)), 4.3))
    left = axes[0]
    first = [r for r in records if r["config"]["seed"] == seeds[0] and r["config"]["method"] == methods[0]]
    left.plot(*zip(*first[0]["dense"]["val_curve"]), "k.-", label="dense fine-tuned")
    for r in first:
        left.plot(*zip(*r["sparse"]["val_curve"]), "o-", ms=3, label=r["config"]["variant"])
    left.set(xlabel="fine-tuning step", ylabel="validation loss (finetune's 4 batches)", title=f"{methods[0]} 2:4, seed {seeds[0]}")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for ax, method in zip(axes[1:], methods):
        for i, variant in enumerate(VARIANTS):
            vals = [r["gap_closed"] for r in records if r["config"]["variant"] == variant and r["config"]["method"] == method]
            if vals:
                ax.bar(i, sum(vals) / len(vals), color=f"C{i}", alpha=0.7)
                ax.plot([i] * len(vals), vals, "k.", ms=8)
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(VARIANTS)), VARIANTS)
        gaps = [r["oneshot"]["gap"] for r in records if r["config"]["method"] == method]
        ax.set(ylabel="share of the one-shot gap closed (vs dense at equal steps)",
               title=f"{method} 2:4 (one-shot gap {sum(gaps) / len(gaps):.4f}); bar: mean, dots: seeds {seeds}")
        ax.title.set_fontsize(8)
    fig.suptitle("Recovery after one-shot 2:4 pruning (dense Llama from `slope train --dense`), equal fine-tuning steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _first(records: list[dict], seed: int, method: str) -> dict | None:
    return next((r for r in records if r["config"]["seed"] == seed and r["config"]["method"] == method), None)


def table(records: list[dict]) -> str:
    seeds = sorted({r["config"]["seed"] for r in records})
    lines = []
    for seed in seeds:
        r = next(r for r in records if r["config"]["seed"] == seed)
        lines.append(f"seed {seed}: dense {r['dense']['val_loss']:.4f}, dense fine-tuned {r['dense']['finetuned_val_loss']:.4f}; "
                     + ", ".join(f"one-shot {m} {_first(records, seed, m)['oneshot']['val_loss']:.4f}" for m in METHODS
                                 if _first(records, seed, m)))
    lines += ["", "| one-shot | variant | val loss (per seed) | gap closed (mean; per seed) | vs teacher (mean) | time (s, mean) |",
              "|---|---|---|---|---|---|"]
    for method in METHODS:
        for variant in VARIANTS:
            rows = [r for r in records if r["config"]["variant"] == variant and r["config"]["method"] == method]
            if rows:
                gaps = [r["gap_closed"] for r in rows]
                vs_teacher = sum(r["gap_closed_vs_teacher"] for r in rows) / len(rows)
                secs = sum(r["sparse"]["seconds"] for r in rows) / len(rows)
                losses = "; ".join(f"{r['sparse']['val_loss']:.4f}" for r in rows)
                lines.append(f"| {method} | {variant} | {losses} | "
                             f"{sum(gaps) / len(gaps):.3f} ({'; '.join(f'{g:.3f}' for g in gaps)}) | {vs_teacher:.2f} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--steps", type=int, default=80, help="fine-tuning steps of every variant")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs"))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, 20 pretraining / 4 fine-tuning steps")
    parser.add_argument("--report-only", action="store_true", help="print the table and redraw the plot from --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        records = json.loads((out / "recovery.json").read_text())
        plot(records, out / "recovery.png")
        print(table(records))
        return
    if args.quick:
        args.seeds, args.pretrain_steps, args.samples, args.steps, args.eval_every, args.eval_batches = args.seeds[:1], 20, 8, 4, 2, 2
        args.runs = str(Path(args.runs) / "quick")
    torch.set_num_threads(1)  # the 2-core machine is shared; one thread per process is faster and steadier
    env = environment(torch.device("cpu"))
    env.update({"transformers": __import__("transformers").__version__})
    records = [r for seed in args.seeds for r in run_seed(seed, args, env)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "recovery.png")
    print(table(records))
    print(f"wrote {out / 'recovery.json'} and {out / 'recovery.png'}")


if __name__ == "__main__":
    main()
