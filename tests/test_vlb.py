"""The variational bound's reference (ddpm_fast.vlb): improved-diffusion's values at hand-checked
points, a direct float64 transcription of its formulas on random inputs, the decoder's 256 bin
probabilities summing to 1, KL of identical Gaussians, and a 1-D Gaussian toy whose exact reverse
model makes the bound equal the true NLL plus the prior's mismatch, which vanishes as T grows."""

import math

import numpy as np
import pytest
import torch

from ddpm_fast import vlb
from ddpm_fast.schedule import Schedule

# improved-diffusion's normal_kl(mean1, logvar1, mean2, logvar2), worked out with Python floats.
KL_POINTS = [
    ((0.0, 0.0, 1.0, 0.0), 0.5),
    ((1.0, math.log(2.0), 0.0, 0.0), 0.6534264097200273),
    ((0.3, -2.0, -0.1, -3.0), 1.9659838680845363),
    ((-0.5, 1.5, 0.25, -0.5), 2.6582309068497363),
]
# improved-diffusion's discretized_gaussian_log_likelihood(x, means, log_scales) (tanh CDF, 1e-12 clamp).
DECODER_POINTS = [
    ((0.0, 0.0, 0.0), -5.76705747360343),
    ((0.0, 0.1, -3.0), -4.773512845793784),
    ((-1.0, -0.9, -2.0), -1.43147729937292),
    ((1.0, 0.95, -4.0), -5.156597106096861),
    ((0.5, 0.2, -1.0), -5.100478962676354),
    ((-1.0, 0.5, -3.0), -27.631021115928547),  # the clamp: log 1e-12
]


@pytest.mark.parametrize(("args", "expected"), KL_POINTS)
def test_normal_kl_matches_improved_diffusion(args, expected):
    m1, l1, m2, l2 = (torch.tensor(v, dtype=torch.float64) for v in args)
    assert vlb.normal_kl(m1, l1, m2, l2).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(("args", "expected"), DECODER_POINTS)
def test_decoder_matches_improved_diffusion(args, expected):
    x, m, ls = (torch.tensor([v], dtype=torch.float64) for v in args)
    approx = vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=ls, cdf="approx")
    assert approx.item() == pytest.approx(expected, rel=1e-12)
    exact = vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=ls).item()
    if expected > -20:  # away from the clamp the tanh CDF's log-probability is within 1% of the exact one
        assert exact == pytest.approx(expected, rel=1e-2)
    else:  # the exact tail: log(Phi((-1 - 0.5 + 1/255) e^3)) is about -508 nats, not the clamp's -27.6
        z = (-1.5 + 1 / 255) * math.exp(3.0)
        assert exact == pytest.approx(float(torch.special.log_ndtr(torch.tensor(z, dtype=torch.float64))), rel=1e-12)


def test_kl_of_identical_gaussians_is_zero():
    g = torch.Generator().manual_seed(0)
    m, lv = torch.randn(1000, generator=g, dtype=torch.float64), 3 * torch.randn(1000, generator=g, dtype=torch.float64)
    # improved-diffusion's formula: (-1 + lv) - lv is -1 up to one rounding
    assert (vlb.normal_kl(m, lv, m, lv).abs() <= 1e-15 * lv.abs().clamp(min=1)).all()
    assert torch.equal(vlb.normal_kl(m, 0.0 * lv, m, 0.0 * lv), torch.zeros_like(m))
    assert (vlb.normal_kl(m, lv, m + 0.1, lv + 0.2) > 0).all()


@pytest.mark.parametrize("cdf", ["exact", "approx"])
def test_decoder_probabilities_over_the_256_bins_sum_to_one(cdf):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    g = torch.Generator().manual_seed(1)
    for mean, log_scale in zip(
        torch.rand(20, generator=g) * 2.4 - 1.2, torch.rand(20, generator=g) * 6 - 6, strict=True
    ):
        m = torch.full_like(bins, float(mean))
        ls = torch.full_like(bins, float(log_scale))
        p = vlb.discretized_gaussian_log_likelihood(bins, means=m, log_scales=ls, cdf=cdf).exp()
        # the tanh CDF telescopes too, up to its 1e-12 clamps (at most 256 of them)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12 if cdf == "exact" else 3e-10), (mean, log_scale)


def test_decoder_tails_keep_their_precision():
    """A bin 40 standard deviations out: the exact decoder gives log P ~ -800 nats (float64 log space),
    where a difference of CDFs would be 0 and its log -inf."""
    x = torch.tensor([0.4], dtype=torch.float64)
    for mean in (-0.4, 1.2):  # lower and upper tail
        m = torch.tensor([mean], dtype=torch.float64)
        ls = torch.tensor([math.log(0.02)], dtype=torch.float64)
        lp = vlb.discretized_gaussian_log_likelihood(x, means=m, log_scales=ls).item()
        z = abs(0.4 - mean) / 0.02
        assert -0.5 * (z + 1 / 255 / 0.02) ** 2 - 5 < lp < -0.5 * (z - 1 / 255 / 0.02) ** 2
        assert math.isfinite(lp)


def test_decoder_refuses_data_outside_the_8bit_range():
    x = torch.tensor([0.0, 1.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"8-bit data scaled to \[-1, 1\]"):
        vlb.discretized_gaussian_log_likelihood(x, means=x, log_scales=torch.zeros_like(x))
    with pytest.raises(ValueError, match="unknown cdf"):
        vlb.discretized_gaussian_log_likelihood(x.clamp(-1, 1), means=x, log_scales=x, cdf="tanh")


def _transcription(schedule, out, x0, x_t, t, prediction_type, variance_type):
    """improved-diffusion's _vb_terms_bpd (clip_denoised=False), transcribed in float64 numpy."""
    T = schedule.num_train_timesteps
    betas = schedule.betas.numpy()
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
    coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
    c = x0.shape[1]
    out, x0, x_t = out.numpy(), x0.numpy(), x_t.numpy()
    rows = []
    for i, ti in enumerate(t.tolist()):
        assert 0 <= ti < T
        eps_or, var = out[i, :c], out[i, c:]
        if prediction_type == "epsilon":
            pred_x0 = np.sqrt(1.0 / ab[ti]) * x_t[i] - np.sqrt(1.0 / ab[ti] - 1) * eps_or
        else:  # v
            pred_x0 = np.sqrt(ab[ti]) * x_t[i] - np.sqrt(1 - ab[ti]) * eps_or
        if variance_type == "learned_range":
            frac = (var + 1) / 2
            model_logvar = frac * np.log(betas[ti]) + (1 - frac) * post_logvar[ti]
        else:
            model_logvar = np.full_like(x_t[i], np.log(np.append(post_var[1], betas[1:]))[ti])  # fixed_large
        model_mean = coef1[ti] * pred_x0 + coef2[ti] * x_t[i]
        true_mean = coef1[ti] * x0[i] + coef2[ti] * x_t[i]
        kl = 0.5 * (
            -1.0
            + model_logvar
            - post_logvar[ti]
            + np.exp(post_logvar[ti] - model_logvar)
            + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
        )
        if ti > 0:
            rows.append(kl.mean() / np.log(2.0))
            continue
        centered, inv = x0[i] - model_mean, np.exp(-0.5 * model_logvar)
        cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
        plus, minus = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
        lp = np.where(
            x0[i] < -0.999,
            np.log(np.maximum(plus, 1e-12)),
            np.where(x0[i] > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))),
        )
        rows.append(-lp.mean() / np.log(2.0))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    ("prediction_type", "variance_type"), [("epsilon", "learned_range"), ("v_prediction", "learned_range"),
                                           ("epsilon", "fixed_large")])  # fmt: skip
def test_vlb_terms_equal_a_float64_transcription(prediction_type, variance_type):
    schedule = Schedule.from_config(num_train_timesteps=1000, beta_schedule="cosine")
    g = torch.Generator().manual_seed(2)
    n, c = 6, 3
    x0 = (torch.randint(0, 256, (n, c, 5, 4), generator=g) / 127.5 - 1).double()
    x_t = torch.randn(n, c, 5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    chans = 2 * c if variance_type == "learned_range" else c
    out = torch.randn(n, chans, 5, 4, generator=g, dtype=torch.float64) * 0.5
    if variance_type == "learned_range":
        out[:, c:] = out[:, c:].clamp(-1, 1)
    got = vlb.vlb_terms(
        schedule, out, x0, x_t, t, prediction_type=prediction_type, variance_type=variance_type, cdf="approx"
    )
    want = _transcription(schedule, out, x0, x_t, t, prediction_type, variance_type)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    exact = vlb.vlb_terms(schedule, out, x0, x_t, t, prediction_type=prediction_type, variance_type=variance_type)
    torch.testing.assert_close(exact[2:], got[2:], rtol=0, atol=0)  # KL terms: no CDF involved
    # the decoder: random x_t put x0 far in the tails, where the tanh CDF hits its 1e-12 clamp and the
    # exact one does not (test_decoder_tails_keep_their_precision): the exact terms are the larger
    assert (exact[:2] > got[:2]).all()


def test_prior_bpd_is_the_kl_to_the_standard_normal():
    schedule = Schedule.from_config()
    x0 = torch.tensor([[[[1.0, -1.0, 0.0, 0.5]]]], dtype=torch.float64)
    ab = schedule.alphas_cumprod[-1].item()
    kl = [0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * v * v) for v in (1.0, -1.0, 0.0, 0.5)]
    assert vlb.prior_bpd(schedule, x0).item() == pytest.approx(sum(kl) / 4 / math.log(2), rel=1e-10)
    assert vlb.prior_bpd(schedule, x0).item() < 1e-4  # ~0 for the default linear schedule


@pytest.mark.parametrize("num_steps", [10, 100, 1000])
def test_gaussian_toy_bound_converges_to_the_true_nll(num_steps):
    """Data x0 ~ N(mu, s^2) in one dimension. The exact reverse kernel q(x_{t-1} | x_t) is Gaussian:
    mean c1 E[x0 | x_t] + c2 x_t, variance beta~_t + c1^2 Var(x0 | x_t). A model giving exactly that
    (x0 prediction E[x0 | x_t], variance_type "learned" = that variance) makes the bound
    E[L_T + sum L_t + L_0] equal to -E log q(x0) + KL(q(x_T) || N(0, 1)) exactly, for any T; with
    diffusers' linear betas over T steps, alpha_bar_T -> 0 and the gap -> 0 as T grows. Expectations
    over (x0, x_t) by 3-point Gauss-Hermite quadrature (exact for the quadratic integrands)."""
    mu, s = 0.3, 0.4
    schedule = Schedule.from_config(num_train_timesteps=num_steps)
    ab = schedule.alphas_cumprod
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    z1, z2 = (torch.tensor(v, dtype=torch.float64) for v in np.meshgrid(nodes, nodes, indexing="ij"))
    w = torch.tensor(np.outer(weights, weights) / (2 * np.pi), dtype=torch.float64).flatten()
    x0 = (mu + s * z1).flatten()
    terms = torch.zeros(num_steps, dtype=torch.float64)
    for t in range(num_steps):
        a = ab[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * z2.flatten()
        var_t = a * s * s + 1 - a
        post_x0 = mu + a.sqrt() * s * s / var_t * (x_t - a.sqrt() * mu)  # E[x0 | x_t]
        var_x0 = s * s - a * s**4 / var_t  # Var(x0 | x_t)
        c1 = schedule.posterior_mean_coef1[t]
        variance = schedule.posterior_variance[t] + c1 * c1 * var_x0
        tt = torch.full((x0.numel(),), t)
        if t > 0:
            out = torch.stack([post_x0, variance.expand_as(post_x0)], 1).reshape(-1, 2, 1, 1)
            bits = vlb.vlb_terms(
                schedule,
                out,
                x0.reshape(-1, 1, 1, 1),
                x_t.reshape(-1, 1, 1, 1),
                tt,
                prediction_type="sample",
                variance_type="learned",
            )
            terms[t] = (w * bits).sum() * math.log(2)
        else:  # the continuous decoder -log N(x0; E[x0 | x_1], Var(x0 | x_1)) (c1 = 1, beta~_0 = 0)
            terms[t] = (w * (0.5 * torch.log(2 * math.pi * variance) + 0.5 * (x0 - post_x0) ** 2 / variance)).sum()
    prior = (w * vlb.prior_bpd(schedule, x0.reshape(-1, 1, 1, 1))).sum() * math.log(2)
    bound = terms.sum() + prior
    nll = 0.5 * math.log(2 * math.pi * s * s) + 0.5
    a_T = ab[-1]
    prior_gap = vlb.normal_kl(a_T.sqrt() * mu, torch.log(a_T * s * s + 1 - a_T), 0.0, 0.0)
    assert bound.item() == pytest.approx(nll + prior_gap.item(), abs=1e-9)
    if num_steps == 1000:
        assert bound.item() - nll < 1e-4


def test_vlb_terms_refuse_bad_inputs():
    schedule = Schedule.from_config()
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    out = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="8-bit data"):
        vlb.vlb_terms(schedule, out, x0 + 2, x0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="needs a model output with 1 channels"):
        vlb.vlb_terms(schedule, out, x0, x0, torch.tensor([3, 5]), variance_type="fixed_small")
    with pytest.raises(ValueError, match="unknown variance_type"):
        vlb.vlb_terms(schedule, out, x0, x0, torch.tensor([3, 5]), variance_type="learnt")


class _ToyModel(torch.nn.Module):
    """eps = 0.1 x_t + 0.01 t, variance values tanh(x_t) (learned_range): a fixed function of (x_t, t)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        eps = self.w * x + 0.01 * t.reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x)], 1)


def test_bpd_terms_full_and_strided():
    from ddpm_fast.likelihood import bits_per_dim, bpd_column_names, bpd_terms, bpd_timesteps

    schedule = Schedule.from_config(num_train_timesteps=20)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=g) / 127.5 - 1
    model = _ToyModel()
    kw = dict(prediction_type="epsilon", variance_type="learned_range")
    full = bpd_terms(model, x0, schedule, generator=torch.Generator().manual_seed(0), **kw)
    assert full.shape == (3, 21) and full.dtype == torch.float64
    assert bpd_column_names(20)[:2] == ["prior", "L_1"] and bpd_column_names(20)[-1] == "decoder"
    # the same draws, term by term through the float64 reference
    draws = torch.Generator().manual_seed(0)
    want = [vlb.prior_bpd(schedule, x0)]
    for t_value in [*range(1, 20), 0]:
        noise = torch.randn(x0.shape, generator=draws)
        t = torch.full((3,), t_value)
        ab = schedule.alphas_cumprod[t_value]
        x_t = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
        out = model(x_t, t).detach()
        want.append(vlb.vlb_terms(schedule, out.double(), x0.double(), x_t.double(), t, clip_denoised=True))
    want = torch.stack(want, 1)  # prior, L_1..L_19, decoder
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-7)
    # stride 4: t = 1, 5, 9, 13, 17 with weights 4, 4, 4, 4, 3 (they cover t = 1..19)
    ts, weights = bpd_timesteps(20, 4)
    assert ts.tolist() == [1, 5, 9, 13, 17] and weights.tolist() == [4, 4, 4, 4, 3]
    strided = bpd_terms(model, x0, schedule, t_stride=4, generator=torch.Generator().manual_seed(0), **kw)
    assert strided.shape == (3, 7)
    torch.testing.assert_close(strided[:, 1], 4 * full[:, 1], rtol=1e-6, atol=0)  # same first draw (t = 1)
    result = bits_per_dim(model, x0, schedule, batch_size=2, t_stride=4, **kw)
    assert result["num_images"] == 3 and result["timesteps_evaluated"] == 5
    assert result["bpd"] == pytest.approx(result["prior"] + result["kl"] + result["decoder"])
    assert list(result["terms"]) == ["L_1", "L_5", "L_9", "L_13", "L_17"]
    with pytest.raises(ValueError, match="8-bit data"):
        bpd_terms(model, x0 * 2, schedule, **kw)
