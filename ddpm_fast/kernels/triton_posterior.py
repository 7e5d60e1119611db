"""Triton posterior_step: one reverse step (DDPM ancestral or DDIM) in one pass, the same
arithmetic as csrc/step_math.h and reference.posterior_step. With PHASE1 it writes |x0| only
(the first pass of dynamic thresholding). Divisions and square roots are IEEE-rounded
(div_rn, sqrt_rn): the approximate ones lose 1 - a_t / a_prev when a_t ~ a_prev. With HAS_GUIDE a
guidance gradient g is read in the same pass and applied after the x0 clip: DDPM's mean gains
sigma_t^2 g, DDIM's eps loses sqrt(1 - a_t) g and its x0 gains (1 - a_t) / sqrt(a_t) g
(reference.posterior_step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Operands, cdiv, elementwise_config, launch, offset, quad_noise, row_index, tile_noise

# Codes shared with csrc/kernel_args.h (constexpr globals: the compiler reads them in kernels).
DDPM, DDIM = tl.constexpr(0), tl.constexpr(1)
EPS, SAMPLE, V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FIXED_SMALL, FIXED_SMALL_LOG, FIXED_LARGE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
LEARNED, LEARNED_RANGE = tl.constexpr(3), tl.constexpr(4)
CLIP_NONE, CLIP, THRESHOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit(do_not_specialize=["N"])
def posterior_kernel(
    mo_ptr,
    x_ptr,
    noise_ptr,
    prev_ptr,
    aux_ptr,
    t_ptr,
    prev_t_ptr,
    ac_ptr,
    scale_ptr,
    seed_ptr,
    guide_ptr,
    N,
    C,
    S,
    T,
    final_alpha,
    guidance_scale,
    clip_range,
    eta,
    LAYOUTS: tl.constexpr,
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
    HAS_GUIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(N, C, S) views; model_output (N or 2N with GUIDED, C or 2C with HAS_VAR, S). aux_ptr: the
    pred_x0 output (WRITE_X0) or |x0| (PHASE1); guide_ptr: the guidance gradient (HAS_GUIDE).
    LAYOUTS: bit i set where tensor i of (model_output, sample, noise, prev, aux, guide) is NHWC
    (launch.Operands)."""
    row, n, c, s, mask = row_index(C, S, BLOCK)

    # Per-sample coefficients (scalars).
    t = tl.load(t_ptr + n)
    p = tl.load(prev_t_ptr + n)
    a_t = tl.load(ac_ptr + tl.minimum(tl.maximum(t, 0), T - 1))
    a_prev = tl.where(p >= 0, tl.load(ac_ptr + tl.minimum(tl.maximum(p, 0), T - 1)), final_alpha)
    sqrt_a_t = tl.sqrt_rn(a_t)
    sqrt_1m_a_t = tl.sqrt_rn(1.0 - a_t)

    mo_c = C * 2 if HAS_VAR else C  # model_output's channels; [uncond, cond] halves of N samples each
    mo_nhwc: tl.constexpr = LAYOUTS & 1
    out = tl.load(mo_ptr + offset(n, c, s, mo_c, S, mo_nhwc), mask=mask).to(tl.float32)
    if GUIDED:
        cond = tl.load(mo_ptr + offset(n + N, c, s, mo_c, S, mo_nhwc), mask=mask).to(tl.float32)
        out = out + guidance_scale * (cond - out)
    x = tl.load(x_ptr + offset(n, c, s, C, S, (LAYOUTS >> 1) & 1), mask=mask).to(tl.float32)
    if HAS_GUIDE:
        g = tl.load(guide_ptr + offset(n, c, s, C, S, (LAYOUTS >> 5) & 1), mask=mask, other=0.0).to(tl.float32)

    if PRED == EPS:
        x0 = tl.div_rn(x - sqrt_1m_a_t * out, sqrt_a_t)
    elif PRED == SAMPLE:
        x0 = out
    else:
        x0 = sqrt_a_t * x - sqrt_1m_a_t * out

    if PHASE1:
        tl.store(aux_ptr + offset(n, c, s, C, S, (LAYOUTS >> 4) & 1), tl.abs(x0), mask=mask)
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
                var_n = n + N if GUIDED else n  # the conditional half's variance
                var_off = offset(var_n, c + C, s, mo_c, S, mo_nhwc)
                variance = tl.load(mo_ptr + var_off, mask=mask, other=1.0).to(tl.float32)
                if VAR == LEARNED:
                    std = tl.sqrt_rn(variance)
                else:
                    frac = (variance + 1.0) * 0.5
                    std = tl.exp(0.5 * (frac * tl.log(current_beta) + (1.0 - frac) * tl.log(beta_tilde)))
            if HAS_GUIDE:  # condition_mean: + sigma_t^2 g
                mean = mean + std * std * g
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
            if HAS_GUIDE:  # condition_score after the clip
                x0 = x0 + tl.div_rn(1.0 - a_t, sqrt_a_t) * g
                eps = eps - sqrt_1m_a_t * g
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
            z_off = offset(n, c, s, C, S, (LAYOUTS >> 2) & 1)
            z = tl.load(noise_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
            prev = tl.where(noisy, mean + std * z, mean)
        elif DRAW_NOISE:
            seed = tl.load(seed_ptr)
            z = tile_noise(seed, row, S, s, BLOCK, QUAD_NOISE).to(out_ty).to(tl.float32)  # as if stored, then read
            prev = tl.where(noisy, mean + std * z, mean)
        else:
            prev = mean
        tl.store(prev_ptr + offset(n, c, s, C, S, (LAYOUTS >> 3) & 1), prev.to(out_ty), mask=mask)
        if WRITE_X0:
            tl.store(aux_ptr + offset(n, c, s, C, S, (LAYOUTS >> 4) & 1), x0.to(out_ty), mask=mask)


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
    guide: torch.Tensor | None = None,
) -> None:
    """Same arguments as torch.ops.ddpm_fast_C.posterior_step, on (N, C, S) views. NCHW and NHWC
    views are read and written where they are; other layouts go through copies (launch.Operands)."""
    n, c, s = sample.shape
    if clip == THRESHOLD.value and thresh_scale is None and abs_x0 is None:
        raise ValueError("thresholding needs the per-sample scale (phase 2) or the abs_x0 buffer (phase 1)")
    if pred_x0 is not None and abs_x0 is not None:
        raise ValueError("phase 1 (abs_x0) writes no pred_x0")
    block, num_warps = elementwise_config(s)
    ops = Operands()
    mo, x, z = ops.read(model_output), ops.read(sample), ops.read(noise)
    prev = ops.write(prev)
    aux = ops.write(pred_x0 if abs_x0 is None else abs_x0)
    g = ops.read(guide)
    launch(
        posterior_kernel,
        (n * c, cdiv(s, block)),
        (
            mo,
            x,
            z if z is not None else prev,  # a valid pointer for the arguments a specialisation never reads
            prev,
            aux if aux is not None else prev,
            t,
            prev_t,
            alphas_cumprod,
            thresh_scale if thresh_scale is not None else alphas_cumprod,
            seed if seed is not None else t,
            g if g is not None else x,
        ),
        (
            n,
            c,
            s,
            alphas_cumprod.numel(),
            float(final_alpha_cumprod),
            float(guidance_scale),
            float(clip_range),
            float(eta),
        ),
        num_warps,
        LAYOUTS=ops.code,
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
        HAS_GUIDE=guide is not None,
        BLOCK=block,
    )
    ops.finish()
