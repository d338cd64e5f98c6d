"""Run a test's worker script as N local ranks, the way ``torchrun`` would (gloo on CPUs).

Each rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` and one intra-op thread; its output goes to ``<workdir>/<name>_rank<r>.log``. A rank
that fails leaves its peers waiting in a collective, so the others are stopped at the first failure
(or at the timeout). Not a test module: the distributed tests import it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now (for ``MASTER_PORT``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(argv: list[str], workdir: Path, *, world: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
              name: str = "rank", stop_peers: bool = True) -> str:
    """Run ``python argv...`` as ``world`` ranks; returns ``""`` or the failing ranks' exit codes
    and log tails. ``env``: variables added to every rank's environment. ``stop_peers=False`` lets
    every rank end by itself (up to the timeout) even after one failed: for tests of how ranks fail."""
    port, procs = free_port(), []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        log = open(workdir / f"{name}_rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc, _ in procs):
        if (stop_peers and any(proc.poll() not in (None, 0) for proc, _ in procs)) or time.monotonic() > deadline:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
            break
        time.sleep(0.2)
    errors = []
    for rank, (proc, log) in enumerate(procs):
        code = proc.wait()
        log.close()
        if code != 0:
            errors.append(f"rank {rank} exited with {code}:\n" + (workdir / f"{name}_rank{rank}.log").read_text()[-4000:])
    return "\n".join(errors)


def launch(argv: list[str], workdir: Path, **kwargs) -> None:
    """:func:`run_ranks`, failing the calling test with the ranks' logs unless every rank succeeds."""
    failure = run_ranks(argv, workdir, **kwargs)
    assert not failure, failure
