"""Property tests (hypothesis) for every mask kind of ``slope.masks``."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slope.masks import (
    double_prune_mask,
    is_nm_sparse,
    nm_mask,
    pack_mask,
    packed_is_nm_sparse,
    packed_keeps_at_most_along_rows,
    parse_sparsity,
    transposable_mask,
    unpack_mask,
)

FAST = settings(max_examples=60, deadline=None)


@st.composite
def nm_pairs(draw, max_m=8):
    m = draw(st.integers(2, max_m))
    n = draw(st.integers(1, m - 1))
    return n, m


def _weight(seed: int, shape, ties: bool) -> torch.Tensor:
    """Random weight; with ``ties`` small integers so that equal magnitudes are common."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g)


@FAST
@given(nm=nm_pairs(), rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 2**31), ties=st.booleans())
def test_nm_mask_keeps_exactly_n_largest_per_group(nm, rows, groups, seed, ties):
    n, m = nm
    w = _weight(seed, (rows, groups * m), ties)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    g_mask = mask.reshape(rows, groups, m)
    g_abs = w.abs().reshape(rows, groups, m)
    assert (g_mask.sum(-1) == n).all()
    kept_min = torch.where(g_mask, g_abs, torch.inf).amin(-1)
    dropped_max = torch.where(g_mask, -torch.inf, g_abs).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert is_nm_sparse(mask, n, m, exact=True)


def test_nm_mask_ties_prefer_lower_index_and_batched_shapes():
    w = torch.ones(2, 3, 8)
    mask = nm_mask(w, 2, 4)
    assert mask.shape == w.shape
    assert mask.reshape(-1, 4).eq(torch.tensor([True, True, False, False])).all()


def test_nm_mask_rejects_non_divisible_input_dim():
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.randn(4, 6), 2, 4)


@st.composite
def weight_and_mask(draw):
    n, m = draw(nm_pairs())
    out = m * draw(st.integers(1, 4))
    cols = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    w = _weight(seed, (out, cols), draw(st.booleans()))
    if draw(st.booleans()):  # an arbitrary mask: column groups may keep fewer than n
        g = torch.Generator().manual_seed(seed + 1)
        mask = torch.rand(out, cols, generator=g) < draw(st.floats(0.0, 1.0))
    elif cols % m == 0:  # the real use: M is N:M along the input dimension
        mask = nm_mask(w, n, m)
    else:
        mask = torch.ones(out, cols, dtype=torch.bool)
    return w, mask, n, m


@FAST
@given(data=weight_and_mask())
def test_double_prune_mask_properties(data):
    w, mask, n, m = data
    out, cols = w.shape
    mask_t = double_prune_mask(w, mask, n, m)
    assert mask_t.dtype == torch.bool and mask_t.shape == w.shape
    assert not (mask_t & ~mask).any(), "M_t must be a subset of M"
    # Group m consecutive rows of every column: (cols, out/m, m).
    gt = mask_t.t().reshape(cols, out // m, m)
    gm = mask.t().reshape(cols, out // m, m)
    ga = w.abs().t().reshape(cols, out // m, m)
    # A group keeps min(n, what M keeps there): exactly n where M has >= n, else all it has.
    assert torch.equal(gt.sum(-1), gm.sum(-1).clamp(max=n))
    # The kept ones are the largest among M's kept.
    kept_min = torch.where(gt, ga, torch.inf).amin(-1)
    dropped_max = torch.where(gm & ~gt, ga, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_double_prune_mask_uses_magnitude_of_masked_weight():
    # Column of 4 rows: the largest |w| is pruned by M, so M_t must pick among the others.
    w = torch.tensor([[100.0], [-3.0], [2.0], [1.0]])
    mask = torch.tensor([[False], [True], [True], [True]])
    mask_t = double_prune_mask(w, mask, 2, 4)
    assert mask_t.squeeze(1).tolist() == [False, True, True, False]


def test_double_prune_mask_rejects_non_divisible_out_dim():
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        double_prune_mask(w, nm_mask(w, 2, 4), 2, 4)


@functools.lru_cache(maxsize=None)
def _feasible_patterns(n: int, m: int) -> torch.Tensor:
    """Every m×m 0/1 matrix with n ones per row and per column, found by enumerating all 2^(m·m)."""
    bits = (torch.arange(2 ** (m * m)).unsqueeze(1) >> torch.arange(m * m)) & 1
    bits = bits.float().reshape(-1, m, m)
    ok = (bits.sum(1) == n).all(-1) & (bits.sum(2) == n).all(-1)
    return bits[ok]


def _brute_force_best(block_abs: torch.Tensor, n: int) -> float:
    """Best total |w| of an m×m block over all feasible patterns."""
    return float((_feasible_patterns(n, block_abs.shape[0]) * block_abs).sum((1, 2)).max())


@settings(max_examples=25, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4)]),
    blocks=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
)
def test_transposable_mask_is_nm_both_ways_and_optimal(nm, blocks, seed, ties):
    n, m = nm
    w = _weight(seed, (blocks[0] * m, blocks[1] * m), ties)
    mask = transposable_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert is_nm_sparse(mask, n, m, dim=1, exact=True)
    assert is_nm_sparse(mask, n, m, dim=0, exact=True)
    for bi in range(blocks[0]):
        for bj in range(blocks[1]):
            sl = (slice(bi * m, (bi + 1) * m), slice(bj * m, (bj + 1) * m))
            chosen = float((w.abs()[sl] * mask[sl]).sum())
            assert chosen == pytest.approx(_brute_force_best(w.abs()[sl], n), rel=1e-5, abs=1e-6)


def test_transposable_mask_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        transposable_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="M <= 4"):
        transposable_mask(torch.randn(8, 8), 2, 8)


def test_is_nm_sparse():
    mask = nm_mask(torch.randn(4, 8), 2, 4)
    assert is_nm_sparse(mask, 2, 4) and is_nm_sparse(mask, 2, 4, exact=True)
    assert not is_nm_sparse(mask, 1, 4)
    assert not is_nm_sparse(torch.ones(4, 8, dtype=torch.bool), 2, 4)
    assert not is_nm_sparse(torch.ones(4, 6, dtype=torch.bool), 2, 4)  # not divisible
    assert is_nm_sparse(torch.zeros(4, 8, dtype=torch.bool), 2, 4) and not is_nm_sparse(
        torch.zeros(4, 8, dtype=torch.bool), 2, 4, exact=True
    )


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("1:8", (1, 8)), (" 4 : 8 ", (4, 8)), ((2, 8), (2, 8))])
def test_parse_sparsity(text, expected):
    assert parse_sparsity(text) == expected


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b", "2:4:8", "", (3, 2), "2"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(ValueError, match="N:M"):
        parse_sparsity(bad)


@pytest.mark.parametrize("shape", [(4, 16), (3, 3), (8, 12), (5,), (0, 4)])
def test_pack_unpack_mask_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (-(-mask.numel() // 8),)
    # bit i of byte j is element 8j + i of the flattened mask
    flat = mask.reshape(-1)
    for j in range(bits.numel()):
        expected = sum(1 << i for i in range(8) if 8 * j + i < flat.numel() and flat[8 * j + i])
        assert int(bits[j]) == expected
    assert torch.equal(unpack_mask(bits, shape), mask)


def test_pack_unpack_mask_reject_bad_input():
    with pytest.raises(TypeError, match="bool"):
        pack_mask(torch.ones(8))
    with pytest.raises(ValueError, match=r"uint8 \(2,\)"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(torch.zeros(2, dtype=torch.int32), (4, 4))


def test_pack_mask_every_byte_pattern_and_offset_views():
    import itertools

    patterns = torch.tensor(list(itertools.product([False, True], repeat=8)))  # (256, 8)
    expected = (patterns.long() * (1 << torch.arange(8))).sum(-1).to(torch.uint8)
    assert torch.equal(pack_mask(patterns), expected)
    # views whose storage does not start on an 8-byte boundary, and non-contiguous ones
    base = torch.rand(9, 24) > 0.5
    for view in (base[1:], base.reshape(-1)[3:195], base[:, 4:], base.t()):
        assert torch.equal(unpack_mask(pack_mask(view), view.shape), view)


@pytest.mark.parametrize("n,m,shape", [(2, 4, (16, 64)), (1, 4, (8, 32)), (4, 8, (8, 64)), (1, 2, (4, 16)),
                                       (2, 4, (3, 4)), (2, 6, (4, 12)), (8, 16, (4, 32))])
def test_packed_is_nm_sparse_matches_the_unpacked_check(n, m, shape):
    """The byte-table check on packed bits (or, for groups that straddle bytes / a part-filled last
    byte, the unpacked one) answers as is_nm_sparse(exact=True) of the mask itself, on exact N:M
    masks, masks with one group one entry off, and random masks."""
    torch.manual_seed(n * 100 + m)
    for trial in range(20):
        mask = nm_mask(torch.randn(shape), n, m)
        if trial % 3 == 1:  # flip one entry: that group keeps n ± 1
            flat = mask.view(-1)
            i = int(torch.randint(flat.numel(), ()))
            flat[i] = ~flat[i]
        elif trial % 3 == 2:
            mask = torch.rand(shape) < n / m
        expected = is_nm_sparse(mask, n, m, exact=True)
        assert packed_is_nm_sparse(pack_mask(mask), shape, n, m) == expected, (trial, expected)
        if trial % 3 == 0:
            assert expected
        if trial % 3 == 1:
            assert not expected


@pytest.mark.parametrize("n,m,shape", [(2, 4, (16, 64)), (1, 4, (8, 32)), (4, 8, (16, 16)), (2, 4, (8, 12))])
def test_packed_keeps_at_most_along_rows_matches_the_unpacked_check(n, m, shape):
    """The bit-plane count on packed rows (or the unpacked check where rows do not fill whole
    bytes) answers as is_nm_sparse(dim=0): on double-pruned masks (M_t), on them with one more
    entry set in a full column group, and on random masks."""
    torch.manual_seed(n * 100 + m + shape[1])
    for trial in range(20):
        w = torch.randn(shape)
        mask = double_prune_mask(w, nm_mask(w, n, m), n, m)
        if trial % 3 == 1:  # one more kept entry in a column group that already keeps n
            counts = mask.view(shape[0] // m, m, shape[1]).sum(1)
            g, c = [int(i) for i in (counts == n).nonzero()[0]]
            r = int((~mask[g * m:(g + 1) * m, c]).nonzero()[0])
            mask[g * m + r, c] = True
        elif trial % 3 == 2:
            mask = torch.rand(shape) < 0.5
        expected = is_nm_sparse(mask, n, m, dim=0)
        assert packed_keeps_at_most_along_rows(pack_mask(mask), shape, n, m) == expected, (trial, expected)
        if trial % 3 == 0:
            assert expected
        if trial % 3 == 1:
            assert not expected
