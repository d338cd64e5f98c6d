"""No fault loses a run (issue 20, docs/robustness.md): crash states of a save, kills at every
instant of one, full disks, NaN runs, fp16 overflow at the scale floor, state-dict mismatches,
two runs on one folder, torn metrics lines, SIGINT/SIGTERM, and one-line CLI errors."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slope.checkpoint_store as store
import slope.durable as durable
from slope import prune_model
from slope.checkpoint import FILES, read_checkpoint, save_checkpoint, verify_checkpoint
from slope.cli import main
from slope.config import TrainConfig
from slope.durable import StorageError, append_line
from slope.guard import DivergenceError, FiniteGuard, check_finite
from slope.metrics_log import MetricsLog, read_records
from slope.optimizers import ADAMWSparse
from slope.runlock import RunLock, RunLockError
from slope.statecheck import StateDictError, check_model_state, check_optimizer_state
from slope.train import LossScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from signalled import signal_mid_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1", "--eval-every", "100",
        "--save-every", "0", "--lazy-lora-fraction", "0"]


# ---------------------------------------------------------------------- helpers
def _save(directory: Path, step: int, keep: int = 1, scale: float = 1.0) -> None:
    """A small but real checkpoint of ``step`` (an nn.Linear and its AdamW) published at ``directory``."""
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(scale * step)
    save_checkpoint(directory, model=model, dense_opt=torch.optim.AdamW(model.parameters()), sparse_opt=None,
                    trainer_state={"step": step}, config=TrainConfig(), keep=keep)


def _step(path: Path) -> int:
    return verify_checkpoint(path)["step"]


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def _two_checkpoints(run: Path) -> tuple[Path, Path]:
    """``run/A`` (step 2, serial 1) and ``run/B`` (step 4, serial 2): the before/after of one save."""
    _save(run / "checkpoint", 2)
    shutil.copytree(run / "checkpoint", run / "A")
    _save(run / "checkpoint", 4)
    os.rename(run / "checkpoint", run / "B")
    return run / "A", run / "B"


def _rewrite(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and its manifest checksum (a consistent, edited checkpoint)."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SLoPe run stopped after step 2 of 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(run), *TINY, "--max-steps", "4", "--stop-after", "2"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"slope {command}: error: "), err
    return lines[0]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_records(run / "metrics.jsonl") if "loss" in r]


# ---------------------------------------------------------------------- 1. crash-safe saves
@pytest.mark.parametrize("state, expected_step, keep", [
    ("partial .tmp", 2, 1),         # killed while writing the new save
    ("complete .tmp", 4, 1),        # killed after writing, before the renames
    ("between renames", 4, 1),      # issue 20 item 1: checkpoint.old + checkpoint.tmp, no checkpoint/
    ("between renames", 4, 2),      # ... keeping 2: the older one becomes checkpoint-step000002/
    ("before retiring .old", 4, 1),
    ("partial .old", 4, 1),         # killed while removing the previous checkpoint
])
def test_crash_states_resolve_to_the_newest_complete_checkpoint(tmp_path, state, expected_step, keep):
    run = tmp_path / "run"
    run.mkdir()
    a, b = _two_checkpoints(run)
    base = run / "checkpoint"
    if state == "partial .tmp":
        os.rename(a, base)
        os.rename(b, run / "checkpoint.tmp")
        (run / "checkpoint.tmp" / "manifest.json").unlink()
        (run / "checkpoint.tmp" / "rng.pt").write_bytes(b"trunc")
    elif state == "complete .tmp":
        os.rename(a, base)
        os.rename(b, run / "checkpoint.tmp")
    elif state == "between renames":
        os.rename(a, run / "checkpoint.old")
        os.rename(b, run / "checkpoint.tmp")
    elif state == "before retiring .old":
        os.rename(a, run / "checkpoint.old")
        os.rename(b, base)
    else:
        os.rename(a, run / "checkpoint.old")
        (run / "checkpoint.old" / "optimizers.pt").unlink()
        os.rename(b, base)
    before = _names(run)
    newest = store.latest_checkpoint(base)
    assert _step(newest) == expected_step and _names(run) == before  # finding it changes nothing
    store.recover(base, keep)
    kept = ["checkpoint-step000002"] if keep == 2 and state == "between renames" else []
    assert _names(run) == sorted(["checkpoint", *kept])
    assert _step(base) == expected_step and read_checkpoint(base).step == expected_step
    assert all(_step(run / k) == 2 for k in kept)


def test_newest_is_the_last_written_not_the_highest_step(tmp_path):
    """A new run in an old folder restarts at step 1: the manifest serial orders saves, not steps."""
    base = tmp_path / "checkpoint"
    _save(base, 10)
    shutil.copytree(base, tmp_path / "old-run")
    _save(base, 1)  # the new run's first save
    os.rename(base, tmp_path / "checkpoint.tmp")
    os.rename(tmp_path / "old-run", tmp_path / "checkpoint.old")  # killed between the renames
    assert _step(store.latest_checkpoint(base)) == 1


def test_a_damaged_checkpoint_is_reported_not_skipped(tmp_path):
    base = tmp_path / "checkpoint"
    _save(base, 2, keep=2)
    _save(base, 4, keep=2)
    (base / "manifest.json").write_text("[1, 2]")  # not an object (issue 20 item 8)
    with pytest.raises(store.CheckpointError, match="manifest.json is corrupt") as e:
        store.latest_checkpoint(base)
    # the kept older copy is named as the way out (not "delete the checkpoint and retrain")
    assert "older checkpoints are kept beside it (checkpoint-step000002): move checkpoint aside" in str(e.value)
    assert store.recover(base, 2) == [] and (base / "manifest.json").exists()  # nothing deleted
    base.rename(tmp_path / "damaged")  # as the advice says: the kept copy is found
    assert store.latest_checkpoint(base) == tmp_path / "checkpoint-step000002"
    (tmp_path / "damaged").rename(base)
    shutil.rmtree(tmp_path / "checkpoint-step000002")
    with pytest.raises(store.CheckpointError, match="delete the checkpoint and retrain"):
        store.latest_checkpoint(base)


def test_keep_rotates_only_after_the_newer_one_is_safe(tmp_path):
    base = tmp_path / "checkpoint"
    for step in (1, 2, 3, 4):
        _save(base, step, keep=3)
    assert _names(tmp_path) == ["checkpoint", "checkpoint-step000002", "checkpoint-step000003"]
    assert [_step(p) for p in store.kept_checkpoints(base)] == [2, 3] and _step(base) == 4
    _save(base, 5, keep=1)  # fewer kept from now on
    assert _names(tmp_path) == ["checkpoint"] and _step(base) == 5


def test_a_kill_at_any_instant_of_a_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """Snapshot the folder before every file-system operation of a save (and mid-way through every
    file write): each snapshot is what a kill at that instant leaves. Each must resolve to the old
    checkpoint until the new manifest is durable, to the new one after, and recover cleanly."""
    run, snaps = tmp_path / "run", tmp_path / "snaps"
    run.mkdir()
    snaps.mkdir()
    _save(run / "checkpoint", 2)
    log, real = [], {"rename": os.rename, "rmtree": shutil.rmtree, "write": durable.write_file, "fsync_dir": store.fsync_dir}

    def snapshot(label, partial=None):
        dest = snaps / f"{len(log):03d}"
        shutil.copytree(run, dest)
        if partial is not None:
            path, data = partial
            (dest / path.relative_to(run)).write_bytes(data[: len(data) // 2])
        log.append(label)

    def write(path, data):
        snapshot(f"write {Path(path).name}")
        snapshot(f"half {Path(path).name}", (Path(path), data))
        real["write"](path, data)

    def rename(src, dst):
        snapshot(f"rename {Path(src).name} {Path(dst).name}")
        real["rename"](src, dst)

    def rmtree(path, *a, **k):
        if Path(path).is_dir():
            snapshot(f"rmtree {Path(path).name}")
        real["rmtree"](path, *a, **k)

    def fsync_dir(path):
        log.append(f"fsync {Path(path).name}")
        real["fsync_dir"](path)

    monkeypatch.setattr(durable, "write_file", write)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(store, "fsync_dir", fsync_dir)
    _save(run / "checkpoint", 4)
    monkeypatch.undo()
    # Power loss: every file and the new folder are synced before the first rename, the run folder after.
    first_rename = next(i for i, e in enumerate(log) if e.startswith("rename"))
    assert "fsync checkpoint.tmp" in log[:first_rename] and log[first_rename + 2] == "fsync run"
    manifest_done = log.index("half manifest.json") + 1
    snapshots = sorted(snaps.iterdir())
    assert len(snapshots) >= 14
    for snap in snapshots:
        expected = 2 if int(snap.name) <= manifest_done else 4
        assert _step(store.latest_checkpoint(snap / "checkpoint")) == expected, (snap.name, log[int(snap.name)])
        store.recover(snap / "checkpoint")
        assert _names(snap) == ["checkpoint"] and read_checkpoint(snap / "checkpoint").step == expected


def test_resume_between_the_renames_continues_the_run(run, capsys):
    """Issue 20 item 1 end to end: --resume used to say 'no checkpoint' (and a new run deleted both)."""
    base = run / "checkpoint"
    shutil.copytree(base, run / "checkpoint.tmp")
    os.rename(base, run / "checkpoint.old")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "published checkpoint.tmp/ as checkpoint/" in out and "resumed from" in out and "done: 4 steps" in out
    assert _names(run) == ["checkpoint", "loss.png", "metrics.jsonl"] and read_checkpoint(base).step == 4


def test_a_crashed_save_is_hashed_once_from_discovery_to_load(run, monkeypatch):
    """--resume of a run killed after writing checkpoint.tmp/: the CLI's look for the newest
    checkpoint, recover() (which publishes .tmp and verifies the one it rotates out) and
    read_checkpoint hash each file once (three times each for the published one before)."""
    import slope.filestamp as filestamp

    base, tmp = run / "checkpoint", run / "checkpoint.tmp"
    shutil.copytree(base, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "serial": manifest["serial"] + 1}))
    past = time.time_ns() - 100 * 10**9  # written a while ago, like a crashed run's files
    for path in (*base.iterdir(), *tmp.iterdir()):
        os.utime(path, ns=(past, past))
    hashed = []

    def counting_open(path, *args, **kwargs):
        hashed.append(os.stat(path).st_ino)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(filestamp, "open", counting_open, raising=False)
    assert main(["train", "--out", str(run), "--resume", "--stop-after", "3"]) == 0
    assert len(hashed) == len(set(hashed)) == 2 * len(FILES)  # both checkpoints' files, once each


# ---------------------------------------------------------------------- 6. full disks
def _disk_full_after(monkeypatch, budget: int):
    """Every low-level write fails with ENOSPC once ``budget`` bytes have been written."""
    real, left = durable._write_all, [budget]

    def write_all(fd, data):
        if len(data) > left[0]:
            os.write(fd, bytes(memoryview(data)[: left[0]]))
            left[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= len(data)
        return real(fd, data)

    monkeypatch.setattr(durable, "_write_all", write_all)


@pytest.mark.parametrize("budget", [0, 3_000])  # fails on the first file / a later one
def test_disk_full_during_a_save_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch, budget):
    base = tmp_path / "checkpoint"
    _save(base, 2)
    _disk_full_after(monkeypatch, budget)
    with pytest.raises(StorageError) as e:
        _save(base, 4)
    assert "No space left on device (the disk is full: free some space)" in str(e.value) and "\n" not in str(e.value)
    assert _names(tmp_path) == ["checkpoint"] and read_checkpoint(base).step == 2


def test_disk_full_while_logging_metrics_keeps_whole_lines(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    _disk_full_after(monkeypatch, 5)
    with pytest.raises(StorageError, match="metrics.jsonl: No space left on device"):
        append_line(path, json.dumps({"step": 2, "loss": 1.0}))
    assert path.read_text() == '{"step": 1}\n'  # the torn half line was cut back
    run = tmp_path / "run"
    _disk_full_after(monkeypatch, 0)
    assert main(["train", "--out", str(run), *TINY, "--max-steps", "2"]) == 1
    assert "No space left on device" in _one_line_error(capsys, "train")


# ---------------------------------------------------------------------- 5. metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_with_a_note_on_resume(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # what a full disk under another writer leaves
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "dropped a torn last line" in capsys.readouterr().out
    assert _train_steps(run) == [1, 2, 3, 4]


def test_a_kill_while_a_resume_rewrites_metrics_keeps_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    original = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies before the new file replaces the old one

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, keep_until_step=2)
    assert path.read_text() == original
    monkeypatch.undo()
    MetricsLog(path, keep_until_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------- 2. the finite-loss guard
def test_guard_patience_and_the_finite_check():
    guard = FiniteGuard(patience=2)
    guard.record(1, 1.0, skipped=False)
    guard.record(2, float("nan"), skipped=True)
    guard.record(3, float("nan"), skipped=True)
    with pytest.raises(DivergenceError, match=r"step 4: 3 steps in a row .*\(since step 1; last loss nan\)"):
        guard.record(4, float("nan"), skipped=True)
    guard = FiniteGuard(patience=1)
    for step in range(1, 10):  # isolated skips never stop a run
        guard.record(step, 1.0, skipped=step % 2 == 0)
    check_finite(1, 2.0, {"model": {"w": torch.ones(2)}, "opt": {"state": {0: {"exp_avg": torch.zeros(2)}}}})
    with pytest.raises(DivergenceError, match=r"opt.state.0.exp_avg holds inf/nan"):
        check_finite(1, 2.0, {"model": {"w": torch.ones(2)}, "opt": {"state": {0: {"exp_avg": torch.tensor([0.0, float("inf")])}}}})
    with pytest.raises(DivergenceError, match="the loss is nan; the checkpoint is not written"):
        check_finite(1, float("nan"), {})


def test_loss_scale_has_a_floor():
    scaler = LossScaler(True, init_scale=1024.0, min_scale=64.0)
    for _ in range(10):
        scaler.update(True)
    assert scaler.scale == 64.0
    assert LossScaler(True, init_scale=0.5, min_scale=1.0).min_scale == 0.5  # never above the start


def test_a_diverging_resume_stops_and_keeps_the_good_checkpoint(run, capsys):
    """Issue 20 item 2: --resume --lr 1e9 used to write NaN weights over the good checkpoint and exit 0."""
    before = (run / "checkpoint" / "manifest.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--lr", "1e9", "--max-steps", "12", "--nonfinite-patience", "2"]) == 1
    line = _one_line_error(capsys, "train")
    assert "inf/nan" in line or "diverged" in line
    assert (run / "checkpoint" / "manifest.json").read_text() == before
    assert not (run / "checkpoint.tmp").exists() and main(["eval", "--checkpoint", str(run)]) == 0


def test_no_checkpoint_is_written_while_steps_are_skipped(tmp_path, capsys):
    """A huge learning rate without clipping: one update leaves finite but ruined weights, then every
    step is skipped. The saves due meanwhile are put off, so the good checkpoint of step 4 stays and a
    resume with a sane learning rate trains on from it."""
    out = tmp_path / "run"
    base = ["train", "--out", str(out), *TINY[:-4], "--lazy-lora-fraction", "0", "--max-steps", "40", "--save-every", "2"]
    assert main([*base, "--stop-after", "4"]) == 0
    assert main([*base, "--resume", "--lr", "1e4", "--grad-clip", "0", "--nonfinite-patience", "6"]) == 1
    out_text = capsys.readouterr()
    assert "no checkpoint while steps are skipped for non-finite numbers" in out_text.out, out_text.out[-2000:]
    assert "steps in a row skipped" in out_text.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == list(range(6, 13))  # step 5's update applied, then skips
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4  # saves due at 6, 8, 10, 12 put off
    assert main([*base, "--resume", "--max-steps", "6"]) == 0  # trains on from step 4, nothing skipped
    assert not any(json.loads(line).get("skipped") for line in (out / "metrics.jsonl").read_text().splitlines()[-3:])


def test_fp16_overflow_at_the_scale_floor_stops_the_run(tmp_path, capsys):
    """Issue 20 item 2: fp16 used to skip every step forever, halving the scale without a floor."""
    out = tmp_path / "fp16"
    args = ["--precision", "fp16", "--fp16-init-scale", str(2.0**40), "--fp16-min-scale", str(2.0**39), "--nonfinite-patience", "2"]
    assert main(["train", "--out", str(out), *TINY, "--max-steps", "50", *args]) == 1
    assert "step 3: 3 steps in a row skipped" in _one_line_error(capsys, "train")
    scales = [json.loads(line)["loss_scale"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert scales == [2.0**39, 2.0**39, 2.0**39] and not (out / "checkpoint").exists()


def test_eval_fails_on_a_non_finite_loss(run, capsys):
    from safetensors.torch import load_file, save

    state = load_file(str(run / "checkpoint" / "model.safetensors"))
    state["model.norm.weight"].fill_(float("nan"))
    _rewrite(run / "checkpoint", "model.safetensors", save(state))
    assert main(["eval", "--checkpoint", str(run)]) == 1
    assert "the validation loss is nan" in _one_line_error(capsys, "eval")


# ---------------------------------------------------------------------- 3. state-dict validation
def _mlp(sparsity: str) -> nn.Module:
    torch.manual_seed(0)
    return prune_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), compress=False, sparsity=sparsity, verbose=False)


@pytest.mark.parametrize("saved, loaded", [("2:4", "1:4"), ("1:4", "2:4")])
def test_adamw_sparse_refuses_another_sparsity_before_changing_anything(saved, loaded):
    """Issue 20 item 3: 1:4 moments into 2:4 layers made the fused step write out of bounds."""
    source = _mlp(saved)
    opt = ADAMWSparse(source, lr=1e-3)
    source(torch.randn(4, 64)).sum().backward()
    opt.step()
    target = _mlp(loaded)
    fresh = ADAMWSparse(target, lr=1e-3)
    with pytest.raises(StateDictError, match=r"0: exp_avg is \(64, (16|32)\), the parameter is \(64, (16|32)\)"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state and fresh.lr == 1e-3
    target(torch.randn(4, 64)).sum().backward()
    fresh.step()  # still usable


def test_model_and_dense_optimizer_states_are_checked_before_loading():
    source, target = _mlp("2:4"), _mlp("1:4")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateDictError, match="0: the checkpoint keeps 32 of 64 weights per row but this layer is 1:4"):
        check_model_state(target, source.state_dict())
    with pytest.raises(RuntimeError, match="0: the checkpoint keeps 32"):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    state = source.state_dict()
    state["0.bias"] = state["0.bias"].double()
    with pytest.raises(StateDictError, match="0.bias is torch.float64, the model's is torch.float32"):
        check_model_state(source, state)
    a, b = nn.Linear(4, 8), nn.Linear(4, 4)
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    a(torch.randn(2, 4)).sum().backward()
    opt_a.step()
    with pytest.raises(StateDictError, match=r"weight: exp_avg is \(8, 4\), the parameter is \(4, 4\)"):
        check_optimizer_state(opt_b, opt_a.state_dict(), ["weight", "bias"])


def _counting(monkeypatch, module, name: str) -> list:
    """Count the calls of ``module.name`` (still calling it)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_a_state_dict_checked_before_loading_is_validated_once(monkeypatch):
    """check_model_state then load_state_dict count each mask once, and the loaded M is not
    counted again at first use; a mask changed in place after the check is checked again."""
    import slope.layer

    source, target = _mlp("2:4"), _mlp("2:4")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    unpacked, packed = (_counting(monkeypatch, slope.layer, f) for f in ("is_nm_sparse", "packed_is_nm_sparse"))
    check_model_state(target, state)
    target.load_state_dict(state)
    assert len(unpacked) + len(packed) == 2  # one per SLoPe layer
    layers = [target[0], target[2]]
    assert all(layer._validated_mask == layer._mask_key() for layer in layers)
    torch.testing.assert_close(target(torch.ones(2, 64)), source(torch.ones(2, 64)), rtol=0, atol=0)
    check_model_state(target, state)
    state["0.mask_bits"].zero_()  # after the check: keeps 0 of every 4
    with pytest.raises(RuntimeError, match="0: the checkpoint's mask is not 2:4"):
        target.load_state_dict(state)


def test_resume_validates_masks_and_optimizer_states_once(run, monkeypatch):
    """slope train --resume checks the checkpoint's masks and optimizer states before loading
    anything, and the loads do not check them again (7 SLoPe layers; AdamW and ADAMWSparse)."""
    import slope.layer
    import slope.statecheck

    unpacked, packed = (_counting(monkeypatch, slope.layer, f) for f in ("is_nm_sparse", "packed_is_nm_sparse"))
    optimizers = _counting(monkeypatch, slope.statecheck, "check_optimizer_state")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert len(unpacked) + len(packed) == 7 and len(optimizers) == 2


# ---------------------------------------------------------------------- 4. one run per folder
def test_a_second_run_on_the_same_folder_is_refused(run, capsys):
    metrics = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from slope.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--out", str(run), "--resume"]) == 1
        line = _one_line_error(capsys, "train")
        assert f"is in use by another slope train (pid {holder.pid} on " in line and "choose another --out" in line
        assert (run / "metrics.jsonl").read_text() == metrics  # nothing mixed in
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is stale, and the next run takes over.
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert f"took over the stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (run / ".lock").exists()


def test_run_lock_in_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


# ---------------------------------------------------------------------- 7. SIGINT / SIGTERM
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_zero(tmp_path, sig):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "slope", "train", "--out", str(out), *TINY, "--max-steps", "100000"]
    returncode, stdout, stderr = signal_mid_run(
        argv, lambda: (out / "metrics.jsonl").exists() and len(_train_steps(out)) >= 2, sig, timeout=600, poll=0.1)  # mid-run
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {sig.name} after step ") and "continue with: slope train --out" in last
    step = int(last.split("after step ")[1].split()[0])
    assert read_checkpoint(out / "checkpoint").step == step >= 2 and not (out / ".lock").exists()


# ---------------------------------------------------------------------- 8. one-line CLI errors
def _cli_case(name: str, run: Path, tmp_path: Path) -> tuple[list[str], str, str]:
    """``(argv, command, expected text)`` of each CLI case of issue 20 item 8."""
    if name == "non-UTF-8 dataset":
        data = tmp_path / "latin1.txt"
        data.write_bytes("caf\xe9 au lait ".encode("latin-1") * 300)
        return ["train", "--out", str(tmp_path / "x"), *TINY, "--dataset", str(data)], "train", "not UTF-8 text"
    if name == "jsonl.gz that is not gzip":
        data = tmp_path / "data.jsonl.gz"
        data.write_text('{"text": "not compressed"}\n')
        return ["train", "--out", str(tmp_path / "x"), *TINY, "--dataset", str(data)], "train", "must be gzip-compressed"
    if name == "manifest not an object":
        (run / "checkpoint" / "manifest.json").write_text("[1, 2]")
        return ["eval", "--checkpoint", str(run)], "eval", "manifest.json is corrupt (expected a JSON object"
    if name == "config/weights size mismatch":
        config = json.loads((run / "checkpoint" / "config.json").read_text())
        _rewrite(run / "checkpoint", "config.json", json.dumps({**config, "intermediate_size": 192}).encode())
        return ["eval", "--checkpoint", str(run)], "eval", "does not match the model its config.json describes"
    if name == "--out names a file":
        (tmp_path / "file").write_text("x")
        return ["train", "--out", str(tmp_path / "file"), *TINY], "train", "is a file, not a folder"
    if name == "eval --device tpu":
        return ["eval", "--checkpoint", str(run), "--device", "tpu"], "eval", "device 'tpu' is not supported; use auto, cpu"
    if name == "--max-steps below the checkpoint's step":
        return ["train", "--out", str(run), "--resume", "--max-steps", "1"], "train", "the checkpoint is already at step 2"
    if name == "resume with another --seed":
        return ["train", "--out", str(run), "--resume", "--seed", "5"], "train", "seed=0 but this run asks for seed=5 (the seed fixes"
    assert name == "resume of a folder without a checkpoint"
    return ["train", "--out", str(tmp_path / "none"), "--resume"], "train", "no checkpoint at"


@pytest.mark.parametrize("name", [
    "non-UTF-8 dataset", "jsonl.gz that is not gzip", "manifest not an object", "config/weights size mismatch",
    "--out names a file", "eval --device tpu", "--max-steps below the checkpoint's step", "resume with another --seed",
    "resume of a folder without a checkpoint",
])
def test_cli_errors_are_one_line_without_traceback(run, tmp_path, capsys, name):
    argv, command, expected = _cli_case(name, run, tmp_path)
    assert main(argv) == 1
    assert expected in _one_line_error(capsys, command)


def test_a_new_run_never_replaces_an_unfinished_one(run, capsys):
    """The fixture's run stopped at step 2 of 4: a new run in its folder is refused (nothing written),
    a resume goes on, and once the run has finished a new run may replace it."""
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoint").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["train", "--out", str(run), *TINY, "--max-steps", "4"]) == 1
    assert "holds an unfinished run (its checkpoint is at step 2 of 4): continue it with --resume" in _one_line_error(capsys, "train")
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoint").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.002"]) == 0
    out = capsys.readouterr().out
    assert "note: resuming with changed settings (lr 0.003 -> 0.002); they apply from step 3 on" in out, out
    assert main(["train", "--out", str(run), *TINY, "--max-steps", "2"]) == 0
    assert "the finished run's metrics there are replaced, and its checkpoint" in capsys.readouterr().out


def test_a_new_run_never_replaces_a_run_it_cannot_read(tmp_path, capsys):
    """An unfinished run whose newest checkpoint is damaged (manifest or config gone): a new run is
    refused and the kept copies stay; --resume says which copies are kept. A finished run's kept
    copies go with it when a new run replaces it."""
    out = tmp_path / "run"
    base = ["train", "--out", str(out), *TINY[:-4], "--lazy-lora-fraction", "0", "--save-every", "2", "--keep-checkpoints", "3"]
    assert main([*base, "--max-steps", "10", "--stop-after", "6"]) == 0
    kept = sorted(p.name for p in out.glob("checkpoint-step*"))
    assert kept == ["checkpoint-step000002", "checkpoint-step000004"]
    capsys.readouterr()
    for damaged in ("manifest.json", "config.json"):
        shutil.copytree(out, tmp_path / damaged)
        (tmp_path / damaged / "checkpoint" / damaged).unlink()
        assert main(["train", "--out", str(tmp_path / damaged), *TINY[:-4], "--max-steps", "4"]) == 1
        assert "holds a checkpoint that cannot be read" in _one_line_error(capsys, "train")
        assert sorted(p.name for p in (tmp_path / damaged).glob("checkpoint-step*")) == kept
    assert main(["eval", "--checkpoint", str(tmp_path / "manifest.json" / "checkpoint")]) == 1
    assert "checkpoint without its manifest.json (damaged, or its save was cut short): use an older copy" in _one_line_error(
        capsys, "eval")
    shutil.copytree(out, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "checkpoint" / "config.json").unlink()
    assert main(["train", "--out", str(tmp_path / "noconfig"), *TINY[:-4], "--resume"]) == 1
    assert "checkpoint/config.json is missing; older checkpoints are kept beside it" in _one_line_error(capsys, "train")
    # the finished run (resumed to its end above) is replaced with its kept copies
    assert main([*base, "--resume", "--max-steps", "10"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-step*")) == ["checkpoint-step000006", "checkpoint-step000008"]
    capsys.readouterr()
    assert main([*base, "--max-steps", "4", "--seed", "7", "--stop-after", "2"]) == 0
    assert "its checkpoint (with any kept copies) at the new run's first save" in capsys.readouterr().out
    assert not list(out.glob("checkpoint-step*"))  # the finished run's copies went with its checkpoint
    assert main([*base, "--max-steps", "4", "--seed", "7", "--resume"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-step*")) == ["checkpoint-step000002"]  # the new run's own


def test_inference_needs_no_training_state(run, capsys):
    """A checkpoint without optimizers.pt / rng.pt (removed to save space) still evaluates, generates
    and exports; resuming it says which file training needs."""
    for name in ("optimizers.pt", "rng.pt"):
        (run / "checkpoint" / name).unlink()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert main(["export", str(run), "--output-dir", str(run.parent / "exported")]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 1
    assert "optimizers.pt is missing; the checkpoint is incomplete (resuming training needs it" in _one_line_error(capsys, "train")


def test_a_mistyped_checkpoint_folder_lists_the_ones_there(run, capsys):
    assert main(["eval", "--checkpoint", str(run / "checkpoint-step2")]) == 1
    assert f"no checkpoint at {run / 'checkpoint-step2'} ({run} holds checkpoint)" in _one_line_error(capsys, "eval")
