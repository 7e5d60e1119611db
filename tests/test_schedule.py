"""Tests for ddpm_fast.schedule: beta schedules, the coefficient table, timestep selection, configs.

diffusers is a test-only dependency: the tests that compare with it take the ``diffusers`` fixture
(conftest.py) and skip when it is missing.
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from ddpm_fast.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    VARIANCE_TYPES,
    Schedule,
    SchedulerConfig,
    StepConfig,
    make_betas,
    select_timesteps,
)

T = 1000


def schedule_kwargs(beta_schedule, zero_snr=False):
    kw = {"beta_schedule": beta_schedule, "rescale_betas_zero_snr": zero_snr}
    if beta_schedule == "scaled_linear":  # Stable Diffusion's range
        kw.update(beta_start=0.00085, beta_end=0.012)
    if zero_snr:
        kw["prediction_type"] = "v_prediction"
    return kw


# ---------------------------------------------------------------- the forward process q(x_T | x_0)
def test_linear_schedule_terminal_distribution():
    # Ho et al.'s linear schedule (1e-4 .. 0.02, T = 1000): q(x_T | x_0) = N(0.006353 x_0, 0.99996 I).
    s = Schedule.from_config(SchedulerConfig())
    assert s.alphas_cumprod.dtype == torch.float64
    assert s.sqrt_alphas_cumprod[-1].item() == pytest.approx(0.006353, abs=5e-7)
    assert (1 - s.alphas_cumprod[-1]).item() == pytest.approx(0.99996, abs=5e-6)
    assert s.sqrt_one_minus_alphas_cumprod[-1].item() ** 2 == pytest.approx(0.99996, abs=5e-6)
    # and at the other end almost no noise: a_bar_0 = 1 - beta_0
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-12)


def test_alphas_cumprod_is_the_product_of_alphas():
    s = Schedule.from_config(SchedulerConfig(beta_schedule="sigmoid"))
    for t in (0, 1, 2, 500, 999):
        expected = math.prod(1 - b for b in s.betas[: t + 1].tolist())
        assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-12)
    ab = np.prod(1 - s.betas.numpy())
    assert s.alphas_cumprod[-1].item() == pytest.approx(ab, rel=1e-12)


# ---------------------------------------------------------------- beta schedules vs diffusers
@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid"])
def test_betas_match_diffusers(diffusers, beta_schedule, zero_snr):
    kw = schedule_kwargs(beta_schedule, zero_snr)
    ours = Schedule.from_config(SchedulerConfig(**kw))
    theirs = diffusers.DDPMScheduler(**{**kw, "beta_schedule": ours.config.beta_schedule})
    # diffusers builds betas in float32; with zero SNR its rescaling (differences of fp32 square roots)
    # loses a few more digits near t = T.
    beta_atol = 1e-5 if zero_snr else 1e-6
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=0, atol=beta_atol)
    a, b = ours.alphas_cumprod, theirs.alphas_cumprod.double()
    nonzero = b > 0
    rel = ((a - b).abs()[nonzero] / b[nonzero]).max().item()
    assert rel < 1e-4
    assert torch.equal(a == 0, b == 0)
    assert ours.zero_terminal_snr == zero_snr
    if zero_snr:
        assert ours.alphas_cumprod[-1].item() == 0.0
        assert ours.betas[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert ours.snr[-1].item() == 0.0
    else:
        assert ours.alphas_cumprod[-1].item() > 0


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_scheduler_builds_the_same_table(diffusers, beta_schedule):
    kw = schedule_kwargs(beta_schedule)
    ddpm = diffusers.DDPMScheduler(**kw)
    ddim = diffusers.DDIMScheduler(**kw)
    assert torch.equal(ddpm.alphas_cumprod, ddim.alphas_cumprod)
    ours = Schedule.from_config(SchedulerConfig.from_dict(dict(ddim.config)))
    torch.testing.assert_close(ours.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_zero_snr_rescaling_float64(beta_schedule):
    # Lin et al. 2023, Algorithm 1, written out in float64: sqrt(a_bar) shifted to end at 0, scaled to keep
    # its first value.
    plain = make_betas(SchedulerConfig(**schedule_kwargs(beta_schedule)))
    sqrt_ab = np.sqrt(np.cumprod(1 - plain))
    rescaled = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
    s = Schedule.from_config(SchedulerConfig(**schedule_kwargs(beta_schedule, zero_snr=True)))
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), rescaled, rtol=1e-10, atol=1e-15)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - plain[0], rel=1e-12)


def test_beta_schedule_formulas():
    lin = make_betas(SchedulerConfig(beta_start=1e-4, beta_end=0.02))
    np.testing.assert_allclose(lin[[0, 1, -1]], [1e-4, 1e-4 + (0.02 - 1e-4) / 999, 0.02], rtol=1e-12)
    sl = make_betas(SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    np.testing.assert_allclose(np.sqrt(sl), np.linspace(0.00085**0.5, 0.012**0.5, T), rtol=1e-12)
    cos = make_betas(SchedulerConfig(beta_schedule="cosine"))

    def f(t):  # Nichol & Dhariwal eq. 17 with s = 0.008
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    assert cos[0] == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert cos[500] == pytest.approx(1 - f(501) / f(500), rel=1e-12)
    assert cos[-1] == pytest.approx(0.999)  # capped at max_beta
    assert cos.max() <= 0.999
    sig = make_betas(SchedulerConfig(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02))
    assert sig[T // 2] == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(-6 / 999)), rel=1e-12)
    assert np.all(np.diff(sig) > 0)


def test_trained_betas():
    betas = np.linspace(1e-3, 0.05, 20)
    s = Schedule.from_config(SchedulerConfig(num_train_timesteps=20, trained_betas=betas.tolist()))
    np.testing.assert_array_equal(s.betas.numpy(), betas)
    assert isinstance(s.config.trained_betas, tuple)
    with pytest.raises(ValueError, match="trained_betas"):
        Schedule.from_config(SchedulerConfig(num_train_timesteps=21, trained_betas=betas.tolist()))
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_config(SchedulerConfig(num_train_timesteps=2, trained_betas=[0.1, 1.5]))


def test_trained_betas_match_diffusers(diffusers):
    betas = np.linspace(1e-3, 0.05, 20).tolist()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=20, trained_betas=betas)
    ours = Schedule.from_config(SchedulerConfig.from_dict(dict(theirs.config)))
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=0, atol=1e-8)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- derived coefficients
def improved_diffusion_table(betas):
    """GaussianDiffusion.__init__ of improved-diffusion (Nichol & Dhariwal), in float64 numpy."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "alphas": alphas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.append(pv[1], pv[1:])),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "snr": ac / (1.0 - ac),
    }


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_table_matches_improved_diffusion(beta_schedule):
    s = Schedule.from_config(SchedulerConfig(**schedule_kwargs(beta_schedule)))
    expected = improved_diffusion_table(s.betas.numpy())
    for name, value in expected.items():
        got = getattr(s, name)
        assert got.dtype == torch.float64 and got.shape == (T,), name
        np.testing.assert_allclose(got.numpy(), value, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 998, 999])
def test_posterior_is_gaussian_conditioning(t):
    # q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0:
    #   x_{t-1} = sqrt(ab_{t-1}) x_0 + sqrt(1 - ab_{t-1}) e1,  x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) e2,
    #   var = Var(x_{t-1}) - Cov^2 / Var(x_t),  mean = E[x_{t-1}] + Cov / Var(x_t) (x_t - E[x_t]).
    s = Schedule.from_config(SchedulerConfig(beta_schedule="cosine"))
    ab_prev, ab, a = s.alphas_cumprod[t - 1].item(), s.alphas_cumprod[t].item(), s.alphas[t].item()
    var_prev, var_t, cov = 1 - ab_prev, 1 - ab, math.sqrt(a) * (1 - ab_prev)
    k = cov / var_t
    assert s.posterior_variance[t].item() == pytest.approx(var_prev - cov * k, rel=1e-9)
    assert s.posterior_mean_coef2[t].item() == pytest.approx(k, rel=1e-12)
    assert s.posterior_mean_coef1[t].item() == pytest.approx(math.sqrt(ab_prev) - k * math.sqrt(ab), rel=1e-9)
    # beta~_t <= beta_t
    assert s.posterior_variance[t].item() <= s.betas[t].item()


def test_derived_coefficient_definitions():
    s = Schedule.from_config(SchedulerConfig())
    ab = s.alphas_cumprod
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], ab[:-1], rtol=0, atol=0)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2, ab, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones_like(ab))
    torch.testing.assert_close(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, torch.ones_like(ab))
    torch.testing.assert_close(s.sqrt_recipm1_alphas_cumprod**2, 1 / s.snr, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.snr, ab / (1 - ab), rtol=1e-14, atol=0)
    # beta~_0 = 0 (q(x_0 | x_1, x_0) is a point mass); the clipped log repeats t = 1's value there
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == s.posterior_log_variance_clipped[1].item()
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log(), rtol=1e-14, atol=0)
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    # a noiseless x_t = sqrt(ab_t) x_0 has the posterior mean sqrt(ab_{t-1}) x_0
    mean_of_noiseless = s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod
    torch.testing.assert_close(mean_of_noiseless, s.alphas_cumprod_prev.sqrt(), rtol=1e-12, atol=0)
    # the SNR decreases monotonically
    assert torch.all(s.snr[1:] < s.snr[:-1])


def test_kernel_table_casts_and_caches():
    s = Schedule.from_config(SchedulerConfig())
    k = s.kernel_table("posterior_mean_coef1", torch.float32)
    assert k.dtype == torch.float32 and k.is_contiguous() and k.shape == (T,)
    torch.testing.assert_close(k, s.posterior_mean_coef1.float(), rtol=0, atol=0)
    assert s.kernel_table("posterior_mean_coef1", torch.float32) is k
    assert s.kernel_table("posterior_mean_coef1", torch.bfloat16).dtype == torch.bfloat16


def test_kernel_table_after_replace_reflects_new_table():
    s = Schedule.from_config(SchedulerConfig())
    s.kernel_table("alphas_cumprod")
    new = s.alphas_cumprod * 0.5
    s2 = dataclasses.replace(s, alphas_cumprod=new)
    torch.testing.assert_close(s2.kernel_table("alphas_cumprod"), new.float(), rtol=0, atol=0)


def test_zero_snr_table_is_finite_where_used():
    s = Schedule.from_config(SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    assert s.zero_terminal_snr
    assert s.alphas_cumprod[-1].item() == 0.0 and s.sqrt_one_minus_alphas_cumprod[-1].item() == 1.0
    assert torch.isfinite(s.posterior_variance).all()
    assert torch.isfinite(s.posterior_mean_coef1).all() and torch.isfinite(s.posterior_mean_coef2).all()
    assert torch.isinf(s.sqrt_recip_alphas_cumprod[-1])


def test_from_config_variants():
    a = Schedule.from_config(beta_schedule="cosine", num_train_timesteps=50)
    b = Schedule.from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 50, "_class_name": "X"})
    c = Schedule.from_config(SchedulerConfig(), beta_schedule="cosine", num_train_timesteps=50)
    d = Schedule.from_config({"num_train_timesteps": 10}, num_train_timesteps=50, beta_schedule="cosine")
    for s in (b, c, d):
        assert s.config == a.config
        torch.testing.assert_close(s.alphas_cumprod, a.alphas_cumprod, rtol=0, atol=0)
    assert a.num_train_timesteps == 50 and a.betas.shape == (50,)
    assert a.final_alpha_cumprod == 1.0
    e = Schedule.from_config(set_alpha_to_one=False)
    assert e.final_alpha_cumprod == pytest.approx(1 - 1e-4, abs=1e-15)
    assert e.to("cpu") is e and e.device == torch.device("cpu")


# ---------------------------------------------------------------- timesteps
N_STEPS = (1, 10, 50, 999, 1000)


def ts_cases():
    for spacing in TIMESTEP_SPACINGS:
        for offset in (0, 1):
            for n in N_STEPS:
                yield pytest.param(spacing, offset, n, id=f"{spacing}-off{offset}-n{n}")


@pytest.mark.parametrize("spacing, offset, n", list(ts_cases()))
def test_timesteps_match_diffusers(diffusers, spacing, offset, n):
    kw = {"timestep_spacing": spacing, "steps_offset": offset}
    s = Schedule.from_config(SchedulerConfig(**kw))
    if spacing == "leading" and offset + (n - 1) * (T // n) >= T:
        # diffusers returns timestep T here (out of the table); we refuse
        with pytest.raises(ValueError, match="steps_offset"):
            s.timesteps(n)
        return
    ours = s.timesteps(n)
    assert ours.dtype == torch.int64
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        sched = cls(**kw)
        sched.set_timesteps(n)
        assert torch.equal(ours, sched.timesteps), cls.__name__
    assert ours.numel() == n
    assert ours.min() >= 0 and ours.max() < T
    assert torch.all(ours[1:] < ours[:-1])


def test_timesteps_default_is_every_step():
    s = Schedule.from_config(SchedulerConfig(num_train_timesteps=30))
    assert torch.equal(s.timesteps(), torch.arange(29, -1, -1))
    assert torch.equal(s.previous_timesteps(s.timesteps()), torch.arange(28, -2, -1))


def test_timesteps_known_values():
    s = Schedule.from_config(SchedulerConfig(steps_offset=1))
    assert s.timesteps(4).tolist() == [751, 501, 251, 1]
    s = Schedule.from_config(SchedulerConfig(timestep_spacing="trailing"))
    assert s.timesteps(4).tolist() == [999, 749, 499, 249]
    s = Schedule.from_config(SchedulerConfig(timestep_spacing="linspace"))
    assert s.timesteps(4).tolist() == [999, 666, 333, 0]


def test_trailing_timesteps_are_n_valid_steps():
    """diffusers' float np.arange gives n+1 trailing timesteps ending in -1 for T=1000 and
    n = 61, 103, ..., 998; ours keeps the first n (identical to diffusers' first n)."""
    s = Schedule.from_config(SchedulerConfig(timestep_spacing="trailing"))
    for n in (61, 103, 998):
        ts = s.timesteps(n)
        assert ts.numel() == n and ts.min() >= 0, (n, ts[-3:].tolist())


CUSTOM = ([999, 700, 400, 100, 10, 0], [900, 500, 37], [5], list(range(999, -1, -111)))


@pytest.mark.parametrize("custom", CUSTOM, ids=lambda c: f"len{len(c)}-last{c[-1]}")
def test_custom_timesteps_match_diffusers(diffusers, custom):
    s = Schedule.from_config(SchedulerConfig())
    ours = s.timesteps(custom=custom)
    sched = diffusers.DDPMScheduler()
    sched.set_timesteps(timesteps=custom)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, sched.timesteps)
    prev = s.previous_timesteps(ours, "ddpm")
    for t, p in zip(ours.tolist(), prev.tolist(), strict=True):
        assert p == int(sched.previous_timestep(t)), t


@pytest.mark.parametrize(
    "custom",
    [[1, 2, 3], [10, 10, 5], [1000, 5], [5, -1], [], [[3, 2], [1, 0]]],
    ids=["ascending", "repeated", "too_large", "negative", "empty", "2d"],
)
def test_invalid_custom_timesteps(custom):
    s = Schedule.from_config(SchedulerConfig())
    with pytest.raises(ValueError):
        s.timesteps(custom=custom)


@pytest.mark.parametrize("n", [0, -3, T + 1])
def test_invalid_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        select_timesteps(SchedulerConfig(), n)


def test_steps_and_custom_together_rejected():
    with pytest.raises(ValueError):
        select_timesteps(SchedulerConfig(), 10, [9, 5, 1])


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_previous_timesteps_ddpm_match_diffusers(diffusers, spacing, n):
    s = Schedule.from_config(SchedulerConfig(timestep_spacing=spacing))
    sched = diffusers.DDPMScheduler(timestep_spacing=spacing)
    sched.set_timesteps(n)
    ts = s.timesteps(n)
    prev = s.previous_timesteps(ts, "ddpm")
    assert prev.dtype == torch.int64 and prev.shape == ts.shape
    assert prev[-1].item() == -1
    for t, p in zip(ts.tolist(), prev.tolist(), strict=True):
        assert p == int(sched.previous_timestep(t)), t


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 3, 7, 50, 999, 1000])
def test_previous_timesteps_ddim(spacing, n):
    s = Schedule.from_config(SchedulerConfig(timestep_spacing=spacing))
    ts = s.timesteps(n)
    prev = s.previous_timesteps(ts, "ddim")
    # diffusers' DDIMScheduler.step: prev_timestep = t - T // n, a negative value means "use final_alpha_cumprod"
    expected = [t - T // n if t - T // n >= 0 else -1 for t in ts.tolist()]
    assert prev.tolist() == expected
    assert prev.dtype == torch.int64
    assert prev[-1].item() == -1 or spacing == "trailing"


def test_previous_timesteps_unknown_kind():
    s = Schedule.from_config(SchedulerConfig())
    with pytest.raises(ValueError, match="ddpm, ddim"):
        s.previous_timesteps(s.timesteps(10), "euler")


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "clip_sample": False,
            "thresholding": True,
            "sample_max_value": 2.5,
            "dynamic_thresholding_ratio": 0.9,
        },
        {"rescale_betas_zero_snr": True, "prediction_type": "sample", "clip_sample_range": 2.0},
    ],
    ids=["default", "cosine_v", "sd", "zero_snr"],
)
@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
def test_config_round_trip_with_diffusers(diffusers, cls_name, kw):
    cls = getattr(diffusers, cls_name)
    extra = {"variance_type": "learned_range"} if cls_name == "DDPMScheduler" else {"set_alpha_to_one": False}
    sched = cls(**kw, **extra)
    theirs = dict(sched.config)
    assert any(k.startswith("_") for k in theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every non-private key of both schedulers is known
        cfg = SchedulerConfig.from_dict(theirs)
    ours = cfg.to_dict()
    for key, value in theirs.items():
        if not key.startswith("_"):
            assert ours[key] == value, key
    # and back: diffusers rebuilds the same scheduler from our dict
    again = cls.from_config(ours)
    for key, value in theirs.items():
        if not key.startswith("_"):
            assert again.config[key] == value, key
    assert SchedulerConfig.from_dict(ours) == cfg


def test_from_dict_warns_about_unknown_keys():
    with pytest.warns(UserWarning, match="frobnicate"):
        cfg = SchedulerConfig.from_dict({"frobnicate": 3, "_class_name": "DDPMScheduler", "steps_offset": 1})
    assert cfg.steps_offset == 1


@pytest.mark.parametrize(
    "field, bad, valid",
    [
        ("beta_schedule", "quadratic", BETA_SCHEDULES),
        ("prediction_type", "noise", PREDICTION_TYPES),
        ("variance_type", "fixed_large_log", VARIANCE_TYPES),
        ("timestep_spacing", "middle", TIMESTEP_SPACINGS),
    ],
)
def test_unknown_names_list_the_valid_ones(field, bad, valid):
    for build in (lambda: SchedulerConfig(**{field: bad}), lambda: SchedulerConfig.from_dict({field: bad})):
        with pytest.raises(ValueError) as exc:
            build()
        msg = str(exc.value)
        assert bad in msg and field in msg
        for name in valid:
            assert name in msg


@pytest.mark.parametrize(
    "field, alias, name",
    [
        ("beta_schedule", "cosine", "squaredcos_cap_v2"),
        ("prediction_type", "eps", "epsilon"),
        ("prediction_type", "x0", "sample"),
        ("prediction_type", "v", "v_prediction"),
    ],
)
def test_aliases_are_normalised(field, alias, name):
    cfg = SchedulerConfig(**{field: alias})
    assert getattr(cfg, field) == name
    assert cfg == SchedulerConfig(**{field: name})
    assert SchedulerConfig.from_dict({field: alias}).to_dict()[field] == name
    if field == "prediction_type":
        assert StepConfig(prediction_type=alias).prediction_type == name


def test_zero_snr_requires_v_or_sample():
    with pytest.raises(ValueError, match="v_prediction"):
        SchedulerConfig(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError):
        SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="eps")
    for pt in ("v_prediction", "sample"):
        assert SchedulerConfig(rescale_betas_zero_snr=True, prediction_type=pt).rescale_betas_zero_snr


def test_scheduler_config_value_checks():
    with pytest.raises(ValueError):
        SchedulerConfig(num_train_timesteps=0)
    with pytest.raises(ValueError):
        SchedulerConfig(dynamic_thresholding_ratio=0.0)
    with pytest.raises(ValueError):
        SchedulerConfig(dynamic_thresholding_ratio=1.5)


def test_step_config_checks():
    with pytest.raises(ValueError, match="eta"):
        StepConfig(kind="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        StepConfig(kind="ddim", eta=-0.1)
    with pytest.raises(ValueError) as exc:
        StepConfig(kind="euler")
    assert "ddpm" in str(exc.value) and "ddim" in str(exc.value)
    with pytest.raises(ValueError):
        StepConfig(variance_type="fixed_large_log")
    with pytest.raises(ValueError):
        StepConfig(clip_sample_range=0.0)
    with pytest.raises(ValueError):
        StepConfig(sample_max_value=-1.0)
    assert StepConfig(kind="ddim", eta=1.0).eta == 1.0
    assert StepConfig(kind="ddpm", eta=0.0).kind == "ddpm"


def test_step_config_from_scheduler():
    cfg = SchedulerConfig(
        prediction_type="v",
        variance_type="learned_range",
        clip_sample=False,
        clip_sample_range=2.0,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
    )
    step = StepConfig.from_scheduler(cfg, "ddpm")
    assert step == StepConfig(
        kind="ddpm",
        prediction_type="v_prediction",
        variance_type="learned_range",
        clip_sample=False,
        clip_sample_range=2.0,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
    )
    assert step.learned_variance
    ddim = StepConfig.from_scheduler(cfg, "ddim", eta=0.5, use_clipped_model_output=True, clip_sample=True)
    assert (ddim.kind, ddim.eta, ddim.use_clipped_model_output, ddim.clip_sample) == ("ddim", 0.5, True, True)
    assert ddim.sample_max_value == 3.0
    with pytest.raises(ValueError):
        StepConfig.from_scheduler(cfg, "ddpm", eta=0.5)
    assert not StepConfig.from_scheduler(SchedulerConfig(), "ddpm").learned_variance
