"""Render every results JSON into the tables of performance_experiments/README.md and PNG plots.

Reads ``<results>/<device>/<script>.json`` for every device, writes the tables between the
``<!-- results:begin -->`` / ``<!-- results:end -->`` markers of the README, and plots
``<results>/<device>/gemm_speedup_<dtype>.png`` (speedup vs shape, one series per backend) and
``<results>/<device>/<script>_speedup.png`` for layer / e2e / inference.

    python performance_experiments/summarize.py                 # all devices -> README + PNGs
    python performance_experiments/summarize.py --device nvidia-h100 --brief   # short text table
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from performance_experiments.common import DEFAULT_OUT_DIR, REPO_ROOT

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SCRIPTS = ("gemm", "layer", "e2e", "inference", "memory", "overhead", "host_overhead", "breakdown")
README = REPO_ROOT / "performance_experiments" / "README.md"


def load(results_dir: Path, devices=None) -> dict[str, dict[str, list[dict]]]:
    """``{device: {script: records}}`` for every results file found."""
    found: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(results_dir.glob("*/*.json")):
        device, script = path.parent.name, path.stem
        if script not in SCRIPTS or (devices and device not in devices):
            continue
        found.setdefault(device, {})[script] = json.loads(path.read_text())["records"]
    return found


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _get(record: dict, side: str, key: str):
    return (record.get(side) or {}).get(key)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _ok(records):
    return [r for r in records if not r.get("error")]


def gemm_table(records: list[dict]) -> list[str]:
    ok = _ok(records)
    backends = sorted({r["backend"] for r in ok})
    shapes: dict[tuple, dict] = {}
    for r in ok:
        c = r["config"]
        key = (c["dtype"], c["model"], c["layer"], c["tokens"], c["out"], c["in"])
        shapes.setdefault(key, {"dense": _get(r, "dense", "tflops")})[r["backend"]] = r["gemm_speedup"]
        if r["backend"] == "auto":
            shapes[key]["auto"] = f"{r['gemm_speedup']:.2f} ({r.get('auto_choice')})"
    header = ["dtype", "model", "layer", "tokens×out×in", "dense TFLOP/s"] + [f"{b} ×" for b in backends]
    rows = [[k[0], k[1], k[2], f"{k[3]}×{k[4]}×{k[5]}", v["dense"]] + [v.get(b) for b in backends]
            for k, v in sorted(shapes.items(), key=lambda kv: (kv[0][0], kv[0][3] * kv[0][4] * kv[0][5]))]
    return _table(header, rows) + _target_check(ok) + _auto_check(ok)


def _in_target_range(config: dict) -> bool:
    """Issue #5's LLM shapes: bf16, hidden 4096-8192 and FFN 11008-28672 (either way round), 8k-16k tokens."""
    dims = sorted((config["out"], config["in"]))
    return (config["dtype"] == "bf16" and 8192 <= config["tokens"] <= 16384
            and 4096 <= dims[0] <= 8192 and 11008 <= dims[1] <= 28672)


def _target_check(ok: list[dict], target: float = 1.6) -> list[str]:
    """The GEMM target line: on how many target-range shapes the best sparse kernel reached ``target``×."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in ok:
        c = r["config"]
        if r["backend"] in ("auto", "dense", "simulated") or not _in_target_range(c):
            continue
        key = (c["tokens"], c["out"], c["in"])
        if r["gemm_speedup"] > best.get(key, (0.0, ""))[0]:
            best[key] = (r["gemm_speedup"], r["backend"])
    if not best:
        return []
    hits = sum(speedup >= target for speedup, _ in best.values())
    low = min(best.values())
    return ["", f"Best sparse kernel ≥ {target}× dense on {hits} of {len(best)} shapes of the target range "
                f"(bf16, hidden 4096–8192, FFN 11008–28672, 8k–16k tokens); lowest best: {low[0]:.2f} ({low[1]})."]


def _auto_check(ok: list[dict]) -> list[str]:
    """The ``auto`` acceptance line: on how many shapes ``auto`` was slower than dense."""
    auto = [r for r in ok if r["backend"] == "auto"]
    if not auto:
        return []
    slower = [r for r in auto if r["gemm_speedup"] < 1.0]
    line = f"`auto` slower than dense on {len(slower)} of {len(auto)} shapes"
    if slower:
        worst = sorted(slower, key=lambda r: r["gemm_speedup"])[:5]
        line += " (worst: " + ", ".join(
            f"{r['config']['dtype']} {r['config']['tokens']}×{r['config']['out']}×{r['config']['in']} "
            f"{r['gemm_speedup']:.2f} with {r.get('auto_choice')}" for r in worst) + ")"
    return ["", line + "."]


def layer_table(records):
    def dtype(config):
        master = config.get("master") == "fp32" and config["dtype"] != "fp32"
        return config["dtype"] + (" (fp32 master)" if master else "")

    rows = [[dtype(r["config"]), f"{r['config']['tokens']}×{r['config']['out']}×{r['config']['in']}", r["backend"],
             _get(r, "dense", "fwd_bwd_ms"), _get(r, "sparse", "fwd_bwd_ms"), r.get("layer_fwd_speedup"),
             r.get("layer_speedup"), r.get("layer_step_speedup")] for r in _ok(records)]
    return _table(["dtype", "tokens×out×in", "backend", "dense fwd+bwd ms", "sparse fwd+bwd ms",
                   "fwd ×", "fwd+bwd ×", "step ×"], rows)


def e2e_table(records):
    rows = [[r["config"]["model"], r["config"]["precision"], f"{r['config']['batch']}×{r['config']['seq']}", r["backend"],
             _get(r, "dense", "tokens_per_s"), _get(r, "sparse", "tokens_per_s"), r.get("e2e_speedup"),
             r.get("e2e_cputime_speedup")] for r in _ok(records)]
    return _table(["model", "precision", "batch×seq", "backend", "dense tok/s", "sparse tok/s", "e2e ×",
                   "e2e × (CPU time)"], rows)


def inference_table(records):
    rows = [[r["config"]["model"], r["backend"], r.get("sparse_form"), _get(r, "dense", "prefill_tokens_per_s"),
             _get(r, "sparse", "prefill_tokens_per_s"), r.get("prefill_speedup"), _get(r, "dense", "decode_tokens_per_s"),
             _get(r, "sparse", "decode_tokens_per_s"), r.get("decode_speedup")] for r in _ok(records)]
    return _table(["model", "backend", "form", "dense prefill tok/s", "sparse prefill tok/s", "prefill ×",
                   "dense decode tok/s", "sparse decode tok/s", "decode ×"], rows)


def memory_table(records):
    def gib(r, side, key):
        value = _get(r, side, key)
        if isinstance(value, dict):
            value = value.get("total")
        return None if value is None else value / 2**30

    rows = []
    for r in _ok(records):
        gpu = r["config"].get("method") == "allocator"
        key = "train_peak_bytes" if gpu else "train_state_bytes"
        rows.append([r["config"]["model"], r["backend"], r["config"].get("method"), gib(r, "dense", key), gib(r, "sparse", key),
                     r.get("train_memory_ratio"), r.get("optimizer_memory_ratio"), r.get("weights_memory_ratio"),
                     r.get("inference_memory_ratio")])
    return _table(["model", "backend", "method", "dense train GiB", "sparse train GiB", "train ratio",
                   "optimizer ratio", "weights ratio", "inference ratio"], rows)


def overhead_table(records):
    rows = [[r["config"]["model"], r["backend"], _get(r, "dense", "step_ms"), _get(r, "sparse", "prune_ms"),
             _get(r, "sparse", "mask_t_refresh_ms"), _get(r, "sparse", "operand_rebuild_ms"), r.get("prune_overhead_ratio"),
             r.get("mask_refresh_overhead_ratio"), r.get("operand_rebuild_overhead_ratio")] for r in _ok(records)]
    return _table(["model", "backend", "dense step ms", "prune ms", "M_t refresh ms", "operand rebuild ms",
                   "prune/step", "refresh/step (amortised)", "rebuild/step"], rows)


def host_overhead_table(records):
    def launches(r):
        found = _get(r, "sparse", "launches") or {}
        return ", ".join(f"{k} {v:g}" for k, v in found.items()) or "–"

    def backend(r):  # with what auto chose (CUDA), e.g. "auto → cutlass-sm90"
        chosen = sorted(set((_get(r, "sparse", "chosen") or {}).values()) - {r["backend"]})
        return r["backend"] + (f" → {'/'.join(chosen)}" if chosen else "")

    rows = [[r["config"]["case"], backend(r), r["config"]["features"], r["config"]["tokens"], "yes" if r["config"]["emulated"] else "no",
             _get(r, "dense", "host_us"), _get(r, "sparse", "host_us"), r.get("host_speedup"),
             f'{_fmt(_get(r, "dense", "python_calls"))} / {_fmt(_get(r, "sparse", "python_calls"))}',
             f'{_fmt(_get(r, "dense", "aten_ops"))} / {_fmt(_get(r, "sparse", "aten_ops"))}', launches(r)] for r in _ok(records)]
    return _table(["case", "backend", "features", "tokens", "emulated", "dense µs/call", "sparse µs/call", "×",
                   "Python calls (dense / sparse)", "ATen ops (dense / sparse)", "sparse launches per call"], rows)


def breakdown_table(records):
    def top(r, side, n=4):
        ops = (r.get(side) or {}).get("top_ops") or []
        return "; ".join(f"{op['name'][:40]} {op['self_ms_per_iter']:.3g}" for op in ops[:n])

    rows = [[r["config"]["workload"], r["backend"], _get(r, "dense", "wall_ms_per_iter"), _get(r, "sparse", "wall_ms_per_iter"),
             r.get("breakdown_speedup"), top(r, "sparse")] for r in _ok(records)]
    return _table(["workload", "backend", "dense ms/iter", "sparse ms/iter", "×", "sparse: top operators (self ms/iter)"], rows)


TABLES = {"gemm": gemm_table, "layer": layer_table, "e2e": e2e_table, "inference": inference_table,
          "memory": memory_table, "overhead": overhead_table, "host_overhead": host_overhead_table,
          "breakdown": breakdown_table}
TITLES = {"gemm": "GEMM (speedup = dense `F.linear` time (cuBLAS on GPU) / sparse time)", "layer": "Linear layer",
          "e2e": "End-to-end training step", "inference": "Inference", "memory": "Memory (sparse / dense)",
          "overhead": "Prune / refresh / operand overheads",
          "host_overhead": "Host time per layer call (Python and dispatch; CPU: the CUDA code paths emulated)",
          "breakdown": "Where the time goes (profiler; full tables in `breakdown.json`)"}


def failures(records: list[dict]) -> list[str]:
    """One line per distinct (backend, error) pair, excluding budget skips."""
    seen = {}
    for r in records:
        err = r.get("error")
        if err and not err.startswith("skipped"):
            seen.setdefault((r.get("backend"), err[:200]), 0)
            seen[(r.get("backend"), err[:200])] += 1
    return [f"- `{b}` ({n}×): {e}" for (b, e), n in sorted(seen.items(), key=lambda kv: str(kv[0]))]


def render(results: dict) -> str:
    out = []
    for device in sorted(results):
        scripts = results[device]
        first = next(iter(scripts.values()))
        meta = first[0] if first else {}
        out.append(f"### {device}")
        out.append(f"`{meta.get('device_name')}`, torch {meta.get('torch')}, triton {meta.get('triton')}")
        for script in SCRIPTS:
            if script not in scripts:
                continue
            records = scripts[script]
            first_record = records[0] if records else {}
            out += ["", f"#### {TITLES[script]} — `{script}.py`", "",
                    f"commit `{first_record.get('commit')}`, measured {first_record.get('date', 'n/a')}", ""]
            out += TABLES[script](records) if _ok(records) else ["(no successful measurement)"]
            fails = failures(records)
            if fails:
                out += ["", "Failures / unavailable:"] + fails
        out.append("")
    return "\n".join(out)


def plot(results: dict, results_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[summarize] matplotlib missing: no plots")
        return []
    written = []

    def save(fig, path):
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for device, scripts in results.items():
        gemm = _ok(scripts.get("gemm", []))
        for dtype in sorted({r["config"]["dtype"] for r in gemm}):
            recs = [r for r in gemm if r["config"]["dtype"] == dtype]
            shapes = sorted({(r["config"]["tokens"], r["config"]["out"], r["config"]["in"]) for r in recs},
                            key=lambda s: (s[0] * s[1] * s[2], s))
            index = {s: i for i, s in enumerate(shapes)}
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(shapes) + 2), 4))
            for backend in sorted({r["backend"] for r in recs}):
                pts = sorted((index[(r["config"]["tokens"], r["config"]["out"], r["config"]["in"])], r["gemm_speedup"])
                             for r in recs if r["backend"] == backend)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xticks(range(len(shapes)), [f"{t}×{o}×{i}" for t, o, i in shapes], rotation=90, fontsize=6)
            ax.set_ylabel("speedup over dense")
            ax.set_title(f"2:4 sparse GEMM vs dense, {device}, {dtype} (tokens×out×in)")
            ax.legend(fontsize=7)
            save(fig, results_dir / device / f"gemm_speedup_{dtype}.png")
        for script, key, label in (("layer", "layer_speedup", "fwd+bwd"), ("e2e", "e2e_speedup", "train step"),
                                   ("inference", "prefill_speedup", "prefill")):
            recs = [r for r in _ok(scripts.get(script, [])) if r.get(key) is not None]
            if not recs:
                continue
            names = [f"{r['config'].get('model')} {r['config'].get('layer', '')} {r['backend']}".replace("  ", " ") for r in recs]
            fig, ax = plt.subplots(figsize=(6, 0.3 * len(recs) + 1.5))
            ax.barh(range(len(recs)), [r[key] for r in recs])
            ax.set_yticks(range(len(recs)), names, fontsize=7)
            ax.axvline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xlabel(f"{label} speedup over dense")
            ax.set_title(f"{script}, {device}")
            save(fig, results_dir / device / f"{script}_speedup.png")
    return written


def brief(results: dict) -> str:
    """The best figure of each ratio per device (a short text summary)."""
    lines = []
    keys = {"gemm": "gemm_speedup", "layer": "layer_speedup", "e2e": "e2e_speedup", "inference": "prefill_speedup",
            "memory": "train_memory_ratio"}
    for device, scripts in sorted(results.items()):
        for script, key in keys.items():
            if script not in scripts:
                continue
            recs = [r for r in scripts[script] if r.get(key) is not None]
            errors = sum(1 for r in scripts.get(script, []) if r.get("error"))
            if not recs:
                lines.append(f"{device:>12} {script:>10}: no result ({errors} errors/skips)")
                continue
            pick = min if key.endswith("memory_ratio") else max
            best = pick(recs, key=lambda r: r[key])
            per_backend = {}
            for r in recs:
                per_backend[r["backend"]] = pick(per_backend.get(r["backend"], r[key]), r[key])
            label = " ".join(f"{k}={best['config'][k]}" for k in ("model", "layer", "tokens", "out", "in", "dtype")
                             if k in best["config"])
            lines.append(f"{device:>12} {script:>10}: best {key}={best[key]:.3f} ({best['backend']}, {label}); "
                         f"per backend: {', '.join(f'{b}={v:.2f}' for b, v in sorted(per_backend.items()))}; "
                         f"{errors} errors/skips")
    return "\n".join(lines)


def update_readme(text: str, readme: Path) -> None:
    content = readme.read_text() if readme.exists() else f"# Performance experiments\n\n{BEGIN}\n{END}\n"
    if BEGIN not in content or END not in content:
        content = content.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--device", action="append", help="only this device slug (repeatable)")
    parser.add_argument("--readme", default=str(README))
    parser.add_argument("--brief", action="store_true", help="print the best ratios only; write nothing")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    results = load(results_dir, args.device)
    if args.brief:
        print(brief(results))
        return
    if args.device:  # keep the other devices' tables in the README
        results = {**load(results_dir), **results}
    update_readme(render(results), Path(args.readme))
    print(f"[summarize] {sum(len(s) for s in results.values())} result files of {sorted(results)} -> {args.readme}")
    if not args.no_plots:
        for path in plot(results, results_dir):
            print(f"[summarize] plot {path}")


if __name__ == "__main__":
    main()
