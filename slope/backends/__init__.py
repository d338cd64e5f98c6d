"""Backend registry: names → :class:`SparseBackend` classes, and the ``"auto"`` choice.

GPU backends register themselves from their own modules (imported lazily here) so that a CPU
machine never imports CUDA-only code paths.
"""
from __future__ import annotations

import importlib

import torch

from .base import SparseBackend
from .reference import ReferenceBackend, SimulatedBackend

__all__ = ["SparseBackend", "BACKEND_NAMES", "backend_class", "resolve_backend", "register_backend"]

_REGISTRY: dict[str, type[SparseBackend]] = {
    SimulatedBackend.name: SimulatedBackend,
    ReferenceBackend.name: ReferenceBackend,
}
# Backends living in modules that are imported on first use: name -> module.
_LAZY = {
    "cusparselt": "slope.backends.torch_semi_structured",
    "cutlass": "slope.backends.torch_semi_structured",
    "triton": "slope.backends.triton",
    "cutlass-sm90": "slope.backends.cutlass_sm90",
    "dense": "slope.backends.dense",
}
#: every name ``prune_model(backend=...)`` accepts (besides "auto").
BACKEND_NAMES = ("reference", "cusparselt", "cutlass", "cutlass-sm90", "triton", "dense")
#: ``auto`` tries these in order on CUDA (the first available wins).
AUTO_ORDER_CUDA = ("cutlass-sm90", "cusparselt", "cutlass", "triton")


def register_backend(cls: type[SparseBackend]) -> type[SparseBackend]:
    """Class decorator used by backend modules."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str) -> type[SparseBackend]:
    """The class registered as ``name``; a clear error for unknown names."""
    if name not in _REGISTRY and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as exc:  # e.g. a module that needs a package this machine lacks
            raise RuntimeError(f"backend {name!r} could not be loaded: {exc}") from exc
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES} "
            "(or compress=False to simulate sparsity)"
        )
    return _REGISTRY[name]


def resolve_backend(name: str, compress: bool, device: torch.device, dtype: torch.dtype) -> type[SparseBackend]:
    """Pick the backend class for a layer on ``device`` computing in ``dtype``.

    ``compress=False`` always simulates. ``"auto"`` takes the first available backend of
    :data:`AUTO_ORDER_CUDA` on CUDA (each backend's own ``unavailable_reason`` checks capability
    and dtype) and ``reference`` elsewhere. A named backend that cannot run is an error that
    says why. (A :class:`slope.layer.SparseLinear` with ``"auto"`` on CUDA instead asks
    :data:`slope.backends.auto.AUTO_CHOOSER`, which times the candidates against ``dense`` for
    the layer's shape.)
    """
    if not compress:
        return SimulatedBackend
    if name == "auto":
        if device.type == "cuda":
            for candidate in AUTO_ORDER_CUDA:
                try:
                    cls = backend_class(candidate)
                except RuntimeError:
                    continue
                if cls.unavailable_reason(device, dtype) is None:
                    return cls
        return ReferenceBackend
    cls = backend_class(name)
    reason = cls.unavailable_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return cls
