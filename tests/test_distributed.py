"""Data-parallel training of pruned models on CPU with gloo: DDP, FSDP2, DeepSpeed ZeRO-1/2.

Two worker processes are launched the way ``torchrun`` launches them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` in the environment; this file is the worker script). One launch
runs every torch-native scenario, a second one the DeepSpeed scenarios (skipped without
``deepspeed``); each scenario writes its results to a file and the tests below compare them with
single-process runs made here: 2 ranks × batch b must give the weights (sparse values, masks,
dense parameters) of 1 process × batch 2b (fp32, tight tolerance), also with accumulation
(``no_sync``) and across checkpoints written by 2 ranks and resumed by 1 (and 1 → 2).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slope
from slope.optimizers import ADAMWSparse
from slope.parallel import (
    configure_rank_zero_logging,
    deepspeed_initialize,
    deepspeed_rebuild,
    dense_parameters,
    full_model_state_dict,
    full_optimizer_state_dict,
    init_distributed,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    no_sync,
    rank_slice,
    rewrap_ddp,
    unwrap,
    wrap_ddp,
    wrap_fsdp2,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
WORLD = 2
VOCAB, DIM, SEQ, PER_RANK = 32, 32, 4, 2  # global batch = WORLD * PER_RANK rows
STEPS, CKPT_STEP = 4, 2
CLIP = 0.5  # below the gradient norms of this model: clipping changes every step
LR = 1e-2
# Adam's first steps move a weight by ~lr·g/(|g|+eps): with eps=1e-8 a gradient that cancels to
# ~1e-9 turns float32 summation-order noise into visible updates. A larger eps keeps the update a
# smooth function of the gradient, so "same result" can be checked tightly.
EPS = 1e-4
ATOL, RTOL = 2e-6, 1e-5
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- model, data, training loop
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(self.norm(h))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return slope.prune_model(TinyLM(), compress=True, verbose=False)


def make_optimizers(model: nn.Module, dense_params=None, shard_state: bool = False):
    sparse = ADAMWSparse(unwrap(model), lr=LR, eps=EPS, weight_decay=0.01, mask_change_freq=2, shard_state=shard_state)
    dense = None if dense_params is False else torch.optim.AdamW(
        dense_parameters(model) if dense_params is None else dense_params, lr=LR, eps=EPS, weight_decay=0.01
    )
    return sparse, dense


def global_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (ids, targets) of ``WORLD * PER_RANK`` rows on every rank for (step, micro)."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, VOCAB, (WORLD * PER_RANK, SEQ + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def loss_fn(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


def train(model, sparse_opt, dense_opt, steps, accum, *, start=0, sharded=False, on_step=None, clip=None, sync_each=False,
          zero_in_place=False):
    """``steps`` optimizer steps of ``accum`` micro-batches; ``sharded``: each rank takes its rows;
    ``sync_each``: gradients are reduced after every micro-batch (no ``no_sync``);
    ``zero_in_place``: the sparse ones are zeroed in place (``zero_grad(set_to_none=False)``)."""
    losses = []
    for step in range(start, steps):
        for micro in range(accum):
            ids, targets = global_batch(step, micro)
            if sharded:
                ids, targets = rank_slice(ids), rank_slice(targets)
            ctx = no_sync(model) if micro < accum - 1 and not sync_each else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, ids, targets)
                (loss / accum).backward()
            losses.append(loss.item())
            if on_step is not None:
                on_step("micro", step, micro)
        if clip is not None:  # DeepSpeed's semantics: dense and sparse gradients clipped separately
            torch.nn.utils.clip_grad_norm_(dense_parameters(model), clip)
            sparse_opt.clip_grad_norm(clip)
        sparse_opt.step()
        dense_opt.step()
        sparse_opt.zero_grad(set_to_none=not zero_in_place)
        dense_opt.zero_grad()
        if on_step is not None:
            on_step("step", step, accum - 1)
    return losses


def train_deepspeed(engine, sparse_opt, steps, accum, *, start=0, on_step=None):
    for step in range(start, steps):
        for micro in range(accum):
            ids, targets = global_batch(step, micro)
            loss = loss_fn(engine, rank_slice(ids), rank_slice(targets))
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                sparse_opt.step()
                sparse_opt.zero_grad()
            engine.step()
        if on_step is not None:
            on_step("step", step, accum - 1)


def checkpoint(model, sparse_opt, dense_opt, step) -> dict:
    return {
        "model": full_model_state_dict(model),
        "dense_opt": full_optimizer_state_dict(model, dense_opt),
        "sparse_opt": copy.deepcopy(sparse_opt.full_state_dict()),  # (live tensors: as if written to disk; None off rank 0 if sharded)
        "step": step,
    }


def restore(model, sparse_opt, dense_opt, ckpt) -> int:
    load_full_model_state_dict(model, ckpt["model"])
    load_full_optimizer_state_dict(model, dense_opt, ckpt["dense_opt"])
    sparse_opt.load_state_dict(ckpt["sparse_opt"])
    return ckpt["step"]


def attach_adapters(model: nn.Module) -> list[nn.Parameter]:
    """Lazy LoRA adapters on every SLoPe layer, initialised identically on every rank."""
    torch.manual_seed(7)
    params = []
    for _, layer in slope.sparse_modules(model):
        layer.add_lora(4)
        params += [layer.lora_A, layer.lora_B]
    return params


def reference_lora_run(accum: int) -> dict:
    """Single process: adapters join the dense optimizer (a new group) after CKPT_STEP steps."""
    model = build_model(seed=0)
    sparse_opt, dense_opt = make_optimizers(model)
    train(model, sparse_opt, dense_opt, CKPT_STEP, accum)
    dense_opt.add_param_group({"params": attach_adapters(model)})
    train(model, sparse_opt, dense_opt, STEPS, accum, start=CKPT_STEP)
    return full_model_state_dict(model)


def reference_run(accum: int, steps: int = STEPS, ckpt: dict | None = None, clip: float | None = None):
    """Single process, global batch: final state dict and the checkpoint state at CKPT_STEP."""
    model = build_model(seed=0)
    sparse_opt, dense_opt = make_optimizers(model)
    start = restore(model, sparse_opt, dense_opt, ckpt) if ckpt is not None else 0
    saved = {}

    def on_step(kind, step, micro):
        if kind == "step" and step + 1 == CKPT_STEP:
            saved["ckpt"] = checkpoint(model, sparse_opt, dense_opt, CKPT_STEP)

    train(model, sparse_opt, dense_opt, steps, accum, start=start, on_step=on_step, clip=clip)
    return full_model_state_dict(model), saved.get("ckpt")


# ---------------------------------------------------------------------- worker (one per rank)
def _rank_seed(rank: int) -> int:
    """Rank 0 starts like the reference run, the others differently: the wrappers must copy rank 0's state."""
    return 0 if rank == 0 else 100 + rank


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        return wrap_ddp(model)
    if kind == "fsdp2":
        return wrap_fsdp2(model)  # each SLoPe layer's values on one rank (shard_values)
    if kind == "fsdp2_replicated":
        return wrap_fsdp2(model, shard_values=False)
    raise ValueError(kind)


def _scenario_wrapped(kind: str, accum: int, out: dict, resume: dict | None = None, shard_state: bool = False,
                      clip: float | None = None, sync_each: bool = False, zero_in_place: bool = False):
    rank = torch.distributed.get_rank()
    model = _wrap(kind, build_model(seed=_rank_seed(rank)))  # ranks start differently: rank 0's weights win
    sparse_opt, dense_opt = make_optimizers(model, shard_state=shard_state)
    out["state_before"] = sparse_opt.full_state_dict()  # no layer stepped yet: nothing to gather
    start = restore(model, sparse_opt, dense_opt, resume) if resume is not None else 0
    grads = []

    def on_step(kind_, step, micro):
        if kind_ == "micro" and step == start:
            grads.append(unwrap(model).blocks[0].up.values_grad.clone())
        if kind_ == "step" and step + 1 == CKPT_STEP and resume is None:
            out["ckpt"] = checkpoint(model, sparse_opt, dense_opt, CKPT_STEP)

    out["losses"] = train(model, sparse_opt, dense_opt, STEPS, accum, start=start, sharded=True, on_step=on_step, clip=clip,
                          sync_each=sync_each, zero_in_place=zero_in_place)
    out["final"] = full_model_state_dict(model)
    out["local_values"] = {n: m.values.detach().clone() for n, m in slope.sparse_modules(unwrap(model))}
    out["dense_weight_errors"] = {}
    for name, layer in slope.sparse_modules(unwrap(model)):
        try:
            layer.dense_weight()
        except RuntimeError as e:
            out["dense_weight_errors"][name] = str(e)
    out["micro_grads"] = grads
    out["syncs"] = model.slope_sparse_sync.syncs
    out["moments"] = sorted(i for i, state in sparse_opt.state_dict()["state"].items() if "exp_avg" in state)
    out["full_sparse_state"] = copy.deepcopy(sparse_opt.full_state_dict())
    out["local_sparse_state"] = copy.deepcopy(sparse_opt.state_dict())


def _bf16_smoke(forward, backward_and_step, inner: nn.Module, out: dict):
    """A few steps on one fixed batch under bf16 mixed precision: record dtypes, losses, sparse state."""
    ids, targets = (rank_slice(t) for t in global_batch(0, 0))
    losses = []
    for _ in range(STEPS):
        logits = forward(ids)
        out["logits_dtype"] = logits.dtype
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        backward_and_step(loss)
        losses.append(loss.item())
    out["losses"] = losses
    layer = inner.blocks[0].up
    out["values_dtype"] = layer.values.dtype
    out["local_values"] = {n: m.values.detach().clone() for n, m in slope.sparse_modules(inner)}


def _scenario_ddp_lora(out: dict):
    ddp = wrap_ddp(build_model(seed=_rank_seed(torch.distributed.get_rank())))
    sparse_opt, dense_opt = make_optimizers(ddp)
    train(ddp, sparse_opt, dense_opt, CKPT_STEP, 2, sharded=True)
    dense_opt.add_param_group({"params": attach_adapters(unwrap(ddp))})
    ddp = rewrap_ddp(ddp)
    train(ddp, sparse_opt, dense_opt, STEPS, 2, start=CKPT_STEP, sharded=True)
    out["final"] = full_model_state_dict(ddp)
    out["syncs"] = ddp.slope_sparse_sync.syncs


def _scenario_fsdp2_bf16(out: dict):
    rank = torch.distributed.get_rank()
    model = wrap_fsdp2(build_model(seed=_rank_seed(rank)), param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sparse_opt, dense_opt = make_optimizers(model)

    def backward_and_step(loss):
        loss.backward()
        for opt in (sparse_opt, dense_opt):
            opt.step()
            opt.zero_grad()

    _bf16_smoke(model, backward_and_step, model, out)


def _scenario_deepspeed_bf16(out: dict):
    model = build_model(seed=_rank_seed(torch.distributed.get_rank()))
    dense_opt = torch.optim.AdamW(dense_parameters(model), lr=LR, eps=EPS, weight_decay=0.01)
    config = {**DS_CONFIG, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    engine, _, _ = deepspeed_initialize(model, config, optimizer=dense_opt)
    sparse_opt, _ = make_optimizers(engine.module, dense_params=False)

    def backward_and_step(loss):
        engine.backward(loss)
        sparse_opt.step()
        sparse_opt.zero_grad()
        engine.step()

    _bf16_smoke(engine, backward_and_step, engine.module, out)


def _scenario_logging(out: dict):
    logger = logging.getLogger("slope.test_distributed")
    logger.setLevel(logging.INFO)
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    configure_rank_zero_logging(logger)
    logger.info("step 1 loss 2.0")
    logger.warning("disk almost full")
    out["log"] = stream.getvalue()


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": PER_RANK,
    "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 1},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def _scenario_deepspeed(stage: int, accum: int, out: dict, resume: dict | None = None, clip: float | None = None):
    rank = torch.distributed.get_rank()
    model = build_model(seed=_rank_seed(rank))
    dense_opt = torch.optim.AdamW(dense_parameters(model), lr=LR, eps=EPS, weight_decay=0.01)
    config = {**DS_CONFIG, "gradient_accumulation_steps": accum, "zero_optimization": {"stage": stage}}
    if clip is not None:
        config["gradient_clipping"] = clip
    engine, _, _ = deepspeed_initialize(model, config, optimizer=dense_opt)
    sparse_opt, _ = make_optimizers(engine.module, dense_params=False)
    start = restore(engine, sparse_opt, None, resume) if resume is not None else 0

    def on_step(kind_, step, micro):
        if step + 1 == CKPT_STEP and resume is None:
            out["ckpt"] = checkpoint(engine, sparse_opt, None, CKPT_STEP)

    train_deepspeed(engine, sparse_opt, STEPS, accum, start=start, on_step=on_step)
    out["final"] = full_model_state_dict(engine)
    out["local_values"] = {n: m.values.detach().clone() for n, m in slope.sparse_modules(engine.module)}
    out["syncs"] = engine.slope_sparse_sync.syncs


def _scenario_deepspeed_lora(out: dict):
    model = build_model(seed=_rank_seed(torch.distributed.get_rank()))
    dense_opt = torch.optim.AdamW(dense_parameters(model), lr=LR, eps=EPS, weight_decay=0.01)
    config = {**DS_CONFIG, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}
    engine, _, _ = deepspeed_initialize(model, config, optimizer=dense_opt)
    sparse_opt, _ = make_optimizers(engine.module, dense_params=False)
    train_deepspeed(engine, sparse_opt, CKPT_STEP, 2)

    def with_adapters(module):
        old = dense_parameters(module)
        groups = [{"params": old}, {"params": attach_adapters(module)}]
        return torch.optim.AdamW(groups, lr=LR, eps=EPS, weight_decay=0.01)

    engine, _, _ = deepspeed_rebuild(engine, config, with_adapters)
    train_deepspeed(engine, sparse_opt, STEPS, 2, start=CKPT_STEP)
    out["final"] = full_model_state_dict(engine)
    out["syncs"] = engine.slope_sparse_sync.syncs


def _scenario_finite_agreement(out: dict):
    """Rank 1's shard holds a NaN: with agreement both ranks refuse the save, without it only rank 1."""
    from slope.guard import DivergenceError, check_finite

    shard = {"exp_avg": torch.tensor([float("nan") if torch.distributed.get_rank() == 1 else 0.0])}
    for agree in (True, False):
        try:
            check_finite(3, 1.0, {"ADAMWSparse": shard}, agree=agree)
            out[f"agree={agree}"] = None
        except DivergenceError as e:
            out[f"agree={agree}"] = str(e)


def _worker_main(group: str, workdir: str) -> None:
    env = init_distributed(device="cpu", timeout_s=120)
    workdir = Path(workdir)

    def resume():  # a fresh copy per scenario: loaded optimizer state aliases the checkpoint's tensors
        return torch.load(workdir / "ckpt_1rank.pt", weights_only=False)

    if group == "torch":
        scenarios = {
            "ddp": lambda out: _scenario_wrapped("ddp", 1, out),
            "ddp_accum": lambda out: _scenario_wrapped("ddp", 2, out),
            "fsdp2_accum": lambda out: _scenario_wrapped("fsdp2", 2, out),
            "fsdp2_replicated": lambda out: _scenario_wrapped("fsdp2_replicated", 2, out),
            "fsdp2_clip": lambda out: _scenario_wrapped("fsdp2", 1, out, clip=CLIP),
            "fsdp2_sync_each": lambda out: _scenario_wrapped("fsdp2", 2, out, sync_each=True, zero_in_place=True),
            "fsdp2_accum3_zero_in_place": lambda out: _scenario_wrapped("fsdp2", 3, out, zero_in_place=True),
            "ddp_resume": lambda out: _scenario_wrapped("ddp", 2, out, resume=resume()),
            "fsdp2_resume": lambda out: _scenario_wrapped("fsdp2", 2, out, resume=resume()),
            "fsdp2_bf16": _scenario_fsdp2_bf16,
            "ddp_lora": _scenario_ddp_lora,
            "ddp_sharded_state": lambda out: _scenario_wrapped("ddp", 2, out, shard_state=True),
            "fsdp2_sharded_state_resume": lambda out: _scenario_wrapped("fsdp2", 2, out, resume=resume(), shard_state=True),
            "logging": _scenario_logging,
            "finite_agreement": _scenario_finite_agreement,
        }
    else:
        scenarios = {
            "zero1": lambda out: _scenario_deepspeed(1, 1, out),
            "zero2_accum": lambda out: _scenario_deepspeed(2, 2, out),
            "zero1_resume": lambda out: _scenario_deepspeed(1, 2, out, resume=resume()),
            "zero2_clip": lambda out: _scenario_deepspeed(2, 1, out, clip=CLIP),
            "zero2_bf16": _scenario_deepspeed_bf16,
            "zero2_lora": _scenario_deepspeed_lora,
        }
    for name, run in scenarios.items():
        out: dict = {}
        try:
            run(out)
        except Exception:
            out = {"error": traceback.format_exc()}
            torch.save(out, workdir / f"{name}_rank{env.rank}.pt")
            raise
        torch.save(out, workdir / f"{name}_rank{env.rank}.pt")
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------- launcher + fixtures
def _launch(group: str, workdir: Path, timeout: float = 300) -> str:
    """Run this file as 2 ranks, torchrun-style. Returns "" or the failing ranks' logs."""
    env = {"DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    return run_ranks([__file__, group, str(workdir)], workdir, world=WORLD, env=env, timeout=timeout, name=group)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process runs (global batch) and the 1-rank checkpoint the 2-rank runs resume from."""
    workdir = tmp_path_factory.mktemp("dist")
    final1, _ = reference_run(accum=1)
    final2, ckpt = reference_run(accum=2)
    torch.save(ckpt, workdir / "ckpt_1rank.pt")
    return {"workdir": workdir, "accum1": final1, "accum2": final2, "lora": reference_lora_run(accum=2)}


class _Results:
    def __init__(self, workdir: Path, failure: str):
        self.workdir, self.failure = workdir, failure

    def __call__(self, name: str) -> list[dict]:
        outs = []
        for rank in range(WORLD):
            path = self.workdir / f"{name}_rank{rank}.pt"
            if not path.exists():
                pytest.fail(f"scenario {name!r} left no result for rank {rank}:\n{self.failure}")
            out = torch.load(path, weights_only=False)
            if "error" in out:
                pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{out['error']}")
            outs.append(out)
        return outs


@pytest.fixture(scope="module")
def torch_results(references):
    return _Results(references["workdir"], _launch("torch", references["workdir"]))


@pytest.fixture(scope="module")
def ds_results(references):
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (optional extra: DS_BUILD_OPS=0 pip install deepspeed)")
    return _Results(references["workdir"], _launch("deepspeed", references["workdir"]))


# ---------------------------------------------------------------------- checks
def assert_same_state(actual: dict, expected: dict, exact: bool = False):
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if exact or not want.is_floating_point():
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def assert_replicated(outs: list[dict]):
    """The replicated sparse values are bit-identical on every rank."""
    for name, values in outs[0]["local_values"].items():
        assert torch.equal(values, outs[1]["local_values"][name]), name


def test_reference_runs_differ_by_accumulation(references):
    # The comparisons below could not tell runs apart if accumulation changed nothing.
    assert not torch.allclose(references["accum1"]["blocks.0.up.values"], references["accum2"]["blocks.0.up.values"])


def test_ddp_two_ranks_match_one_process(torch_results, references):
    outs = torch_results("ddp")
    assert_same_state(outs[0]["final"], references["accum1"])
    assert_same_state(outs[1]["final"], outs[0]["final"], exact=True)
    assert_replicated(outs)
    assert outs[0]["syncs"] == STEPS


def test_ddp_no_sync_accumulation(torch_results, references):
    outs = torch_results("ddp_accum")
    assert_same_state(outs[0]["final"], references["accum2"])
    assert_replicated(outs)
    # Sparse gradients were averaged on the last micro-batch of each step only.
    assert outs[0]["syncs"] == STEPS
    first, last = [o["micro_grads"] for o in outs], None
    assert not torch.allclose(first[0][0], first[1][0]), "micro-batch 1 (no_sync) must not be averaged"
    last = [g[-1] for g in first]
    assert torch.equal(last[0], last[1]), "the last micro-batch's backward must average the sparse grads"


def assert_values_sharded(outs: list[dict], reference: dict | None = None):
    """Each SLoPe layer's values are whole (the reference's, if given) on exactly one rank,
    ``(0, kept)`` placeholders on the other; both ranks own some layers."""
    owned = [set(), set()]
    for layer in outs[0]["local_values"]:
        local = [out["local_values"][layer] for out in outs]
        whole = [rank for rank, values in enumerate(local) if values.shape[0] > 0]
        assert len(whole) == 1, (layer, [tuple(v.shape) for v in local])
        assert local[1 - whole[0]].shape == (0, local[whole[0]].shape[1]), layer
        if reference is not None:
            torch.testing.assert_close(local[whole[0]], reference[f"{layer}.values"], atol=ATOL, rtol=RTOL)
        owned[whole[0]].add(layer)
    assert owned[0] and owned[1]


def test_fsdp2_two_ranks_match_one_process(torch_results, references):
    """FSDP2 with sharded values (the default): the weights of one process with the global batch;
    between uses each layer's values live on one rank; one gradient reduction per layer and step
    (the no_sync micro-batch reduces nothing)."""
    outs = torch_results("fsdp2_accum")
    assert_same_state(outs[0]["final"], references["accum2"])
    assert_same_state(outs[1]["final"], outs[0]["final"], exact=True)
    assert_values_sharded(outs, references["accum2"])
    layers = sum(name.endswith(".values") for name in references["accum2"])
    assert outs[0]["syncs"] == STEPS * layers
    for out in outs:  # reading a layer another rank holds is a one-line error naming the way to read it
        assert set(out["dense_weight_errors"]) == {n for n, v in out["local_values"].items() if v.shape[0] == 0}
        assert all("values are sharded" in e and "full_model_state_dict" in e for e in out["dense_weight_errors"].values())
    # each rank keeps the moments of the layers whose values it keeps, and gathers the one-process state
    assert outs[0]["moments"] and outs[1]["moments"] and not set(outs[0]["moments"]) & set(outs[1]["moments"])
    reference_ckpt = torch.load(references["workdir"] / "ckpt_1rank.pt", weights_only=False)
    assert_same_optimizer_state(outs[0]["ckpt"]["sparse_opt"], reference_ckpt["sparse_opt"])


def test_fsdp2_sharded_values_sync_every_micro_batch(torch_results, references):
    """Two backward passes with the sync on in one step: the owner adds the second mean to the
    first (each rank's new gradient is reduced alone), as no_sync accumulation would give; the
    gradients zeroed in place between steps (placeholders off the owner) start afresh."""
    outs = torch_results("fsdp2_sync_each")
    assert_same_state(outs[0]["final"], references["accum2"])
    layers = sum(name.endswith(".values") for name in references["accum2"])
    assert outs[0]["syncs"] == 2 * STEPS * layers


def test_fsdp2_sharded_values_accumulate_into_gradients_zeroed_in_place(torch_results):
    """no_sync micro-batches accumulating into gradients zeroed in place (the owner's last reduced
    tensor, refilled locally) are reduced with the last one, not taken for an earlier mean."""
    final, _ = reference_run(accum=3)
    outs = torch_results("fsdp2_accum3_zero_in_place")
    assert_same_state(outs[0]["final"], final)


def test_fsdp2_replicated_values_match_one_process(torch_results, references):
    outs = torch_results("fsdp2_replicated")
    assert_same_state(outs[0]["final"], references["accum2"])
    assert_replicated(outs)
    assert outs[0]["syncs"] == STEPS


def test_fsdp2_sharded_values_clip_the_joint_norm(torch_results, references):
    """Clipping the sparse gradients (each layer's on its owner) by their norm over all ranks."""
    final, _ = reference_run(accum=1, clip=CLIP)
    outs = torch_results("fsdp2_clip")
    assert_same_state(outs[0]["final"], final)
    assert not torch.allclose(final["blocks.0.up.values"], references["accum1"]["blocks.0.up.values"])  # clipping acted


def assert_bf16_trains(outs: list[dict], values_sharded: bool = False):
    assert outs[0]["logits_dtype"] == torch.bfloat16
    assert outs[0]["values_dtype"] == torch.float32  # fp32 master weights for the sparse values
    assert_values_sharded(outs) if values_sharded else assert_replicated(outs)
    for out in outs:
        assert all(torch.isfinite(torch.tensor(out["losses"])))
        assert out["losses"][-1] < out["losses"][0]


def assert_same_optimizer_state(actual: dict, expected: dict):
    assert actual["state"].keys() == expected["state"].keys()
    for index, want in expected["state"].items():
        assert actual["state"][index].keys() == want.keys(), index
        for name, value in want.items():
            torch.testing.assert_close(actual["state"][index][name], value, atol=ATOL, rtol=RTOL, msg=lambda m, i=index, n=name: f"{i}.{n}: {m}")


def test_sharded_sparse_optimizer_state_matches_one_process(torch_results, references):
    """ADAMWSparse(shard_state=True): each rank keeps the moments of half the layers, the weights
    are those of one process, and rank 0 gathers the state one process would save."""
    reference_ckpt = torch.load(references["workdir"] / "ckpt_1rank.pt", weights_only=False)
    outs = torch_results("ddp_sharded_state")
    assert_same_state(outs[0]["final"], references["accum2"])
    assert_replicated(outs)
    layers = len(reference_ckpt["sparse_opt"]["state"])
    assert outs[0]["moments"] and outs[1]["moments"] and not set(outs[0]["moments"]) & set(outs[1]["moments"])
    assert sorted(outs[0]["moments"] + outs[1]["moments"]) == list(range(layers))
    assert_same_optimizer_state(outs[0]["ckpt"]["sparse_opt"], reference_ckpt["sparse_opt"])  # gathered at CKPT_STEP
    assert outs[1]["ckpt"]["sparse_opt"] is None and outs[1]["full_sparse_state"] is None
    assert outs[0]["state_before"]["state"] == {} and outs[1]["state_before"] is None
    # one rank's part of the state is refused in one line (its other layers have no moments)
    sparse_opt, _ = make_optimizers(build_model(seed=0))
    with pytest.raises(ValueError, match="one rank's part of a sharded state"):
        sparse_opt.load_state_dict(outs[1]["local_sparse_state"])
    # a one-process checkpoint resumes sharded (FSDP2 for the dense part) to the same weights and state
    resumed = torch_results("fsdp2_sharded_state_resume")
    assert_same_state(resumed[0]["final"], references["accum2"])
    assert_same_optimizer_state(resumed[0]["full_sparse_state"], outs[0]["full_sparse_state"])


def test_ranks_agree_on_a_non_finite_shard_before_saving(torch_results):
    first, second = torch_results("finite_agreement")
    assert "another rank's shard of the optimizer state holds inf/nan" in first["agree=True"]
    assert "ADAMWSparse.exp_avg holds inf/nan" in second["agree=True"] and second["agree=False"] == second["agree=True"]
    assert first["agree=False"] is None  # each rank alone sees only its own shard


def test_fsdp2_bf16_mixed_precision(torch_results):
    assert_bf16_trains(torch_results("fsdp2_bf16"), values_sharded=True)


def test_resume_two_ranks_to_one(torch_results, references):
    # A checkpoint written by 2 ranks (DDP and FSDP2) resumes in 1 process: same final weights
    # as the uninterrupted single-process run.
    for name in ("ddp_accum", "fsdp2_accum"):
        ckpt = torch_results(name)[0]["ckpt"]
        final, _ = reference_run(accum=2, ckpt=ckpt)
        assert_same_state(final, references["accum2"])


def test_resume_one_rank_to_two(torch_results, references):
    for name in ("ddp_resume", "fsdp2_resume"):
        outs = torch_results(name)
        assert_same_state(outs[0]["final"], references["accum2"])
    assert_replicated(torch_results("ddp_resume"))
    assert_values_sharded(torch_results("fsdp2_resume"), references["accum2"])


def test_checkpoint_is_rank_count_independent(torch_results, references):
    # The state written by 2 ranks equals the one a single process writes at the same step.
    _, ckpt_1 = reference_run(accum=2, steps=CKPT_STEP)
    for name in ("ddp_accum", "fsdp2_accum"):
        ckpt_2 = torch_results(name)[0]["ckpt"]
        assert_same_state(ckpt_2["model"], ckpt_1["model"])
        assert ckpt_2["dense_opt"]["param_groups"] == ckpt_1["dense_opt"]["param_groups"]
        for pname, state in ckpt_1["dense_opt"]["state"].items():
            assert_same_state(ckpt_2["dense_opt"]["state"][pname], state)
        for index, state in ckpt_1["sparse_opt"]["state"].items():
            assert_same_state(ckpt_2["sparse_opt"]["state"][index], state)


def test_ddp_lazy_lora_rewrap(torch_results, references):
    # Adapters added mid-run: DDP is rebuilt over the same module; the run still matches 1 process.
    outs = torch_results("ddp_lora")
    assert any("lora_B" in name for name in outs[0]["final"])
    assert_same_state(outs[0]["final"], references["lora"])
    assert_same_state(outs[1]["final"], outs[0]["final"], exact=True)
    assert outs[0]["syncs"] == STEPS - CKPT_STEP  # the new wrapper's count; the old hooks are gone


def test_rank_zero_logging(torch_results):
    logs = [out["log"] for out in torch_results("logging")]
    assert "step 1 loss" in logs[0] and "step 1 loss" not in logs[1]
    assert all("disk almost full" in log for log in logs)


@pytest.mark.parametrize("name, accum", [("zero1", 1), ("zero2_accum", 2)])
def test_deepspeed_two_ranks_match_one_process(ds_results, references, name, accum):
    outs = ds_results(name)
    assert_same_state(outs[0]["final"], references[f"accum{accum}"])
    assert_same_state(outs[1]["final"], outs[0]["final"], exact=True)
    assert_replicated(outs)
    assert outs[0]["syncs"] == STEPS


def test_deepspeed_resume_across_rank_counts(ds_results, references):
    # 2 ranks (ZeRO-2, partitioned optimizer state) -> 1 process, and 1 process -> 2 ranks (ZeRO-1).
    final, _ = reference_run(accum=2, ckpt=ds_results("zero2_accum")[0]["ckpt"])
    assert_same_state(final, references["accum2"])
    outs = ds_results("zero1_resume")
    assert_same_state(outs[0]["final"], references["accum2"])
    assert_replicated(outs)



def test_deepspeed_gradient_clipping(ds_results, references):
    # DeepSpeed clips the dense gradients by their norm, slope the sparse ones by theirs.
    clipped, _ = reference_run(accum=1, clip=CLIP)
    outs = ds_results("zero2_clip")
    assert_same_state(outs[0]["final"], clipped)
    with pytest.raises(AssertionError):
        assert_same_state(outs[0]["final"], references["accum1"])


def test_deepspeed_bf16(ds_results):
    assert_bf16_trains(ds_results("zero2_bf16"))


def test_deepspeed_lazy_lora_rebuild(ds_results, references):
    # Adapters added mid-run: a new engine over the same module keeps the fp32 masters and the
    # ZeRO-partitioned optimizer state of the old parameters; the adapters' group starts fresh.
    outs = ds_results("zero2_lora")
    assert_same_state(outs[0]["final"], references["lora"])
    assert_same_state(outs[1]["final"], outs[0]["final"], exact=True)
    assert outs[0]["syncs"] == STEPS - CKPT_STEP


# ---------------------------------------------------------------------- single-process checks
def test_wrappers_need_a_pruned_model_and_a_process_group():
    with pytest.raises(ValueError, match="prune_model"):
        wrap_ddp(TinyLM())
    with pytest.raises(ValueError, match="prune_model"):
        wrap_fsdp2(TinyLM())
    with pytest.raises(RuntimeError, match="torchrun"):
        wrap_ddp(build_model(seed=0))


def test_init_distributed_reads_the_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.created_group) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun"):
        init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed(device="cpu")


def test_rank_slice_partitions_the_global_batch():
    batch = torch.randn(6, 3)
    parts = [rank_slice(batch, rank, 3) for rank in range(3)]
    assert all(p.shape == (2, 3) for p in parts)
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="divisible"):
        rank_slice(batch, 0, 4)


def test_dense_parameters_exclude_sparse_values():
    model = build_model(seed=0)
    dense = {id(p) for p in dense_parameters(model)}
    sparse = [m.values for _, m in slope.sparse_modules(model)]
    assert sparse and not any(id(v) in dense for v in sparse)
    assert dense == {id(p) for p in model.parameters() if p.requires_grad}


def test_index_keyed_optimizer_state_round_trip():
    # The name-keyed full state converts to exactly what optimizer.state_dict() holds, and back.
    from slope.parallel import to_index_keyed

    model = build_model(seed=0)
    sparse_opt, dense_opt = make_optimizers(model)
    train(model, sparse_opt, dense_opt, 1, 1)
    expected = dense_opt.state_dict()
    got = to_index_keyed(full_optimizer_state_dict(model, dense_opt))
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert_same_state(got["state"][index], state, exact=True)
    model2 = build_model(seed=1)
    _, dense2 = make_optimizers(model2)
    load_full_optimizer_state_dict(model2, dense2, got)  # index-keyed input is accepted
    for index, state in expected["state"].items():
        assert_same_state(dense2.state_dict()["state"][index], state, exact=True)
    with pytest.raises(ValueError, match="groups of"):
        load_full_optimizer_state_dict(model2, dense2, {**got, "param_groups": got["param_groups"] * 2})


def test_deepspeed_config_checks(tmp_path):
    from slope.parallel import load_deepspeed_config

    with pytest.raises(ValueError, match="stage 3"):
        load_deepspeed_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="fp16.*bf16"):
        load_deepspeed_config({"fp16": {"enabled": True}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_deepspeed_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_deepspeed_config(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_deepspeed_config(tmp_path / "ok.json")["gradient_clipping"] == 0.0
    assert load_deepspeed_config({"gradient_clipping": 1.5})["gradient_clipping"] == 1.5


def test_deepspeed_train_config_fills_in_the_batch_sizes():
    from slope.parallel import deepspeed_train_config

    sizes = dict(global_batch=8, grad_accum=2, world_size=2, gradient_clipping=1.0)
    config = deepspeed_train_config({"zero_optimization": {"stage": 2}}, **sizes)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (4, 2, 16)
    assert config["gradient_clipping"] == 1.0
    zero1 = {"zero_optimization": {"stage": 1}}
    assert deepspeed_train_config({**zero1, "train_batch_size": 16, "gradient_clipping": 0}, **sizes)["gradient_clipping"] == 0
    with pytest.raises(ValueError, match="train_batch_size=32"):
        deepspeed_train_config({**zero1, "train_batch_size": 32}, **sizes)
    with pytest.raises(ValueError, match="'optimizer' section"):
        deepspeed_train_config({**zero1, "optimizer": {"type": "AdamW"}}, **sizes)
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        deepspeed_train_config(zero1, **{**sizes, "world_size": 3})


def test_single_process_group_for_engines_that_need_one(monkeypatch):
    from slope.parallel import destroy_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed(device="cpu", single_process_group=True)
    try:
        assert env.created_group and torch.distributed.get_world_size() == 1
    finally:
        destroy_distributed(env)
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------- the CLI under torchrun
from train_runs import CLI_TINY, assert_same_run as _assert_same_run, cli as _cli, torchrun as _torchrun  # noqa: E402


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """One process, global batch 4, accumulation 2, adapters from step 3: the run every launch must reproduce."""
    root = tmp_path_factory.mktemp("cli")
    _cli("--out", str(root / "ref"), *CLI_TINY)
    _cli("--out", str(root / "ref_noclip"), *CLI_TINY, "--grad-clip", "0")
    return root


def test_cli_torchrun_ddp_and_resume_across_rank_counts(cli_reference):
    root = cli_reference
    # 2 ranks (DDP, each SLoPe layer's moments on one rank) for steps 1-2, then 1 process resumes steps 3-4.
    stdout = _torchrun("--out", str(root / "ddp_2to1"), *CLI_TINY, "--stop-after", "2", "--shard-sparse-optimizer")
    assert stdout.count("step 1/4") == 1 and stdout.count("stopped after step 2") == 1  # rank 0 logs alone
    assert "(DDP; each SLoPe layer's optimizer moments on one rank)" in stdout
    _cli("--out", str(root / "ddp_2to1"), "--resume")
    _assert_same_run(root / "ddp_2to1", root / "ref")
    # 1 process for steps 1-2, then 2 ranks resume; DDP is rebuilt when the adapters attach.
    _cli("--out", str(root / "ddp_1to2"), *CLI_TINY, "--stop-after", "2")
    stdout = _torchrun("--out", str(root / "ddp_1to2"), "--resume", "--shard-sparse-optimizer")
    assert stdout.count("done: 4 steps") == 1
    _assert_same_run(root / "ddp_1to2", root / "ref")


def test_cli_sharded_sparse_state_resumes_on_another_number_of_ranks(tmp_path):
    """2 ranks with the sparse moments split by layer stop after step 2; 3 ranks, split their own
    way, finish the run: the one-process run (global batch 6) again."""
    tiny = list(CLI_TINY)
    tiny[tiny.index("--batch-size") + 1] = "6"  # splits over 2 and 3 ranks
    _cli("--out", str(tmp_path / "ref"), *tiny)
    _torchrun("--out", str(tmp_path / "run"), *tiny, "--stop-after", "2", "--shard-sparse-optimizer")
    stdout = _torchrun("--out", str(tmp_path / "run"), "--resume", "--shard-sparse-optimizer", nproc=3)
    assert "3 ranks (DDP; each SLoPe layer's optimizer moments on one rank)" in stdout
    _assert_same_run(tmp_path / "run", tmp_path / "ref")


def test_cli_rejects_unsupported_deepspeed_settings(tmp_path, capsys):
    from slope.config import ConfigError, TrainConfig

    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2}}')
    TrainConfig(deepspeed=str(ds_json)).validate()
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig(deepspeed=str(tmp_path / "missing.json")).validate()
    with pytest.raises(ConfigError, match="not fp16"):
        TrainConfig(deepspeed=str(ds_json), precision="fp16").validate()
    with pytest.raises(ConfigError, match="dense tail"):
        TrainConfig(deepspeed=str(ds_json), dense_tail_fraction=0.5).validate()
    # Checked before any work, and the single-process group made for DeepSpeed is released.
    ds_json.write_text('{"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW"}}')
    from slope.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), *CLI_TINY, "--deepspeed", str(ds_json)]) == 1
    assert "'optimizer' section" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional extra)")
def test_cli_deepspeed_and_resume_without_it(cli_reference, tmp_path):
    root = cli_reference
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2}}')
    # ZeRO-2 on 2 ranks, the engine rebuilt when the adapters attach (--grad-clip 0: DeepSpeed
    # clips dense and sparse gradients separately, not jointly), activations recomputed in the backward.
    stdout = _torchrun("--out", str(root / "ds"), *CLI_TINY, "--grad-clip", "0", "--deepspeed", str(ds_json),
                       "--gradient-checkpointing")
    assert "each SLoPe layer's optimizer moments on one rank" in stdout  # ZeRO splits the sparse state too
    _assert_same_run(root / "ds", root / "ref_noclip")
    # A ZeRO-2 checkpoint of step 2 (partitioned optimizer state, dense and sparse, gathered)
    # resumes in 1 process without DeepSpeed.
    _torchrun("--out", str(root / "ds_2to1"), *CLI_TINY, "--grad-clip", "0", "--deepspeed", str(ds_json), "--stop-after", "2")
    _cli("--out", str(root / "ds_2to1"), "--resume", "--deepspeed", "")
    _assert_same_run(root / "ds_2to1", root / "ref_noclip")


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])


def test_sharded_values_refuse_an_unsynced_backward_after_a_synced_one(tmp_path):
    """One process (a 1-rank gloo group): after a backward that reduced the gradient, one without
    the sync in the same step cannot be averaged correctly: a one-line error, not a wrong mean."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = wrap_fsdp2(build_model(seed=0))
        ids, targets = global_batch(0, 0)
        loss_fn(model, ids, targets).backward()
        with pytest.raises(RuntimeError, match="no_sync.*after one with it in the same step"):
            with no_sync(model):
                loss_fn(model, ids, targets).backward()
    finally:
        dist.destroy_process_group()


def test_sharded_values_refuse_merged_inference_layers(tmp_path):
    """The merged (inference-only) form does not train: sharding its values is a one-line error."""
    import torch.distributed as dist

    from slope.parallel import ShardedValues

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(seed=0)
        for _, layer in slope.sparse_modules(model):
            layer.add_lora(4)
        slope.lora.merge_lora(model)
        with pytest.raises(ValueError, match="merged inference layer.*shard_values=False"):
            ShardedValues([layer for _, layer in slope.sparse_modules(model)])
    finally:
        dist.destroy_process_group()
