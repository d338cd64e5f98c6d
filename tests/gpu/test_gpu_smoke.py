"""The GPU smoke suite (performance_experiments/gpu_smoke.py) as part of the GPU tests: every
check (the cutlass-sm90 kernel, each backend's forward / backward / optimizer step, the kept-value
kernels, the AdamW kernel, merged LoRA, auto's choice) against its oracle on fresh random inputs."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="unset TRITON_INTERPRET to compile Triton on the GPU"),
]

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_every_gpu_path_matches_its_oracle(tmp_path):
    from performance_experiments import gpu_smoke

    code = gpu_smoke.main(["--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*/smoke.json")
    records = json.loads(path.read_text())["records"]
    failed = [(r["check"], r["name"], r["errors"], r.get("detail")) for r in records if r["status"] == "FAILED"]
    assert code == 0 and not failed, failed
    assert {r["check"] for r in records if r["status"] == "ok"} >= {"layer", "kept_values", "optimizer", "merged_lora", "auto"}
