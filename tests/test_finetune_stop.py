"""The fine-tuning loop's ``save_total_limit`` and its stop on SIGINT / SIGTERM (``slope finetune``,
``slope.dynamic.sparse_finetune`` and the train stages of ``slope apply``).

The signals are sent from inside the run, deterministically: :meth:`FinetuneLoop.train_step` is wrapped to
``os.kill`` this process after a chosen step (the handler runs before the next line); one test sends
SIGTERM to a ``slope finetune`` process from outside, and one to a single rank of two.
"""
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T

from slope import interrupt
from slope.dynamic import sparse_finetune
from slope.finetune_checkpoints import CHECKPOINT_STATE, rotate_checkpoints
from slope.finetune_loop import FinetuneLoop
from slope.finetune_run import stopped_line
from slope.pruning import oneshot
from slope.pruning.loading import shipped_tokenizer
from slope.recovery.finetune import finetune
from slope.stages import RECORD_NAME, apply

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402
from signalled import signal_mid_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
HELD = {"stage": {"pruning_modifiers": {"ConstantPruningModifier": {"start": 0}}}}
TRAIN_STEP = FinetuneLoop.train_step


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64)
    return T.LlamaForCausalLM(config)


def pruned():
    """A tiny Llama with block 0 pruned 2:4 (its zeros held by :data:`HELD` while it trains)."""
    model = tiny_llama()
    oneshot(model, {"s": {"g": {"MagnitudePruningModifier": {"mask_structure": "2:4", "targets": ["re:model.layers.0$"]}}}},
            verbose=False)
    return model


def run(out=None, rec=HELD, **kw):
    options = dict(max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_seq_length=16, eval_batches=1,
                   learning_rate=1e-2, warmup_steps=1, logging_steps=1, seed=0, tokenizer=shipped_tokenizer(), progress=False)
    return finetune(pruned(), rec, DOCS, output_dir=out, **{**options, **kw})


def signal_after(monkeypatch, step: int, sig=signal.SIGTERM, times: int = 1, rank: int | None = None) -> None:
    """From now on, send ``sig`` ``times`` times to this process right after 0-based step ``step``
    (under a launcher: on ``rank`` only)."""
    def train_step(self, s):
        result = TRAIN_STEP(self, s)
        if s == step and (rank is None or int(os.environ["RANK"]) == rank):
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(FinetuneLoop, "train_step", train_step)


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- SIGINT / SIGTERM, in process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, sig):
    whole = run(tmp_path / "whole")
    before = signal.getsignal(sig)
    signal_after(monkeypatch, 1, sig)  # after step 2 of 5; no save_steps: the stop saves anyway
    stopped = run(tmp_path / "run")
    summary = stopped.finetune_summary
    assert (summary["stopped_by"], summary["stopped_at"], summary["steps"]) == (sig.name, 2, 5)
    assert summary["stop_checkpoint"] == str(tmp_path / "run" / "checkpoint-2")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "metrics.jsonl"]  # no model, no summary
    assert signal.getsignal(sig) is before  # the handlers are restored
    assert whole.finetune_summary["stopped_by"] is None and whole.finetune_summary["stop_checkpoint"] is None
    monkeypatch.setattr(FinetuneLoop, "train_step", TRAIN_STEP)
    resumed = run(tmp_path / "run", resume_from_checkpoint=True)
    assert resumed.finetune_summary["resumed_from"] == summary["stop_checkpoint"]
    assert_same_weights(whole, resumed)
    assert resumed.finetune_summary["val_curve"] == whole.finetune_summary["val_curve"]
    assert metrics(tmp_path / "run") == metrics(tmp_path / "whole")
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_second_signal_interrupts_at_once(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(interrupt, "REPEAT_WINDOW_S", 0.0)  # (else a repeat at once counts as the first, delivered twice)
    signal_after(monkeypatch, 1, times=2)
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]  # no checkpoint, nor a partial one
    assert signal.getsignal(signal.SIGTERM) is before


def test_one_signal_delivered_twice_stops_once(tmp_path, monkeypatch):
    """Launchers deliver a signal twice (GNU timeout: to its child and to the child's group): a repeat
    of the first signal within REPEAT_WINDOW_S is the same request, the run stops with its checkpoint."""
    signal_after(monkeypatch, 1, times=2)
    summary = run(tmp_path / "run").finetune_summary
    assert (summary["stopped_by"], summary["stopped_at"]) == ("SIGTERM", 2)
    assert (tmp_path / "run" / "checkpoint-2" / CHECKPOINT_STATE).is_file()


def test_scopes_nest_and_share_the_outermost(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.GracefulStop() as outer:
        with interrupt.GracefulStop() as inner:
            assert inner is outer
            os.kill(os.getpid(), signal.SIGTERM)
        assert outer.signal_name == "SIGTERM" and signal.getsignal(signal.SIGTERM) == outer._handle  # still listening
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_the_final_save_lets_the_outputs_be_written(tmp_path, monkeypatch):
    """After the last step the run is done: a SIGTERM while its model folder is written does not kill it."""
    import slope.recovery.finetune as recovery

    save, leaked = recovery.save_model_folder, []

    def save_when_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    monkeypatch.setattr(recovery, "save_model_folder", save_when_signalled)
    previous = signal.signal(signal.SIGTERM, lambda *a: leaked.append(a))  # what would otherwise get it (and die)
    try:
        summary = run(tmp_path / "run").finetune_summary
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not leaked and summary["stopped_by"] is None
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "config.json").is_file()


def test_destroying_the_group_skips_the_barrier_while_an_exception_leaves(monkeypatch):
    """A rank leaving by an exception (a second signal) must not wait in a barrier the others, inside a
    collective, never reach: that hung the whole job."""
    import torch.distributed as dist

    from slope.parallel.env import DistEnv, destroy_distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    env = DistEnv(0, 2, 0, torch.device("cpu"), True)
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt("second SIGTERM")
        finally:
            destroy_distributed(env)
    assert calls == ["destroy"]  # (no barrier; a gloo group is torn down at once)
    calls.clear()
    destroy_distributed(env)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt("second SIGTERM")
        finally:
            destroy_distributed(env)
    assert calls == []  # (an NCCL group's teardown could wait for the others' collectives: left to the exit)


def test_without_output_dir_it_just_stops_and_the_last_step_is_not_stopped(tmp_path, monkeypatch):
    signal_after(monkeypatch, 2)
    summary = run().finetune_summary
    assert (summary["stopped_by"], summary["stopped_at"], summary["stop_checkpoint"]) == ("SIGTERM", 3, None)
    assert stopped_line("finetune", summary) == ("slope finetune: stopped by SIGTERM after step 3 of 5; nothing was saved "
                                                 "(give --output-dir to have a checkpoint written)")
    signal_after(monkeypatch, 4)  # during the last step: the run ends anyway, with its outputs
    summary = run(tmp_path / "last").finetune_summary
    assert summary["stopped_by"] is None and (tmp_path / "last" / "summary.json").is_file()


def test_sparse_finetune_stops_and_resumes_exactly(tmp_path, monkeypatch):
    """RigL updates after steps 2 and 4; stopped after step 3 with save_total_limit=1, resumed."""
    kw = dict(sparsity_ratio=0.5, mask_update_interval=2, max_steps=5, batch_size=4, gradient_accumulation_steps=1,
              warmup_steps=1, learning_rate=1e-3, max_seq_length=16, eval_batches=1, progress=False, save_steps=2,
              save_total_limit=1)
    whole = sparse_finetune(tiny_llama(), DOCS, output_dir=tmp_path / "whole", **kw)
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-4"]
    signal_after(monkeypatch, 2)
    stopped = sparse_finetune(tiny_llama(), DOCS, output_dir=tmp_path / "run", **kw)
    assert (stopped.finetune_summary["stopped_by"], stopped.finetune_summary["stopped_at"]) == ("SIGTERM", 3)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]  # checkpoint-2 rotated out
    assert not (tmp_path / "run" / "dynamic_sparsity.pt").exists()
    monkeypatch.setattr(FinetuneLoop, "train_step", TRAIN_STEP)
    resumed = sparse_finetune(tiny_llama(), DOCS, output_dir=tmp_path / "run", resume_from_checkpoint=True, **kw)
    assert [r["step"] for r in resumed.dynamic_sparsity.history] == [r["step"] for r in whole.dynamic_sparsity.history] == [0, 2, 4]
    assert_same_weights(whole, resumed)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "whole")


# ---------------------------------------------------------------------- save_total_limit
def test_save_total_limit_keeps_the_newest_and_the_run_resumes(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole", save_steps=1, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    signal_after(monkeypatch, 2)  # after step 3, a save_steps step: saved once, then the limit applies
    run(tmp_path / "run", save_steps=1, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.setattr(FinetuneLoop, "train_step", TRAIN_STEP)
    resumed = run(tmp_path / "run", save_steps=1, save_total_limit=1, resume_from_checkpoint=True)  # the limit may change
    assert resumed.finetune_summary["resumed_from"].endswith("checkpoint-3")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-5"]
    assert_same_weights(whole, resumed)


def test_rotation_never_removes_the_new_checkpoint_nor_what_is_not_the_runs(tmp_path):
    def checkpoint(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / CHECKPOINT_STATE).write_bytes(b"state")

    for step in (1, 2, 3, 4, 9):
        checkpoint(f"checkpoint-{step}")
    checkpoint("checkpoint-7", complete=False)  # a save that never finished
    checkpoint("checkpoint-03")                 # not a name the loop writes
    checkpoint("checkpoint-best")
    (tmp_path / "checkpoint-8").write_text("a file")
    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    # checkpoint-3 just written (a resumed run: checkpoint-4 and -9 are from the run before): 3 stays, then the largest steps
    assert rotate_checkpoints(tmp_path, 2, newest=3) == [tmp_path / "checkpoint-4", tmp_path / "checkpoint-2",
                                                         tmp_path / "checkpoint-1"]
    assert names() == ["checkpoint-03", "checkpoint-3", "checkpoint-7", "checkpoint-8", "checkpoint-9", "checkpoint-best"]
    assert rotate_checkpoints(tmp_path, 1, newest=5) == [] and rotate_checkpoints(tmp_path, 1, newest=7) == []  # missing, partial
    assert rotate_checkpoints(tmp_path, 1, newest=3) == [tmp_path / "checkpoint-9"]
    assert names() == ["checkpoint-03", "checkpoint-3", "checkpoint-7", "checkpoint-8", "checkpoint-best"]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_a_bad_save_total_limit_is_one_line_before_anything_runs(tmp_path, bad, capsys):
    match = r"save_total_limit \(--save-total-limit\) must be an int >= 1, the number of newest checkpoint-<step> folders kept"
    with pytest.raises(ValueError, match=match):
        finetune(tiny_llama(), None, DOCS, output_dir=tmp_path / "a", save_total_limit=bad)
    with pytest.raises(ValueError, match=match):
        sparse_finetune(tiny_llama(), DOCS, output_dir=tmp_path / "b", save_total_limit=bad)
    with pytest.raises(ValueError, match=match):
        apply(tiny_llama(), HELD, DOCS, tmp_path / "c", save_total_limit=bad)
    assert not any(tmp_path.iterdir())
    if bad == 0:
        from slope.cli import main

        assert main(["finetune", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "d"), "--save-total-limit", "0"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("slope finetune: error: save_total_limit (--save-total-limit) must be")


# ---------------------------------------------------------------------- slope apply
PRUNE_HALF = {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, "targets": ["re:model.layers.\\d+$"]}}}
RECOVER = {"run_type": "train", "g": {"ConstantPruningModifier": {"start": 0}}}


def apply_setup(tmp_path, max_steps: int) -> tuple:
    """A dense tiny Llama folder (with its tokenizer) and apply's settings for a run of ``max_steps`` per train stage."""
    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    shipped_tokenizer().save_pretrained(dense)
    return dense, dict(num_calibration_samples=8, max_seq_len=16, max_steps=max_steps, per_device_train_batch_size=4,
                       max_seq_length=16, eval_batches=1, learning_rate=1e-2, progress=False, verbose=False)


def test_apply_stops_in_a_train_stage_and_continues_from_its_checkpoint(tmp_path, monkeypatch):
    recipe = {"prune_half": PRUNE_HALF, "recover": RECOVER}
    dense, kw = apply_setup(tmp_path, max_steps=4)
    whole = apply(str(dense), recipe, DOCS, tmp_path / "whole", **kw)
    assert whole.apply_summary["stopped"] is None
    signal_after(monkeypatch, 1)
    stopped = apply(str(dense), recipe, DOCS, tmp_path / "run", save_total_limit=1, **kw)
    folder = tmp_path / "run" / "stage_recover"
    assert stopped.apply_summary["stopped"] == {"stage": "recover", "stopped_by": "SIGTERM", "stopped_at": 2, "steps": 4,
                                                "stop_checkpoint": str(folder / "checkpoint-2")}
    assert stopped.apply_summary["final_model"] is None and stopped.apply_summary["ran_now"] == ["prune_half"]
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    assert [s["done"] for s in record["stages"]] == [True, False]
    assert all("save_total_limit" not in s["settings"] for s in record["stages"])  # it changes no result
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    monkeypatch.setattr(FinetuneLoop, "train_step", TRAIN_STEP)
    again = apply(str(dense), recipe, DOCS, tmp_path / "run", save_total_limit=3, **kw)  # another limit: the same run
    assert again.apply_summary["ran_now"] == ["recover"] and again.finetune_summary["resumed_from"].endswith("checkpoint-2")
    assert_same_weights(whole, again)


def test_apply_stops_between_stages_after_a_signal_in_a_stages_last_step(tmp_path, monkeypatch):
    """A signal in the last step of a train stage that is not the last: the stage finishes and is kept, the
    run stops before the next stage, and the same call again runs only what is left, to the same weights."""
    prune_more = {"g": {"MagnitudePruningModifier": {"sparsity": 0.6, "targets": ["re:model.layers.\\d+$"]}}}
    recipe = {"prune_half": PRUNE_HALF, "recover": RECOVER, "prune_more": prune_more}
    dense, kw = apply_setup(tmp_path, max_steps=3)
    whole = apply(str(dense), recipe, DOCS, tmp_path / "whole", **kw)
    signal_after(monkeypatch, 2)  # the last step of "recover"
    stopped = apply(str(dense), recipe, DOCS, tmp_path / "run", **kw)
    assert stopped.apply_summary["stopped"] == {"stage": "recover", "stopped_by": "SIGTERM", "after_stage": True}
    assert stopped.apply_summary["ran_now"] == ["prune_half", "recover"] and not (tmp_path / "run" / "stage_prune_more").exists()
    from slope.stages.cli import _stopped_line

    assert _stopped_line(stopped) == ("slope apply: stopped by SIGTERM after stage recover (finished and kept); continue "
                                      "with the same command again")
    monkeypatch.setattr(FinetuneLoop, "train_step", TRAIN_STEP)
    again = apply(str(dense), recipe, DOCS, tmp_path / "run", **kw)
    assert again.apply_summary["ran_now"] == ["prune_more"] and again.apply_summary["stopped"] is None
    assert_same_weights(whole, again)


# ---------------------------------------------------------------------- the command, SIGTERM from outside
def test_slope_finetune_exits_zero_with_one_line_on_sigterm(tmp_path):
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    shipped_tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "slope", "finetune", "--model", str(model), "--output-dir", str(out), "--max-steps", "100000",
            "--per-device-train-batch-size", "2", "--max-seq-length", "16", "--eval-batches", "1", "--logging-steps", "1"]
    returncode, stdout, stderr = signal_mid_run(
        argv, lambda: (out / "metrics.jsonl").exists() and sum('"loss"' in line for line in open(out / "metrics.jsonl")) >= 2,
        signal.SIGTERM, env={"OMP_NUM_THREADS": "1"})
    assert returncode == 0, stderr
    assert "Traceback" not in stderr and "done:" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("slope finetune: stopped by SIGTERM after step ") and " of 100000: checkpoint saved in " in last
    step = int(last.split("after step ")[1].split()[0])
    checkpoint = out / f"checkpoint-{step}"
    assert step >= 2 and last.endswith(f"; continue with the same command with --resume-from-checkpoint {checkpoint}")
    assert (checkpoint / CHECKPOINT_STATE).is_file() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------- two ranks, one signalled
def _ranks_worker(out: str) -> None:
    """Rank 0 alone gets SIGTERM after step 2: both ranks must stop there (no rank left waiting)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_after(monkeypatch, 1, rank=0)
        model = run(Path(out) / "run", per_device_train_batch_size=2, adam_epsilon=1e-4, device="cpu")
    summary = model.finetune_summary
    (Path(out) / f"rank{os.environ['RANK']}.json").write_text(json.dumps({k: summary[k] for k in ("stopped_by", "stopped_at")}))


@pytest.mark.distributed
def test_ranks_agree_on_the_stop_step(tmp_path):
    launch([__file__, str(tmp_path)], tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"stopped_by": "SIGTERM", "stopped_at": 2}, {"stopped_by": "a signal to another rank", "stopped_at": 2}]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    # the 2-rank checkpoint resumes in one process (batch 4 = 2 ranks × 2) to the weights of one uninterrupted process
    whole = run(adam_epsilon=1e-4, device="cpu")
    resumed = run(tmp_path / "run", adam_epsilon=1e-4, device="cpu", resume_from_checkpoint=True)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":  # a rank of test_ranks_agree_on_the_stop_step
    sys.path.insert(0, str(REPO))
    warnings.simplefilter("ignore")
    _ranks_worker(sys.argv[1])


def test_resuming_an_older_checkpoint_names_the_later_ones(tmp_path, monkeypatch):
    """Resuming checkpoint-2 beside a later checkpoint-4 (the replaced run's): a note names it, since
    `latest` would pick it."""
    run(tmp_path / "run", save_steps=2, max_steps=4, save_total_limit=None)
    assert (tmp_path / "run" / "checkpoint-4" / CHECKPOINT_STATE).is_file()
    (tmp_path / "run" / "summary.json").unlink()  # (as if that run had stopped there)
    with pytest.warns(UserWarning, match=r"checkpoint-4, later than the checkpoint resumed \(step 2\)"):
        run(tmp_path / "run", save_steps=2, max_steps=4, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
