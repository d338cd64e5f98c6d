"""The cutlass-sm90 sources on a CPU machine: the loader's checks (fast) and a compile-only build
of the CUDA translation unit with the local nvcc for sm_90a (slow: ~1.5-3 min on 2 cores).

The torch extension itself cannot compile here (no cusparse headers), but the kernel TU is
free of torch: it is compiled with its standalone self-test ``main`` (``-DSLOPE_SM90_SELFTEST``),
which the GPU machine can also run.
"""
import shutil
import subprocess

import pytest
import torch

from slope.backends import backend_class
from slope.kernels import cutlass_sm90


def _headers_or_skip():
    try:
        return cutlass_sm90.cutlass_include_dirs()
    except FileNotFoundError as exc:
        pytest.skip(f"CUTLASS headers missing: {exc}")


def test_backend_unavailable_off_hopper_says_why():
    cls = backend_class("cutlass-sm90")
    assert cls.name == "cutlass-sm90"
    assert "float16" in cls.unavailable_reason(torch.device("cpu"), torch.float32)
    reason = cls.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "CUDA" in reason
    if not torch.cuda.is_available():
        assert cutlass_sm90.build_problem() is not None
        with pytest.raises(RuntimeError, match="cutlass-sm90 is unavailable"):
            cutlass_sm90.load_extension()


def test_missing_headers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOPE_CUTLASS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cutlass.h"):
        cutlass_sm90.cutlass_include_dirs()


def test_build_cache_key_follows_the_sources(tmp_path, monkeypatch):
    dirs = _headers_or_skip()
    key = cutlass_sm90._cache_key(dirs)
    assert key == cutlass_sm90._cache_key(dirs)
    for name in cutlass_sm90._HASHED:
        (tmp_path / name).write_bytes((cutlass_sm90.CUDA_SOURCES / name).read_bytes())
    monkeypatch.setattr(cutlass_sm90, "CUDA_SOURCES", tmp_path)
    assert cutlass_sm90._cache_key(dirs) == key
    header = tmp_path / "sm90_sparse_gemm_kernels.h"
    header.write_bytes(b"// edited\n" + header.read_bytes())
    assert cutlass_sm90._cache_key(dirs) != key


@pytest.mark.slow
def test_sm90_translation_unit_compiles_for_sm90a(tmp_path):
    nvcc = cutlass_sm90.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    dirs = _headers_or_skip()
    exe = tmp_path / "sm90_sparse_gemm_selftest"
    flags = [f for f in cutlass_sm90.nvcc_flags() if not f.startswith("-U")]
    cmd = [
        nvcc, "-std=c++17", *flags, "-DSLOPE_SM90_SELFTEST",
        "-I", str(cutlass_sm90.CUDA_SOURCES), *[arg for d in dirs for arg in ("-I", str(d))],
        str(cutlass_sm90.CUDA_SOURCES / "sm90_sparse_gemm.cu"), "-o", str(exe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-6000:]}"
    assert exe.is_file() and exe.stat().st_size > 0
    # Without an sm90 GPU the self-test must say so (exit 2) instead of running anything.
    if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stdout + run.stderr
