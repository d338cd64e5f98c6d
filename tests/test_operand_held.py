"""What the operand of an inference-only merged layer holds (slope.inference.operand_held):
``pattern_2to4`` and the backends' ``operand_mask`` against the masks they were built from (fresh
random masks, kept values that are zero included); frozen layers drop ``mask_bits`` (and, stacked,
``lora_A_mask`` and ``lora_A``) after their first product, give the same outputs, state dicts, copies and pickles
as before, give the buffers back when moved, loaded or written into, and keep them where the
backend cannot read its pattern back or reads it back wrong."""
import io
import os

import pytest
import torch
import torch.nn as nn

from slope import prune_model, sparse_modules
from slope.backends import backend_class
from slope.kernels import compress_2to4, pattern_2to4
from slope.lora import freeze_for_inference, merge_lora, set_lora_fold
from slope.masks import nm_mask, pack_mask

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _random_2to4_mask(rows, cols, gen=None):
    return nm_mask(torch.randn(rows, cols, generator=gen), 2, 4)


@pytest.mark.parametrize("dtype,rows,cols", [(torch.float32, 8, 16), (torch.bfloat16, 64, 128), (torch.float16, 32, 64), (torch.bfloat16, 12, 40)])
def test_pattern_2to4_is_the_mask_of_either_layout_even_where_kept_values_are_zero(dtype, rows, cols):
    mask = _random_2to4_mask(rows, cols)
    dense = torch.randn(rows, cols).to(dtype) * mask
    dense[0] = 0  # a whole row of kept zeros: the values cannot tell, the metadata can
    for layout in ("plain", "cutlass") if rows % 32 == 0 and cols % 32 == 0 and dtype != torch.float32 else ("plain",):
        values, meta = compress_2to4(dense, mask, layout=layout)
        assert torch.equal(pattern_2to4(meta, rows, cols), mask), layout


@pytest.mark.parametrize("backend", BACKENDS)
def test_operand_mask_reads_back_the_pattern(backend):
    cls = backend_class(backend)
    gen = torch.Generator().manual_seed(3)
    for rows, cols, dtype in [(32, 64, torch.bfloat16), (8, 16, torch.float32)]:
        mask = _random_2to4_mask(rows, cols, gen)
        operand = cls().make_operand((torch.randn(rows, cols, generator=gen) * mask).to(dtype), mask)
        assert torch.equal(cls().operand_mask(operand), mask)


def test_backends_that_cannot_read_a_pattern_say_none():
    mask = _random_2to4_mask(8, 16)
    simulated = backend_class("simulated")()
    assert simulated.operand_mask(simulated.make_operand(torch.randn(8, 16) * mask, mask)) is None


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _model(rank=8, backend="reference", dtype=torch.float32, seed=0, alpha=None):
    torch.manual_seed(seed)
    kw = {"compress": False} if backend == "simulated" else {"backend": backend}
    lora = {"add_lora": True, "lora_rank": rank, "lora_alpha": alpha} if rank else {}
    model = prune_model(MLP().to(dtype), verbose=False, **lora, **kw)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            if rank:
                layer.lora_B.normal_(0.0, 0.3)
            layer.bias.normal_()
    return model


ALL = ["values", "bias", "lora_A", "lora_B", "mask_bits", "lora_A_mask"]  # a frozen layer's own, in order


def _frozen(fold="stacked", rank=8, backend="reference", dtype=torch.float32, alpha=None):
    """(frozen model, its state dict before freezing, the unfrozen model's output on ``x``, ``x``)."""
    model = _model(rank, backend, dtype, alpha=alpha)
    with torch.no_grad():
        layer = model.fc1  # kept values that are exactly zero: only the metadata knows they are kept
        layer.values[:3] = 0
    x = torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items() if "mask_t" not in k}
    if rank:
        merge_lora(model, fold=fold)
    freeze_for_inference(model)
    return model, state, expected, x


def _tensor_names(layer):
    return [name for name, _ in [*layer.named_parameters(), *layer.named_buffers()]]


def _tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("fold,rank,held", [("stacked", 8, ["mask_bits", "lora_A_mask", "lora_A"]), ("extended", 8, ["mask_bits", "lora_A_mask", "lora_A"]), ("stacked", 0, ["mask_bits"])])
def test_frozen_layers_hold_their_masks_in_the_operand_once_built(fold, rank, held):
    model, state, expected, x = _frozen(fold, rank)
    before = {name: _tensor_names(layer) for name, layer in sparse_modules(model)}
    tensor_bytes = _tensor_bytes(model)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, layer in sparse_modules(model):
        assert set(before[name]) - set(_tensor_names(layer)) == set(held), name
        assert layer._held.names == tuple(held)
    dropped = sum(state[f"{name}.{b}"].numel() * state[f"{name}.{b}"].element_size() for name, _ in sparse_modules(model) for b in held)
    assert tensor_bytes - _tensor_bytes(model) == dropped
    # read back: the same masks, the same state dict (keys in the same order, values equal)
    saved = model.state_dict()
    assert list(saved) == [k for k in state if not k.endswith("meta")]
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    assert torch.equal(model.fc1.mask, nm_mask(model.fc1.mask.float(), 2, 4) & model.fc1.mask)
    with torch.no_grad():
        torch.testing.assert_close(model(x), got, rtol=0, atol=0)  # no rebuild, same result


def test_held_masks_survive_copies_pickles_and_moves():
    model, state, expected, x = _frozen("stacked")
    with torch.no_grad():
        got = model(x)
        copied = __import__("copy").deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (copied, loaded):
            assert _tensor_names(other.fc1) == ALL  # the copy holds them itself
            torch.testing.assert_close(other(x), got, rtol=0, atol=0)
            assert other.fc1._held is not None  # and hands them to its own operand
        assert model.fc1._held is not None  # the original kept holding them
        model.to(torch.bfloat16)  # a move gives them back (the operands go) ...
        assert _tensor_names(model.fc1) == ALL
        assert torch.equal(model.fc1.mask_bits, state["fc1.mask_bits"])
        y = model(x.bfloat16())  # ... and the new operand holds them again
        assert model.fc1._held is not None
        torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)


def test_writes_into_a_held_mask_are_adopted_and_loads_reach_the_operand():
    model, state, expected, x = _frozen("stacked")
    layer = model.fc1
    with torch.no_grad():
        model(x)
        new_mask = _random_2to4_mask(96, 64)
        bits = layer.mask_bits
        bits.copy_(pack_mask(new_mask))  # a write into the derived tensor
        got = model(x)
        assert layer._held is not None and torch.equal(layer.mask, new_mask)
        assert torch.equal(model.state_dict()["fc1.mask_bits"], pack_mask(new_mask))
        reference = _model()
        reference.load_state_dict({**state, "fc1.mask_bits": pack_mask(new_mask)}, strict=False)
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
        # the same for the adapters' A (held in the stacked operand's extra rows)
        a = layer.lora_A
        assert torch.equal(a, state["fc1.lora_A"]) and "lora_A" not in dict(layer.named_parameters())
        a.mul_(2)
        reference.fc1.lora_A.mul_(2)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        assert layer._held is not None and torch.equal(model.state_dict()["fc1.lora_A"], 2 * state["fc1.lora_A"])
        # a state dict loaded into the holding layer: its masks and weights are used
        other = _model(seed=1)
        other_state = {k: v for k, v in other.state_dict().items() if "mask_t" not in k}
        model.load_state_dict(other_state)
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-5)
        assert layer._held is not None and torch.equal(layer.lora_A_mask, other.fc1.lora_A_mask)


def test_what_cannot_be_read_back_exactly_stays_the_layers(monkeypatch):
    model, state, expected, x = _frozen("stacked", backend="simulated")  # a dense operand: no pattern
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.fc1._held is None and _tensor_names(model.fc1) == ALL
    # extended with s = alpha / r = 0.375: s·A / s need not be A, so A stays (M is still held)
    model, state, expected, x = _frozen("extended", alpha=3.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.fc1._held.names == ("mask_bits", "lora_A_mask") and "lora_A" in dict(model.fc1.named_parameters())
    # extended with a kept entry of A that is exactly zero: the nonzeros of s·A are not M_A, so M_A stays
    model = _model()
    with torch.no_grad():
        model.fc1.lora_A[0, int(model.fc1.lora_A_mask[0].nonzero()[0])] = 0
        merge_lora(model, fold="extended")
        freeze_for_inference(model)
        model(x)
    assert model.fc1._held.names == ("mask_bits", "lora_A") and "lora_A_mask" in dict(model.fc1.named_buffers())
    # a read-back that fails: a warning, and the layer keeps everything
    cls = backend_class("reference")

    def fails(self, operand):
        raise RuntimeError("no read-back here")

    monkeypatch.setattr(cls, "operand_mask", fails)
    model, state, expected, x = _frozen("stacked")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="could not read its operand back .no read-back here"):
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.fc1._held is None and _tensor_names(model.fc1) == ALL
    # a backend whose read-back disagrees with the layer: nothing is dropped
    monkeypatch.setattr(cls, "operand_mask", lambda self, operand: torch.ones(operand[0].shape[0], 2 * operand[0].shape[1], dtype=torch.bool))
    model, state, expected, x = _frozen("stacked")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.fc1._held is None and torch.equal(model.fc1.mask_bits, state["fc1.mask_bits"])


def test_under_inference_mode_held_tensors_come_back_as_ordinary_ones():
    """Products (and a fold switch, which gives the tensors back) under ``torch.inference_mode``:
    what comes back is writable outside it, and a later load reaches the operand."""
    model, state, expected, x = _frozen("stacked")
    with torch.inference_mode():
        model(x)
        assert model.fc1._held is not None
        set_lora_fold(model, "extended")  # gives them back, inside inference mode
    given_back = {n: t for n, t in [*model.fc1.named_parameters(), *model.fc1.named_buffers()] if n in ("mask_bits", "lora_A_mask", "lora_A")}
    assert len(given_back) == 3 and not any(t.is_inference() for t in given_back.values())
    assert all(t._version >= 0 for t in given_back.values())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    other = _model(seed=1)
    model.load_state_dict({k: v for k, v in other.state_dict().items() if "mask_t" not in k})
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-5)


def test_an_operand_built_while_masks_were_held_is_not_reused_once_they_come_back():
    """A layer without adapters with two operands (fp32, and bf16 under autocast), each holding
    ``mask_bits`` in turn: after a write into the mask is adopted and the fp32 operand holds it
    again, the bf16 one (built from the old mask) is rebuilt, not taken as current."""
    model, state, expected, x = _frozen("stacked", rank=0)
    layer, new_mask = model.fc1, _random_2to4_mask(96, 64)
    reference = _model(rank=0)
    reference.load_state_dict({**state, "fc1.mask_bits": pack_mask(new_mask)}, strict=False)
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        bits = layer.mask_bits
        bits.copy_(pack_mask(new_mask))
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)  # adopted, fp32 holds again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = model(x), reference(x)
    assert torch.equal(layer.mask, new_mask)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on CPU only under TRITON_INTERPRET=1")
def test_fused_decode_operands_built_while_held_are_rebuilt_after_a_write(monkeypatch):
    """The fused decode's operands built while the stacked operand held ``lora_A``: a write into
    ``lora_A`` adopted by a prefill (which holds it again) reaches the next decode step too."""
    import slope.kernels as kernels
    from slope.lora import set_decode_kernel

    model, state, expected, x = _frozen("stacked")
    set_decode_kernel(model, "fused")
    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)  # Triton on CPU tensors (interpreter)
    reference = _model()
    reference.load_state_dict(state, strict=False)
    x_decode, x_prefill = torch.randn(3, 64), torch.randn(17, 64)
    with torch.no_grad():
        model(x_prefill), model(x_decode)
        a = model.fc1.lora_A
        a.mul_(2)
        reference.fc1.lora_A.mul_(2)
        torch.testing.assert_close(model(x_prefill), reference(x_prefill), rtol=1e-4, atol=1e-4)
        assert model.fc1._held is not None
        torch.testing.assert_close(model(x_decode), reference(x_decode), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", ["stacked", "extended"])
@pytest.mark.parametrize("write", ["lora_A.mul_", "lora_A.data.mul_", "mask_bits.copy_", "state_dict entry"])
def test_writes_into_derived_tensors_nobody_keeps_are_adopted(fold, write):
    """In-place writes the usual way, ``layer.lora_A.mul_(2)`` and the like, where nothing keeps the
    derived tensor (also through ``.data``, which moves no version, and into a state dict's entry
    before the next product): the next product and state dict have them."""
    model, state, expected, x = _frozen(fold)
    layer, new_mask = model.fc1, _random_2to4_mask(96, 64)
    new = {"fc1.lora_A": 2 * state["fc1.lora_A"]} if "lora_A" in write or write == "state_dict entry" else {"fc1.mask_bits": pack_mask(new_mask)}
    reference = _model()
    reference.load_state_dict({**state, **new}, strict=False)
    with torch.no_grad():
        model(x)
        if write == "lora_A.mul_":
            layer.lora_A.mul_(2)
        elif write == "lora_A.data.mul_":
            layer.lora_A.data.mul_(2)
        elif write == "mask_bits.copy_":
            layer.mask_bits.copy_(pack_mask(new_mask))
        else:
            model.state_dict()["fc1.lora_A"].mul_(2)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert layer._held is not None
    saved = model.state_dict()
    for key, value in new.items():
        assert torch.equal(saved[key], value), key


def test_assigning_or_registering_a_held_tensor_replaces_it():
    """``layer.lora_A = nn.Parameter(...)``, ``layer.mask_bits = ...`` and ``register_buffer`` of a
    held name give the held tensors back first: no KeyError ('attribute already exists'), no
    plain attribute beside the held one that the product and the state dict never see."""
    model, state, expected, x = _frozen("stacked")
    layer, new_mask = model.fc1, _random_2to4_mask(96, 64)
    reference = _model()
    reference.load_state_dict({**state, "fc1.lora_A": 2 * state["fc1.lora_A"], "fc1.mask_bits": pack_mask(new_mask)}, strict=False)
    with torch.no_grad():
        model(x)
        layer.lora_A = nn.Parameter(2 * state["fc1.lora_A"], requires_grad=False)
        model(x)
        assert layer._held is not None
        layer.mask_bits = pack_mask(new_mask)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        layer.register_buffer("lora_A_mask", state["fc1.lora_A_mask"].clone())
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert "mask_bits" not in layer.__dict__ and layer._held is not None
    saved = model.state_dict()
    assert torch.equal(saved["fc1.mask_bits"], pack_mask(new_mask)) and torch.equal(saved["fc1.lora_A"], 2 * state["fc1.lora_A"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton runs on CPU only under TRITON_INTERPRET=1")
def test_what_a_product_reads_of_held_tensors_is_not_kept_for_the_next(monkeypatch):
    """The fused decode reads the held ``M``, ``A`` and ``M_A`` to build its operands; those reads
    are the product's own, so the next product has nothing to check (no host syncs: a CUDA graph
    captures the decode step right after an eager one) and still equals the unmerged model."""
    import slope.kernels as kernels
    from slope.lora import set_decode_kernel

    model, state, expected, x = _frozen("stacked")
    set_decode_kernel(model, "fused")
    monkeypatch.setattr(kernels, "triton_usable", lambda *tensors: True)  # Triton on CPU tensors (interpreter)
    reference = _model()
    reference.load_state_dict(state, strict=False)
    x_decode = torch.randn(2, 64)
    with torch.no_grad():
        model(torch.randn(33, 64))  # prefill (more rows than the fused decode takes): builds and holds
        first = model(x_decode)  # builds the decode operands from the held tensors
        assert model.fc1._held is not None and not model.fc1._derived
        checks = []
        monkeypatch.setattr(type(model.fc1), "_read_operand", lambda *a, **k: checks.append(1) or {})
        torch.testing.assert_close(model(x_decode), first, rtol=0, atol=0)
        assert not checks
    torch.testing.assert_close(first, reference(x_decode), rtol=1e-4, atol=1e-4)


def test_a_partial_state_loads_into_a_merged_model_without_strict():
    """``load_state_dict(part, strict=False)`` with another layer's entries only (torch hands
    ``strict=True`` to every module's ``_load_from_state_dict``): loads; weights without adapters
    for a layer that has them stay an error."""
    model, state, expected, x = _frozen("stacked")
    other = _model(seed=1)
    part = {k: v for k, v in other.state_dict().items() if k.startswith("fc2.") and "mask_t" not in k}
    result = model.load_state_dict(part, strict=False)
    assert "fc1.values" in result.missing_keys
    with torch.no_grad():
        torch.testing.assert_close(model.fc2(torch.relu(model.fc1(x))), other.fc2(torch.relu(_frozen("stacked")[0].fc1(x))),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="the checkpoint has no adapters"):
        model.load_state_dict({"fc1.values": state["fc1.values"]}, strict=False)
