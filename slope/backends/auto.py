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

- every available sparse backend of :data:`slope.backends.AUTO_ORDER_CUDA`, except those that
  cannot win on this GPU generation (:data:`NEVER_WINS`: Triton's sparse GEMM on sm90+),
- with ``tiling=True`` also each of them wrapped in :class:`RowTiledBackend` when the weight is
  very non-square (``max(out, in) >= 2·min(out, in)``): a tall operand is split into near-square
  row blocks (a simple heuristic: ``round(rows / cols)`` blocks, heights rounded up to 64 rows),
- and the ``dense`` backend (masked dense operand through cuBLAS: same math).

For a training call (the layer's forward with gradients on, and every backward) the cost of a
candidate is the **whole cost**: its GEMM plus the operand rebuild that each optimizer step makes
it pay (divided by ``gemms_per_rebuild``). Backends that build operands from kept values
(``operand_structure``) pay nothing extra: the fused optimizer step writes their operands
(:func:`slope.kernels.adamw_step_operands_`; ``fused_rebuild=False`` times the cast / transpose
instead). Every other one — ``dense`` included — pays the scatter to a dense weight (transposed
for the backward operand) plus its ``make_operand``, timed. Inference calls count the GEMM alone.

It keeps a sparse choice only when it is cheaper than dense by ``margin`` (default 3 %, to stay
clear of timing noise), so ``auto`` is never slower than dense; among the sparse ones it prefers a
backend that builds operands from kept values over a cheaper one within the margin. Timing
happens only in a layer's first steps: after ``timed_steps`` optimizer steps of a layer (or
:meth:`AutoBackendChooser.freeze`) a new token bucket takes the nearest timed bucket's choice
(``dense`` for an operand never timed). Results are cached per
``(rows, cols, dtype, device, tiling, bucket)`` (plus direction for training calls) in the chooser object, which hands out one
instance per backend (buckets that chose the same backend share it, and a layer's cached operand
stays valid across them: layers keep one operand per direction, rebuilt when the backend
changes); the process-wide instance is
:data:`AUTO_CHOOSER`. Candidates that fail (an exception while building or multiplying) are
skipped and their error is kept in :meth:`AutoBackendChooser.report`, as are candidates whose
product on the timing inputs is wrong (:data:`PRODUCT_TOLERANCE`; e.g. a library kernel with a
bug for some shape): ``auto`` never picks a backend it has not seen multiply right.
"""
from __future__ import annotations

import math
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from slope import kernels
from slope.masks import nm_mask

from . import AUTO_ORDER_CUDA, backend_class
from .base import SparseBackend
from .dense import DenseBackend, RowTiledBackend
from .kept import operand_from_kept, operand_pattern

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
    """The chosen backend for one key, with every candidate's GEMM time, operand-rebuild time and
    whole cost (ms), errors, and the candidates dropped without timing (name -> why). ``timed`` is
    False for a choice made after the chooser froze (copied from the nearest timed bucket, or
    ``dense``), ``note`` says which."""

    backend: SparseBackend
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rebuild_ms: dict[str, float] = field(default_factory=dict)
    cost_ms: dict[str, float] = field(default_factory=dict)
    from_values: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)
    timed: bool = True
    note: str = ""


#: sparse backends that cannot win on a GPU generation: name -> (first compute capability it is
#: dropped at, why). Triton's sparse GEMM expands each tile in registers and multiplies on dense
#: tensor cores: 0.12-0.13x cuBLAS on every H100 shape measured (performance_experiments/README.md).
NEVER_WINS = {"triton": ((9, 0), "Triton's sparse GEMM runs on dense tensor cores: 0.12x cuBLAS measured on sm90")}


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


class AutoBackendChooser:
    """Times candidate backends per layer shape and caches the choice (see module docstring).

    ``timer(fn, device) -> ms`` is injectable (tests use a fake one); ``candidates`` defaults to
    :data:`slope.backends.AUTO_ORDER_CUDA`; ``capability(device) -> (major, minor)`` decides which
    of :data:`NEVER_WINS` are dropped (default: the CUDA device's). ``fused_rebuild``: the
    optimizer writes the operands of backends that build them from kept values
    (:func:`slope.kernels.adamw_step_operands_`), so their rebuild costs nothing extra; False
    times it. ``gemms_per_rebuild``: products per optimizer step and direction (micro-batches).
    ``timed_steps``: a layer asks with ``allow_timing=False`` once the optimizer stepped it that
    often (:attr:`slope.layer.SparseLinear.optimizer_steps`); such a call, or any call after
    :meth:`freeze`, gets for a key not timed yet the choice of its nearest timed token bucket (else
    ``dense``) without timing, so nothing is timed inside a training loop after its first steps.
    """

    def __init__(
        self,
        tokens: int = 8192,
        margin: float = 0.03,
        timer: Timer = cuda_event_timer,
        candidates: tuple[str, ...] = AUTO_ORDER_CUDA,
        small_buckets: tuple[int, ...] = tuple(2**k for k in range(4, 13)),  # 16 ... 4096
        capability: Callable[[torch.device], tuple[int, int]] | None = None,
        fused_rebuild: bool = True,
        gemms_per_rebuild: int = 1,
        timed_steps: int = 2,
    ):
        self.tokens, self.margin, self.timer, self.candidates = tokens, margin, timer, candidates
        self.capability = capability or _cuda_capability
        self.fused_rebuild, self.gemms_per_rebuild, self.timed_steps = fused_rebuild, gemms_per_rebuild, timed_steps
        #: the token counts choices are timed at, ascending; ``tokens`` is the largest.
        self.buckets = tuple(sorted({b for b in small_buckets if b < tokens} | {tokens}))
        self._cache: dict[tuple, AutoChoice] = {}
        self._instances: dict[tuple, SparseBackend] = {}
        self._lock = threading.Lock()
        self.frozen = False

    def bucket(self, tokens: int | None) -> int:
        """The token count a call with ``tokens`` rows is timed at: the smallest bucket that holds
        it (``None`` or more than every bucket: :attr:`tokens`)."""
        if tokens is None:
            return self.tokens
        return next((b for b in self.buckets if tokens <= b), self.tokens)

    def freeze(self) -> None:
        """Time nothing from now on, for any layer (e.g. before a timed benchmark region)."""
        self.frozen = True

    def clear(self) -> None:
        """Forget every cached choice (e.g. after changing ``tokens``) and time again."""
        with self._lock:
            self._cache.clear()
            self.frozen = False

    def report(self) -> dict[tuple, AutoChoice]:
        """A copy of the cache: ``((rows, cols), dtype, device, tiling, bucket) -> AutoChoice``
        (``direction`` and ``"training"`` appended to the key for those choices)."""
        with self._lock:
            return dict(self._cache)

    def choose(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, tiling: bool = True,
        tokens: int | None = None, *, direction: str = "forward", training: bool = False,
        allow_timing: bool = True, sparse_only: bool = False,
    ) -> SparseBackend:
        """The backend instance to use for an operand ``(rows, cols) = shape`` in ``dtype`` on
        ``device``, multiplied by ``tokens`` rows at a time (``None``: the largest bucket).
        ``training``: the operand is rebuilt after every optimizer step, and that rebuild counts
        (``direction`` "forward": the operand is ``W (rows, cols)``; "backward": ``(W⊙M⊙M_t)ᵀ``
        of ``W (cols, rows)``). ``allow_timing=False``: a key not timed yet is not timed now.
        ``sparse_only``: the fastest sparse candidate even when dense is faster (``dense`` only when
        none runs): for inference-only layers, whose dense operand would be a second, dense copy
        of the weights (docs/inference.md)."""
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        device = torch.device(device)
        key = (tuple(shape), dtype, device, bool(tiling), self.bucket(tokens))
        if training:
            key = (*key, direction, "training")
        if sparse_only:
            key = (*key, "sparse-only")
        with self._lock:
            if key not in self._cache:
                if self.frozen or not allow_timing:
                    self._cache[key] = self._untimed(key)
                else:
                    self._cache[key] = self._measure(tuple(shape), dtype, device, tiling, key[4], direction, training, sparse_only)
            return self._cache[key].backend

    def _instance(self, cls, tiling: bool, row_tiled: bool) -> SparseBackend:
        """One shared instance per (backend, tiling, row tiles)."""
        key = (cls, tiling, row_tiled)
        if key not in self._instances:
            backend = cls(tiling=tiling)
            self._instances[key] = RowTiledBackend(backend) if row_tiled else backend
        return self._instances[key]

    # ------------------------------------------------------------------ internals
    def _dropped_reason(self, name: str, device: torch.device) -> str | None:
        rule = NEVER_WINS.get(name)
        if rule is None or device.type != "cuda":
            return None
        first, why = rule
        capability = tuple(self.capability(device))
        return f"{why} (sm{capability[0]}{capability[1]})" if capability >= first else None

    def _candidates(self, shape, dtype, device, tiling, choice: AutoChoice) -> list[SparseBackend]:
        out: list[SparseBackend] = []
        for name in self.candidates:
            try:
                cls = backend_class(name)
                if cls.unavailable_reason(device, dtype) is not None:
                    continue
                dropped = self._dropped_reason(name, device)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot even say why is skipped
                choice.errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            if dropped is not None:
                choice.dropped[name] = dropped
                continue
            out.append(self._instance(cls, tiling, False))
            if tiling and max(shape) >= 2 * min(shape):
                out.append(self._instance(cls, tiling, True))
        return out

    def _measure(self, shape, dtype, device, tiling, tokens: int, direction: str, training: bool,
                 sparse_only: bool = False) -> AutoChoice:
        problem = _Problem(shape, dtype, device, tokens, direction)
        dense = self._instance(DenseBackend, tiling, False)
        choice = AutoChoice(backend=dense)
        tried = [dense, *self._candidates(shape, dtype, device, tiling, choice)]
        for backend in tried:
            try:
                run = problem.gemm(backend)
                problem.check(backend.name, run())  # a wrong product is a failure, however fast
                choice.times_ms[backend.name] = self.timer(run, device)
                rebuild, from_values = problem.rebuild(backend)
                if from_values:
                    choice.from_values.add(backend.name)
                rebuild_ms = 0.0
                if training and not (from_values and self.fused_rebuild):
                    rebuild_ms = self.timer(rebuild, device)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is skipped, not fatal
                if backend is dense:
                    raise
                choice.times_ms.pop(backend.name, None)
                choice.errors[backend.name] = f"{type(exc).__name__}: {exc}"
                continue
            choice.rebuild_ms[backend.name] = rebuild_ms
            choice.cost_ms[backend.name] = choice.times_ms[backend.name] + rebuild_ms / self.gemms_per_rebuild
        choice.backend = self._pick(choice, {b.name: b for b in tried}, sparse_only)
        return choice

    def _pick(self, choice: AutoChoice, instances: dict[str, SparseBackend], sparse_only: bool = False) -> SparseBackend:
        """The cheapest candidate by whole cost, if it beats dense by :attr:`margin` (``sparse_only``:
        whether or not); one building its operands from kept values is preferred to a cheaper one
        within the margin."""
        dense = instances["dense"]
        limit = math.inf if sparse_only else choice.cost_ms["dense"] * (1.0 - self.margin)
        eligible = {n: c for n, c in choice.cost_ms.items() if n != "dense" and c < limit}
        if not eligible:
            return dense
        best = min(eligible, key=eligible.get)
        preferred = [n for n in eligible if n in choice.from_values and eligible[n] <= eligible[best] * (1.0 + self.margin)]
        if best not in choice.from_values and preferred:
            best = min(preferred, key=eligible.get)
        return instances[best]

    def _untimed(self, key: tuple) -> AutoChoice:
        """After freezing: the choice of the nearest timed bucket of the same operand, else dense."""
        same = [(k, c) for k, c in self._cache.items() if c.timed and k[:4] == key[:4] and k[5:] == key[5:]]
        dense = self._instance(DenseBackend, key[3], False)
        if not same:
            return AutoChoice(backend=dense, timed=False, note="frozen: no timed bucket of this operand; dense")
        nearest_key, nearest = min(same, key=lambda kc: abs(math.log2(kc[0][4]) - math.log2(key[4])))
        return AutoChoice(backend=nearest.backend, timed=False, note=f"frozen: the choice timed at {nearest_key[4]} tokens")


class _Problem:
    """Random inputs for timing one operand's product and its rebuild after an optimizer step:
    the layer weight ``W`` (fp32 master values, kept along its input dimension), ``M``, ``M_t``."""

    def __init__(self, shape, dtype, device, tokens: int, direction: str):
        rows, cols = shape
        self.dtype, self.direction = dtype, direction
        out_f, in_f = (rows, cols) if direction == "forward" else (cols, rows)
        weight = torch.randn(out_f, in_f, device=device)
        self.mask = nm_mask(weight, 2, 4)
        self.values = kernels.gather_kept_2to4(weight, self.mask)
        self.mask_t = kernels.double_prune_mask_2to4(weight * self.mask, self.mask)
        operand = torch.randn(rows, cols, device=device, dtype=dtype)
        self.operand_mask = nm_mask(operand, 2, 4)
        self.operand = operand * self.operand_mask
        self.x = torch.randn(tokens, cols, device=device, dtype=dtype)
        self._expected: torch.Tensor | None = None  # x Aᵀ in fp32, for check

    def gemm(self, backend: SparseBackend) -> Callable[[], object]:
        op = backend.make_operand(self.operand, self.operand_mask)
        return lambda: backend.matmul(self.x, op)

    def check(self, name: str, product: torch.Tensor) -> None:
        """Raise unless ``product`` is ``x Aᵀ`` within :data:`PRODUCT_TOLERANCE` (relative
        Frobenius error against an fp32 product; catches kernels that give wrong or NaN results)."""
        if self._expected is None:
            self._expected = self.x.float() @ self.operand.float().t()
        error = float((product.float() - self._expected).norm() / self._expected.norm().clamp_min(1e-30))
        tolerance = PRODUCT_TOLERANCE.get(self.dtype, 1e-2)
        if not error <= tolerance:
            raise ArithmeticError(f"{name}: wrong product, relative error {error:.3g} against fp32 (tolerance {tolerance:g})")

    def rebuild(self, backend: SparseBackend) -> tuple[Callable[[], object], bool]:
        """What the layer runs to rebuild this operand after a step, and whether it is from kept values."""
        kept_mask = self.mask if self.direction == "forward" else self.mask_t
        structure = backend.operand_structure(operand_pattern(self.direction, kept_mask), self.dtype)
        return (lambda: operand_from_kept(backend, self.direction, self.values, self.mask, self.mask_t, self.dtype,
                                          structure)[0]), structure is not None


#: Largest relative error of a candidate's product (against fp32) that ``auto`` accepts, per
#: dtype: a few roundings of the output (fp32: TF32 products too). Wrong results are O(1).
PRODUCT_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-2}

#: the process-wide chooser used by :class:`slope.layer.SparseLinear` for ``backend="auto"`` on CUDA.
AUTO_CHOOSER = AutoBackendChooser()
