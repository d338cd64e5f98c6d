"""slope's own CUTLASS 3.x 2:4 sparse GEMM for Hopper (sm_90a): a prebuilt library, or built at first use.

The C++ lives in ``slope/kernels/csrc/`` (:data:`CUDA_SOURCES`; package data, so installed
copies have it too): ``sm90_sparse_gemm_kernels.h`` (the CUTLASS kernel templates),
``sm90_sparse_gemm.h`` / ``sm90_sparse_gemm.cu`` (a type-erased fp16/bf16 API free of torch, so the
.cu compiles standalone with nvcc; ``-DSLOPE_SM90_SELFTEST`` adds a self-test ``main``) and
``sm90_sparse_gemm_binding.cpp`` (the PyTorch binding).
A **prebuilt library** comes first: when ``build/sm90/libslope_sm90.so`` (or ``$SLOPE_SM90_LIB``)
was built from these very sources (:mod:`slope.kernels.cutlass_sm90_lib`: the same kernel behind a
C ABI, compiled ahead of time with nvcc alone and loaded with ctypes), it is used and nothing is
compiled. Otherwise (a mismatched library is refused with a warning saying why) the kernel
is compiled as a torch extension (unless ``SLOPE_SM90_JIT=0``: then the backend is unavailable and
says why) against the CUTLASS headers shipped in the ``nvidia-cutlass``
wheel (``cutlass_library/source/include`` and ``.../tools/util/include``; ``SLOPE_CUTLASS_DIR``
may point at a CUTLASS checkout instead). The build is cached per user under
``$SLOPE_EXTENSIONS_DIR`` (default ``~/.cache/slope/torch_extensions``) in a folder keyed by a
hash of the sources, the CUTLASS version, torch and CUDA versions and the flags, so editing a
source or upgrading a dependency rebuilds and everything else reuses the cached ``.so``.

Operations (CUDA tensors, float16 or bfloat16):

- :func:`compress` ``(dense (M, K)) -> (values (M, K/2), meta)``, meta a uint8 tensor of metadata
  bytes padded to CUTLASS's (64 rows × 128 columns) blocks, in CUTLASS 3.x's sm90 layout (its
  ``StructuredSparseCompressor``, run on the GPU) — not PyTorch's sm80 CUTLASS layout of
  :func:`slope.kernels.compress_2to4`. ``K % 16 == 0``.
- :func:`gemm` ``(values, meta, b (N, K), bias (M,)?, c (N, M)?, alpha, beta) -> d (N, M)``:
  ``d = alpha * b @ A.T + beta * c + bias`` with A the dense (M, K) operand, fp32 accumulation,
  output in the input dtype; the bias and ``beta * c`` are fused into the epilogue. With A = W
  (out, in) and b = x (tokens, in) this is ``F.linear(x, W, bias)`` with no transposes.
  ``M % 8 == 0``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import torch

__all__ = [
    "SOURCES",
    "cutlass_include_dirs",
    "nvcc_path",
    "nvcc_flags",
    "build_problem",
    "unavailable_reason",
    "load_extension",
    "compress",
    "gemm",
]

#: the folder of the CUDA/C++ sources (not a Python package: no name to shadow anything with).
CUDA_SOURCES = Path(__file__).resolve().parent / "csrc"
#: compiled sources (the .cu is also the standalone test translation unit).
SOURCES = ("sm90_sparse_gemm.cu", "sm90_sparse_gemm_binding.cpp")
#: every file whose content keys the build cache.
_HASHED = SOURCES + ("sm90_sparse_gemm_kernels.h", "sm90_sparse_gemm.h")


def cutlass_include_dirs() -> list[Path]:
    """``[cutlass/include, cutlass/tools/util/include]``; FileNotFoundError saying how to get them.

    Taken from ``$SLOPE_CUTLASS_DIR`` (a CUTLASS source tree) when set, else from the installed
    ``nvidia-cutlass`` wheel (located without importing it: its Python half needs cuda-python).
    """
    root_env = os.environ.get("SLOPE_CUTLASS_DIR")
    if root_env:
        root = Path(root_env)
        where = f"SLOPE_CUTLASS_DIR={root_env}"
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the CUTLASS headers are missing: install them with `pip install nvidia-cutlass` "
                "(offline: `pip install --no-deps nvidia_cutlass-*.whl`) or set SLOPE_CUTLASS_DIR "
                "to a CUTLASS checkout"
            )
        root = Path(next(iter(spec.submodule_search_locations))) / "source"
        where = f"the nvidia-cutlass wheel ({root})"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    needed = (dirs[0] / "cutlass" / "cutlass.h", dirs[1] / "cutlass" / "util" / "packed_stride.hpp")
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"CUTLASS header {path} not found in {where}; reinstall nvidia-cutlass")
    return dirs


def nvcc_path() -> str | None:
    """The nvcc torch's extension builder will use (``CUDA_HOME/bin/nvcc``), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def nvcc_flags() -> list[str]:
    """nvcc flags: sm_90a only (wgmma / sparse wgmma need the arch-specific target)."""
    return [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-O3",
        "-DNDEBUG",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        # torch adds these for its own half types; CUTLASS's half_t/bfloat16_t need the operators.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]


def _jit_enabled() -> bool:
    """Whether a missing prebuilt library may be replaced by compiling the torch extension
    (``SLOPE_SM90_JIT=0`` turns that off, e.g. where a compile would eat a time-limited GPU run)."""
    return os.environ.get("SLOPE_SM90_JIT", "1") != "0"


def build_problem(device: torch.device | int | None = None) -> str | None:
    """Why the kernel cannot be made available or run here (no build attempted, no library
    loaded), or None."""
    from slope.kernels import cutlass_sm90_lib

    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    index = device if isinstance(device, int) else None if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability != (9, 0):
        return f"needs a Hopper GPU (compute capability 9.0, sm_90a); cuda:{index} has {capability[0]}.{capability[1]}"
    prebuilt_problem = cutlass_sm90_lib.check()
    return None if prebuilt_problem is None else _jit_problem(prebuilt_problem)


def _jit_problem(prebuilt_problem: str) -> str | None:
    """Why the torch extension cannot be compiled here instead of using the prebuilt library
    (which is unusable for ``prebuilt_problem``), or None."""
    if not _jit_enabled():
        return f"{prebuilt_problem}; compiling the torch extension instead is off (SLOPE_SM90_JIT=0)"
    if not all((CUDA_SOURCES / name).is_file() for name in _HASHED):
        return (f"the CUDA sources are not in {CUDA_SOURCES}: reinstall slope (they ship in slope/kernels/csrc/), "
                "or use a source checkout (git clone, then pip install -e .)")
    if nvcc_path() is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    try:
        cutlass_include_dirs()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def _cache_key(include_dirs: list[Path]) -> str:
    digest = hashlib.sha256()
    for name in _HASHED:
        digest.update(name.encode())
        digest.update((CUDA_SOURCES / name).read_bytes())
    version_header = include_dirs[0] / "cutlass" / "version.h"
    if version_header.is_file():
        digest.update(version_header.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{nvcc_path()}|{nvcc_flags()}".encode())
    return digest.hexdigest()[:16]


def _extensions_root() -> Path:
    env = os.environ.get("SLOPE_EXTENSIONS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "slope" / "torch_extensions"


@functools.lru_cache(maxsize=None)
def _build(verbose: bool) -> tuple[object | None, str | None]:
    """(the prebuilt library or the compiled extension, None) or (None, why not); the outcome is
    cached so a failing build runs once."""
    from slope.kernels import cutlass_sm90_lib

    problem = build_problem()
    if problem is not None:
        return None, problem
    library, why_not = cutlass_sm90_lib.load()
    if library is not None:
        return library, None
    if cutlass_sm90_lib.default_library_path().is_file():  # there is one, but not for these sources
        warnings.warn(f"cutlass-sm90: not using the prebuilt library: {why_not}", stacklevel=3)
    problem = _jit_problem(why_not)
    if problem is not None:
        return None, problem
    from torch.utils.cpp_extension import load

    include_dirs = cutlass_include_dirs()
    key = _cache_key(include_dirs)
    build_dir = _extensions_root() / f"cutlass_sm90_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        module = load(
            name=f"slope_cutlass_sm90_{key}",
            sources=[str(CUDA_SOURCES / s) for s in SOURCES],
            extra_include_paths=[str(CUDA_SOURCES)] + [str(d) for d in include_dirs],
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags(),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - any compiler/linker failure becomes one clear message
        return None, f"building the cutlass-sm90 extension in {build_dir} failed: {exc}"
    return module, None


def unavailable_reason(device: torch.device | int | None = None) -> str | None:
    """None when the extension runs on ``device`` (building it if needed), else why not."""
    problem = build_problem(device)
    if problem is not None:
        return problem
    return _build(False)[1]


def load_extension(verbose: bool = False):
    """The kernel's Python interface: the prebuilt library (:class:`slope.kernels.cutlass_sm90_lib.Sm90Library`)
    or the compiled extension (built on first call, then cached); RuntimeError saying why not."""
    module, problem = _build(verbose)
    if module is None:
        raise RuntimeError(f"cutlass-sm90 is unavailable: {problem}")
    return module


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(message)


def _require_cuda(t: torch.Tensor, name: str) -> None:
    _require(t.is_cuda, f"cutlass-sm90: {name} must be a CUDA tensor, got one on {t.device}")


def _check_cuda_operand(t: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype | None) -> None:
    _require(isinstance(t, torch.Tensor), f"cutlass-sm90: {name} must be a tensor, got {type(t).__name__}")
    _require_cuda(t, name)
    _require(t.device == device, f"cutlass-sm90: {name} is on {t.device} but the operand is on {device}")
    if dtype is not None:
        _require(t.dtype == dtype, f"cutlass-sm90: {name} is {t.dtype} but the sparse operand is {dtype} (cast one of them)")


def compress(dense: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 ``dense (M, K)`` fp16/bf16 CUDA tensor (``K % 16 == 0``) into CUTLASS's sm90
    ``(values (M, K/2), meta uint8)``. ``check`` verifies the 2:4 pattern first (one sync): the
    compressor's behaviour on a group with more than two non-zeros is undefined.

    Every input check happens here, in Python: the extension is only called with valid input
    (an error raised inside it was seen to crash the process on the GPU machine)."""
    _require(isinstance(dense, torch.Tensor) and dense.dim() == 2,
             f"cutlass-sm90 compress: dense must be a 2-D tensor (rows, cols), got {getattr(dense, 'shape', dense)}")
    _require(dense.dtype in (torch.float16, torch.bfloat16),
             f"cutlass-sm90 compress: dense must be float16 or bfloat16, got {dense.dtype}")
    _check_cuda_operand(dense, "dense", dense.device, None)
    rows, cols = dense.shape
    _require(rows > 0 and cols > 0 and cols % 16 == 0 and max(rows, cols) < 2**31,
             f"cutlass-sm90 compress: cols must be a positive multiple of 16, got shape {tuple(dense.shape)} "
             "(pad the columns with zeros)")
    if check:
        most = int((dense.reshape(rows, -1, 4) != 0).sum(-1).max())
        if most > 2:
            raise ValueError(
                f"cutlass-sm90 compress: dense is not 2:4 sparse along its columns (a group of 4 has {most} "
                "non-zeros); prune it first (slope.kernels.prune_2to4)"
            )
    values, meta, error = load_extension().compress(dense.contiguous())
    if error:
        raise RuntimeError(error)
    return values, meta


def gemm(
    values: torch.Tensor,
    meta: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """``d (N, M) = alpha * b (N, K) @ A.T + beta * c (N, M) + bias (M,)`` for A = (values, meta)
    from :func:`compress`; all CUDA tensors of the same dtype; ``beta`` is ignored without ``c``."""
    _require(isinstance(values, torch.Tensor) and isinstance(b, torch.Tensor) and values.dim() == 2 and b.dim() == 2,
             f"cutlass-sm90 gemm: values and b must be 2-D tensors, got {getattr(values, 'shape', values)} and "
             f"{getattr(b, 'shape', b)}")
    _require(values.dtype in (torch.float16, torch.bfloat16),
             f"cutlass-sm90 gemm: values must be float16 or bfloat16, got {values.dtype}")
    device, dtype = values.device, values.dtype
    _check_cuda_operand(values, "values", device, None)
    _check_cuda_operand(meta, "meta", device, None)
    _check_cuda_operand(b, "b", device, dtype)
    _require(meta.dtype == torch.uint8, f"cutlass-sm90 gemm: meta must be uint8 (from compress), got {meta.dtype}")
    m, k, n = values.shape[0], values.shape[1] * 2, b.shape[0]
    _require(b.shape[1] == k, f"cutlass-sm90 gemm: b has {b.shape[1]} columns but the sparse operand has {k} "
             f"(its values have {values.shape[1]} = K/2)")
    _require(m > 0 and n > 0 and k > 0 and max(m, n, k) < 2**31 and m % 8 == 0,
             f"cutlass-sm90 gemm: unsupported sizes M={m} N={n} K={k} (all positive, M a multiple of 8: pad the rows)")
    if bias is not None:
        _check_cuda_operand(bias, "bias", device, dtype)
        _require(bias.numel() == m, f"cutlass-sm90 gemm: bias must have {m} elements, got shape {tuple(bias.shape)}")
        bias = bias.contiguous()
    if c is not None:
        _check_cuda_operand(c, "c", device, dtype)
        _require(tuple(c.shape) == (n, m), f"cutlass-sm90 gemm: c must have shape ({n}, {m}), got {tuple(c.shape)}")
        c = c.contiguous()
    values, meta, b = values.contiguous(), meta.contiguous(), b.contiguous()
    for t, name in ((values, "values"), (meta, "meta"), (b, "b"), (bias, "bias"), (c, "c")):
        _require(t is None or t.data_ptr() % 16 == 0,
                 f"cutlass-sm90 gemm: {name} must be 16-byte aligned (call .clone() on a sliced tensor)")
    d, error = load_extension().gemm(values, meta, b, bias, c, float(alpha), float(beta))
    if error:
        raise RuntimeError(error)
    return d
