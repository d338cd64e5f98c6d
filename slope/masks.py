"""N:M sparsity masks: the pruning rules of SLoPe.

Every mask is a ``torch.bool`` tensor with the shape of the weight it masks, ``True`` = kept.
A weight ``W`` has shape ``(out, in)`` as in ``nn.Linear``.

- :func:`nm_mask` — ``M``: in every row, each group of ``m`` consecutive input columns keeps the
  ``n`` entries of largest ``|W|``.
- :func:`double_prune_mask` — ``M_t``: in every column of ``W ⊙ M``, each group of ``m``
  consecutive output rows keeps the ``n`` entries of largest ``|W ⊙ M|`` among those that ``M``
  keeps (``M_t ⊆ M``; a group with fewer than ``n`` kept entries keeps what it has).
- :func:`transposable_mask` — each ``m×m`` block keeps ``n`` per row *and* ``n`` per column,
  choosing the pattern of largest total magnitude (exhaustive over all such patterns).
- :func:`mask_from_scores` — the mask any pruning criterion needs (magnitude, Wanda, RigL's
  regrowth, SFT selection): the largest ``scores`` kept, either N:M within groups along the input
  dimension (:func:`nm_mask_from_scores`) or unstructured over the whole tensor (:func:`topk_mask`).
  :func:`parse_structure` reads the structure names of recipes (``"2:4"``, ``"0:0"``).

Ties are broken deterministically: among equal magnitudes the lower index wins.

Layers *store* their masks as packed bits (:func:`pack_mask`, 1/8 byte per weight) and unpack a
bool copy where one is needed (:func:`unpack_mask`).
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

__all__ = [
    "parse_sparsity",
    "parse_structure",
    "nm_mask",
    "nm_mask_from_scores",
    "topk_mask",
    "mask_from_scores",
    "double_prune_mask",
    "transposable_mask",
    "is_nm_sparse",
    "packed_is_nm_sparse",
    "packed_keeps_at_most_along_rows",
    "pack_mask",
    "unpack_mask",
    "MASK_TYPES",
]

MASK_TYPES = ("nm", "transposable")


def parse_sparsity(sparsity: str | tuple[int, int]) -> tuple[int, int]:
    """Parse ``"N:M"`` (or a ``(n, m)`` tuple) and validate ``0 < N < M``."""
    if isinstance(sparsity, str):
        parts = sparsity.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"sparsity must look like 'N:M' (e.g. '2:4'), got {sparsity!r}")
        n, m = int(parts[0]), int(parts[1])
    else:
        try:
            n, m = (int(v) for v in sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be 'N:M' or a pair (n, m), got {sparsity!r}") from None
    if not 0 < n < m:
        raise ValueError(
            f"sparsity {n}:{m} is not a sparsity pattern: N:M needs 0 < N < M "
            "(N kept out of every M); e.g. '2:4'"
        )
    return n, m


def parse_structure(structure: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """A mask structure: ``None``, ``"0:0"`` or ``"unstructured"`` -> ``None`` (unstructured);
    ``"N:M"`` or ``(n, m)`` -> ``(n, m)`` validated as in :func:`parse_sparsity`."""
    if structure is None or (isinstance(structure, str) and structure.strip().lower() in ("0:0", "unstructured")):
        return None
    return parse_sparsity(structure)


def _topn_along_last(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask, True for the ``n`` largest entries of each last-dim row (ties: lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask along the last (input) dimension of ``weight`` ``(..., in)`` by ``|W|``; ``in % m == 0``."""
    return nm_mask_from_scores(weight.detach().abs(), n, m)


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive entries along the last dim of ``scores (..., in)``, keep
    the ``n`` largest scores (ties: lower index); ``in % m == 0``."""
    if scores.dim() < 1 or scores.shape[-1] % m:
        raise ValueError(
            f"N:M pruning along the input dimension needs in_features divisible by M={m}; "
            f"got a weight of shape {tuple(scores.shape)}"
        )
    groups = scores.detach().reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    return _topn_along_last(groups, n).reshape(scores.shape)


def topk_mask(scores: torch.Tensor, sparsity: float | None = None, *, keep: int | None = None) -> torch.Tensor:
    """Unstructured: keep the ``round((1 - sparsity) · numel)`` largest ``scores`` of the whole
    tensor (ties: lower flat index); ``0 <= sparsity <= 1``. Or give the exact count ``keep``
    (``0 <= keep <= numel``) instead of ``sparsity``."""
    if (sparsity is None) == (keep is None):
        raise ValueError("topk_mask takes either sparsity or keep (a count of kept entries), not both or neither")
    if keep is None:
        if not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        keep = round((1.0 - float(sparsity)) * scores.numel())
    elif not 0 <= int(keep) <= scores.numel():
        raise ValueError(f"keep must be a count in [0, {scores.numel()}], got {keep!r}")
    return _topn_along_last(scores.detach().reshape(-1), int(keep)).reshape(scores.shape)


def mask_from_scores(
    scores: torch.Tensor, sparsity: float | None = None, structure: str | tuple[int, int] | None = None
) -> torch.Tensor:
    """The mask keeping the largest ``scores``: N:M along the last dim when ``structure`` is
    ``"N:M"`` (``sparsity`` must then be ``None`` or ``1 - N/M``), else unstructured at ``sparsity``."""
    nm = parse_structure(structure)
    if nm is None:
        if sparsity is None:
            raise ValueError("an unstructured mask needs a sparsity in [0, 1]")
        return topk_mask(scores, sparsity)
    n, m = nm
    if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
        raise ValueError(f"sparsity {sparsity} disagrees with the structure {n}:{m} (which prunes {1 - n / m:g})")
    return nm_mask_from_scores(scores, n, m)


def double_prune_mask(weight: torch.Tensor, mask: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """``M_t`` for a 2-D ``weight (out, in)`` and its forward mask ``M``: N:M along ``out``.

    Returned in ``weight``'s orientation; ``M_t ⊆ M``. Needs ``out % m == 0``.
    """
    out_features = weight.shape[0]
    if weight.dim() != 2 or out_features % m:
        raise ValueError(
            f"double pruning groups {m} consecutive output rows; out_features must be divisible "
            f"by {m}, got a weight of shape {tuple(weight.shape)}"
        )
    # Entries M already pruned score -1 so they are never preferred over a kept one (|w| >= 0).
    scores = torch.where(mask, weight.detach().abs().float(), torch.full_like(weight, -1.0, dtype=torch.float))
    cols_last = scores.t().reshape(weight.shape[1], out_features // m, m)
    keep_t = _topn_along_last(cols_last, n).reshape(weight.shape[1], out_features).t()
    return keep_t & mask


@functools.lru_cache(maxsize=None)
def _transposable_patterns(n: int, m: int) -> torch.Tensor:
    """All ``m×m`` bool patterns with exactly ``n`` per row and per column, as ``(P, m*m)``."""
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    patterns = []
    for choice in itertools.product(rows, repeat=m):
        block = torch.tensor(choice, dtype=torch.bool)
        if bool((block.sum(0) == n).all()):
            patterns.append(block.flatten())
    return torch.stack(patterns)


def transposable_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask whose every ``m×m`` block is N:M along rows and columns (best total ``|W|``).

    Only ``m <= 4`` is supported (the pattern count grows too fast beyond that).
    """
    if m > 4:
        raise ValueError(f"transposable masks support M <= 4, got {n}:{m}")
    out_features, in_features = weight.shape
    if out_features % m or in_features % m:
        raise ValueError(
            f"transposable {n}:{m} masks need both dimensions divisible by {m}; "
            f"got a weight of shape {tuple(weight.shape)}"
        )
    patterns = _transposable_patterns(n, m).to(weight.device)
    blocks = (
        weight.detach().abs().float()
        .reshape(out_features // m, m, in_features // m, m)
        .permute(0, 2, 1, 3)
        .reshape(-1, m * m)
    )
    best = (blocks @ patterns.float().t()).argmax(dim=1)  # argmax returns the first maximum
    chosen = patterns[best].reshape(out_features // m, in_features // m, m, m)
    return chosen.permute(0, 2, 1, 3).reshape(out_features, in_features).contiguous()


def is_nm_sparse(mask: torch.Tensor, n: int, m: int, dim: int = -1, exact: bool = False) -> bool:
    """True when every group of ``m`` along ``dim`` keeps at most (or, with ``exact``, exactly) ``n``."""
    moved = mask.movedim(dim, -1)
    if moved.shape[-1] % m:
        return False
    counts = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).sum(-1)
    return bool((counts == n).all()) if exact else bool((counts <= n).all())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bool`` tensor (any shape) -> ``uint8 (ceil(numel/8),)``: bit ``i`` of byte ``j`` is element
    ``8j + i`` of the flattened mask (padded with False to a whole byte)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask takes a bool mask, got {mask.dtype}")
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    # Each group of 8 bools read as one int64 holds entry i at bit 8i (little endian); three
    # shift-ors fold bit 8i down to bit i (entries 0-1, then 0-3, then 0-7), no carries.
    word = flat.view(torch.int64)
    word = word | (word >> 7)
    word = word | (word >> 14)
    word = word | (word >> 28)
    return (word & 0xFF).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``uint8 (ceil(numel/8),)`` -> a fresh ``bool`` tensor of
    ``shape`` (one table lookup per byte)."""
    numel = math.prod(shape)
    _check_packed(bits, shape)
    flat = _bit_table(bits.device).index_select(0, bits.to(torch.int32)).reshape(-1)
    return flat[:numel].reshape(shape)


def packed_is_nm_sparse(bits: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> bool:
    """:func:`is_nm_sparse` (``exact=True``, along the last dim) of the mask that ``bits`` (uint8,
    :func:`pack_mask` of a bool ``shape`` mask) hold. Where ``m`` divides 8 and the mask fills whole
    bytes, no group straddles a byte (rows are multiples of ``m`` long), so one lookup per byte in a
    256-entry table answers it (~20× faster than unpacking a 4096 × 11008 mask); else it unpacks."""
    if 8 % m or math.prod(shape) % 8 or shape[-1] % m:
        return is_nm_sparse(unpack_mask(bits, shape), n, m, exact=True)
    _check_packed(bits, shape)
    return bool(_exact_bytes(bits.device, n, m).index_select(0, bits.to(torch.int32)).all())


def packed_keeps_at_most_along_rows(bits: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> bool:
    """:func:`is_nm_sparse` ``(dim=0)`` (at most ``n`` of every ``m`` consecutive rows in each
    column) of the bool ``shape`` mask that ``bits`` (uint8, :func:`pack_mask`) hold. With whole-byte
    rows it counts on the packed bytes, 8 columns a byte: bit plane ``k`` marks columns with at least
    ``k`` of the group's rows so far, saturating at ``n + 1``; else it unpacks."""
    rows, cols = shape
    if cols % 8 or rows % m:
        return is_nm_sparse(unpack_mask(bits, shape), n, m, dim=0)
    _check_packed(bits, shape)
    groups = bits.view(rows // m, m, cols // 8)
    at_least = [torch.zeros_like(groups[:, 0]) for _ in range(n + 1)]  # plane k-1: ≥ k rows so far
    for r in range(m):
        row = groups[:, r]
        for k in range(n, 0, -1):
            at_least[k] |= at_least[k - 1] & row
        at_least[0] |= row
    return not bool(at_least[n].any())


def _check_packed(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    """A ``ValueError`` unless ``bits`` has the layout :func:`pack_mask` gives a bool ``shape`` mask."""
    nbytes = -(-math.prod(shape) // 8)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != nbytes:
        raise ValueError(f"packed mask of shape {tuple(shape)} must be uint8 ({nbytes},), got {bits.dtype} {tuple(bits.shape)}")


@functools.lru_cache(maxsize=None)
def _exact_bytes(device: torch.device, n: int, m: int) -> torch.Tensor:
    """``bool (256,)``: whether each group of ``m`` bits of byte ``b`` has exactly ``n`` set."""
    return _bit_table(device).view(256, 8 // m, m).sum(-1).eq(n).all(-1)


@functools.lru_cache(maxsize=None)
def _bit_table(device: torch.device) -> torch.Tensor:
    """``bool (256, 8)``: row ``b`` holds the bits of byte ``b``, lowest first (a constant per device)."""
    byte = torch.arange(256, dtype=torch.int32, device=device)
    return ((byte[:, None] >> torch.arange(8, dtype=torch.int32, device=device)) & 1).to(torch.bool)
