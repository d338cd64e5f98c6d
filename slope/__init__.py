"""slope: 2:4 semi-structured sparse pretraining and fine-tuning (SLoPe) for PyTorch.

SLoPe-compatible entry points::

    from slope import prune_model, grad_dict, sync_grads, sparse_modules, SparseOptimizerCallback
    from slope.optimizers import ADAMWSparse
"""
from slope.distributed import sync_grads
from slope.io import export_dense, from_pretrained, save_pretrained
from slope.layer import SparseLinear
from slope.lora import merge_lora
from slope.prune import prune_model
from slope.pruning import oneshot
from slope.registry import GradDict, grad_dict, sparse_modules

__version__ = "0.1.0"

__all__ = [
    "GradDict",
    "SparseLinear",
    "SparseOptimizerCallback",
    "apply",
    "export_dense",
    "finetune",
    "from_pretrained",
    "grad_dict",
    "merge_lora",
    "oneshot",
    "prune_model",
    "save_pretrained",
    "sparse_finetune",
    "sparse_modules",
    "sync_grads",
]


def __getattr__(name):
    # Imported lazily: transformers is heavy and optional for users of the custom loop.
    if name == "SparseOptimizerCallback":
        from slope.hf import SparseOptimizerCallback

        return SparseOptimizerCallback
    if name == "apply":  # slope.stages (every stage of a recipe in one run)
        from slope.stages.runner import apply

        return apply
    if name == "finetune":  # slope.recovery (seed 002's recovery fine-tuning)
        from slope.recovery.finetune import finetune

        return finetune
    if name == "sparse_finetune":  # slope.dynamic (seed 000's one call)
        from slope.dynamic.finetune import sparse_finetune

        return sparse_finetune
    raise AttributeError(f"module 'slope' has no attribute {name!r}")
