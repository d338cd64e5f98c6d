"""``DynamicSparsity``: dynamic sparse training of a model, as one object for any training loop.

::

    sparsifier = DynamicSparsity(model, total_steps=1000, sparsity_type="2:4", mask_update_interval=100)
    # unstructured: masks on the nn.Linear weights (train them with any optimizer)
    # N:M: the linears became slope.SparseLinear layers (train them with slope.optimizers.ADAMWSparse)
    for step in range(1000):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
        sparsifier.step(optimizer)        # the optimizer whose state holds the masked weights

``step`` keeps pruned entries zero (weights and optimizer state), changes the masks when the policy
is due (gradual pruning, RigL or both) and turns on dense-gradient capture for the backward of
the next step when that step is an update step. ``state_dict`` / ``load_state_dict`` carry the
masks, the step count and the schedule, so a resumed run updates the same masks at the same steps.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from slope.masks import parse_structure
from slope.optimizers import ADAMWSparse
from slope.sparsity import MaskedWeights, MaskPolicy, SparseLayerMasks, StaticMask
from slope.dynamic.criteria import resolve_pruning_method
from slope.dynamic.distribution import DISTRIBUTIONS, layer_sparsities
from slope.dynamic.gradual import GradualPruning, prune_to
from slope.dynamic.policies import PolicyChain
from slope.dynamic.rigl import RigL
from slope.dynamic.schedules import SCHEDULES, resolve_schedule

__all__ = ["DynamicSparsityConfig", "DynamicSparsity"]


@dataclass
class DynamicSparsityConfig:
    """What to sparsify and how the masks evolve (names and defaults of seed 000).

    Attributes:
        sparsity_ratio: target fraction of pruned weights per layer, in ``[0, 1)`` (unstructured);
            ``None`` (unset): 0.5 unstructured, ``1 - N/M`` for N:M (which prunes ``1 - N/M`` whatever it is
            set to: a set ratio that differs is warned of, once). :meth:`validate` fills it in.
        sparsity_type: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``, …) along the input dimension.
        mask_update_interval: optimizer steps between mask updates (RigL and gradual pruning).
        mask_update_fraction: RigL's ``α``: the fraction of kept weights swapped, ``α`` at step 0 and
            cosine-decayed to 0 at the end (an update after ``t`` steps swaps ``α/2 · (1 + cos(π t / total_steps))``).
        use_rigl: drop small weights and regrow large-gradient ones at every update.
        sparsity_schedule: ``None``, ``"cubic"``, ``"linear"``, ``"constant"`` or a callable
            ``(step, total_steps) -> sparsity`` for gradual pruning (unstructured); see
            :func:`slope.dynamic.schedules.resolve_schedule` for what ``None`` means.
        pruning_method: a ``torch.nn.utils.prune.BasePruningMethod`` subclass or instance choosing
            which weights each pruning keeps (default: largest ``|w|``; unstructured).
        targets / skip: linear layers to sparsify / leave dense (names, suffixes or globs, as in
            :func:`slope.prune_model`); by default every ``nn.Linear`` but the vocabulary projection.
        compress, double_pruning, backend: N:M layers (:func:`slope.prune_model`): ``None`` means
            2:4 compressed on the accelerated SLoPe path with double pruning (the SLoPe backward,
            which compressed storage requires), any other N:M simulated with an exact backward.
        sparsity_distribution: ``"uniform"`` (every layer at ``sparsity_ratio``) or ``"erk"`` (RigL's
            Erdős–Rényi-Kernel: the same global count, small layers denser; unstructured, without a
            gradual schedule; :mod:`slope.dynamic.distribution`).
    """

    sparsity_ratio: float | None = None
    sparsity_type: str = "unstructured"
    mask_update_interval: int = 100
    mask_update_fraction: float = 0.3
    use_rigl: bool = True
    sparsity_schedule: Callable[[int, int], float] | str | None = None
    pruning_method: Any = None
    targets: list[str] | None = None
    skip: list[str] | None = None
    compress: bool | None = None
    double_pruning: bool | None = None
    backend: str = "auto"
    sparsity_distribution: str = "uniform"
    structure: tuple[int, int] | None = field(init=False, default=None, repr=False)
    _ratio_unused_warned: bool = field(init=False, default=False, repr=False, compare=False)
    _ratio_defaulted: bool = field(init=False, default=False, repr=False, compare=False)

    def validate(self) -> "DynamicSparsityConfig":
        """Check every field (clear one-line errors); fills :attr:`structure`. Returns ``self``."""
        ratio = self.sparsity_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0):
            raise ValueError(f"sparsity_ratio must be a number in [0, 1) (the fraction of weights pruned), got {ratio!r}")
        if not isinstance(self.sparsity_type, str):
            raise ValueError(f"sparsity_type must be 'unstructured' or 'N:M' (e.g. '2:4'), got {self.sparsity_type!r}")
        try:
            self.structure = parse_structure(self.sparsity_type)
        except ValueError as e:
            raise ValueError(f"sparsity_type {self.sparsity_type!r}: {e}") from None
        if ratio is None:  # unset: the default of the sparsity type
            self.sparsity_ratio = 0.5 if self.structure is None else 1 - self.structure[0] / self.structure[1]
            self._ratio_defaulted = True
        interval = self.mask_update_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"mask_update_interval must be a positive int of optimizer steps, got {interval!r}")
        fraction = self.mask_update_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or (self.use_rigl and not 0.0 < fraction <= 1.0):
            raise ValueError(f"mask_update_fraction must be a number in (0, 1] (RigL's share of kept weights swapped), got {fraction!r}")
        if not isinstance(self.use_rigl, bool):
            raise ValueError(f"use_rigl must be True or False, got {self.use_rigl!r}")
        if isinstance(self.sparsity_schedule, str) and self.sparsity_schedule not in SCHEDULES:
            raise ValueError(f"unknown sparsity_schedule {self.sparsity_schedule!r}; use one of {sorted(SCHEDULES)} or a callable")
        resolve_pruning_method(self.pruning_method)  # type errors now
        if self.sparsity_distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown sparsity_distribution {self.sparsity_distribution!r}; choose one of {DISTRIBUTIONS}")
        if self.sparsity_distribution != "uniform" and (
                self.structure is not None or resolve_schedule(self.sparsity_schedule, self.final_sparsity, self.use_rigl) is not None):
            raise ValueError(f"sparsity_distribution={self.sparsity_distribution!r} spreads an unstructured budget over the layers once: "
                             "use it with sparsity_type='unstructured' and no gradual schedule (N:M keeps N of every M in every layer)")
        if self.structure is None:
            if self.compress is not None or self.double_pruning is not None:
                raise ValueError("compress / double_pruning apply to N:M sparsity_type (SLoPe layers), not 'unstructured'")
        else:
            self._validate_nm()
        self._warn_ratio_beside_callable()
        return self

    def _warn_ratio_beside_callable(self) -> None:
        """A ratio given together with a callable schedule is not used (the schedule's values are the sparsities)."""
        if callable(self.sparsity_schedule) and not self._ratio_defaulted and not self._ratio_unused_warned:
            self._ratio_unused_warned = True
            warnings.warn(f"sparsity_ratio={self.sparsity_ratio:g} is not used: the callable sparsity_schedule sets the "
                          "sparsity at every step (drop sparsity_ratio, or use sparsity_schedule='cubic'/'linear' to ramp to it)",
                          UserWarning, stacklevel=3)

    @property
    def final_sparsity(self) -> float:
        """``sparsity_ratio`` (unstructured) or ``1 - N/M``."""
        return self.sparsity_ratio if self.structure is None else 1 - self.structure[0] / self.structure[1]

    @property
    def gradual_nm(self) -> bool:
        """N:M reached by gradual pruning: trained as masked ``nn.Linear`` weights, not SLoPe layers."""
        return self.structure is not None and resolve_schedule(self.sparsity_schedule, self.final_sparsity, self.use_rigl) is not None

    def _validate_nm(self) -> None:
        n, m = self.structure
        if self.pruning_method is not None:
            raise ValueError(f"pruning_method applies to unstructured sparsity; {n}:{m} keeps the {n} largest |w| of every {m}")
        if self.gradual_nm and self.use_rigl:
            raise ValueError(f"gradual pruning to {n}:{m} (sparsity_schedule) cannot run with use_rigl=True: RigL needs exact "
                             f"{n}:{m} masks from the start; use one of them, or sparsity_schedule='constant' for RigL")
        if self.gradual_nm and (self.compress or self.double_pruning):
            raise ValueError(f"gradual pruning to {n}:{m} trains masked nn.Linear weights; compress / double_pruning need a fixed "
                             "N:M mask (use_rigl=True or sparsity_schedule='constant')")
        if self.compress and (n, m) != (2, 4):
            raise ValueError(f"compress=True stores 2:4 only, not {n}:{m}")
        if abs(self.sparsity_ratio - (1 - n / m)) > 1e-9 and not self._ratio_unused_warned:
            self._ratio_unused_warned = True
            warnings.warn(f"sparsity_type {n}:{m} prunes {1 - n / m:g} of each layer; sparsity_ratio={self.sparsity_ratio:g} is not used",
                          UserWarning, stacklevel=3)

    def summary(self) -> dict[str, Any]:
        """The settings a resumed run must share (plain values)."""
        keep = ("sparsity_ratio", "sparsity_type", "mask_update_interval", "mask_update_fraction", "use_rigl")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}
        if self.sparsity_distribution != "uniform":  # (absent from runs that predate the option)
            values["sparsity_distribution"] = self.sparsity_distribution
        schedule = self.sparsity_schedule
        values["sparsity_schedule"] = schedule if schedule is None or isinstance(schedule, str) else getattr(
            schedule, "__qualname__", type(schedule).__name__)
        return values


def _target_linears(model: nn.Module, targets, skip, multiple_of: int = 1) -> dict[str, nn.Module]:
    """``{name: module}`` of the linear layers to sparsify: ``nn.Linear`` and GPT-2's ``Conv1D``, chosen
    by the rules of :func:`slope.prune_model`; ``multiple_of``: only layers whose input dimension it
    divides (N:M). A model without any is a one-line error."""
    from slope.prune import DEFAULT_SKIP, _linear_weight, _matches, _tied_to_embedding

    targets = [targets] if isinstance(targets, str) else list(targets or [])
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    chosen = {}
    for name, module in model.named_modules():
        view = _linear_weight(module) if name else None
        if view is None or (targets and not _matches(name, targets)):
            continue
        if _matches(name, skip) or (not targets and (name.rsplit(".", 1)[-1] in DEFAULT_SKIP or _tied_to_embedding(module.weight, model))):
            continue
        in_features = view[0].shape[1]
        if in_features % multiple_of:
            if targets:
                raise ValueError(f"{name}: in_features {in_features} is not divisible by M={multiple_of}")
            continue
        chosen[name] = module
    if not chosen:
        divisible = f"; none has an input dimension divisible by M={multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"{type(model).__name__}: no linear layer (nn.Linear or Conv1D) to sparsify "
                         f"(targets={targets or 'all'}, skip={skip}{divisible})")
    return chosen


def _linear_targets(model: nn.Module, targets, skip, multiple_of: int = 1) -> MaskedWeights:
    """Masks (all kept) on the weights of :func:`_target_linears`; GPT-2's ``Conv1D`` stores them
    ``(in, out)``, so they are named in :attr:`MaskedWeights.transposed`."""
    modules = _target_linears(model, targets, skip, multiple_of)
    return MaskedWeights({name + ".weight": module.weight for name, module in modules.items()},
                         transposed=[name + ".weight" for name, module in modules.items() if not isinstance(module, nn.Linear)])


def _check_nm_fits(model: nn.Module, cfg: DynamicSparsityConfig) -> None:
    """One line (instead of prune_model's table) when no targeted layer has sizes divisible by M."""
    from slope.prune import _linear_weight

    n, m = cfg.structure
    sizes = {tuple(_linear_weight(module)[0].shape) for module in _target_linears(model, cfg.targets, cfg.skip).values()}
    if not any(out % m == 0 and inp % m == 0 for out, inp in sizes):
        raise ValueError(f"{type(model).__name__}: no linear layer can be {n}:{m} sparse: SLoPe layers need input and output "
                         f"sizes divisible by M={m} ((out, in) sizes here: {sorted(sizes)[:4]}); "
                         "choose an N:M whose M divides them, e.g. 2:4")


def _nm_layers(model: nn.Module, cfg: DynamicSparsityConfig) -> SparseLayerMasks:
    """Prune ``model``'s linears to N:M SLoPe layers (in place) and view their masks."""
    from slope.prune import prune_model
    from slope.registry import sparse_modules

    n, m = cfg.structure
    compress = (n, m) == (2, 4) if cfg.compress is None else cfg.compress
    double_pruning = compress if cfg.double_pruning is None else cfg.double_pruning
    if not any(True for _ in sparse_modules(model)):
        _check_nm_fits(model, cfg)
        prune_model(model, compress=compress, sparsity=f"{n}:{m}", targets=cfg.targets, skip=cfg.skip,
                    backend=cfg.backend, double_pruning=double_pruning, verbose=False)
    layers = dict(sparse_modules(model))
    if not layers:
        raise ValueError(f"{type(model).__name__}: no linear layer could be pruned to {n}:{m}")
    if any((layer.n, layer.m) != (n, m) for layer in layers.values()):
        raise ValueError(f"{type(model).__name__} already holds SLoPe layers of another sparsity than {n}:{m}")
    return SparseLayerMasks(layers)


class DynamicSparsity:
    """Sparsify ``model`` in place and evolve its masks over ``total_steps`` optimizer steps.

    Args:
        model: the model (its linears are masked, or replaced by SLoPe layers for N:M).
        total_steps: optimizer steps of the run (schedules end there).
        config: a :class:`DynamicSparsityConfig`, or its fields as keyword arguments.

    Attributes:
        masked: :class:`slope.sparsity.MaskedWeights` (unstructured) or
            :class:`slope.sparsity.SparseLayerMasks` (N:M).
        policy: the :class:`slope.sparsity.MaskPolicy` (``GradualPruning``, ``RigL``, a chain of
            both, or ``StaticMask``); ``policies``: its parts.
        steps_done: optimizer steps counted so far; ``history``: one record per mask change.
    """

    def __init__(self, model: nn.Module, total_steps: int, config: DynamicSparsityConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise TypeError("pass either a DynamicSparsityConfig or its fields as keywords, not both")
        self.config = (config or DynamicSparsityConfig(**kwargs)).validate()
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int of optimizer steps, got {total_steps!r}")
        cfg = self.config
        self.model, self.total_steps = model, total_steps
        method = resolve_pruning_method(cfg.pruning_method)
        schedule = resolve_schedule(cfg.sparsity_schedule, cfg.final_sparsity, cfg.use_rigl)
        if cfg.structure is None or schedule is not None:
            multiple = 1 if cfg.structure is None else cfg.structure[1]
            self.masked = _linear_targets(model, cfg.targets, cfg.skip, multiple)
        else:
            self.masked = _nm_layers(model, cfg)
        self.policies: list[MaskPolicy] = []
        self.history: list[dict[str, Any]] = []
        if schedule is not None:
            gradual = GradualPruning(self.masked, total_steps, schedule, interval=cfg.mask_update_interval,
                                     pruning_method=method, structure=cfg.structure)
            gradual.prune(0)
            self.history.append(gradual.last_update)
            self.policies.append(gradual)
        else:  # N:M: prune_model has pruned the layers
            shapes = {name: tuple(mask.shape) for name, mask in self.masked.masks.items()}
            ratios = layer_sparsities(shapes, cfg.sparsity_ratio, cfg.sparsity_distribution)
            pruned = prune_to(self.masked, ratios, method) if cfg.structure is None else {
                name: int((~mask).sum()) for name, mask in self.masked.masks.items()}
            self.history.append({"step": 0, "kind": "prune", "sparsity": self.masked.sparsity(), "target": cfg.final_sparsity,
                                 "layers": {name: {"pruned": count} for name, count in pruned.items()}})
        if cfg.use_rigl:
            self.policies.append(RigL(self.masked, total_steps, interval=cfg.mask_update_interval,
                                      fraction=cfg.mask_update_fraction, structure=cfg.structure))
        if len(self.policies) > 1:
            self.policy: MaskPolicy = PolicyChain(self.policies)
        else:
            self.policy = self.policies[0] if self.policies else StaticMask(self.masked, total_steps)
        self.steps_done = 0
        self._warn_short_run()
        self._arm()

    def _warn_short_run(self) -> None:
        """One line when the run is too short for its mask updates (``mask_update_interval`` too large)."""
        total, interval = self.total_steps, self.config.mask_update_interval
        advice = f"lower mask_update_interval (--mask-update-interval), e.g. to {max(1, total // 10)}"
        for policy in self.policies:
            if isinstance(policy, RigL) and policy.update_count == 0:
                warnings.warn(f"RigL makes no mask update in this run of {total} steps (mask_update_interval={interval}: updates "
                              f"after steps {interval}, {2 * interval}, ... below {total}): the mask stays as pruned at step 0; "
                              + advice, UserWarning, stacklevel=3)
            if isinstance(policy, GradualPruning) and policy.share_after_last_step() > 0.5:
                warnings.warn(f"gradual pruning: {policy.share_after_last_step():.0%} of the schedule's pruning happens after "
                              f"the last of the run's {total} steps (mask_update_interval={interval}), with no training after it "
                              "to recover; " + advice, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ the training-loop call
    def _arm(self) -> None:
        """Keep dense gradients during the next step's backward iff its mask update needs them."""
        upcoming = self.steps_done
        self.masked.capture_dense_grads(upcoming < self.total_steps and self.policy.needs_dense_grad(upcoming))

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, skipped: bool = False) -> list[dict[str, Any]]:
        """Call after every optimizer step (``optimizer``: the one holding the masked weights'
        state: the dense optimizer for unstructured, ``ADAMWSparse`` for N:M). ``skipped=True``
        (an fp16 overflow step the optimizer skipped) counts the step without a mask update.
        Returns the records of the mask changes made now (empty on most steps)."""
        step = self.steps_done
        if optimizer is not None and isinstance(self.masked, SparseLayerMasks) and not isinstance(optimizer, ADAMWSparse):
            raise TypeError(
                f"DynamicSparsity.step got {type(optimizer).__name__}, but the {self.config.sparsity_type} weights live in SLoPe "
                "layers, whose optimizer state is slope.ADAMWSparse(model)'s (torch optimizers skip them): pass that one "
                "(with transformers.Trainer: DynamicSparsityCallback(sparsifier, optimizer=sparse_opt)) and step it every "
                "iteration beside your dense optimizer"
            )
        if step >= self.total_steps:
            raise RuntimeError(f"DynamicSparsity: all {self.total_steps} steps are done; build it with the run's total optimizer steps")
        records = []
        if skipped:
            self.masked.after_step(optimizer)
        elif self.policy.step(step, optimizer):
            records = [p.last_update for p in self.policies if p.due(step)]
            self.history.extend(records)
        self.steps_done += 1
        self._arm()
        return records

    @property
    def sparsity(self) -> float:
        """Current fraction of pruned weights over every sparsified layer."""
        return self.masked.sparsity()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "total_steps": self.total_steps, "config": self.config.summary(),
                "policy": self.policy.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the masks, step count and schedule of a saved run (same settings required)."""
        if state.get("config") != self.config.summary() or state.get("total_steps") != self.total_steps:
            saved = {**state.get("config", {}), "total_steps": state.get("total_steps")}
            raise ValueError(
                f"the saved dynamic-sparsity state was made with {saved}, this run uses "
                f"{ {**self.config.summary(), 'total_steps': self.total_steps} }; resume with the same settings"
            )
        self.policy.load_state_dict(state["policy"])
        self.steps_done = int(state["steps_done"])
        self.history = list(state["history"])
        self._arm()

    def config_dict(self) -> dict[str, Any]:
        """The config as plain values (for metrics files). With a callable ``sparsity_schedule``,
        ``sparsity_ratio`` is its final value (``schedule(total_steps, total_steps)``: what drove the
        run; the ratio given, unused, is ``sparsity_ratio_given``)."""
        values = asdict(self.config)
        for internal in ("structure", "_ratio_unused_warned", "_ratio_defaulted"):
            values.pop(internal)
        schedule = self.config.sparsity_schedule
        if callable(schedule):
            values["sparsity_ratio_given"] = None if self.config._ratio_defaulted else values["sparsity_ratio"]
            values["sparsity_ratio"] = float(schedule(self.total_steps, self.total_steps))
        values["sparsity_schedule"] = self.config.summary()["sparsity_schedule"]
        values["pruning_method"] = None if self.config.pruning_method is None else repr(self.config.pruning_method)
        return values
