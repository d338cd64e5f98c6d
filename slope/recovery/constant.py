"""``ConstantMasks``: a :class:`~slope.recovery.modifiers.ConstantPruningModifier` at work — the zeros
of the targeted linears at the start of fine-tuning stay exactly zero.

Each targeted linear is held in one of two ways, by the structure of its zeros (weight ``(out, in)``;
a modifier that holds for only part of the run holds every layer the second way, so that its
weights can train dense before and after):

- **2:4** (every group of 4 consecutive inputs of a row holds at most 2 nonzeros; both dimensions
  divisible by 4; weight not tied to an embedding): replaced by a :class:`slope.SparseLinear`
  (:func:`slope.prune_model` with exactly these layers as targets). ``M`` keeps the 2 largest
  ``|W|`` of each group, so every nonzero is kept; the layer stores only kept entries and its
  optimizer (:class:`slope.optimizers.ADAMWSparse`) holds state only for them, so a pruned entry
  cannot move. A group with fewer than 2 nonzeros must still keep 2 entries: those kept entries
  that are exactly zero at the start ("pinned") are zeroed again, with their moments, after every
  step. By default the layer is simulated with an exact backward (``compress=False,
  double_pruning=False``: ``dx = dy (W⊙M)``); ``double_pruning=True`` stores it compressed 2:4
  (``compress=True``: the accelerated path), whose backward is SLoPe's ``dy (W⊙M⊙M_t)`` — the
  transposed operand of an exact backward is not 2:4 along its reduction dimension, so compressed
  storage cannot give an exact backward.
- **anything else** (unstructured, other N:M): the weight stays an ``nn.Linear`` weight under
  :class:`slope.sparsity.MaskedWeights` with mask ``W != 0`` (gradients masked by a hook; weights
  and every weight-shaped optimizer state re-zeroed after each step).

The fused expert tensors of mixture-of-experts models (:func:`slope.moe.find_expert_weights`: 3-D
parameters of an ``...Experts`` module, no ``nn.Linear``) are held the second way, named by their
parameter (``model.layers.0.mlp.experts.gate_up_proj``): by default those holding exact zeros, else
those whose module, or a module above it, a target names.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from slope.masks import is_nm_sparse
from slope.parallel.sharded import full_tensor
from slope.prune import _tied_to_embedding
from slope.pruning.layers import is_linear, match_targets, matches_module_or_above, read_weight
from slope.pruning.report import zero_fraction
from slope.recovery.modifiers import ConstantPruningModifier
from slope.sparsity import MaskedWeights

__all__ = ["ConstantMasks", "is_2to4", "target_linears"]


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether ``weight (out, in)`` has at most 2 nonzeros in every group of 4 consecutive inputs
    (and both dimensions divisible by 4, as a 2:4 SLoPe layer needs)."""
    return weight.shape[0] % 4 == 0 and is_nm_sparse(weight.detach() != 0, 2, 4)


def held_weight(model: nn.Module, modules: dict[str, nn.Module], name: str) -> torch.Tensor:
    """The weight a held name stands for (``modules``: ``model``'s ``named_modules()``): a linear's
    ``(out, in)`` weight, or a fused expert parameter."""
    module = modules.get(name)
    return read_weight(module) if module is not None else model.get_parameter(name)


def _param_name(modules: dict[str, nn.Module], name: str) -> str:
    """A held name's parameter: ``<linear>.weight``, or the fused expert parameter itself."""
    return name + ".weight" if name in modules else name


def _target_experts(model: nn.Module, modifier: ConstantPruningModifier) -> list[str]:
    """The fused expert parameters ``modifier`` targets: with ``targets`` ``None`` those holding exact
    zeros, else those whose module or a module above it a target names."""
    from slope.moe import find_expert_weights

    modules = dict(model.named_modules())
    names = []
    for e in find_expert_weights(model):
        if (zero_fraction(model.get_parameter(e.name)) > 0 if modifier.targets is None else
                matches_module_or_above(modifier.targets, e.name.rpartition(".")[0], modules)):
            names.append(e.name)
    return names


def target_linears(model: nn.Module, modifier: ConstantPruningModifier, *, zeros_only: bool = True) -> list[str]:
    """The names of the linears (and fused expert parameters, :func:`_target_experts`) ``modifier``
    targets in ``model``: with ``targets`` ``None``, every one holding exact zeros (an error if none
    does); else the matched ones, those without zeros left out with a warning when ``zeros_only``.
    Warns about pruned-looking linears and expert tensors left out."""
    modules = dict(model.named_modules())
    if modifier.targets is None:
        names = [n for n, m in modules.items() if n and is_linear(m) and zero_fraction(m.weight) > 0]
        names += _target_experts(model, modifier)
        if not names:
            raise ValueError("ConstantPruningModifier: no linear layer of the model holds exact zeros (is it pruned? run "
                             "slope oneshot first, or name the targets)")
    else:
        names = list(match_targets(model, modifier.targets, modifier.name)) + _target_experts(model, modifier)
        empty = [n for n in names if zero_fraction(held_weight(model, modules, n)) == 0]
        if empty and zeros_only:
            warnings.warn(f"ConstantPruningModifier: {len(empty)} targeted linear(s) hold no zeros and train dense "
                          f"(e.g. {', '.join(empty[:3])})", UserWarning, stacklevel=3)
            names = [n for n in names if n not in empty]
    _warn_uncovered(model, modules, set(names))
    return names


class ConstantMasks:
    """Hold the zeros of ``modifier``'s targets in ``model`` (module docstring). Converts the 2:4
    layers to SLoPe layers in place when built (unless ``slope_layers=False``).

    Args:
        model: the (pruned) model; ``modifier``: its :class:`ConstantPruningModifier`.
        double_pruning: 2:4 layers compressed on the accelerated path with SLoPe's double-pruned
            backward, instead of simulated with an exact backward.
        backend: the sparse backend of compressed layers (``"auto"``).
        names: the linears to hold, already chosen (default: :func:`target_linears`).
        slope_layers: ``False``: every layer stays an ``nn.Linear`` under masks, 2:4 ones included.

    Attributes:
        masked: :class:`MaskedWeights` of the layers that are not 2:4 (``None`` if none).
        slope_layers: ``{name: SparseLinear}`` of the 2:4 layers.
        layers: ``{name: "2:4 SLoPe" | "masked"}`` for every held layer.
    """

    def __init__(self, model: nn.Module, modifier: ConstantPruningModifier, *, double_pruning: bool = False,
                 backend: str = "auto", names: list[str] | None = None, slope_layers: bool = True):
        self.model = model
        modules = dict(model.named_modules())
        names = target_linears(model, modifier) if names is None else list(names)
        nm = [n for n in names if slope_layers and n in modules and is_2to4(read_weight(modules[n]))
              and not _tied_to_embedding(modules[n].weight, model)]
        other = [n for n in names if n not in nm]
        self.layers = {n: ("2:4 SLoPe" if n in nm else "masked") for n in names}
        self._params = {n: _param_name(modules, n) for n in other}  # held name -> masked parameter name
        self.masked = MaskedWeights.from_zeros({p: model.get_parameter(p) for p in self._params.values()}) if other else None
        self.slope_layers: dict[str, nn.Module] = {}
        self.pinned: dict[str, torch.Tensor] = {}
        if nm:
            self._to_slope_layers(nm, double_pruning, backend)
        self._summary = self._measure()

    def _to_slope_layers(self, names: list[str], double_pruning: bool, backend: str) -> None:
        from slope.prune import prune_model
        from slope.registry import sparse_modules

        zeros = {n: read_weight(self.model.get_submodule(n)).detach() == 0 for n in names}
        prune_model(self.model, compress=double_pruning, double_pruning=double_pruning, backend=backend if double_pruning else "auto",
                    sparsity="2:4", targets=["re:" + re.escape(n) for n in names], verbose=False)
        layers = dict(sparse_modules(self.model))
        self.slope_layers = {n: layers[n] for n in names}
        for name, layer in self.slope_layers.items():
            mask = layer.mask
            if bool((~zeros[name] & ~mask).any()):  # prune_model keeps the 2 largest |W|: never a nonzero
                raise RuntimeError(f"{name}: the 2:4 mask dropped a nonzero weight (please report this)")
            pinned = (zeros[name] & mask)[mask].view(layer.values.shape)  # values' layout: kept entries, row by row
            if bool(pinned.any()):
                self.pinned[name] = pinned.to(layer.values.device)

    # ------------------------------------------------------------------ the training-loop calls
    @torch.no_grad()
    def after_step(self, dense_opt: torch.optim.Optimizer | None = None, sparse_opt: torch.optim.Optimizer | None = None) -> None:
        """Call after every optimizer step: re-zero pruned weights and their optimizer state."""
        if self.masked is not None:
            self.masked.after_step(dense_opt)
        from slope.parallel.sharded_values import holds_values

        for name, pinned in self.pinned.items():
            if not holds_values(self.slope_layers[name]):
                continue  # sharded values: their owner re-zeroes them
            values = self.slope_layers[name].values
            values.masked_fill_(pinned, 0)
            state = {} if sparse_opt is None else sparse_opt.state.get(values, {})
            for tensor in state.values():
                if torch.is_tensor(tensor) and tensor.shape == values.shape:
                    tensor.masked_fill_(pinned, 0)

    def rebind(self) -> None:
        """Hold the same weights after ``fully_shard`` replaced the model's parameters by sharded
        ones (the SLoPe layers' ``values`` are not FSDP2's: they are held as they were)."""
        if self.masked is not None:
            self.masked.rebind({name: self.model.get_parameter(name) for name in self.masked.params})

    def before_update(self) -> None:
        """Call after the backward passes of a step, before clipping: masks the gradients of
        sharded weights (:meth:`MaskedWeights.mask_grads_`; unsharded ones are masked by hooks)."""
        if self.masked is not None:
            self.masked.mask_grads_()

    def remove_hooks(self) -> None:
        """Detach the gradient hooks of the masked weights (after training)."""
        if self.masked is not None:
            self.masked.remove_hooks()

    # ------------------------------------------------------------------ reporting and persistence
    def zero_masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool (out, in)}``, True where the weight must stay exactly zero (whole
        masks: gathered over the ranks when sharded, so every rank must call it then)."""
        result = {}
        for name, kind in self.layers.items():
            if kind == "masked":
                result[name] = ~full_tensor(self.masked.masks[self._params[name]])
            else:
                layer = self.slope_layers[name]
                zero = ~layer.mask
                if name in self.pinned:
                    zero[layer.mask] = self.pinned[name].flatten()
                result[name] = zero
        return result

    @property
    def zero_fraction(self) -> float:
        """Of the held layers' entries, the fraction held at zero."""
        return self._summary["zero_fraction"]

    def summary(self) -> dict[str, Any]:
        """Per held layer its kind and fraction of entries held at zero, and the overall fraction
        (the masks never change: measured when built or loaded)."""
        return {"layers": {name: dict(layer) for name, layer in self._summary["layers"].items()},
                "zero_fraction": self._summary["zero_fraction"]}

    def _measure(self) -> dict[str, Any]:
        zeros = self.zero_masks()
        layers = {n: {"kind": self.layers[n], "zero_fraction": round(float(z.float().mean()), 6)} for n, z in zeros.items()}
        total = sum(z.numel() for z in zeros.values())
        return {"layers": layers, "zero_fraction": sum(int(z.sum()) for z in zeros.values()) / max(total, 1)}

    def state_dict(self) -> dict[str, Any]:
        """The masks of the masked weights (the SLoPe layers' masks are in the model's state dict)."""
        return {"masked": None if self.masked is None else self.masked.state_dict(), "layers": dict(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layers") != self.layers:
            raise ValueError("the checkpoint's ConstantPruningModifier layers differ from this run's; resume with the same "
                             "model and recipe")
        if self.masked is not None:
            self.masked.load_state_dict(state["masked"])
        self._summary = self._measure()


def _warn_uncovered(model: nn.Module, modules: dict[str, nn.Module], held: set[str]) -> None:
    """Warn about pruned-looking linears and fused expert tensors (>= 25 % exact zeros) that no target
    holds: their zeros fill in."""
    from slope.moe import find_expert_weights

    loose = [n for n, m in modules.items() if n and n not in held and is_linear(m) and zero_fraction(m.weight) >= 0.25]
    loose += [e.name for e in find_expert_weights(model)
              if e.name not in held and zero_fraction(model.get_parameter(e.name)) >= 0.25]
    if loose:
        warnings.warn(f"{len(loose)} linear layer(s) or fused expert tensor(s) hold >= 25% exact zeros but no "
                      f"ConstantPruningModifier target covers them, so they train dense and their zeros fill in "
                      f"(e.g. {', '.join(loose[:3])}); add them to targets to keep them sparse", UserWarning, stacklevel=4)
