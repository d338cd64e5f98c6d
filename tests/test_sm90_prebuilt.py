"""The prebuilt cutlass-sm90 library (slope.kernels.cutlass_sm90_lib) on a CPU machine: the loader
accepts only a library built from these sources (manifest key, file hash, the key compiled into the
library), refuses anything else with one line saying how to rebuild, and cutlass_sm90 then falls
back (with a warning). Fake libraries are compiled with the C compiler in milliseconds; the real
nvcc build of the library is the slow test at the end (~1.5-12 min on 2 shared cores)."""
import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slope.kernels import cutlass_sm90, cutlass_sm90_lib as lib

FAKE_C = r"""
unsigned long long slope_sm90_build_key(void) { return KEY; }
int slope_sm90_compressed_sizes(void) { return 1; }
int slope_sm90_compress(void) { return 1; }
int slope_sm90_gemm_workspace_size(void) { return 1; }
int slope_sm90_gemm(void) { return 1; }
int slope_sm90_gemm_bind(void) { return 1; }
int slope_sm90_gemm_run(void) { return 1; }
void slope_sm90_gemm_release(void* handle) { }
"""


def _fake_library(folder, key: str, manifest_key: str | None = None, source: str = FAKE_C):
    """A shared library exporting the ABI's symbols (``source``: stubs by default) that reports
    ``key``, with a manifest."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    c_file, library = folder / "fake.c", folder / lib.LIB_NAME
    c_file.write_text(source.replace("KEY", f"0x{key}ULL"))
    subprocess.run([cc, "-shared", "-fPIC", str(c_file), "-o", str(library)], check=True)
    manifest = {"key": manifest_key or key, "sha256": lib._sha256(library)}
    lib.manifest_path(library).write_text(json.dumps(manifest))
    return library


@pytest.fixture(autouse=True)
def _fresh_loader():
    lib._load_checked.cache_clear()
    lib._check_cached.cache_clear()
    cutlass_sm90._build.cache_clear()
    yield
    lib._load_checked.cache_clear()
    lib._check_cached.cache_clear()
    cutlass_sm90._build.cache_clear()


def test_build_key_follows_every_source_and_flag(tmp_path, monkeypatch):
    key = lib.build_key()
    assert len(key) == 16 and int(key, 16) >= 0 and key == lib.build_key()
    for name in lib._KEYED:
        shutil.copy(cutlass_sm90.CUDA_SOURCES / name, tmp_path / name)
    assert lib.build_key(tmp_path) == key
    for name in lib._KEYED:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n")
        assert lib.build_key(tmp_path) != key, name
        (tmp_path / name).write_bytes(original)
    monkeypatch.setattr(cutlass_sm90, "nvcc_flags", lambda: ["-O2"])
    assert lib.build_key(tmp_path) != key


def test_default_path_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv("SLOPE_SM90_LIB", raising=False)
    assert lib.default_library_path() == Path(__file__).resolve().parents[1] / "build" / "sm90" / lib.LIB_NAME
    monkeypatch.setenv("SLOPE_SM90_LIB", str(tmp_path / "x.so"))
    assert lib.default_library_path() == tmp_path / "x.so"


def test_matching_library_loads(tmp_path):
    library = _fake_library(tmp_path, lib.build_key())
    assert lib.check(library) is None
    loaded, why = lib.load(library)
    assert why is None and isinstance(loaded, lib.Sm90Library) and loaded.path == str(library.resolve())


@pytest.mark.parametrize("damage, message", [
    ("missing", "no prebuilt cutlass-sm90 library"),
    ("no-manifest", "no readable manifest"),
    ("stale-manifest", "built from other sources or flags"),
    ("truncated", "differs from the file its manifest describes"),
    ("wrong-embedded-key", "reports build key 0000000000000001"),
])
def test_mismatched_library_is_refused_with_a_clear_message(tmp_path, damage, message):
    key = lib.build_key()
    library = tmp_path / lib.LIB_NAME
    if damage != "missing":
        embedded = "0000000000000001" if damage == "wrong-embedded-key" else key
        library = _fake_library(tmp_path, embedded, manifest_key="0" * 16 if damage == "stale-manifest" else key)
    if damage == "no-manifest":
        lib.manifest_path(library).unlink()
    if damage == "truncated":
        library.write_bytes(library.read_bytes()[:-100])
    loaded, why = lib.load(library)
    assert loaded is None and message in why and "\n" not in why
    assert why.endswith("rebuild it: python -m slope.kernels.cutlass_sm90_lib build")


def _dated(path, seconds_ago: int):
    """Date ``path``'s mtime ``seconds_ago`` back: what a file untouched for a while looks like (a
    file modified in the last 2 s has no stamp and is checked on every call)."""
    os.utime(path, ns=(path.stat().st_atime_ns, time.time_ns() - seconds_ago * 10**9))


def test_check_hashes_once_per_file_state_and_notices_changes(tmp_path, monkeypatch):
    """Repeated checks of unchanged files read nothing (no hashing); touching the library,
    rewriting its manifest (same size) or editing a source is noticed and checked afresh; a file
    just written is checked on every call."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in lib._KEYED:
        shutil.copy(cutlass_sm90.CUDA_SOURCES / name, sources / name)
    monkeypatch.setattr(cutlass_sm90, "CUDA_SOURCES", sources)
    library = _fake_library(tmp_path, lib.build_key())
    hashed = []
    real_sha256 = lib._sha256
    monkeypatch.setattr(lib, "_sha256", lambda path: hashed.append(Path(path)) or real_sha256(path))
    assert [lib.check(library) for _ in range(2)] == [None] * 2 and len(hashed) == 2  # just built: no stamp
    for path in (library, lib.manifest_path(library), *(sources / name for name in lib._KEYED)):
        _dated(path, 100)
    assert [lib.check(library) for _ in range(3)] == [None] * 3 and len(hashed) == 3
    _dated(library, 90)  # touched
    assert lib.check(library) is None and len(hashed) == 4
    manifest = json.loads(lib.manifest_path(library).read_text())
    lib.manifest_path(library).write_text(json.dumps({**manifest, "sha256": "0" * 64}))  # same size
    _dated(lib.manifest_path(library), 80)
    assert "differs from the file its manifest describes" in lib.check(library) and len(hashed) == 5
    lib.manifest_path(library).write_text(json.dumps(manifest))
    _dated(lib.manifest_path(library), 70)
    assert lib.check(library) is None and len(hashed) == 6
    (sources / lib._KEYED[-1]).write_bytes((sources / lib._KEYED[-1]).read_bytes() + b"\n")
    _dated(sources / lib._KEYED[-1], 60)
    assert "built from other sources or flags" in lib.check(library)
    assert lib.check(library) == lib.check(library) and lib._check_cached.cache_info().hits >= 2


def test_library_missing_a_symbol_is_refused(tmp_path):
    library = _fake_library(tmp_path, lib.build_key())
    source = (tmp_path / "fake.c").read_text().replace("int slope_sm90_gemm(void) { return 1; }\n", "")
    (tmp_path / "fake.c").write_text(source)
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(tmp_path / "fake.c"), "-o", str(library)], check=True)
    lib.manifest_path(library).write_text(json.dumps({"key": lib.build_key(), "sha256": lib._sha256(library)}))
    loaded, why = lib.load(library)
    assert loaded is None and "cannot load" in why and "slope_sm90_gemm" in why


def test_cutlass_sm90_prefers_a_matching_library_and_warns_on_a_stale_one(tmp_path, monkeypatch):
    """On a machine where the kernel could run (device checks patched away), a matching library is
    used as the kernel's interface; a stale one is refused with a warning and, with the JIT off,
    the backend is unavailable and says both why and that the JIT is off."""
    monkeypatch.setattr(cutlass_sm90, "build_problem", lambda device=None: None)
    monkeypatch.setenv("SLOPE_SM90_JIT", "0")
    good = tmp_path / "good"
    good.mkdir()
    monkeypatch.setenv("SLOPE_SM90_LIB", str(_fake_library(good, lib.build_key())))
    assert isinstance(cutlass_sm90.load_extension(), lib.Sm90Library)
    cutlass_sm90._build.cache_clear()
    stale = tmp_path / "stale"
    stale.mkdir()
    monkeypatch.setenv("SLOPE_SM90_LIB", str(_fake_library(stale, "0" * 16)))
    with pytest.warns(UserWarning, match="not using the prebuilt library"):
        with pytest.raises(RuntimeError, match=r"built from other sources.*SLOPE_SM90_JIT=0"):
            cutlass_sm90.load_extension()


ECHO_C = r"""
#include <stdio.h>
#include <string.h>
typedef unsigned short u16;
char last_call[512];
unsigned long long slope_sm90_build_key(void) { return KEY; }
int slope_sm90_compressed_sizes(int dtype, int M, int K, long long* sizes, char* err, int n) {
  sizes[0] = M; sizes[1] = K / 2; sizes[2] = M; sizes[3] = K / 8; return 0;
}
int slope_sm90_compress(int dtype, int device, const void* dense, int M, int K, void* values, void* meta,
                        void* stream, char* err, int n) {
  if (M == 8) { snprintf(err, n, "sm90 sparse compress: refused M=%d", M); return 1; }
  for (int r = 0; r < M; ++r) for (int j = 0; j < K / 2; ++j) ((u16*)values)[r * (K / 2) + j] = ((const u16*)dense)[r * K + 2 * j];
  memset(meta, dtype * 16 + device, (size_t)M * (K / 8));
  snprintf(last_call, sizeof last_call, "compress dtype=%d device=%d M=%d K=%d stream=%p", dtype, device, M, K, stream);
  return 0;
}
int slope_sm90_gemm_workspace_size(int dtype, int M, int N, int K, long long* bytes, char* err, int n) {
  *bytes = (long long)M * N; return 0;
}
int slope_sm90_gemm(int dtype, int device, const void* values, const void* meta, const void* b, const void* bias,
                    const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                    void* stream, char* err, int n) {
  return 1;  /* the wrapper binds and runs instead */
}
typedef struct { const void* b; void* d; int M, N, K; float alpha, beta; int bias, c, workspace; const void* meta; } bound_t;
int binds = 0, runs = 0, releases = 0;
int slope_sm90_gemm_bind(int dtype, int device, const void* values, const void* meta, const void* b, const void* bias,
                         const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                         void** handle, char* err, int n) {
  static bound_t slots[64];
  if (M == 24) { snprintf(err, n, "sm90 sparse gemm: refused M=%d", M); return 1; }
  bound_t* s = &slots[binds++ % 64];
  s->b = b; s->d = d; s->M = M; s->N = N; s->K = K; s->alpha = alpha; s->beta = beta;
  s->bias = bias != 0; s->c = c != 0; s->workspace = workspace != 0; s->meta = meta;
  snprintf(last_call, sizeof last_call, "bind dtype=%d device=%d M=%d N=%d K=%d alpha=%g beta=%g bias=%d c=%d workspace=%d",
           dtype, device, M, N, K, alpha, beta, bias != 0, c != 0, workspace != 0);
  *handle = s;
  return 0;
}
int slope_sm90_gemm_run(void* handle, int device, void* stream, char* err, int n) {
  bound_t* s = (bound_t*)handle;
  for (int i = 0; i < s->N * s->M; ++i) ((u16*)s->d)[i] = ((const u16*)s->b)[i % (s->N * s->K)];
  runs++;
  snprintf(last_call, sizeof last_call, "run device=%d stream=%p meta0=%d M=%d N=%d K=%d alpha=%g beta=%g bias=%d c=%d workspace=%d",
           device, stream, ((const unsigned char*)s->meta)[0], s->M, s->N, s->K, s->alpha, s->beta, s->bias, s->c, s->workspace);
  return 0;
}
void slope_sm90_gemm_release(void* handle) { releases++; }
"""


def test_library_calls_pass_every_argument_through_the_c_abi(tmp_path, monkeypatch):
    """The ctypes wrapper against an echoing fake of the C ABI (CPU tensors stand in for device
    memory): dtype and device codes, sizes, alpha/beta, optional bias / c, workspace and stream
    reach the library, outputs are allocated at the sizes it reports, and an error comes back as text."""
    import torch

    library = _fake_library(tmp_path, lib.build_key(), source=ECHO_C)
    loaded, why = lib.load(library)
    assert why is None, why
    monkeypatch.setattr(lib, "_stream", lambda device: 0x1234)
    last = ctypes.c_char.in_dll(loaded.lib, "last_call")
    dense = torch.arange(16 * 32, dtype=torch.float32).reshape(16, 32).to(torch.bfloat16)
    values, meta, error = loaded.compress(dense)
    assert error == "" and torch.equal(values, dense[:, ::2]) and meta.shape == (16, 4) and bool((meta == 15).all())  # dtype 1 * 16 + device -1
    assert ctypes.string_at(ctypes.addressof(last)).decode() == "compress dtype=1 device=-1 M=16 K=32 stream=0x1234"
    b = torch.randn(4, 32).to(torch.bfloat16)
    bias = torch.zeros(16, dtype=torch.bfloat16)
    d, error = loaded.gemm(values, meta, b, bias, None, 0.5, 2.0)
    assert error == "" and d.shape == (4, 16) and torch.equal(d.flatten(), b.flatten()[: 4 * 16])
    assert ctypes.string_at(ctypes.addressof(last)).decode() == (
        "run device=-1 stream=0x1234 meta0=15 M=16 N=4 K=32 alpha=0.5 beta=2 bias=1 c=0 workspace=1")
    counter = {name: ctypes.c_int.in_dll(loaded.lib, name) for name in ("binds", "runs", "releases")}
    assert (counter["binds"].value, counter["runs"].value) == (1, 1)
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    for _ in range(2):  # same addresses: bound once, then only run
        d, error = loaded.gemm(values, meta, b, bias, None, 0.5, 2.0, out=out)
        assert error == "" and d is out and torch.equal(d.flatten(), b.flatten()[: 4 * 16])
    assert (counter["binds"].value, counter["runs"].value, loaded.bound_count()) == (2, 3, 2)
    _, error = loaded.gemm(values, meta, b, None, None, 0.5, 2.0, out=out)  # another bias: another binding
    assert ctypes.string_at(ctypes.addressof(last)).decode().endswith("bias=0 c=0 workspace=1")
    assert loaded.bound_count() == 3 and counter["binds"].value == 3 and counter["runs"].value == 4
    loaded.release_bound()
    assert loaded.bound_count() == 0 and counter["releases"].value == 3
    _, error = loaded.gemm(torch.zeros(24, 16, dtype=torch.bfloat16), torch.zeros(24, 4, dtype=torch.uint8),
                           b, None, None, 1.0, 0.0)
    assert error == "sm90 sparse gemm: refused M=24" and loaded.bound_count() == 0
    d, error = loaded.gemm(values, meta[:2], b, None, None, 1.0, 0.0)
    assert "meta has shape (2, 4), expected (16, 4)" in error
    _, _, error = loaded.compress(torch.zeros(8, 32, dtype=torch.float16))
    assert error == "sm90 sparse compress: refused M=8"


def test_check_command_exit_status(tmp_path, capsys):
    assert lib.main(["check", "--lib", str(tmp_path / "none.so")]) == 1
    assert "no prebuilt" in capsys.readouterr().out
    library = _fake_library(tmp_path, lib.build_key())
    assert lib.main(["check", "--lib", str(library)]) == 0
    assert capsys.readouterr().out.startswith("ok:")


@pytest.mark.slow
def test_real_library_compiles_for_sm90a_and_loads(tmp_path):
    """The real build with the local nvcc: sm_90a machine code with sparse wgmma (HGMMA.SP), the C
    ABI exported, the key compiled in, and the loader accepting it (no GPU needed to load)."""
    if cutlass_sm90.nvcc_path() is None:
        pytest.skip("nvcc not found")
    try:
        cutlass_sm90.cutlass_include_dirs()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    library = lib.build(tmp_path)
    manifest = json.loads(lib.manifest_path(library).read_text())
    assert manifest["key"] == lib.build_key() and manifest["sha256"] == lib._sha256(library)
    loaded, why = lib.load(library)
    assert why is None, why
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    for symbol in ("slope_sm90_build_key", "slope_sm90_compressed_sizes", "slope_sm90_compress",
                   "slope_sm90_gemm_workspace_size", "slope_sm90_gemm", "slope_sm90_gemm_bind", "slope_sm90_gemm_run",
                   "slope_sm90_gemm_release"):
        assert f" T {symbol}" in exported, symbol
    raw = ctypes.CDLL(str(library))
    raw.slope_sm90_build_key.restype = ctypes.c_ulonglong
    assert f"{raw.slope_sm90_build_key():016x}" == lib.build_key()
    cuobjdump = shutil.which("cuobjdump") or _tritons_cuobjdump()
    if cuobjdump:  # the disassembler: sm_90a machine code with sparse wgmma
        elves = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True).stdout
        assert "sm_90a" in elves, elves
        sass = subprocess.run([cuobjdump, "--dump-sass", str(library)], capture_output=True, text=True).stdout
        assert "HGMMA.SP" in sass


def _tritons_cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(next(iter(triton.__path__))) / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.is_file() else None
