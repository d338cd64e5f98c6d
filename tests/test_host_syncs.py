"""No host reads of device tensors on the training hot path (forward, backward, clip, optimizer step).

On CUDA every ``.item()``, ``bool(tensor)``, ``torch.equal``, ``.tolist()``, ``nonzero`` ... waits for
the GPU. CPU has no such wait, so this counts the calls instead: a ``TorchFunctionMode`` records each
one together with the source line that made it, and steady-state training steps of a model taking
the CUDA code paths (``slope.kernels.triton_usable`` patched on, Triton in its interpreter) must
make none from slope's own code. ``slope/kernels/reference.py`` is not counted: on CUDA the Triton
kernels replace it. ``tests/gpu/test_fused_step_gpu.py`` checks the same on a GPU with
``torch.cuda.set_sync_debug_mode("error")``.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import slope

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CUDA code paths run on CPU only in Triton's interpreter: run with TRITON_INTERPRET=1",
)

SLOPE = Path(slope.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
#: calls that make the host wait for the device (CUDA) or copy to it
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "equal", "allclose", "cpu",
         "nonzero", "masked_select", "unique", "any", "all"}
NOT_COUNTED = {SLOPE / "kernels" / "reference.py"}  # stands in for the Triton kernels on CPU


class HostReads(TorchFunctionMode):
    """Records ``(file, line, call)`` of every host read made from slope's own code (the first frame
    outside torch that made it). ``any``/``all`` are recorded only when their result is then read."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and name not in ("any", "all"):
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH):
                frame = frame.f_back
            if frame is not None:
                path = Path(frame.f_code.co_filename).resolve()
                if path.is_relative_to(SLOPE) and path not in NOT_COUNTED:
                    self.found.append((str(path.relative_to(SLOPE)), frame.f_lineno, name))
        return func(*args, **(kwargs or {}))


def _model():
    from slope.layer import SparseLinear

    torch.manual_seed(0)
    return nn.Sequential(
        SparseLinear.from_dense(torch.randn(64, 32) * 0.1, torch.zeros(64), compress=True, backend="reference"),
        nn.GELU(),
        SparseLinear.from_dense(torch.randn(16, 64) * 0.1, None, compress=True, backend="reference"),
    )


def test_steady_state_training_steps_read_nothing_from_the_device(monkeypatch):
    from slope import kernels
    from slope.optimizers import ADAMWSparse

    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)
    model = _model()
    opt = ADAMWSparse(model, lr=1e-2, mask_change_freq=100)

    def step():
        for _ in range(2):  # two micro-batches: the gradient is written, then added to
            x = torch.randn(2, 5, 32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()

    step()  # first step: operands built, masks validated once (allowed to read)
    reads = HostReads()
    with reads:
        for _ in range(3):
            step()
    assert reads.found == [], reads.found
    fused = [layer for layer in (model[0], model[2]) if layer.operand_buffers()]
    assert fused == [model[0], model[2]]  # the steps took the fused operand path
    # the counter does see reads from slope's code (mask validation reads the device once per mask)
    with reads:
        model[0]._validated_mask = None
        model[0]._check_mask()
    assert [(f, call) for f, _, call in reads.found] == [("layer.py", "__bool__")]


def test_unscale_reads_the_device_once():
    from slope.optimizers import ADAMWSparse

    model = _model()
    opt = ADAMWSparse(model, lr=1e-2)
    model(torch.randn(3, 32, requires_grad=True)).sum().backward()
    reads = HostReads()
    with reads:
        assert opt.unscale_(0.5) is False
    assert [call for _, _, call in reads.found] == ["__bool__"]
    model[2].values_grad[0, 0] = float("inf")
    assert opt.unscale_(1.0) is True
