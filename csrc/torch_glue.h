// Turning torch tensors into the plain kernel arguments of kernel_args.h (host side only).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

#include "kernel_args.h"

namespace ddpm_fast::detail {

// Error messages built without iostreams: on a GPU machine's torch 2.11 (installed in its own
// environment) a TORCH_CHECK whose message had non-string arguments segfaulted instead of
// raising, while messages of literals raised. Those arguments go through c10::str's
// std::ostringstream; these appends use only std::string and std::to_string.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace ddpm_fast::detail

// TORCH_CHECK with the message built by detail::message and handed to torch as a C string.
#define DDPM_CHECK(cond, ...)                                                            \
  do {                                                                                   \
    if (C10_UNLIKELY(!(cond))) {                                                         \
      const std::string ddpm_check_message_ = ::ddpm_fast::detail::message(__VA_ARGS__); \
      TORCH_CHECK(false, ddpm_check_message_.c_str());                                   \
    }                                                                                    \
  } while (0)

namespace ddpm_fast {

// A tensor of shape (N, C, ...) seen as (N, C, S): the dims after the second must merge into
// one strided dim, as they do for NCHW, channels_last and any 3-D view. Taking the tensors
// as they are spares the Python wrappers a view per tensor (~3 us each on a small call).
inline View3 view3(const at::Tensor& t) {
  DDPM_CHECK(t.dim() >= 2, "ddpm_fast: kernels take (N, C, ...) tensors, got ", t.dim(), " dims");
  int64_t inner_stride = 1, extent = 1;
  bool found = false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;  // a size-1 dim's stride is arbitrary
    if (!found) {
      inner_stride = t.stride(d), extent = t.size(d), found = true;
      continue;
    }
    DDPM_CHECK(t.stride(d) == inner_stride * extent,
               "ddpm_fast: the dims after the second do not merge into one; pass a (N, C, S) view");
    extent *= t.size(d);
  }
  return View3{t.data_ptr(), t.stride(0), t.stride(1), inner_stride};
}

// S of view3: the product of the dims after the second (1 for an (N, C) tensor).
inline int64_t spatial_numel(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// Whether a and b have the same (N, C, S) (either may be a 3-D view of the other's shape).
inline bool same_ncs(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() >= 2 && b.dim() >= 2 && a.size(0) == b.size(0) && a.size(1) == b.size(1) &&
         spatial_numel(a) == spatial_numel(b);
}

inline View3 view3(const std::optional<at::Tensor>& t) { return t.has_value() ? view3(*t) : View3{}; }

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  DDPM_CHECK(t.device() == ref.device(), "ddpm_fast: ", name, " is on ", t.device(), ", expected ", ref.device());
}

inline void check_index_tensor(const at::Tensor& ref, const at::Tensor& t, const char* name, int64_t n) {
  check_same_device(ref, t, name);
  DDPM_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
             "ddpm_fast: ", name, " must be a contiguous int64 tensor of shape (", n, ")");
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
    default: DDPM_CHECK(false, "ddpm_fast: unsupported dtype ", st);
  }
}

// The kernel-side dtype code of a tensor (CUDA kernels switch on it without torch headers).
inline DType dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: DDPM_CHECK(false, "ddpm_fast: unsupported dtype ", st);
  }
}

}  // namespace ddpm_fast
