"""One GPU run that measures every headline ratio of slope, within a fixed budget (issue 22).

Steps, in this order, each in its own forked process with its own time limit (a hung kernel
costs one step, never the run) and its results copied out as soon as it ends:

=============  ====  ==========================================================================
step           cap   what
=============  ====  ==========================================================================
kernel          40   the cutlass-sm90 kernel ready (prebuilt library, one GEMM against float64)
smoke           90   ``gpu_smoke.py``: every GPU path against its oracle on fresh random inputs
calibration     25   ``calibration.py``: copy bandwidth, dense 8192³ bf16 GEMM (the ceilings)
gemm            55   sparse GEMM on 4 LLM shapes (8192 tokens, bf16): cutlass-sm90, cusparselt, auto
layer           65   7B FFN up / down: fwd, fwd+bwd, fwd+bwd+AdamW step (fp32 master, bf16 autocast)
e2e            100   Llama-1B training step (fp32 master, bf16 autocast, fused AdamW both sides), peak memory
inference       65   Llama-1B then 4 Llama-2-7B layers, merged sparse+LoRA (rank 64, frozen): prefill 8×1024 per
                     adapter fold, decode batch 8 eager and under CUDA graphs, weights memory
=============  ====  ==========================================================================

Every benchmark measures dense and sparse in the same run (the scripts' own methods, see
README.md). The ``cutlass-sm90`` kernel is never compiled under a step's limit: the parent checks
the prebuilt library (``build/sm90``, carried with the call; :mod:`slope.kernels.cutlass_sm90_lib`)
at t=0 and, when it is missing, stale or does not load, starts its build in the background; steps
that use the kernel wait for that build at most ``--build-wait-s`` in all (children run with
``SLOPE_SM90_JIT=0``, so nothing compiles inside a step).

Budget: each step's limit is its cap, cut to what is left of ``--budget-s`` (default 450 s, for a
device call of 480 s); a step whose limit would fall under 20 s is skipped; each script is told to
stop starting new cases some seconds before its limit. After every step the results folder
(``performance_experiments/results/<device>/``: one JSON per step, ``gpu_evidence.json`` with every
step's status, and ``logs/``) is packed into ``$OUT/results.tgz`` with the driver's log beside it,
so a run killed from outside still returns what it measured. A short table of the ratios, next to
the earlier H100 figures, is printed last (and written to ``gpu_evidence_table.txt``).

    python performance_experiments/gpu_evidence.py                  # on the GPU machine (scripts/gpu_check.sh)
    python performance_experiments/gpu_evidence.py --smoke          # CPU dry run: tiny shapes, reference backends
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from performance_experiments.common import DEFAULT_OUT_DIR, git_commit, slugify_device_name  # noqa: E402
from performance_experiments.evidence_table import render_table  # noqa: E402

RESERVE_S = 10  # kept back from the budget for the table and the last copy to $OUT
GEMM_SHAPES = "llama2-7b:ffn_up,llama2-7b:ffn_down,llama3-8b:ffn_up,llama2-70b:ffn_up"


@dataclass(frozen=True)
class Step:
    """One step: ``<module>.main(args + --out-dir + --budget-s)``, its exit status the int it returns (0
    for anything else) or 1 for an exception."""

    name: str  # also the name of its results file, <device>/<name>.json
    cap_s: int
    module: str
    gpu_args: tuple[str, ...] = ()
    smoke_args: tuple[str, ...] = ("--smoke",)
    needs_sm90: bool = True


STEPS = (
    Step("kernel", 40, "performance_experiments.gpu_smoke", ("--checks", "kernel", "--name", "kernel"),
         ("--smoke", "--checks", "kernel", "--name", "kernel"), needs_sm90=False),
    Step("smoke", 90, "performance_experiments.gpu_smoke"),
    Step("calibration", 25, "performance_experiments.calibration", needs_sm90=False),
    Step("gemm", 55, "performance_experiments.gemm",
         ("--shapes", GEMM_SHAPES, "--tokens", "8192", "--dtypes", "bf16", "--backends", "cutlass-sm90,cusparselt,auto")),
    Step("layer", 65, "performance_experiments.layer",
         ("--models", "llama2-7b", "--layers", "ffn_up,ffn_down", "--tokens", "8192", "--dtypes", "bf16",
          "--master", "fp32", "--backends", "cutlass-sm90,auto")),
    Step("e2e", 100, "performance_experiments.e2e",
         ("--models", "llama-1b", "--batch", "4", "--seq", "2048", "--precision", "autocast",
          "--backends", "auto,cutlass-sm90")),
    Step("inference", 65, "performance_experiments.inference",
         ("--models", "llama-1b,llama2-7b-4L", "--backends", "auto", "--batch", "8", "--prompt", "1024",
          "--decode-batch", "8", "--lora-rank", "64", "--decode-repeats", "3")),
)


def _child(module: str, argv: list[str], log_path: str, env: dict) -> None:
    """Body of a step's forked process: own process group, output to its log, exit status = result."""
    os.setpgrp()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    os.environ.update(env)
    code = 1
    try:
        result = importlib.import_module(module).main(argv)
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the step's log, the run goes on
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class BackgroundBuild:
    """The fallback build of the cutlass-sm90 library (``python -m slope.kernels.cutlass_sm90_lib build``)."""

    command: list[str]
    out_dir: Path
    log_path: Path
    reason: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def summary(self) -> dict:
        rc = None if self.proc is None else self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.monotonic()
        status = "running" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
        return {"reason": self.reason, "status": status, "seconds": round((self.ended or time.monotonic()) - self.started, 1),
                "library": str(self.out_dir / "libslope_sm90.so"), "log": self.log_path.name}


class Run:
    """State of one driver run: paths, deadline, step outcomes, the background build, exports."""

    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.slug = "cpu" if args.smoke else _gpu_slug()
        self.stage = Path(args.work_dir) / "results"
        shutil.rmtree(self.stage, ignore_errors=True)
        self.logs = self.stage / self.slug / "logs"
        self.logs.mkdir(parents=True)
        self.export_dir = Path(args.export_dir) if args.export_dir else None
        self.build: BackgroundBuild | None = None
        self.build_dir = Path(args.work_dir) / "sm90_build"
        self.build_wait_left = float(args.build_wait_s)
        self.child_env = {"SLOPE_SM90_JIT": "0", "PYTHONUNBUFFERED": "1"}
        #: "fork" (steps start warm); "spawn" only if something initialised CUDA in this process,
        #: which a forked step could not use (see _preimport).
        self.start_method = "fork"
        self.state = {"script": "gpu_evidence", "commit": git_commit(), "device": self.slug, "smoke": args.smoke,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget_s,
                      "steps": [], "sm90_library": None, "fallback_build": None}

    # ------------------------------------------------------------------ output
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.logs / "gpu_evidence.log", "a") as log:
            log.write(text + "\n")

    def save_state(self) -> None:
        self.state["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        if self.build is not None:
            self.state["fallback_build"] = self.build.summary()
        path = self.stage / self.slug / "gpu_evidence.json"
        path.write_text(json.dumps(self.state, indent=1) + "\n")

    def export(self) -> None:
        """Pack the results folder into ``<export>/results.tgz`` (and copy the driver log there)."""
        self.save_state()
        if self.export_dir is None:
            return
        self.export_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.export_dir / "results.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.stage, arcname="performance_experiments/results")
        tmp.replace(self.export_dir / "results.tgz")
        shutil.copy(self.logs / "gpu_evidence.log", self.export_dir / "gpu_evidence.log")

    # ------------------------------------------------------------------ the cutlass-sm90 library
    def check_library(self) -> None:
        """t=0: is the prebuilt library usable for these sources? If not, build it in the background."""
        from slope.kernels import cutlass_sm90_lib

        path = cutlass_sm90_lib.default_library_path()
        problem = cutlass_sm90_lib.check(path)
        manifest = cutlass_sm90_lib.manifest_path(path)
        self.state["sm90_library"] = {"path": str(path), "key": cutlass_sm90_lib.build_key(), "problem": problem,
                                      "manifest": json.loads(manifest.read_text()) if problem is None else None}
        self.say(f"=== cutlass-sm90 library: {problem or f'{path} matches these sources'}")
        if problem is not None and not self.args.smoke:
            self.start_build(problem)

    def build_command(self) -> list[str]:
        return [sys.executable, "-m", "slope.kernels.cutlass_sm90_lib", "build", "--out", str(self.build_dir)]

    def start_build(self, reason: str) -> None:
        if self.build is not None:
            return
        self.build = BackgroundBuild(self.build_command(), self.build_dir, self.logs / "sm90_build.log", reason)
        self.build.start()
        self.say(f"=== building the cutlass-sm90 library in the background ({reason})")

    def wait_for_build(self) -> None:
        """Before a step that uses the kernel: wait for a running build (within --build-wait-s in all),
        then point the steps at its library if it succeeded."""
        if self.build is None:
            return
        if self.build.running():
            wait = min(self.build_wait_left, self.left() - RESERVE_S - self.args.min_step_s)
            self.say(f"=== waiting up to {max(wait, 0):.0f} s for the background build")
            start = time.monotonic()
            while self.build.running() and time.monotonic() - start < wait:
                time.sleep(0.5)
            self.build_wait_left -= time.monotonic() - start
        if not self.build.running() and self.build.proc.returncode == 0:
            self.child_env["SLOPE_SM90_LIB"] = str(self.build.out_dir / "libslope_sm90.so")

    def build_needed_after_kernel_step(self) -> str | None:
        """The kernel step's reason when it found the library unusable (not when the GPU is not sm90)."""
        path = self.stage / self.slug / "kernel.json"
        try:
            records = json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError):
            return None
        reasons = [r.get("skipped") or "" for r in records if r.get("status") == "skipped"]
        return next((r for r in reasons if "SLOPE_SM90_JIT=0" in r), None)

    # ------------------------------------------------------------------ steps
    def run_step(self, step: Step) -> None:
        if step.needs_sm90 and not self.args.smoke:
            self.wait_for_build()
        limit = int(min(step.cap_s * self.args.cap_scale, self.left() - RESERVE_S))
        outcome = {"step": step.name, "limit_s": limit}
        if limit < self.args.min_step_s:
            self.say(f"=== {step.name}: skipped ({self.left():.0f} s of the budget left)")
            self.state["steps"].append({**outcome, "status": "skipped (budget)", "seconds": 0})
            self.export()
            return
        soft = max(5, limit - max(15, limit // 4))
        argv = [*(step.smoke_args if self.args.smoke else step.gpu_args), "--out-dir", str(self.stage),
                "--budget-s", str(soft)]
        log_path = self.logs / f"{step.name}.log"
        self.say(f"=== {step.name} (limit {limit} s, stops new cases after {soft} s): {step.module.split('.')[-1]} "
                 f"{' '.join(argv)}")
        sys.stdout.flush()
        started = time.monotonic()
        proc = multiprocessing.get_context(self.start_method).Process(
            target=_child, args=(step.module, argv, str(log_path), dict(self.child_env)))
        proc.start()
        position = 0
        while proc.is_alive() and time.monotonic() - started < limit:
            proc.join(1.0)
            position = self._echo(log_path, position)
        timed_out = proc.is_alive()
        if timed_out:
            _kill_group(proc)
        self._echo(log_path, position)
        seconds = round(time.monotonic() - started, 1)
        status = f"TIMEOUT after {limit} s" if timed_out else ("ok" if proc.exitcode == 0 else f"FAILED (exit {proc.exitcode})")
        errors = _record_errors(self.stage, step.name)
        if errors and status == "ok":
            status = f"ok, {errors} cases failed"
        self.say(f"=== {step.name}: {status} in {seconds} s")
        self.state["steps"].append({**outcome, "status": status, "seconds": seconds, "exit": proc.exitcode})
        self.export()

    def _echo(self, log_path: Path, position: int) -> int:
        """Print what the step wrote to its log since ``position``; returns the new position."""
        try:
            with open(log_path, "rb") as log:
                log.seek(position)
                chunk = log.read()
        except OSError:
            return position
        if chunk:
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            with open(self.logs / "gpu_evidence.log", "a") as driver_log:
                driver_log.write(text)
        return position + len(chunk)

    def finish(self) -> int:
        if self.build is not None:
            self.build.stop()
        self.save_state()
        table = render_table(self.stage, self.slug)
        (self.stage / self.slug / "gpu_evidence_table.txt").write_text(table + "\n")
        out_dir = Path(self.args.out_dir)
        for folder in self.stage.iterdir():
            shutil.copytree(folder, out_dir / folder.name, dirs_exist_ok=True)
        self.say(table)
        self.export()
        if self.export_dir is not None:
            shutil.copy(self.stage / self.slug / "gpu_evidence_table.txt", self.export_dir / "table.txt")
        failed = [s for s in self.state["steps"] if not s["status"].startswith(("ok", "skipped"))]
        return 1 if failed else 0


def _kill_group(proc) -> None:
    """SIGTERM to the step's process group, then SIGKILL if it is still there after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.join(grace)
        if not proc.is_alive():
            return


def _record_errors(stage: Path, name: str) -> int:
    """How many records of a step's results failed (an error other than unavailable / budget, or FAILED)."""
    count = 0
    for path in stage.glob(f"*/{name}.json"):
        try:
            records = json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError):
            continue
        for r in records:
            error = r.get("error") or ""
            count += r.get("status") == "FAILED" or bool(error and not error.startswith(("unavailable", "skipped")))
    return count


def _gpu_slug() -> str:
    """The GPU's slug from nvidia-smi (the parent never touches CUDA, so that forked steps can)."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        name = []
    return slugify_device_name(name[0]) if name else "unknown-gpu"


def _machine_report() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,"
                               "temperature.gpu,power.draw", "--format=csv"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"


def _preimport(steps: list[Step]) -> str:
    """Import what the steps import, so that each forked step starts warm; returns the start method
    for the steps: "fork", or "spawn" if an import initialised CUDA here after all (a forked child
    cannot use CUDA then). ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (set by :func:`main`) keeps
    ``torch.cuda.is_available()`` in imported code from initialising the driver."""
    import torch

    import slope.lora  # noqa: F401
    if any(step.name in ("e2e", "inference") for step in steps):
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
    for step in steps:
        importlib.import_module(step.module)
    return "spawn" if torch.cuda.is_initialized() else "fork"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: tiny shapes, reference backends")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 450 on GPU, 300 with --smoke)")
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma list of steps to run")
    parser.add_argument("--out-dir", default=None, help="results root; <device>/ is copied there at the end (default: "
                        "performance_experiments/results; with --smoke, <work-dir>/dry_run_results, so a dry run leaves the committed results alone)")
    parser.add_argument("--work-dir", default="/tmp/slope_gpu_evidence", help="staging folder of this run")
    parser.add_argument("--export-dir", default=os.environ.get("OUT"), help="folder that receives results.tgz after every step (default: $OUT)")
    parser.add_argument("--build-wait-s", type=float, default=90, help="longest wait, in all, for a background build")
    parser.add_argument("--cap-scale", type=float, default=1.0, help="multiply every step's cap (a longer lease)")
    parser.add_argument("--min-step-s", type=float, default=20, help="skip a step whose limit would be shorter")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (300 if args.smoke else 450)
    args.out_dir = args.out_dir or str(Path(args.work_dir) / "dry_run_results" if args.smoke else DEFAULT_OUT_DIR)
    args.step_names = [n for n in args.steps.split(",") if n]
    unknown = sorted(set(args.step_names) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # this process must not initialise CUDA
    args = parse_args(argv)
    run = Run(args)
    run.say(f"=== slope gpu_evidence: commit {run.state['commit']}, device {run.slug}, budget {args.budget_s:.0f} s, "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    if not args.smoke:
        run.say(_machine_report())
    run.check_library()
    steps = [s for s in STEPS if s.name in args.step_names]
    run.start_method = _preimport(steps)
    run.say(f"=== imports done after {time.monotonic() - run.t0:.1f} s; steps start by {run.start_method}")
    for step in steps:
        run.run_step(step)
        if step.name == "kernel" and not args.smoke:
            reason = run.build_needed_after_kernel_step()
            if reason:
                run.start_build(reason)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
