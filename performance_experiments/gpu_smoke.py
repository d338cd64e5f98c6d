"""GPU smoke suite: every fast path of slope against an oracle on fresh random inputs, in about a minute.

What it checks (each check one record of ``smoke.json``; on CPU the same checks run over the
reference paths, which exercises the suite itself):

- ``kernel``: the ``cutlass-sm90`` kernel (the prebuilt library or the extension) — compress then
  multiply by the identity gives the operand back bit for bit; ``alpha·x Aᵀ + beta·c + bias`` against
  float64, fp16 and bf16, a tile-aligned and a ragged shape;
- ``layer``: a SparseLinear per backend (every GPU backend and ``auto``; fp32 master weights under
  bf16 autocast, as the benchmarks train): forward, input gradient ``dy (W⊙M⊙M_t)``, kept weight
  gradient and bias gradient against float64 from independently computed masks, then one
  ``ADAMWSparse`` step and the forward again (operands rebuilt from the new values);
- ``kept_values``: the kept-value kernels (gather with accumulation, scatter, transpose to kept
  values and to dense, double pruning; packed masks as layers store them) bit-exact against
  :mod:`slope.kernels.reference`;
- ``optimizer``: the one-pass AdamW kernel (bf16 / fp16 parameters, fp32 moments) against the reference,
  and the fused step that also writes both operands (fp32 master) bit-exact against the unfused chain;
- ``merged_lora``: merged sparse + LoRA layers (prefill- and decode-sized inputs, both adapter folds) per backend against float64;
- ``auto``: ``auto``'s choice on two LLM shapes: never slower than dense by its own timings, and
  its product right.

Relative errors are ``‖got − oracle‖ / ‖oracle‖`` (Frobenius, float64); outputs of in-place kernels
are poisoned with NaN first, and the allocator's cache is filled with NaN before each check so an
unwritten output element cannot pass. The results file is rewritten after every check (a killed
run keeps what it checked); the exit status is 1 when any check failed.

    python performance_experiments/gpu_smoke.py [--checks kernel,layer,...] [--budget-s 80]
    python performance_experiments/gpu_smoke.py --smoke     # CPU: the same checks on reference paths
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from performance_experiments.common import Budget, base_parser, environment, error_text, pick_device, write_results
from slope import kernels
from slope.backends import backend_class
from slope.kernels import reference as ref
from slope.masks import double_prune_mask, nm_mask, pack_mask

SCRIPT = "smoke"
CHECKS = ("kernel", "layer", "kept_values", "optimizer", "merged_lora", "auto")
#: relative (Frobenius) error bounds against float64 by compute dtype.
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖got − expected‖ / ‖expected‖`` in float64 over all elements (same count; leading dims may be
    flattened in one of them); inf when ``got`` has a NaN or inf."""
    got, expected = got.detach().double().reshape(expected.shape), expected.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def poison_allocator(device: torch.device, nbytes: int = 256 * 2**20) -> None:
    """Fill a block of the CUDA caching allocator with NaN and free it, so that outputs allocated
    next start as NaN rather than as some earlier call's (possibly right) values."""
    if device.type == "cuda":
        block = torch.full((nbytes // 4,), float("nan"), device=device)
        del block


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Suite:
    """Runs checks, records each result, rewrites the results file after each one."""

    def __init__(self, device, out_dir, args, budget: Budget, seed: int, name: str = SCRIPT):
        self.device, self.out_dir, self.args, self.budget, self.seed = device, out_dir, args, budget, seed
        self.name = name
        self.env, self.records = environment(device), []

    def generator(self, offset: int) -> torch.Generator:
        """A generator for one check, seeded from the run's seed (recorded, so a failure can be replayed)."""
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def record(self, check: str, name: str, errors: dict | None = None, tol: float | None = None, *,
               ok: bool | None = None, skipped: str | None = None, **extra) -> None:
        errors = {k: round(v, 7) if v == v and v != float("inf") else str(v) for k, v in (errors or {}).items()}
        if ok is None and skipped is None:
            ok = all(isinstance(v, float) and v <= tol for v in errors.values())
        status = "skipped" if skipped else ("ok" if ok else "FAILED")
        self.records.append({"script": self.name, **self.env, "check": check, "name": name, "status": status,
                             "errors": errors, "tol": tol, "skipped": skipped, **extra})
        print(f"[smoke] {status:7s} {check:12s} {name:40s} {errors if errors else ''} {skipped or ''}", flush=True)
        write_results(self.name, self.records, self.out_dir, self.device, {**self.args, "partial": True}, quiet=True)

    def run(self, check: str, fn) -> None:
        if self.budget.expired():
            self.record(check, "all", skipped="budget")
            return
        poison_allocator(self.device)
        try:
            fn(self)
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, the next one runs
            self.record(check, "exception", ok=False, detail=error_text(exc))

    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "FAILED"]


def _backend_problem(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "auto":
        return None
    try:
        return backend_class(name).unavailable_reason(device, dtype)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot load is reported, not fatal
        return error_text(exc)


def _sparse_of(rows: int, cols: int, device, gen) -> torch.Tensor:
    """A random (rows, cols) fp32 matrix that keeps two non-zeros in every group of 4 along cols."""
    w = torch.randn(rows, cols, device=device, generator=gen)
    w = w.sign() * (w.abs() + 0.1)
    return w * nm_mask(w, 2, 4)


# ------------------------------------------------------------------------------------- checks
def check_kernel(suite: Suite) -> None:
    """The cutlass-sm90 kernel itself, through :mod:`slope.kernels.cutlass_sm90`."""
    from slope.kernels import cutlass_sm90

    device, gen = suite.device, suite.generator(0)
    problem = _backend_problem("cutlass-sm90", device, torch.bfloat16)
    if problem is not None:
        suite.record("kernel", "cutlass-sm90", skipped=problem)
        return
    library = cutlass_sm90.load_extension()
    source = getattr(library, "path", "torch extension")
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k in ((1024, 512, 2048), (200, 77, 784)):
            a = _sparse_of(m, k, device, gen).to(dtype)
            values, meta = cutlass_sm90.compress(a)
            back = cutlass_sm90.gemm(values, meta, torch.eye(k, device=device, dtype=dtype))
            b = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
            bias = torch.randn(m, device=device, dtype=dtype, generator=gen)
            c = torch.randn(n, m, device=device, dtype=dtype, generator=gen)
            d = cutlass_sm90.gemm(values, meta, b, bias=bias, c=c, alpha=0.5, beta=-1.5)
            oracle = 0.5 * (b.double() @ a.double().t()) - 1.5 * c.double() + bias.double()
            exact = bool(torch.equal(back.t(), a))
            suite.record("kernel", f"cutlass-sm90 {_dt(dtype)} {m}x{n}x{k}", {"gemm": rel_err(d, oracle)}, TOL[dtype],
                         ok=exact and rel_err(d, oracle) <= TOL[dtype], identity_exact=exact, library=source)


def _layer_oracle(w32: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, dtype) -> dict:
    """float64 forward / input / weight / bias gradients of a double-pruned 2:4 layer, masks from the references."""
    mask = nm_mask(w32, 2, 4)
    mask_t = double_prune_mask(w32 * mask, mask, 2, 4)
    w = (w32 * mask).to(dtype).double()
    x2, dy2 = x.reshape(-1, x.shape[-1]).double(), dy.reshape(-1, dy.shape[-1]).double()
    full_grad = dy2.t() @ x2
    return {"mask": mask, "mask_t": mask_t, "y": x2 @ w.t() + bias.to(dtype).double(), "dx": dy2 @ (w * mask_t),
            "values_grad": full_grad[mask].view(w.shape[0], -1), "bias_grad": dy2.sum(0)}


def check_layer(suite: Suite) -> None:
    """Forward, backward and one optimizer step of a SparseLinear per backend."""
    from slope.layer import SparseLinear
    from slope.optimizers import ADAMWSparse

    device, gen = suite.device, suite.generator(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ["cutlass-sm90", "auto", "dense", "cusparselt", "cutlass", "triton", "reference"] if device.type == "cuda" \
        else ["reference", "auto"]
    out_f, in_f = 768, 512
    for name in names:
        if suite.budget.expired():
            suite.record("layer", name, skipped="budget")
            continue
        problem = _backend_problem(name, device, dtype)
        if problem is not None:
            suite.record("layer", name, skipped=problem)
            continue
        w32 = torch.randn(out_f, in_f, device=device, generator=gen) * 0.05
        bias = torch.randn(out_f, device=device, generator=gen)
        layer = SparseLinear.from_dense(w32, bias, compress=True, backend=name)
        x = torch.randn(4, 33, in_f, device=device, dtype=dtype, generator=gen).requires_grad_()
        dy = torch.randn(4, 33, out_f, device=device, dtype=dtype, generator=gen)
        oracle = _layer_oracle(w32, bias, x.detach(), dy, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)
        y.backward(dy)
        errors = {"y": rel_err(y, oracle["y"]), "dx": rel_err(x.grad, oracle["dx"]),
                  "values_grad": rel_err(layer.values_grad, oracle["values_grad"]),
                  "bias_grad": rel_err(layer.bias.grad, oracle["bias_grad"])}
        masks_ok = bool(torch.equal(layer.mask, oracle["mask"]) and torch.equal(layer.mask_t, oracle["mask_t"]))
        opt = ADAMWSparse(nn.Sequential(layer), lr=1e-2, weight_decay=0.0)
        opt.step()
        opt.zero_grad()
        fused_operands = sorted(layer.operand_buffers())  # operands the optimizer pass wrote (CUDA)
        updated = torch.zeros(out_f, in_f, device=device)
        updated[oracle["mask"]] = layer.values.detach().float().flatten()
        x_next = torch.randn(64, in_f, device=device, dtype=dtype, generator=gen)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y_next = layer(x_next)
        moved = float((updated - (w32 * oracle["mask"])).abs().max())
        errors["y_after_step"] = rel_err(y_next, x_next.double() @ updated.to(dtype).double().t() + bias.to(dtype).double())
        used = sorted({b.name for b in layer._backends.values()})
        tol = TOL[dtype] * 2  # gradients sum over 132 tokens in the compute dtype
        ok = masks_ok and moved > 0 and all(e <= tol for e in errors.values())
        suite.record("layer", name, errors, tol, ok=ok, masks_match_reference=masks_ok, step_moved=moved, backends_used=used,
                     fused_operand_step=fused_operands)


def check_kept_values(suite: Suite) -> None:
    """The kept-value kernels as the layers call them, bit-exact against the references."""
    device, gen = suite.device, suite.generator(2)
    low = torch.bfloat16
    for rows, cols in ((1024, 2048) if device.type == "cuda" else (256, 512), (96, 200)):
        w = torch.randn(rows, cols, device=device, generator=gen)
        mask = nm_mask(w, 2, 4)
        mask_t = double_prune_mask(w * mask, mask, 2, 4)
        bits, bits_t = pack_mask(mask), pack_mask(mask_t)
        values = ref.gather_kept_2to4(w, mask)  # fp32 master values
        full = torch.randn(cols, rows, device=device, generator=gen).to(low).t()  # a strided dense gradient
        acc = torch.randn(rows, cols // 2, device=device, generator=gen)
        got_acc = kernels.gather_kept_2to4(full, bits, acc.clone())
        results = {
            "gather_kept+=": torch.equal(got_acc, ref.gather_kept_2to4(full, mask, acc.clone())),
            "scatter_kept": torch.equal(kernels.scatter_kept_2to4(values, bits, low),
                                        ref.scatter_kept_2to4(values, mask, low)),
            "transpose_kept": torch.equal(kernels.transpose_kept_2to4(values, bits, bits_t, low),
                                          ref.transpose_kept_2to4(values, mask, mask_t, low)),
            "transpose_kept_dense": torch.equal(kernels.transpose_kept_2to4(values, bits, bits_t, low, dense=True),
                                                ref.transpose_kept_2to4(values, mask, mask_t, low, dense=True)),
            "double_prune": torch.equal(kernels.double_prune_mask_2to4(w * mask, bits), mask_t),
            "prune_2to4": torch.equal(kernels.prune_2to4(w)[1], mask),
        }
        for kernel, exact in results.items():
            suite.record("kept_values", f"{kernel} {rows}x{cols}", ok=exact, bit_exact=exact)


def check_optimizer(suite: Suite) -> None:
    """One-pass AdamW (low-precision parameters, fp32 moments) against the reference, within one ulp."""
    device, gen = suite.device, suite.generator(3)
    n = 1 << 20 if device.type == "cuda" else 1 << 14
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=5)
    for dtype in (torch.bfloat16, torch.float16):
        param = torch.randn(n, device=device, generator=gen).to(dtype)
        m, v = torch.randn(n, device=device, generator=gen) * 0.1, torch.rand(n, device=device, generator=gen) * 0.01
        grad = torch.randn(n, device=device, generator=gen).to(dtype)
        expected = [param.clone(), m.clone(), v.clone()]
        ref.adamw_step_(expected[0], grad, *expected[1:], **kw)
        got = [param.clone(), m.clone(), v.clone()]
        kernels.adamw_step_(got[0], grad, *got[1:], **kw)
        bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]
        ulp = 2.0 ** (torch.frexp(expected[0].float())[1].float() - bits)
        param_ok = bool(((got[0].float() - expected[0].float()).abs() <= ulp * 1.01 + 1e-12).all())
        errors = {"exp_avg": rel_err(got[1], expected[1]), "exp_avg_sq": rel_err(got[2], expected[2])}
        suite.record("optimizer", f"adamw_step_ {_dt(dtype)}", errors, 1e-6,
                     ok=param_ok and all(e <= 1e-6 for e in errors.values()), param_within_one_ulp=param_ok)
    check_fused_operand_step(suite, gen)


def check_fused_operand_step(suite: Suite, gen: torch.Generator) -> None:
    """AdamW over fp32 master kept values that also writes both operands (one pass,
    :func:`slope.kernels.adamw_step_operands_`) against the unfused chain — the same AdamW step,
    then the cast and ``transpose_kept_2to4`` of the new values — bit for bit, fp32 master, bf16
    and fp16 operands, packed masks as layers store them."""
    device = suite.device
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=5)
    rows, cols = (11008, 4096) if device.type == "cuda" else (256, 512)
    w = torch.randn(rows, cols, device=device, generator=gen)
    mask = nm_mask(w, 2, 4)
    mask_t = double_prune_mask(w * mask, mask, 2, 4)
    bits, bits_t = pack_mask(mask), pack_mask(mask_t)
    values = ref.gather_kept_2to4(w, mask)
    grad = torch.randn(values.shape, device=device, generator=gen)
    m, v = torch.randn(values.shape, device=device, generator=gen) * 0.1, torch.rand(values.shape, device=device, generator=gen) * 0.01
    for dtype in (torch.bfloat16, torch.float16):
        chain = [values.clone(), m.clone(), v.clone()]
        kernels.adamw_step_(chain[0], grad, chain[1], chain[2], **kw)
        fused = [values.clone(), m.clone(), v.clone()]
        fwd = torch.full((rows, cols // 2), float("nan"), device=device, dtype=dtype)
        bwd = torch.full((cols, rows // 2), float("nan"), device=device, dtype=dtype)
        kernels.adamw_step_operands_(fused[0], grad, fused[1], fused[2], bits, bits_t, fwd=fwd, bwd=bwd, **kw)
        results = {"state": all(torch.equal(a, b) for a, b in zip(chain, fused)),
                   "fwd": torch.equal(fwd, chain[0].to(dtype)),
                   "bwd": torch.equal(bwd, kernels.transpose_kept_2to4(chain[0], bits, bits_t, dtype))}
        suite.record("optimizer", f"adamw_step_operands_ {_dt(dtype)} {rows}x{cols}", ok=all(results.values()),
                     bit_exact=results)


def check_merged_lora(suite: Suite) -> None:
    """Merged sparse + LoRA layers against float64, in both adapter folds (``stacked``: one sparse GEMM
    of [W; A], then the fused add-mm; ``extended``: one GEMM of [x | ũ] by [W | B̃]); then frozen,
    with the state dict read back from what the operand holds."""
    from slope.layer import SparseLinear
    from slope.lora import freeze_for_inference, merge_lora, set_lora_fold

    device, gen = suite.device, suite.generator(4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ["auto", "cutlass-sm90", "cusparselt", "triton"] if device.type == "cuda" else ["reference"]
    for name in names:
        problem = _backend_problem(name, device, dtype)
        if problem is not None or suite.budget.expired():
            suite.record("merged_lora", name, skipped=problem or "budget")
            continue
        weight = torch.randn(512, 256, device=device, generator=gen).to(dtype) / 16
        bias = torch.randn(512, device=device, generator=gen).to(dtype)
        layer = SparseLinear.from_dense(weight, bias, compress=True, backend=name)
        layer.add_lora(16, alpha=32.0)
        with torch.no_grad():
            layer.lora_B.normal_(0.0, 0.1, generator=gen)
        a = (layer.lora_A * layer.lora_A_mask).double()
        w = (weight * layer.mask).double()
        b = layer.lora_B.detach().double()

        def error(x):
            with torch.no_grad():
                got = merged(x)
            xd = x.double()
            return rel_err(got, xd @ w.t() + layer.lora_scaling * (xd @ a.t()) @ b.t() + bias.double())

        merged = merge_lora(nn.Sequential(layer))
        for fold in ("extended", "stacked"):
            set_lora_fold(merged, fold)
            errors = {label: error(torch.randn(*shape, 256, device=device, dtype=dtype, generator=gen))
                      for label, shape in (("prefill", (3, 37)), ("decode", (1, 1)))}
            suite.record("merged_lora", f"{name} {fold}", errors, TOL[dtype])
        # frozen: the operand holds the masks (and, stacked, lora_A) where the backend reads them back
        state = {k: v.clone() for k, v in merged.state_dict().items()}
        freeze_for_inference(merged)
        for fold in ("extended", "stacked"):
            set_lora_fold(merged, fold)
            err = error(torch.randn(3, 37, 256, device=device, dtype=dtype, generator=gen))
            saved = merged.state_dict()
            same = all(torch.equal(saved[k], v) for k, v in state.items() if "mask_t" not in k)
            held = list(layer._held.names) if layer._held is not None else []
            suite.record("merged_lora", f"{name} {fold} frozen", {"prefill": err}, TOL[dtype],
                         ok=err <= TOL[dtype] and same, state_equal=same, held=held)


def check_auto(suite: Suite) -> None:
    """``auto``'s choice: never slower than dense by its own timings, and its product right."""
    device = suite.device
    if device.type != "cuda":
        suite.record("auto", "choice", skipped="auto chooses by timing on CUDA only (elsewhere: reference)")
        return
    from slope.backends.auto import AutoBackendChooser

    gen = suite.generator(5)
    chooser = AutoBackendChooser(tokens=4096)
    for shape in ((11008, 4096), (4096, 11008)):
        if suite.budget.expired():
            suite.record("auto", f"{shape[0]}x{shape[1]}", skipped="budget")
            continue
        choice = chooser.choose(shape, torch.bfloat16, device, tiling=True)
        (entry,) = [e for key, e in chooser.report().items() if key[0] == shape]
        w = _sparse_of(*shape, device, gen).to(torch.bfloat16)
        x = torch.randn(4096, shape[1], device=device, dtype=torch.bfloat16, generator=gen)
        y = choice.matmul(x, choice.make_operand(w, w != 0))
        err = rel_err(y, x.double() @ w.double().t())
        not_slower = entry.times_ms[choice.name] <= entry.times_ms["dense"]
        suite.record("auto", f"{shape[0]}x{shape[1]}", {"product": err}, TOL[torch.bfloat16],
                     ok=not_slower and err <= TOL[torch.bfloat16], choice=choice.name,
                     times_ms={k: round(v, 4) for k, v in entry.times_ms.items()}, candidate_errors=entry.errors)


_FUNCTIONS = {"kernel": check_kernel, "layer": check_layer, "kept_values": check_kept_values,
              "optimizer": check_optimizer, "merged_lora": check_merged_lora, "auto": check_auto}


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of {CHECKS}, run in that order")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: the clock, for fresh inputs)")
    parser.add_argument("--name", default=SCRIPT, help="results file <out-dir>/<device>/<name>.json")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    checks = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {CHECKS}")
    device = pick_device(args)
    suite = Suite(device, args.out_dir, vars(args), Budget(args.budget_s), args.seed, args.name)
    for check in checks:
        suite.run(check, _FUNCTIONS[check])
    failed = suite.failed()
    write_results(args.name, suite.records, args.out_dir, device, vars(args))
    counts = {s: sum(r["status"] == s for r in suite.records) for s in ("ok", "FAILED", "skipped")}
    print(f"[smoke] {counts['ok']} ok, {counts['FAILED']} failed, {counts['skipped']} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
