"""Hugging Face ``Trainer`` integration: step the sparse optimizer from a ``TrainerCallback``.

The SLoPe README's HF path, with our imports::

    prune_model(model, compress=True)
    sparse_opt = ADAMWSparse(model, grad_dict)
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=float("inf")),
                      callbacks=[SparseOptimizerCallback(sparse_opt, max_grad_norm=1.0)])
    trainer.train()

The ``Trainer`` optimises the dense parameters (biases, norms, embeddings, adapters); the sparse
weights' gradients live on the SLoPe layers (``values_grad``), so the callback steps
:class:`slope.optimizers.ADAMWSparse` once per optimizer step, right before the dense step
(``on_pre_optimizer_step``: after all gradient-accumulation micro-batches). Works with
transformers 5.x, whose callback events receive ``model``, ``optimizer`` and ``lr_scheduler``.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import TrainerCallback

from slope.distributed import sync_grads
from slope.registry import sparse_modules
from slope.serialization.jsonfile import read_json_object
from slope.trainer_state import read_checkpoint_file, refuse_sharded_trainer, resumed_checkpoint_dir, save_in_trainer_checkpoint

__all__ = ["SparseOptimizerCallback", "SPARSE_OPTIMIZER_NAME"]

#: File (in each Trainer ``checkpoint-<step>`` folder) holding the sparse optimizer's state dict.
SPARSE_OPTIMIZER_NAME = "slope_sparse_optimizer.pt"


def _unwrap_scheduler(scheduler):
    """The torch scheduler inside accelerate's ``AcceleratedScheduler`` (which keeps it in ``.scheduler``)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and hasattr(scheduler, "scheduler"):
        return scheduler.scheduler
    return scheduler


def _extend_schedule(scheduler, base_lr: float) -> None:
    """Give a param group appended to the optimizer its own slot in ``scheduler`` (and nested ones).

    torch schedulers keep per-group lists (``base_lrs``; ``lr_lambdas`` for ``LambdaLR`` /
    ``MultiplicativeLR``; ``min_lrs`` for ``ReduceLROnPlateau``) and zip them with the optimizer's
    groups, so a group without a slot would silently keep a constant LR. The new slot copies
    group 0's (the Trainer's decayed group).
    """
    scheduler = _unwrap_scheduler(scheduler)
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR / ChainedScheduler
        _extend_schedule(child, base_lr)
    for name in ("lr_lambdas", "min_lrs"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and values:
            values.append(values[0])
    if isinstance(getattr(scheduler, "base_lrs", None), list):
        scheduler.base_lrs.append(base_lr)
    if isinstance(getattr(scheduler, "_last_lr", None), list) and scheduler._last_lr:
        scheduler._last_lr.append(scheduler._last_lr[0])


@torch.no_grad()
def _average_grads(params: list[nn.Parameter]) -> None:
    """Average ``params``' gradients over the data-parallel ranks (a no-op outside ``torch.distributed``).

    Adapters attached mid-run are unknown to a ``DistributedDataParallel`` wrapper built at train
    begin, so their gradients are averaged here (missing ones count as zeros on that rank).
    """
    if not params or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _refuse_unattached_adapters(layer, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook on the callback's SLoPe layers: a state holding adapters for a
    layer without them is a checkpoint saved after the lazy adapters were attached (the Trainer would
    drop them as unexpected keys, then fail to restore its optimizer's extra param group)."""
    if not layer.lora_rank and prefix + "lora_A" in state_dict:
        raise ValueError(
            f"{layer.layer_name or prefix.rstrip('.')}: the checkpoint holds lazy LoRA adapters (saved after "
            "SparseOptimizerCallback attached them), which a Trainer cannot resume: resume from a checkpoint saved "
            "before they were attached, or continue as a new run from model = slope.from_pretrained(<checkpoint>) "
            "without resume_from_checkpoint"
        )


class SparseOptimizerCallback(TrainerCallback):
    """Steps a sparse optimizer inside ``transformers.Trainer`` (and, optionally, adds lazy adapters).

    At every optimizer step (``on_pre_optimizer_step``, once per ``gradient_accumulation_steps``
    micro-batches) it: averages the sparse gradients (and those of adapters it attached, which a DDP
    wrapper built earlier does not see) over data-parallel ranks (:func:`slope.sync_grads`, a no-op
    outside ``torch.distributed``); clips the sparse and the dense
    gradients by their *joint* norm when ``max_grad_norm`` is set; copies the Trainer's current
    learning rate and weight decay (from the dense optimizer's first param group) to the sparse
    optimizer; steps and zeroes it. The dense step follows in the Trainer.

    Set ``TrainingArguments(max_grad_norm=float("inf"))`` and clip here instead: the Trainer clips
    before this callback runs and sees only the dense gradients. A finite Trainer ``max_grad_norm``
    triggers a warning (sparse gradients unclipped) or, together with ``max_grad_norm`` here, an
    error (the dense gradients would be clipped twice).

    Args:
        sparse_opt: :class:`slope.optimizers.ADAMWSparse` over the pruned model.
        max_grad_norm: joint 2-norm bound for sparse + dense gradients, or ``None`` (no clipping).
        lazy_lora_fraction: ``F`` in (0, 1): attach adapters (``layer.add_lora``) to every SLoPe
            layer before optimizer step ``ceil((1 - F) · max_steps)`` (0-based: after that many
            steps), so they train for the last ``floor(F · max_steps)`` steps. Their parameters join
            the Trainer's optimizer as a new param group (weight decay and LR schedule of group 0).
        lora_rank / lora_alpha: adapter rank ``r`` (required with ``lazy_lora_fraction``) and ``α``
            (defaults to ``r``).

    Checkpoints: at every Trainer save the sparse optimizer's state goes to
    ``<output_dir>/checkpoint-<step>/slope_sparse_optimizer.pt``, and ``trainer.train(resume_from_checkpoint=...)``
    restores it from the folder resumed from, also when that lies outside this Trainer's ``output_dir``
    (the Trainer restores the weights, masks and dense optimizer). Resuming from a checkpoint saved
    after lazy adapters were attached is not supported (the Trainer rebuilds and restores its
    optimizer before callbacks run, without the adapters' param group): loading such a checkpoint
    into the callback's layers is a one-line ``ValueError`` saying what to do instead. With
    ``load_best_model_at_end``, a best checkpoint saved before the adapters were attached leaves the
    model without them (:meth:`on_train_end`).

    Logged ``grad_norm``: the Trainer logs the norm of ``model.parameters()``' gradients, computed
    before ``on_pre_optimizer_step``. So that it is the joint norm, each SLoPe layer's sparse
    gradient is also visible as ``values.grad`` (the same tensor as ``values_grad``; ``values``
    stays out of every optimizer: ``requires_grad=False``) from ``on_step_begin`` until this
    callback's ``on_pre_optimizer_step``, which removes it before any optimizer steps. Only when
    the Trainer does not clip (``max_grad_norm`` inf or 0). Under data parallelism the logged norm
    uses each rank's sparse gradients before averaging; :attr:`grad_norm` is exact.

    Attributes:
        grad_norm: joint (sparse + dense) gradient norm before clipping at the last step, or ``None``.
        lora_step: the global step at which adapters are attached (set at train begin), or ``None``.
    """

    def __init__(
        self,
        sparse_opt: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        lazy_lora_fraction: float | None = None,
        lora_rank: int | None = None,
        *,
        lora_alpha: float | None = None,
    ):
        for method in ("step", "zero_grad", "clip_grad_norm", "layers"):
            if not callable(getattr(sparse_opt, method, None)):
                raise TypeError(
                    f"sparse_opt must be a slope sparse optimizer (e.g. slope.optimizers.ADAMWSparse(model)); "
                    f"{type(sparse_opt).__name__} has no {method}()"
                )
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        if lazy_lora_fraction is None:
            if lora_rank is not None or lora_alpha is not None:
                raise ValueError("lora_rank/lora_alpha need lazy_lora_fraction (the fraction of steps trained with adapters)")
        else:
            if not 0.0 < lazy_lora_fraction < 1.0:
                raise ValueError(f"lazy_lora_fraction must be in (0, 1), got {lazy_lora_fraction!r} (SLoPe uses 0.01)")
            if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank <= 0:
                raise ValueError(f"lazy_lora_fraction needs a positive int lora_rank, got {lora_rank!r}")
        self.sparse_opt = sparse_opt
        self.max_grad_norm = max_grad_norm
        self.lazy_lora_fraction = lazy_lora_fraction
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.grad_norm: torch.Tensor | None = None
        self.lora_step: int | None = None
        self._lora_params: list[nn.Parameter] = []
        self._expose_grads = True  # alias values_grad as values.grad for the Trainer's logged norm
        self._parts: tuple | None = None  # ((id(model), global_step), SLoPe layers, expert masks): see _model_parts
        # the Trainer loads a resumed checkpoint before on_train_begin, which removes these hooks again
        self._resume_hooks = [layer.register_load_state_dict_pre_hook(_refuse_unattached_adapters) for layer in sparse_opt.layers()]

    # ------------------------------------------------------------------ checks at train begin
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for handle in self._resume_hooks:  # the checkpoint (if any) is loaded: no other load is the Trainer's resume
            handle.remove()
        self._resume_hooks = []
        refuse_sharded_trainer(args, "SparseOptimizerCallback")
        self._parts = None
        if model is None:
            raise RuntimeError("SparseOptimizerCallback needs the Trainer's model (transformers >= 5 passes it)")
        layers = [m for _, m in sparse_modules(model)]
        if not layers:
            raise ValueError(
                f"SparseOptimizerCallback: the Trainer's model ({type(model).__name__}) has no SLoPe layers; "
                "call slope.prune_model(model) and build the sparse optimizer on that model"
            )
        owned = {id(layer) for layer in self.sparse_opt.layers()}
        missing = [layer.layer_name or "?" for layer in layers if id(layer) not in owned]
        if missing:
            raise ValueError(
                f"SparseOptimizerCallback: {len(missing)} SLoPe layers of the model are not in the sparse optimizer "
                f"(e.g. {missing[:3]}) and would never be updated; build it as ADAMWSparse(model) after prune_model"
            )
        if getattr(args, "fp16", False):
            raise NotImplementedError(
                "SparseOptimizerCallback does not support TrainingArguments(fp16=True): the Trainer's loss scaler "
                "does not cover the sparse gradients. Use bf16=True, or slope's own training loop for fp16"
            )
        trainer_clip = args.max_grad_norm is not None and 0 < args.max_grad_norm < math.inf
        if trainer_clip and self.max_grad_norm is not None:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips the dense gradients alone before "
                f"SparseOptimizerCallback(max_grad_norm={self.max_grad_norm}) clips jointly: the dense gradients would "
                "be clipped twice. Set TrainingArguments(max_grad_norm=float('inf'))"
            )
        self._expose_grads = not trainer_clip  # the Trainer must only measure the norm, never clip with it
        if trainer_clip:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips only the dense gradients; the sparse "
                "gradients stay unclipped. Set TrainingArguments(max_grad_norm=float('inf')) and pass "
                f"SparseOptimizerCallback(sparse_opt, max_grad_norm={args.max_grad_norm}) to clip them jointly",
                UserWarning,
                stacklevel=2,
            )
        if self.lazy_lora_fraction is not None:
            self._plan_lora(layers, state.max_steps)
        if state.global_step > 0:
            self._resume(args, state)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, args, state) -> None:
        path = os.path.join(resumed_checkpoint_dir(args, state), SPARSE_OPTIMIZER_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"resuming at step {state.global_step} without {path}: the sparse optimizer starts from fresh "
                "moments (the checkpoint was not written with SparseOptimizerCallback)",
                UserWarning,
                stacklevel=3,
            )
            return
        self.sparse_opt.load_state_dict(read_checkpoint_file(path))

    def on_save(self, args, state, control, **kwargs):
        full = self.sparse_opt.full_state_dict() if hasattr(self.sparse_opt, "full_state_dict") else self.sparse_opt.state_dict()
        save_in_trainer_checkpoint(args, state, SPARSE_OPTIMIZER_NAME, full)  # (every rank: a sharded state is gathered)

    def _plan_lora(self, layers: list[nn.Module], max_steps: int) -> None:
        with_lora = [layer for layer in layers if layer.lora_rank]
        if with_lora and len(with_lora) != len(layers):
            raise ValueError("some SLoPe layers already carry adapters and some do not; lazy_lora_fraction needs none or all")
        lora_steps = math.floor(round(self.lazy_lora_fraction * max_steps, 9))
        self.lora_step = max_steps - lora_steps
        if with_lora:
            return  # resumed after attaching (the adapters were restored with the model)
        if lora_steps == 0:
            warnings.warn(
                f"lazy_lora_fraction={self.lazy_lora_fraction} of max_steps={max_steps} is less than one step: "
                "no adapters will be attached; raise the fraction or train longer",
                UserWarning,
                stacklevel=3,
            )

    def _model_parts(self, model: nn.Module, state) -> tuple[list[nn.Module], object | None]:
        """``model``'s SLoPe layers and its MoE :class:`slope.moe.ExpertMasks` (or None), found by
        walking its modules once per optimizer step (the events of one step share the walk; the
        key ``(id(model), state.global_step)`` changes every step, so a model changed between steps,
        e.g. re-pruned, is walked afresh; adapters attached within a step add no modules)."""
        from slope.moe import expert_masks

        key = (id(model), state.global_step)
        if self._parts is None or self._parts[0] != key:
            self._parts = (key, [m for _, m in sparse_modules(model)], expert_masks(model))
        return self._parts[1], self._parts[2]

    # ------------------------------------------------------------------ lazy adapters
    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._attach_lora(state, model, optimizer, lr_scheduler)
        if self._expose_grads and model is not None:
            for layer in self._model_parts(model, state)[0]:
                if layer.sparse_requires_grad:
                    if layer.values_grad is None:  # accumulated into in place from now on
                        layer.values_grad = torch.zeros_like(layer.values)
                    layer.values.grad = layer.values_grad

    def _attach_lora(self, state, model, optimizer, lr_scheduler) -> None:
        if self.lora_step is None or state.global_step < self.lora_step:
            return
        layers = self._model_parts(model, state)[0]
        if all(layer.lora_rank for layer in layers):
            return
        params = []
        for layer in layers:
            layer.add_lora(self.lora_rank, self.lora_alpha)
            params += [layer.lora_A, layer.lora_B]
        self._add_param_group(params, optimizer, lr_scheduler)
        self._lora_params = params

    @staticmethod
    def _add_param_group(params: list[nn.Parameter], optimizer, lr_scheduler) -> None:
        """Add ``params`` to the Trainer's optimizer with group 0's hyper-parameters and schedule."""
        if optimizer is None:
            raise RuntimeError("lazy adapters need the Trainer's optimizer (transformers >= 5 passes it to callbacks)")
        first = optimizer.param_groups[0]
        group = {key: value for key, value in first.items() if key != "params"}
        group["params"] = params
        base_lr = first.get("initial_lr", first["lr"])
        if "initial_lr" in first:
            group["initial_lr"] = base_lr
        optimizer.add_param_group(group)  # accelerate's wrapper forwards to the torch optimizer
        if lr_scheduler is not None:
            _extend_schedule(lr_scheduler, base_lr)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """With ``load_best_model_at_end`` the Trainer has loaded the best checkpoint (``strict=False``):
        if it was saved before the lazy adapters were attached, drop them, so that the model is that
        checkpoint's rather than its weights plus adapters trained afterwards."""
        if not (self._lora_params and args.load_best_model_at_end and state.best_model_checkpoint and model is not None):
            return
        config = os.path.join(state.best_model_checkpoint, "config.json")
        if not os.path.isfile(config):
            return
        saved = read_json_object(config, lambda why: ValueError(f"{config} is corrupt ({why})")).get("slope_config") or {}
        ranks = {name: record.get("lora_rank") for name, record in saved.get("layers", {}).items()}
        for name, layer in sparse_modules(model):
            if layer.lora_rank and ranks.get(name) == 0:
                layer.remove_lora()
        self._lora_params = [p for _, layer in sparse_modules(model) if layer.lora_rank for p in (layer.lora_A, layer.lora_B)]

    # ------------------------------------------------------------------ the sparse step
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        for layer in self._model_parts(model, state)[0]:  # the Trainer has logged its norm: no optimizer may see them
            layer.values.grad = None
        sync_grads(model)
        _average_grads(self._lora_params)
        if self.max_grad_norm is not None:
            dense = None if model is None else [p for p in model.parameters() if p.grad is not None]
            self.grad_norm = self.sparse_opt.clip_grad_norm(self.max_grad_norm, dense_parameters=dense)
        if optimizer is not None:
            first = optimizer.param_groups[0]
            self.sparse_opt.lr = first["lr"]
            self.sparse_opt.weight_decay = first.get("weight_decay", 0.0)
        self.sparse_opt.step()
        self.sparse_opt.zero_grad()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        masked = None if model is None else self._model_parts(model, state)[1]
        if masked is not None:  # fused MoE experts pruned in simulation: pruned weights and their Adam state stay zero
            masked.after_step(getattr(optimizer, "optimizer", optimizer))
