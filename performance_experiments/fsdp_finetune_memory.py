"""What each rank holds in :func:`slope.finetune` (recovery fine-tuning, seed 002 step 3): DDP vs FSDP2.

A Llama (4 layers, 256 wide, vocabulary 4096), pruned one-shot by magnitude — unstructured 50 % (its
linears train as ``nn.Linear`` under masks) or 2:4 (SLoPe layers: only the kept values and their
moments exist) — is fine-tuned for 2 steps with its zeros held and SquareHead distillation from the dense fp32
teacher, on 2 gloo ranks with DDP and with ``fsdp=True``. Every rank reports ``finetune_summary["memory_per_rank"]``
(:func:`slope.finetune_run.rank_memory`): the bytes it holds of parameters, buffers (SLoPe layers'
packed masks and metadata), the bool masks of masked weights, the two optimizers' state and the
teacher's weights (a sharded tensor counts its shard). Record key ``dense`` is DDP (every rank holds everything), ``sparse`` is FSDP2; the
ratios ``*_memory_ratio`` are FSDP2 / DDP per rank. Counted bytes, not timings: the figures are
exact and the same on any machine.

::

    .venv/bin/python performance_experiments/fsdp_finetune_memory.py     # ~1 minute on a 2-core CPU

Writes ``performance_experiments/results/cpu/fsdp_finetune_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
from performance_experiments.common import DEFAULT_OUT_DIR, environment, make_record, ratio, write_results  # noqa: E402
from ranks import launch  # noqa: E402

SCRIPT = "fsdp_finetune_memory"
WORLD = 2
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
              vocab_size=4096, max_position_embeddings=256)
PRUNING = {"unstructured 50%": {"sparsity": 0.5}, "2:4": {"mask_structure": "2:4"}}
PARTS = ("parameters", "buffers", "masks", "dense_optimizer", "sparse_optimizer", "teacher")
#: Reported beside the parts, not added to the total: the SLoPe layers' kept values (part of ``parameters``).
SUBSETS = ("sparse_values",)
#: Recovery as in the guide: the zeros held, SquareHead distillation of every block's output from the dense teacher.
RECIPE = {"stage": {"modifiers": {"ConstantPruningModifier": {"start": 0},
                                  "OutputDistillationModifier": {"targets": [f"model.layers.{i}" for i in range(CONFIG["num_hidden_layers"])],
                                                                 "comparison": "square_head"}}}}


def worker(pruning: str, fsdp: bool, out: Path) -> None:
    """One rank of one run: fine-tune, then write this rank's :func:`rank_memory` to ``out``."""
    import copy
    import os

    import transformers as T

    from slope.pruning import oneshot
    from slope.pruning.loading import shipped_tokenizer
    from slope.recovery.finetune import finetune

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG))
    teacher = copy.deepcopy(model)
    oneshot(model, {"s": {"g": {"MagnitudePruningModifier": PRUNING[pruning]}}}, verbose=False)
    model = finetune(model, RECIPE, "embedded", distill_teacher=teacher, max_steps=2,
                     per_device_train_batch_size=2, max_seq_length=64, eval_batches=1, learning_rate=1e-4,
                     tokenizer=shipped_tokenizer(), device="cpu", progress=False, fsdp=fsdp)
    rank = os.environ["RANK"]
    (out / f"rank{rank}.json").write_text(json.dumps(model.finetune_summary["memory_per_rank"]))


def _measure(pruning: str, fsdp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        launch([__file__, "--worker", pruning, "--fsdp" if fsdp else "--ddp", tmp], Path(tmp), world=WORLD)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    mib = {part: round(max(r[part] for r in ranks) / 2**20, 4) for part in PARTS}  # the fullest rank
    subsets = {part: round(max(r[part] for r in ranks) / 2**20, 4) for part in SUBSETS}
    return {**mib, "total": round(sum(mib.values()), 4), **subsets,
            "ranks_mib": [round(sum(r[part] for part in PARTS) / 2**20, 4) for r in ranks]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--worker", choices=tuple(PRUNING), help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.fsdp, Path(args.folder))
    env = environment(torch.device("cpu"))
    records = []
    for pruning in PRUNING:
        ddp, fsdp = _measure(pruning, False), _measure(pruning, True)
        ratios = {f"{part}_memory_ratio": ratio(fsdp[part], ddp[part]) for part in (*PARTS, *SUBSETS, "total")}
        records.append(make_record(SCRIPT, env, {"model": CONFIG, "pruning": pruning, "world_size": WORLD, "unit": "MiB per rank"},
                                   ddp, fsdp, labels={"dense": "DDP", "sparse": "FSDP2 (fsdp=True)"}, **ratios))
        print(f"{pruning:<17} per rank: DDP {ddp['total']:.2f} MiB, FSDP2 {fsdp['total']:.2f} MiB (x{ratios['total_memory_ratio']}); "
              + ", ".join(f"{part} x{ratios[f'{part}_memory_ratio']}" for part in (*PARTS, *SUBSETS)), flush=True)
    write_results(SCRIPT, records, args.out_dir, torch.device("cpu"), {"out_dir": args.out_dir})


if __name__ == "__main__":
    main()
