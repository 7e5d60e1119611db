// Turning torch tensors into the plain kernel arguments of kernel_args.h (host side only).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernel_args.h"

namespace ddpm_fast {

inline View3 view3(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, "ddpm_fast: kernels take (N, C, S) views, got ", t.dim(), " dims");
  return View3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline View3 view3(const std::optional<at::Tensor>& t) { return t.has_value() ? view3(*t) : View3{}; }

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "ddpm_fast: ", name, " is on ", t.device(), ", expected ", ref.device());
}

inline void check_index_tensor(const at::Tensor& ref, const at::Tensor& t, const char* name, int64_t n) {
  check_same_device(ref, t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "ddpm_fast: ", name, " must be a contiguous int64 tensor of shape (", n, ")");
}

inline void check_table(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  check_same_device(ref, t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous(),
              "ddpm_fast: ", name, " must be a contiguous float32 table");
}

inline bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

}  // namespace ddpm_fast

namespace ddpm_fast {

// Calls fn(T{}) with T the C++ type of a floating-point dtype (CPU kernels).
template <typename Fn>
void dispatch_float(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "ddpm_fast: unsupported dtype ", st);
  }
}

// The kernel-side dtype code of a tensor (CUDA kernels switch on it without torch headers).
inline DType dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "ddpm_fast: unsupported dtype ", st);
  }
}

}  // namespace ddpm_fast
