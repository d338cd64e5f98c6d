"""slope.peft under DDP and FSDP2 (gloo, 2 CPU processes; this file is the worker script, launched the
way tests/ranks.py launches every test's workers): 2 ranks × batch b train the same deltas —
indices and values — as 1 process × batch 2b, through rigl reselections (whose candidate
statistics are averaged over the ranks) and sm3 ones, also sharded by ``shard_sft_model`` with
gradient accumulation and clipping, and rank 0 alone saves them whole; and SIFT (no DDP wrapper:
``sift.all_reduce_grads()``) changes the same entries by the same amounts as one process, while
under DDP or FSDP it refuses to train, as a plain ``fully_shard`` of the deltas is refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.distributed.fsdp import fully_shard

from slope.peft import SIFT, SftAdamW, SftConfig, SftModel, SftSelector, SftSM3, get_peft_model, shard_sft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD, ROWS, STEPS, VOCAB = 2, 4, 6, 64
ACCUM, CLIP = 2, 0.05  # the FSDP2 runs: 2 micro-batches per step; gradients clipped (their norms are ~0.1)


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def build(algorithm: str):
    sft_cfg = SftConfig(density=0.05, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], selection_algorithm=algorithm,
                        reselection_steps=2, selection_accumulation_steps=2, initial_reselection_rate=0.5)
    model = get_peft_model(llama(), sft_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "sm3":
        opt = SftSM3(params, {d.values: d for _, _, d in model.active_deltas()}, lr=1e-2)
    else:
        opt = SftAdamW(params, lr=1e-2, eps=1e-4)
    return model, opt, sft_cfg


def run(algorithm: str, rank: int = 0, world: int = 1, shard: bool = False, accum: int = 1, clip: float | None = None,
        save_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """STEPS steps of ``accum`` micro-batches of the same ROWS rows, split over ``world`` ranks
    (DDP, or FSDP2 through ``shard_sft_model``); gradients clipped to ``clip``. The deltas after training."""
    model, opt, cfg = build(algorithm)
    trained = model
    if world > 1:
        trained = shard_sft_model(model) if shard else torch.nn.parallel.DistributedDataParallel(model)
    selector = SftSelector(trained, opt, cfg, STEPS, accum)
    rows = ROWS // world // accum
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (ROWS, 12), generator=torch.Generator().manual_seed(step))
        for micro in batch.chunk(accum):
            ids = micro[rank * rows:(rank + 1) * rows]
            (trained(input_ids=ids, labels=ids).loss / accum).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad()
        selector.step()
    if save_dir is not None:
        model.save_pretrained(save_dir, is_main_process=rank == 0)
    return model.delta_state_dict()


SIFT_TARGETS, SIFT_RATE = ["q_proj", "v_proj", "down_proj"], 0.05


def run_sift(rank: int = 0, world: int = 1, accum: int = 2) -> dict[str, torch.Tensor]:
    """SIFT over STEPS steps of ``accum`` micro-batches (the first one picks the entries); the model's
    weights after training."""
    model = llama()
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


def refusal(train) -> str:
    """The ``ValueError`` that ``train()`` raises ("" when it trains)."""
    try:
        train()
    except ValueError as e:
        return str(e)
    return ""


def sift_wrapped(wrap: str) -> None:
    model = llama()
    sift = SIFT(model, sparse_rate=SIFT_RATE, sparse_module=SIFT_TARGETS)
    trained = torch.nn.parallel.DistributedDataParallel(model) if wrap == "ddp" else model
    if wrap == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    trained(input_ids=ids, labels=ids).loss.backward()
    sift.all_reduce_grads()


def sharded_deltas() -> None:
    model, opt, cfg = build("rigl")
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    SftSelector(fully_shard(model), opt, cfg, STEPS, 1)


def _worker(workdir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, out = torch.distributed.get_rank(), Path(workdir)
    for algorithm in ("rigl", "sm3"):
        torch.save(run(algorithm, rank, WORLD), out / f"{algorithm}_rank{rank}.pt")
        state = run(algorithm, rank, WORLD, shard=True, accum=ACCUM, clip=CLIP, save_dir=out / f"saved_{algorithm}_rank{rank}")
        torch.save(state, out / f"fsdp_{algorithm}_rank{rank}.pt")
    torch.save(run_sift(rank, WORLD), out / f"sift_rank{rank}.pt")
    refusals = {"sift_ddp": refusal(lambda: sift_wrapped("ddp")), "sift_fsdp": refusal(lambda: sift_wrapped("fsdp")),
                "sharded_deltas": refusal(sharded_deltas)}
    torch.save(refusals, out / f"refusals_rank{rank}.pt")
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


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_fsdp2_ranks_train_and_rank0_saves_the_deltas_of_one_process(ranks_output, algorithm):
    """shard_sft_model: the frozen base sharded, the deltas whole; accumulation and clipping as in
    one process; save_pretrained(is_main_process=rank == 0) writes once, and the folder reloads."""
    reference = run(algorithm, accum=ACCUM, clip=CLIP)
    r0, r1 = (torch.load(ranks_output / f"fsdp_{algorithm}_rank{rank}.pt") for rank in range(WORLD))
    assert not (ranks_output / f"saved_{algorithm}_rank1").exists(), "rank 1 saved despite is_main_process=False"
    loaded = SftModel.from_pretrained(llama(), ranks_output / f"saved_{algorithm}_rank0").delta_state_dict()
    for key, ref in reference.items():
        assert torch.equal(r0[key], r1[key]), f"{key}: the ranks disagree"
        assert torch.equal(loaded[key], r0[key]), f"{key}: the saved deltas differ from the trained ones"
        if key.endswith("indices"):
            assert torch.equal(r0[key], ref), f"{key}: 2 sharded ranks selected other entries than 1 process"
        else:
            torch.testing.assert_close(r0[key], ref, atol=1e-5, rtol=1e-4)


def test_sift_under_ddp_or_fsdp_and_sharded_deltas_are_refused_in_one_line(ranks_output):
    for rank in range(WORLD):
        refusals = torch.load(ranks_output / f"refusals_rank{rank}.pt")
        assert "SIFT does not train under DistributedDataParallel" in refusals["sift_ddp"]
        assert "SIFT does not train under FSDP" in refusals["sift_fsdp"]
        assert "sift.all_reduce_grads()" in refusals["sift_ddp"] and "\n" not in refusals["sift_fsdp"]
        assert "shard_sft_model" in refusals["sharded_deltas"]


def test_two_ranks_train_the_sift_increments_of_one_process(ranks_output):
    reference = run_sift()
    initial = dict(llama().named_parameters())
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
