"""Fast inference of pruned models: the merged forms' adapter fold (:mod:`.fold`), CUDA-graph
decoding with a static KV cache (:mod:`.decode`), and tokens/s of every inference mode."""
from .fold import FOLDS, choose_fold

__all__ = ["FOLDS", "choose_fold"]
