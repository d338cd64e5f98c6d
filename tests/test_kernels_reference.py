"""``slope.kernels`` reference kernels: compressed 2:4 format (bit-identical with PyTorch's CUTLASS
layout for fp16/bf16/int8), plain layout round trips, pruning, addmm, matvec_add, clear errors."""
import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from slope.kernels import (
    addmm,
    compress_2to4,
    cutlass_layout_supported,
    decompress_2to4,
    matvec_add,
    metadata_dtype,
    prune_2to4,
)
from slope.masks import is_nm_sparse, nm_mask


def _sparse_input(rows, cols, dtype, drop=0.3):
    """A 2:4-sparse ``(rows, cols)`` where some groups keep fewer than two nonzeros."""
    if dtype == torch.int8:
        dense = torch.randint(-127, 128, (rows, cols), dtype=torch.int16).clamp(-127, 127)
        dense = torch.where(dense == 0, torch.ones_like(dense), dense).to(torch.int8)
    else:
        dense = torch.randn(rows, cols).to(dtype)
    pruned = torch.where(nm_mask(dense.float(), 2, 4), dense, torch.zeros_like(dense))
    extra = torch.rand(rows, cols) < drop
    extra[0, :8] = True  # at least two fully empty groups
    extra[1, 0:4] = torch.tensor([False, True, True, True])  # pattern with one kept entry
    return torch.where(extra, torch.zeros_like(pruned), pruned)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


CUTLASS_CASES = [
    (torch.float16, 32, 32),
    (torch.float16, 64, 96),
    (torch.bfloat16, 32, 64),
    (torch.bfloat16, 96, 128),
    (torch.int8, 16, 64),
    (torch.int8, 48, 192),
]


@pytest.mark.parametrize("dtype,rows,cols", CUTLASS_CASES)
def test_compress_matches_pytorch_cutlass_layout(dtype, rows, cols):
    dense = _sparse_input(rows, cols, dtype)
    values, meta = compress_2to4(dense)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert values.dtype == dtype and values.shape == (rows, cols // 2)
    assert meta.dtype == ref_meta.dtype == metadata_dtype(rows, cols, dtype)
    assert torch.equal(_bits(values), _bits(ref_values))
    assert torch.equal(meta, ref_meta)
    # Both decompressors agree and give back the input.
    assert torch.equal(_bits(decompress_2to4(values, meta)), _bits(dense))
    assert torch.equal(_bits(sparse_semi_structured_to_dense_cutlass(values, meta)), _bits(dense))


@pytest.mark.parametrize("dtype,rows,cols", CUTLASS_CASES[:4])
def test_decompress_reads_pytorch_cutlass_output(dtype, rows, cols):
    dense = _sparse_input(rows, cols, dtype, drop=0.6)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(_bits(decompress_2to4(ref_values, ref_meta)), _bits(dense))


@pytest.mark.parametrize(
    "dtype,rows,cols",
    [
        (torch.float32, 32, 32),  # fp32 always uses the plain layout
        (torch.float32, 3, 8),
        (torch.float32, 5, 12),
        (torch.float16, 8, 20),  # too small for CUTLASS
        (torch.bfloat16, 7, 36),
        (torch.int8, 16, 32),  # int8 CUTLASS needs cols % 64
    ],
)
def test_plain_layout_round_trip(dtype, rows, cols):
    dense = _sparse_input(rows, cols, dtype)
    assert not cutlass_layout_supported(rows, cols, dtype)
    values, meta = compress_2to4(dense)
    assert meta.dtype == torch.uint8 and meta.shape == (rows, cols // 4)
    assert values.shape == (rows, cols // 2)
    assert torch.equal(decompress_2to4(values, meta), dense)


def test_plain_layout_on_request_and_explicit_mask():
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    mask = nm_mask(w.float(), 2, 4)
    values, meta = compress_2to4(w, mask, layout="plain")  # w is dense: the mask decides
    assert meta.dtype == torch.uint8
    assert torch.equal(decompress_2to4(values, meta), torch.where(mask, w, torch.zeros_like(w)))
    assert torch.equal(values, w.masked_select(mask).view(32, 32))  # kept values in row order
    cut_values, cut_meta = compress_2to4(w, mask, layout="cutlass")
    assert torch.equal(cut_values, values) and cut_meta.dtype == torch.int16


def test_prune_2to4():
    x = torch.randn(6, 16)
    pruned, mask = prune_2to4(x)
    assert torch.equal(mask, nm_mask(x, 2, 4))
    assert torch.equal(pruned, x * mask) and (pruned[~mask] == 0).all()
    assert is_nm_sparse(pruned != 0, 2, 4)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: compress_2to4(torch.randn(32, 32, dtype=torch.float16)), ValueError, "not 2:4 sparse"),
        (lambda: compress_2to4(torch.zeros(8, 8, dtype=torch.float64)), TypeError, "float64"),
        (lambda: compress_2to4(torch.zeros(8, 8), layout="dense"), ValueError, "layout"),
        (lambda: compress_2to4(torch.zeros(8, 8, dtype=torch.float16), layout="cutlass"), ValueError, "CUTLASS"),
        (lambda: compress_2to4(torch.zeros(8, 6)), ValueError, "divisible by 4"),
        (lambda: compress_2to4(torch.zeros(8)), ValueError, "2-D"),
        (lambda: compress_2to4(torch.zeros(8, 8), torch.zeros(8, 8)), ValueError, "bool"),
        (lambda: decompress_2to4(torch.zeros(8, 4), torch.zeros(8, 3, dtype=torch.uint8)), ValueError, "shape"),
        (lambda: decompress_2to4(torch.zeros(8, 4), torch.zeros(8, 2, dtype=torch.float32)), ValueError, "dtype"),
        (lambda: decompress_2to4(torch.zeros(32, 16), torch.zeros(32, 3, dtype=torch.int16)), ValueError, "shape"),
    ],
)
def test_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_addmm_and_matvec_add():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    c = torch.randn(5, 3)
    expected = c + 0.5 * (a @ b)
    out = addmm(a, b, c, alpha=0.5)
    assert out is c and torch.allclose(c, expected, atol=1e-6)
    with pytest.raises(ValueError, match="addmm"):
        addmm(a, b, torch.zeros(5, 4))

    base = torch.randn(4, 10)
    view = base[:, ::2]  # strided
    vec = torch.randn(5)
    expected = view + vec
    assert matvec_add(view, vec) is view
    assert torch.equal(base[:, ::2], expected)
    with pytest.raises(ValueError, match="matvec_add"):
        matvec_add(view, torch.randn(4))


# ------------------------------------------------------------------ kept-value movement (2:4)
def _masks(rows, cols, seed=0):
    """``W``, ``M`` (2:4 along cols) and ``M_t`` (double-pruned: at most 2:4 along rows, ⊆ M)."""
    from slope.masks import double_prune_mask

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    mask = nm_mask(w, 2, 4)
    return w, mask, double_prune_mask(w * mask, mask, 2, 4)


def test_stored_mask_completes_groups_like_compress():
    from slope.kernels import stored_mask_2to4

    dense = _sparse_input(32, 64, torch.float32)  # groups keeping 0, 1 and 2 entries
    mask = dense != 0
    stored = stored_mask_2to4(mask)
    assert stored.dtype == torch.bool and bool((stored | ~mask).all())  # ⊇ mask
    assert bool((stored.reshape(32, 16, 4).sum(-1) == 2).all())
    assert bool((stored != mask).any())  # some groups were completed
    # the stored positions are exactly those compress_2to4 writes values for
    codes = compress_2to4(dense, layout="plain")[1].long()
    from_codes = torch.zeros(32, 16, 4, dtype=torch.bool)
    from_codes.scatter_(-1, torch.stack((codes & 3, codes >> 2), -1), True)
    assert torch.equal(stored, from_codes.reshape(32, 64))
    with pytest.raises(ValueError, match="at most 2"):
        stored_mask_2to4(torch.ones(4, 8, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kept_2to4_matches_masked_select(dtype):
    from slope.kernels import gather_kept_2to4

    full, mask, _ = _masks(24, 40, seed=1)
    full = torch.randn(24, 40).to(dtype)
    kept = gather_kept_2to4(full, mask)
    assert kept.dtype == dtype and torch.equal(kept, full.masked_select(mask).reshape(24, 20))
    out = torch.randn(24, 20)
    expected = out + kept.float()
    assert gather_kept_2to4(full, mask, out=out) is out and torch.equal(out, expected)
    # any strides
    assert torch.equal(gather_kept_2to4(full.t().contiguous().t(), mask), kept)


def test_scatter_kept_2to4_inverts_gather():
    from slope.kernels import gather_kept_2to4, scatter_kept_2to4

    w, mask, _ = _masks(20, 36, seed=3)
    values = gather_kept_2to4(w, mask)
    dense = scatter_kept_2to4(values, mask)
    assert torch.equal(dense, w * mask) and torch.equal(gather_kept_2to4(dense, mask), values)
    assert torch.equal(scatter_kept_2to4(values, mask, torch.bfloat16), (w * mask).bfloat16())
    three = mask.clone()
    three[0, :4] = True
    with pytest.raises(ValueError, match="exactly 2"):
        scatter_kept_2to4(values, three)


def test_gather_kept_2to4_errors():
    from slope.kernels import gather_kept_2to4

    full, mask, _ = _masks(8, 16)
    three = mask.clone()
    three[0, :4] = True
    with pytest.raises(ValueError, match="exactly 2"):
        gather_kept_2to4(full, three)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        gather_kept_2to4(full, mask.float())
    with pytest.raises(ValueError, match="out must be"):
        gather_kept_2to4(full, mask, out=torch.zeros(8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        gather_kept_2to4(torch.randn(8, 6), torch.ones(8, 6, dtype=torch.bool))


@pytest.mark.parametrize("rows,cols", [(48, 64), (36, 20), (4, 4)])
def test_transpose_kept_2to4_is_the_backward_operand(rows, cols):
    from slope.kernels import gather_kept_2to4, stored_mask_2to4, transpose_kept_2to4

    w, mask, mask_t = _masks(rows, cols, seed=rows)
    values = gather_kept_2to4(w, mask)
    got = transpose_kept_2to4(values, mask, mask_t)
    assert got.shape == (cols, rows // 2) and got.dtype == torch.float32
    backward_t = (w * mask * mask_t).t().contiguous()  # (W ⊙ M ⊙ M_t)ᵀ, 2:4 at most along rows
    stored = stored_mask_2to4(mask_t.t().contiguous())
    assert torch.equal(got, backward_t.masked_select(stored).reshape(cols, rows // 2))
    # with the metadata of the stored pattern it decompresses to the backward operand
    meta = compress_2to4(stored.float(), stored, layout="plain")[1]
    assert torch.equal(decompress_2to4(got, meta), backward_t)
    assert torch.equal(transpose_kept_2to4(values, mask, mask_t, torch.bfloat16), got.bfloat16())
    dense = transpose_kept_2to4(values, mask, mask_t, torch.bfloat16, dense=True)
    assert dense.is_contiguous() and torch.equal(dense, backward_t.bfloat16())


def test_kept_value_references_take_packed_masks():
    from slope.kernels import double_prune_mask_2to4, gather_kept_2to4, scatter_kept_2to4, transpose_kept_2to4
    from slope.masks import pack_mask

    w, mask, mask_t = _masks(36, 20, seed=3)
    bits, bits_t = pack_mask(mask), pack_mask(mask_t)
    values = gather_kept_2to4(w, mask)
    assert torch.equal(gather_kept_2to4(w, bits), values)
    assert torch.equal(scatter_kept_2to4(values, bits), w * mask)
    assert torch.equal(transpose_kept_2to4(values, bits, bits_t), transpose_kept_2to4(values, mask, mask_t))
    assert torch.equal(transpose_kept_2to4(values, mask, bits_t, dense=True), (w * mask * mask_t).t())
    assert torch.equal(double_prune_mask_2to4(w * mask, bits), mask_t)
    with pytest.raises(ValueError, match=r"packed bits, uint8 \(90,\)"):
        gather_kept_2to4(w, bits[:-1])


def test_transpose_kept_2to4_errors():
    from slope.kernels import transpose_kept_2to4

    w, mask, mask_t = _masks(8, 16)
    values = w.masked_select(mask).reshape(8, 8)
    with pytest.raises(ValueError, match="at most 2"):
        transpose_kept_2to4(values, mask, mask)  # M is 2:4 along cols, not along rows
    with pytest.raises(ValueError, match="mask_t must be a bool tensor of shape"):
        transpose_kept_2to4(values, mask, mask_t[:4])
    with pytest.raises(ValueError, match="divisible by 4"):
        transpose_kept_2to4(torch.randn(6, 8), torch.ones(6, 16, dtype=torch.bool), torch.ones(6, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------- AdamW step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_step_matches_torch_adamw(dtype):
    """Three steps of the reference against torch.optim.AdamW on an fp32 copy; a bf16 parameter
    is the fp32 result rounded once per step (moments stay fp32)."""
    from slope.kernels import adamw_step_

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(257, generator=gen)
    ours = start.to(dtype).clone()
    master = ours.float().clone().requires_grad_()
    torch_opt = torch.optim.AdamW([master], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    m, v = torch.zeros(257), torch.zeros(257)
    for step in range(1, 4):
        grad = torch.randn(257, generator=gen).to(dtype)
        assert adamw_step_(ours, grad, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step) is ours
        master.grad = grad.float()
        torch_opt.step()
        with torch.no_grad():
            master.copy_(master.to(dtype).float())  # the bf16 parameter is what the next step starts from
        torch.testing.assert_close(ours.float(), master.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, torch_opt.state[master]["exp_avg"], rtol=1e-6, atol=1e-8)


def test_adamw_step_errors():
    from slope.kernels import adamw_step_

    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="one shape"):
        adamw_step_(torch.zeros(4), torch.zeros(5), torch.zeros(4), torch.zeros(4), **kw)
    with pytest.raises(TypeError, match="moments must be float32"):
        adamw_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), **kw)
