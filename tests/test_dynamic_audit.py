"""slope.dynamic after the seed-000 audit: GPT-2 Conv1D layers, masks that follow the model's device,
gradual N:M without overshoot, warnings for runs too short for their mask updates, honest records."""
import json
import warnings

import pytest
import torch
import torch.nn as nn

from slope.dynamic import DynamicSparsity
from slope.masks import is_nm_sparse
from slope.optimizers import ADAMWSparse
from slope.sparsity import MaskedWeights

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, i * i) for i in range(200)]


def _gpt2(vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _train(model, sp, steps, sparse=False):
    """``steps`` optimizer steps on fixed random tokens; returns the records of the mask changes."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sparse_opt = ADAMWSparse(model, lr=1e-2) if sparse else None
    x = torch.randint(0, 64, (2, 16))
    records = []
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        for o in filter(None, (opt, sparse_opt)):
            o.step()
            o.zero_grad()
        records += sp.step(sparse_opt or opt)
    return records


# ---------------------------------------------------------------------- 1. GPT-2 Conv1D
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_gpt2_unstructured_rigl_masks_conv1d_weights():
    model = _gpt2()
    sp = DynamicSparsity(model, 4, sparsity_ratio=0.5, mask_update_interval=2, mask_update_fraction=0.5)
    assert sorted(sp.masked.masks) == sorted(f"transformer.h.0.{n}.weight" for n in CONV1D)
    records = _train(model, sp, 4)
    assert [r["step"] for r in records] == [2] and all(layer["changed"] > 0 for layer in records[0]["layers"].values())
    for name, mask in sp.masked.masks.items():
        weight = model.get_parameter(name)
        assert int(mask.sum()) == mask.numel() // 2 and not weight[~mask].any()


@pytest.mark.parametrize("structure", [(2, 4), (4, 8)])
def test_gpt2_nm_groups_run_along_the_input_dimension(structure, tmp_path):
    """Conv1D stores (in, out): its groups of M are along dim 0 (gradual masks; SLoPe layers for RigL)."""
    n, m = structure
    gradual = _gpt2()
    sp = DynamicSparsity(gradual, 4, sparsity_type=f"{n}:{m}", use_rigl=False, sparsity_schedule="linear", mask_update_interval=1)
    _train(gradual, sp, 4)
    for name, mask in sp.masked.masks.items():
        assert mask.shape == gradual.get_parameter(name).shape
        assert is_nm_sparse(mask, n, m, dim=0, exact=True) and not is_nm_sparse(mask, n, m, dim=1), name
    rigl = _gpt2()
    sp = DynamicSparsity(rigl, 4, sparsity_type=f"{n}:{m}", mask_update_interval=2, compress=False, double_pruning=False)
    records = _train(rigl, sp, 4, sparse=True)
    assert [r["kind"] for r in records] == ["rigl"]
    from transformers import GPT2LMHeadModel

    from slope.io import export_dense

    export_dense(rigl, tmp_path)
    dense = GPT2LMHeadModel.from_pretrained(tmp_path)
    for name in CONV1D:
        weight = dense.get_submodule(f"transformer.h.0.{name}").weight  # (in, out) again
        assert is_nm_sparse(weight != 0, n, m, dim=0), name


def test_gpt2_sparse_finetune_unstructured(tmp_path):
    from slope.dynamic import sparse_finetune

    model = sparse_finetune(_gpt2(vocab=4096), DOCS, sparsity_ratio=0.5, max_steps=3, batch_size=2, gradient_accumulation_steps=1,
                            max_seq_length=16, eval_batches=1, warmup_steps=0, mask_update_interval=1, progress=False,
                            learning_rate=1e-3, output_dir=tmp_path)
    assert model.finetune_summary["final_sparsity"] == pytest.approx(0.5)
    assert model.finetune_summary["mask_updates"] == 2  # RigL after steps 1 and 2 (not the initial pruning)


# ---------------------------------------------------------------------- 2. masks follow their parameter's device
def test_masks_move_to_their_parameters_device_when_used():
    """A model moved after its masks were set (the Trainer recipe: DynamicSparsity(model), then the
    Trainer moves the model to CUDA). Here the parameter lives on 'meta' and the stale mask on the CPU;
    every path that uses a mask must bring it to the parameter's device first."""
    weight = nn.Parameter(torch.empty(8, 8, device="meta"))
    masked = MaskedWeights({"w": weight})
    stale = torch.rand(8, 8) > 0.5

    masked.masks["w"] = stale
    masked.apply_()
    assert masked.masks["w"].device.type == "meta"

    masked.masks["w"] = stale
    (torch.randn(2, 8, device="meta") @ weight).sum().backward()  # the gradient hook
    assert masked.masks["w"].device.type == "meta" and weight.grad.device.type == "meta"

    masked.masks["w"] = stale
    changed = masked.set_mask("w", torch.rand(8, 8) > 0.5)
    assert changed.device.type == "meta" and masked.masks["w"].device.type == "meta"


@pytest.mark.gpu
def test_dynamic_sparsity_built_on_cpu_trains_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    sp = DynamicSparsity(model, 4, sparsity_ratio=0.5, mask_update_interval=2, mask_update_fraction=0.5)
    model.to("cuda")  # what transformers.Trainer does after the recipe built the sparsifier
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16), device="cuda")
    for _ in range(4):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(opt)
    assert [r["step"] for r in sp.history] == [0, 2]
    for name, mask in sp.masked.masks.items():
        weight = sp.masked.params[name]
        assert mask.device == weight.device and int(mask.sum()) == mask.numel() // 2 and not weight[~mask].any()
