"""The ``cutlass-sm90`` kernel as a prebuilt shared library: build it with nvcc alone, check it, load it.

The torch extension of :mod:`slope.kernels.cutlass_sm90` compiles at first use on the GPU machine
(~100 s) and needs the CUDA toolkit's full headers. This module instead compiles the same kernel
(``slope/kernels/csrc/sm90_sparse_gemm.cu``) behind the C ABI of ``slope/kernels/csrc/sm90_sparse_gemm_capi.cpp`` into a
plain shared library, with nvcc and the CUTLASS headers only: no GPU, no PyTorch headers, so it is
built ahead of time on any x86-64 machine with nvcc >= 12.2, carried to the GPU machine, and loaded
there with ctypes in milliseconds. :class:`Sm90Library` has the extension's interface
(``compress`` / ``gemm``, errors returned last), so :mod:`slope.kernels.cutlass_sm90` uses whichever
it has.

Files: ``<dir>/libslope_sm90.so`` and its manifest ``<dir>/libslope_sm90.json`` (build key, the
sources' and the library's sha256, flags, nvcc and CUTLASS versions, date). The **build key**
(:func:`build_key`: the first 64 bits of the sha256 of the C/C++ sources and the flags) is also
compiled into the library (``slope_sm90_build_key()``). A library is used only when the manifest's
key, the library's own key and the file's sha256 all match these sources; otherwise :func:`load`
says why in one line (and how to rebuild) and the caller falls back.

Where: ``$SLOPE_SM90_LIB`` (the .so's path) or ``<repository>/build/sm90/libslope_sm90.so``.

    python -m slope.kernels.cutlass_sm90_lib build [--out DIR]    # ~80-150 s on 2 CPU cores
    python -m slope.kernels.cutlass_sm90_lib check [--lib PATH]   # matches + loads? exit 0 (no GPU needed)
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from slope.filestamp import file_stamp
from slope.serialization.jsonfile import read_json_object
from slope.kernels import cutlass_sm90 as _sm90

__all__ = ["LIB_SOURCES", "build_flags", "build_key", "default_library_path", "manifest_path", "build", "check",
           "load", "Sm90Library"]

LIB_NAME = "libslope_sm90.so"
#: the checkout holding slope/ (``build/sm90/`` there is where the library is built and carried).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the translation units of the library (the .cu holds the kernels, the .cpp the C ABI).
LIB_SOURCES = ("sm90_sparse_gemm.cu", "sm90_sparse_gemm_capi.cpp")
#: every file whose content enters the build key.
_KEYED = LIB_SOURCES + ("sm90_sparse_gemm_kernels.h", "sm90_sparse_gemm.h")
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
_REBUILD = "rebuild it: python -m slope.kernels.cutlass_sm90_lib build"


def build_flags() -> list[str]:
    """nvcc flags of the library (without the include paths and the key define)."""
    return ["-std=c++17", "-shared", "-Xcompiler", "-fPIC", *_sm90.nvcc_flags()]


def build_key(sources: Path | None = None) -> str:
    """16 hex digits: the sha256 prefix of the keyed sources (names and bytes) and :func:`build_flags`."""
    sources = Path(sources or _sm90.CUDA_SOURCES)
    digest = hashlib.sha256()
    for name in _KEYED:
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    digest.update(json.dumps(build_flags()).encode())
    return digest.hexdigest()[:16]


def default_library_path() -> Path:
    """``$SLOPE_SM90_LIB`` or ``<repository>/build/sm90/libslope_sm90.so``."""
    env = os.environ.get("SLOPE_SM90_LIB")
    return Path(env) if env else REPO_ROOT / "build" / "sm90" / LIB_NAME


def manifest_path(library: Path) -> Path:
    return Path(library).with_suffix(".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cutlass_version(include_dir: Path) -> str | None:
    header = include_dir / "cutlass" / "version.h"
    if not header.is_file():
        return None
    found = dict(re.findall(r"#define CUTLASS_(MAJOR|MINOR|PATCH) (\d+)", header.read_text()))
    return ".".join(found.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH"))


def build(out_dir: Path | str | None = None, *, nvcc: str | None = None, verbose: bool = False) -> Path:
    """Compile the library into ``out_dir`` (default: the folder of :func:`default_library_path`)
    and write its manifest; returns the library's path. RuntimeError (nvcc's errors) on failure.

    The library is compiled under a temporary name and renamed, then the manifest written, so a
    killed build never leaves a library that :func:`check` accepts."""
    nvcc = nvcc or _sm90.nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc was not found: install the CUDA toolkit (>= 12.2) or set CUDA_HOME")
    include_dirs = _sm90.cutlass_include_dirs()
    out_dir = Path(out_dir) if out_dir else default_library_path().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    library, key = out_dir / LIB_NAME, build_key()
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
    cmd = [nvcc, *build_flags(), f"-I{_sm90.CUDA_SOURCES}", *(f"-I{d}" for d in include_dirs),
           f"-DSLOPE_SM90_BUILD_KEY=0x{key}ULL", *(str(_sm90.CUDA_SOURCES / s) for s in LIB_SOURCES), "-o", str(tmp)]
    if verbose:
        print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [line for line in (proc.stderr or proc.stdout).splitlines() if "error" in line.lower()][:5]
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}): " + (" | ".join(errors) or proc.stderr[-2000:]))
    seconds = time.perf_counter() - started
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    tmp.replace(library)
    manifest = {
        "key": key,
        "library": LIB_NAME,
        "sha256": _sha256(library),
        "bytes": library.stat().st_size,
        "sources": {name: _sha256(_sm90.CUDA_SOURCES / name) for name in _KEYED},
        "flags": build_flags(),
        "nvcc": version[-1] if version else None,
        "cutlass": _cutlass_version(include_dirs[0]),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
    }
    tmp_manifest = manifest_path(library).with_suffix(".json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp_manifest.replace(manifest_path(library))
    return library


def check(library: Path | str | None = None) -> str | None:
    """Why the library at ``library`` (default :func:`default_library_path`) must not be used for
    these sources, without loading it (files only), or None when its manifest matches.

    The verdict is cached per process, keyed on the :func:`slope.filestamp.file_stamp` of the
    library, its manifest and every keyed source plus :func:`build_flags`: a repeated call (every
    availability query on the GPU machine) only stats those files instead of hashing the ~1.3 MB
    library and the sources again, and a file that is rewritten, touched, replaced or removed
    changes the key and is checked afresh (one modified in the last two seconds has no stamp: it
    is checked every time). The cache holds immutable verdicts (``str`` or None) only, so nothing
    one model or library path does can change another's answer."""
    library = Path(library) if library else default_library_path()
    files = (library, manifest_path(library), *(Path(_sm90.CUDA_SOURCES) / name for name in _KEYED))
    stamps = tuple(file_stamp(f) for f in files)
    if None in stamps:  # a file missing or just written: nothing to key a verdict on
        return _check_files(library)
    return _check_cached(str(library), stamps, tuple(build_flags()))


@functools.lru_cache(maxsize=32)
def _check_cached(library: str, stamps: tuple, flags: tuple) -> str | None:
    """:func:`_check_files` of ``library``; ``stamps`` and ``flags`` only key the cache."""
    return _check_files(Path(library))


def _check_files(library: Path) -> str | None:
    """:func:`check`'s work: read the manifest, key the sources, hash the library."""
    if not library.is_file():
        return f"no prebuilt cutlass-sm90 library at {library}; {_REBUILD}"
    manifest_file = manifest_path(library)
    try:
        manifest = read_json_object(manifest_file, ValueError)
        built_key, built_sha = manifest["key"], manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"prebuilt library {library} has no readable manifest {manifest_file.name} ({type(exc).__name__}); {_REBUILD}"
    key = build_key()
    if built_key != key:
        return (f"prebuilt library {library} was built from other sources or flags (its key {built_key}, "
                f"these sources' {key}); {_REBUILD}")
    if _sha256(library) != built_sha:
        return f"prebuilt library {library} differs from the file its manifest describes (copied in part?); {_REBUILD}"
    return None


def load(library: Path | str | None = None) -> tuple["Sm90Library | None", str | None]:
    """``(Sm90Library, None)`` when the library matches these sources and loads, else ``(None, why)``."""
    library = Path(library) if library else default_library_path()
    problem = check(library)
    if problem is not None:
        return None, problem
    return _load_checked(str(library.resolve()))


@functools.lru_cache(maxsize=None)
def _load_checked(path: str) -> tuple["Sm90Library | None", str | None]:
    try:
        lib = ctypes.CDLL(path)
        lib.slope_sm90_build_key.restype = ctypes.c_ulonglong
        built = f"{lib.slope_sm90_build_key():016x}"
        library = Sm90Library(lib, path)
    except (OSError, AttributeError) as exc:  # not loadable here, or a symbol missing
        return None, f"cannot load the prebuilt library {path}: {exc}; {_REBUILD}"
    if built != build_key():
        return None, f"prebuilt library {path} reports build key {built}, these sources need {build_key()}; {_REBUILD}"
    return library, None


class Sm90Library:
    """The loaded library with the torch extension's interface: ``compress(dense) -> (values, meta,
    error)`` and ``gemm(values, meta, b, bias, c, alpha, beta) -> (d, error)``, error ``""`` on success.

    Inputs are validated by :mod:`slope.kernels.cutlass_sm90` (contiguous, 16-byte aligned CUDA
    tensors of one dtype); outputs are allocated here with PyTorch on the current stream.

    **Bound GEMMs.** ``gemm`` does not rebuild the kernel's parameters (CUTLASS arguments, TMA
    descriptors) on every call: it binds them once per (pointers, shape, alpha, beta) with
    ``slope_sm90_gemm_bind`` and afterwards only launches (``slope_sm90_gemm_run``), so a call
    whose tensors sit where they sat before (steady decoding: PyTorch's caching allocator hands
    out the same blocks; always under a CUDA graph's static memory) costs one dict lookup and a
    launch. Up to :attr:`max_bound` handles are kept (least recently used freed first); a handle
    holds only addresses and is used only for exactly those addresses.
    """

    #: bound GEMM handles kept per library (each a few KiB of host memory).
    max_bound = 4096

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        p, i, f, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.POINTER(ctypes.c_longlong)
        err = [ctypes.c_char_p, i]
        lib.slope_sm90_compressed_sizes.argtypes = [i, i, i, ll, *err]
        lib.slope_sm90_compress.argtypes = [i, i, p, i, i, p, p, p, *err]
        lib.slope_sm90_gemm_workspace_size.argtypes = [i, i, i, i, ll, *err]
        lib.slope_sm90_gemm.argtypes = [i, i, p, p, p, p, p, p, i, i, i, f, f, p, p, *err]
        lib.slope_sm90_gemm_bind.argtypes = [i, i, p, p, p, p, p, p, i, i, i, f, f, p, ctypes.POINTER(p), *err]
        lib.slope_sm90_gemm_run.argtypes = [p, i, p, *err]
        lib.slope_sm90_gemm_release.argtypes = [p]
        lib.slope_sm90_gemm_release.restype = None
        for fn in (lib.slope_sm90_compressed_sizes, lib.slope_sm90_compress, lib.slope_sm90_gemm_workspace_size,
                   lib.slope_sm90_gemm, lib.slope_sm90_gemm_bind, lib.slope_sm90_gemm_run):
            fn.restype = i
        self._bound: OrderedDict[tuple, tuple[int, torch.Tensor | None]] = OrderedDict()
        self._bound_lock = threading.Lock()
        self._local = threading.local()  # one error buffer per thread (the backward runs on another)

    def _call(self, fn, *args) -> str:
        err = getattr(self._local, "err", None)
        if err is None:
            err = self._local.err = ctypes.create_string_buffer(1024)
        if not fn(*args, err, len(err)):
            return ""
        return err.value.decode(errors="replace")

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one library per process, shapes repeat
    def compressed_sizes(self, dtype_code: int, m: int, k: int) -> tuple[int, int, int, int]:
        sizes = (ctypes.c_longlong * 4)()
        error = self._call(self.lib.slope_sm90_compressed_sizes, dtype_code, m, k, sizes)
        if error:
            raise RuntimeError(error)
        return tuple(sizes)

    @functools.lru_cache(maxsize=1024)  # noqa: B019
    def _workspace_bytes(self, dtype_code: int, m: int, n: int, k: int) -> int:
        size = ctypes.c_longlong()
        error = self._call(self.lib.slope_sm90_gemm_workspace_size, dtype_code, m, n, k, ctypes.byref(size))
        if error:
            raise RuntimeError(error)
        return size.value

    def compress(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        code, (m, k) = _DTYPE_CODES[dense.dtype], dense.shape
        rows, cols, meta_rows, meta_cols = self.compressed_sizes(code, m, k)
        values = torch.empty(rows, cols, device=dense.device, dtype=dense.dtype)
        meta = torch.empty(meta_rows, meta_cols, device=dense.device, dtype=torch.uint8)
        error = self._call(self.lib.slope_sm90_compress, code, dense.get_device(), dense.data_ptr(), m, k,
                           values.data_ptr(), meta.data_ptr(), _stream(dense.device))
        return values, meta, error

    def gemm(self, values, meta, b, bias, c, alpha: float, beta: float, out: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """``(d, error)``; ``out``: a contiguous ``(N, M)`` tensor to write ``d`` into (else a new one)."""
        code, m, k, n = _DTYPE_CODES[values.dtype], values.shape[0], values.shape[1] * 2, b.shape[0]
        _, _, meta_rows, meta_cols = self.compressed_sizes(code, m, k)
        if meta.shape[0] != meta_rows or meta.numel() != meta_rows * meta_cols:
            return b.new_empty(0), (f"cutlass-sm90 gemm: meta has shape {tuple(meta.shape)}, expected "
                                    f"({meta_rows}, {meta_cols}) for a ({m}, {k}) operand: pass the meta from "
                                    "the same compress()")
        d = torch.empty(n, m, device=b.device, dtype=b.dtype) if out is None else out
        device = b.get_device()
        key = (code, device, values.data_ptr(), meta.data_ptr(), b.data_ptr(), 0 if bias is None else bias.data_ptr(),
               0 if c is None else c.data_ptr(), d.data_ptr(), m, n, k, alpha, beta)
        bound = self._bound.get(key)
        if bound is None:
            bound, error = self._bind(key, b.device)
            if error:
                return d, error
        else:
            self._bound.move_to_end(key)
        return d, self._call(self.lib.slope_sm90_gemm_run, bound[0], device, _stream(b.device))

    def _bind(self, key: tuple, device: torch.device) -> tuple[tuple | None, str]:
        """Bind a GEMM for ``key`` (see :meth:`gemm`) with its own workspace; ``(bound, error)``."""
        code, index, values, meta, b, bias, c, d, m, n, k, alpha, beta = key
        ws_bytes = self._workspace_bytes(code, m, n, k)
        workspace = torch.empty(ws_bytes, device=device, dtype=torch.uint8) if ws_bytes else None
        handle = ctypes.c_void_p()
        error = self._call(self.lib.slope_sm90_gemm_bind, code, index, values, meta, b, bias or None, c or None, d,
                           m, n, k, alpha, beta, None if workspace is None else workspace.data_ptr(), ctypes.byref(handle))
        if error:
            return None, error
        bound = (handle.value, workspace)
        with self._bound_lock:
            self._bound[key] = bound
            while len(self._bound) > self.max_bound:
                _, (old, _) = self._bound.popitem(last=False)
                self.lib.slope_sm90_gemm_release(old)
        return bound, ""

    def bound_count(self) -> int:
        """How many bound GEMMs are cached (tests and benchmarks report it)."""
        return len(self._bound)

    def release_bound(self) -> None:
        """Free every bound GEMM (e.g. before freeing the memory their addresses point at for good)."""
        with self._bound_lock:
            while self._bound:
                _, (handle, _) = self._bound.popitem()
                self.lib.slope_sm90_gemm_release(handle)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="compile the library and write its manifest")
    build_cmd.add_argument("--out", default=None, help="output folder (default: build/sm90 of the checkout)")
    check_cmd = sub.add_parser("check", help="does the library match these sources and load? (exit 0 when usable)")
    check_cmd.add_argument("--lib", default=None, help="path of the .so (default: $SLOPE_SM90_LIB or build/sm90)")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            library = build(args.out, verbose=True)
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built {library} ({library.stat().st_size / 2**20:.1f} MiB), key {build_key()}")
        return 0
    problem = load(args.lib)[1]
    print(problem or f"ok: {args.lib or default_library_path()} matches these sources (key {build_key()})")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
