"""`slope train --deepspeed` in one process, without a launcher, and its non-finite steps.

Each case runs this file as a worker (a plain process: no ``RANK``/``LOCAL_RANK``, as a user
starts ``slope train`` by hand). The worker wraps ``slope.train._update`` to snapshot the model
around every step and poisons one step's loss with a NaN (so its gradients are NaN too). The
poisoned step must change no weight (dense and sparse), be recorded as skipped, and the next step
must train on with finite weights (moments not poisoned either).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
REPO = Path(__file__).resolve().parents[1]
POISONED_STEP = 2
TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1", "--eval-every", "100",
        "--save-every", "0", "--lazy-lora-fraction", "0", "--max-steps", "4", "--device", "cpu"]


def _worker(out: Path, precision: str) -> None:
    """Run ``slope train`` with the wrapped update; write one JSON line per step to ``out/steps.jsonl``."""
    import torch
    import torch.nn.functional as F

    import slope.train as train
    from slope.cli import main

    poison = {"on": False}
    cross_entropy = F.cross_entropy

    def poisoned_cross_entropy(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if poison["on"] else loss

    forward_backward, update = train._forward_backward, train._update

    def wrapped_forward_backward(runner, train_tokens, step, *args, **kwargs):
        poison["on"] = step == POISONED_STEP
        try:
            return forward_backward(runner, train_tokens, step, *args, **kwargs)
        finally:
            poison["on"] = False

    def snapshot(runner) -> dict:
        return {k: v.detach().float().clone() for k, v in runner.module.state_dict().items() if v.is_floating_point()}

    def wrapped_update(runner, *args, **kwargs):
        before = snapshot(runner)
        skipped, grad_norm = update(runner, *args, **kwargs)
        after = snapshot(runner)
        record = {
            "skipped": skipped,
            "changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "sparse_values": sum(k.endswith(".values") for k in before),
        }
        with open(out / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return skipped, grad_norm

    F.cross_entropy = poisoned_cross_entropy
    train._forward_backward, train._update = wrapped_forward_backward, wrapped_update
    config = out / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": int(os.environ["SLOPE_TEST_ZERO"])}}))
    sys.exit(main(["train", "--out", str(out / "run"), "--deepspeed", str(config), "--precision", precision, *TINY]))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional extra)")
@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "bf16")])
def test_a_non_finite_step_changes_no_weight_under_deepspeed(tmp_path, stage, precision):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLOPE_TEST_ZERO=str(stage), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    done = subprocess.run([sys.executable, __file__, str(tmp_path), precision], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and steps[0]["sparse_values"] > 0
    poisoned = steps[POISONED_STEP - 1]
    assert poisoned["skipped"] and poisoned["changed"] == [], poisoned
    for record in steps[:POISONED_STEP - 1] + steps[POISONED_STEP:]:
        assert not record["skipped"] and record["finite"], record
        assert any(k.endswith(".values") for k in record["changed"]) and any(not k.endswith(".values") for k in record["changed"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped", False) for m in metrics if "loss" in m] == [False, True, False, False]


@pytest.mark.parametrize("config,words", [
    ({}, "ZeRO stage 0"),
    ({"zero_optimization": {"stage": 0}}, "ZeRO stage 0"),
    ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True, "check_grad_overflow": False}}, "check_grad_overflow"),
])
def test_train_config_refuses_what_its_guard_cannot_keep(config, words):
    from slope.parallel import deepspeed_train_config

    with pytest.raises(ValueError, match=words):
        deepspeed_train_config(config, global_batch=2, grad_accum=1, world_size=1, gradient_clipping=0.0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
