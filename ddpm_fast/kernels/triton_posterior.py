"""Triton posterior_step: one reverse step (DDPM ancestral or DDIM) in one pass, the same
arithmetic as csrc/step_math.h and reference.posterior_step. With PHASE1 it writes |x0| only
(the first pass of dynamic thresholding). Divisions and square roots are IEEE-rounded
(div_rn, sqrt_rn): the approximate ones lose 1 - a_t / a_prev when a_t ~ a_prev."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import elementwise_config, quad_noise, row_index, tile_noise

# Codes shared with csrc/kernel_args.h (constexpr globals: the compiler reads them in kernels).
DDPM, DDIM = tl.constexpr(0), tl.constexpr(1)
EPS, SAMPLE, V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FIXED_SMALL, FIXED_SMALL_LOG, FIXED_LARGE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
LEARNED, LEARNED_RANGE = tl.constexpr(3), tl.constexpr(4)
CLIP_NONE, CLIP, THRESHOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def posterior_kernel(
    mo_ptr,
    x_ptr,
    noise_ptr,
    prev_ptr,
    x0_ptr,
    abs_ptr,
    t_ptr,
    prev_t_ptr,
    ac_ptr,
    scale_ptr,
    seed_ptr,
    C,
    S,
    T,
    mo_half,
    mo_var,
    final_alpha,
    guidance_scale,
    clip_range,
    eta,
    m_sn,
    m_sc,
    m_ss,
    x_sn,
    x_sc,
    x_ss,
    z_sn,
    z_sc,
    z_ss,
    p_sn,
    p_sc,
    p_ss,
    o_sn,
    o_sc,
    o_ss,
    a_sn,
    a_sc,
    a_ss,
    KIND: tl.constexpr,
    PRED: tl.constexpr,
    VAR: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    GUIDED: tl.constexpr,
    HAS_VAR: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    DRAW_NOISE: tl.constexpr,
    WRITE_X0: tl.constexpr,
    PHASE1: tl.constexpr,
    QUAD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, n, c, s, mask = row_index(C, S, BLOCK)

    # Per-sample coefficients (scalars).
    t = tl.load(t_ptr + n)
    p = tl.load(prev_t_ptr + n)
    a_t = tl.load(ac_ptr + tl.minimum(tl.maximum(t, 0), T - 1))
    a_prev = tl.where(p >= 0, tl.load(ac_ptr + tl.minimum(tl.maximum(p, 0), T - 1)), final_alpha)
    sqrt_a_t = tl.sqrt_rn(a_t)
    sqrt_1m_a_t = tl.sqrt_rn(1.0 - a_t)

    m = n * m_sn + c * m_sc + s * m_ss
    out = tl.load(mo_ptr + m, mask=mask).to(tl.float32)
    if GUIDED:
        out = out + guidance_scale * (tl.load(mo_ptr + m + mo_half, mask=mask).to(tl.float32) - out)
    x = tl.load(x_ptr + n * x_sn + c * x_sc + s * x_ss, mask=mask).to(tl.float32)

    if PRED == EPS:
        x0 = tl.div_rn(x - sqrt_1m_a_t * out, sqrt_a_t)
    elif PRED == SAMPLE:
        x0 = out
    else:
        x0 = sqrt_a_t * x - sqrt_1m_a_t * out

    if PHASE1:
        tl.store(abs_ptr + n * a_sn + c * a_sc + s * a_ss, tl.abs(x0), mask=mask)
    else:
        if CLIP_MODE == CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
        elif CLIP_MODE == THRESHOLD:
            thresh = tl.load(scale_ptr + n)
            x0 = tl.div_rn(tl.minimum(tl.maximum(x0, -thresh), thresh), thresh)

        if KIND == DDPM:
            current_alpha = tl.div_rn(a_t, a_prev)
            current_beta = 1.0 - current_alpha
            coef_x0 = tl.div_rn(tl.sqrt_rn(a_prev) * (1.0 - current_alpha), 1.0 - a_t)
            coef_xt = tl.div_rn(tl.sqrt_rn(current_alpha) * (1.0 - a_prev), 1.0 - a_t)
            mean = coef_x0 * x0 + coef_xt * x
            beta_tilde = tl.maximum(tl.div_rn(1.0 - a_prev, 1.0 - a_t) * current_beta, 1e-20)
            if VAR == FIXED_SMALL:
                std = tl.sqrt_rn(beta_tilde)
            elif VAR == FIXED_SMALL_LOG:
                std = tl.exp(0.5 * tl.log(beta_tilde))
            elif VAR == FIXED_LARGE:
                std = tl.sqrt_rn(current_beta)
            else:
                variance = tl.load(mo_ptr + m + mo_var + (mo_half if GUIDED else 0), mask=mask, other=1.0).to(
                    tl.float32
                )
                if VAR == LEARNED:
                    std = tl.sqrt_rn(variance)
                else:
                    frac = (variance + 1.0) * 0.5
                    std = tl.exp(0.5 * (frac * tl.log(current_beta) + (1.0 - frac) * tl.log(beta_tilde)))
            noisy = t > 0
        else:
            if PRED == EPS:
                eps = out
            elif PRED == SAMPLE:
                eps = tl.div_rn(x - sqrt_a_t * out, sqrt_1m_a_t)
            else:
                eps = sqrt_a_t * out + sqrt_1m_a_t * x
            if USE_CLIPPED:
                eps = tl.div_rn(x - sqrt_a_t * x0, sqrt_1m_a_t)
            # clamped at 0: a_t / a_prev can round above 1 when a_t ~ a_prev; the direction subtracts
            # sigma^2 itself (exactly 0 at a_t = 0, eta = 1)
            ratio = tl.div_rn(1.0 - a_prev, 1.0 - a_t) * (1.0 - tl.div_rn(a_t, a_prev))
            variance = eta * eta * tl.maximum(ratio, 0.0)
            std = tl.sqrt_rn(variance)
            dir_coef = tl.sqrt_rn(tl.maximum(1.0 - a_prev - variance, 0.0))
            mean = tl.sqrt_rn(a_prev) * x0 + dir_coef * eps
            noisy = True  # std is 0 when eta is 0

        out_ty = prev_ptr.dtype.element_ty
        if HAS_NOISE:
            z = tl.load(noise_ptr + n * z_sn + c * z_sc + s * z_ss, mask=mask, other=0.0).to(tl.float32)
            prev = tl.where(noisy, mean + std * z, mean)
        elif DRAW_NOISE:
            seed = tl.load(seed_ptr)
            z = tile_noise(seed, row, S, s, BLOCK, QUAD_NOISE).to(out_ty).to(tl.float32)  # as if stored, then read
            prev = tl.where(noisy, mean + std * z, mean)
        else:
            prev = mean
        tl.store(prev_ptr + n * p_sn + c * p_sc + s * p_ss, prev.to(out_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + n * o_sn + c * o_sc + s * o_ss, x0.to(out_ty), mask=mask)


def posterior_step_triton(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    thresh_scale: torch.Tensor | None,
    prev: torch.Tensor,
    pred_x0: torch.Tensor | None,
    abs_x0: torch.Tensor | None,
    final_alpha_cumprod: float,
    guidance_scale: float,
    clip_range: float,
    eta: float,
    kind: int,
    pred: int,
    var: int,
    clip: int,
    guidance: bool,
    use_clipped_model_output: bool,
) -> None:
    """Same arguments as torch.ops.ddpm_fast_C.posterior_step, on (N, C, S) views."""
    n, c, s = sample.shape
    if clip == THRESHOLD.value and thresh_scale is None and abs_x0 is None:
        raise ValueError("thresholding needs the per-sample scale (phase 2) or the abs_x0 buffer (phase 1)")
    block, num_warps = elementwise_config(s, sample.device)
    dummy = prev
    z = noise if noise is not None else dummy
    o = pred_x0 if pred_x0 is not None else dummy
    a = abs_x0 if abs_x0 is not None else dummy
    grid = (n * c, triton.cdiv(s, block))
    posterior_kernel[grid](
        model_output,
        sample,
        z,
        prev,
        o,
        a,
        t,
        prev_t,
        alphas_cumprod,
        thresh_scale if thresh_scale is not None else alphas_cumprod,
        seed if seed is not None else t,
        c,
        s,
        alphas_cumprod.numel(),
        n * model_output.stride(0),
        c * model_output.stride(1),
        float(final_alpha_cumprod),
        float(guidance_scale),
        float(clip_range),
        float(eta),
        *model_output.stride(),
        *sample.stride(),
        *z.stride(),
        *prev.stride(),
        *o.stride(),
        *a.stride(),
        KIND=kind,
        PRED=pred,
        VAR=var,
        CLIP_MODE=clip,
        GUIDED=guidance,
        HAS_VAR=model_output.shape[1] == 2 * c,
        USE_CLIPPED=use_clipped_model_output,
        HAS_NOISE=noise is not None,
        DRAW_NOISE=noise is None and seed is not None,
        WRITE_X0=pred_x0 is not None,
        PHASE1=abs_x0 is not None,
        QUAD_NOISE=noise is None and seed is not None and quad_noise(s),
        BLOCK=block,
        num_warps=num_warps,
    )
