"""Run a command in a subprocess and send it a signal once it is mid-run (the signal tests of
``slope train`` and of the fine-tuning commands)."""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def signal_mid_run(argv: list[str], ready: Callable[[], bool], sig: int, *, env: dict[str, str] | None = None,
                   timeout: float = 120.0, poll: float = 0.05) -> tuple[int, str, str]:
    """Start ``argv`` in the repository root (unbuffered output, ``env`` added), send ``sig`` once ``ready()``
    (it must happen before the run ends and within ``timeout`` seconds) and return ``(exit status, stdout,
    stderr)``; the process is killed if the test fails first."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, "the run ended early"
            assert time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(poll)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout, stderr
