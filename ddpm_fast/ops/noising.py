"""q_sample: forward noising x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps in one pass, with
the noise drawn in-kernel when none is given and the training target written alongside."""

from __future__ import annotations

import torch

from .. import reference
from .._backends import choose, load_extension
from ..schedule import PREDICTION_TYPES, Schedule, normalize_choice
from ._common import check_float, direct_call_ok, kernel_views, new_like, noise_arg, seed_from, timesteps_arg

# Kernel codes of the training target (csrc/kernel_args.h TargetKind).
TARGET_KINDS = {None: 0, "epsilon": 1, "sample": 2, "v_prediction": 3}


def _q_sample_impl(
    x0: torch.Tensor,
    t: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1mab: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    target_kind: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_t = new_like(x0)
    noise_out = new_like(x0) if noise is None else x0.new_empty(0)
    target = new_like(x0) if target_kind else x0.new_empty(0)
    in_view, out_view = kernel_views(backend)
    x0_v, noise_v, x_t_v = in_view(x0), (None if noise is None else in_view(noise)), out_view(x_t)
    noise_out_v = out_view(noise_out) if noise is None else None
    target_v = out_view(target) if target_kind else None
    if backend == "triton":
        from ..kernels.triton_noising import q_sample_triton as launch
    else:  # cpp and cuda: the _C op, routed by device
        load_extension()
        launch = torch.ops.ddpm_fast_C.q_sample
    launch(x0_v, t, sqrt_ab, sqrt_1mab, noise_v, seed, x_t_v, noise_out_v, target_v, target_kind)
    return x_t, noise_out, target


_q_sample_op = torch.library.custom_op("ddpm_fast::q_sample", mutates_args=())(_q_sample_impl)


@_q_sample_op.register_fake
def _(x0, t, sqrt_ab, sqrt_1mab, noise, seed, target_kind, backend):
    noise_out = torch.empty_like(x0) if noise is None else x0.new_empty(0)
    target = torch.empty_like(x0) if target_kind else x0.new_empty(0)
    return torch.empty_like(x0), noise_out, target


def _setup_context(ctx, inputs, output):
    x0, t, sqrt_ab, sqrt_1mab, noise, seed, target_kind, backend = inputs
    ctx.save_for_backward(t, sqrt_ab, sqrt_1mab)
    ctx.target_kind = target_kind
    ctx.ndim = x0.dim()
    ctx.has_noise = noise is not None


def _backward(ctx, grad_x_t, grad_noise_out, grad_target):
    """x_t and the target are linear in (x0, noise): dx0 = a g_xt + d(target)/dx0 g_tgt, etc."""
    t, sqrt_ab, sqrt_1mab = ctx.saved_tensors
    shape = (-1,) + (1,) * (ctx.ndim - 1)
    a = sqrt_ab[t].reshape(shape).to(grad_x_t.dtype)
    b = sqrt_1mab[t].reshape(shape).to(grad_x_t.dtype)
    grad_x0, grad_noise = a * grad_x_t, b * grad_x_t
    if ctx.target_kind == TARGET_KINDS["epsilon"]:
        grad_noise = grad_noise + grad_target
    elif ctx.target_kind == TARGET_KINDS["sample"]:
        grad_x0 = grad_x0 + grad_target
    elif ctx.target_kind == TARGET_KINDS["v_prediction"]:
        grad_noise, grad_x0 = grad_noise + a * grad_target, grad_x0 - b * grad_target
    return grad_x0, None, None, None, grad_noise if ctx.has_noise else None, None, None, None


_q_sample_op.register_autograd(_backward, setup_context=_setup_context)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    schedule: Schedule,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    target: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Noise a batch of clean samples to per-sample timesteps in one pass.

    Args:
        x0: (N, ...) float32/float64/float16/bfloat16 clean samples (NCHW or channels_last).
        t: (N,) int64 timesteps in [0, T) on x0's device (an int is broadcast).
        schedule: the noise schedule.
        noise: eps, shaped like x0; drawn in-kernel (Philox, from ``generator``) when None.
        target: also return the training target: "epsilon", "sample" or "v_prediction".
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest here.

    Returns:
        (x_t, noise, target_or_None), each shaped like x0 in x0's dtype.
    """
    check_float(x0, "x0")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    target_name = None if target is None else normalize_choice("target", target, PREDICTION_TYPES)
    t = timesteps_arg(t, x0.shape[0], x0.device, "t", schedule.num_train_timesteps)
    table_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    name = choose("q_sample", backend, x0.device, numel=x0.numel(), dtype=x0.dtype)
    if noise is not None:
        noise = noise_arg(noise, x0)
    if name == "reference":
        if noise is None:
            noise = reference.philox_randn(seed_from(generator, x0.device).item(), tuple(x0.shape), x0.device).to(
                x0.dtype
            )
        x_t = reference.q_sample(x0, t, schedule, noise)
        tgt = None if target_name is None else reference.training_target(x0, noise, t, schedule, target_name)
        return x_t, noise, tgt
    sqrt_ab = schedule.kernel_table("sqrt_alphas_cumprod", table_dtype, x0.device)
    sqrt_1mab = schedule.kernel_table("sqrt_one_minus_alphas_cumprod", table_dtype, x0.device)
    seed = seed_from(generator, x0.device) if noise is None else None
    op = _q_sample_impl if direct_call_ok(x0, noise) else _q_sample_op
    x_t, noise_out, tgt = op(x0, t, sqrt_ab, sqrt_1mab, noise, seed, TARGET_KINDS[target_name], name)
    return x_t, (noise if noise is not None else noise_out), (tgt if target_name is not None else None)
