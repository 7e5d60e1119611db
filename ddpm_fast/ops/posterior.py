"""posterior_step: one fused reverse step (DDPM ancestral or DDIM), from the model output to
x_prev: guidance combine -> x0 prediction -> clip / dynamic threshold -> (a guide: DDIM's eps and
x0 shifted) -> posterior mean (a guide: DDPM's + sigma_t^2 g) -> + sigma z. Dynamic thresholding adds a
first pass (|x0|), a per-sample top-k quantile, then the step. The guide (a classifier-guidance
gradient) is one more input read in the same pass (``reference.posterior_step``)."""

from __future__ import annotations

import torch

from .. import reference
from .._backends import choose, load_extension
from ..schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule, StepConfig
from ._common import check_float, direct_call_ok, kernel_views, new_like, noise_arg, seed_from, timesteps_arg

# Kernel codes (csrc/kernel_args.h).
KINDS = {"ddpm": 0, "ddim": 1}
PREDICTIONS = {name: i for i, name in enumerate(PREDICTION_TYPES)}
VARIANCES = {name: i for i, name in enumerate(VARIANCE_TYPES)}
CLIP_NONE, CLIP, THRESHOLD = 0, 1, 2


def quantile_scale(abs_x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample clamp(quantile_ratio(|x0|), 1, max) as torch.quantile (linear) computes it,
    from the two order statistics around the rank (far cheaper than the full sort that
    torch.quantile does)."""
    flat = abs_x0.flatten(1)
    m = flat.shape[1]
    if flat.numel() == 0:  # no sample, or samples without elements: a scale of 1 changes nothing
        return torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
    pos = ratio * (m - 1)
    lo = int(pos)  # ascending ranks lo and hi = lo + 1 (or lo at the top)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64) and load_extension() is not None:
        v_lo, v_hi = torch.ops.ddpm_fast_C.abs_order_stats(flat.contiguous(), lo)  # a radix select per row
    else:
        v_lo, v_hi = topk_order_stats(flat, lo)
    return torch.lerp(v_lo, v_hi, pos - lo).clamp(min=1.0, max=max_value).contiguous()


def topk_order_stats(flat: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's values at ascending ranks lo and lo + 1 (lo again at the top), from one top-k
    at whichever end is nearer (k ~ 0.5% of the elements at diffusers' ratio 0.995). On CUDA
    that beats kthvalue, which runs one block per sample."""
    m = flat.shape[1]
    hi = min(lo + 1, m - 1)
    if m - lo <= hi + 1:
        top = torch.topk(flat, m - lo, dim=1, largest=True, sorted=True).values  # descending
        return top[:, -1], (top[:, -2] if hi > lo else top[:, -1])
    bottom = torch.topk(flat, hi + 1, dim=1, largest=False, sorted=True).values  # ascending
    return bottom[:, lo], bottom[:, hi]


def _posterior_impl(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    final_alpha_cumprod: float,
    kind: int,
    pred: int,
    var: int,
    clip: int,
    clip_range: float,
    thresh_ratio: float,
    sample_max: float,
    eta: float,
    use_clipped_model_output: bool,
    guidance_scale: float | None,
    return_x0: bool,
    backend: str,
    guide: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ..kernels.triton_posterior import posterior_step_triton as launch
    else:  # cpp and cuda: the _C op, routed by device
        load_extension()
        launch = torch.ops.ddpm_fast_C.posterior_step
    in_view, out_view = kernel_views(backend)
    mo3, x3 = in_view(model_output), in_view(sample)
    z3 = in_view(noise) if noise is not None else None
    g3 = in_view(guide) if guide is not None else None
    guided = guidance_scale is not None
    g = 1.0 if guidance_scale is None else guidance_scale
    stat_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    scale = None
    flags = (kind, pred, var, clip, guided, use_clipped_model_output)
    if clip == THRESHOLD:  # phase 1: |x0| per element, then the per-sample quantile
        abs_x0 = torch.empty(x3.shape, dtype=stat_dtype, device=sample.device)
        scratch = torch.empty_like(x3)
        launch(
            mo3,
            x3,
            t,
            prev_t,
            alphas_cumprod,
            z3,
            seed,
            None,
            scratch,
            None,
            abs_x0,
            final_alpha_cumprod,
            g,
            clip_range,
            eta,
            *flags,
            g3,
        )
        scale = quantile_scale(abs_x0, thresh_ratio, sample_max).to(stat_dtype)
    prev = new_like(sample)
    x0 = new_like(sample) if return_x0 else sample.new_empty(0)
    launch(
        mo3,
        x3,
        t,
        prev_t,
        alphas_cumprod,
        z3,
        seed,
        scale,
        out_view(prev),
        out_view(x0) if return_x0 else None,
        None,
        final_alpha_cumprod,
        g,
        clip_range,
        eta,
        *flags,
        g3,
    )
    return prev, x0


_posterior_op = torch.library.custom_op("ddpm_fast::posterior_step", mutates_args=())(_posterior_impl)


@_posterior_op.register_fake
def _(
    model_output,
    sample,
    t,
    prev_t,
    alphas_cumprod,
    noise,
    seed,
    final_alpha_cumprod,
    kind,
    pred,
    var,
    clip,
    clip_range,
    thresh_ratio,
    sample_max,
    eta,
    use_clipped_model_output,
    guidance_scale,
    return_x0,
    backend,
    guide=None,
):
    return torch.empty_like(sample), torch.empty_like(sample) if return_x0 else sample.new_empty(0)


def _check_model_output(model_output: torch.Tensor, sample: torch.Tensor, config: StepConfig, guided: bool) -> None:
    n, c = sample.shape[:2]
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device}, sample on {sample.device}")
    if guided and model_output.shape[0] != 2 * n:
        raise ValueError(
            f"with guidance model_output must hold [uncond, cond] halves: batch {2 * n} for {n} samples, "
            f"got {model_output.shape[0]}"
        )
    if not guided and model_output.shape[0] != n:
        raise ValueError(f"model_output batch {model_output.shape[0]} differs from sample batch {n}")
    if model_output.shape[2:] != sample.shape[2:]:
        raise ValueError(
            f"model_output spatial shape {tuple(model_output.shape[2:])} differs from {tuple(sample.shape[2:])}"
        )
    channels = model_output.shape[1]
    if config.learned_variance and config.kind == "ddpm" and channels != 2 * c:
        raise ValueError(f"variance_type={config.variance_type!r} needs 2 x {c} model output channels, got {channels}")
    if channels not in (c, 2 * c):
        raise ValueError(f"model_output has {channels} channels; expected {c} (or {2 * c} with learned variance)")


def posterior_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor | int,
    prev_t: torch.Tensor | int,
    schedule: Schedule,
    config: StepConfig,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
    guide: torch.Tensor | None = None,
    return_pred_x0: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One reverse step x_t -> x_prev for a batch, in one kernel (two with thresholding).

    Args:
        model_output: (N, C or 2C, ...) prediction (eps, x0 or v per ``config``); (2N, ...)
            halves [uncond, cond] when ``guidance_scale`` is given. Any float dtype.
        sample: (N, C, ...) x_t; the output has its dtype and memory format.
        t, prev_t: (N,) int64 timesteps on sample's device; prev_t = -1 marks the last step.
        schedule, config: the noise schedule and what the step does (StepConfig).
        noise: z shaped like sample; drawn in-kernel (Philox, from ``generator``) when None.
        guidance_scale: classifier-free guidance s: uncond + s (cond - uncond).
        guide: a guidance gradient g shaped like sample (any float dtype, used in sample's), e.g.
            s grad_x log p(y | x_t, t) of a classifier (Dhariwal & Nichol 2021): DDPM adds
            sigma_t^2 g to the posterior mean after the x0 clip (their ``condition_mean``); DDIM
            steps with eps - sqrt(1 - a_bar_t) g and x0 + (1 - a_bar_t) / sqrt(a_bar_t) g after the
            clip (``condition_score``; pred_x0 is that x0). Read in the same pass as the rest.
        return_pred_x0: also return the (clipped) x0 prediction.
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest here.

    Returns:
        (prev_sample, pred_x0 or None).
    """
    check_float(model_output, "model_output")
    check_float(sample, "sample")
    if not isinstance(config, StepConfig):
        raise TypeError(f"config must be a StepConfig, got {type(config).__name__}")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    guided = guidance_scale is not None
    _check_model_output(model_output, sample, config, guided)
    if config.prediction_type == "epsilon" and schedule.zero_terminal_snr:
        raise ValueError(
            "epsilon prediction divides by zero on a zero-terminal-SNR schedule: use v_prediction or sample"
        )
    n, T = sample.shape[0], schedule.num_train_timesteps
    t = timesteps_arg(t, n, sample.device, "t", T)
    prev_t = timesteps_arg(prev_t, n, sample.device, "prev_t", T, allow_minus_one=True)
    if noise is not None:
        noise = noise_arg(noise, sample)
    if guide is not None:
        guide = noise_arg(guide, sample, "guide")
    wide = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else sample.dtype
    name = choose("posterior_step", backend, sample.device, numel=sample.numel(), dtype=wide)
    adds_noise = config.kind == "ddpm" or config.eta > 0

    if name == "reference":
        if noise is None and adds_noise:
            seed = seed_from(generator, sample.device).item()
            noise = reference.philox_randn(seed, tuple(sample.shape), sample.device).to(sample.dtype)
        sched = schedule.to(sample.device)
        prev, x0 = reference.posterior_step(
            model_output, sample, t, prev_t, sched, config, noise, guidance_scale, guide
        )
        return prev, (x0 if return_pred_x0 else None)

    table = schedule.kernel_table(
        "alphas_cumprod", torch.float64 if sample.dtype == torch.float64 else torch.float32, sample.device
    )
    seed = seed_from(generator, sample.device) if noise is None and adds_noise else None
    clip = THRESHOLD if config.thresholding else (CLIP if config.clip_sample else CLIP_NONE)
    final = 1.0 if config.kind == "ddpm" else schedule.final_alpha_cumprod
    op = _posterior_impl if direct_call_ok(model_output, sample, noise, guide) else _posterior_op
    prev, x0 = op(
        model_output,
        sample,
        t,
        prev_t,
        table,
        noise,
        seed,
        final,
        KINDS[config.kind],
        PREDICTIONS[config.prediction_type],
        VARIANCES[config.variance_type],
        clip,
        config.clip_sample_range,
        config.dynamic_thresholding_ratio,
        config.sample_max_value,
        config.eta,
        config.use_clipped_model_output,
        None if guidance_scale is None else float(guidance_scale),
        return_pred_x0,
        name,
        guide,
    )
    return prev, (x0 if return_pred_x0 else None)
