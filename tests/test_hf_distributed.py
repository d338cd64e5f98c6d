"""SparseOptimizerCallback under the Trainer's DDP (2 gloo ranks, torchrun-style), with the sparse
optimizer state sharded by layer (ADAMWSparse(shard_state=True)): the same weights as the
replicated state, and a checkpoint (gathered on save) that resumes exactly into another folder."""
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

pytestmark = pytest.mark.distributed
STEPS, SAVE = 4, 2


def _train(out: Path, shard_state: bool, resume: str | None = None) -> dict:
    """One Trainer run on this rank; returns the final model state (CPU tensors)."""
    from transformers import Trainer, TrainingArguments

    from slope import SparseOptimizerCallback
    from slope.optimizers import ADAMWSparse
    from test_hf import TokenSet, tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama")
    sparse_opt = ADAMWSparse(model, lr=3e-3, shard_state=shard_state)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, ddp_backend="gloo", learning_rate=3e-3, lr_scheduler_type="constant",
                             max_grad_norm=float("inf"), save_strategy="steps", save_steps=SAVE, logging_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenSet(), callbacks=[SparseOptimizerCallback(sparse_opt)])
    trainer.train(resume_from_checkpoint=resume)
    moments = sorted(i for i, s in sparse_opt.state_dict()["state"].items() if "exp_avg" in s)
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "moments": moments}


def _worker(root: Path) -> None:
    rank = int(os.environ["RANK"])
    results = {"replicated": _train(root / "replicated", False), "sharded": _train(root / "sharded", True)}
    torch.distributed.barrier()
    results["resumed"] = _train(root / "resumed", True, resume=str(root / "sharded" / f"checkpoint-{SAVE}"))
    torch.save(results, root / f"rank{rank}.pt")


def test_sharded_sparse_state_under_the_trainers_ddp(tmp_path):
    launch([__file__, str(tmp_path)], tmp_path, timeout=400)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    replicated = ranks[0]["replicated"]["model"]
    for run in ("sharded", "resumed"):
        for name, value in replicated.items():
            torch.testing.assert_close(ranks[0][run]["model"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, run=run: f"{run} {name}: {m}")
            assert torch.equal(ranks[1][run]["model"][name], ranks[0][run]["model"][name]), name  # replicated weights
    moments = [ranks[r]["sharded"]["moments"] for r in range(2)]
    assert moments[0] and moments[1] and not set(moments[0]) & set(moments[1])  # each layer's moments on one rank
    saved = torch.load(tmp_path / "sharded" / f"checkpoint-{SAVE}" / "slope_sparse_optimizer.pt", weights_only=True)
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in saved["state"].values())  # gathered: every layer's moments
    assert json.loads((tmp_path / "sharded" / f"checkpoint-{SAVE}" / "trainer_state.json").read_text())["global_step"] == SAVE


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    _worker(Path(sys.argv[1]))
