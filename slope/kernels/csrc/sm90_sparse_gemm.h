// slope: type-erased host API of the sm90 2:4 sparse GEMM (implemented in sm90_sparse_gemm.cu).
// Plain pointers and a stream, no CUTLASS or PyTorch types, so the PyTorch binding (a .cpp file)
// and the CUDA translation unit compile separately. Every call returns an empty string on success
// and otherwise a message naming the problem. See sm90_sparse_gemm_kernels.h for the layouts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

namespace slope_sm90 {

enum class DType { kFloat16, kBFloat16 };

struct CompressedSizes {
  int64_t values_rows;  // elements of the input dtype
  int64_t values_cols;
  int64_t meta_rows;    // bytes
  int64_t meta_cols;
};

/// Sizes of the compressed form of a dense row-major (M, K) operand.
CompressedSizes compressed_sizes(DType dtype, int M, int K);

/// Compress dense (M, K) row-major (2:4 along K, at most two non-zeros per group of 4) into
/// values (values_rows, values_cols) and meta (meta_rows, meta_cols) bytes, on `stream`.
std::string compress(DType dtype, const void* dense, int M, int K, void* values, void* meta,
                     cudaStream_t stream);

/// Bytes of device workspace `gemm` needs for this shape.
size_t gemm_workspace_size(DType dtype, int M, int N, int K);

/// D (N, M) row-major = alpha * B (N, K) . A^T + beta * C (N, M) + bias (M), A given compressed.
/// bias and c may be null. All pointers device pointers, 16-byte aligned.
std::string gemm(DType dtype, const void* values, const void* meta, const void* b, const void* bias,
                 const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                 cudaStream_t stream);

/// A GEMM whose arguments (pointers, shape, alpha/beta, workspace) are bound once: the kernel's
/// parameters, TMA descriptors included, are built by `gemm_bind` and every `run` only launches.
class BoundGemm {
 public:
  virtual ~BoundGemm() = default;
  /// Launch on `stream` (any stream of the bound pointers' device); empty string on success.
  virtual std::string run(cudaStream_t stream) = 0;
};

/// Bind `gemm`'s arguments (same meaning and requirements) into a new BoundGemm (*bound; the
/// caller deletes it). The workspace must stay allocated for the BoundGemm's lifetime.
std::string gemm_bind(DType dtype, const void* values, const void* meta, const void* b, const void* bias,
                      const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                      BoundGemm** bound);

}  // namespace slope_sm90
