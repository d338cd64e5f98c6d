"""``torch.compile`` of a pruned model: the SLoPe layers run eagerly inside the compiled model (their
operand caches are keyed on tensor versions and storage, which a traced graph would not re-check),
and training and merged inference give the eager model's results."""
import pytest
import torch
import torch.nn as nn

import slope
from slope.layer import SparseLinear
from slope.lora import MergedSparseLinear, freeze_for_inference, merge_lora
from slope.optimizers import ADAMWSparse


def _model(**kw):
    torch.manual_seed(0)
    return slope.prune_model(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), backend="reference",
                             verbose=False, **kw)


@pytest.fixture
def traced_calls(monkeypatch):
    """For each call of the layers' operand builder and merged product: whether it ran while dynamo
    traced (none may)."""
    calls = []
    for cls, name in ((SparseLinear, "_operand"), (MergedSparseLinear, "_merged_product")):
        def spy(self, *args, original=getattr(cls, name), **kwargs):
            calls.append(torch.compiler.is_compiling())
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return calls


def test_compiled_training_is_the_eager_training_with_the_layers_run_eagerly(traced_calls):
    torch._dynamo.reset()
    x = torch.randn(8, 64)
    outputs = {}
    for name in ("eager", "compiled"):
        model = _model()
        run = torch.compile(model) if name == "compiled" else model
        sparse_opt = ADAMWSparse(model, lr=1e-2)
        dense_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        outputs[name] = []
        for _ in range(3):  # bf16 operands: copies of the fp32 values, rebuilt after each step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = run(x)
            y.float().square().mean().backward()
            sparse_opt.step()
            sparse_opt.zero_grad()
            dense_opt.step()
            dense_opt.zero_grad()
            outputs[name].append(y.detach().float())
    for eager, compiled in zip(outputs["eager"], outputs["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert traced_calls and not any(traced_calls)


def test_compiled_merged_inference_is_the_eager_one(traced_calls):
    torch._dynamo.reset()
    model = _model(add_lora=True, lora_rank=8)
    with torch.no_grad():
        for _, layer in slope.sparse_modules(model):
            layer.lora_B.normal_(0.0, 0.3)
    merge_lora(model)
    freeze_for_inference(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.compile(model)(x), eager, rtol=0, atol=0)
    assert traced_calls and not any(traced_calls)
