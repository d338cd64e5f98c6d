"""Validation loss of each stage of scripts/prune_and_recover.sh, on one held-out split.

Every model folder (``NAME=DIR``) is loaded with :func:`slope.pruning.loading.load_model` and measured
with :func:`slope.evaluate.evaluate_loss` on the validation windows ``slope train`` / ``slope eval``
use (:func:`slope.data.val_batches` over :func:`slope.data.load_splits`: every 20th chunk of the
dataset, never trained on), so the stages are comparable. Writes a JSON summary and prints a table.

    python scripts/stage_losses.py --out runs/x/summary.json dense=runs/x/1-dense oneshot=runs/x/2-oneshot-2of4 ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slope.data import load_splits, perplexity, val_batches  # noqa: E402
from slope.evaluate import evaluate_loss  # noqa: E402
from slope.pruning.layers import is_linear, read_weight  # noqa: E402
from slope.pruning.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--out", required=True, help="summary JSON to write")
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    splits = load_splits(args.dataset, args.seq_len)
    batches = val_batches(splits.val, batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.eval_batches)
    rows = []
    for spec in args.stages:
        name, _, folder = spec.partition("=")
        model, _ = load_model(folder)
        linears = [read_weight(m) for n, m in model.named_modules() if is_linear(m) and ".layers." in n]
        zeros = sum(int((w == 0).sum()) for w in linears) / max(1, sum(w.numel() for w in linears))
        loss = evaluate_loss(model, batches, torch.device("cpu"), "fp32")
        rows.append({"stage": name, "model": folder, "val_loss": loss, "val_ppl": perplexity(loss), "block_linear_zero_fraction": zeros})
    base = rows[0]["val_loss"]
    for row in rows:
        row["loss_increase_over_first"] = row["val_loss"] - base
    summary = {"dataset": args.dataset, "val_tokens": sum(y.numel() for _, y in batches), "stages": rows}
    if len(rows) >= 3:  # dense, one-shot, recovered...: the share of the one-shot gap each later stage closes
        gap = rows[1]["val_loss"] - base
        for row in rows[2:]:
            row["oneshot_gap_closed"] = (rows[1]["val_loss"] - row["val_loss"]) / gap if gap > 0 else None
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'stage':<12} {'val loss':>9} {'ppl':>9} {'zeros':>6}  gap closed")
    for row in rows:
        closed = row.get("oneshot_gap_closed")
        print(f"{row['stage']:<12} {row['val_loss']:>9.4f} {row['val_ppl']:>9.2f} {row['block_linear_zero_fraction']:>6.3f}  "
              + ("" if closed is None else f"{100 * closed:.1f} %"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
