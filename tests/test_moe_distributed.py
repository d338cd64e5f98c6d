"""Fused MoE experts pruned in simulation (``prune_model(..., experts=True)``) under ``wrap_ddp``,
``wrap_fsdp2`` and ``deepspeed_initialize`` (ZeRO-2) on 2 gloo ranks that built different weights:
each copies rank 0's weights and masks, FSDP2's sharded expert tensors keep their masks (rebound, split like them), and after
training steps every rank holds the same weights, zero exactly where rank 0's N:M masks prune."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

pytestmark = pytest.mark.distributed

WORKER = r'''
import sys
from pathlib import Path
import torch, transformers
import slope
from slope.moe import expert_masks
from slope.parallel import destroy_distributed, init_distributed, wrap_ddp, wrap_fsdp2
from slope.parallel.sharded import full_tensor

env = init_distributed(backend="gloo")
out_dir, mode = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(env.rank)  # other weights on each rank: the wrapper copies rank 0's, masks included
config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
model = transformers.AutoModelForCausalLM.from_config(config).train()
# DeepSpeed needs SLoPe layers (simulated here) besides the experts
slope.prune_model(model, compress=False, experts=True, targets=None if mode == "deepspeed" else ["experts.*"], verbose=False)
masked = expert_masks(model)
first = {name: (p.detach().clone(), masked.masks[name].clone()) for name, p in masked.params.items()}
gen = torch.Generator().manual_seed(10 + env.rank)
if mode == "deepspeed":
    from slope.optimizers import ADAMWSparse
    from slope.parallel import deepspeed_initialize, dense_parameters
    opt = torch.optim.AdamW(dense_parameters(model), lr=1e-2, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "steps_per_print": 10**9}
    engine, _, _ = deepspeed_initialize(model, config, optimizer=opt)
    sparse_opt = ADAMWSparse(engine.module, lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 10), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        sparse_opt.step()
        sparse_opt.zero_grad()
        engine.step()
        masked.after_step(opt)
else:
    wrapped = wrap_fsdp2(model, require_sparse=False) if mode == "fsdp2" else wrap_ddp(model, require_sparse=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 10), generator=gen)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        masked.mask_grads_()
        opt.step()
        masked.after_step(opt)
        opt.zero_grad()
last = {name: (full_tensor(model.get_parameter(name).detach()), full_tensor(masked.masks[name])) for name in masked.params}
torch.save({"first": first, "last": last}, out_dir / f"{mode}_rank{env.rank}.pt")
destroy_distributed(env)  # (a rank that exits with the gloo group alive may abort at exit under load)
'''


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "deepspeed"])
def test_expert_masks_follow_the_wrapped_model(tmp_path, mode):
    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": extensions}  # (as tests/test_distributed.py launches DeepSpeed)
    launch([str(worker), str(tmp_path), mode], tmp_path, world=2, timeout=240, env=env)
    ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(2)]
    rank0_first = ranks[0]["first"]
    assert rank0_first and any(not torch.equal(ranks[1]["first"][k][1], m) for k, (_, m) in rank0_first.items())
    for name, (w0, m0) in rank0_first.items():
        assert m0.view(*m0.shape[:-1], -1, 4).sum(-1).eq(2).all(), name  # 2:4 along each expert's input
        for rank in ranks:
            weight, mask = rank["last"][name]
            assert torch.equal(mask, m0), name  # rank 0's masks on every rank
            assert torch.equal(weight, ranks[0]["last"][name][0]), name  # the same weights on every rank
            assert not weight[~m0].any() and weight[m0].ne(0).all(), name  # zero exactly where pruned
            assert not torch.equal(weight, w0), name  # and trained
