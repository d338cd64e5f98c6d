// slope: a C ABI over the type-erased sm90 2:4 sparse GEMM (sm90_sparse_gemm.h), for a plain shared
// library that Python loads with ctypes (slope/kernels/cutlass_sm90_lib.py) instead of the torch
// extension. The library needs no PyTorch headers, so it is built ahead of time with nvcc alone
// (no GPU needed) and carried to the GPU machine:
//
//   nvcc -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a ...
//        -DSLOPE_SM90_BUILD_KEY=0x<16 hex digits>ULL sm90_sparse_gemm.cu sm90_sparse_gemm_capi.cpp -o libslope_sm90.so
//
// Conventions: dtype 0 = float16, 1 = bfloat16; `device` is the CUDA device index the pointers and
// `stream` belong to (made current in this library's CUDA runtime, which is linked statically and
// so keeps its own current device); every pointer is a device pointer, 16-byte aligned. Each entry
// point returns 0 on success, else writes a one-line message into `err` and returns 1. No C++
// exception crosses the C boundary.
#include <cstdio>
#include <exception>
#include <string>

#include <cuda_runtime_api.h>

#include "sm90_sparse_gemm.h"

#ifndef SLOPE_SM90_BUILD_KEY
#error "define SLOPE_SM90_BUILD_KEY (computed by slope.kernels.cutlass_sm90_lib.build_key)"
#endif

namespace {

int report(const std::string& message, char* err, int err_len) {
  if (message.empty()) return 0;
  if (err != nullptr && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", message.c_str());
  return 1;
}

std::string dtype_of(int code, slope_sm90::DType* dtype) {
  if (code == 0) {
    *dtype = slope_sm90::DType::kFloat16;
  } else if (code == 1) {
    *dtype = slope_sm90::DType::kBFloat16;
  } else {
    return "sm90 sparse: dtype code " + std::to_string(code) + " unknown (0 = float16, 1 = bfloat16)";
  }
  return {};
}

std::string use_device(int device) {
  const cudaError_t status = cudaSetDevice(device);
  if (status == cudaSuccess) return {};
  return "sm90 sparse: cudaSetDevice(" + std::to_string(device) + "): " + cudaGetErrorString(status);
}

// Runs `fn` (returning an error message, empty on success) with every exception caught.
template <class Fn>
int guarded(char* err, int err_len, Fn&& fn) {
  try {
    return report(fn(), err, err_len);
  } catch (const std::exception& exc) {
    return report(std::string("sm90 sparse: C++ exception: ") + exc.what(), err, err_len);
  } catch (...) {
    return report("sm90 sparse: unknown C++ exception", err, err_len);
  }
}

}  // namespace

extern "C" {

/// The build key the library was compiled with (the first 64 bits of the sha256 of its sources and
/// flags), so a loader can tell a library built from other sources.
unsigned long long slope_sm90_build_key(void) { return SLOPE_SM90_BUILD_KEY; }

/// sizes[4] = values rows, values cols (elements), meta rows, meta cols (bytes) of a dense (M, K) A.
int slope_sm90_compressed_sizes(int dtype, int M, int K, long long* sizes, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    slope_sm90::DType type;
    std::string problem = dtype_of(dtype, &type);
    if (!problem.empty()) return problem;
    const slope_sm90::CompressedSizes s = slope_sm90::compressed_sizes(type, M, K);
    sizes[0] = s.values_rows;
    sizes[1] = s.values_cols;
    sizes[2] = s.meta_rows;
    sizes[3] = s.meta_cols;
    return {};
  });
}

/// Compress dense (M, K) (2:4 along K) into values and meta sized by slope_sm90_compressed_sizes.
int slope_sm90_compress(int dtype, int device, const void* dense, int M, int K, void* values, void* meta,
                        void* stream, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    slope_sm90::DType type;
    std::string problem = dtype_of(dtype, &type);
    if (problem.empty()) problem = use_device(device);
    if (!problem.empty()) return problem;
    return slope_sm90::compress(type, dense, M, K, values, meta, static_cast<cudaStream_t>(stream));
  });
}

/// *bytes = the device workspace slope_sm90_gemm needs for this shape.
int slope_sm90_gemm_workspace_size(int dtype, int M, int N, int K, long long* bytes, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    slope_sm90::DType type;
    std::string problem = dtype_of(dtype, &type);
    if (!problem.empty()) return problem;
    *bytes = static_cast<long long>(slope_sm90::gemm_workspace_size(type, M, N, K));
    return {};
  });
}

/// d (N, M) = alpha * b (N, K) @ A^T + beta * c (N, M) + bias (M); bias and c may be null.
int slope_sm90_gemm(int dtype, int device, const void* values, const void* meta, const void* b, const void* bias,
                    const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                    void* stream, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    slope_sm90::DType type;
    std::string problem = dtype_of(dtype, &type);
    if (problem.empty()) problem = use_device(device);
    if (!problem.empty()) return problem;
    return slope_sm90::gemm(type, values, meta, b, bias, c, d, M, N, K, alpha, beta, workspace,
                            static_cast<cudaStream_t>(stream));
  });
}

/// Bind slope_sm90_gemm's arguments once (*handle: an opaque BoundGemm, free it with
/// slope_sm90_gemm_release): its CUTLASS parameters and TMA descriptors are built here, so
/// slope_sm90_gemm_run does nothing on the host but the launch (decode, CUDA-graph capture).
int slope_sm90_gemm_bind(int dtype, int device, const void* values, const void* meta, const void* b,
                         const void* bias, const void* c, void* d, int M, int N, int K, float alpha, float beta,
                         void* workspace, void** handle, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    slope_sm90::DType type;
    std::string problem = dtype_of(dtype, &type);
    if (problem.empty()) problem = use_device(device);
    if (!problem.empty()) return problem;
    slope_sm90::BoundGemm* bound = nullptr;
    problem = slope_sm90::gemm_bind(type, values, meta, b, bias, c, d, M, N, K, alpha, beta, workspace, &bound);
    if (problem.empty()) *handle = bound;
    return problem;
  });
}

/// Launch a bound GEMM on `stream` (a stream of the device it was bound on, made current here).
int slope_sm90_gemm_run(void* handle, int device, void* stream, char* err, int err_len) {
  return guarded(err, err_len, [&]() -> std::string {
    if (handle == nullptr) return "sm90 sparse: gemm_run got a null handle (bind it first)";
    std::string problem = use_device(device);
    if (!problem.empty()) return problem;
    return static_cast<slope_sm90::BoundGemm*>(handle)->run(static_cast<cudaStream_t>(stream));
  });
}

/// Free a handle of slope_sm90_gemm_bind (null is ignored).
void slope_sm90_gemm_release(void* handle) { delete static_cast<slope_sm90::BoundGemm*>(handle); }

}  // extern "C"
