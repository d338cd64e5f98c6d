"""``SIFT``: sparse increment fine-tuning (Song et al. 2023), SIFT's API.

For every parameter whose name contains one of ``sparse_module``, SIFT trains ``k =
min(int(sparse_rate · numel) + 1, numel)`` entries, chosen as the largest ``|gradient|`` of the
first micro-batch and fixed afterwards. The optimizer sees only the sparse parameters
(``sift.named_parameters_in_optimizer()``), each a ``(k,)`` tensor of *pending increments* with
``.idx`` (``(ndim, k)`` coordinates into its weight):

- backward: a post-accumulate-grad hook on the weight gathers its gradient at the ``k`` entries
  into the sparse parameter's ``.grad`` (summing over micro-batches) and drops the full gradient
  at once, so at most one weight's full gradient exists at any time;
- forward: a pre-hook on the owning module adds the pending increment (what the optimizer wrote
  since the last forward) into the weight and zeroes it, so every forward sees the updated weights;
- ``state_dict``: adds the pending increment too and records the chosen entries instead of the
  increments (:mod:`slope.peft.sift_state`), so saves lose no step and a resumed run trains the
  same entries. A user may choose the entries (``sparse_mapping[name].idx``, ``(ndim, k)``) before
  the first backward.

The increment restarts from zero each step, so an optimizer whose update depends on the
parameter's value (weight decay) sees ~0 there: like the original, SIFT has no weight decay on the
sparse entries. ``exception`` names parameters trained densely. ``save_pretrained`` writes only the
increments (and the ``exception`` parameters); :func:`slope.peft.load_sift` adds them to a fresh copy
of the base model.

Data parallel (torchrun; the original is single-process): do not wrap the model in DDP (its full
gradients never persist for DDP to reduce); call :meth:`SIFT.all_reduce_grads` after a step's
backward passes and before ``optimizer.step()``: it averages the increments' gradients (``k`` values
per weight) and the ``exception`` parameters' over the ranks. The entries are chosen from the
gradient summed over the ranks (one full-size all-reduce per weight, once), so every rank trains
the same entries — those one process would pick from the whole first batch.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from slope.layer import SparseLinear
from slope.parallel import get_world_size

from slope.peft.delta import check_indices
from slope.peft.model import fingerprint
from slope.peft.selection import largest
from slope.peft.sift_state import install_state_hooks

__all__ = ["SIFT"]


class SIFT:
    """Sparse increment fine-tuning of ``model`` in place (see the module docstring)."""

    def __init__(self, model: nn.Module, sparse_rate: float = 0.01, sparse_module: Iterable[str] = (),
                 exception: Iterable[str] | None = None, grad_acc: int = 1, gradient_checkpointing: bool = False):
        if not isinstance(sparse_rate, (int, float)) or not 0.0 < float(sparse_rate) <= 1.0:
            raise ValueError(f"sparse_rate must be in (0, 1] (the fraction of each weight to train), got {sparse_rate!r}")
        if int(grad_acc) < 1:
            raise ValueError(f"grad_acc must be >= 1, got {grad_acc!r}")
        self.model = model
        self.sparse_rate = float(sparse_rate)
        self.sparse_module = list(sparse_module)
        self.exception = list(exception or [])
        self.grad_acc = int(grad_acc)  # SIFT's argument; the hooks sum any number of micro-batches
        self.gradient_checkpointing = gradient_checkpointing
        self.total_num = sum(p.numel() for p in model.parameters())
        self.sparse_mapping: dict[str, nn.Parameter] = {}
        self.base_fingerprints: dict[str, list[float]] = {}
        self._trainable: list[tuple[str, nn.Parameter]] = []
        self._in_optimizer: list[tuple[str, nn.Parameter]] = []
        self._handles = []
        self._idx_set: dict[str, torch.Tensor] = {}  # the .idx SIFT set itself (another object: the user's)
        self._register(list(model.named_parameters()))
        if gradient_checkpointing:
            self._input_grads()
        self._handles.extend(install_state_hooks(self))
        self._handles.append(model.register_forward_pre_hook(self._refuse_wrappers))

    def _register(self, named: list[tuple[str, nn.Parameter]]) -> None:
        for name, p in named:
            if any(key in name for key in self.sparse_module):
                self._check_dense(name)
                self._add_sparse(name, p)
            elif any(key in name for key in self.exception):
                p.requires_grad_(True)
                self._trainable.append((name, p))
                self._in_optimizer.append((name, p))
            else:
                p.requires_grad_(False)
        if not self.sparse_mapping:
            aliases = {n: shared for n, shared in _tied_aliases(self.model).items() if any(key in n for key in self.sparse_module)}
            hint = (f"; {next(iter(aliases))} is tied to {next(iter(aliases.values()))} (one tensor), which is listed under that name: "
                    "name it instead (its increments then act in both places)" if aliases else "")
            raise ValueError(f"sparse_module {self.sparse_module} matches no parameter name of the model{hint}")

    def _check_dense(self, name: str) -> None:
        """SIFT's increments ride on the dense gradient of ``name``; a SLoPe 2:4 layer has none
        (its kept values get their gradient in the layer's own buffer), so nothing would train."""
        owner = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
        if isinstance(owner, SparseLinear):
            raise ValueError(
                f"sparse_module {self.sparse_module} matches {name}, a SLoPe 2:4 layer's weights (prune_model), which "
                "train through slope.ADAMWSparse and never get the dense gradient SIFT needs; run SIFT on the dense "
                "model, or fine-tune the pruned one with slope.finetune / ADAMWSparse"
            )

    def _add_sparse(self, name: str, p: nn.Parameter) -> None:
        k = min(int(self.sparse_rate * p.numel()) + 1, p.numel())
        sparse = nn.Parameter(p.new_zeros(k))
        sparse.train_num = k
        sparse.idx = None  # (ndim, k) after the first backward
        sparse.flat_idx = None
        sparse.base_values = None  # the chosen entries' values before training (what a saved delta is relative to)
        self.base_fingerprints[name] = fingerprint(p)
        p.requires_grad_(True)
        self.sparse_mapping[name] = sparse
        self.model.register_parameter(name.replace(".", "_") + "_sparse", sparse)
        self._trainable.append((name, p))
        self._in_optimizer.append((name + "_sparse", sparse))
        self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name, sparse)))
        owner = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
        self._handles.append(owner.register_forward_pre_hook(self._apply_hook(p, sparse)))

    def _grad_hook(self, name: str, sparse: nn.Parameter):
        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None
            flat = grad.reshape(-1)
            self._check_user_idx(name, sparse, p)
            if sparse.flat_idx is None:
                scores = flat.float()
                if get_world_size() > 1:  # every rank picks the entries of the gradient summed over the ranks
                    scores = scores.clone()
                    dist.all_reduce(scores)
                self.set_entries(name, p, largest(scores.abs(), sparse.train_num))
            picked = flat[sparse.flat_idx].to(sparse.dtype)
            if sparse.grad is None:
                sparse.grad = picked
            else:
                sparse.grad += picked

        return hook

    @torch.no_grad()
    def set_entries(self, name: str, p: torch.Tensor, flat_idx: torch.Tensor) -> None:
        """Train the entries ``flat_idx`` (``(k,)`` int64 flat positions) of parameter ``name`` (``p``):
        sets ``.flat_idx``, ``.idx`` (``(ndim, k)``) and ``.base_values`` (their current values)."""
        sparse = self.sparse_mapping[name]
        flat_idx = torch.as_tensor(flat_idx)
        if flat_idx.numel() != sparse.train_num:
            raise ValueError(f"SIFT trains {sparse.train_num} entries of {name} (its sparse parameter's size), got {flat_idx.numel()} indices")
        check_indices(flat_idx, tuple(p.shape), f"the SIFT indices of {name}")
        sparse.flat_idx = flat_idx.to(p.device, torch.long)
        sparse.base_values = p.detach().reshape(-1)[sparse.flat_idx].clone()
        sparse.idx = torch.stack(torch.unravel_index(sparse.flat_idx, p.shape))
        self._idx_set[name] = sparse.idx

    def _check_user_idx(self, name: str, sparse: nn.Parameter, p: torch.Tensor) -> None:
        """Honour ``sparse_mapping[name].idx`` set by the user (SIFT's "customize the selection":
        ``(ndim, k)`` coordinates, numpy or torch) before the first backward; refuse a change later."""
        if sparse.idx is None or sparse.idx is self._idx_set.get(name):
            return
        if sparse.flat_idx is not None:
            raise ValueError(f"sparse_mapping[{name!r}].idx was changed after SIFT chose its entries: set it before the first backward")
        coords = torch.as_tensor(sparse.idx)
        if coords.dtype.is_floating_point or coords.dim() != 2 or coords.shape[0] != p.dim():
            raise ValueError(f"sparse_mapping[{name!r}].idx must be integer coordinates of shape ({p.dim()}, k), "
                             f"e.g. np.stack(np.unravel_index(flat, p.shape)); got {coords.dtype} {tuple(coords.shape)}")
        for d, size in enumerate(p.shape):
            if coords.shape[1] and (int(coords[d].min()) < 0 or int(coords[d].max()) >= size):
                raise ValueError(f"sparse_mapping[{name!r}].idx row {d} must lie in [0, {size}) for a weight of shape {tuple(p.shape)}")
        flat = torch.zeros(coords.shape[1], dtype=torch.long)
        for d, size in enumerate(p.shape):  # row-major, as p.reshape(-1)
            flat = flat * size + coords[d].long().cpu()
        self.set_entries(name, p, flat)

    def _refuse_wrappers(self, module, args) -> None:  # noqa: ARG002
        """A one-line ``ValueError`` at a forward under DDP or FSDP: SIFT's hooks take each weight's
        gradient before DDP could average it (the ranks drift apart), and FSDP's ``fully_shard``
        replaces the weights the hooks sit on (nothing trains)."""
        active = nn.parallel.DistributedDataParallel._get_active_ddp_module()
        if active is not None and active.module is self.model:
            engine = "DistributedDataParallel (as the Trainer wraps it under torchrun)"
        elif any(self.model.get_parameter(name) is not p for name, p in self._trainable if name in self.sparse_mapping):
            engine = "FSDP (fully_shard replaced its weights)"
        else:
            return
        raise ValueError(f"SIFT does not train under {engine}: run the unwrapped model on every rank in your own loop and call "
                         "sift.all_reduce_grads() before optimizer.step() (docs/peft.md, 'Data parallel')")

    @staticmethod
    def _apply_hook(p: nn.Parameter, sparse: nn.Parameter):
        seen = [sparse._version]

        @torch.no_grad()
        def hook(module, args) -> None:  # noqa: ARG001
            if sparse._version != seen[0] and sparse.flat_idx is not None:
                p.data.view(-1).index_add_(0, sparse.flat_idx, sparse.to(p.dtype))
                sparse.zero_()
            seen[0] = sparse._version

        return hook

    def _input_grads(self) -> None:
        """Reentrant checkpointing needs an input that requires grad: the embeddings' output."""
        get = getattr(self.model, "get_input_embeddings", None)
        embeddings = get() if get is not None else None
        if embeddings is None:
            raise ValueError("gradient_checkpointing=True needs a model with get_input_embeddings() (a Hugging Face model)")
        self._handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))

    # ------------------------------------------------------------------ SIFT's API
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._trainable)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self._trainable)

    def named_parameters_in_optimizer(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._in_optimizer)

    def parameters_in_optimizer(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self._in_optimizer)

    def get_trainable_num(self) -> int:
        return sum(p.numel() for p in self.parameters_in_optimizer())

    def print_trainable_parameters(self) -> None:
        n = self.get_trainable_num()
        print(f"trainable params: {n:,d} || all params: {self.total_num:,d} || trainable%: {100 * n / self.total_num:.4f}")

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """Average the gradients of every parameter in the optimizer (increments and ``exception``
        parameters) over the ranks of the default process group; nothing in one process."""
        world = get_world_size()
        if world == 1:
            return
        for _, p in self._in_optimizer:
            if p.grad is None:  # (a rank whose micro-batches did not reach it: all ranks must join)
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Add any increment the optimizer wrote since the last forward (before saving or exporting)."""
        for name, p in self._trainable:
            sparse = self.sparse_mapping.get(name)
            if sparse is not None and sparse.flat_idx is not None:
                p.data.view(-1).index_add_(0, sparse.flat_idx, sparse.to(p.dtype))
                sparse.zero_()

    def save_pretrained(self, save_directory) -> None:
        """Write the trained increments alone (:func:`slope.peft.sift_io.save_sift`)."""
        from slope.peft.sift_io import save_sift

        save_sift(self, save_directory)

    def remove_hooks(self) -> None:
        """Detach SIFT from the model (training and state-dict hooks; the weights keep every
        applied increment — call :meth:`apply_pending` first if a step is pending)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for parameters listed only under another name (tied weights, e.g. GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``); ``named_parameters()`` shows each tensor once."""
    first = {id(p): n for n, p in model.named_parameters()}
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
