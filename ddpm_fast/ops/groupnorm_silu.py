"""group_norm_silu: GroupNorm with the time embedding folded in, SiLU and a residual add, in one
pass over x, forward and backward:

    h = x + bias_nc[:, :, None, None]           (diffusers' ResnetBlock2D adds temb before norm2)
    n = GroupNorm(h; num_groups, eps) * weight + bias
    n = n * (1 + scale_nc) + shift_nc           (improved-diffusion's scale-shift conditioning)
    y = SiLU(n) + residual

The forward op returns the per-(n, group) mean and rstd (fp32; fp64 for fp64 inputs) beside y;
the backward op (itself a custom op, so a compiled training step keeps both as single nodes)
reads them instead of recomputing the statistics. Its kernels write dx and per-(n, c) sums of
g = dL/dn and g x_hat, from which dweight, dbias (sums over n), dscale and dshift follow here.
"""

from __future__ import annotations

import functools
import numbers

import torch

from .. import reference
from .._backends import choose, load_extension
from ._common import check_float, direct_call_ok, eager_autograd_ok, kernel_views, new_like


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _params(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The per-channel parameters as the kernels take them: contiguous, in the statistics dtype."""
    return [t if t is None or (t.dtype == dtype and t.is_contiguous()) else t.to(dtype).contiguous() for t in tensors]


def _fwd_launcher(backend: str):
    if backend == "triton":
        from ..kernels.triton_groupnorm import group_norm_silu_fwd_triton

        return group_norm_silu_fwd_triton
    load_extension()
    return torch.ops.ddpm_fast_C.group_norm_silu_fwd


@functools.cache
def _cpp_autograd_op():
    """The eager C++ op that records a C++ autograd node, called without the dispatcher (plain
    tensors in eager mode only: eager_autograd_ok)."""
    return load_extension().group_norm_silu_eager


def _bwd_launcher(backend: str):
    if backend == "triton":
        from ..kernels.triton_groupnorm import group_norm_silu_bwd_triton

        return group_norm_silu_bwd_triton
    load_extension()
    return torch.ops.ddpm_fast_C.group_norm_silu_bwd


def _group_norm_silu_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_nc: torch.Tensor | None,
    scale_nc: torch.Tensor | None,
    shift_nc: torch.Tensor | None,
    residual: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stat = _stat_dtype(x)
    y = new_like(x)
    # the kernels write every statistic; an empty x (no positions) leaves zeros
    alloc = x.new_empty if x.numel() else x.new_zeros
    mean = alloc((x.shape[0], num_groups), dtype=stat)
    rstd = torch.empty_like(mean) if x.numel() else torch.zeros_like(mean)
    if x.numel():
        params = _params(stat, weight, bias, bias_nc, scale_nc, shift_nc)
        in_view, out_view = kernel_views(backend)
        res = in_view(residual) if residual is not None else None
        _fwd_launcher(backend)(in_view(x), *params, res, num_groups, eps, silu, out_view(y), mean, rstd)
    return y, mean, rstd


_group_norm_silu_op = torch.library.custom_op("ddpm_fast::group_norm_silu", mutates_args=())(_group_norm_silu_impl)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, bias_nc, scale_nc, shift_nc, residual, num_groups, eps, silu, backend):
    mean = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x))
    return new_like(x), mean, torch.empty_like(mean)


def _backward_impl(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_nc: torch.Tensor | None,
    scale_nc: torch.Tensor | None,
    shift_nc: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, d bias_nc, d scale_nc, d shift_nc), each in its input's dtype; an
    absent input's gradient is an empty tensor."""
    stat = mean.dtype
    n, c = x.shape[:2]
    w, b, bnc, sc, sh = _params(stat, weight, bias, bias_nc, scale_nc, shift_nc)
    grad_x = new_like(x)
    sum_g = x.new_zeros((n, c), dtype=stat)  # sum over positions of g = dL/dn
    sum_gx = torch.zeros_like(sum_g)  # ... of g x_hat
    grad_bnc = torch.zeros_like(sum_g) if bias_nc is not None else None
    if x.numel():
        launch = _bwd_launcher(backend)
        in_view, out_view = kernel_views(backend)
        dy = in_view(grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype))
        launch(
            dy, in_view(x), w, b, bnc, sc, sh, mean, rstd, num_groups, silu, out_view(grad_x), sum_g, sum_gx, grad_bnc
        )
    else:
        grad_x.zero_()
    # n = (x_hat w + b)(1 + scale) + shift: per (n, c), dL/dw = (1 + scale) sum g x_hat, dL/db =
    # (1 + scale) sum g, dL/dscale = w sum g x_hat + b sum g, dL/dshift = sum g.
    s1 = None if sc is None else 1 + sc
    dw_nc = sum_gx if s1 is None else s1 * sum_gx
    db_nc = sum_g if s1 is None else s1 * sum_g
    grad_w = dw_nc.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    grad_b = db_nc.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    if scale_nc is not None:
        u = sum_gx if w is None else w * sum_gx
        grad_sc = (u if b is None else u + b * sum_g).to(scale_nc.dtype)
    else:
        grad_sc = x.new_empty(0)
    grad_sh = sum_g.to(shift_nc.dtype) if shift_nc is not None else x.new_empty(0)
    grad_bnc = grad_bnc.to(bias_nc.dtype) if bias_nc is not None else x.new_empty(0)
    return grad_x, grad_w, grad_b, grad_bnc, grad_sc, grad_sh


_group_norm_silu_backward_op = torch.library.custom_op("ddpm_fast::group_norm_silu_backward", mutates_args=())(
    _backward_impl
)


@_group_norm_silu_backward_op.register_fake
def _(grad_y, x, weight, bias, bias_nc, scale_nc, shift_nc, mean, rstd, num_groups, silu, backend):
    grads = [x.new_empty(0) if t is None else t.new_empty(t.shape) for t in (weight, bias, bias_nc, scale_nc, shift_nc)]
    return new_like(x), *grads


def _setup_context(ctx, inputs, output):
    x, weight, bias, bias_nc, scale_nc, shift_nc, residual, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, bias_nc, scale_nc, shift_nc, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, bias_nc, scale_nc, shift_nc, mean, rstd = ctx.saved_tensors
    # eager backward (no create_graph): the implementation directly, without torch.library's dispatch
    backward = _backward_impl if direct_call_ok(grad_y, *ctx.saved_tensors) else _group_norm_silu_backward_op
    grads = backward(
        grad_y, x, weight, bias, bias_nc, scale_nc, shift_nc, mean, rstd, ctx.num_groups, ctx.silu, ctx.backend
    )
    given = (x, weight, bias, bias_nc, scale_nc, shift_nc)
    grads = [
        g if t is not None and need else None for g, t, need in zip(grads, given, ctx.needs_input_grad[:6], strict=True)
    ]
    grad_res = grad_y if ctx.has_residual and ctx.needs_input_grad[6] else None
    return (*grads, grad_res, None, None, None, None)


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


class _GroupNormSiluFunction(torch.autograd.Function):
    """The custom op's autograd (same setup_context and backward) as a plain autograd.Function, for
    eager calls that need gradients: see _common.eager_autograd_ok."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _group_norm_silu_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        return _backward(ctx, grad_y, grad_mean, grad_rstd)


def _check_tensor(t: object, name: str, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected {x.device} (x's device)")
    if t.shape != shape:  # (torch.Size is a tuple)
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_inputs(x, num_groups, weight, bias, eps, bias_nc, scale_nc, shift_nc, silu, residual) -> None:
    check_float(x, "x")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"x has {c} channels, which num_groups={num_groups} does not divide")
    # (a float first: the check of numbers.Real, an ABC, costs more than the rest of the line)
    if (type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real))) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            _check_tensor(t, name, (c,), x)
    for t, name in ((bias_nc, "bias_nc"), (scale_nc, "scale_nc"), (shift_nc, "shift_nc")):
        if t is not None:
            _check_tensor(t, name, (n, c), x)
    if residual is not None:
        _check_tensor(residual, "residual", tuple(x.shape), x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype}, expected x's {x.dtype}")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    bias_nc: torch.Tensor | None = None,
    scale_nc: torch.Tensor | None = None,
    shift_nc: torch.Tensor | None = None,
    silu: bool = True,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """GroupNorm (+ time-embedding bias before it, + scale/shift after it) (+ SiLU) (+ residual).

    Args:
        x: (N, C, ...) float32/float64/float16/bfloat16: NCHW or channels_last (read in place),
            (N, C, L) or (N, C).
        num_groups: G, dividing C.
        weight, bias: (C,) GroupNorm affine; None = 1 and 0.
        eps: added to the group variance.
        bias_nc: (N, C) added to x before the statistics (the time embedding in diffusers).
        scale_nc, shift_nc: (N, C): n * (1 + scale_nc) + shift_nc after the affine.
        silu: apply SiLU (False: GroupNorm only, as in the attention block).
        residual: shaped like x, same dtype: added last.
        backend: "cpp", "triton" or "reference"; None picks the fastest here.

    Parameters of any float dtype are used in fp32 (fp64 for fp64 x); statistics are fp32
    whatever x's dtype. Differentiable in x, weight, bias, bias_nc, scale_nc, shift_nc, residual.

    Returns:
        y shaped like x, in x's dtype and memory format.
    """
    _check_inputs(x, num_groups, weight, bias, eps, bias_nc, scale_nc, shift_nc, silu, residual)
    tensors = (x, weight, bias, bias_nc, scale_nc, shift_nc, residual)
    name = choose("group_norm_silu", backend, x.device, dtype=x.dtype)
    if name == "reference":
        return reference.group_norm_silu(
            x,
            num_groups,
            weight,
            bias,
            eps,
            bias_nc=bias_nc,
            scale_nc=scale_nc,
            shift_nc=shift_nc,
            silu=silu,
            residual=residual,
        )
    if name == "cpp" and eager_autograd_ok(*tensors):
        # eager C++: the op records a C++ autograd node (csrc/group_norm_silu_autograd.cpp)
        return _cpp_autograd_op()(*tensors, num_groups, float(eps), silu)
    if direct_call_ok(*tensors):  # no autograd: skip dispatch
        op = _group_norm_silu_impl
    elif eager_autograd_ok(*tensors):
        op = _GroupNormSiluFunction.apply
    else:
        op = _group_norm_silu_op
    y, _, _ = op(*tensors, num_groups, float(eps), silu, name)
    return y
