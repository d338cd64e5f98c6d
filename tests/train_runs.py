"""``slope train`` runs for the distributed tests: in this process, or as N ranks under
``torchrun`` (gloo on CPUs), and the check that two runs are the same run (losses and final
weights). Not a test module: the distributed tests import it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: A 1-layer Llama, global batch 4 with accumulation 2, 4 steps; adapters attach after step 2, so
#: every wrapper meets parameters that join mid-run.
CLI_TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
            "--seq-len", "16", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--eval-batches", "3",
            "--log-every", "1", "--eval-every", "100", "--save-every", "0", "--device", "cpu",
            "--lazy-lora-fraction", "0.5"]


def torchrun(*args: str, timeout: float = 300, nproc: int = 2, env: dict[str, str] | None = None, fails: bool = False) -> str:
    """``torchrun --standalone --nproc_per_node=<nproc> -m slope train ...`` (``env``: added to the
    environment); returns its stdout, failing the test with the output unless it succeeds (or, with
    ``fails``, unless it fails: then returns its stdout and stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "slope", "train", *args]
    # From the repository root, as a user would start it (nothing there may shadow an import).
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if fails:
        assert proc.returncode != 0, output[-6000:]
        return output
    assert proc.returncode == 0, output[-6000:]
    return proc.stdout


def cli(*args: str) -> None:
    """``slope train ...`` in this process."""
    from slope.cli import main

    assert main(["train", *args]) == 0


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    """``{step: training loss}`` (``key="val_loss"``: validation loss) of the run in ``out``."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The model state of the run's newest checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint" / "model.safetensors"))


def assert_same_run(out: Path, ref: Path, atol: float = 1e-5) -> None:
    """The run in ``out`` logged ``ref``'s training and validation losses (each rank validates its
    share of the batches) and ended with its weights (fp32 tolerances)."""
    for key in ("loss", "val_loss"):
        want, got = losses(ref, key), losses(out, key)
        assert got.keys() == want.keys() and (want or key == "val_loss")
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"{key} at step {step}"
    ref_w, got_w = weights(ref), weights(out)
    assert ref_w.keys() == got_w.keys()
    for name, value in ref_w.items():
        torch.testing.assert_close(got_w[name], value, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
