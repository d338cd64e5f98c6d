"""``backend="auto"`` on CUDA: pick, by measurement, the fastest way to run a layer's shape.

For an operand ``A (rows, cols)`` (2:4 along ``cols``) in ``dtype`` on a CUDA device,
:class:`AutoBackendChooser` times the product ``x (T, cols) @ Aᵀ``. ``T`` is the call's token
count rounded up to a bucket — a power of two from 16 to ``tokens`` (default 8192, the
benchmarks' count; larger calls use it too) — so decode-sized calls (a few tokens) and
training-sized ones each get their own choice (kernels that win at 8192 tokens can lose to cuBLAS
at 16), and a call is never timed at more than twice its own token count. A SLoPe layer
``W (out, in)`` asks for its forward operand ``W⊙M (out, in)`` and for its input-gradient
operand ``(W⊙M⊙M_t)ᵀ (in, out)`` separately, so each direction gets its own choice (a backend
fast for one shape can be slow for its transpose). Candidates are

- every available sparse backend of :data:`slope.backends.AUTO_ORDER_CUDA`,
- with ``tiling=True`` also each of them wrapped in :class:`RowTiledBackend` when the weight is
  very non-square (``max(out, in) >= 2·min(out, in)``): a tall operand is split into near-square
  row blocks (a simple heuristic: ``round(rows / cols)`` blocks, heights rounded up to 64 rows),
- and the ``dense`` backend (masked dense operand through cuBLAS: same math).

It keeps a sparse choice only when it is faster than dense by ``margin`` (default 3 %, to stay
clear of timing noise), so ``auto`` is never slower than dense. Results are cached per
``(rows, cols, dtype, device, tiling, bucket)`` in the chooser object, which hands out one
instance per backend (buckets that chose the same backend share it, and a layer's cached operand
stays valid across them: layers keep one operand per direction, rebuilt when the backend
changes); the process-wide instance is
:data:`AUTO_CHOOSER`. Candidates that fail (an exception while building or multiplying) are
skipped and their error is kept in :meth:`AutoBackendChooser.report`.
"""
from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from slope.masks import nm_mask

from . import AUTO_ORDER_CUDA, backend_class
from .base import SparseBackend
from .dense import DenseBackend, RowTiledBackend

__all__ = ["AutoChoice", "AutoBackendChooser", "AUTO_CHOOSER", "cuda_event_timer"]

Timer = Callable[[Callable[[], object], torch.device], float]


def cuda_event_timer(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 15) -> float:
    """Median milliseconds of one ``fn()`` call on ``device``'s current stream (CUDA events per call:
    the median is robust to a stray slow call, which a mean over the batch is not)."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


@dataclass
class AutoChoice:
    """The chosen backend for one key, with every candidate's time (ms) or error."""

    backend: SparseBackend
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class AutoBackendChooser:
    """Times candidate backends per layer shape and caches the choice (see module docstring).

    ``timer(fn, device) -> ms`` is injectable (tests use a fake one); ``candidates`` defaults to
    :data:`slope.backends.AUTO_ORDER_CUDA`.
    """

    def __init__(
        self,
        tokens: int = 8192,
        margin: float = 0.03,
        timer: Timer = cuda_event_timer,
        candidates: tuple[str, ...] = AUTO_ORDER_CUDA,
        small_buckets: tuple[int, ...] = tuple(2**k for k in range(4, 13)),  # 16 ... 4096
    ):
        self.tokens, self.margin, self.timer, self.candidates = tokens, margin, timer, candidates
        #: the token counts choices are timed at, ascending; ``tokens`` is the largest.
        self.buckets = tuple(sorted({b for b in small_buckets if b < tokens} | {tokens}))
        self._cache: dict[tuple, AutoChoice] = {}
        self._instances: dict[tuple, SparseBackend] = {}
        self._lock = threading.Lock()

    def bucket(self, tokens: int | None) -> int:
        """The token count a call with ``tokens`` rows is timed at: the smallest bucket that holds
        it (``None`` or more than every bucket: :attr:`tokens`)."""
        if tokens is None:
            return self.tokens
        return next((b for b in self.buckets if tokens <= b), self.tokens)

    def clear(self) -> None:
        """Forget every cached choice (e.g. after changing ``tokens``)."""
        with self._lock:
            self._cache.clear()

    def report(self) -> dict[tuple, AutoChoice]:
        """A copy of the cache: ``((rows, cols), dtype, device, tiling, bucket) -> AutoChoice``."""
        with self._lock:
            return dict(self._cache)

    def choose(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, tiling: bool = True,
        tokens: int | None = None,
    ) -> SparseBackend:
        """The backend instance to use for an operand ``(rows, cols) = shape`` in ``dtype`` on
        ``device``, multiplied by ``tokens`` rows at a time (``None``: the largest bucket)."""
        device = torch.device(device)
        key = (tuple(shape), dtype, device, bool(tiling), self.bucket(tokens))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._measure(tuple(shape), dtype, device, tiling, key[-1])
            return self._cache[key].backend

    def _instance(self, cls, tiling: bool, row_tiled: bool) -> SparseBackend:
        """One shared instance per (backend, tiling, row tiles)."""
        key = (cls, tiling, row_tiled)
        if key not in self._instances:
            backend = cls(tiling=tiling)
            self._instances[key] = RowTiledBackend(backend) if row_tiled else backend
        return self._instances[key]

    # ------------------------------------------------------------------ internals
    def _candidates(self, shape, dtype, device, tiling, errors: dict[str, str]) -> list[SparseBackend]:
        out: list[SparseBackend] = []
        for name in self.candidates:
            try:
                cls = backend_class(name)
                if cls.unavailable_reason(device, dtype) is not None:
                    continue
            except Exception as exc:  # noqa: BLE001 - a backend that cannot even say why is skipped
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            out.append(self._instance(cls, tiling, False))
            if tiling and max(shape) >= 2 * min(shape):
                out.append(self._instance(cls, tiling, True))
        return out

    def _measure(self, shape, dtype, device, tiling, tokens: int) -> AutoChoice:
        rows, cols = shape
        weight = torch.randn(rows, cols, device=device, dtype=dtype)
        mask = nm_mask(weight, 2, 4)
        operand_dense = weight * mask
        x = torch.randn(tokens, cols, device=device, dtype=dtype)

        def step_time(backend: SparseBackend) -> float:
            op = backend.make_operand(operand_dense, mask)
            return self.timer(lambda: backend.matmul(x, op), device)

        dense = self._instance(DenseBackend, tiling, False)
        choice = AutoChoice(backend=dense, times_ms={"dense": step_time(dense)})
        best = choice.times_ms["dense"] * (1.0 - self.margin)
        for backend in self._candidates(shape, dtype, device, tiling, choice.errors):
            try:
                t = step_time(backend)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is skipped, not fatal
                choice.errors[backend.name] = f"{type(exc).__name__}: {exc}"
                continue
            choice.times_ms[backend.name] = t
            if t < best:
                best, choice.backend = t, backend
        return choice


#: the process-wide chooser used by :class:`slope.layer.SparseLinear` for ``backend="auto"`` on CUDA.
AUTO_CHOOSER = AutoBackendChooser()
