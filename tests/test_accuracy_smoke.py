"""``accuracy_experiments/run.py --quick``: every method trains, the records, summary, goals, plot
and README table are consistent with each other, and each method is the model it claims to be."""
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from slope.checkpoint import read_checkpoint
from slope.masks import is_nm_sparse, unpack_mask

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["dense", "slope", "slope-no-lora", "static-2:4", "transposable-2:4", "slope-4:8", "slope-2:8", "slope-dense-tail"]


def _load_script():
    spec = importlib.util.spec_from_file_location("accuracy_run", ROOT / "accuracy_experiments" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run of every method (2 seeds) into a temporary results/work directory."""
    tmp = tmp_path_factory.mktemp("acc")
    readme = tmp / "README.md"
    run = _load_script()
    readme.write_text(f"# title\n\nbefore\n{run.README_BEGIN}\nstale table\n{run.README_END}\nafter\n")
    assert run.main(["--quick", "--results", str(tmp / "results"), "--work", str(tmp / "work"), "--readme", str(readme)]) == 0
    return run, tmp, readme


def test_every_method_has_a_record_per_seed_with_provenance(quick):
    _, tmp, _ = quick
    runs = [json.loads(p.read_text()) for p in sorted((tmp / "results" / "runs").glob("*.json"))]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in (0, 1))
    dense = {r["seed"]: r["final_val_loss"] for r in runs if r["method"] == "dense"}
    for r in runs:
        for key in ("script", "commit", "device", "torch", "triton", "config", "budget"):
            assert r[key] not in (None, ""), key
        assert r["device"] == "cpu" and r["torch"] == torch.__version__
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < r["unigram_loss"] + 2.0
        assert r["final_val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]))
        assert r["dense_val_loss"] == dense[r["seed"]]
        assert r["gap_to_dense_pct"] == pytest.approx(100 * (r["final_val_loss"] / dense[r["seed"]] - 1))
        assert r["budget"] == runs[0]["budget"] and r["val_curve"][-1][0] == r["budget"]["max_steps"] == 8
        sparse = not r["config"]["dense"]
        assert r["config"]["compress"] is False or not sparse  # simulation for every sparse method
    events = {(r["method"], r["seed"]): [e["event"] for e in r["events"]] for r in runs}
    for seed in (0, 1):
        assert events[("slope", seed)] == ["lora_start"] and events[("slope-4:8", seed)] == ["lora_start"]
        assert events[("slope-dense-tail", seed)] == ["dense_tail_start"]
        assert events[("slope-no-lora", seed)] == [] and events[("static-2:4", seed)] == [] and events[("dense", seed)] == []


def test_summary_is_the_mean_of_the_run_records(quick):
    _, tmp, _ = quick
    runs = [json.loads(p.read_text()) for p in (tmp / "results" / "runs").glob("*.json")]
    summary = json.loads((tmp / "results" / "summary.json").read_text())
    assert [s["method"] for s in summary] == METHODS
    dense_mean = statistics.fmean(r["final_val_loss"] for r in runs if r["method"] == "dense")
    for s in summary:
        assert set(s) >= {"method", "budget", "seeds", "val_loss_mean", "val_loss_std", "gap_to_dense_pct"}
        losses = [r["final_val_loss"] for r in sorted(runs, key=lambda r: r["seed"]) if r["method"] == s["method"]]
        assert s["seeds"] == [0, 1]
        assert s["val_loss_mean"] == pytest.approx(statistics.fmean(losses))
        assert s["val_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert s["gap_to_dense_pct"] == pytest.approx(100 * (s["val_loss_mean"] / dense_mean - 1))
    assert summary[0]["gap_to_dense_pct"] == 0.0
    goals = {g["goal"]: g for g in json.loads((tmp / "results" / "goals.json").read_text())}
    loss = {s["method"]: s["val_loss_mean"] for s in summary}
    assert goals["double_pruning_cost"]["measured"] == pytest.approx(100 * (loss["slope-no-lora"] / loss["static-2:4"] - 1))
    assert goals["slope_gap"]["met"] == (summary[1]["gap_to_dense_pct"] <= 3.0)


def test_plot_and_readme_table(quick):
    run, tmp, readme = quick
    png = tmp / "results" / "val_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{run.README_END}\nafter\n") and "stale table" not in text
    summary = json.loads((tmp / "results" / "summary.json").read_text())
    for s in summary:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{s['method']}` |"))
        assert f"{s['val_loss_mean']:.4f} ± {s['val_loss_std']:.4f}" in row and f"{s['gap_to_dense_pct']:+.2f}%" in row


def test_each_method_trains_the_model_it_names(quick):
    _, tmp, _ = quick

    def masks(method, n=2, m=4):
        state = read_checkpoint(tmp / "work" / method.replace(":", "to") / "seed0" / "checkpoint").model_state
        names = [k[: -len(".mask_bits")] for k in state if k.endswith(".mask_bits")]
        shapes = {name: (state[name + ".values"].shape[0], state[name + ".values"].shape[1] * m // n) for name in names}
        return [(unpack_mask(state[name + ".mask_bits"], shapes[name]), unpack_mask(state[name + ".mask_t_bits"], shapes[name]))
                for name in names]

    assert masks("dense") == []
    assert masks("slope-dense-tail") == []  # densified for the final phase
    for method, (n, m) in {"slope": (2, 4), "slope-no-lora": (2, 4), "slope-4:8": (4, 8), "slope-2:8": (2, 8)}.items():
        pairs = masks(method, n, m)
        assert len(pairs) == 7
        for mask, mask_t in pairs:
            assert is_nm_sparse(mask, n, m, exact=True) and bool((mask_t <= mask).all()) and mask_t.sum() < mask.sum()
    for mask, mask_t in masks("static-2:4"):
        assert torch.equal(mask, mask_t)
    for mask, mask_t in masks("transposable-2:4"):
        assert is_nm_sparse(mask.t(), 2, 4) and torch.equal(mask, mask_t)


def test_branching_from_the_trunk_equals_training_from_scratch(quick, tmp_path):
    run, tmp, _ = quick
    assert run.main(["--quick", "--methods", "slope", "--seeds", "0", "--no-branch", "--results", str(tmp_path / "r"),
                     "--work", str(tmp_path / "w"), "--no-readme"]) == 0
    scratch = json.loads((tmp_path / "r" / "runs" / "slope__seed0.json").read_text())
    branched = json.loads((tmp / "results" / "runs" / "slope__seed0.json").read_text())
    assert branched["branched_from"] == {"method": "slope-no-lora", "step": 6} and scratch["branched_from"] is None
    assert scratch["val_curve"] == branched["val_curve"]
    assert scratch["final_val_loss"] == branched["final_val_loss"]


def test_every_preset_gives_valid_configs_whose_final_phase_happens(tmp_path):
    run = _load_script()
    assert list(run.METHODS) == METHODS and set(run.PRESETS) == {"quick", "default", "long", "gpu"}
    for preset in run.PRESETS.values():
        cfgs = {name: run.method_config(m, preset, 0, tmp_path, None) for name, m in run.METHODS.items()}
        assert len({(c.max_steps, c.batch_size, c.seq_len, c.hidden_size, c.num_layers) for c in cfgs.values()}) == 1
        assert all(not c.compress for name, c in cfgs.items() if name != "dense")
        starts = {name: run.final_phase_start(c) for name, c in cfgs.items()}
        fork = starts["slope"]
        assert fork is not None and fork < cfgs["slope"].max_steps  # LoRA gets at least one step
        assert starts["slope-dense-tail"] == fork == starts["slope-4:8"] == starts["slope-2:8"]
        assert starts["dense"] is starts["slope-no-lora"] is starts["static-2:4"] is None
    assert run.PRESETS["default"].tail_fraction == run.PRESETS["long"].tail_fraction == run.PRESETS["gpu"].tail_fraction == 0.01
