"""Every Triton kernel of ``slope.kernels`` compiles for real GPUs, ahead of time, on a CPU machine.

The interpreter tests (``test_triton_kernels.py``) check what the kernels compute; they do not
run Triton's GPU compiler, whose rules are stricter (layouts, ``tl.join``/``tl.split``/``reshape``,
pointer dtypes). This compiles each kernel with Triton's NVIDIA backend — no GPU needed, ptxas
ships with Triton — with the tile sizes the launchers use and masks as SLoPe layers pass them (packed bits): bf16 and
fp32 for sm_90 (H100), bf16 for sm_80 (A100); fp32 cases must have no TF32 products. The compiler cannot run under ``TRITON_INTERPRET=1`` (CI exports it), so the
test runs this file as a script in a subprocess without it (about a minute, cached afterwards).
"""
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
tk = pytest.importorskip("slope.kernels.triton_kernels")
ts = pytest.importorskip("slope.kernels.triton_sparse")
tf = pytest.importorskip("slope.kernels.triton_fused_step")
md = pytest.importorskip("slope.kernels.triton_merged_decode")
tl_ = pytest.importorskip("slope.kernels.triton_lowrank")

INTS = "i32"
C = "constexpr"


def _pointer(dtype: str) -> str:
    return f"*{dtype}"


def kernels(dtype: str):
    """(name, kernel, signature, constexpr values) for one element dtype (bf16, fp16 or fp32)."""
    p = _pointer(dtype)
    out = [
        *[(f"addmm[{'bias' if bias else 'no bias'}]", tk._addmm_kernel,
           {"a_ptr": p, "b_ptr": p, "c_ptr": p, "bias_ptr": "*fp32", "M": INTS, "N": INTS, "K": INTS, "alpha": "fp32",
            **{s: INTS for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn",
                                 "stride_bias")},
            "BLOCK_M": C, "BLOCK_N": C, "BLOCK_K": C, "GROUP_M": C, "CAST_F32": C, "IEEE": C, "HAS_BIAS": C},
           {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "CAST_F32": False, "IEEE": dtype == "fp32",
            "HAS_BIAS": bias}) for bias in (False, True)],
        ("matvec_add", tk._matvec_add_kernel,
         {"m_ptr": p, "v_ptr": p, **{a: INTS for a in ("rows", "N", "d1", "d2", "s0", "s1", "s2", "sn", "sv")},
          "BLOCK_R": C, "BLOCK_N": C},
         {"BLOCK_R": 16, "BLOCK_N": 128}),
        ("prune_2to4", tk._prune_kernel,
         {"x_ptr": p, "out_ptr": p, "mask_ptr": "*u8", "groups": INTS, "BLOCK": C}, {"BLOCK": 1024}),
        ("double_prune_mask_2to4", tk._double_prune_kernel,
         {"w_ptr": p, "m_ptr": "*u8", "out_ptr": "*u8", "row_groups": INTS, "cols": INTS, "BLOCK_Q": C, "BLOCK_C": C,
          "PACKED": C},
         {"BLOCK_Q": 16, "BLOCK_C": 64, "PACKED": True}),
        *[(f"gather_kept_2to4[{'packed' if packed else 'bool'}, {'add' if add else 'write'}]", tk._gather_kept_kernel,
           {"full_ptr": p, "mask_ptr": "*u8", "out_ptr": "*fp32", "rows": INTS, "groups": INTS, "stride_fr": INTS,
            "stride_fc": INTS, "BLOCK_R": C, "BLOCK_G": C, "ACCUMULATE": C, "PACKED": C},
           {"BLOCK_R": 32, "BLOCK_G": 32, "ACCUMULATE": add, "PACKED": packed})
          for packed, add in ((True, True), (False, True), (True, False))],
        # fp32 master values and moments; the operands in the case's dtype
        *[(f"adamw_step_operands_[{'fwd+bwd' if fwd else 'bwd'}]", tf._adamw_operands_kernel,
           {**{a: "*fp32" for a in ("p_ptr", "g_ptr", "m_ptr", "v_ptr")}, "mask_ptr": "*u8", "mask_t_ptr": "*u8",
            "fwd_ptr": p, "bwd_ptr": p, "rows": INTS, "cols": INTS,
            **{a: "fp32" for a in ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "step_size", "bias2_sqrt")},
            "BLOCK_Q": C, "BLOCK_G": C, "PACKED_M": C, "PACKED_T": C, "WRITE_FWD": C, "WRITE_BWD": C},
           {"BLOCK_Q": tf.BLOCK_Q, "BLOCK_G": tf.BLOCK_G, "PACKED_M": True, "PACKED_T": True, "WRITE_FWD": fwd,
            "WRITE_BWD": True}) for fwd in (True, False)],
        ("scatter_kept_2to4", tk._scatter_kept_kernel,
         {"values_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": p, "rows": INTS, "groups": INTS,
          "BLOCK_R": C, "BLOCK_G": C, "PACKED": C},
         {"BLOCK_R": 32, "BLOCK_G": 32, "PACKED": True}),
        ("adamw_step_", tk._adamw_kernel,
         {"p_ptr": p, "g_ptr": p, "m_ptr": "*fp32", "v_ptr": "*fp32", "n": INTS,
          **{a: "fp32" for a in ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "step_size", "bias2_sqrt")},
          "BLOCK": C},
         {"BLOCK": 1024}),
        *[(f"transpose_kept_2to4[{'dense' if dense else 'values'}]", tk._transpose_kept_kernel,
           {"values_ptr": "*fp32", "mask_ptr": "*u8", "mask_t_ptr": "*u8", "out_ptr": p, "rows": INTS, "cols": INTS,
            "BLOCK_J": C, "BLOCK_Q": C, "DENSE": C, "PACKED_M": C, "PACKED_T": C},
           {"BLOCK_J": 64, "BLOCK_Q": 16, "DENSE": dense, "PACKED_M": True, "PACKED_T": True}) for dense in (False, True)],
        ("lowrank_concat", tl_._lowrank_concat_kernel,
         {"x_ptr": p, "a_ptr": p, "out_ptr": p, **{a: INTS for a in ("M", "K", "R", "stride_xm", "stride_om")},
          "BLOCK_M": C, "BLOCK_K": C, "BLOCK_R": C, "CAST_F32": C, "IEEE": C},
         {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 32, "CAST_F32": False, "IEEE": dtype == "fp32"}),
    ]
    layouts = [("plain", "*u8", False)] + ([("cutlass", "*i16", True)] if dtype != "fp32" else [])
    for layout, meta, cutlass in layouts:
        out.append((f"prune_compress_2to4[{layout}]", tk._prune_compress_kernel,
                    {"x_ptr": p, "v_ptr": p, "meta_ptr": meta, "rows": INTS, "cols": INTS,
                     "BLOCK_R": C, "BLOCK_MC": C, "CUTLASS": C},
                    {"BLOCK_R": 32, "BLOCK_MC": 16, "CUTLASS": cutlass}))
        out.append((f"sparse_linear[{layout}]", ts._sparse_linear_kernel,
                    {"x_ptr": p, "v_ptr": p, "meta_ptr": meta, "out_ptr": p, "M": INTS, "N": INTS, "K": INTS,
                     **{s: INTS for s in ("stride_xm", "stride_xk", "stride_om", "stride_on")},
                     "BLOCK_M": C, "BLOCK_N": C, "BLOCK_K": C, "CUTLASS": C, "CAST_F32": C, "IEEE": C},
                    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "CUTLASS": cutlass, "CAST_F32": False,
                     "IEEE": dtype == "fp32"}))
        out.append((f"merged_decode[{layout}]", md._merged_decode_kernel,
                    {"x_ptr": p, "v_ptr": p, "meta_ptr": meta, "a_ptr": p, "b_ptr": p, "bias_ptr": p, "out_ptr": p,
                     **{a: INTS for a in ("M", "N", "K", "R", "stride_xm", "stride_v", "stride_om")},
                     "BLOCK_M": C, "BLOCK_N": C, "BLOCK_K": C, "BLOCK_R": C, "CUTLASS": C, "HAS_BIAS": C,
                     "CAST_F32": C, "IEEE": C},
                    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "BLOCK_R": 64, "CUTLASS": cutlass, "HAS_BIAS": True,
                     "CAST_F32": False, "IEEE": dtype == "fp32"}))
    return out


def cases():
    """(sm arch, dtype, kernel case) to compile."""
    return [(arch, dtype, case) for arch, dtypes in ((90, ("bf16", "fp32")), (80, ("bf16",)))
            for dtype in dtypes for case in kernels(dtype)]


def approximate_math(ptx: str) -> list[str]:
    """The approximate fp32 square roots and divisions in ``ptx`` (``sqrt.approx``, ``div.full``,
    ``div.approx``), which differ from PyTorch's IEEE ones by an ulp or two."""
    return sorted(set(re.findall(r"\b(?:sqrt\.approx|div\.full|div\.approx)[.a-z0-9]*", ptx)))


def main() -> int:
    """Compile every case; print one line per failure and a summary; 1 if any failed."""
    failures, todo = [], cases()
    for arch, dtype, (name, kernel, signature, constexprs) in todo:
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            if not compiled.asm.get("cubin") or f"sm_{arch}" not in compiled.asm["ptx"]:
                failures.append(f"sm{arch} {dtype} {name}: no sm_{arch} cubin")
            elif dtype == "fp32" and "tf32" in compiled.asm["ptx"]:
                failures.append(f"sm{arch} {dtype} {name}: TF32 products (fp32 products must be IEEE: "
                                'input_precision="ieee" unless allow_tf32, as the references compute)')
            elif name.startswith("adamw") and approximate_math(compiled.asm["ptx"]):
                failures.append(f"sm{arch} {dtype} {name}: approximate {approximate_math(compiled.asm['ptx'])} "
                                "(the AdamW kernels must round as the reference does: tl.sqrt_rn, tl.math.div_rn)")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the script fails
            failures.append(f"sm{arch} {dtype} {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    for line in failures:
        print("FAILED", line)
    print(f"compiled {len(todo) - len(failures)} of {len(todo)} kernel cases")
    return 1 if failures else 0


def test_every_triton_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert f"compiled {len(cases())} of {len(cases())}" in result.stdout


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the GPU compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.exit(main())
