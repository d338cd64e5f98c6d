"""slope.peft under DDP (gloo, 2 CPU processes; this file is the worker script, launched the way
tests/ranks.py launches every test's workers): 2 ranks × batch b train the same deltas —
indices and values — as 1 process × batch 2b, through rigl reselections (whose candidate
statistics are averaged over the ranks) and sm3 ones; and SIFT (no DDP wrapper:
``sift.all_reduce_grads()``) changes the same entries by the same amounts as one process."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from slope.peft import SIFT, SftAdamW, SftConfig, SftSelector, SftSM3, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD, ROWS, STEPS, VOCAB = 2, 4, 6, 64


def build(algorithm: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    sft_cfg = SftConfig(density=0.05, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], selection_algorithm=algorithm,
                        reselection_steps=2, selection_accumulation_steps=2, initial_reselection_rate=0.5)
    model = get_peft_model(transformers.LlamaForCausalLM(cfg), sft_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "sm3":
        opt = SftSM3(params, {d.values: d for _, _, d in model.active_deltas()}, lr=1e-2)
    else:
        opt = SftAdamW(params, lr=1e-2, eps=1e-4)
    return model, opt, sft_cfg


def run(algorithm: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    model, opt, cfg = build(algorithm)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    selector = SftSelector(trained, opt, cfg, STEPS, 1)
    rows = ROWS // world
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (ROWS, 12), generator=torch.Generator().manual_seed(step))[rank * rows:(rank + 1) * rows]
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        selector.step()
    return model.delta_state_dict()


SIFT_TARGETS, SIFT_RATE = ["q_proj", "v_proj", "down_proj"], 0.05


def sift_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def run_sift(rank: int = 0, world: int = 1, accum: int = 2) -> dict[str, torch.Tensor]:
    """SIFT over STEPS steps of ``accum`` micro-batches (the first one picks the entries); the model's
    weights after training."""
    model = sift_llama()
    sift = SIFT(model, sparse_rate=SIFT_RATE, sparse_module=SIFT_TARGETS, exception=["norm"])
    opt = torch.optim.AdamW(list(sift.parameters_in_optimizer()), lr=1e-2, weight_decay=0.0)
    rows = ROWS // world
    for step in range(STEPS):
        for micro in range(accum):
            ids = torch.randint(0, VOCAB, (ROWS, 12), generator=torch.Generator().manual_seed(100 * step + micro))
            ids = ids[rank * rows:(rank + 1) * rows]
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        sift.all_reduce_grads()
        opt.step()
        opt.zero_grad()
    sift.apply_pending()
    sift.remove_hooks()
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_sparse")}


def _worker(workdir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for algorithm in ("rigl", "sm3"):
        state = run(algorithm, rank, WORLD)
        torch.save(state, Path(workdir) / f"{algorithm}_rank{rank}.pt")
    torch.save(run_sift(rank, WORLD), Path(workdir) / f"sift_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("peft_ddp")
    launch([__file__, str(workdir)], workdir, world=WORLD)
    return workdir


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_two_ranks_train_the_deltas_of_one_process(ranks_output, algorithm):
    reference = run(algorithm)
    initial = build(algorithm)[0].delta_state_dict()
    r0 = torch.load(ranks_output / f"{algorithm}_rank0.pt")
    r1 = torch.load(ranks_output / f"{algorithm}_rank1.pt")
    moved = 0
    for key, ref in reference.items():
        assert torch.equal(r0[key], r1[key]), f"{key}: the ranks disagree"
        if key.endswith("indices"):
            assert torch.equal(r0[key], ref), f"{key}: 2 ranks selected other entries than 1 process"
            moved += int((~torch.isin(ref, initial[key])).sum())
        else:
            torch.testing.assert_close(r0[key], ref, atol=1e-5, rtol=1e-4)
    assert moved > 0


def test_two_ranks_train_the_sift_increments_of_one_process(ranks_output):
    reference = run_sift()
    initial = dict(sift_llama().named_parameters())
    r0, r1 = (torch.load(ranks_output / f"sift_rank{rank}.pt") for rank in range(WORLD))
    sparse_weights = 0
    for name, ref in reference.items():
        assert torch.equal(r0[name], r1[name]), f"{name}: the ranks disagree"
        torch.testing.assert_close(r0[name], ref, atol=1e-5, rtol=1e-4, msg=name)
        if any(t in name for t in SIFT_TARGETS):  # the same k entries moved in both runs, and only those
            moved = r0[name] != initial[name]
            assert torch.equal(moved, ref != initial[name]), f"{name}: other entries trained than in one process"
            assert int(moved.sum()) == int(SIFT_RATE * moved.numel()) + 1, name
            sparse_weights += 1
    assert sparse_weights == 6


if __name__ == "__main__":
    _worker(sys.argv[1])
