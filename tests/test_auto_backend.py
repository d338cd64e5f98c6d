"""``backend="auto"`` selection logic (with an injected timer, on CPU) and row tiling.

The real timings happen on CUDA (tests/gpu/test_gpu_backends.py); here a fake timer returns
chosen times so the decision rule itself is tested: a sparse candidate wins only when faster than
dense by the margin, failures are skipped, results are cached per key.
"""
import pytest
import torch
import torch.nn.functional as F

from slope.backends import backend_class
from slope.backends.auto import AutoBackendChooser
from slope.backends.dense import DenseBackend, RowTiledBackend
from slope.backends.reference import ReferenceBackend
from slope.kernels import prune_2to4
from slope.masks import nm_mask

CPU = torch.device("cpu")


class FakeTimer:
    """Runs ``fn`` once (so candidates really execute) and returns the next scripted time."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn, device):
        fn()
        self.calls += 1
        value = self.times.pop(0)
        if isinstance(value, Exception):
            raise value
        return value


def chooser(times, **kw):
    timer = FakeTimer(times)
    return AutoBackendChooser(tokens=8, timer=timer, candidates=("reference",), **kw), timer


def test_sparse_candidate_wins_only_when_faster_than_dense():
    fast, _ = chooser([1.0, 0.5])  # dense first, then the candidate
    assert isinstance(fast.choose((64, 64), torch.float32, CPU), ReferenceBackend)
    close, _ = chooser([1.0, 0.99])  # within the 3 % margin: dense stays
    assert isinstance(close.choose((64, 64), torch.float32, CPU), DenseBackend)
    slow, _ = chooser([1.0, 2.0])
    choice = slow.choose((64, 64), torch.float32, CPU)
    assert isinstance(choice, DenseBackend)
    assert slow.report()[((64, 64), torch.float32, CPU, True, 8)].times_ms == {"dense": 1.0, "reference": 2.0}


def test_failing_candidate_is_skipped_and_reported():
    auto, _ = chooser([1.0, RuntimeError("kernel exploded")])
    assert isinstance(auto.choose((64, 64), torch.float32, CPU), DenseBackend)
    (entry,) = auto.report().values()
    assert "kernel exploded" in entry.errors["reference"]


def test_choice_is_cached_per_key():
    auto, timer = chooser([1.0, 0.5, 1.0, 2.0])
    first = auto.choose((64, 64), torch.float32, CPU)
    assert auto.choose((64, 64), torch.float32, CPU) is first and timer.calls == 2
    other = auto.choose((64, 96), torch.float32, CPU)  # a new shape is timed again
    assert timer.calls == 4 and isinstance(other, DenseBackend)
    auto.clear()
    assert auto.report() == {}


def test_tiling_adds_row_tiled_candidates_for_non_square_weights():
    # (256, 64) is tall: candidates are reference and reference+rowtiles; the tiled one is fastest.
    auto, timer = chooser([1.0, 0.9, 0.5])
    choice = auto.choose((256, 64), torch.float32, CPU, tiling=True)
    assert isinstance(choice, RowTiledBackend) and timer.calls == 3
    untiled, timer2 = chooser([1.0, 0.9])
    assert isinstance(untiled.choose((256, 64), torch.float32, CPU, tiling=False), ReferenceBackend)
    assert timer2.calls == 2


@pytest.mark.parametrize("shape", [(512, 64), (200, 64), (64, 64), (64, 256)])
def test_row_tiled_backend_matches_dense(shape):
    dense, mask = prune_2to4(torch.randn(*shape))
    tiled = RowTiledBackend(ReferenceBackend())
    operand = tiled.make_operand(dense, mask)
    height = tiled.block_rows(*shape)
    if shape[0] >= 2 * shape[1]:
        assert height is not None and height % 64 == 0 and len(operand) == -(-shape[0] // height)
    else:
        assert height is None
    x = torch.randn(3, 7, shape[1])
    torch.testing.assert_close(tiled.matmul(x, operand), F.linear(x, dense), rtol=1e-5, atol=1e-5)


def test_dense_backend_is_registered_and_exact():
    cls = backend_class("dense")
    assert cls is DenseBackend and cls.unavailable_reason(CPU, torch.float32) is None
    w = torch.randn(32, 64)
    masked = w * nm_mask(w)
    x = torch.randn(5, 64)
    backend = cls()
    assert torch.equal(backend.matmul(x, backend.make_operand(masked, masked != 0)), F.linear(x, masked))


def test_backend_whose_availability_check_raises_is_skipped(monkeypatch):
    def broken(device, dtype):
        raise TypeError("bad device argument")

    monkeypatch.setattr(ReferenceBackend, "unavailable_reason", staticmethod(broken))
    auto, timer = chooser([1.0])
    assert isinstance(auto.choose((64, 64), torch.float32, CPU), DenseBackend) and timer.calls == 1
    (entry,) = auto.report().values()
    assert "bad device argument" in entry.errors["reference"]


def test_layer_asks_auto_for_each_direction_separately(monkeypatch):
    """A layer W (out, in) with backend="auto" on CUDA gets one choice for its forward operand
    (out, in) and one for its input-gradient operand (in, out), each cached (CPU: fake chooser)."""
    import slope.backends.auto as auto_module
    from slope.layer import SparseLinear

    asked = []

    class RecordingChooser:
        def bucket(self, tokens):
            return 8192

        def choose(self, shape, dtype, device, tiling=True, tokens=None):
            asked.append(tuple(shape))
            return DenseBackend() if shape[0] > shape[1] else ReferenceBackend()

    monkeypatch.setattr(auto_module, "AUTO_CHOOSER", RecordingChooser())
    layer = SparseLinear.from_dense(torch.randn(64, 32), compress=True, backend="auto")
    cuda = torch.device("cuda")  # never touched: only the choice is made
    forward = layer._backend_for(torch.bfloat16, cuda)
    backward = layer._backend_for(torch.bfloat16, cuda, "backward")
    assert isinstance(forward, DenseBackend) and isinstance(backward, ReferenceBackend)
    assert layer._backend_for(torch.bfloat16, cuda) is forward
    assert layer._backend_for(torch.bfloat16, cuda, "backward") is backward
    assert asked == [(64, 32), (32, 64)]
    # on CPU "auto" resolves to one backend for both directions, without the chooser
    cpu = torch.device("cpu")
    assert layer._backend_for(torch.float32, cpu) is layer._backend_for(torch.float32, cpu, "backward")
    assert asked == [(64, 32), (32, 64)]


def test_choices_are_per_token_bucket_and_share_backend_instances():
    """Calls are timed at their token bucket (powers of two from 16 to ``tokens``): a kernel that
    wins at training sizes can lose at decode sizes; one backend instance serves every bucket."""
    sizes = []

    class SizeTimer(FakeTimer):
        def __call__(self, fn, device):
            sizes.append(fn().shape[0])  # the timed product's token count
            self.calls += 1
            return self.times.pop(0)

    timer = SizeTimer([1.0, 2.0, 1.0, 0.5, 1.0, 0.5])
    assert AutoBackendChooser().buckets == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    auto = AutoBackendChooser(tokens=512, timer=timer, candidates=("reference",), small_buckets=(16, 128, 1024))
    assert auto.buckets == (16, 128, 512)
    assert [auto.bucket(t) for t in (None, 1, 16, 17, 128, 129, 512, 100000)] == [512, 16, 16, 128, 128, 512, 512, 512]
    small = auto.choose((64, 64), torch.float32, CPU, tokens=3)
    assert isinstance(small, DenseBackend) and sizes == [16, 16]
    large = auto.choose((64, 64), torch.float32, CPU, tokens=4096)
    assert isinstance(large, ReferenceBackend) and sizes == [16, 16, 512, 512]
    assert auto.choose((64, 64), torch.float32, CPU, tokens=9) is small and timer.calls == 4  # cached
    assert auto.choose((64, 64), torch.float32, CPU, tokens=100) is large  # 128 bucket: same instance
    assert sizes[4:] == [128, 128]
    assert len(auto.report()) == 3


def test_layer_keys_auto_choices_and_operands_by_bucket_and_backend(monkeypatch):
    """With timed auto (as on CUDA) a layer multiplies decode-sized and training-sized inputs with
    each bucket's choice and stays exact; it keeps one operand per direction, that of the backend
    it used last (CPU: fake chooser)."""
    import slope.backends.auto as auto_module
    import slope.layer as layer_module
    from slope.layer import SparseLinear

    # (dense, reference) times: forward and backward at 16 tokens (dense wins), then at 64 (reference)
    timer = FakeTimer([1.0, 2.0, 1.0, 2.0, 1.0, 0.5, 1.0, 0.5])
    monkeypatch.setattr(auto_module, "AUTO_CHOOSER", AutoBackendChooser(tokens=64, timer=timer, candidates=("reference",)))
    monkeypatch.setattr(layer_module, "_auto_is_timed", lambda device: True)
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.randn(32, 48), compress=True, backend="auto")
    for tokens in (4, 40):
        x = torch.randn(tokens, 48, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y, F.linear(x, layer.dense_weight()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, torch.ones(tokens, 32) @ layer.backward_weight(), rtol=1e-5, atol=1e-5)
    assert {k[0] for k in layer._backends} == {"forward", "backward"}
    names = {(k[0], k[3]): type(v).__name__ for k, v in layer._backends.items()}
    assert names == {("forward", 16): "DenseBackend", ("backward", 16): "DenseBackend",
                     ("forward", 64): "ReferenceBackend", ("backward", 64): "ReferenceBackend"}
    assert sorted((k[0], v[0][-1]) for k, v in layer._operands.items()) == [("backward", "reference"), ("forward", "reference")]
    with torch.no_grad():  # back to a decode-sized call: the dense operand replaces the reference one
        x = torch.randn(2, 48)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight()), rtol=1e-5, atol=1e-5)
    assert {k[0]: v[0][-1] for k, v in layer._operands.items()} == {"forward": "dense", "backward": "reference"}
