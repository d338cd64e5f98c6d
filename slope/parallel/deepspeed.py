"""DeepSpeed ZeRO-1/2 for pruned models: DeepSpeed manages the dense parameters, slope the sparse.

``deepspeed`` is an optional extra (``pip install "slope[deepspeed]"``, ``DS_BUILD_OPS=0`` is
enough): it is imported only inside these functions.

- The dense parameters (``slope.parallel.dense_parameters``) go to the engine and its optimizer;
  ZeRO-1/2 partition their optimizer state (and, for stage 2, gradients) over the ranks.
- The SLoPe layers' ``values`` stay whole and replicated on every rank (like their masks);
  :class:`ADAMWSparse` updates them from ``values_grad``. The engine scales the loss by
  ``1/gradient_accumulation_steps`` in ``engine.backward``, and the sparse gradients are averaged
  over the ranks at the accumulation boundary — the same semantics as the dense ones.
- bf16: the engine casts the module to bf16; the SLoPe ``values`` are put back to fp32 (master
  weights, like ZeRO's fp32 partitions) and the layers compute in bf16 (``compute_dtype``).
- Clipping: DeepSpeed's ``gradient_clipping`` clips the dense gradients by their own norm (and
  defaults to 1.0); slope clips the sparse ones by theirs with the same threshold. This is not the
  joint norm of a single-process run, so a config without ``gradient_clipping`` gets 0 (off)
  rather than DeepSpeed's silent dense-only default.
- fp16 (DeepSpeed's loss scaler does not see the sparse gradients) and ZeRO-3 (it would partition
  ``values``) are rejected with a clear error.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from slope.serialization.jsonfile import read_json_object
from slope.parallel.wrap import (
    SYNC_ATTR,
    SparseGradSync,
    _require_pruned,
    _sparse_layers,
    _sync_expert_masks,
    broadcast_module_state,
    dense_parameters,
)

__all__ = [
    "import_deepspeed",
    "load_deepspeed_config",
    "deepspeed_train_config",
    "deepspeed_initialize",
    "deepspeed_rebuild",
    "deepspeed_param_names",
    "is_deepspeed_engine",
]


def import_deepspeed():
    """Import ``deepspeed`` or raise a clear error telling how to install it."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "DeepSpeed is not installed; install the optional extra: "
            "`DS_BUILD_OPS=0 pip install \"slope[deepspeed]\"` (or `pip install deepspeed`)"
        ) from exc
    return deepspeed


def is_deepspeed_engine(model: Any) -> bool:
    """True for a ``deepspeed.DeepSpeedEngine`` (checked without importing DeepSpeed)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def load_deepspeed_config(config: str | os.PathLike | dict, gradient_clipping: float = 0.0) -> dict:
    """A DeepSpeed config as a dict (from a JSON file path or a dict), checked for what slope supports.

    Returns a copy with ``gradient_clipping`` set to the given value when absent (see the module
    docstring: DeepSpeed's own default would silently clip only the dense gradients).
    """
    if not isinstance(config, dict):
        path = os.fspath(config)
        try:
            config = read_json_object(path, lambda why: ValueError(f"DeepSpeed config {path!r}: {why}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist") from None
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} is not supported with SLoPe layers (stage 3 would partition their "
            "compressed weights); use stage 1 or 2"
        )
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError(
            "DeepSpeed fp16 is not supported with SLoPe layers (its loss scaler does not cover the sparse "
            "gradients); use bf16 (\"bf16\": {\"enabled\": true}) or fp32"
        )
    config = dict(config)
    config.setdefault("gradient_clipping", gradient_clipping)
    return config


def deepspeed_train_config(
    config: str | os.PathLike | dict,
    *,
    global_batch: int,
    grad_accum: int,
    world_size: int,
    gradient_clipping: float,
) -> dict:
    """The DeepSpeed config for a training loop that owns the optimizers, schedule and batch sizes.

    Fills in ``train_micro_batch_size_per_gpu`` (``global_batch / world_size``),
    ``gradient_accumulation_steps`` and ``train_batch_size``; a config that sets them differently,
    or that has an ``"optimizer"`` / ``"scheduler"`` section, is a ``ValueError`` naming the key.
    So is ZeRO stage 0 (its plain optimizer has no rank-independent checkpoint here) and bf16 with
    ``check_grad_overflow`` off: the loop relies on ZeRO skipping a step whose dense gradients are
    not finite (``engine.was_step_applied()``).
    """
    config = load_deepspeed_config(config, gradient_clipping)
    if int(config.get("zero_optimization", {}).get("stage", 0)) == 0:
        raise ValueError(
            "the DeepSpeed config runs ZeRO stage 0 (no \"zero_optimization\" stage), whose checkpoints slope train cannot "
            "write rank-independently; set \"zero_optimization\": {\"stage\": 1} (or 2), or train data-parallel without "
            "--deepspeed under torchrun"
        )
    if config.get("bf16", {}).get("check_grad_overflow", True) is False:
        raise ValueError(
            "the DeepSpeed config turns bf16 check_grad_overflow off, so DeepSpeed would apply a step with non-finite "
            "gradients that slope train skips; remove \"check_grad_overflow\": false"
        )
    if global_batch % world_size:
        raise ValueError(f"batch size {global_batch} does not split over {world_size} ranks; use a multiple of {world_size}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(
                f"the DeepSpeed config has a {section!r} section, but the training loop builds the optimizers and the "
                "learning-rate schedule itself; remove it"
            )
    sizes = {
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": global_batch * grad_accum,
    }
    for key, value in sizes.items():
        if key in config and config[key] != value:
            raise ValueError(
                f"the DeepSpeed config sets {key}={config[key]} but the run's batch size / accumulation give {value}; "
                "remove the key (it is filled in) or change the run's settings"
            )
        config[key] = value
    return config


def _single_process_local_rank() -> None:
    """DeepSpeed asserts that a launcher set ``LOCAL_RANK``; a single process outside any launcher
    (a group of one, :func:`slope.parallel.init_distributed` with ``single_process_group``) is local
    rank 0, so say so instead of failing on DeepSpeed's assertion."""
    if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            os.environ["LOCAL_RANK"] = "0"


def deepspeed_initialize(
    model: nn.Module,
    config: str | os.PathLike | dict,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    sync_sparse: bool = True,
    **kwargs,
):
    """``deepspeed.initialize`` for a **pruned** model; returns ``(engine, optimizer, lr_scheduler)``.

    Args:
        model: pruned model (``slope.prune_model``); not yet on the engine.
        config: DeepSpeed config (path to JSON or dict), ZeRO stage 0, 1 or 2, fp32 or bf16.
        optimizer: the dense optimizer over ``slope.parallel.dense_parameters(model)``, or None to
            let the config's ``"optimizer"`` section build one.
        sync_sparse: average the sparse gradients at each accumulation boundary automatically.
        kwargs: passed to ``deepspeed.initialize``.

    Training loop (``ADAMWSparse`` built on ``engine.module`` or the same model)::

        loss = engine(batch); engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            sparse_opt.step(); sparse_opt.zero_grad()
        engine.step()
    """
    deepspeed = import_deepspeed()
    config = load_deepspeed_config(config)
    layers = _require_pruned(model, "deepspeed_initialize")
    masters = [layer.values.detach().clone() for layer in layers]  # before a bf16 engine casts them
    _single_process_local_rank()
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=dense_parameters(model),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
        **kwargs,
    )
    if engine.bfloat16_enabled():
        with torch.no_grad():
            for layer, master in zip(layers, masters):
                layer.values.data = master.to(layer.values.device)  # same Parameter object, exact master
                if layer.values_grad is not None:
                    layer.values_grad = layer.values_grad.to(master.dtype)
                layer.compute_dtype = torch.bfloat16
                layer.refresh()
    broadcast_module_state(engine.module, sparse_only=True)
    _sync_expert_masks(engine.module)  # (DeepSpeed broadcast rank 0's weights: its masks go with them)
    if sync_sparse:
        clip = float(config["gradient_clipping"])
        sync = SparseGradSync(engine.module, engine.is_gradient_accumulation_boundary, clip_norm=clip if clip > 0 else None)
        setattr(engine, SYNC_ATTR, sync)
    return engine, ds_optimizer, scheduler


# ---------------------------------------------------------------------- rank-independent state
def _zero_optimizer(engine):
    zero = engine.optimizer
    if not hasattr(zero, "bit16_groups") or not hasattr(zero, "single_partition_of_fp32_groups"):
        raise TypeError(
            f"rank-independent DeepSpeed checkpoints support ZeRO stage 1/2 optimizers, got {type(zero).__name__}"
        )
    return zero


def _fragments(param: torch.Tensor) -> tuple[int, int, int] | None:
    """``(start in the flat param, start in this rank's fp32 partition, numel)`` or None."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
    return lp.start, hp.start, lp.numel


def _group_params(engine) -> Iterator[tuple[int, list[tuple[str, torch.Tensor]]]]:
    names = {id(p): name for name, p in engine.module.named_parameters()}
    for index, group in enumerate(_zero_optimizer(engine).bit16_groups):
        yield index, [(names[id(p)], p) for p in group]


def _gather(param: torch.Tensor, partition: torch.Tensor, group) -> torch.Tensor:
    """Assemble a full fp32 tensor shaped like ``param`` from every rank's ``partition`` fragment."""
    full = torch.zeros(param.numel(), dtype=torch.float32, device=partition.device)
    fragment = _fragments(param)
    if fragment is not None:
        lp_start, hp_start, numel = fragment
        full.narrow(0, lp_start, numel).copy_(partition.narrow(0, hp_start, numel))
    dist.all_reduce(full, group=group)
    return full.view(param.shape)


def _scatter(param: torch.Tensor, partition: torch.Tensor, value: torch.Tensor) -> None:
    fragment = _fragments(param)
    if fragment is not None:
        lp_start, hp_start, numel = fragment
        flat = value.reshape(-1).to(device=partition.device, dtype=partition.dtype)
        partition.narrow(0, hp_start, numel).copy_(flat.narrow(0, lp_start, numel))


@torch.no_grad()
def deepspeed_full_model_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's model state with the dense parameters as ZeRO's fp32 master copies (CPU)."""
    zero = _zero_optimizer(engine)
    state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    for index, params in _group_params(engine):
        partition = zero.single_partition_of_fp32_groups[index]
        group = zero.real_dp_process_group[index]
        for name, param in params:
            state[name] = _gather(param, partition, group).cpu()
    return state


@torch.no_grad()
def deepspeed_load_full_model_state_dict(engine, state: dict[str, torch.Tensor]) -> None:
    """Load a full model state (every rank holds it) into the module and ZeRO's fp32 partitions."""
    zero = _zero_optimizer(engine)
    module_state = engine.module.state_dict()
    cast = {k: v.to(module_state[k].dtype) if k in module_state and v.is_floating_point() else v for k, v in state.items()}
    engine.module.load_state_dict(cast, strict=True)
    for index, params in _group_params(engine):
        partition = zero.single_partition_of_fp32_groups[index]
        for name, param in params:
            _scatter(param, partition, state[name])
    for layer in _sparse_layers(engine.module):
        layer.refresh()


@torch.no_grad()
def deepspeed_full_optimizer_state_dict(engine) -> dict:
    """The dense optimizer state as one process's ``torch.optim`` state keyed by parameter name.

    Same layout as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` with
    ``full_state_dict=True``: ``{"state": {name: {"step", "exp_avg", ...}}, "param_groups": [...]}``.
    Collective: every rank must call it.
    """
    zero = _zero_optimizer(engine)
    inner = zero.optimizer
    out_state: dict[str, dict[str, torch.Tensor]] = {}
    groups = []
    for index, params in _group_params(engine):
        partition = zero.single_partition_of_fp32_groups[index]
        group = zero.real_dp_process_group[index]
        flat_state = inner.state.get(partition, {})
        for name, param in params:
            entry = {}
            for key, value in flat_state.items():
                if torch.is_tensor(value) and value.shape == partition.shape:
                    entry[key] = _gather(param, value, group).cpu()
                else:
                    entry[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            if entry:
                out_state[name] = entry
        hyper = {k: v for k, v in inner.param_groups[index].items() if k != "params"}
        groups.append({**hyper, "params": [name for name, _ in params]})
    return {"state": out_state, "param_groups": groups}


def deepspeed_param_names(engine) -> list[list[str]]:
    """Names of the dense optimizer's parameters, per group, in the client optimizer's order."""
    return [[name for name, _ in params] for _, params in _group_params(engine)]


@torch.no_grad()
def deepspeed_load_full_optimizer_state_dict(engine, state_dict: dict, strict: bool = True) -> None:
    """Load a state from :func:`deepspeed_full_optimizer_state_dict` (written by any number of ranks).

    Groups are matched by their parameter names. ``strict=False`` lets groups whose parameters
    are all new (absent from ``state_dict``) start with fresh state, e.g. adapters added later.
    """
    zero = _zero_optimizer(engine)
    inner = zero.optimizer
    saved_groups = state_dict["param_groups"]
    group_of = {name: j for j, group in enumerate(saved_groups) for name in group["params"]}
    our_groups = list(_group_params(engine))
    if strict and len(saved_groups) != len(our_groups):
        raise ValueError(
            f"optimizer checkpoint has {len(saved_groups)} parameter groups, the engine has {len(our_groups)}; "
            "the model or optimizer configuration changed"
        )
    for index, params in our_groups:
        names = [name for name, _ in params]
        sources = {group_of.get(name) for name in names}
        if sources == {None} and not strict:
            continue
        if len(sources) != 1 or None in sources or sorted(names) != sorted(saved_groups[next(iter(sources))]["params"]):
            raise ValueError(
                f"optimizer checkpoint does not match the engine's parameter group {index} ({names[:3]}...); "
                "the model or optimizer configuration changed"
            )
        saved = saved_groups[sources.pop()]
        partition = zero.single_partition_of_fp32_groups[index]
        inner.param_groups[index].update({k: v for k, v in saved.items() if k != "params"})
        entries = [state_dict["state"][name] for name in names if name in state_dict["state"]]
        if not entries:
            inner.state.pop(partition, None)
            continue
        flat_state = {}
        for key, value in entries[0].items():
            if torch.is_tensor(value) and value.dim() > 0:
                flat_state[key] = torch.zeros_like(partition)
            else:
                flat_state[key] = value.clone() if torch.is_tensor(value) else value
        for name, param in params:
            for key, value in state_dict["state"].get(name, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    _scatter(param, flat_state[key], value)
        inner.state[partition] = flat_state
    zero._hp_optimizer_states_linked = False  # re-link the per-parameter views on the next step


def deepspeed_rebuild(engine, config, optimizer_factory, **kwargs):
    """Rebuild the engine over the same model after adding parameters (e.g. lazy LoRA adapters).

    ZeRO fixes its parameter partitions when it is built, so new trainable parameters need a new
    engine. ``optimizer_factory(module)`` adds the parameters to ``module`` and returns the new
    dense optimizer over all of them. The weights (the fp32 master copies) and the dense optimizer
    state of the existing parameters carry over exactly; new parameter groups start fresh, as
    ``optimizer.add_param_group`` would in a single process. Collective.

    Returns ``(engine, optimizer, lr_scheduler)`` like :func:`deepspeed_initialize`.
    """
    model_state = deepspeed_full_model_state_dict(engine)
    optimizer_state = deepspeed_full_optimizer_state_dict(engine)
    sync = getattr(engine, SYNC_ATTR, None)
    if sync is not None:
        sync.remove()
    module = engine.module
    engine.destroy()  # removes ZeRO's gradient hooks from the parameters
    optimizer = optimizer_factory(module)
    added = {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in model_state}
    new_engine, ds_optimizer, scheduler = deepspeed_initialize(module, config, optimizer=optimizer, **kwargs)
    deepspeed_load_full_model_state_dict(new_engine, {**model_state, **added})
    deepspeed_load_full_optimizer_state_dict(new_engine, optimizer_state, strict=False)
    return new_engine, ds_optimizer, scheduler
