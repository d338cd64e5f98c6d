"""The benchmark scripts must not rot: run every ``--smoke`` in-process and check the records.

Checks the DESIGN §7 schema (script, commit, device, versions, config, dense and sparse figures,
their ratio) and that each ratio is the ratio of the figures it names, then renders the tables.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

common = importlib.import_module("performance_experiments.common")

# script -> (ratio key, dense figure, sparse figure, ratio = dense/sparse or sparse/dense)
RATIOS = {
    "gemm": [("gemm_speedup", "time_ms", "time_ms", "dense/sparse")],
    "layer": [("layer_speedup", "fwd_bwd_ms", "fwd_bwd_ms", "dense/sparse"),
              ("layer_step_speedup", "step_ms", "step_ms_amortised", "dense/sparse")],
    "e2e": [("e2e_speedup", "step_ms", "step_ms", "dense/sparse"),
            ("e2e_cputime_speedup", "step_cpu_ms", "step_cpu_ms", "dense/sparse")],
    "inference": [("prefill_speedup", "prefill_ms", "prefill_ms", "dense/sparse"),
                  ("prefill_stacked_speedup", "prefill_ms", "prefill_ms_stacked", "dense/sparse"),
                  ("prefill_extended_speedup", "prefill_ms", "prefill_ms_extended", "dense/sparse"),
                  ("weights_memory_ratio", "weights_bytes", "weights_bytes", "sparse/dense"),
                  ("decode_speedup", "decode_ms_per_token", "decode_ms_per_token", "dense/sparse")],
    "memory": [("optimizer_memory_ratio", "train_state_bytes.optimizer", "train_state_bytes.optimizer", "sparse/dense"),
               ("train_memory_ratio", "train_state_bytes.total", "train_state_bytes.total", "sparse/dense")],
    "overhead": [("prune_overhead_ratio", "step_ms", "prune_ms", "sparse/dense")],
    "breakdown": [("breakdown_speedup", "wall_ms_per_iter", "wall_ms_per_iter", "dense/sparse")],
}
if os.environ.get("TRITON_INTERPRET") == "1":  # on CPU it emulates the CUDA code paths in Triton's interpreter
    RATIOS["host_overhead"] = [("host_speedup", "host_us", "host_us", "dense/sparse")]


def _figure(side: dict, path: str) -> float:
    value = side
    for part in path.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    for script in RATIOS:
        module = importlib.import_module(f"performance_experiments.{script}")
        module.main(["--smoke", "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("script", sorted(RATIOS))
def test_smoke_records_follow_the_schema(smoke_results, script):
    payload = json.loads((smoke_results / "cpu" / f"{script}.json").read_text())
    assert payload["script"] == script and payload["args"]["smoke"] is True
    records = payload["records"]
    measured = [r for r in records if not r["error"]]
    assert measured, f"{script}: every smoke measurement failed: {[r['error'] for r in records]}"
    for record in records:
        for key in common.SCHEMA_KEYS:
            assert key in record, f"{script} record lacks {key!r}"
        assert record["script"] == script and record["device"] == "cpu"
        assert record["commit"] and record["torch"]
        assert record["backend"] in ("simulated", "reference")
        assert any(k.endswith(common.RATIO_SUFFIXES) for k in record), f"{script} record names no ratio"
    for record in measured:
        assert isinstance(record["dense"], dict) and isinstance(record["sparse"], dict)
        for key, dense_key, sparse_key, direction in RATIOS[script]:
            dense, sparse = _figure(record["dense"], dense_key), _figure(record["sparse"], sparse_key)
            assert dense > 0 and sparse > 0, (script, key, dense, sparse)
            expected = dense / sparse if direction == "dense/sparse" else sparse / dense
            assert record[key] == pytest.approx(expected, rel=1e-3, abs=1e-4), (script, key)


def test_breakdown_smoke_lists_operators_by_self_time(smoke_results):
    records = json.loads((smoke_results / "cpu" / "breakdown.json").read_text())["records"]
    assert {r["config"]["workload"] for r in records} == {"layer_step", "decode"}
    for record in records:
        for side in ("dense", "sparse"):
            ops = record[side]["top_ops"]
            times = [op["self_ms_per_iter"] for op in ops]
            assert ops and times == sorted(times, reverse=True) and times[0] > 0
            assert sum(times) <= record[side]["self_ms_total_per_iter"] + 1e-3
    # the sparse layer step runs SLoPe's own kernels: the reference gather of the weight gradient
    sparse_ops = {op["name"] for r in records if r["config"]["workload"] == "layer_step" for op in r["sparse"]["top_ops"]}
    assert "aten::gather" in sparse_ops or "aten::scatter_" in sparse_ops


def test_gemm_smoke_sparse_product_is_exact(smoke_results):
    records = json.loads((smoke_results / "cpu" / "gemm.json").read_text())["records"]
    errors = {(r["backend"], r["config"]["dtype"]): r["rel_error"] for r in records if not r["error"]}
    assert errors and all(e < (2e-2 if dtype == "bf16" else 1e-5) for (_, dtype), e in errors.items()), errors


def test_inference_memory_only_counts_each_part_of_the_weights(tmp_path):
    """``inference.py --memory-only`` times nothing; ``weights_parts`` sums to the counted weights,
    and the frozen merged form holds no stored ``meta`` (derived) beside its operands' metadata."""
    inference = importlib.import_module("performance_experiments.inference")
    inference.main(["--smoke", "--memory-only", "--out-dir", str(tmp_path)])
    records = json.loads((tmp_path / "cpu" / "inference.json").read_text())["records"]
    merged = [r for r in records if not r["error"] and r["sparse_form"] == "merged-lora"]
    assert merged and all(r["prefill_speedup"] is None and "prefill_ms" not in r["sparse"] for r in records)
    for record in merged:
        for side in ("dense", "sparse"):
            assert sum(record[side]["weights_parts"].values()) == record[side]["weights_bytes"] > 0
        parts = record["sparse"]["weights_parts"]
        assert "meta" not in parts and "mask_t_bits" not in parts and "dense modules" in parts
        assert record["weights_memory_ratio"] == pytest.approx(
            record["sparse"]["weights_bytes"] / record["dense"]["weights_bytes"], abs=1e-4)
    assert any("operand metadata" in r["sparse"]["weights_parts"] for r in merged if r["backend"] == "reference")


def test_inference_keeps_the_figures_measured_before_a_kill(tmp_path, monkeypatch):
    """A run killed during the decode timing (as gpu_evidence's step limit does) leaves each model's
    record with the prefill figures and ratios already measured, marked incomplete; an exception
    there keeps them too, with the error."""
    inference = importlib.import_module("performance_experiments.inference")
    evidence_table = importlib.import_module("performance_experiments.evidence_table")

    def killed(*args, **kwargs):
        raise SystemExit("killed")  # not an Exception: nothing in the script catches it

    monkeypatch.setattr(inference, "_decode_figures", killed)
    with pytest.raises(SystemExit):
        inference.main(["--smoke", "--backends", "reference", "--out-dir", str(tmp_path)])
    (record,) = json.loads((tmp_path / "cpu" / "inference.json").read_text())["records"]
    assert record["incomplete"] and record["error"] is None and record["backend"] == "reference"
    assert record["prefill_speedup"] > 0 and record["sparse"]["prefill_ms_extended"] > 0
    assert record["decode_speedup"] is None and "decode_ms_per_token" not in record["sparse"]
    assert any("reference" in line and "measurement stopped" in line for line in evidence_table._failures(tmp_path / "cpu"))

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(inference, "_decode_figures", failing)
    inference.main(["--smoke", "--backends", "reference", "--out-dir", str(tmp_path / "error")])
    (record,) = json.loads((tmp_path / "error" / "cpu" / "inference.json").read_text())["records"]
    assert "out of memory" in record["error"] and "incomplete" not in record and record["prefill_speedup"] > 0


def test_e2e_with_activation_checkpointing_trains_both_sides(tmp_path, monkeypatch):
    """``e2e.py --gradient-checkpointing`` turns checkpointing on for the dense and the sparse model."""
    from slope import finetune_loop

    e2e = importlib.import_module("performance_experiments.e2e")
    enabled = []
    original = finetune_loop.enable_activation_checkpointing
    monkeypatch.setattr(finetune_loop, "enable_activation_checkpointing", lambda model: enabled.append(model) or original(model))
    e2e.main(["--smoke", "--gradient-checkpointing", "--out-dir", str(tmp_path)])
    records = json.loads((tmp_path / "cpu" / "e2e.json").read_text())["records"]
    assert records and all(r["config"]["gradient_checkpointing"] and not r["error"] for r in records)
    assert len(enabled) == 1 + len(records) and all(m.model.gradient_checkpointing for m in enabled)


def test_memory_smoke_optimizer_state_shrinks(smoke_results):
    # ADAMWSparse keeps moments for the kept half of the pruned weights only.
    records = json.loads((smoke_results / "cpu" / "memory.json").read_text())["records"]
    assert all(r["optimizer_memory_ratio"] < 1.0 for r in records if not r["error"])


def test_summarize_renders_every_script(smoke_results, tmp_path):
    summarize = importlib.import_module("performance_experiments.summarize")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{summarize.BEGIN}\nstale\n{summarize.END}\n\noutro\n")
    summarize.main(["--results-dir", str(smoke_results), "--readme", str(readme), "--no-plots"])
    text = readme.read_text()
    assert text.startswith("intro") and text.rstrip().endswith("outro") and "stale" not in text
    for script in RATIOS:
        assert f"`{script}.py`" in text
    assert "| simulated |" in text and "| reference |" in text


def test_device_slug():
    assert common.slugify_device_name("NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert common.slugify_device_name("NVIDIA A100-SXM4-80GB") == "nvidia-a100"
    assert common.device_slug("cpu") == "cpu"


def test_summarize_counts_shapes_where_auto_lost_to_dense():
    summarize = importlib.import_module("performance_experiments.summarize")

    def record(speedup, tokens):
        return {"backend": "auto", "gemm_speedup": speedup, "auto_choice": "cutlass-sm90",
                "config": {"dtype": "bf16", "tokens": tokens, "out": 64, "in": 32}}

    assert summarize._auto_check([]) == []
    (_, line) = summarize._auto_check([record(1.2, 8192), record(0.9, 16), record(0.95, 32)])
    assert line.startswith("`auto` slower than dense on 2 of 3 shapes (worst: bf16 16×64×32 0.90")


def test_summarize_checks_the_gemm_target_on_its_shape_range():
    summarize = importlib.import_module("performance_experiments.summarize")

    def record(backend, speedup, tokens=8192, out=11008, inp=4096, dtype="bf16"):
        return {"backend": backend, "gemm_speedup": speedup, "config": {"dtype": dtype, "tokens": tokens, "out": out, "in": inp}}

    records = [record("cutlass-sm90", 1.65), record("cusparselt", 1.2),  # one shape: best 1.65
               record("cutlass-sm90", 1.4, out=4096, inp=14336),  # FFN down: in range, below target
               record("cutlass-sm90", 3.0, tokens=512), record("cutlass-sm90", 3.0, dtype="fp16"),  # outside
               record("auto", 9.9)]
    (_, line) = summarize._target_check(records)
    assert "on 1 of 2 shapes" in line and "lowest best: 1.40 (cutlass-sm90)" in line
