"""The short table that ``gpu_evidence.py`` prints last: this run's ratios next to the earlier ones.

Reads a run's results folder (``<root>/<device>/{gpu_evidence,kernel,smoke,calibration,gemm,layer,
e2e,inference}.json``) and, for the "before" column, the committed H100 results
(``results/nvidia-h100-early/``: GEMM and e2e at commit 5efd217, layer / memory / inference at
4b704b9; their layer step ran with bf16 parameters, ``--master same``). They live apart from
``results/nvidia-h100/``, so a new run on an H100 neither overwrites them nor compares with itself.

    python performance_experiments/evidence_table.py [--results-dir DIR] [--device nvidia-h200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from performance_experiments.common import DEFAULT_OUT_DIR  # noqa: E402

BEFORE_DEVICE = "nvidia-h100-early"
#: ceilings measured on H200 machines of this workplace before (the device tool's KINDS.md, 2026-11).
CEILINGS_SEEN = {"copy_bandwidth": "~4.3 TB/s", "dense_gemm": "769-798 TFLOP/s"}


def _records(folder: Path, script: str) -> list[dict]:
    try:
        return json.loads((folder / f"{script}.json").read_text())["records"]
    except (OSError, ValueError, KeyError):
        return []


def _case(config: dict, *keys: str) -> str:
    parts = []
    for key in keys:
        value = config.get(key)
        parts.append(f"{value}t" if key == "tokens" else f"b{value}" if key == "batch" else str(value))
    return " ".join(parts)


def ratios(folder: Path) -> dict[tuple[str, str, str], tuple[float, str, str]]:
    """``{(metric, case, backend): (value, commit, note)}`` of every measured ratio in a results folder."""
    found: dict[tuple[str, str, str], tuple[float, str, str]] = {}

    def put(metric, case, record, key, note=""):
        value = record.get(key)
        if value is not None and not record.get("error"):
            found[(metric, case, record.get("backend", ""))] = (value, record.get("commit", ""), note)

    for r in _records(folder, "gemm"):
        choice = f"-> {r['auto_choice']}" if r.get("auto_choice") else ""
        put("gemm", _case(r["config"], "model", "layer", "dtype", "tokens"), r, "gemm_speedup", choice)
    for r in _records(folder, "layer"):
        case = _case(r["config"], "model", "layer", "dtype", "tokens")
        put("layer fwd+bwd", case, r, "layer_speedup")
        put("layer step", case, r, "layer_step_speedup")
    for r in _records(folder, "e2e"):
        case = _case(r["config"], "model", "batch", "seq", "precision")
        put("train step", case, r, "e2e_speedup")
        put("train peak memory", case, r, "train_peak_memory_ratio")
    for r in _records(folder, "memory"):  # the H100 figure came from memory.py
        put("train peak memory", _case(r["config"], "model", "batch", "seq", "precision"), r, "train_memory_ratio")
    for r in _records(folder, "inference"):
        case = _case(r["config"], "model", "precision")
        put("prefill", case, r, "prefill_speedup")
        put("prefill stacked fold", case, r, "prefill_stacked_speedup")
        put("prefill extended fold", case, r, "prefill_extended_speedup")
        put("decode", case, r, "decode_speedup")
        put("decode CUDA graphs", case, r, "decode_graphs_speedup")
        put("decode CUDA graphs fused kernel", case, r, "decode_fused_graphs_speedup")
        put("inference weights memory", case, r, "weights_memory_ratio", _parts_note(r))
    return found


def _parts_note(record: dict) -> str:
    """``sparse/dense``, then the sparse side's three largest parts (``weights_parts``) in MiB."""
    parts = (record.get("sparse") or {}).get("weights_parts") or {}
    largest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    return "sparse/dense" + ("; " + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in largest) if largest else "")


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _checks_line(folder: Path, script: str) -> str:
    records = _records(folder, script)
    if not records:
        return f"{script}: no results"
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "FAILED", "skipped")}
    failed = [f"{r['check']} {r['name']}" for r in records if r.get("status") == "FAILED"][:6]
    return (f"{script}: {counts['ok']} ok, {counts['FAILED']} failed, {counts['skipped']} skipped"
            + (f" (failed: {'; '.join(failed)})" if failed else ""))


def _failures(folder: Path) -> list[str]:
    lines = []
    for script in ("gemm", "layer", "e2e", "inference"):
        for r in _records(folder, script):
            error = r.get("error") or ""
            if error and not error.startswith(("unavailable", "skipped")):
                lines.append(f"  {script} {r.get('backend')}: {error[:150]}")
            elif r.get("incomplete"):
                lines.append(f"  {script} {r.get('backend')} {r['config'].get('model', '')}: {r['incomplete']}")
    return lines


def render_table(root: Path, device: str, before_root: Path = DEFAULT_OUT_DIR) -> str:
    folder = Path(root) / device
    lines = []
    state = {}
    try:
        state = json.loads((folder / "gpu_evidence.json").read_text())
    except (OSError, ValueError):
        pass
    lines.append(f"=================== slope GPU evidence: {device}, commit {state.get('commit', '?')}, "
                 f"{state.get('elapsed_s', '?')} s of {state.get('budget_s', '?')} s")
    if state.get("steps"):
        lines.append(f"{'step':12s} {'status':34s} {'s':>6s} {'limit':>6s}")
        lines += [f"{s['step']:12s} {s['status'][:34]:34s} {s['seconds']:6.0f} {s['limit_s']:6d}" for s in state["steps"]]
    library = state.get("sm90_library") or {}
    build = state.get("fallback_build")
    lines.append(f"cutlass-sm90 library: {library.get('problem') or 'prebuilt, matches'}"
                 + (f"; background build: {build['status']} ({build['seconds']} s)" if build else ""))
    lines += [_checks_line(folder, "kernel"), _checks_line(folder, "smoke")]
    calibration = {r["measure"]: r for r in _records(folder, "calibration")}
    if calibration:
        lines.append("ceilings: " + ", ".join(
            f"{name} {r['value']} {r['unit']} (seen before: {CEILINGS_SEEN[name]})" for name, r in calibration.items()))
    now, before = ratios(folder), ratios(Path(before_root) / BEFORE_DEVICE)
    lines.append(f"{'metric':18s} {'case':34s} {'backend':13s} {'now':>6s}  before ({BEFORE_DEVICE}, commit)")
    for (metric, case, backend), (value, _, note) in now.items():
        old = before.get((metric, case, backend))
        old_text = f"{_fmt(old[0])} ({old[1]})" if old else "–"
        lines.append(f"{metric:18s} {case:34s} {backend:13s} {_fmt(value):>6s}  {old_text}{f'  {note}' if note else ''}")
    lines.append("ratios: dense time / sparse time (> 1: sparse faster); memory: sparse / dense (< 1: sparse smaller); "
                 f"{BEFORE_DEVICE}'s layer rows ran with bf16 parameters (--master same), this run's with fp32 master "
                 "weights under bf16 autocast")
    failures = _failures(folder)
    if failures:
        lines.append("failed cases:")
        lines += failures[:8]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--device", default="nvidia-h200")
    args = parser.parse_args(argv)
    print(render_table(Path(args.results_dir), args.device))


if __name__ == "__main__":
    main()
