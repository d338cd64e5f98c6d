"""Live SLoPe layers, for the SLoPe-compatible argument-free calls (``grad_dict``, ``sync_grads()``).

State lives on the layers; this module only holds weak references, in creation order, so that
every rank walks the same layers in the same order and two models never share gradients.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

__all__ = ["register", "live_layers", "sparse_modules", "GradDict", "grad_dict"]

_counter = itertools.count()
_live: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()


def register(layer: nn.Module) -> None:
    """Record a newly built SLoPe layer (weakly)."""
    _live[next(_counter)] = layer


def live_layers() -> list[nn.Module]:
    """Every SLoPe layer still alive, in creation order."""
    return [layer for _, layer in sorted(_live.items())]


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every SLoPe layer of ``model`` (in ``named_modules`` order)."""
    from slope.layer import SparseLinear

    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module


class GradDict(Mapping):
    """A read-only view ``layer -> sparse gradient`` over live layers (or one model's layers).

    ``slope.grad_dict`` is the view over every live layer (SLoPe's global ``grad_dict``); users
    only hand it to :class:`slope.optimizers.ADAMWSparse`. ``GradDict(model)`` views one model.
    """

    def __init__(self, model: nn.Module | None = None):
        self._model = weakref.ref(model) if model is not None else None

    def layers(self) -> list[nn.Module]:
        if self._model is None:
            return live_layers()
        model = self._model()
        return [] if model is None else [m for _, m in sparse_modules(model)]

    def __getitem__(self, layer: nn.Module) -> torch.Tensor:
        if layer not in self.layers() or layer.values_grad is None:
            raise KeyError(layer)
        return layer.values_grad

    def __iter__(self):
        return (layer for layer in self.layers() if layer.values_grad is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"GradDict({len(self)} sparse gradients)"


grad_dict = GradDict()
