"""Process-group setup from the ``torchrun`` environment, rank queries and rank-0-only logging.

``torchrun --nproc_per_node=N`` (and DeepSpeed's launcher) export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them. Without
them (a plain ``python`` run) everything here describes a single process and no group is made.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "accelerate_fsdp",
    "env_flag",
    "launched_rank",
    "launched_with_fsdp",
    "init_distributed",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "mean_over_ranks",
    "configure_rank_zero_logging",
    "rank_slice",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device.

    ``created_group`` is True when :func:`init_distributed` made the process group (so
    :func:`destroy_distributed` should end it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` as a launcher (``torchrun``, ``accelerate launch``) exported them,
    ``(0, 1)`` for a plain run; no process group is needed (e.g. to let one rank speak or work alone)."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float = 600.0,
    single_process_group: bool = False,
) -> DistEnv:
    """Join the process group described by the ``torchrun`` environment variables.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default ``nccl`` when the device is CUDA, else ``gloo``.
        device: ``"cpu"`` or ``"cuda"``; default CUDA (``cuda:LOCAL_RANK``) when available.
        timeout_s: collective timeout.
        single_process_group: without ``torchrun``, still create a group of one process (for
            engines that insist on one, like DeepSpeed).

    Returns a :class:`DistEnv`. Without ``WORLD_SIZE``/``RANK`` in the environment this is a
    single process (``rank=0, world_size=1``) and no group is created unless asked; an already
    initialised group is reused (``created_group=False``).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, False)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1:
        if not single_process_group:
            return DistEnv(0, 1, 0, device, False)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return DistEnv(0, 1, 0, device, True)
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc_per_node=N ...` (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, device, True)


def destroy_distributed(env: DistEnv) -> None:
    """End the process group if :func:`init_distributed` created it, after a final barrier — none while an
    exception (an error, a second SIGINT / SIGTERM) is on its way out: the other ranks may be inside a
    collective this rank will never join, where a barrier would hang them all (this rank's exit lets
    the launcher stop them). A multi-rank NCCL group is then left as it is too (its teardown may wait
    for those collectives)."""
    if not (env.created_group and dist.is_initialized()):
        return
    leaving = sys.exc_info()[1] is not None
    if not leaving:
        dist.barrier()
    elif env.world_size > 1 and dist.get_backend() == "nccl":
        return
    dist.destroy_process_group()


def get_rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the rank that logs and writes files."""
    return get_rank() == 0


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each number summed over all ranks, in float64 (the numbers themselves in a single
    process). Collective: every rank passes as many numbers."""
    if get_world_size() == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def mean_over_ranks(value: float) -> float:
    """The average of a number over all ranks (the number itself in a single process). Collective."""
    return sum_over_ranks([value])[0] / get_world_size()


def configure_rank_zero_logging(logger: str | logging.Logger = "slope", rank: int | None = None) -> None:
    """Silence INFO/DEBUG records of ``logger`` on every rank but 0 (warnings and errors stay).

    Call once after :func:`init_distributed`. Idempotent; ``rank`` defaults to :func:`get_rank`.
    """
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    if (get_rank() if rank is None else rank) != 0:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))


def rank_slice(batch: torch.Tensor, rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """This rank's contiguous share of a global batch ``(B, ...)``: rows ``rank·B/W … (rank+1)·B/W``.

    Every rank reading the same global batch and keeping its slice makes N ranks × batch B/N
    consume exactly the data of 1 process × batch B, so runs (and resumes) do not depend on N.
    ``B`` must be divisible by the world size.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    total = batch.shape[0]
    if total % world_size:
        raise ValueError(
            f"global batch of {total} rows does not split evenly over {world_size} ranks; "
            f"use a batch size divisible by the number of processes"
        )
    share = total // world_size
    return batch[rank * share : (rank + 1) * share]


_SHARDING = {"1": True, "FULL_SHARD": True, "2": False, "SHARD_GRAD_OP": False}


def env_flag(name: str, default: str = "false") -> bool:
    """Whether the environment variable ``name`` says true (``true`` / ``1``, any case), as launchers write flags."""
    return os.environ.get(name, default).strip().lower() in ("true", "1")


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (``ACCELERATE_USE_FSDP``)."""
    return env_flag("ACCELERATE_USE_FSDP")


def accelerate_mixed_precision() -> str | None:
    """``"bf16"`` / ``"fp16"``: the ``mixed_precision`` of an ``accelerate launch`` config
    (``ACCELERATE_MIXED_PRECISION``), else ``None``."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    return launched if launched in ("bf16", "fp16") else None


def requested_fsdp(fsdp: bool) -> dict | None:
    """The FSDP settings a run asks for: an accelerate FSDP config's (:func:`accelerate_fsdp`), else
    FULL_SHARD without activation checkpointing when ``fsdp``, else ``None`` (no FSDP)."""
    return accelerate_fsdp() or ({"reshard_after_forward": True, "activation_checkpointing": False} if fsdp else None)


def accelerate_fsdp_note(settings: dict) -> str:
    """The line that says which FSDP settings an accelerate config gave (:func:`accelerate_fsdp`)."""
    return (f"FSDP from the accelerate config: {'FULL_SHARD' if settings['reshard_after_forward'] else 'SHARD_GRAD_OP'}, "
            f"activation checkpointing {'on' if settings['activation_checkpointing'] else 'off'}")


def accelerate_fsdp() -> dict | None:
    """The FSDP settings of an ``accelerate launch --config_file <FSDP config>`` (it exports
    ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*``), or ``None`` for any other launch.

    Returns ``{"reshard_after_forward": bool, "activation_checkpointing": bool}``: FULL_SHARD (1)
    reshards after the forward, SHARD_GRAD_OP (2) does not (FSDP version 2 configs give
    ``fsdp_reshard_after_forward`` directly). Settings slope's FSDP2 cannot honour (other sharding
    strategies, parameter offload) are a one-line ``ValueError``.
    """
    if not launched_with_fsdp():
        return None
    if env_flag("FSDP_OFFLOAD_PARAMS"):
        raise ValueError("the accelerate config sets fsdp_offload_params: true; slope's FSDP keeps parameters on the "
                         "device: set it to false")
    if os.environ.get("FSDP_VERSION", "1").strip() == "2":
        reshard = env_flag("FSDP_RESHARD_AFTER_FORWARD", "true")
    else:
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        reshard = _SHARDING.get(strategy)
        if reshard is None:
            raise ValueError(f"the accelerate config sets fsdp_sharding_strategy {strategy}; slope shards with FULL_SHARD (1) or "
                             "SHARD_GRAD_OP (2): choose one of them, or launch without an FSDP config (DDP)")
    return {"reshard_after_forward": reshard, "activation_checkpointing": env_flag("FSDP_ACTIVATION_CHECKPOINTING")}
