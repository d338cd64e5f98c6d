"""Dynamic sparse fine-tuning (DESIGN §8.3, seed 000): RigL, gradual pruning, top-k attention.

- :func:`sparse_finetune` — the seed's one call (also ``slope sparse-finetune``).
- :class:`DynamicSparsity` / :class:`DynamicSparsityConfig` — the same machinery for any loop;
  :class:`DynamicSparsityCallback` — for ``transformers.Trainer``.
- Policies over the shared mask core (:class:`slope.sparsity.MaskPolicy`): :class:`RigL`
  (unstructured or N:M) and :class:`GradualPruning` (schedules in :mod:`slope.dynamic.schedules`).
- :func:`enable_topk_attention` — each query attends to its top ``⌈ratio·L⌉`` keys, registered
  as a transformers attention implementation.
"""
from slope.dynamic.gradual import GradualPruning, prune_to
from slope.dynamic.policies import PolicyChain
from slope.dynamic.rigl import RigL, rigl_mask
from slope.dynamic.schedules import CubicSchedule, LinearSchedule, rigl_fraction
from slope.dynamic.sparsifier import DynamicSparsity, DynamicSparsityConfig

__all__ = [
    "CubicSchedule",
    "DynamicSparsity",
    "DynamicSparsityCallback",
    "DynamicSparsityConfig",
    "GradualPruning",
    "LinearSchedule",
    "PolicyChain",
    "RigL",
    "enable_topk_attention",
    "prune_to",
    "rigl_fraction",
    "rigl_mask",
    "sparse_finetune",
    "topk_attention",
]


def __getattr__(name):
    # Imported lazily: these need transformers (heavy; the policies above do not).
    if name == "DynamicSparsityCallback":
        from slope.dynamic.callback import DynamicSparsityCallback

        return DynamicSparsityCallback
    if name in ("enable_topk_attention", "topk_attention"):
        from slope.dynamic import attention as module

        return getattr(module, name)
    if name == "sparse_finetune":
        from slope.dynamic.finetune import sparse_finetune

        return sparse_finetune
    raise AttributeError(f"module 'slope.dynamic' has no attribute {name!r}")
