// slope: one tile configuration of the sm90 2:4 sparse GEMM (slope/kernels/csrc/sm90_sparse_gemm_kernels.h)
// for bf16, behind a C API that performance_experiments/sm90_tune.py loads with ctypes. The
// configuration comes from macros, so the driver builds several variants in parallel:
//
//   nvcc -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a -std=c++17 ...
//        -DTUNE_TM=128 -DTUNE_TN=256 -DTUNE_TK=128 -DTUNE_CM=1 -DTUNE_CN=2 -DTUNE_PINGPONG=0
//        -DTUNE_STAGES=0 -DTUNE_STREAMK=0
//
// TUNE_STAGES: mainloop pipeline stages (0 = as many as fit beside the epilogue); TUNE_STREAMK: 1 for
// the stream-K tile scheduler, 0 for the persistent one. Both default to 0, like TUNE_PINGPONG.
//
// Every entry point returns 0 on success, else writes a message into `err` and returns 1.
#include <cstdio>
#include <cstring>

#include "sm90_sparse_gemm_kernels.h"

#if !defined(TUNE_TM) || !defined(TUNE_TN) || !defined(TUNE_TK) || !defined(TUNE_CM) || !defined(TUNE_CN)
#error "define TUNE_TM, TUNE_TN, TUNE_TK (tile) and TUNE_CM, TUNE_CN (cluster)"
#endif
#ifndef TUNE_PINGPONG
#define TUNE_PINGPONG 0
#endif
#ifndef TUNE_STAGES
#define TUNE_STAGES 0
#endif
#ifndef TUNE_STREAMK
#define TUNE_STREAMK 0
#endif

namespace {

struct TuneConfig {
  using TileShape = cute::Shape<cute::Int<TUNE_TM>, cute::Int<TUNE_TN>, cute::Int<TUNE_TK>>;
  using ClusterShape = cute::Shape<cute::Int<TUNE_CM>, cute::Int<TUNE_CN>, cute::_1>;
#if TUNE_PINGPONG
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#else
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#endif
  static constexpr int kStages = TUNE_STAGES;
#if TUNE_STREAMK
  using TileSchedulerTag = cutlass::gemm::StreamKScheduler;
#else
  using TileSchedulerTag = cutlass::gemm::PersistentScheduler;
#endif
};

using Kernel = slope_sm90::Sm90SparseGemm<cutlass::bfloat16_t, TuneConfig>;
using T = cutlass::bfloat16_t;

int report(const std::string& message, char* err, int err_len) {
  if (message.empty()) return 0;
  std::snprintf(err, static_cast<size_t>(err_len), "%s", message.c_str());
  return 1;
}

slope_sm90::SchedulerOptions scheduler_options(int swizzle, int raster) {
  slope_sm90::SchedulerOptions options;
  options.max_swizzle_size = swizzle;
  options.raster = raster;
  return options;
}

}  // namespace

extern "C" {

/// sizes[4] = values rows, values cols (elements), meta rows, meta cols (bytes) of a dense (M, K) A.
void tune_compressed_sizes(int M, int K, long long* sizes) {
  const slope_sm90::CompressedSizes s = Kernel::compressed_sizes(M, K);
  sizes[0] = s.values_rows;
  sizes[1] = s.values_cols;
  sizes[2] = s.meta_rows;
  sizes[3] = s.meta_cols;
}

int tune_compress(const void* dense, int M, int K, void* values, void* meta, void* stream, char* err,
                  int err_len) {
  return report(Kernel::compress(static_cast<const T*>(dense), M, K, static_cast<T*>(values),
                                 static_cast<Kernel::ElementE*>(meta), static_cast<cudaStream_t>(stream)),
                err, err_len);
}

/// Workspace bytes of tune_gemm with the same shape and scheduler options.
size_t tune_workspace_size(int M, int N, int K, int swizzle, int raster) {
  return Kernel::workspace_size(M, N, K, scheduler_options(swizzle, raster));
}

/// d (N, M) = b (N, K) @ A^T for A = (values, meta); swizzle 1/2/4/8, raster 0 heuristic / 1 M / 2 N.
int tune_gemm(const void* values, const void* meta, const void* b, void* d, int M, int N, int K, void* workspace,
              int swizzle, int raster, void* stream, char* err, int err_len) {
  return report(Kernel::gemm(static_cast<const T*>(values), static_cast<const Kernel::ElementE*>(meta),
                             static_cast<const T*>(b), nullptr, nullptr, static_cast<T*>(d), M, N, K, 1.0f, 0.0f,
                             workspace, static_cast<cudaStream_t>(stream), scheduler_options(swizzle, raster)),
                err, err_len);
}

}  // extern "C"
