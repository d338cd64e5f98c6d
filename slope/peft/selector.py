"""``SftSelector``: PEFT-SFT's training-loop hook around :class:`SftReselection`.

Call ``selector.step()`` after every optimizer step (after ``optimizer.zero_grad()`` is fine).
It tells the layers when to report their full gradients (``rigl``'s accumulation windows), and
reselects the deltas on schedule. Under ``torch.distributed`` every rank must call it; the
selection statistics are averaged over the ranks so all ranks keep identical deltas.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from slope.peft.config import SftConfig
from slope.peft.delta import SftLinear, refuse_sharded_deltas
from slope.peft.optim import SftSM3
from slope.peft.selection import DeltaSet, SftReselection

__all__ = ["SftSelector"]


def _sft_layers(model: nn.Module) -> dict[str, SftLinear]:
    model = getattr(model, "module", model)  # DDP
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SftLinear)}
    if not layers:
        raise ValueError("the model has no sparse deltas: build it with slope.peft.get_peft_model(model, SftConfig(...))")
    return layers


def _check_optimizer(optimizer, config: SftConfig, layers: dict[str, SftLinear]) -> None:
    """``sm3`` grows from :class:`SftSM3`'s row/column accumulators, which it keeps only for the
    deltas in its ``deltas`` mapping: anything else would never reselect (``ValueError`` now,
    rather than silence or an error at the first reselection)."""
    if config.selection_algorithm != "sm3":
        return
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(opt, SftSM3):
        raise ValueError(f"selection_algorithm='sm3' grows from SftSM3's accumulators, but the optimizer is {type(opt).__name__}: "
                         "use slope.peft.SftSM3(params, {d.values: d for _, _, d in model.active_deltas()}, lr=...) "
                         "(or selection_algorithm='rigl' with SftAdamW)")
    missing = [name for name, layer in layers.items() if opt.deltas.get(layer.sft_delta.values) is not layer.sft_delta]
    if missing:
        raise ValueError(f"SftSM3's deltas mapping lacks {len(missing)} of the model's {len(layers)} deltas (e.g. {missing[0]}), "
                         "so they would never be reselected: pass {d.values: d for _, _, d in model.active_deltas()} as its deltas")


class SftSelector:
    """Reselects the deltas of ``model`` (an ``SftModel``, possibly DDP-wrapped) on SpIEL's schedule.

    Args:
        model: the model from :func:`slope.peft.get_peft_model`.
        optimizer: the optimizer of the deltas (``SftAdamW`` for ``rigl``, ``SftSM3`` for ``sm3``).
        config: the :class:`SftConfig` of the model.
        num_train_steps: the total number of optimizer steps (the reselection rate decays to 0 there).
        gradient_accumulation_steps: micro-batches per optimizer step (accepted for PEFT-SFT
            compatibility; windows are counted in optimizer steps, which already span them).
    """

    def __init__(self, model: nn.Module, optimizer, config: SftConfig, num_train_steps: int, gradient_accumulation_steps: int = 1):
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps!r}")
        if not isinstance(num_train_steps, int) or isinstance(num_train_steps, bool) or num_train_steps < 1:
            raise ValueError(f"num_train_steps must be the total number of optimizer steps (>= 1), got {num_train_steps!r}")
        self.layers = _sft_layers(model)
        refuse_sharded_deltas(layer.sft_delta for layer in self.layers.values())
        _check_optimizer(optimizer, config, self.layers)
        self.optimizer = optimizer
        self.config = config
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and config.selection_algorithm == "rigl":
            group = dist.new_group(backend=dist.get_backend())  # selection traffic apart from DDP's
        deltas = DeltaSet({name: layer.sft_delta for name, layer in self.layers.items()})
        self.policy = SftReselection(deltas, config, int(num_train_steps), group=group)
        self.completed_steps = 0
        self._set_observers()

    def _set_observers(self) -> None:
        watch = self.policy.needs_dense_grad(self.completed_steps)
        for name, layer in self.layers.items():
            layer.grad_observer = self.policy.candidates[name].observe if watch else None

    def step(self) -> bool:
        """Call after each optimizer step; returns whether the deltas were reselected."""
        if self.policy.needs_dense_grad(self.completed_steps):
            for cand in self.policy.candidates.values():
                cand.end_step()
        changed = self.policy.step(self.completed_steps, self.optimizer)
        self.completed_steps += 1
        self._set_observers()
        return changed

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "completed_steps": self.completed_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume at an optimizer-step boundary outside an accumulation window's middle."""
        self.policy.load_state_dict(state["policy"])
        self.completed_steps = int(state["completed_steps"])
        self._set_observers()
