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


class WrongProduct(DenseBackend):
    """A fast but wrong sparse backend (as a library kernel with a bug for some shape)."""

    name = "fake-wrong"
    compressed = True

    def matmul(self, x, operand):
        return super().matmul(x, operand) * 1.5


def test_a_candidate_with_a_wrong_product_is_never_chosen(monkeypatch):
    import slope.backends as backends

    monkeypatch.setitem(backends._REGISTRY, WrongProduct.name, WrongProduct)
    timer = FakeTimer([1.0, 0.1, 0.5])  # dense, then (fake-wrong is never timed) reference
    auto = AutoBackendChooser(tokens=8, timer=timer, candidates=(WrongProduct.name, "reference"))
    assert isinstance(auto.choose((64, 64), torch.bfloat16, CPU), ReferenceBackend) and timer.calls == 2
    (entry,) = auto.report().values()
    assert "wrong product, relative error 0.5" in entry.errors[WrongProduct.name]
    assert set(entry.times_ms) == {"dense", "reference"}


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
        timed_steps = 2

        def bucket(self, tokens):
            return 8192

        def choose(self, shape, dtype, device, tiling=True, tokens=None, **kw):
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

    # (dense GEMM, dense operand rebuild, reference GEMM) times — training calls count the rebuild;
    # reference builds from kept values, which the fused optimizer step writes (not timed):
    # forward and backward at 16 tokens (dense wins), then at 64 (reference); last an inference call
    # (no rebuild counted) at 16 tokens, where dense wins
    timer = FakeTimer([1.0, 0.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 2.0])
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


# ------------------------------------------------------------------ whole cost, preference, freezing
class MakeOperandOnly(DenseBackend):
    """A sparse backend stand-in that cannot build operands from kept values (like cuSPARSELt)."""

    name = "fake-make-only"
    compressed = True


@pytest.fixture
def make_only(monkeypatch):
    import slope.backends as backends

    monkeypatch.setitem(backends._REGISTRY, MakeOperandOnly.name, MakeOperandOnly)
    return MakeOperandOnly.name


def test_whole_cost_counts_the_operand_rebuild_in_training(make_only):
    # training: dense GEMM 1.0 + its rebuild 0.1 against GEMM 0.8 + rebuild 0.5: dense is cheaper
    timer = FakeTimer([1.0, 0.1, 0.8, 0.5])
    auto = AutoBackendChooser(tokens=8, timer=timer, candidates=(make_only,))
    assert isinstance(auto.choose((64, 64), torch.float32, CPU, training=True), DenseBackend) and timer.calls == 4
    (entry,) = auto.report().values()
    assert entry.rebuild_ms == {"dense": 0.1, make_only: 0.5}
    assert entry.cost_ms == pytest.approx({"dense": 1.1, make_only: 1.3})
    # the same product for inference (frozen weights): no rebuild, the faster GEMM wins
    timer.times = [1.0, 0.8]
    assert type(auto.choose((64, 64), torch.float32, CPU)).__name__ == "MakeOperandOnly" and timer.calls == 6
    # with gradient accumulation the rebuild is shared by the micro-batches' products
    amortised = AutoBackendChooser(tokens=8, timer=FakeTimer([1.0, 0.1, 0.8, 0.5]), candidates=(make_only,),
                                   gemms_per_rebuild=4)
    assert type(amortised.choose((64, 64), torch.float32, CPU, training=True)).__name__ == "MakeOperandOnly"


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_backends_building_operands_from_kept_values_are_preferred(make_only, direction):
    # dense 1.0 + 0.2; make-only 0.5 + 0.0; reference (kept values, written by the fused step) 0.51:
    # within the 3 % margin of the cheapest, so it is chosen
    auto = AutoBackendChooser(tokens=8, timer=FakeTimer([1.0, 0.2, 0.5, 0.0, 0.51]), candidates=(make_only, "reference"))
    choice = auto.choose((64, 32), torch.float32, CPU, tiling=False, direction=direction, training=True)
    (entry,) = auto.report().values()
    assert isinstance(choice, ReferenceBackend) and entry.from_values == {"reference"}
    assert entry.rebuild_ms["reference"] == 0.0
    # beyond the margin the cheaper one wins
    auto = AutoBackendChooser(tokens=8, timer=FakeTimer([1.0, 0.2, 0.5, 0.0, 0.6]), candidates=(make_only, "reference"))
    assert type(auto.choose((64, 32), torch.float32, CPU, tiling=False, direction=direction, training=True)).__name__ == "MakeOperandOnly"
    # without the fused optimizer step the kept-value rebuild (cast / transpose) is timed too
    timer = FakeTimer([1.0, 0.2, 0.5, 0.0, 0.51, 0.3])
    auto = AutoBackendChooser(tokens=8, timer=timer, candidates=(make_only, "reference"), fused_rebuild=False)
    assert type(auto.choose((64, 32), torch.float32, CPU, tiling=False, direction=direction, training=True)).__name__ == "MakeOperandOnly"
    assert timer.calls == 6 and auto.report()[((64, 32), torch.float32, CPU, False, 8, direction, "training")].rebuild_ms["reference"] == 0.3


def test_rebuilds_timed_are_the_layers_own(make_only):
    """The rebuild callables the chooser times build the operand the layer would: the kept values
    (cast, or transposed under M_t) for the reference backend, the dense (transposed) weight otherwise."""
    from slope.backends.auto import _Problem

    for direction, shape in (("forward", (32, 64)), ("backward", (64, 32))):
        problem = _Problem(shape, torch.float32, CPU, 8, direction)
        rebuild, from_values = problem.rebuild(ReferenceBackend())
        values, meta = rebuild()
        assert from_values and values.shape == (shape[0], shape[1] // 2)
        rebuild, from_values = problem.rebuild(MakeOperandOnly())
        dense = rebuild()
        assert not from_values and dense.shape == shape
        torch.testing.assert_close(dense, ReferenceBackend().matmul(torch.eye(shape[1]), (values, meta)).t(), rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_layer_operands_are_the_shared_builders(direction):
    """SparseLinear's cached operand multiplies exactly like slope.backends.kept.operand_from_kept's
    (what the chooser's timed rebuild runs), for a backend building from kept values (reference)
    and one that only has make_operand."""
    from slope.backends.kept import operand_from_kept, operand_pattern
    from slope.layer import SparseLinear

    layer = SparseLinear.from_dense(torch.randn(32, 64), compress=True, backend="reference")
    x = torch.randn(5, 64 if direction == "forward" else 32)
    for backend in (ReferenceBackend(), MakeOperandOnly()):
        kept_mask = layer.mask if direction == "forward" else layer.mask_t
        structure = backend.operand_structure(operand_pattern(direction, kept_mask), torch.float32)
        shared, kept = operand_from_kept(backend, direction, layer.values.detach(), layer.mask, layer.mask_t,
                                         torch.float32, structure)
        assert (kept is not None) == (backend.name == "reference")
        own = layer._operand(direction, torch.float32, CPU, backend)
        torch.testing.assert_close(backend.matmul(x, own), backend.matmul(x, shared), rtol=0, atol=0)


def test_triton_is_dropped_where_it_cannot_win():
    from slope.backends.auto import AutoChoice

    cuda = torch.device("cuda")  # never touched: only the candidate list is built
    hopper = AutoBackendChooser(candidates=("triton",), capability=lambda device: (9, 0))
    choice = AutoChoice(backend=None)
    assert hopper._candidates((64, 64), torch.bfloat16, cuda, False, choice) == []
    assert "0.12x cuBLAS" in choice.dropped["triton"] and "sm90" in choice.dropped["triton"]
    ampere = AutoBackendChooser(candidates=("triton",), capability=lambda device: (8, 0))
    choice = AutoChoice(backend=None)
    assert [b.name for b in ampere._candidates((64, 64), torch.bfloat16, cuda, False, choice)] == ["triton"]
    assert choice.dropped == {}


def test_choices_without_timing():
    timer = FakeTimer([1.0, 0.5])
    auto = AutoBackendChooser(tokens=512, timer=timer, candidates=("reference",), small_buckets=(16, 128))
    assert isinstance(auto.choose((64, 64), torch.float32, CPU, tokens=512), ReferenceBackend)
    # a new bucket of a timed operand: the nearest timed bucket's choice, no timing
    assert isinstance(auto.choose((64, 64), torch.float32, CPU, tokens=100, allow_timing=False), ReferenceBackend)
    # an operand never timed: dense, no timing
    auto.freeze()
    assert isinstance(auto.choose((64, 96), torch.float32, CPU, tokens=100), DenseBackend) and timer.calls == 2
    untimed = [c for c in auto.report().values() if not c.timed]
    assert len(untimed) == 2 and "512 tokens" in untimed[0].note and "dense" in untimed[1].note
    auto.clear()
    assert not auto.frozen and auto.report() == {}


def test_training_loop_freezes_auto_after_its_first_steps(monkeypatch):
    """ADAMWSparse counts each layer's steps: after two of them a new token count is not timed
    for that layer (the fake timer has no times left: timing would fail); a fresh layer still is."""
    import slope.backends.auto as auto_module
    import slope.layer as layer_module
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    # per direction at 16 tokens, training: dense GEMM, dense rebuild, reference GEMM
    timer = FakeTimer([1.0, 0.0, 0.5, 1.0, 0.0, 0.5])
    chooser = AutoBackendChooser(tokens=64, timer=timer, candidates=("reference",), small_buckets=(16,))
    monkeypatch.setattr(auto_module, "AUTO_CHOOSER", chooser)
    monkeypatch.setattr(layer_module, "_auto_is_timed", lambda device: True)
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.randn(32, 48), compress=True, backend="auto")
    opt = ADAMWSparse(torch.nn.Sequential(layer), lr=1e-2)
    for tokens in (8, 8, 40):  # the third step brings a new bucket (64 tokens): not timed
        x = torch.randn(tokens, 48, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y, F.linear(x, layer.dense_weight()), rtol=1e-5, atol=1e-5)
        opt.step()
        opt.zero_grad()
    assert layer.optimizer_steps == 3 and timer.calls == 6
    assert {k[0]: type(v).__name__ for k, v in layer._backends.items() if k[3] == 64} == {
        "forward": "ReferenceBackend", "backward": "ReferenceBackend"}
    fresh = SparseLinear.from_dense(torch.randn(32, 48), compress=True, backend="auto")
    timer.times = [1.0, 2.0]
    with torch.no_grad():
        fresh(torch.randn(40, 48))  # inference at 64 tokens: not timed yet for any layer
    assert timer.calls == 8
