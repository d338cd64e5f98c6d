"""Data-parallel wrappers for pruned models: DDP and FSDP2, with the sparse gradients averaged.

The SLoPe layers' kept weights (``values``, ``requires_grad=False``) are not ordinary trainable
parameters: their gradient lands in ``layer.values_grad`` and :class:`ADAMWSparse` applies it.
Data-parallel engines therefore never see it; :class:`SparseGradSync` averages it over the ranks
(:func:`slope.sync_grads`) once at the end of every backward pass in which the engine reduces the
dense gradients, and skips the micro-batches that the engine does not sync (``no_sync``). Since
averaging is linear, accumulating locally and averaging once equals DDP's dense semantics.

Prune **before** wrapping: the wrappers fix their parameter lists when they are built.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from slope.distributed import sync_grads
from slope.parallel.sharded_values import ShardedValues
from slope.registry import sparse_modules

__all__ = [
    "SparseGradSync",
    "dense_parameters",
    "is_data_parallel",
    "is_fsdp2",
    "broadcast_module_state",
    "rewrap_ddp",
    "wrap_ddp",
    "wrap_fsdp2",
    "no_sync",
    "unwrap",
]

SYNC_ATTR = "slope_sparse_sync"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper or DeepSpeed engine (FSDP2 shards in place)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _sparse_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in sparse_modules(unwrap(model))]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters for the dense optimizer: those requiring grad, never a SLoPe layer's ``values``."""
    sparse = {id(layer.values) for layer in _sparse_layers(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]


def _require_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised process group: launch with `torchrun --nproc_per_node=N` (N >= 2) and call "
            "slope.parallel.init_distributed() first (for one process, init_distributed(single_process_group=True) "
            "makes a group of one)"
        )


def _require_pruned(model: nn.Module, what: str) -> list[nn.Module]:
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no SLoPe layers; call slope.prune_model(model) before wrapping it")
    return layers


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0, sparse_only: bool = False, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (in place).

    ``sparse_only=True`` sends only the SLoPe layers' state (``values``, masks, metadata), which
    the engines that broadcast only parameters (DeepSpeed) or nothing (FSDP2) would leave out.
    """
    if sparse_only:
        tensors = [t for layer in _sparse_layers(module) for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))]
    else:
        tensors = [*module.parameters(), *module.buffers()]
    broadcast_tensors(tensors, src, group)


@torch.no_grad()
def broadcast_tensors(tensors, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s ``tensors`` to every rank, in place (collective; bool tensors too)."""
    for tensor in tensors:
        # Received into a copy, then copied in: collectives write memory without bumping the
        # tensor's version counter, which keys the SLoPe layers' caches (operands, gather offsets).
        buffer = tensor.detach().clone()
        dist.broadcast(buffer.view(torch.uint8) if buffer.dtype == torch.bool else buffer, src=src, group=group)
        tensor.copy_(buffer)


def _sync_expert_masks(model: nn.Module, group=None) -> None:
    """Copy rank 0's masks of fused MoE expert tensors (:mod:`slope.moe`) to every rank, as the
    weights they mask are (collective)."""
    from slope.moe import expert_masks

    masked = expert_masks(model)
    if masked is not None:
        broadcast_tensors(list(masked.masks.values()), group=group)


class SparseGradSync:
    """Averages a model's sparse gradients at the end of each backward whose forward ``should_sync()``.

    A forward hook on every SLoPe layer records whether the engine will reduce the dense gradients
    of this micro-batch (read at forward time, as DDP decides) and hooks the layer's output so
    that, during backward, one autograd-engine callback is queued; it runs after the whole
    backward pass, when every layer's ``values_grad`` is complete, and calls :func:`sync_grads`.

    Args:
        model: the (unwrapped) model whose SLoPe layers to hook.
        should_sync: called at each forward; False for micro-batches that only accumulate
            (default: always sync). Setting :attr:`enabled` to False also skips syncing.
        group: process group of the data-parallel ranks (default: the world).
        clip_norm: after averaging, clip the sparse gradients by their own total L2 norm (for
            engines that clip only the dense ones, e.g. DeepSpeed's ``gradient_clipping``).
    """

    def __init__(
        self,
        model: nn.Module,
        should_sync: Callable[[], bool] | None = None,
        group=None,
        clip_norm: float | None = None,
    ):
        self.model = model
        self.should_sync = should_sync or (lambda: True)
        self.group = group
        self.clip_norm = clip_norm
        self.enabled = True
        self.syncs = 0  # number of all-reduces issued (for tests and logs)
        self.last_norm: float | None = None  # sparse gradients' L2 norm before the last clip
        self._due = False
        self._queued = False
        self._handles = [layer.register_forward_hook(self._on_forward) for layer in _sparse_layers(model)]

    def _on_forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if self.enabled and self.should_sync():
            self._due = True
        output.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _finish(self) -> None:
        self._queued = False
        if self._due:
            self._due = False
            sync_grads(self.model, group=self.group)
            self.syncs += 1
            if self.clip_norm is not None:
                self._clip()

    @torch.no_grad()
    def _clip(self) -> None:
        grads = [layer.values_grad for layer in _sparse_layers(self.model) if layer.values_grad is not None]
        if grads:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.last_norm = float(total)
            coef = torch.clamp(self.clip_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))

    def remove(self) -> None:
        """Remove the hooks (the model then needs explicit :func:`slope.sync_grads` calls)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def wrap_ddp(
    model: nn.Module,
    *,
    device_ids=None,
    broadcast_buffers: bool = False,
    sync_sparse: bool = True,
    require_sparse: bool = True,
    **ddp_kwargs,
) -> nn.parallel.DistributedDataParallel:
    """Wrap a **pruned** model in ``DistributedDataParallel`` with sparse-gradient averaging.

    Rank 0's weights (dense and sparse) and masks (also those of pruned fused MoE experts) are
    copied to every rank. Dense gradients are
    averaged by DDP; the sparse ones by :class:`SparseGradSync` (``sync_sparse=True``) on the same
    micro-batches (``with ddp.no_sync():`` skips both). With ``sync_sparse=False`` call
    ``slope.sync_grads(model)`` yourself before the sparse optimizer step.

    ``broadcast_buffers`` defaults to False: the SLoPe masks are identical on every rank and a
    per-forward broadcast would only invalidate the layers' cached operands.
    ``require_sparse=False`` accepts a model without SLoPe layers (a dense baseline, or a model
    whose layers were made dense); by default that is an error, as it usually means the model is
    being wrapped before ``prune_model``. Other keyword arguments go to ``DistributedDataParallel``.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("wrap_ddp: the model is already wrapped in DistributedDataParallel")
    if require_sparse:
        _require_pruned(model, "wrap_ddp")
    _require_group("wrap_ddp")
    # torch ≥ 2.13 renamed the per-forward buffer sync (init-time sync happens either way).
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        ddp_kwargs.setdefault("forward_sync_buffers", broadcast_buffers)
    else:
        ddp_kwargs.setdefault("broadcast_buffers", broadcast_buffers)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    broadcast_module_state(model, sparse_only=True, group=ddp.process_group)
    _sync_expert_masks(model, group=ddp.process_group)
    if sync_sparse:
        setattr(ddp, SYNC_ATTR, SparseGradSync(model, lambda: ddp.require_backward_grad_sync, ddp.process_group))
    return ddp


def rewrap_ddp(ddp: nn.parallel.DistributedDataParallel, **kwargs) -> nn.parallel.DistributedDataParallel:
    """Wrap ``ddp.module`` anew after parameters were added to it (e.g. lazy LoRA adapters).

    DDP fixes its parameter list when built. The old wrapper's sparse-gradient hooks are removed;
    drop every reference to it. The module may have no SLoPe layers left (made dense).
    ``kwargs`` go to :func:`wrap_ddp`.
    """
    sync = getattr(ddp, SYNC_ATTR, None)
    if sync is not None:
        sync.remove()
    return wrap_ddp(ddp.module, require_sparse=False, **kwargs)


def _default_shard_units(model: nn.Module) -> list[nn.Module]:
    """Every module held directly in an ``nn.ModuleList`` (the transformer blocks)."""
    return [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]


def _shard_units(model: nn.Module, units) -> list[nn.Module]:
    """``wrap_fsdp2``'s ``units``: the modules given, those a predicate on ``(name, module)`` picks,
    or by default the members of every ``nn.ModuleList``."""
    if callable(units):
        return [module for name, module in model.named_modules() if name and units(name, module)]
    return _default_shard_units(model) if units is None else units


def wrap_fsdp2(
    model: nn.Module,
    *,
    units: list[nn.Module] | Callable[[str, nn.Module], bool] | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    mesh=None,
    sync_module_states: bool = True,
    sync_sparse: bool = True,
    require_sparse: bool = True,
    shard_values: bool = True,
    ignored_params: Iterable[nn.Parameter] = (),
) -> nn.Module:
    """Shard a **pruned** model with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place.

    What FSDP2 shards: every dense parameter (embeddings, norms, ``lm_head``, the SLoPe layers'
    biases and ``lora_A``/``lora_B``) and hence the dense optimizer's state, which must be built
    **after** this call. The SLoPe layers' compressed ``values`` are not FSDP2's (``ignored_params``:
    the sparse optimizer, not autograd, updates them): with ``shard_values`` (default) each layer's
    values, averaged gradient and :class:`ADAMWSparse` moments live on one rank and are fetched
    for each forward and backward (:class:`slope.parallel.ShardedValues`); without, they are
    replicated and their gradients averaged by :class:`SparseGradSync` (matching FSDP2's averaging
    reduce-scatter), the moments replicated unless ``ADAMWSparse(shard_state=True)``. Masks and
    metadata (packed bits) are replicated. The masks of pruned fused MoE experts
    (:func:`slope.moe.expert_masks`) follow their sharded tensors: call its ``mask_grads_()`` after
    the backward passes (before clipping) and ``after_step(optimizer)`` after each step.

    Args:
        units: modules to shard as separate FSDP units (or a predicate on ``(name, module)``);
            default: the members of every ``nn.ModuleList``. The root is always sharded last.
        param_dtype / reduce_dtype: FSDP2 ``MixedPrecisionPolicy``; with ``param_dtype=bf16`` the
            SLoPe layers compute in bf16 too (``layer.compute_dtype``) while ``values`` stay the
            fp32 master weights.
        sync_module_states: copy rank 0's weights and buffers to every rank before sharding.
        sync_sparse: average sparse gradients automatically (else call ``sync_grads`` yourself;
            skip it for accumulation micro-batches, like :func:`no_sync`).
        require_sparse: ``False`` accepts a model without SLoPe layers (e.g. one fine-tuned dense
            or under masks); by default that is an error, as for :func:`wrap_ddp`.
        shard_values: keep each SLoPe layer's values on one rank between uses (ZeRO-3 over whole
            layers; implies the sparse gradient sync, so ``sync_sparse`` is ignored). Read the
            whole model with :func:`full_model_state_dict`.
        ignored_params: further parameters FSDP2 leaves whole (unsharded, their gradients not
            reduced); the caller averages their gradients (e.g. :func:`slope.peft.shard_sft_model`).

    Returns the same model object (now an ``FSDPModule``); use :func:`no_sync` for accumulation.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = _require_pruned(model, "wrap_fsdp2") if require_sparse else _sparse_layers(model)
    _require_group("wrap_fsdp2")
    if sync_module_states:
        broadcast_module_state(model)
        _sync_expert_masks(model)
    units = _shard_units(model, units)
    if param_dtype is not None:
        for layer in layers:
            layer.compute_dtype = param_dtype
    if mesh is None:  # on the model's device type (fully_shard would default to CUDA when present)
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        ignored_params={layer.values for layer in layers} | set(ignored_params),
    )
    depth = {id(module): name.count(".") for name, module in model.named_modules()}
    for unit in sorted(units, key=lambda module: -depth[id(module)]):  # innermost first
        if unit is not model:
            fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    _rebind_expert_masks(model)
    if shard_values and layers:
        setattr(model, SYNC_ATTR, ShardedValues(layers, group=mesh.get_group()))
    elif sync_sparse:
        setattr(model, SYNC_ATTR, SparseGradSync(model, group=mesh.get_group()))
    return model


def _rebind_expert_masks(model: nn.Module) -> None:
    """``fully_shard`` replaced the fused MoE expert tensors by sharded ones: their masks
    (:class:`slope.moe.ExpertMasks`) follow, split like them."""
    from slope.moe import expert_masks

    masked = expert_masks(model)
    if masked is not None:
        masked.rebind({name: model.get_parameter(name) for name in masked.params})


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``fully_shard`` (FSDP2; e.g. by :func:`wrap_fsdp2`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` trains data-parallel: a DDP wrapper or an FSDP2-sharded model."""
    return isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp2(model)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (dense and sparse) for the micro-batches run inside.

    Run the forward and backward of every micro-batch but the last of an optimizer step inside.
    DDP: ``model.no_sync()``. FSDP2: ``set_requires_gradient_sync(False)``. DeepSpeed engines
    and single-process models accumulate on their own: a no-op.
    """
    sync = getattr(model, SYNC_ATTR, None)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        previous = sync.enabled if sync is not None else None
        if sync is not None:
            sync.enabled = False
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            if sync is not None:
                sync.enabled = previous
    else:
        yield
