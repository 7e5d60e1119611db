"""The variational bound of a diffusion model, term by term: the float64 reference.

Ho et al. 2020, eq. 5: -log p(x_0) <= L = L_T + sum_{t>1} L_{t-1} + L_0 with
    L_T     = KL(q(x_T | x_0) || N(0, I))                       (the prior term, ``prior_bpd``)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      (``normal_kl``)
    L_0     = -log p(x_0 | x_1), a discretized Gaussian over the 256 bins of 8-bit data
              (``discretized_gaussian_log_likelihood``)
Formulas and conventions follow improved-diffusion (Nichol & Dhariwal 2021, ``gaussian_diffusion.py``
and ``losses.py``): each term is averaged over the dimensions of an image and divided by log 2, so
terms are in bits per dimension and the bound is their sum. Our timesteps are 0-based: the term at
index t (``vlb_terms``) is KL(q(x_t | x_{t+1}, x_0) || p) in the paper's 1-based names, and index 0
is the decoder.

Everything here computes in float64 by default (``dtype=``): the log-variance differences are
formed from float64 tables, and the decoder uses the exact Gaussian CDF in log space
(``torch.special.log_ndtr``), so tail bins keep their precision. ``cdf="approx"`` gives
improved-diffusion's tanh approximation with its 1e-12 clamp, for conformance.

Variance types (the model's p(x_{t-1} | x_t) log-variance, DESIGN.md's names):
    fixed_small, fixed_small_log  log beta~_t, clipped at t = 0 to beta~_1 (improved-diffusion FIXED_SMALL)
    fixed_large                   log beta_t, with beta~_1 at t = 0 (improved-diffusion FIXED_LARGE)
    learned_range                 frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (eq. 15)
    learned                       log v: the extra channels are the variance itself (diffusers' meaning,
                                  as the sampler reads them), floored at 1e-20; values at or below the
                                  floor get no gradient, so this parametrisation needs a positive output
                                  (improved-diffusion's LEARNED is a log-variance: use learned_range)
"""

from __future__ import annotations

import math

import torch

from .schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule, normalize_choice

LOG2 = math.log(2.0)
LEARNED_VARIANCE_FLOOR = 1e-20
LEARNED_TYPES = ("learned", "learned_range")
CDF_KINDS = ("exact", "approx")


# ---------------------------------------------------------------- Gaussians
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise (improved-diffusion's
    ``normal_kl``, in nats): 0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 exp(-lv2)).
    Arguments broadcast; at least one must be a tensor."""
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The exact standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2."""
    return torch.special.ndtr(x)


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) for a >= b, without cancellation: a + log(-expm1(b - a))."""
    return a + torch.log(-torch.expm1(torch.clamp(b - a, max=0.0)))


def log_bin_probability(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(means, exp(log_scales)^2), exact, in log space: the bins of
    width 2/255 around x, the first extending to -inf and the last to +inf (x <= -0.999, >= 0.999).
    A bin in the upper tail is mirrored into the lower one, where log_ndtr keeps its precision."""
    inv_s = torch.exp(-log_scales)
    z_hi = (x - means + 1.0 / 255.0) * inv_s
    z_lo = (x - means - 1.0 / 255.0) * inv_s
    flip = z_lo > 0  # both ends in the upper tail: P = Phi(-z_lo) - Phi(-z_hi)
    hi = torch.where(flip, -z_lo, z_hi)
    lo = torch.where(flip, -z_hi, z_lo)
    middle = _log_diff_exp(torch.special.log_ndtr(hi), torch.special.log_ndtr(lo))
    first = torch.special.log_ndtr(z_hi)  # x = -1: P = Phi(z_hi)
    last = torch.special.log_ndtr(-z_lo)  # x = +1: P = 1 - Phi(z_lo)
    return torch.where(x < -0.999, first, torch.where(x > 0.999, last, middle))


def check_8bit_range(x: torch.Tensor, name: str = "x") -> None:
    """The discretized decoder models 8-bit data scaled to [-1, 1]: refuse anything outside."""
    if x.numel() and not torch.compiler.is_compiling():
        low, high = (float(v) for v in torch.aminmax(x.detach().float()))
        if low < -1.0 - 1e-6 or high > 1.0 + 1e-6 or not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"{name} holds values in [{low:.4g}, {high:.4g}]: the discretized Gaussian decoder takes 8-bit "
                "data scaled to [-1, 1] (x / 127.5 - 1)"
            )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor, cdf: str = "exact"
) -> torch.Tensor:
    """log-likelihood (nats) of 8-bit data x in [-1, 1] under a Gaussian discretized to its 256 bins,
    elementwise. ``cdf="approx"`` is improved-diffusion's formula exactly (tanh CDF, probabilities
    clamped at 1e-12); ``"exact"`` is ``log_bin_probability``. Values outside [-1, 1] raise ValueError."""
    if cdf not in CDF_KINDS:
        raise ValueError(f"unknown cdf {cdf!r}; valid: {', '.join(CDF_KINDS)}")
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {x.shape}, {means.shape}, {log_scales.shape}"
        )
    check_8bit_range(x)
    if cdf == "exact":
        return log_bin_probability(x, means, log_scales)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ---------------------------------------------------------------- the diffusion's Gaussians
def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return table.to(like.device)[t].to(dtype).reshape(-1, *([1] * (like.dim() - 1)))


def model_log_variance_table(schedule: Schedule, variance_type: str) -> torch.Tensor:
    """(T,) float64: the model's log-variance for a fixed variance type, the lower bound (log beta~_t,
    clipped) for learned_range; undefined (NaN) for learned."""
    variance_type = normalize_choice("variance_type", variance_type, VARIANCE_TYPES)
    clipped = schedule.posterior_log_variance_clipped
    if variance_type == "fixed_large":
        return torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    if variance_type == "learned":
        return torch.full_like(clipped, float("nan"))
    return clipped


def q_posterior_mean_variance(
    schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7): (mean, variance beta~_t, log beta~_t clipped at t = 0),
    in ``dtype``, broadcastable over x0."""
    mean = _at(schedule.posterior_mean_coef1, t, x0, dtype) * x0.to(dtype) + _at(
        schedule.posterior_mean_coef2, t, x0, dtype
    ) * x_t.to(dtype)
    return (
        mean,
        _at(schedule.posterior_variance, t, x0, dtype),
        _at(schedule.posterior_log_variance_clipped, t, x0, dtype),
    )


def predict_x0(
    schedule: Schedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x_0 from an eps, x_0 or v prediction (improved-diffusion's _predict_xstart_from_eps)."""
    out, x = model_output.to(dtype), x_t.to(dtype)
    if prediction_type == "epsilon":
        return (
            _at(schedule.sqrt_recip_alphas_cumprod, t, x, dtype) * x
            - _at(schedule.sqrt_recipm1_alphas_cumprod, t, x, dtype) * out
        )
    if prediction_type == "sample":
        return out
    return (
        _at(schedule.sqrt_alphas_cumprod, t, x, dtype) * x
        - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x, dtype) * out
    )


def split_output(
    model_output: torch.Tensor, channels: int, variance_type: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance channels or None) of a model output with C or 2C channels."""
    learned = variance_type in LEARNED_TYPES
    want = 2 * channels if learned else channels
    if model_output.shape[1] != want:
        raise ValueError(
            f"variance_type={variance_type!r} needs a model output with {want} channels for {channels}-channel "
            f"images, got {model_output.shape[1]}"
        )
    return (model_output[:, :channels], model_output[:, channels:]) if learned else (model_output, None)


def p_mean_variance(
    schedule: Schedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction_type: str,
    variance_type: str,
    clip_denoised: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(x_{t-1} | x_t) from the model output (improved-diffusion's p_mean_variance):
    (mean, log-variance, predicted x_0) in ``dtype``. ``model_output`` has C channels, or 2C
    for the learned variance types (the second half: the variance values)."""
    prediction_type = normalize_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    variance_type = normalize_choice("variance_type", variance_type, VARIANCE_TYPES)
    pred, var = split_output(model_output, x_t.shape[1], variance_type)
    if variance_type == "learned_range":
        frac = (var.to(dtype) + 1.0) / 2.0
        min_log = _at(schedule.posterior_log_variance_clipped, t, x_t, dtype)
        max_log = _at(torch.log(schedule.betas), t, x_t, dtype)
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif variance_type == "learned":
        log_variance = torch.log(var.to(dtype).clamp(min=LEARNED_VARIANCE_FLOOR))
    else:
        log_variance = _at(model_log_variance_table(schedule, variance_type), t, x_t, dtype).expand(x_t.shape)
    x0 = predict_x0(schedule, pred, x_t, t, prediction_type, dtype)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = _at(schedule.posterior_mean_coef1, t, x_t, dtype) * x0 + _at(
        schedule.posterior_mean_coef2, t, x_t, dtype
    ) * x_t.to(dtype)
    return mean, log_variance, x0


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first."""
    return x.flatten(1).mean(1)


def vlb_terms(
    schedule: Schedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "learned_range",
    clip_denoised: bool = False,
    cdf: str = "exact",
    dtype: torch.dtype = torch.float64,
    check_range: bool = True,
) -> torch.Tensor:
    """Per-sample term of the bound at timestep t, in bits per dimension, (N,) in ``dtype``
    (improved-diffusion's _vb_terms_bpd): where t > 0, mean_flat(KL(q(x_{t-1}|x_t,x_0) || p)) / log 2;
    where t == 0 the decoder's -mean_flat(log p(x_0 | x_1)) / log 2 (x_0 must be 8-bit data in [-1, 1]).
    Differentiable in ``model_output``. ``check_range=False`` skips the check of x0's range (a host read)."""
    if check_range and bool((t == 0).any()):
        check_8bit_range(x0, "x0")
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t, dtype)
    mean, log_variance, _ = p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_denoised=clip_denoised,
        dtype=dtype,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / LOG2
    x = x0.to(dtype)
    if cdf == "exact":
        decoder_ll = log_bin_probability(x, mean, 0.5 * log_variance)
    else:
        decoder_ll = discretized_gaussian_log_likelihood(x, means=mean, log_scales=0.5 * log_variance, cdf=cdf)
    decoder_nll = -mean_flat(decoder_ll) / LOG2
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def prior_bpd(schedule: Schedule, x0: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """L_T: KL(q(x_T | x_0) || N(0, I)) per sample, bits per dimension, (N,) (improved-diffusion's _prior_bpd).
    Independent of the model; ~0 for a well-designed schedule."""
    n = x0.shape[0]
    t = torch.full((n,), schedule.num_train_timesteps - 1, dtype=torch.int64, device=x0.device)
    mean = _at(schedule.sqrt_alphas_cumprod, t, x0, dtype) * x0.to(dtype)
    log_variance = _at(torch.log1p(-schedule.alphas_cumprod), t, x0, dtype)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2
