"""Sparse-increment fine-tuning on a held-out domain: full FT vs LoRA vs SIFT vs SpIEL (rigl, sm3).

1. Pretrain a small dense Llama with ``slope train --dense`` (``slope.train.train``) on the
   embedded corpus *without* the held-out domain: the Python standard library's network and mail
   protocol modules (``DOMAIN`` below).
2. Fine-tune it on the domain's train split with each method at the same token budget, and
   measure the domain's validation loss (the base model's is the zero-shot line), plus the
   counted training memory of each: weights (all parameters and buffers as trained, deltas'
   values *and* indices included), gradients (the persistent ``.grad`` of the trained tensors)
   and optimizer state (every tensor in ``optimizer.state``). LoRA (the ``peft`` library) gets
   the rank whose trainable count is closest to SpIEL's; SIFT gets the same count.

    python accuracy_experiments/peft_sft.py          # ~15 min on an idle 2-core CPU (over an hour under load)
    python accuracy_experiments/peft_sft.py --quick  # a smoke run of the pipeline

Writes ``accuracy_experiments/results/peft_sft.json`` and ``peft_sft.png``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slope.config import TrainConfig  # noqa: E402
from slope.data.dataset import CORPUS_FILE, load_splits, train_batch, val_batches  # noqa: E402
from slope.evaluate import load_trained_model  # noqa: E402
from slope.peft import SIFT, SftAdamW, SftConfig, SftSelector, SftSM3, get_peft_model  # noqa: E402
from slope.train import train as slope_train  # noqa: E402

DOMAIN = ["imaplib.py", "smtplib.py", "nntplib.py", "ftplib.py", "smtpd.py", "poplib.py", "telnetlib.py",
          "socketserver.py", "asynchat.py", "asyncore.py"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "default": dict(pretrain_steps=100, steps=60, batch=8, seq_len=128, eval_every=20, eval_batches=8),
    "quick": dict(pretrain_steps=4, steps=6, batch=2, seq_len=32, eval_every=3, eval_batches=1),
}
# One learning rate per method; the best of LR_FACTORS x it is reported (all are recorded).
LRS = {"full": 3e-4, "lora": 3e-3, "sift": 1e-3, "spiel-rigl": 1e-3, "spiel-sm3": 1e-2}
LR_FACTORS = (1.0, 3.0)
DENSITY = 0.01


def split_corpus(folder: Path) -> tuple[Path, Path]:
    pre, dom = folder / "pretrain.jsonl", folder / "domain.jsonl"
    with gzip.open(CORPUS_FILE, "rt") as f, open(pre, "w") as fp, open(dom, "w") as fd:
        for line in f:
            (fd if json.loads(line)["source"] in DOMAIN else fp).write(line)
    return pre, dom


def pretrain(data: Path, out: Path, p: dict) -> torch.nn.Module:
    cfg = TrainConfig(out=str(out), dense=True, dataset=str(data), max_steps=p["pretrain_steps"], seq_len=p["seq_len"],
                      eval_every=max(p["pretrain_steps"], 1), save_every=0, device="cpu")
    slope_train(cfg, progress=False, log=lambda line: None, plot=False)
    return load_trained_model(out, device="cpu", mode="unmerged").model


def val_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(model, optimizer, trained, indices=()) -> dict:
    """Counted bytes; ``indices``: index tensors kept outside parameters and buffers (SIFT's)."""
    weights = nbytes(list(model.parameters()) + list(model.buffers()) + list(indices))
    grads = nbytes(p for p in trained if p.grad is not None)
    state = nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"weights_bytes": weights, "grads_bytes": grads, "optimizer_bytes": state, "total_bytes": weights + grads + state}


def setup(method: str, base: torch.nn.Module, lr: float, steps: int, k_target: int):
    """(model, optimizer, trained params, after-step hook, index tensors, trainable count) of one method."""
    import copy

    model = copy.deepcopy(base)
    hook, indices = None, lambda: ()
    if method == "full":
        trained = list(model.parameters())
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model as lora_model

        per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
        rank = max(1, round(k_target / per_rank))
        model = lora_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    elif method == "sift":
        target_numel = sum(p.numel() for n, p in model.named_parameters() if any(t in n for t in TARGETS))
        sift = SIFT(model, sparse_rate=k_target / target_numel, sparse_module=TARGETS)
        trained = list(sift.parameters_in_optimizer())
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        indices = lambda: [s.flat_idx for s in sift.sparse_mapping.values()]  # noqa: E731
    else:
        algorithm = method.split("-")[1]
        cfg = SftConfig(task_type="CAUSAL_LM", density=DENSITY, selection_algorithm=algorithm, target_modules=TARGETS)
        model = get_peft_model(model, cfg)
        trained = [p for p in model.parameters() if p.requires_grad]
        if algorithm == "sm3":
            opt = SftSM3(trained, {d.values: d for _, _, d in model.active_deltas()}, lr=lr)
        else:
            opt = SftAdamW(trained, lr=lr)
        hook = SftSelector(model, opt, cfg, steps, 1).step
    return model, opt, trained, hook, indices, sum(p.numel() for p in trained)


def finetune(method, base, lr, data, p, k_target, seed=0):
    model, opt, trained, after_step, indices, n_trainable = setup(method, base, lr, p["steps"], k_target)
    val = val_batches(data.val, batch_size=p["batch"], seq_len=p["seq_len"], max_batches=p["eval_batches"])
    curve, peak, start = [], None, time.time()
    for step in range(p["steps"]):
        x, y = train_batch(data.train, seed=seed, step=step, micro=0, batch_size=p["batch"], seq_len=p["seq_len"])
        loss = F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        if step == 0:
            peak = memory(model, opt, trained, indices())  # gradients still held, state allocated
        opt.zero_grad()
        if after_step is not None:
            after_step()
        if (step + 1) % p["eval_every"] == 0 or step + 1 == p["steps"]:
            curve.append({"step": step + 1, "val_loss": val_loss(model, val)})
    return {"method": method, "lr": lr, "trainable_params": n_trainable, "val_loss": curve[-1]["val_loss"],
            "curve": curve, "memory": peak, "seconds": round(time.time() - start, 1)}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = results["best"]
    names = [r["method"] for r in best]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in best:
        a.plot([0] + [pt["step"] for pt in r["curve"]], [results["zero_shot_val_loss"]] + [pt["val_loss"] for pt in r["curve"]],
               label=f"{r['method']} (lr {r['lr']:g}, {r['trainable_params']:,} trained)")
    a.set(xlabel="fine-tuning step", ylabel="held-out-domain validation loss", title="validation loss")
    a.legend(fontsize=7)
    b.bar(names, [r["val_loss"] for r in best])
    b.axhline(results["zero_shot_val_loss"], color="gray", ls="--", label="base model (no fine-tuning)")
    b.set(ylabel="final validation loss", title="final validation loss")
    b.set_ylim(min(r["val_loss"] for r in best) * 0.97, results["zero_shot_val_loss"] * 1.01)
    b.legend(fontsize=7)
    bottom = [0.0] * len(best)
    for key, label in (("weights_bytes", "weights"), ("grads_bytes", "gradients"), ("optimizer_bytes", "optimizer state")):
        vals = [r["memory"][key] / 2**20 for r in best]
        c.bar(names, vals, bottom=bottom, label=label)
        bottom = [x + v for x, v in zip(bottom, vals)]
    c.set(ylabel="MiB (counted)", title="training memory (fp32)")
    c.legend(fontsize=7)
    for ax in (b, c):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", default=str(ROOT / "accuracy_experiments" / "results"))
    args = ap.parse_args()
    preset = "quick" if args.quick else "default"
    p = PRESETS[preset]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pre, dom = split_corpus(Path(tmp))
        t0 = time.time()
        base = pretrain(pre, Path(tmp) / "pretrain", p)
        pretrain_s = time.time() - t0
        data = load_splits(str(dom), p["seq_len"])
    base.requires_grad_(True)
    zero_shot = val_loss(base, val_batches(data.val, batch_size=p["batch"], seq_len=p["seq_len"], max_batches=p["eval_batches"]))
    k_target = round(DENSITY * sum(t.numel() for t in base.parameters()))
    runs = [finetune(m, base, LRS[m] * f, data, p, k_target) for m in LRS for f in LR_FACTORS]
    best = [min((r for r in runs if r["method"] == m), key=lambda r: r["val_loss"]) for m in LRS]
    full = next(r for r in best if r["method"] == "full")
    for r in best:
        r["memory_ratio"] = r["memory"]["total_bytes"] / full["memory"]["total_bytes"]
        r["grads_optimizer_memory_ratio"] = (r["memory"]["grads_bytes"] + r["memory"]["optimizer_bytes"]) / (
            full["memory"]["grads_bytes"] + full["memory"]["optimizer_bytes"])
    import peft
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {
        "script": "accuracy_experiments/peft_sft.py", "git_commit": commit, "device": "cpu", "preset": preset,
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "config": {**p, "domain_modules": DOMAIN, "targets": TARGETS, "density": DENSITY, "k_target": k_target,
                   "lrs": LRS, "lr_factors": LR_FACTORS, "spiel": "SftConfig defaults (reselection_steps=20, "
                   "selection_accumulation_steps=5, initial_reselection_rate=0.2)", "model": "slope train --dense default Llama"},
        "train_tokens": len(data.train), "val_tokens": len(data.val), "pretrain_seconds": round(pretrain_s, 1),
        "zero_shot_val_loss": zero_shot, "best": best, "runs": runs,
        "notes": "memory counted after the first optimizer step (fp32): parameters+buffers, .grad of trained tensors, "
                 "optimizer.state tensors; transient per-layer full gradients inside backward (SIFT's hooks, the delta "
                 "layer) are not counted",
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = "peft_sft" if preset == "default" else f"peft_sft_{preset}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{name}.png")
    for r in best:
        m = r["memory"]
        print(f"{r['method']:11s} lr {r['lr']:<7g} trained {r['trainable_params']:>9,d}  val {r['val_loss']:.4f}  "
              f"mem {m['total_bytes'] / 2**20:7.2f} MiB (w {m['weights_bytes'] / 2**20:.2f} g {m['grads_bytes'] / 2**20:.2f} "
              f"opt {m['optimizer_bytes'] / 2**20:.2f})  {r['seconds']} s")
    print(f"zero-shot {zero_shot:.4f}")


if __name__ == "__main__":
    main()
