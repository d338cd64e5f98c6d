// slope: 2:4 structured-sparse GEMM for Hopper (sm_90a) built from CUTLASS 3.x collectives.
//
//   D (M x N) = alpha * A_sparse (M x K) . B (K x N) + beta * C (M x N) + bias (M), fp32 accumulate.
//
// Memory layouts (all dense tensors contiguous, element type T = half or bfloat16):
//   A  the 2:4 operand, stored compressed by `Sm90SparseGemm<T>::compress` from a dense row-major
//      (M, K) tensor (2:4 along K): values (M, round_up(K,16)/2) row-major + metadata bytes
//      (round_up(M,64) rows, K padded to 128), both in CUTLASS 3.x's own sm90 layout.
//   B  (K x N) stored K-contiguous, i.e. a row-major (N, K) tensor (activations x (tokens, in)).
//   C, D  (M x N) stored M-contiguous, i.e. row-major (N, M) tensors (outputs y (tokens, out)).
//   bias  (M,) per-row of D (per output feature).
// So with A = W (out, in) and B = x (tokens, in), D is y = x W^T + bias as a (tokens, out) tensor,
// without any transpose copy.
//
// Requirements (checked by `check_gemm_shape`): K % 16 == 0 and M % 8 == 0 (TMA 16-byte strides);
// pointers 16-byte aligned. The kernel is a warp-specialized cooperative persistent kernel
// (TMA loads, sparse WGMMA, TMA epilogue with a fused per-row bias and beta*C source).
//
// This header does not depend on PyTorch, so it compiles in a standalone nvcc translation unit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "sm90_sparse_gemm.h"

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

#if !defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#error "slope sm90 sparse GEMM needs CUDA >= 12.2 (CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)"
#endif

namespace slope_sm90 {

/// Empty when the GEMM shape is supported, else a message naming the problem.
inline std::string check_gemm_shape(int M, int N, int K) {
  if (M <= 0 || N <= 0 || K <= 0) {
    return "sm90 sparse gemm: M, N, K must be positive (got M=" + std::to_string(M) +
           ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + ")";
  }
  if (K % 16 != 0) {
    return "sm90 sparse gemm: K=" + std::to_string(K) +
           " must be a multiple of 16 (pad the reduction dimension with zeros)";
  }
  if (M % 8 != 0) {
    return "sm90 sparse gemm: M=" + std::to_string(M) +
           " must be a multiple of 8 (pad the sparse operand's rows with zeros)";
  }
  return {};
}

inline std::string status_message(const char* what, cutlass::Status status) {
  return std::string("sm90 sparse ") + what + ": CUTLASS " + cutlass::cutlassGetStatusString(status);
}

inline std::string launch_message(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return std::string("sm90 sparse ") + what + ": CUDA " + cudaGetErrorString(err);
}

inline int sm_count_of_current_device() {
  int device = 0;
  int count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return count;
}

/// The default tile configuration: 128x256 output tile (M = sparse rows x N = tokens), 64 logical
/// (32 stored) K per stage, so the carveout leaves room for more pipeline stages; no cluster
/// (1x1: no multicast); cooperative warp-specialized persistent schedule with as many pipeline
/// stages as fit beside the epilogue.
/// `performance_experiments/sm90_tune.py` builds other configurations of the same kernel and times
/// them against cuBLAS. The 128x256x64 tile won the first sweep (15 configurations in two sweeps on
/// an H100) with cluster 1x2, which `performance_experiments/gemm.py` measured at 1.38-1.47x of
/// cuBLAS on the bf16 Llama 7B-70B FFN-up shapes (the earlier 128x128x128 default: 0.88-0.92x).
/// Cluster 1x1 replaced 1x2 on the second sweep's sparse times (2-10 % faster on 9 of the 10 shapes,
/// level within 0.1 % on Llama-2-13B FFN up); the GPU tests and gemm.py have not yet run with it
/// (performance_experiments/README.md).
///
/// A configuration also names its pipeline stage count `kStages` (0 = as many as fit beside the
/// epilogue's shared memory, else exactly that many) and its tile scheduler `TileSchedulerTag`
/// (cutlass::gemm::PersistentScheduler, or cutlass::gemm::StreamKScheduler to split the K loop of
/// some output tiles across CTAs, with a reduction through the workspace).
struct DefaultConfig {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr int kStages = 0;
  using TileSchedulerTag = cutlass::gemm::PersistentScheduler;
};

/// Run-time options of the tile scheduler, persistent or stream-K (no recompilation needed).
/// The defaults are the first sweep's most frequent best options for its (1x2 cluster) default.
struct SchedulerOptions {
  int max_swizzle_size = 2;  // 1, 2, 4 or 8: CTAs grouped along the raster's minor direction
  int raster = 1;            // 0 = CUTLASS heuristic, 1 = along M, 2 = along N
};

/// The kernel family for one element type T (cutlass::half_t or cutlass::bfloat16_t) and one tile
/// configuration (see DefaultConfig).
template <class T, class Config = DefaultConfig>
struct Sm90SparseGemm {
  using Element = T;
  using ElementAccumulator = float;
  using ElementCompute = float;

  using LayoutTagA = cutlass::layout::RowMajor;     // A (M, K), K contiguous
  using LayoutTagB = cutlass::layout::ColumnMajor;  // B (K, N), K contiguous
  using LayoutTagC = cutlass::layout::ColumnMajor;  // C, D (M, N), M contiguous
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<T>::value;  // 16-byte accesses

  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  using KernelSchedule = typename Config::KernelSchedule;
  using EpilogueSchedule = typename Config::EpilogueSchedule;
  using TileSchedulerTag = typename Config::TileSchedulerTag;

  // D = alpha * acc + beta * C + bias[m]
  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBias<
      T, ElementCompute, T /*bias*/, T /*C*/, ElementCompute /*alpha, beta*/>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto,
      ElementAccumulator, ElementCompute,
      T, LayoutTagC, kAlignment,
      T, LayoutTagC, kAlignment,
      EpilogueSchedule, FusionOp>::CollectiveOp;

  // Mainloop pipeline stages: Config::kStages, or (0) as many as fit beside the epilogue.
  using StageCount = cute::conditional_t<
      Config::kStages == 0,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::collective::StageCount<Config::kStages>>;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      T, LayoutTagA, kAlignment,
      T, LayoutTagB, kAlignment,
      ElementAccumulator,
      TileShape, ClusterShape,
      StageCount,
      KernelSchedule>::CollectiveOp;

  using ProblemShape = cute::Shape<int, int, int, int>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue,
                                                          TileSchedulerTag>;
  // CUTLASS itself does not check this: a kernel over the limit only fails at launch.
  static_assert(GemmKernel::SharedStorageSize <= cutlass::gemm::collective::detail::sm90_smem_capacity_bytes,
                "pipeline stages and epilogue need more than the 227 KiB of shared memory per block");
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;
  using StrideDenseA = cutlass::gemm::TagToStrideA_t<LayoutTagA>;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;

  using CompressorUtility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
      ProblemShape, T, LayoutTagA, SparseConfig>;
  using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, T, LayoutTagA, SparseConfig, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;

  static ProblemShape problem(int M, int N, int K) { return ProblemShape{M, N, K, 1}; }

  /// Shapes of the compressed values (elements of T) and metadata (bytes) of a dense (M, K) A.
  static CompressedSizes compressed_sizes(int M, int K) {
    StrideDenseA stride_a = cutlass::make_cute_packed_stride(StrideDenseA{}, cute::make_shape(M, K, 1));
    CompressorUtility util(problem(M, 1, K), stride_a);
    int64_t meta_rows = util.get_metadata_m_physical();
    int64_t meta_bytes = static_cast<int64_t>(util.get_tensor_E_bytes());
    return CompressedSizes{util.get_tensorA_m_physical(), util.get_tensorA_k_physical(),
                           meta_rows, meta_rows > 0 ? meta_bytes / meta_rows : 0};
  }

  /// Compress a dense row-major (M, K) 2:4 tensor (at most 2 non-zeros per aligned group of 4
  /// along K: the caller guarantees it) into `values` and `meta` sized by compressed_sizes.
  /// The compressor keeps the non-zero entries; zeros inside a group are harmless.
  static std::string compress(const T* dense, int M, int K, T* values, ElementE* meta, cudaStream_t stream) {
    if (M <= 0 || K <= 0 || K % 4 != 0) {
      return "sm90 sparse compress: need M > 0 and K a positive multiple of 4 (got M=" +
             std::to_string(M) + ", K=" + std::to_string(K) + ")";
    }
    StrideDenseA stride_a = cutlass::make_cute_packed_stride(StrideDenseA{}, cute::make_shape(M, K, 1));
    cutlass::KernelHardwareInfo hw_info;
    hw_info.sm_count = sm_count_of_current_device();
    typename Compressor::Arguments args{problem(M, 1, K), {dense, stride_a, values, meta}, {hw_info}};
    Compressor op;
    cutlass::Status status = op.can_implement(args);
    if (status != cutlass::Status::kSuccess) return status_message("compress (can_implement)", status);
    // The SM90 compressor's workspace is only a host-compatibility size; it is never written.
    status = op.initialize(args, nullptr, stream);
    if (status != cutlass::Status::kSuccess) return status_message("compress (initialize)", status);
    status = op.run(stream);
    if (status != cutlass::Status::kSuccess) return status_message("compress (run)", status);
    return launch_message("compress");
  }

  static typename Gemm::Arguments arguments(const T* values, const ElementE* meta, const T* b,
                                            const T* bias, const T* c, T* d, int M, int N, int K,
                                            float alpha, float beta, SchedulerOptions options = {}) {
    ProblemShape shape = problem(M, N, K);
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideC stride_c = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(M, N, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    cutlass::KernelHardwareInfo hw_info;
    hw_info.sm_count = sm_count_of_current_device();
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        shape,
        {values, SparseConfig::fill_layoutA(shape), b, stride_b, meta, SparseConfig::fill_layoutE(shape)},
        {{}, c != nullptr ? c : d, stride_c, d, stride_d},
        hw_info};
    args.epilogue.thread.alpha = alpha;
    // Without C the epilogue never reads the source (beta == 0 disables the C load); D stands in
    // for its pointer so that the source TMA descriptor is well formed.
    args.epilogue.thread.beta = c != nullptr ? beta : 0.0f;
    args.epilogue.thread.bias_ptr = bias;
    using Raster = typename GemmKernel::TileScheduler::RasterOrderOptions;
    args.scheduler.max_swizzle_size = options.max_swizzle_size;
    args.scheduler.raster_order = options.raster == 1   ? Raster::AlongM
                                  : options.raster == 2 ? Raster::AlongN
                                                        : Raster::Heuristic;
    return args;
  }

  /// Bytes of workspace that gemm needs with these scheduler options (stream-K's reduction
  /// workspace depends on them; the persistent scheduler needs none).
  static size_t workspace_size(int M, int N, int K, SchedulerOptions options = {}) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                              M, N, K, 1.0f, 0.0f, options));
  }

  /// D = alpha * A(values, meta) . B + beta * C + bias. `bias` and `c` may be null.
  /// `workspace` holds workspace_size(M, N, K, options) bytes (may be null when that is 0).
  static std::string gemm(const T* values, const ElementE* meta, const T* b, const T* bias, const T* c,
                          T* d, int M, int N, int K, float alpha, float beta, void* workspace,
                          cudaStream_t stream, SchedulerOptions options = {}) {
    std::string shape_error = check_gemm_shape(M, N, K);
    if (!shape_error.empty()) return shape_error;
    typename Gemm::Arguments args = arguments(values, meta, b, bias, c, d, M, N, K, alpha, beta, options);
    Gemm op;
    cutlass::Status status = op.can_implement(args);
    if (status != cutlass::Status::kSuccess) return status_message("gemm (can_implement)", status);
    status = op.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return status_message("gemm (initialize)", status);
    status = op.run(stream);
    if (status != cutlass::Status::kSuccess) return status_message("gemm (run)", status);
    return launch_message("gemm");
  }

  /// The GEMM with its parameters built once (`bind`): `run` is a kernel launch and nothing else.
  struct Bound : BoundGemm {
    Gemm op;
    std::string run(cudaStream_t stream) override {
      cutlass::Status status = op.run(stream);
      if (status != cutlass::Status::kSuccess) return status_message("bound gemm (run)", status);
      return launch_message("bound gemm");
    }
  };

  /// Check and bind gemm's arguments (see gemm) into a new Bound (*bound, owned by the caller).
  static std::string bind(const T* values, const ElementE* meta, const T* b, const T* bias, const T* c, T* d,
                          int M, int N, int K, float alpha, float beta, void* workspace, BoundGemm** bound,
                          SchedulerOptions options = {}) {
    std::string shape_error = check_gemm_shape(M, N, K);
    if (!shape_error.empty()) return shape_error;
    typename Gemm::Arguments args = arguments(values, meta, b, bias, c, d, M, N, K, alpha, beta, options);
    Bound* made = new Bound();
    cutlass::Status status = made->op.can_implement(args);
    if (status == cutlass::Status::kSuccess) status = made->op.initialize(args, workspace, nullptr);
    if (status != cutlass::Status::kSuccess) {
      delete made;
      return status_message("gemm bind (can_implement/initialize)", status);
    }
    *bound = made;
    return launch_message("gemm bind");
  }
};

}  // namespace slope_sm90
