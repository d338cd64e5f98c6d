// slope: the sm90 2:4 sparse GEMM instantiated for fp16 and bf16 behind a type-erased API
// (sm90_sparse_gemm.h) that the PyTorch binding calls. Built with
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//        -I<cutlass>/include -I<cutlass>/tools/util/include
// With -DSLOPE_SM90_SELFTEST this file also has a main() that checks compress + gemm against a
// host reference on random inputs (needs an sm90 GPU to run; compiles anywhere nvcc does).
#include "sm90_sparse_gemm_kernels.h"

namespace slope_sm90 {
namespace {

template <class Fn>
std::string dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn(Sm90SparseGemm<cutlass::half_t>{});
    case DType::kBFloat16:
      return fn(Sm90SparseGemm<cutlass::bfloat16_t>{});
  }
  return "sm90 sparse: unsupported dtype (use float16 or bfloat16)";
}

}  // namespace

CompressedSizes compressed_sizes(DType dtype, int M, int K) {
  // The metadata layout depends only on the element width, identical for fp16 and bf16.
  (void)dtype;
  return Sm90SparseGemm<cutlass::half_t>::compressed_sizes(M, K);
}

std::string compress(DType dtype, const void* dense, int M, int K, void* values, void* meta,
                     cudaStream_t stream) {
  return dispatch(dtype, [&](auto kernel) {
    using K_ = decltype(kernel);
    using T = typename K_::Element;
    return K_::compress(static_cast<const T*>(dense), M, K, static_cast<T*>(values),
                        static_cast<typename K_::ElementE*>(meta), stream);
  });
}

size_t gemm_workspace_size(DType dtype, int M, int N, int K) {
  size_t size = 0;
  dispatch(dtype, [&](auto kernel) {
    size = decltype(kernel)::workspace_size(M, N, K);
    return std::string();
  });
  return size;
}

std::string gemm(DType dtype, const void* values, const void* meta, const void* b, const void* bias,
                 const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                 cudaStream_t stream) {
  return dispatch(dtype, [&](auto kernel) {
    using K_ = decltype(kernel);
    using T = typename K_::Element;
    return K_::gemm(static_cast<const T*>(values), static_cast<const typename K_::ElementE*>(meta),
                    static_cast<const T*>(b), static_cast<const T*>(bias), static_cast<const T*>(c),
                    static_cast<T*>(d), M, N, K, alpha, beta, workspace, stream);
  });
}

std::string gemm_bind(DType dtype, const void* values, const void* meta, const void* b, const void* bias,
                      const void* c, void* d, int M, int N, int K, float alpha, float beta, void* workspace,
                      BoundGemm** bound) {
  return dispatch(dtype, [&](auto kernel) {
    using K_ = decltype(kernel);
    using T = typename K_::Element;
    return K_::bind(static_cast<const T*>(values), static_cast<const typename K_::ElementE*>(meta),
                    static_cast<const T*>(b), static_cast<const T*>(bias), static_cast<const T*>(c),
                    static_cast<T*>(d), M, N, K, alpha, beta, workspace, bound);
  });
}

}  // namespace slope_sm90

#ifdef SLOPE_SM90_SELFTEST
// ---------------------------------------------------------------------------------------------
// Standalone self-test: random 2:4 A, random B/C/bias, compress + gemm on the GPU, compare with a
// host fp32 reference. Exit status 0 = pass, 1 = mismatch/error, 2 = no sm90 device.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

template <class T>
int run_case(slope_sm90::DType dtype, int M, int N, int K, bool with_bias, bool with_c, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 5);
  static const int kPairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

  std::vector<T> a(size_t(M) * K, T(0.0f)), b(size_t(N) * K), c(size_t(N) * M), bias(M);
  for (int m = 0; m < M; ++m) {
    for (int g = 0; g < K / 4; ++g) {
      const int* pair = kPairs[pick(rng)];
      for (int j = 0; j < 2; ++j) a[size_t(m) * K + 4 * g + pair[j]] = T(uni(rng));
    }
  }
  for (auto& v : b) v = T(uni(rng));
  for (auto& v : c) v = T(uni(rng));
  for (auto& v : bias) v = T(uni(rng));
  const float alpha = 0.75f, beta = with_c ? 0.5f : 0.0f;

  slope_sm90::CompressedSizes cs = slope_sm90::compressed_sizes(dtype, M, K);
  T *d_a, *d_values, *d_b, *d_c, *d_bias, *d_d;
  uint8_t* d_meta;
  cudaMalloc(&d_a, a.size() * sizeof(T));
  cudaMalloc(&d_values, size_t(cs.values_rows * cs.values_cols) * sizeof(T));
  cudaMalloc(&d_meta, size_t(cs.meta_rows * cs.meta_cols));
  cudaMalloc(&d_b, b.size() * sizeof(T));
  cudaMalloc(&d_c, c.size() * sizeof(T));
  cudaMalloc(&d_bias, bias.size() * sizeof(T));
  cudaMalloc(&d_d, size_t(N) * M * sizeof(T));
  cudaMemcpy(d_a, a.data(), a.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(d_b, b.data(), b.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(d_c, c.data(), c.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(d_bias, bias.data(), bias.size() * sizeof(T), cudaMemcpyHostToDevice);

  std::string err = slope_sm90::compress(dtype, d_a, M, K, d_values, d_meta, nullptr);
  size_t ws_size = slope_sm90::gemm_workspace_size(dtype, M, N, K);
  void* ws = nullptr;
  if (ws_size) cudaMalloc(&ws, ws_size);
  if (err.empty()) {
    err = slope_sm90::gemm(dtype, d_values, d_meta, d_b, with_bias ? d_bias : nullptr,
                           with_c ? d_c : nullptr, d_d, M, N, K, alpha, beta, ws, nullptr);
  }
  cudaError_t sync = cudaDeviceSynchronize();
  if (err.empty() && sync != cudaSuccess) err = cudaGetErrorString(sync);
  std::vector<T> d(size_t(N) * M);
  cudaMemcpy(d.data(), d_d, d.size() * sizeof(T), cudaMemcpyDeviceToHost);
  for (void* p : {(void*)d_a, (void*)d_values, (void*)d_meta, (void*)d_b, (void*)d_c, (void*)d_bias,
                  (void*)d_d, ws}) {
    if (p) cudaFree(p);
  }
  if (!err.empty()) {
    std::printf("FAIL M=%d N=%d K=%d: %s\n", M, N, K, err.c_str());
    return 1;
  }

  double max_err = 0.0, max_ref = 0.0;
  for (int n = 0; n < N; ++n) {
    for (int m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int k = 0; k < K; ++k) acc += double(float(a[size_t(m) * K + k])) * double(float(b[size_t(n) * K + k]));
      double ref = alpha * acc + (with_bias ? double(float(bias[m])) : 0.0) +
                   (with_c ? beta * double(float(c[size_t(n) * M + m])) : 0.0);
      max_err = std::fmax(max_err, std::fabs(ref - double(float(d[size_t(n) * M + m]))));
      max_ref = std::fmax(max_ref, std::fabs(ref));
    }
  }
  // output rounding (bf16: 2^-8 relative) plus fp32 accumulation noise
  const double tol = 1e-2 * (max_ref + 1.0);
  const bool ok = max_err <= tol;
  std::printf("%s M=%d N=%d K=%d bias=%d c=%d max_abs_err=%.3g (max |ref| %.3g)\n", ok ? "ok" : "FAIL",
              M, N, K, int(with_bias), int(with_c), max_err, max_ref);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int device = 0;
  cudaDeviceProp props;
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&props, device) != cudaSuccess ||
      props.major != 9 || props.minor != 0) {
    std::printf("no sm90 device: nothing run\n");
    return 2;
  }
  int failures = 0;
  failures += run_case<cutlass::half_t>(slope_sm90::DType::kFloat16, 256, 192, 512, true, true, 1);
  failures += run_case<cutlass::bfloat16_t>(slope_sm90::DType::kBFloat16, 128, 96, 256, false, false, 2);
  failures += run_case<cutlass::bfloat16_t>(slope_sm90::DType::kBFloat16, 200, 77, 784, true, false, 3);
  failures += run_case<cutlass::half_t>(slope_sm90::DType::kFloat16, 64, 8, 160, false, true, 4);
  return failures == 0 ? 0 : 1;
}
#endif  // SLOPE_SM90_SELFTEST
