"""The oracle: plain, readable PyTorch for every op, against which each fast path is tested.

Equation numbers refer to Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM). Everything is
computed in float32 (float64 for float64 inputs) and returned in the input's dtype.
Per-sample timesteps ``t`` are int64 tensors of shape (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import Schedule, StepConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as a (N, 1, 1, ...) tensor in ``like``'s compute dtype, broadcastable over it."""
    return table.to(like.device)[t].to(compute_dtype(like)).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------- in-kernel noise
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_U32 = 0xFFFFFFFF


def philox_randn(
    seed: int | torch.Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu", *, offset: int = 0
) -> torch.Tensor:
    """The kernels' noise, exactly Triton's ``tl.randn4x``: element L = offset + i (i in logical
    NCHW order) is lane L % 4 of Philox block L // 4. A block is Philox4x32-10 with counter
    (block_lo, block_hi, 0, 0) and key (seed_lo, seed_hi); its words w0..w3 become uniforms
    u0..u3 and, by Box-Muller, the lanes r(u0) cos(2 pi u1), r(u0) sin(2 pi u1), r(u2) cos(2 pi u3),
    r(u2) sin(2 pi u3) with r(u) = sqrt(-2 ln max(u, 1e-7)). Returns float32 of ``shape``;
    uint32 arithmetic is emulated in int64.
    """
    seed = int(seed)
    numel = 1
    for d in shape:
        numel *= d
    first = offset // 4  # the blocks that cover elements offset .. offset + numel - 1
    blocks = torch.arange(first, (offset + numel + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = blocks & _U32, (blocks >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        # the int64 product wraps mod 2^64, which keeps the 64-bit product's bits
        hi_b = ((_PHILOX_ROUND[1] * c2) >> 32) & _U32
        hi_a = ((_PHILOX_ROUND[0] * c0) >> 32) & _U32
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, (_PHILOX_ROUND[1] * c2) & _U32, hi_a ^ c3 ^ k1, (_PHILOX_ROUND[0] * c0) & _U32
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _U32, (k1 + _PHILOX_KEY[1]) & _U32

    def uniform(bits: torch.Tensor) -> torch.Tensor:
        signed = torch.where(bits >= 2**31, bits - 2**32, bits)
        folded = torch.where(signed < 0, -signed - 1, signed)
        return folded.to(torch.float32) * 4.6566127342e-10

    r01, r23 = (torch.sqrt(-2.0 * torch.log(uniform(w).clamp(min=1.0e-7))) for w in (c0, c2))
    theta01, theta23 = (6.283185307179586 * uniform(w) for w in (c1, c3))
    lanes = torch.stack(
        [r01 * torch.cos(theta01), r01 * torch.sin(theta01), r23 * torch.cos(theta23), r23 * torch.sin(theta23)], dim=1
    )
    start = offset - 4 * first
    return lanes.flatten()[start : start + numel].reshape(shape)


# ---------------------------------------------------------------- forward process
def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps (eq. 4)."""
    cd = compute_dtype(x0)
    x_t = gather(schedule.sqrt_alphas_cumprod, t, x0) * x0.to(cd) + gather(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise.to(cd)
    return x_t.to(x0.dtype)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction_type: str
) -> torch.Tensor:
    """What the model learns to predict: eps, x_0, or v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0."""
    if prediction_type == "epsilon":
        return noise.clone()
    if prediction_type == "sample":
        return x0.clone()
    cd = compute_dtype(x0)
    v = gather(schedule.sqrt_alphas_cumprod, t, x0) * noise.to(cd) - gather(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * x0.to(cd)
    return v.to(x0.dtype)


# ---------------------------------------------------------------- parametrizations
def predict_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, a_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x_0 from an eps (eq. 15), x_0 or v prediction; all in the compute dtype."""
    if prediction_type == "epsilon":
        return (x_t - (1 - a_bar) ** 0.5 * model_output) / a_bar**0.5
    if prediction_type == "sample":
        return model_output
    return a_bar**0.5 * x_t - (1 - a_bar) ** 0.5 * model_output


def predict_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, a_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """eps from an eps, x_0 or v prediction."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_t - a_bar**0.5 * model_output) / (1 - a_bar) ** 0.5
    return a_bar**0.5 * model_output + (1 - a_bar) ** 0.5 * x_t


def guidance_output_coef(a_bar, prediction_type: str):
    """c with out' = out + c g: the model output whose eps is eps - sqrt(1 - a_bar) g (Dhariwal &
    Nichol 2021, Algorithm 2 / ``condition_score``: the score grad log p(x_t) plus g = s grad log
    p(y | x_t)), x_t held fixed. eps: -sqrt(1 - a); x0 (x0 = (x - sqrt(1 - a) eps) / sqrt(a)):
    (1 - a) / sqrt(a); v (v = (eps - sqrt(1 - a) x) / sqrt(a) at fixed x): -sqrt(1 - a) / sqrt(a).
    ``a_bar`` a float or a tensor (then elementwise)."""
    if prediction_type == "epsilon":
        return -((1 - a_bar) ** 0.5)
    if prediction_type == "sample":
        return (1 - a_bar) / a_bar**0.5
    return -((1 - a_bar) ** 0.5) / a_bar**0.5


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = clamp(quantile_ratio(|x_0|), 1, max); x_0 <- clamp(x_0, -s, s) / s."""
    if x0.numel() == 0:  # no sample, or samples without elements: nothing to threshold
        return x0
    flat = x0.flatten(1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(x0: torch.Tensor, config: StepConfig) -> torch.Tensor:
    if config.thresholding:
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def guidance_combine(model_output: torch.Tensor, guidance_scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on a (2N, ...) output holding [uncond, cond] halves.

    The first ``channels`` channels are guided: uncond + s (cond - uncond); any further
    (learned-variance) channels are taken from the conditional half.
    """
    uncond, cond = model_output.chunk(2)
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


# ---------------------------------------------------------------- reverse process
def _split_variance(model_output: torch.Tensor, channels: int, config: StepConfig):
    if model_output.shape[1] == 2 * channels and (config.learned_variance or config.kind == "ddim"):
        return model_output[:, :channels], model_output[:, channels:]
    if config.learned_variance:
        raise ValueError(
            f"variance_type={config.variance_type!r} needs a model output with 2 x {channels} channels, "
            f"got {model_output.shape[1]}"
        )
    return model_output, None


def ddpm_posterior_std(
    a_t: torch.Tensor, a_prev: torch.Tensor, variance_type: str, predicted_variance: torch.Tensor | None
) -> torch.Tensor:
    """sigma_t of the ancestral step (eq. 7 and Nichol & Dhariwal eq. 15) for stepping t -> prev."""
    current_beta = 1 - a_t / a_prev
    beta_tilde = ((1 - a_prev) / (1 - a_t) * current_beta).clamp(min=1e-20)
    if variance_type == "fixed_small":
        return beta_tilde**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(beta_tilde))
    if variance_type == "fixed_large":
        return current_beta**0.5
    if variance_type == "learned":  # the extra channels are the variance itself
        return predicted_variance**0.5
    frac = (predicted_variance + 1) / 2  # learned_range: interpolate between the log bounds
    return torch.exp(0.5 * (frac * torch.log(current_beta) + (1 - frac) * torch.log(beta_tilde)))


def posterior_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    schedule: Schedule,
    config: StepConfig,
    noise: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guide: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step x_t -> x_prev; returns (prev_sample, pred_x0), both in sample's dtype.

    ``prev_t < 0`` marks the last step: DDPM then uses a_bar_prev = 1, DDIM its
    ``final_alpha_cumprod``. DDPM adds sigma_t z only where t > 0; DDIM wherever eta > 0.
    ``noise`` (shape of ``sample``) is required whenever noise is added. ``schedule`` is a
    ``Schedule`` or anything with ``alphas_cumprod`` and ``final_alpha_cumprod``.

    ``guide`` (shape of ``sample``): a guidance gradient g = s grad_x log p(y | x_t) (classifier
    guidance, Dhariwal & Nichol 2021), applied after the clip of x0 as their code does. DDPM shifts
    the posterior mean by the step's variance: mean + sigma_t^2 g (``condition_mean``; sigma_t^2 as
    the step's variance type gives it, also at t = 0 where no noise is added). DDIM shifts eps by
    -sqrt(1 - a_bar_t) g and with it x0 by (1 - a_bar_t) / sqrt(a_bar_t) g (``condition_score``:
    the same x_t), the shifted x0 unclipped. (Guiding before the clip would cancel the x0 part
    wherever the clip binds and leave the eps part: a push away from the class at large t.)
    """
    cd = compute_dtype(sample)
    channels = sample.shape[1]
    out = model_output.to(cd)
    if guidance_scale is not None:
        out = guidance_combine(out, guidance_scale, channels)
    out, predicted_variance = _split_variance(out, channels, config)
    x_t = sample.to(cd)

    a_t = gather(schedule.alphas_cumprod, t, x_t)
    final = 1.0 if config.kind == "ddpm" else schedule.final_alpha_cumprod
    prev_valid = (prev_t >= 0).reshape(a_t.shape)
    a_prev = torch.where(
        prev_valid, gather(schedule.alphas_cumprod, prev_t.clamp(min=0), x_t), torch.full_like(a_t, final)
    )

    x0 = clip_or_threshold(predict_x0(out, x_t, a_t, config.prediction_type), config)

    if config.kind == "ddpm":
        # posterior mean mu~_t(x_t, x_0) (eq. 7), with beta_t = 1 - a_bar_t / a_bar_prev for respaced steps
        current_alpha = a_t / a_prev
        mean = (a_prev**0.5 * (1 - current_alpha) / (1 - a_t)) * x0 + (
            current_alpha**0.5 * (1 - a_prev) / (1 - a_t)
        ) * x_t
        std = ddpm_posterior_std(a_t, a_prev, config.variance_type, predicted_variance)
        if guide is not None:  # Dhariwal's condition_mean: mean + Sigma g, with the step's variance
            mean = mean + std * std * guide.to(cd)
        std = torch.where((t > 0).reshape(a_t.shape), std, torch.zeros_like(std))
        needs_noise = lambda: bool((t > 0).any())  # noqa: E731 (only read when no noise is given)
    else:
        # DDIM (Song et al. eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        eps = predict_eps(out, x_t, a_t, config.prediction_type)
        if config.use_clipped_model_output:
            eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if guide is not None:  # condition_score, after the clip
            x0 = x0 + (1 - a_t) / a_t**0.5 * guide.to(cd)
            eps = eps - (1 - a_t) ** 0.5 * guide.to(cd)
        # sigma^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev), clamped at 0: a_t / a_prev can round
        # above 1 when a_t ~ a_prev (diffusers gives NaN there). The direction's variance subtracts sigma^2
        # itself, not sqrt(sigma^2)^2, so at a_t = 0 with eta = 1 it cancels to exactly 0 on every CPU.
        variance = config.eta**2 * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0)
        std = variance**0.5
        mean = a_prev**0.5 * x0 + (1 - a_prev - variance).clamp(min=0) ** 0.5 * eps
        needs_noise = lambda: config.eta > 0  # noqa: E731

    if noise is None:
        if needs_noise():
            raise ValueError("this step adds noise: pass noise= (a tensor shaped like sample)")
        return mean.to(sample.dtype), x0.to(sample.dtype)
    return (mean + std * noise.to(cd)).to(sample.dtype), x0.to(sample.dtype)


# ---------------------------------------------------------------- training losses
def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for a loss on eps, x_0 or v."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    prediction_type: str,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error per sample (L_simple, eq. 14), optionally min-SNR weighted, averaged."""
    per_sample = (model_pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        snr = schedule.snr.to(per_sample.device)[t].float()
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, prediction_type)
    return per_sample.mean()


# ---------------------------------------------------------------- network pieces
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
) -> torch.Tensor:
    """h = x + bias_nc; n = GroupNorm(h) * w + b; n = n (1 + scale_nc) + shift_nc; y = SiLU(n) + residual."""
    cd = compute_dtype(x)
    expand = lambda v: v.to(cd).reshape(*v.shape[:2], *([1] * (x.dim() - 2)))  # noqa: E731
    h = x.to(cd)
    if bias_nc is not None:
        h = h + expand(bias_nc)
    n = F.group_norm(
        h, num_groups, None if weight is None else weight.to(cd), None if bias is None else bias.to(cd), eps
    )
    if scale_nc is not None:
        n = n * (1 + expand(scale_nc))
    if shift_nc is not None:
        n = n + expand(shift_nc)
    y = F.silu(n) if silu else n
    if residual is not None:
        y = y + residual.to(cd)
    return y.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, H, S, D) tensors, with the softmax in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype(q)
    scores = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v.to(cd)).to(q.dtype)


def attention_block(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    *,
    num_groups: int = 32,
    eps: float = 1e-6,
    num_heads: int = 1,
) -> torch.Tensor:
    """The U-Net self-attention block: x + proj(attention(qkv(GroupNorm(x)))) over the H*W pixels.

    qkv_weight is (3C, C) = [to_q; to_k; to_v], proj_weight (C, C).
    """
    n, c = x.shape[:2]
    h = group_norm_silu(x, num_groups, norm_weight, norm_bias, eps, silu=False)
    tokens = h.reshape(n, c, -1).transpose(1, 2)  # (N, S, C)
    q, k, v = F.linear(tokens, qkv_weight, qkv_bias).chunk(3, dim=-1)
    heads = lambda z: z.reshape(n, -1, num_heads, c // num_heads).transpose(1, 2)  # noqa: E731
    o = attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(n, -1, c)
    o = F.linear(o, proj_weight, proj_bias)
    return x + o.transpose(1, 2).reshape(x.shape)
