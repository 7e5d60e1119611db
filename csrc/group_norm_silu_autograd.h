// Eager group_norm_silu with a C++ autograd node (group_norm_silu_autograd.cpp), exposed to Python
// as ddpm_fast._C.group_norm_silu_eager (module.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace ddpm_fast {

at::Tensor group_norm_silu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_nc,
                                    const std::optional<at::Tensor>& scale_nc,
                                    const std::optional<at::Tensor>& shift_nc,
                                    const std::optional<at::Tensor>& residual, int64_t groups, double eps, bool silu);

}  // namespace ddpm_fast
