"""The training loop: schedule, loss scaling, lazy LoRA, exact resume, fp16 overflow skipping."""
import json
import math

import pytest
import torch

from slope.checkpoint import build_model, read_checkpoint
from slope.config import TrainConfig
from slope.train import LossScaler, lr_at, train

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, seq_len=16, batch_size=2,
            eval_batches=1, log_every=1, eval_every=4, save_every=0, lr=3e-3)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig().updated({**TINY, "out": str(tmp_path / name), **kw})


def records(cfg):
    with open(f"{cfg.out}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(cfg):
    return {r["step"]: r["loss"] for r in records(cfg) if "loss" in r}


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=200, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(1, 201)]
    assert lrs[0] == pytest.approx(1e-3 / 20)
    assert lrs[19] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 20 + 90
    assert lr_at(mid, cfg) == pytest.approx(1e-4 + 0.5 * 0.9e-3)


def test_lora_start_step():
    assert TrainConfig(max_steps=100, lazy_lora_fraction=0.01).lora_start == 99
    assert TrainConfig(max_steps=10, lazy_lora_fraction=0.3).lora_start == 7
    assert TrainConfig(max_steps=300, lazy_lora_fraction=0.01).lora_start == 297
    assert TrainConfig(max_steps=10, lazy_lora_fraction=0.0).lora_start == 10
    assert TrainConfig(max_steps=10, lazy_lora_fraction=1.0).lora_start == 0


def test_loss_scaler_shrinks_on_overflow_and_grows_after_clean_steps():
    scaler = LossScaler(True, init_scale=1024.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1024.0, 2048.0, float("inf")])
    assert scaler.unscale_([p], None) is True
    scaler.update(True)
    assert scaler.scale == 512.0
    p.grad = torch.tensor([512.0, 1024.0, 0.0])
    assert scaler.unscale_([p], None) is False
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 0.0]))
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 1024.0
    off = LossScaler(False, init_scale=1024.0)
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert off.scale == 1.0 and off.unscale_([p], None) is False


def test_lazy_lora_is_attached_after_the_right_step(tmp_path, capsys):
    cfg = tiny(tmp_path, max_steps=8, lazy_lora_fraction=0.25)  # ceil(0.75 * 8) = 6
    train(cfg)
    recs = records(cfg)
    events = [r for r in recs if r.get("event") == "lora_start"]
    assert [e["step"] for e in events] == [6]
    assert "step 6: lazy LoRA attached" in capsys.readouterr().out
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    assert ckpt.lora_attached
    lora_b = [v for k, v in ckpt.model_state.items() if k.endswith("lora_B")]
    assert len(lora_b) == 7  # q, k, v, o, gate, up, down of the single layer
    assert all(b.abs().sum() > 0 for b in lora_b)  # zero-initialised, trained for steps 7-8
    groups = ckpt.optimizers["dense"]["param_groups"]
    assert len(groups) == 3 and len(groups[2]["params"]) == 14
    assert groups[2]["lr"] == pytest.approx(lr_at(8, cfg))


@pytest.mark.parametrize("stop", [3, 8])  # adapters are attached after step ceil(0.7 * 9) = 7
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, stop):
    full = tiny(tmp_path, "full", max_steps=9, lazy_lora_fraction=0.3)
    train(full)
    part = tiny(tmp_path, "part", max_steps=9, lazy_lora_fraction=0.3, stop_after=stop)
    train(part)
    assert max(train_losses(part)) == stop
    assert read_checkpoint(f"{part.out}/checkpoint").lora_attached == (stop > 7)
    train(tiny(tmp_path, "part", max_steps=9, lazy_lora_fraction=0.3, resume=True))
    want, got = train_losses(full), train_losses(part)
    assert sorted(got) == list(range(1, 10))
    assert [got[s] for s in range(stop + 1, 10)] == [want[s] for s in range(stop + 1, 10)]
    val = lambda c: [(r["step"], r["val_loss"]) for r in records(c) if "val_loss" in r]  # noqa: E731
    assert val(part) == val(full)
    a = read_checkpoint(f"{full.out}/checkpoint").model_state
    b = read_checkpoint(f"{part.out}/checkpoint").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny(tmp_path, max_steps=3)
    done = train(cfg, plot=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    lines = []
    again = train(tiny(tmp_path, max_steps=3, resume=True), plot=False, log=lines.append)
    assert again == done and math.isfinite(again["final_train_loss"])  # its recorded summary, not a NaN one
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
    assert any("already at step 3 = --max-steps" in line for line in lines) and lines[-1].startswith("done: 3 steps")
    # a run killed after its last checkpoint, before its summary: one is made from its last records
    kept = [line for line in metrics.decode().splitlines() if '"summary"' not in line]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    made = train(tiny(tmp_path, max_steps=3, resume=True), plot=False, log=lines.append)
    assert made["final_train_loss"] == done["final_train_loss"] and made["final_val_loss"] == done["final_val_loss"]
    assert records(cfg)[-1]["event"] == "summary"


def test_the_model_line_counts_stored_and_dense_parameters_and_a_too_short_lora_tail_is_noted(tmp_path):
    lines = []
    train(tiny(tmp_path, "sparse", max_steps=2), plot=False, log=lines.append)
    dense_lines = []
    train(tiny(tmp_path, "dense", max_steps=2, dense=True), plot=False, log=dense_lines.append)
    dense_count = next(line for line in dense_lines if line.startswith("model:")).split(", ")[1]
    model_line = next(line for line in lines if line.startswith("model:"))
    assert f"(of {dense_count.removesuffix(' parameters')} dense)" in model_line and "parameters stored" in model_line
    assert any("--lazy-lora-fraction 0.01 of 2 steps is less than one step" in line for line in lines)
    assert not any("lazy-lora-fraction" in line for line in dense_lines)


def test_resume_with_changed_sparsity_is_rejected(tmp_path):
    from slope.checkpoint import CheckpointError

    train(tiny(tmp_path, max_steps=3, stop_after=2, compress=False))
    with pytest.raises(CheckpointError, match="sparsity='2:4'.*sparsity='2:8'"):
        train(tiny(tmp_path, max_steps=3, resume=True, compress=False, sparsity="2:8"))


def _initial_state(cfg):
    torch.manual_seed(cfg.seed)
    return build_model(cfg, 4096, 0).state_dict()


def test_fp16_overflow_skips_both_optimizers_and_shrinks_the_scale(tmp_path):
    cfg = tiny(tmp_path, max_steps=3, precision="fp16", fp16_init_scale=2.0**40, eval_every=100,
               lazy_lora_fraction=0.0)
    train(cfg)
    recs = [r for r in records(cfg) if "loss" in r]
    assert [r["skipped"] for r in recs] == [True, True, True]
    assert [r["loss_scale"] for r in recs] == [2.0**39, 2.0**38, 2.0**37]
    assert all(math.isfinite(r["loss"]) for r in recs)
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    assert ckpt.optimizers["dense"]["state"] == {} and ckpt.optimizers["sparse"]["state"] == {}
    init = _initial_state(cfg)
    assert all(torch.equal(init[k], v) for k, v in ckpt.model_state.items())  # neither side moved
    assert ckpt.trainer_state["scaler"]["scale"] == 2.0**37


def test_fp16_without_overflow_updates_and_grows_the_scale(tmp_path):
    cfg = tiny(tmp_path, max_steps=3, precision="fp16", fp16_init_scale=1.0, fp16_growth_interval=1,
               eval_every=100, lazy_lora_fraction=0.0)
    train(cfg)
    recs = [r for r in records(cfg) if "loss" in r]
    assert [r["skipped"] for r in recs] == [False, False, False]
    assert [r["loss_scale"] for r in recs] == [2.0, 4.0, 8.0]
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    init = _initial_state(cfg)
    sparse_keys = [k for k in init if k.endswith(".values")]
    assert sparse_keys and all(not torch.equal(init[k], ckpt.model_state[k]) for k in sparse_keys)
    assert not torch.equal(init["model.embed_tokens.weight"], ckpt.model_state["model.embed_tokens.weight"])
    assert int(ckpt.optimizers["sparse"]["state"][0]["step"]) == 3


def test_pruned_entries_stay_zero_and_values_are_trained(tmp_path):
    cfg = tiny(tmp_path, max_steps=4, lazy_lora_fraction=0.0, grad_accum=2)
    train(cfg)
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    assert ckpt.trainer_state["tokens"] == 4 * 2 * 2 * 16
    init = _initial_state(cfg)
    for key in [k for k in init if k.endswith(".values")]:
        assert ckpt.model_state[key].shape == init[key].shape
        assert not torch.equal(ckpt.model_state[key], init[key])
        bits = key.replace("values", "mask_bits")
        assert torch.equal(ckpt.model_state[bits], init[bits])


def test_dense_baseline_uses_no_sparse_layers(tmp_path):
    cfg = tiny(tmp_path, max_steps=2, dense=True)
    train(cfg)
    ckpt = read_checkpoint(f"{cfg.out}/checkpoint")
    assert ckpt.optimizers["sparse"] is None
    assert not any(k.endswith(".values") or "lora" in k for k in ckpt.model_state)
    assert "model.layers.0.mlp.up_proj.weight" in ckpt.model_state


def test_resume_after_a_crash_continues_from_the_last_periodic_checkpoint(tmp_path):
    full = tiny(tmp_path, "full", max_steps=7, lazy_lora_fraction=0.0)
    train(full)

    class Killed(Exception):
        pass

    def log_then_die(line):
        if line.startswith("step 5/"):
            raise Killed  # the process dies after step 5; its last checkpoint is from step 3

    crashed = tiny(tmp_path, "crash", max_steps=7, lazy_lora_fraction=0.0, save_every=3)
    with pytest.raises(Killed):
        train(crashed, progress=False, log=log_then_die)
    assert read_checkpoint(f"{crashed.out}/checkpoint").step == 3
    assert max(train_losses(crashed)) == 5
    train(tiny(tmp_path, "crash", max_steps=7, lazy_lora_fraction=0.0, save_every=3, resume=True))
    steps = [r["step"] for r in records(crashed) if "loss" in r]
    assert steps == list(range(1, 8))  # steps 4-5 of the crashed run were dropped, then redone
    assert train_losses(crashed) == train_losses(full)


def test_progress_bar_on_request(tmp_path, capsys):
    cfg = tiny(tmp_path, max_steps=2, eval_every=100)
    train(cfg, progress=True)
    captured = capsys.readouterr()
    assert "slope train" in captured.err and "2/2" in captured.err  # the tqdm bar
    assert "step 1/2 |" not in captured.out  # no plain log lines with a bar
    assert "step 2: validation loss" in captured.err + captured.out
