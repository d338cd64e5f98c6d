"""Distributed data-parallel training of pruned models: torchrun setup, DDP, FSDP2, DeepSpeed ZeRO-1/2,
and rank-count-independent checkpoint state. See ``docs/distributed.md``.

Rule of thumb: ``prune_model`` first, then wrap; build the dense optimizer over
``dense_parameters(model)`` after wrapping and :class:`slope.optimizers.ADAMWSparse` over the
(unwrapped) model. The wrappers average the sparse gradients on the same micro-batches on which
the engine averages the dense ones, so N ranks × batch b take the step of 1 process × batch N·b.
"""
from slope.parallel.deepspeed import (
    deepspeed_initialize,
    deepspeed_rebuild,
    deepspeed_train_config,
    is_deepspeed_engine,
    load_deepspeed_config,
)
from slope.parallel.env import (
    DistEnv,
    accelerate_fsdp,
    accelerate_fsdp_note,
    accelerate_mixed_precision,
    env_flag,
    configure_rank_zero_logging,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    launched_rank,
    launched_with_fsdp,
    mean_over_ranks,
    sum_over_ranks,
    rank_slice,
)
from slope.parallel.sharded_values import ShardedValues, holds_values
from slope.parallel.state import (
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    to_index_keyed,
    to_name_keyed,
)
from slope.parallel.wrap import (
    SparseGradSync,
    broadcast_module_state,
    dense_parameters,
    is_data_parallel,
    is_fsdp2,
    no_sync,
    rewrap_ddp,
    unwrap,
    wrap_ddp,
    wrap_fsdp2,
)

__all__ = [
    "DistEnv",
    "accelerate_fsdp",
    "accelerate_fsdp_note",
    "accelerate_mixed_precision",
    "env_flag",
    "ShardedValues",
    "SparseGradSync",
    "broadcast_module_state",
    "configure_rank_zero_logging",
    "deepspeed_initialize",
    "deepspeed_rebuild",
    "deepspeed_train_config",
    "dense_parameters",
    "destroy_distributed",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "get_rank",
    "get_world_size",
    "holds_values",
    "init_distributed",
    "is_data_parallel",
    "is_deepspeed_engine",
    "is_fsdp2",
    "is_main_process",
    "launched_rank",
    "launched_with_fsdp",
    "load_deepspeed_config",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "mean_over_ranks",
    "sum_over_ranks",
    "no_sync",
    "rank_slice",
    "rewrap_ddp",
    "to_index_keyed",
    "to_name_keyed",
    "unwrap",
    "wrap_ddp",
    "wrap_fsdp2",
]
