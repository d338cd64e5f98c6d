"""Training variants of the accuracy experiments: ``slope.prune.densify`` (the final dense phase),
``--dense-tail-fraction``, ``--no-double-pruning`` and ``--mask-type`` in ``slope train``."""
import json

import pytest
import torch
import torch.nn as nn

from slope import SparseLinear, prune_model, sparse_modules
from slope.checkpoint import read_checkpoint
from slope.cli import build_parser, resolve_train_config
from slope.config import ConfigError, TrainConfig
from slope.masks import is_nm_sparse, unpack_mask
from slope.prune import densify
from slope.train import train

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, seq_len=16, batch_size=2,
            eval_batches=1, log_every=1, eval_every=4, save_every=0, lr=3e-3, compress=False)


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 8))


# ---------------------------------------------------------------------- densify
@pytest.mark.parametrize("lora", [False, True])
def test_densify_computes_the_same_function_and_trains_every_entry(lora):
    model = _mlp()
    prune_model(model, compress=False, skip=["4"], verbose=False)
    if lora:
        for _, layer in sparse_modules(model):
            layer.add_lora(4)
            with torch.no_grad():
                layer.lora_B.normal_()  # B starts at zero: make the adapters matter
    x = torch.randn(5, 16)
    expected = model(x).detach()
    biases = {name: layer.bias for name, layer in sparse_modules(model)}
    weights = densify(model)
    assert not list(sparse_modules(model))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert len(weights) == 2 and weights[0] is model[0].weight and weights[1] is model[2].weight
    assert model[0].bias is biases["0"] and model[2].bias is None  # the same bias objects
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    if not lora:
        assert is_nm_sparse(model[0].weight.detach() != 0, 2, 4)  # W⊙M exactly, pruned entries zero
    model(x).square().sum().backward()
    pruned_grad = model[0].weight.grad[model[0].weight.detach() == 0]
    assert pruned_grad.numel() > 0 and pruned_grad.abs().sum() > 0  # pruned entries now train


def test_densify_gives_gpt2_its_conv1d_layers_back():
    """A layer that replaced GPT-2's Conv1D becomes a Conv1D again: module types, state dict keys and
    shapes are those of plain transformers (a dense export loads in AutoModelForCausalLM)."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
    plain = transformers.GPT2LMHeadModel(config).eval()
    model = transformers.GPT2LMHeadModel(config).eval()
    prune_model(model, compress=False, verbose=False)
    names = [name for name, _ in sparse_modules(model)]
    biases = {name: layer.bias for name, layer in sparse_modules(model)}
    x = torch.randint(0, 64, (2, 8))
    expected = model(x).logits.detach()
    weights = densify(model)
    assert names and all(type(model.get_submodule(n)) is Conv1D for n in names)
    assert all(model.get_submodule(n).bias is biases[n] for n in names)
    assert weights == [model.get_submodule(n).weight for n in names]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_densify_without_slope_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no SLoPe layers"):
        densify(_mlp())
    with pytest.raises(ValueError, match="bare SparseLinear"):
        densify(SparseLinear.from_dense(torch.randn(8, 8)))


# ---------------------------------------------------------------------- config and CLI
def test_new_flags_parse_and_reach_the_config():
    args = build_parser().parse_args(["train", "--no-compress", "--no-double-pruning", "--mask-type", "transposable",
                                      "--dense-tail-fraction", "0.05", "--lazy-lora-fraction", "0"])
    cfg = resolve_train_config(args)
    assert (cfg.double_pruning, cfg.mask_type, cfg.dense_tail_fraction, cfg.compress) == (False, "transposable", 0.05, False)
    defaults = TrainConfig()
    assert (defaults.double_pruning, defaults.mask_type, defaults.dense_tail_fraction) == (True, "nm", 0.0)


@pytest.mark.parametrize("values, match", [
    ({"double_pruning": False}, "needs --no-compress"),
    ({"mask_type": "diagonal"}, "mask_type"),
    ({"dense_tail_fraction": 1.5}, "dense_tail_fraction"),
    ({"dense": True, "dense_tail_fraction": 0.1}, "dense_tail_fraction"),
])
def test_bad_values_are_clear_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig().updated(values)


def test_dense_tail_start_step():
    assert TrainConfig(max_steps=100, dense_tail_fraction=0.01).dense_tail_start == 99
    assert TrainConfig(max_steps=8, dense_tail_fraction=0.25).dense_tail_start == 6
    assert TrainConfig(max_steps=8, dense_tail_fraction=0.0).dense_tail_start == 8


# ---------------------------------------------------------------------- training
def _cfg(tmp_path, name, **kw):
    return TrainConfig().updated({**TINY, "out": str(tmp_path / name), **kw})


def _records(cfg):
    return [json.loads(line) for line in open(f"{cfg.out}/metrics.jsonl")]


def test_exact_backward_and_transposable_masks_reach_the_model(tmp_path):
    for kw, check in [
        ({"double_pruning": False}, lambda mask, mask_t: torch.equal(mask, mask_t)),
        ({"double_pruning": True}, lambda mask, mask_t: bool((mask_t <= mask).all()) and mask_t.sum() < mask.sum()),
        ({"mask_type": "transposable"}, lambda mask, mask_t: is_nm_sparse(mask.t(), 2, 4) and torch.equal(mask, mask_t)),
    ]:
        cfg = _cfg(tmp_path, "run", max_steps=2, lazy_lora_fraction=0.0, **kw)
        train(cfg, progress=False, log=lambda *a: None)
        state = read_checkpoint(f"{cfg.out}/checkpoint").model_state
        names = [k[: -len(".mask_bits")] for k in state if k.endswith(".mask_bits")]
        assert len(names) == 7
        for name in names:
            shape = (state[name + ".values"].shape[0], 2 * state[name + ".values"].shape[1])  # 2:4
            mask, mask_t = unpack_mask(state[name + ".mask_bits"], shape), unpack_mask(state[name + ".mask_t_bits"], shape)
            assert is_nm_sparse(mask, 2, 4, exact=True) and check(mask, mask_t), (kw, name)


def test_dense_tail_replaces_the_sparse_layers_and_resumes_exactly(tmp_path, capsys):
    kw = dict(max_steps=8, dense_tail_fraction=0.25, lazy_lora_fraction=0.0)  # dense after step 6
    full = _cfg(tmp_path, "full", **kw)
    train(full, progress=False)
    events = [r for r in _records(full) if r.get("event") == "dense_tail_start"]
    assert [e["step"] for e in events] == [6]
    assert "step 6: dense tail" in capsys.readouterr().out
    ckpt = read_checkpoint(f"{full.out}/checkpoint")
    assert ckpt.trainer_state["dense_tail"] is True
    assert not any(k.endswith((".values", ".mask_bits")) for k in ckpt.model_state)
    up = ckpt.model_state["model.layers.0.mlp.up_proj.weight"]
    assert (up == 0).float().mean() < 0.25  # two dense steps moved the pruned entries off zero

    losses = {r["step"]: r["loss"] for r in _records(full) if "loss" in r}
    for stop in (5, 7):  # interrupted before and after the switch to dense
        part = _cfg(tmp_path, f"stop{stop}", stop_after=stop, **kw)
        train(part, progress=False, log=lambda *a: None)
        train(part.updated({"stop_after": None, "resume": True}), progress=False, log=lambda *a: None)
        resumed = {r["step"]: r["loss"] for r in _records(part) if "loss" in r}
        assert resumed == losses, stop
