"""The one-run GPU driver (performance_experiments/gpu_evidence.py) and its smoke suite, on CPU.

- a dry run of the driver in smoke mode (tiny shapes, CPU reference backends) as a subprocess:
  forked steps, logs, results.tgz after every step, the table last (the model steps, whose smoke
  modes tests/test_perf_smoke.py runs, only in the slow full dry run);
- a hung step is killed at its limit (SIGTERM ignored: SIGKILL) and the run goes on;
- the background build of the cutlass-sm90 library: waited for within its budget, used when it succeeds;
- every step's GPU arguments are accepted by its script (so the GPU run cannot rot either);
- the smoke suite fails when a fast path is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

evidence = importlib.import_module("performance_experiments.gpu_evidence")
gpu_smoke = importlib.import_module("performance_experiments.gpu_smoke")


def _dry_run(tmp_path, steps: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, export = tmp_path / "results", tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "performance_experiments" / "gpu_evidence.py"), "--smoke", "--steps", steps,
           "--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--export-dir", str(export)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    return proc, out, export


def _check_dry_run(proc, out: Path, export: Path, steps: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.rindex("=================== slope GPU evidence"):]
    assert table.rstrip().splitlines()[-1].startswith("ratios: dense time / sparse time")
    for step in steps:
        assert re.search(rf"^{step} +ok ", table, re.M), (step, table)
    # what the device tool would bring back: few files, plain names, results + logs inside
    names = sorted(p.name for p in export.iterdir())
    assert names == ["gpu_evidence.log", "results.tgz", "table.txt"]
    with tarfile.open(export / "results.tgz") as tar:
        members = set(tar.getnames())
    for step in steps:
        assert f"performance_experiments/results/cpu/{step}.json" in members
        assert f"performance_experiments/results/cpu/logs/{step}.log" in members
    state = json.loads((out / "cpu" / "gpu_evidence.json").read_text())
    assert [s["step"] for s in state["steps"]] == steps and all(s["status"] == "ok" for s in state["steps"])
    smoke = json.loads((out / "cpu" / "smoke.json").read_text())["records"]
    assert {r["check"] for r in smoke if r["status"] == "ok"} >= {"layer", "kept_values", "optimizer", "merged_lora"}
    assert (export / "table.txt").read_text().strip() == table.strip()


def test_dry_run_of_the_driver(tmp_path):
    steps = ["kernel", "smoke", "calibration", "gemm", "layer"]
    proc, out, export = _dry_run(tmp_path, ",".join(steps))
    _check_dry_run(proc, out, export, steps)


@pytest.mark.slow
def test_full_dry_run_of_the_driver(tmp_path):
    steps = [s.name for s in evidence.STEPS]
    proc, out, export = _dry_run(tmp_path, ",".join(steps))
    _check_dry_run(proc, out, export, steps)


def _run(tmp_path, *extra) -> "evidence.Run":
    args = evidence.parse_args(["--smoke", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "res"),
                                "--export-dir", str(tmp_path / "out"), "--min-step-s", "1", *extra])
    return evidence.Run(args)


def test_a_hung_step_is_killed_and_the_run_goes_on(tmp_path, monkeypatch):
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "fake_hang.py").write_text(
        "import signal, time\n"
        "def main(argv):\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a process stuck in a kernel\n"
        "    print('hang started', flush=True)\n"
        "    time.sleep(600)\n")
    (modules / "fake_quick.py").write_text(
        "import json, pathlib\n"
        "def main(argv):\n"
        "    out = pathlib.Path(argv[argv.index('--out-dir') + 1]) / 'cpu'\n"
        "    out.mkdir(parents=True, exist_ok=True)\n"
        "    (out / 'quick.json').write_text(json.dumps({'records': [{'error': None}]}))\n"
        "    return 0\n")
    monkeypatch.syspath_prepend(str(modules))
    run = _run(tmp_path, "--budget-s", "120")
    started = time.monotonic()
    run.run_step(evidence.Step("hang", 2, "fake_hang", smoke_args=()))
    assert time.monotonic() - started < 15
    assert run.state["steps"][-1]["status"] == "TIMEOUT after 2 s"
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:  # exported right after the step
        log = tar.extractfile("performance_experiments/results/cpu/logs/hang.log").read().decode()
    assert "hang started" in log
    run.run_step(evidence.Step("quick", 30, "fake_quick", smoke_args=()))
    assert run.state["steps"][-1]["status"] == "ok"
    assert run.finish() == 1  # a step timed out
    assert (tmp_path / "res" / "cpu" / "quick.json").is_file() and (tmp_path / "out" / "table.txt").is_file()


def test_a_step_is_skipped_when_the_budget_is_spent(tmp_path):
    run = _run(tmp_path, "--budget-s", "5", "--min-step-s", "20")
    run.run_step(evidence.STEPS[0])
    assert run.state["steps"][-1]["status"] == "skipped (budget)"


def _fake_build(run, seconds: float, ok: bool) -> None:
    """Make ``run``'s background build a script that sleeps, writes the library, exits 0 or 1."""
    body = (f"import pathlib, sys, time; time.sleep({seconds}); d = pathlib.Path({str(run.build_dir)!r}); "
            f"d.mkdir(parents=True, exist_ok=True); (d / 'libslope_sm90.so').write_text('x'); sys.exit({0 if ok else 1})")
    run.build_command = lambda: [sys.executable, "-c", body]


@pytest.mark.parametrize("ok", [True, False])
def test_background_build_is_waited_for_and_used_when_it_succeeds(tmp_path, ok):
    run = _run(tmp_path, "--budget-s", "120", "--build-wait-s", "60")
    _fake_build(run, 1, ok)
    run.start_build("the prebuilt library is stale")
    run.wait_for_build()
    assert run.child_env.get("SLOPE_SM90_LIB") == (str(run.build_dir / "libslope_sm90.so") if ok else None)
    assert run.build.summary()["status"] == ("ok" if ok else "failed (exit 1)")


def test_background_build_wait_is_bounded_and_the_build_stopped_at_the_end(tmp_path):
    run = _run(tmp_path, "--budget-s", "120", "--build-wait-s", "1")
    _fake_build(run, 60, True)
    run.start_build("missing")
    started = time.monotonic()
    run.wait_for_build()
    run.wait_for_build()  # the wait budget is spent: no second wait
    assert time.monotonic() - started < 5 and run.build.running() and "SLOPE_SM90_LIB" not in run.child_env
    run.finish()
    assert not run.build.running()


def test_kernel_step_result_decides_the_fallback_build(tmp_path):
    run = _run(tmp_path)
    path = run.stage / "cpu" / "kernel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    jit_off = "cannot load the prebuilt library x.so: bad ELF; compiling the torch extension instead is off (SLOPE_SM90_JIT=0)"
    path.write_text(json.dumps({"records": [{"status": "skipped", "skipped": jit_off}]}))
    assert run.build_needed_after_kernel_step() == jit_off
    path.write_text(json.dumps({"records": [{"status": "skipped", "skipped": "needs a Hopper GPU (compute capability 9.0)"}]}))
    assert run.build_needed_after_kernel_step() is None


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("step", evidence.STEPS, ids=lambda s: s.name)
def test_every_steps_gpu_arguments_are_accepted_by_its_script(step, monkeypatch, tmp_path):
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    module = importlib.import_module(step.module)
    with pytest.raises(_Parsed) as parsed:
        module.main([*step.gpu_args, "--out-dir", str(tmp_path), "--budget-s", "10"])
    args = parsed.value.args[0]
    assert args.budget_s == 10 and not args.smoke
    if getattr(args, "shapes", None):
        from performance_experiments.common import layer_shape

        pairs = [p.split(":") for p in args.shapes.split(",")]
        assert len(pairs) == 4 and all(layer_shape(model, layer) for model, layer in pairs)


def test_smoke_suite_fails_when_a_fast_path_is_wrong(tmp_path, monkeypatch):
    """The suite must be able to fail: a scatter kernel that drops one kept value, and a backend
    whose product is slightly off, are both caught (on CPU, through the paths they replace)."""
    from slope import kernels
    from slope.backends.reference import ReferenceBackend

    real_scatter = kernels.scatter_kept_2to4

    def bad_scatter(values, mask, dtype=None):
        out = real_scatter(values, mask, dtype)
        out.view(-1)[out.view(-1).nonzero()[0]] = 0
        return out

    real_matmul = ReferenceBackend.matmul
    monkeypatch.setattr(kernels, "scatter_kept_2to4", bad_scatter)
    monkeypatch.setattr(ReferenceBackend, "matmul", lambda self, x, op: real_matmul(self, x, op) * 1.001)
    code = gpu_smoke.main(["--smoke", "--checks", "layer,kept_values", "--out-dir", str(tmp_path)])
    records = json.loads((tmp_path / "cpu" / "smoke.json").read_text())["records"]
    failed = {(r["check"], r["name"].split()[0]) for r in records if r["status"] == "FAILED"}
    assert code == 1
    assert ("kept_values", "scatter_kept") in failed and ("layer", "reference") in failed
    assert ("kept_values", "gather_kept+=") not in failed


def test_the_before_column_reads_committed_results_no_gpu_run_writes():
    """The early H100 figures live in their own folder: a run on an H100 (slug ``nvidia-h100``) or an
    H200 writes elsewhere, so it neither overwrites them nor compares with itself."""
    table = importlib.import_module("performance_experiments.evidence_table")
    common = importlib.import_module("performance_experiments.common")
    before = table.ratios(common.DEFAULT_OUT_DIR / table.BEFORE_DEVICE)
    assert before and {commit.removesuffix("+dirty") for _, commit, _ in before.values()} <= {"5efd217", "4b704b9"}
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100 NVL"):
        assert common.slugify_device_name(name) != table.BEFORE_DEVICE


def test_the_weights_memory_row_names_the_largest_parts(tmp_path):
    """The inference weights-memory row says which parts of the sparse model cost most (weights_parts)."""
    table = importlib.import_module("performance_experiments.evidence_table")
    record = {"config": {"model": "llama-1b", "precision": "bf16"}, "backend": "auto", "commit": "abc", "error": None,
              "weights_memory_ratio": 0.74, "sparse": {"weights_parts": {"mask_bits": 3 * 2**20, "operand values": 9 * 2**20,
                                                                        "lora_A": 2**20, "dense modules": 5 * 2**20}}}
    (tmp_path / "inference.json").write_text(json.dumps({"records": [record]}))
    value, _, note = table.ratios(tmp_path)[("inference weights memory", "llama-1b bf16", "auto")]
    assert value == 0.74 and note == "sparse/dense; operand values 9 MiB, dense modules 5 MiB, mask_bits 3 MiB"
