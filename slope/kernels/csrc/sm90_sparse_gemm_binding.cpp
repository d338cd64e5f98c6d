// slope: PyTorch binding of the sm90 2:4 sparse GEMM (built by slope.kernels.cutlass_sm90).
//
//   compress(dense (M, K) fp16/bf16 CUDA) -> (values (M, K/2), meta uint8 (ME, KE), error)
//   gemm(values, meta, b (N, K), bias (M,)?, c (N, M)?, alpha, beta) -> (d (N, M), error)
//       d = alpha * b @ A^T + beta * c + bias, A the dense (M, K) operand given compressed.
//
// Errors come back as a message (empty = success) that the Python wrapper raises, instead of a
// C++ exception: a C++ exception thrown from this module was seen to crash the process on the
// GPU machine (its extension toolchain's unwinder), so nothing here throws on bad input.
// values/meta use CUTLASS 3.x's sm90 layout (see sm90_sparse_gemm_kernels.h), not PyTorch's sm80 one.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sm90_sparse_gemm.h"

namespace {

// Return `message...` from the enclosing function (as its error) unless `cond` holds.
#define SLOPE_REQUIRE(cond, ...)              \
  do {                                        \
    if (!(cond)) return fail(c10::str(__VA_ARGS__)); \
  } while (0)

bool dtype_of(const torch::Tensor& t, slope_sm90::DType* dtype) {
  if (t.scalar_type() == torch::kFloat16) {
    *dtype = slope_sm90::DType::kFloat16;
    return true;
  }
  if (t.scalar_type() == torch::kBFloat16) {
    *dtype = slope_sm90::DType::kBFloat16;
    return true;
  }
  return false;
}

// Empty when `t` is a contiguous, 16-byte aligned CUDA tensor on `device`.
std::string layout_error(const torch::Tensor& t, const char* name, const torch::Device& device) {
  if (!t.is_cuda()) return c10::str("cutlass-sm90: ", name, " must be a CUDA tensor, got ", t.device());
  if (t.device() != device) {
    return c10::str("cutlass-sm90: ", name, " is on ", t.device(), " but the operand is on ", device);
  }
  if (!t.is_contiguous()) return c10::str("cutlass-sm90: ", name, " must be contiguous (call .contiguous())");
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) {
    return c10::str("cutlass-sm90: ", name, " must be 16-byte aligned (call .clone() on a sliced tensor)");
  }
  return {};
}

using CompressResult = std::tuple<torch::Tensor, torch::Tensor, std::string>;

CompressResult compress(const torch::Tensor& dense) {
  // Failures return empty (defined) tensors: nothing here relies on converting undefined ones.
  auto fail = [](std::string message) {
    return CompressResult{torch::empty({0}), torch::empty({0}, torch::kUInt8), message};
  };
  SLOPE_REQUIRE(dense.dim() == 2, "cutlass-sm90 compress: dense must be 2-D (rows, cols), got shape ", dense.sizes());
  slope_sm90::DType dtype;
  SLOPE_REQUIRE(dtype_of(dense, &dtype), "cutlass-sm90 compress: dense must be float16 or bfloat16, got ",
                dense.scalar_type());
  const std::string bad_layout = layout_error(dense, "dense", dense.device());
  SLOPE_REQUIRE(bad_layout.empty(), bad_layout);
  const int64_t M = dense.size(0), K = dense.size(1);
  SLOPE_REQUIRE(M > 0 && K > 0 && K % 16 == 0 && M < INT32_MAX && K < INT32_MAX,
                "cutlass-sm90 compress: cols must be a positive multiple of 16, got shape ", dense.sizes(),
                " (pad the columns with zeros)");
  const c10::cuda::CUDAGuard guard(dense.device());
  const auto sizes = slope_sm90::compressed_sizes(dtype, static_cast<int>(M), static_cast<int>(K));
  auto values = torch::empty({sizes.values_rows, sizes.values_cols}, dense.options());
  auto meta = torch::empty({sizes.meta_rows, sizes.meta_cols}, dense.options().dtype(torch::kUInt8));
  const std::string err = slope_sm90::compress(dtype, dense.data_ptr(), static_cast<int>(M), static_cast<int>(K),
                                               values.data_ptr(), meta.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream(dense.device().index()).stream());
  SLOPE_REQUIRE(err.empty(), "cutlass-sm90 compress failed: ", err);
  return {values, meta, std::string()};
}

using GemmResult = std::tuple<torch::Tensor, std::string>;

GemmResult gemm(const torch::Tensor& values, const torch::Tensor& meta, const torch::Tensor& b,
                const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& c, double alpha,
                double beta) {
  auto fail = [](std::string message) { return GemmResult{torch::empty({0}), message}; };
  SLOPE_REQUIRE(values.dim() == 2 && b.dim() == 2, "cutlass-sm90 gemm: values and b must be 2-D, got ",
                values.sizes(), " and ", b.sizes());
  slope_sm90::DType dtype;
  SLOPE_REQUIRE(dtype_of(values, &dtype), "cutlass-sm90 gemm: values must be float16 or bfloat16, got ",
                values.scalar_type());
  const torch::Device device = values.device();
  using Named = std::pair<const torch::Tensor&, const char*>;
  for (const auto& [t, name] : {Named{values, "values"}, Named{meta, "meta"}, Named{b, "b"}}) {
    const std::string bad_layout = layout_error(t, name, device);
    SLOPE_REQUIRE(bad_layout.empty(), bad_layout);
  }
  SLOPE_REQUIRE(b.scalar_type() == values.scalar_type(), "cutlass-sm90 gemm: b is ", b.scalar_type(),
                " but the sparse operand is ", values.scalar_type(), " (cast one of them)");
  SLOPE_REQUIRE(meta.scalar_type() == torch::kUInt8, "cutlass-sm90 gemm: meta must be uint8 (from compress)");
  const int64_t M = values.size(0), K = values.size(1) * 2, N = b.size(0);
  SLOPE_REQUIRE(b.size(1) == K, "cutlass-sm90 gemm: b has ", b.size(1), " columns but the sparse operand has ", K,
                " (its values have ", values.size(1), " = K/2)");
  SLOPE_REQUIRE(M > 0 && N > 0 && K > 0 && N < INT32_MAX && M < INT32_MAX && K < INT32_MAX,
                "cutlass-sm90 gemm: bad sizes M=", M, " N=", N, " K=", K);
  const auto sizes = slope_sm90::compressed_sizes(dtype, static_cast<int>(M), static_cast<int>(K));
  SLOPE_REQUIRE(meta.size(0) == sizes.meta_rows && meta.numel() == sizes.meta_rows * sizes.meta_cols,
                "cutlass-sm90 gemm: meta has shape ", meta.sizes(), ", expected (", sizes.meta_rows, ", ",
                sizes.meta_cols, ") for a (", M, ", ", K, ") operand: pass the meta from the same compress()");
  const void* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const std::string bad_layout = layout_error(*bias, "bias", device);
    SLOPE_REQUIRE(bad_layout.empty(), bad_layout);
    SLOPE_REQUIRE(bias->scalar_type() == values.scalar_type() && bias->numel() == M, "cutlass-sm90 gemm: bias must be ",
                  values.scalar_type(), " of ", M, " elements, got ", bias->scalar_type(), " of shape ", bias->sizes());
    bias_ptr = bias->data_ptr();
  }
  const void* c_ptr = nullptr;
  if (c.has_value() && c->defined()) {
    const std::string bad_layout = layout_error(*c, "c", device);
    SLOPE_REQUIRE(bad_layout.empty(), bad_layout);
    SLOPE_REQUIRE(c->scalar_type() == values.scalar_type() && c->dim() == 2 && c->size(0) == N && c->size(1) == M,
                  "cutlass-sm90 gemm: c must be ", values.scalar_type(), " of shape (", N, ", ", M, "), got ",
                  c->scalar_type(), " of shape ", c->sizes());
    c_ptr = c->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(device);
  auto d = torch::empty({N, M}, b.options());
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const size_t ws_bytes = slope_sm90::gemm_workspace_size(dtype, m, n, k);
  torch::Tensor workspace;
  if (ws_bytes > 0) workspace = torch::empty({static_cast<int64_t>(ws_bytes)}, b.options().dtype(torch::kUInt8));
  const std::string err = slope_sm90::gemm(dtype, values.data_ptr(), meta.data_ptr(), b.data_ptr(), bias_ptr, c_ptr,
                                           d.data_ptr(), m, n, k, static_cast<float>(alpha), static_cast<float>(beta),
                                           ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                                           c10::cuda::getCurrentCUDAStream(device.index()).stream());
  SLOPE_REQUIRE(err.empty(), "cutlass-sm90 gemm failed: ", err);
  return {d, std::string()};
}

#undef SLOPE_REQUIRE

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slope: CUTLASS 3.x 2:4 sparse GEMM for Hopper (sm_90a); every op returns its error last";
  m.def("compress", &compress, "(values, meta, error) of a 2:4 (M, K) fp16/bf16 CUDA tensor", pybind11::arg("dense"));
  m.def("gemm", &gemm, "(d (N, M) = alpha * b (N, K) @ A^T + beta * c + bias, error) for A = (values, meta)",
        pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("b"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("c") = pybind11::none(), pybind11::arg("alpha") = 1.0, pybind11::arg("beta") = 0.0);
}
