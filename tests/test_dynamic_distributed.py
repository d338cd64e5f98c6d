"""RigL under DDP: the ranks' dense gradients are averaged before each regrowth, so every rank keeps
the same masks and the run equals one process with the whole batch — in a custom DDP loop and in
``sparse_finetune`` under torchrun (``batch_size`` rows per process)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402
from test_dynamic_rigl import _batch, _toy  # noqa: E402

from slope.dynamic import DynamicSparsity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, INTERVAL = 9, 2


def _train(rows=slice(None)) -> tuple[torch.nn.Module, DynamicSparsity, list]:
    """RigL (unstructured, 60 %) on the toy MLP; under torchrun a DDP model on this rank's rows."""
    model = _toy()
    sparsifier = DynamicSparsity(model, STEPS, sparsity_ratio=0.6, mask_update_interval=INTERVAL, mask_update_fraction=0.5,
                                 targets=["0", "2", "4"])
    forward = model
    if torch.distributed.is_initialized():
        forward = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(forward.parameters(), lr=1e-2)
    updates = []
    for step in range(STEPS):
        x, y = _batch(step)
        ((forward(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        updates += sparsifier.step(opt)
    return model, sparsifier, updates


SPARSE = dict(max_steps=6, gradient_accumulation_steps=2, max_seq_length=16, eval_batches=3, learning_rate=1e-2, warmup_steps=0,
              mask_update_interval=2, mask_update_fraction=0.5, progress=False, gradient_checkpointing=False, device="cpu",
              logging_steps=1)


def _sparse_finetune(sparsity_type: str, batch_size: int, output_dir=None, **overrides):
    import transformers as T

    from slope.dynamic import sparse_finetune
    from slope.pruning.loading import shipped_tokenizer

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    docs = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(120)]
    return sparse_finetune(model, docs, sparsity_type=sparsity_type, batch_size=batch_size, output_dir=output_dir,
                           tokenizer=shipped_tokenizer(), **{**SPARSE, **overrides})


def _sparse_worker(out: str, sparsity_type: str) -> None:
    import os

    model = _sparse_finetune(sparsity_type, 2, Path(out) / sparsity_type)
    rank = os.environ["RANK"]
    torch.save({"weights": model.state_dict(), "history": model.dynamic_sparsity.history}, Path(out) / f"{sparsity_type}.{rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_sparse_finetune_under_torchrun_is_the_run_of_one_process(tmp_path, sparsity_type):
    launch([__file__, "sparse", str(tmp_path), sparsity_type], tmp_path)
    single = _sparse_finetune(sparsity_type, 4)
    assert single.finetune_summary["mask_updates"] >= 2  # masks moved during the run
    ranks = [torch.load(tmp_path / f"{sparsity_type}.{r}", weights_only=False) for r in range(2)]
    summary = __import__("json").loads((tmp_path / sparsity_type / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["config"]["global_batch"] == 4
    for saved in ranks:
        assert [u["layers"] for u in saved["history"]] == [u["layers"] for u in single.dynamic_sparsity.history]
        for name, value in single.state_dict().items():
            if value.dtype == torch.uint8:  # packed masks (2:4): equal bits
                assert torch.equal(saved["weights"][name], value), name
            else:  # (AdamW with eps 1e-8 turns the float rounding of a near-cancelling gradient into ~1e-5 moves)
                torch.testing.assert_close(saved["weights"][name], value, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


#: What FSDP2 shards in sparse_finetune: masked nn.Linear weights (unstructured RigL; N:M by gradual
#: pruning) and SLoPe layers (2:4 RigL: each layer's values on one rank).
FSDP_KINDS = {"unstructured": dict(sparsity_type="unstructured"), "2:4": dict(sparsity_type="2:4"),
              "2:4-gradual": dict(sparsity_type="2:4", use_rigl=False, sparsity_schedule="cubic")}


def _fsdp_worker(out: str, kind: str) -> None:
    _sparse_finetune(batch_size=2, output_dir=Path(out) / kind, fsdp=True, **FSDP_KINDS[kind])


@pytest.mark.distributed
@pytest.mark.parametrize("kind", sorted(FSDP_KINDS))
def test_sparse_finetune_under_fsdp_is_the_run_of_one_process(tmp_path, kind):
    """2 ranks sharded by FSDP2, 2 rows each: the masks of every update (RigL's regrowth by the
    averaged gradients; gradual pruning's) and the final weights (the output folders: plain
    weights, zeros where pruned) of one process with 4 rows."""
    import json

    from safetensors.torch import load_file

    launch([__file__, "fsdp", str(tmp_path), kind], tmp_path)
    single = _sparse_finetune(batch_size=4, output_dir=tmp_path / "single", **FSDP_KINDS[kind])
    assert single.finetune_summary["mask_updates"] >= 2  # masks moved during the run
    summary = json.loads((tmp_path / kind / "summary.json").read_text())
    assert summary["config"]["fsdp"] is True and summary["config"]["global_batch"] == 4
    assert summary["final_sparsity"] == pytest.approx(single.finetune_summary["final_sparsity"])
    history = torch.load(tmp_path / kind / "dynamic_sparsity.pt", weights_only=False)["history"]
    assert [u["layers"] for u in history] == [u["layers"] for u in single.dynamic_sparsity.history]
    saved, want = (load_file(str(tmp_path / folder / "model.safetensors")) for folder in (kind, "single"))
    assert saved.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # validation: each rank evaluates its share of the 3 batches; the logged means are one process's
    got, ref = ({r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / folder / "metrics.jsonl").read_text().splitlines())
                 if "val_loss" in r} for folder in (kind, "single"))
    assert got.keys() == ref.keys() and len(ref) >= 2
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"val_loss at step {step}"


def test_sparse_finetune_under_an_accelerate_fsdp_config(tmp_path):
    """An accelerate FSDP config shards without fsdp=True; its activation checkpointing and mixed
    precision apply, are said in notes, and are recorded in summary.json."""
    import json

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_ACTIVATION_CHECKPOINTING": "true",
           "ACCELERATE_MIXED_PRECISION": "bf16"}
    launch([__file__, "accelerate", str(tmp_path), "unstructured"], tmp_path, env=env)
    config = json.loads((tmp_path / "unstructured" / "summary.json").read_text())["config"]
    assert config["fsdp"] is True and config["precision"] == "bf16" and config["gradient_checkpointing"] is True
    log = (tmp_path / "rank_rank0.log").read_text()
    assert "FSDP from the accelerate config: SHARD_GRAD_OP, activation checkpointing on" in log
    assert "mixed precision bf16 from the accelerate config" in log


def _worker(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = 12 // world
    model, sparsifier, _ = _train(slice(rank * per, (rank + 1) * per))
    torch.save({"weights": model.state_dict(), "masks": dict(sparsifier.masked.masks)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_rigl_under_ddp_keeps_equal_masks_and_the_run_of_one_process(tmp_path):
    launch([__file__, str(tmp_path / "rank")], tmp_path)
    model, sparsifier, updates = _train()
    assert len(updates) == 4 and all(sum(c["changed"] for c in u["layers"].values()) > 0 for u in updates)  # masks moved
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(2)]
    for name, mask in sparsifier.masked.masks.items():
        for saved in ranks:
            assert torch.equal(saved["masks"][name], mask), name
    for name, value in model.state_dict().items():
        for saved in ranks:
            torch.testing.assert_close(saved["weights"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


if __name__ == "__main__":  # a DDP rank (launched by the tests above)
    warnings.simplefilter("ignore")
    if sys.argv[1] == "sparse":
        _sparse_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "fsdp":
        _fsdp_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "accelerate":  # (the environment asks for FSDP)
        warnings.simplefilter("default")  # (the notes go to the rank's log)
        _sparse_finetune(batch_size=2, output_dir=Path(sys.argv[2]) / sys.argv[3], **FSDP_KINDS[sys.argv[3]])
    else:
        _worker(sys.argv[1])
