"""RigL under DDP: the ranks' dense gradients are averaged before each regrowth, so every rank keeps
the same masks and the run equals one process with the whole batch."""
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


if __name__ == "__main__":  # a DDP rank (launched by the test above)
    warnings.simplefilter("ignore")
    _worker(sys.argv[1])
