"""vlb_terms: the per-sample terms of the variational bound in one pass over the image, forward and
backward: where t > 0 the mean over the elements of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
where t == 0 the discretized Gaussian decoder's -log p(x_0 | x_1), in bits per dimension (the
formulas and the float64 reference: ``ddpm_fast.vlb``). The hybrid loss's L_vlb (Nichol & Dhariwal
2021) is their mean; ``mean_grad=False`` is its stop-gradient on the mean.

Kernels: C++ on the CPU and CUDA C++ (both: KL in fp32 with float64 sums, the decoder in float64;
the CUDA forward sums each sample in a fixed order, no atomics), Triton (fp32).
The coefficients per timestep come from one (T, 8) table formed in float64 (``vlb_table``), so the
log-variance gaps reach the kernels without cancellation.
"""

from __future__ import annotations

import math

import torch

from .. import vlb
from .._backends import choose, load_extension
from ..schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule, normalize_choice
from ._common import check_float, direct_call_ok, kernel_views, timesteps_arg, value_checks_enabled

# Kernel codes (csrc/vlb_terms_math.h, kernels/triton_vlb_terms.py).
VAR_CODES = {"fixed_small": 0, "fixed_small_log": 0, "fixed_large": 0, "learned_range": 1, "learned": 2}


def vlb_table(schedule: Schedule, prediction_type: str, variance_type: str) -> torch.Tensor:
    """(T, 8) float64 on the schedule's device: c1, c2 (posterior mean coefficients), lvq (log beta~_t,
    clipped), lvp (the fixed model log-variance; lvq for learned_range), D (log beta_t - lvq), a, b
    (x0 = a x_t + b out for the prediction type), dfix (lvp - lvq)."""
    key = ("vlb_table", prediction_type, variance_type)
    cache = schedule._cache  # the schedule's own cache of derived tables (fresh per Schedule)
    if key not in cache:
        lvq = schedule.posterior_log_variance_clipped
        if variance_type in ("learned", "learned_range"):
            lvp = lvq if variance_type == "learned_range" else torch.zeros_like(lvq)
            dfix = torch.zeros_like(lvq)
        else:
            lvp = vlb.model_log_variance_table(schedule, variance_type)
            dfix = lvp - lvq
        if prediction_type == "epsilon":
            a, b = schedule.sqrt_recip_alphas_cumprod, -schedule.sqrt_recipm1_alphas_cumprod
        elif prediction_type == "sample":
            a, b = torch.zeros_like(lvq), torch.ones_like(lvq)
        else:
            a, b = schedule.sqrt_alphas_cumprod, -schedule.sqrt_one_minus_alphas_cumprod
        span = torch.log(schedule.betas) - lvq
        cols = (schedule.posterior_mean_coef1, schedule.posterior_mean_coef2, lvq, lvp, span, a, b, dfix)
        cache[key] = torch.stack(cols, dim=1).contiguous()
    return cache[key]


def _kernel_table(schedule: Schedule, prediction_type: str, variance_type: str, dtype, device) -> torch.Tensor:
    key = ("vlb_table", prediction_type, variance_type, dtype, torch.device(device))
    cache = schedule._cache
    if key not in cache:
        cache[key] = vlb_table(schedule, prediction_type, variance_type).to(device=device, dtype=dtype).contiguous()
    return cache[key]


def _terms_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _vlb_impl(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    table: torch.Tensor,
    var: int,
    clip: bool,
    mean_grad: bool,
    backend: str,
) -> torch.Tensor:
    n, c = x0.shape[:2]
    m = x0.numel() // max(n, 1)
    if x0.numel() == 0:
        return x0.new_zeros(n, dtype=_terms_dtype(x0))
    in_view, _ = kernel_views(backend)
    mo, x0v, xtv = in_view(model_output), in_view(x0), in_view(x_t)
    if backend == "triton":
        from ..kernels.triton_vlb_terms import vlb_terms_fwd_triton

        partial = vlb_terms_fwd_triton(mo, x0v, xtv, t, table, var, clip)
        return (partial.double().sum(1) / (m * math.log(2.0))).to(_terms_dtype(x0))
    load_extension()
    terms = x0.new_empty(n, dtype=_terms_dtype(x0))
    torch.ops.ddpm_fast_C.vlb_terms_fwd(mo, x0v, xtv, t, table, var, clip, terms)
    return terms


_vlb_op = torch.library.custom_op("ddpm_fast::vlb_terms", mutates_args=())(_vlb_impl)


@_vlb_op.register_fake
def _(model_output, x0, x_t, t, table, var, clip, mean_grad, backend):
    return x0.new_empty(x0.shape[0], dtype=_terms_dtype(x0))


def _backward_impl(
    grad_terms: torch.Tensor,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    table: torch.Tensor,
    var: int,
    clip: bool,
    mean_grad: bool,
    backend: str,
) -> torch.Tensor:
    grad = torch.empty(model_output.shape, dtype=model_output.dtype, device=model_output.device)
    if x0.numel() == 0:
        return grad.zero_()
    in_view, _ = kernel_views(backend)
    if backend == "triton":
        from ..kernels.triton_vlb_terms import vlb_terms_bwd_triton

        n = x0.shape[0]
        scale = (grad_terms.double() / (x0.numel() // n * math.log(2.0))).float().contiguous()
        vlb_terms_bwd_triton(
            scale, in_view(model_output), in_view(x0), in_view(x_t), t, table, var, clip, mean_grad, in_view(grad)
        )
        return grad
    load_extension()
    mo = in_view(model_output)  # (N, 2C, S) where its trailing dims do not merge; grad then viewed alike
    torch.ops.ddpm_fast_C.vlb_terms_bwd(
        grad_terms.contiguous(), mo, in_view(x0), in_view(x_t), t, table, var, clip, mean_grad, grad.view(mo.shape)
    )
    return grad


_vlb_backward_op = torch.library.custom_op("ddpm_fast::vlb_terms_backward", mutates_args=())(_backward_impl)


@_vlb_backward_op.register_fake
def _(grad_terms, model_output, x0, x_t, t, table, var, clip, mean_grad, backend):
    return torch.empty_like(model_output, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    model_output, x0, x_t, t, table, var, clip, mean_grad, backend = inputs
    ctx.save_for_backward(model_output, x0, x_t, t, table)
    ctx.var, ctx.clip, ctx.mean_grad, ctx.backend = var, clip, mean_grad, backend


def _backward(ctx, grad_terms):
    model_output, x0, x_t, t, table = ctx.saved_tensors
    bwd = _backward_impl if direct_call_ok(grad_terms, *ctx.saved_tensors) else _vlb_backward_op
    grad = bwd(grad_terms, model_output, x0, x_t, t, table, ctx.var, ctx.clip, ctx.mean_grad, ctx.backend)
    return grad if ctx.needs_input_grad[0] else None, None, None, None, None, None, None, None, None


_vlb_op.register_autograd(_backward, setup_context=_setup_context)


def vlb_terms(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    schedule: Schedule,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "learned_range",
    clip_denoised: bool = False,
    mean_grad: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The variational bound's term of each sample at its timestep, in bits per dimension.

    Args:
        model_output: (N, C, ...) prediction (eps, x0 or v), or (N, 2C, ...) with the variance values
            as the second half for variance_type "learned" / "learned_range". Any float dtype.
        x0: (N, C, ...) clean data; where t == 0 it must be 8-bit data scaled to [-1, 1] (checked
            in eager mode unless under ``no_value_checks``).
        x_t: (N, C, ...) the noised samples the model saw.
        t: (N,) int64 timesteps in [0, T) on x0's device (an int is broadcast).
        schedule: the noise schedule.
        prediction_type: epsilon, sample or v_prediction; variance_type: see ``ddpm_fast.vlb``.
        clip_denoised: clamp the predicted x0 to [-1, 1] before the posterior mean (improved-diffusion
            does in its bits/dim evaluation, not in its training loss).
        mean_grad: False stops the gradient into the prediction channels (the hybrid loss's L_vlb
            trains only the variance).
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest here.

    Returns:
        (N,) float32 (float64 for float64 inputs): KL / log 2 averaged over the sample's elements
        where t > 0, the decoder's NLL / log 2 averaged where t == 0. Differentiable in model_output.
    """
    for x, name in ((model_output, "model_output"), (x0, "x0"), (x_t, "x_t")):
        check_float(x, name)
    prediction_type = normalize_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    variance_type = normalize_choice("variance_type", variance_type, VARIANCE_TYPES)
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t has shape {tuple(x_t.shape)}, x0 {tuple(x0.shape)}: they must match")
    if model_output.device != x0.device or x_t.device != x0.device:
        raise ValueError("model_output, x0 and x_t must be on one device")
    n, c = x0.shape[:2]
    vlb.split_output(model_output, c, variance_type)  # raises on a wrong channel count
    if model_output.shape[0] != n or model_output.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} for x0 of shape {tuple(x0.shape)}")
    t = timesteps_arg(t, n, x0.device, "t", schedule.num_train_timesteps)
    if value_checks_enabled(x0.device):
        vlb.check_8bit_range(x0, "x0")
    dtype = torch.promote_types(torch.promote_types(model_output.dtype, x0.dtype), x_t.dtype)
    model_output, x0, x_t = (x if x.dtype == dtype else x.to(dtype) for x in (model_output, x0, x_t))
    if not mean_grad and variance_type not in vlb.LEARNED_TYPES:
        model_output = model_output.detach()  # nothing left to train
    name = choose("vlb_terms", backend, x0.device, numel=x0.numel(), dtype=dtype)
    if name == "reference":
        if not mean_grad and model_output.requires_grad:
            model_output = torch.cat([model_output[:, :c].detach(), model_output[:, c:]], dim=1)
        terms = vlb.vlb_terms(
            schedule.to(x0.device),
            model_output,
            x0,
            x_t,
            t,
            prediction_type=prediction_type,
            variance_type=variance_type,
            clip_denoised=clip_denoised,
            check_range=False,  # checked above, or not wanted (no_value_checks)
        )
        return terms.to(_terms_dtype(x0))
    table = _kernel_table(schedule, prediction_type, variance_type, _terms_dtype(x0), x0.device)
    op = _vlb_impl if direct_call_ok(model_output, x0, x_t) else _vlb_op
    code = VAR_CODES[variance_type]
    return op(model_output, x0, x_t, t, table, code, bool(clip_denoised), bool(mean_grad), name)
