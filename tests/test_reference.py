"""The oracle (ddpm_fast.reference) against diffusers' DDPMScheduler / DDIMScheduler and plain torch.

Conformance tests run the diffusers scheduler and ``reference.posterior_step`` step by step on the
same fp32 inputs with the same noise. To compare the step maths at ~1e-6 they replace our float64
table with diffusers' float32 one; separate tests use our own table with a tolerance derived from
the difference of the two tables. diffusers is a test-only dependency: those tests skip without it.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import reference
from ddpm_fast.schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule, SchedulerConfig, StepConfig

SHAPE = (2, 3, 8, 8)
C = SHAPE[1]
T = 1000


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def assert_step_close(ours, theirs, rtol=1e-5, atol=1e-6):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.isfinite(theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * max(1.0, theirs.abs().max().item()))


def tvec(t, n=SHAPE[0]):
    return torch.full((n,), int(t), dtype=torch.int64)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def step_inputs(seed, variance_type=None, shape=SHAPE, scale=1.0):
    """(model_output, sample) in fp32; learned variances get 2C channels: the variance itself
    (positive) for 'learned', an interpolation fraction in [-1, 1] for 'learned_range'."""
    g = gen(seed)
    sample = scale * torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    if variance_type == "learned":
        out = torch.cat([out, 1e-4 + 0.05 * torch.rand(shape, generator=g)], dim=1)
    elif variance_type == "learned_range":
        out = torch.cat([out, 2 * torch.rand(shape, generator=g) - 1], dim=1)
    return out, sample


def setup(diffusers, kind, n=None, custom=None, diffusers_table=True, **kw):
    """The diffusers scheduler after set_timesteps, our config, schedule, timesteps and prev_t."""
    sched = (diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler)(**kw)
    if custom is not None:
        sched.set_timesteps(timesteps=custom)
    else:
        sched.set_timesteps(n)
    cfg = SchedulerConfig.from_dict(dict(sched.config))
    schedule = Schedule.from_config(cfg)
    if diffusers_table:
        changes = {"alphas_cumprod": sched.alphas_cumprod.double()}
        if kind == "ddim":
            changes["final_alpha_cumprod"] = float(sched.final_alpha_cumprod)
        schedule = dataclasses.replace(schedule, **changes)
    timesteps = schedule.timesteps(n, custom)
    assert torch.equal(timesteps, sched.timesteps)
    return sched, cfg, schedule, timesteps, schedule.previous_timesteps(timesteps, kind)


def diffusers_step(sched, kind, out, t, sample, seed, eta=0.0, use_clipped_model_output=False):
    kwargs = {"eta": eta, "use_clipped_model_output": use_clipped_model_output} if kind == "ddim" else {}
    res = sched.step(out, int(t), sample, generator=gen(seed), **kwargs)
    return res.prev_sample, res.pred_original_sample


def compare_step(
    sched,
    cfg,
    schedule,
    timesteps,
    prev,
    i,
    *,
    kind="ddpm",
    seed=0,
    variance_type=None,
    eta=0.0,
    use_clipped_model_output=False,
    scale=1.0,
    **tol,
):
    out, sample = step_inputs(seed + 100 * i, variance_type, scale=scale)
    t = timesteps[i]
    theirs = diffusers_step(sched, kind, out, t, sample, seed, eta, use_clipped_model_output)
    if kind == "ddpm":
        step = StepConfig.from_scheduler(cfg, "ddpm")
    else:
        step = StepConfig.from_scheduler(cfg, "ddim", eta=eta, use_clipped_model_output=use_clipped_model_output)
    noise = torch.randn(SHAPE, generator=gen(seed))  # what diffusers draws (after the variance split)
    ours = reference.posterior_step(out, sample, tvec(t), tvec(prev[i]), schedule, step, noise=noise)
    assert_step_close(ours[0], theirs[0], **tol)
    assert_step_close(ours[1], theirs[1], **tol)
    return ours, theirs


# ---------------------------------------------------------------- DDPM steps
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_step_matches_diffusers(diffusers, prediction_type, variance_type, clip):
    args = setup(
        diffusers, "ddpm", n=50, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip
    )
    for i in (0, 1, 25, 48, 49):  # first, middle, the last step with t > 0, the last step (t = 0)
        compare_step(*args, i, seed=i, variance_type=variance_type)


@pytest.mark.parametrize("sample_max_value", [1.5, 3.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_step_thresholding_matches_diffusers(diffusers, prediction_type, sample_max_value):
    sched, cfg, schedule, ts, prev = setup(
        diffusers, "ddpm", n=20, prediction_type=prediction_type, thresholding=True, sample_max_value=sample_max_value
    )
    for i in (0, 10, 19):
        (_, x0), _ = compare_step(sched, cfg, schedule, ts, prev, i, seed=0, scale=1.5)
        # the thresholds were active: the quantile exceeded 1, so x_0 was rescaled, not only clipped
        out, sample = step_inputs(100 * i, scale=1.5)  # compare_step's inputs
        a = schedule.alphas_cumprod[ts[i]].float()
        raw = reference.predict_x0(out, sample, a, prediction_type)
        assert (torch.quantile(raw.flatten(1).abs(), 0.995, dim=1) > 1).all()
        assert x0.abs().max() <= 1.0 + 1e-6
        assert not torch.allclose(x0, raw.clamp(-1, 1))


@pytest.mark.parametrize("clip_sample_range", [0.5, 2.0])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_clip_sample_range_matches_diffusers(diffusers, kind, clip_sample_range):
    args = setup(diffusers, kind, n=10, prediction_type="sample", clip_sample_range=clip_sample_range)
    for i in (0, 5, 9):
        (_, x0), _ = compare_step(*args, i, kind=kind, seed=i, eta=0.5 if kind == "ddim" else 0.0)
        assert x0.abs().max().item() == pytest.approx(clip_sample_range)


@pytest.mark.parametrize("scale", [0.2, 0.6, 1.5, 5.0])
@pytest.mark.parametrize("sample_max_value", [1.5, 3.0])
def test_dynamic_threshold_matches_diffusers(diffusers, sample_max_value, scale):
    sched = diffusers.DDPMScheduler(thresholding=True, sample_max_value=sample_max_value)
    x0 = scale * torch.randn(SHAPE, generator=gen(2))
    ours = reference.dynamic_threshold(x0, 0.995, sample_max_value)
    torch.testing.assert_close(ours, sched._threshold_sample(x0), rtol=1e-6, atol=1e-7)
    s = torch.quantile(x0.flatten(1).abs(), 0.995, dim=1)
    if (s <= 1).all():  # s is clamped to at least 1: plain clipping to [-1, 1]
        torch.testing.assert_close(ours, x0.clamp(-1, 1), rtol=0, atol=0)
    else:
        assert ours.abs().max() <= 1 and not torch.allclose(ours, x0.clamp(-1, 1))


SPACING_CASES = [
    (spacing, offset, n)
    for spacing in ("leading", "linspace", "trailing")
    for offset in (0, 1)
    for n in (50, T)
    if not (spacing == "leading" and offset == 1 and n == T)  # would give timestep T (refused, see test_schedule)
]


@pytest.mark.parametrize("spacing, offset, n", SPACING_CASES)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_spacings_match_diffusers(diffusers, kind, spacing, offset, n):
    kw = {"timestep_spacing": spacing, "steps_offset": offset, "prediction_type": "epsilon"}
    if kind == "ddim":
        kw["set_alpha_to_one"] = False
    args = setup(diffusers, kind, n=n, **kw)
    eta = 1.0 if kind == "ddim" else 0.0
    for i in (0, 1, n // 2, n - 2, n - 1):
        compare_step(*args, i, kind=kind, seed=i, eta=eta)


CUSTOM = ([999, 700, 400, 100, 10, 0], [900, 500, 37], [999], [640, 639, 2, 1])


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("custom", CUSTOM, ids=lambda c: "-".join(map(str, c)))
def test_ddpm_custom_timesteps_match_diffusers(diffusers, custom, variance_type):
    args = setup(diffusers, "ddpm", custom=custom, variance_type=variance_type, prediction_type="v_prediction")
    for i in range(len(custom)):
        compare_step(*args, i, seed=i, variance_type=variance_type)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddpm_zero_terminal_snr_matches_diffusers(diffusers, prediction_type, variance_type):
    args = setup(
        diffusers,
        "ddpm",
        n=10,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type=prediction_type,
        variance_type=variance_type,
    )
    assert args[2].alphas_cumprod[args[3][0]].item() == 0.0  # the first step starts from pure noise
    for i in range(10):
        compare_step(*args, i, seed=i, variance_type=variance_type)


def test_ddpm_last_step_adds_no_noise(diffusers):
    sched, cfg, schedule, ts, prev = setup(diffusers, "ddpm", n=10)
    assert ts[-1].item() == 0
    out, sample = step_inputs(3)
    step = StepConfig.from_scheduler(cfg, "ddpm")
    without = reference.posterior_step(out, sample, tvec(0), tvec(-1), schedule, step)  # noise not needed
    with_noise = reference.posterior_step(out, sample, tvec(0), tvec(-1), schedule, step, noise=torch.randn(SHAPE))
    theirs = diffusers_step(sched, "ddpm", out, 0, sample, seed=0)
    assert_step_close(without[0], theirs[0])
    assert torch.equal(without[0], with_noise[0])
    # at t = 0 with a_bar_prev = 1 the posterior mean is the clipped x_0
    assert_step_close(without[0], without[1])


# ---------------------------------------------------------------- DDIM steps
@pytest.mark.parametrize("use_clipped", [False, True], ids=["eps", "clipped_eps"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False], ids=["alpha1", "alpha0"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_matches_diffusers(diffusers, prediction_type, clip, eta, set_alpha_to_one, use_clipped):
    args = setup(
        diffusers, "ddim", n=10, prediction_type=prediction_type, clip_sample=clip, set_alpha_to_one=set_alpha_to_one
    )
    for i in (0, 4, 9):  # 9: the last step, with final_alpha_cumprod
        compare_step(*args, i, kind="ddim", seed=i, eta=eta, use_clipped_model_output=use_clipped, scale=1.5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("sample_max_value", [1.5, 3.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_thresholding_matches_diffusers(diffusers, prediction_type, sample_max_value, eta):
    args = setup(
        diffusers,
        "ddim",
        n=10,
        prediction_type=prediction_type,
        thresholding=True,
        sample_max_value=sample_max_value,
        set_alpha_to_one=False,
    )
    for i in (0, 5, 9):
        compare_step(*args, i, kind="ddim", seed=i, eta=eta, use_clipped_model_output=True, scale=1.5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_zero_terminal_snr_matches_diffusers(diffusers, prediction_type, eta):
    args = setup(
        diffusers,
        "ddim",
        n=10,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type=prediction_type,
    )
    for i in range(10):
        compare_step(*args, i, kind="ddim", seed=i, eta=eta)


def test_ddim_zero_terminal_snr_eta1_first_step_is_finite():
    # From a_bar_t = 0 with eta = 1, sigma^2 = 1 - a_bar_prev: the direction term sqrt(1 - a_bar_prev - sigma^2)
    # is 0 (diffusers' fp32 gets a tiny negative number under the root and returns NaN; we clamp).
    cfg = SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    schedule = Schedule.from_config(cfg)
    ts = schedule.timesteps(10)
    prev = schedule.previous_timesteps(ts, "ddim")
    step = StepConfig.from_scheduler(cfg, "ddim", eta=1.0)
    out, sample = step_inputs(0)
    noise = torch.randn(SHAPE, generator=gen(1))
    prev_sample, x0 = reference.posterior_step(out, sample, tvec(ts[0]), tvec(prev[0]), schedule, step, noise=noise)
    assert torch.isfinite(prev_sample).all()
    a_prev = schedule.alphas_cumprod[prev[0]].float()
    torch.testing.assert_close(x0, (-out).clamp(-1, 1))  # v-prediction at a_bar_t = 0: x_0 = -v
    torch.testing.assert_close(prev_sample, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise, rtol=1e-5, atol=1e-5)


def test_ddim_last_step_noise_follows_final_alpha_cumprod(diffusers):
    # set_alpha_to_one=False: sigma at the last step is > 0 and the noise is added (diffusers adds it
    # whenever eta > 0); with set_alpha_to_one=True sigma is 0 there.
    for set_alpha_to_one, noisy in ((False, True), (True, False)):
        sched, cfg, schedule, ts, prev = setup(
            diffusers, "ddim", n=10, set_alpha_to_one=set_alpha_to_one, steps_offset=1
        )
        assert ts[-1].item() == 1 and prev[-1].item() == -1
        step = StepConfig.from_scheduler(cfg, "ddim", eta=1.0)
        out, sample = step_inputs(5)
        a = reference.posterior_step(out, sample, tvec(ts[-1]), tvec(-1), schedule, step, noise=torch.randn(SHAPE))
        b = reference.posterior_step(out, sample, tvec(ts[-1]), tvec(-1), schedule, step, noise=torch.zeros(SHAPE))
        assert (not torch.allclose(a[0], b[0])) == noisy
        compare_step(sched, cfg, schedule, ts, prev, 9, kind="ddim", seed=1, eta=1.0)


# ---------------------------------------------------------------- per-sample timesteps
@pytest.mark.parametrize(
    "kind, kw",
    [
        ("ddpm", {"variance_type": "fixed_small"}),
        (
            "ddpm",
            {
                "variance_type": "learned_range",
                "prediction_type": "v_prediction",
                "thresholding": True,
                "sample_max_value": 2.0,
            },
        ),
        ("ddim", {"set_alpha_to_one": False}),
        ("ddim", {"prediction_type": "sample", "clip_sample": False}),
    ],
    ids=["ddpm", "ddpm_learned_range_thresh", "ddim", "ddim_sample"],
)
def test_per_sample_timesteps(diffusers, kind, kw):
    sched, cfg, schedule, ts, prev = setup(diffusers, kind, n=20, **kw)
    idx = [0, 7, 18, 19]
    n = len(idx)
    shape = (n, *SHAPE[1:])
    out, sample = step_inputs(11, kw.get("variance_type"), shape=shape, scale=1.5)
    eta = 0.7 if kind == "ddim" else 0.0
    theirs, noise = [], []
    for j, i in enumerate(idx):
        theirs.append(diffusers_step(sched, kind, out[j : j + 1], ts[i], sample[j : j + 1], seed=j, eta=eta))
        noise.append(torch.randn((1, *SHAPE[1:]), generator=gen(j)))
    if kind == "ddpm":
        step = StepConfig.from_scheduler(cfg, "ddpm")
    else:
        step = StepConfig.from_scheduler(cfg, "ddim", eta=eta)
    prev_sample, x0 = reference.posterior_step(out, sample, ts[idx], prev[idx], schedule, step, noise=torch.cat(noise))
    assert_step_close(prev_sample, torch.cat([p for p, _ in theirs]))
    assert_step_close(x0, torch.cat([x for _, x in theirs]))


# ---------------------------------------------------------------- our own float64 table
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_with_float64_table(diffusers, kind, beta_schedule, spacing):
    kw = {
        "beta_schedule": beta_schedule,
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": spacing,
    }
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    if kind == "ddim":
        kw["set_alpha_to_one"] = False
    sched, cfg, schedule, ts, prev = setup(diffusers, kind, n=10, diffusers_table=False, **kw)
    # the relative difference of a_bar between the two tables at the timesteps used (up to ~1.3e-5 for the
    # cosine schedule near t = T); a step's coefficients are products of low powers of a_bar and 1 - a_bar.
    used = torch.cat([ts, prev[prev >= 0]])
    ours_ab, theirs_ab = schedule.alphas_cumprod[used], sched.alphas_cumprod.double()[used]
    table_rel = ((ours_ab - theirs_ab).abs() / theirs_ab).max().item()
    assert 0 < table_rel < 1e-4
    tol = max(1e-5, 4 * table_rel)
    for i in range(10):
        compare_step(
            sched, cfg, schedule, ts, prev, i, kind=kind, seed=i, eta=1.0 if kind == "ddim" else 0.0, rtol=tol, atol=tol
        )


# ---------------------------------------------------------------- full sampling loops
def linear_model(out_channels, variance_type=None):
    """A fixed random linear 'model' with a small t-dependent term (deterministic)."""
    g = gen(1234)
    w = 0.1 * torch.randn(out_channels, C, generator=g)
    b = 0.1 * torch.randn(out_channels, generator=g)

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        y = torch.einsum("oc,nchw->nohw", w, x) + (0.1 * x).repeat(1, out_channels // C, 1, 1)
        y = y + b.reshape(1, -1, 1, 1) * torch.sin(t / 100.0)
        if variance_type == "learned_range":
            y = torch.cat([y[:, :C], torch.tanh(y[:, C:])], dim=1)
        return y

    return model


@pytest.mark.parametrize(
    "kind, n, kw, eta",
    [
        ("ddpm", 20, {}, 0.0),
        ("ddpm", 20, {"variance_type": "learned_range", "prediction_type": "v_prediction", "clip_sample": False}, 0.0),
        ("ddpm", 20, {"variance_type": "fixed_large", "timestep_spacing": "trailing", "thresholding": True}, 0.0),
        ("ddim", 10, {}, 0.0),
        ("ddim", 10, {"prediction_type": "v_prediction", "set_alpha_to_one": False, "clip_sample": False}, 1.0),
        ("ddim", 10, {"timestep_spacing": "trailing", "prediction_type": "sample"}, 0.5),
    ],
    ids=["ddpm", "ddpm_learned_range_v", "ddpm_large_thresh", "ddim", "ddim_v_eta1", "ddim_x0_eta05"],
)
def test_sampling_loop_matches_diffusers(diffusers, kind, n, kw, eta):
    sched, cfg, schedule, ts, prev = setup(diffusers, kind, n=n, **kw)
    vt = kw.get("variance_type")
    model = linear_model(2 * C if vt in ("learned", "learned_range") else C, vt)
    step = StepConfig.from_scheduler(cfg, kind, **({"eta": eta} if kind == "ddim" else {}))
    x_theirs = x_ours = torch.randn(SHAPE, generator=gen(7))
    g_theirs, g_ours = gen(0), gen(0)
    for i, t in enumerate(ts.tolist()):
        kwargs = {"eta": eta} if kind == "ddim" else {}
        x_theirs = sched.step(model(x_theirs, t), t, x_theirs, generator=g_theirs, **kwargs).prev_sample
        draws = t > 0 if kind == "ddpm" else eta > 0  # when diffusers draws noise
        noise = torch.randn(SHAPE, generator=g_ours) if draws else None
        x_ours, _ = reference.posterior_step(
            model(x_ours, tvec(t)), x_ours, tvec(t), tvec(prev[i]), schedule, step, noise=noise
        )
    assert_step_close(x_ours, x_theirs)
    assert not torch.allclose(x_theirs, torch.randn(SHAPE, generator=gen(7)))


# ---------------------------------------------------------------- forward process, targets
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("diffusers_table", [True, False], ids=["their_table", "our_table"])
def test_q_sample_and_velocity_match_diffusers(diffusers, beta_schedule, diffusers_table):
    sched, cfg, schedule, _, _ = setup(
        diffusers,
        "ddpm",
        n=10,
        beta_schedule=beta_schedule,
        prediction_type="v_prediction",
        diffusers_table=diffusers_table,
    )
    g = gen(3)
    x0 = torch.randn((4, *SHAPE[1:]), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    # our float64 table vs diffusers' float32 one: sqrt(1 - a_bar) differs most near t = 0 (cancellation in fp32)
    theirs_ab = sched.alphas_cumprod.double()[t]
    ours_ab = schedule.alphas_cumprod[t]
    d_signal = (ours_ab.sqrt() - theirs_ab.sqrt()).abs().max().item()
    d_noise = ((1 - ours_ab).sqrt() - (1 - theirs_ab).sqrt()).abs().max().item()
    assert (d_signal == 0 and d_noise == 0) == diffusers_table
    atol = 1e-6 + 1.01 * (d_signal * x0.abs().max().item() + d_noise * noise.abs().max().item())
    x_t = reference.q_sample(x0, t, schedule, noise)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t), rtol=1e-5, atol=atol)
    v = reference.training_target(x0, noise, t, schedule, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), rtol=1e-5, atol=atol)
    assert torch.equal(reference.training_target(x0, noise, t, schedule, "epsilon"), noise)
    assert torch.equal(reference.training_target(x0, noise, t, schedule, "sample"), x0)


def test_q_sample_float64_and_round_trip():
    schedule = Schedule.from_config(SchedulerConfig(beta_schedule="cosine"))
    g = gen(4)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 871])
    ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = reference.q_sample(x0, t, schedule, noise)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=1e-14, atol=1e-14)
    # each training target maps back to x_0 and eps through the parametrizations
    for pt in PREDICTION_TYPES:
        target = reference.training_target(x0, noise, t, schedule, pt)
        torch.testing.assert_close(reference.predict_x0(target, x_t, ab, pt), x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(reference.predict_eps(target, x_t, ab, pt), noise, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- guidance
def test_guidance_combine():
    g = gen(5)
    n = 2
    uncond, cond = torch.randn((n, 2 * C, 4, 4), generator=g), torch.randn((n, 2 * C, 4, 4), generator=g)
    out = torch.cat([uncond, cond])
    combined = reference.guidance_combine(out, 7.5, C)
    assert combined.shape == (n, 2 * C, 4, 4)
    for i in range(n):
        for c in range(C):
            expected = uncond[i, c] + 7.5 * (cond[i, c] - uncond[i, c])
            torch.testing.assert_close(combined[i, c], expected)
        assert torch.equal(combined[i, C:], cond[i, C:])
    torch.testing.assert_close(reference.guidance_combine(out, 1.0, C), cond)
    torch.testing.assert_close(reference.guidance_combine(out, 0.0, C)[:, :C], uncond[:, :C])
    # without variance channels, all channels are guided
    torch.testing.assert_close(reference.guidance_combine(out[:, :C], 2.0, C), 2 * cond[:, :C] - uncond[:, :C])


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_small"])
def test_guided_posterior_step_matches_diffusers(diffusers, variance_type):
    sched, cfg, schedule, ts, prev = setup(diffusers, "ddpm", n=10, variance_type=variance_type)
    g = gen(6)
    sample = torch.randn(SHAPE, generator=g)
    outs = [step_inputs(s, variance_type)[0] for s in (21, 22)]  # uncond, cond
    model_output = torch.cat(outs)
    s = 4.0
    guided = outs[0] + s * (outs[1] - outs[0])
    if variance_type != "fixed_small":
        guided[:, C:] = outs[1][:, C:]  # the variance comes from the conditional half
    step = StepConfig.from_scheduler(cfg, "ddpm")
    i = 3
    theirs = diffusers_step(sched, "ddpm", guided, ts[i], sample, seed=9)
    ours = reference.posterior_step(
        model_output,
        sample,
        tvec(ts[i]),
        tvec(prev[i]),
        schedule,
        step,
        noise=torch.randn(SHAPE, generator=gen(9)),
        guidance_scale=s,
    )
    assert_step_close(ours[0], theirs[0])
    assert_step_close(ours[1], theirs[1])


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weight(prediction_type):
    schedule = Schedule.from_config(SchedulerConfig())
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    snr = schedule.snr[t]
    gamma = 5.0
    w = reference.min_snr_weight(snr, gamma, prediction_type)
    for s, wi in zip(snr.tolist(), w.tolist(), strict=True):
        m = min(s, gamma)
        expected = {"epsilon": m / s, "v_prediction": m / (s + 1), "sample": m}[prediction_type]
        assert wi == pytest.approx(expected, rel=1e-12)
    # high noise (SNR < gamma): eps weight 1; low noise: clipped to gamma / SNR
    if prediction_type == "epsilon":
        assert w[-1].item() == pytest.approx(1.0) and w[0].item() < 1e-3


def test_diffusion_loss():
    schedule = Schedule.from_config(SchedulerConfig())
    g = gen(8)
    pred, target = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([20, 700])
    loss = reference.diffusion_loss(pred, target, t, schedule, "epsilon")
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = schedule.snr[t].float()
    for pt, w in (("epsilon", snr.clamp(max=5) / snr), ("v_prediction", snr.clamp(max=5) / (snr + 1))):
        weighted = reference.diffusion_loss(pred, target, t, schedule, pt, min_snr_gamma=5.0)
        torch.testing.assert_close(weighted, (per_sample * w).mean())
    assert reference.diffusion_loss(pred, target, t, schedule, "epsilon", min_snr_gamma=5.0) < loss


# ---------------------------------------------------------------- network pieces
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_silu(dtype, silu):
    g = gen(10)
    n, c, groups = 2, 8, 4

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    x, w, b = r(n, c, 5, 6) * 3 + 1, r(c), r(c)
    bias_nc, scale_nc, shift_nc, residual = r(n, c), r(n, c), r(n, c), r(n, c, 5, 6)
    y = reference.group_norm_silu(
        x, groups, w, b, 1e-5, bias_nc=bias_nc, scale_nc=scale_nc, shift_nc=shift_nc, silu=silu, residual=residual
    )
    h = F.group_norm(x + bias_nc[..., None, None], groups, w, b, 1e-5)
    h = h * (1 + scale_nc[..., None, None]) + shift_nc[..., None, None]
    expected = (F.silu(h) if silu else h) + residual
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # the plain path: GroupNorm (no affine) + SiLU
    plain = reference.group_norm_silu(x, groups, silu=silu)
    expected = F.group_norm(x, groups, eps=1e-5)
    torch.testing.assert_close(plain, F.silu(expected) if silu else expected, rtol=1e-5, atol=1e-5)


def test_group_norm_silu_bf16_computes_in_fp32():
    g = gen(11)
    x = (torch.randn((2, 8, 4, 4), generator=g) * 10 + 100).bfloat16()
    y = reference.group_norm_silu(x, 2)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.silu(F.group_norm(x.float(), 2)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_matches_sdpa(dtype, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = gen(12)
    q, k, v = (torch.randn((2, 3, 17, 16), generator=g, dtype=dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = reference.attention(q, k, v, scale=scale)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def hand_written_attention_block(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups, eps, heads):
    n, c, hh, ww = x.shape
    d = c // heads
    h = F.group_norm(x, groups, norm_w, norm_b, eps)
    qkv = F.conv2d(h, qkv_w[:, :, None, None], qkv_b)  # 1x1 convolution
    q, k, v = (z.reshape(n, heads, d, hh * ww) for z in qkv.split(c, dim=1))
    weights = torch.softmax(torch.einsum("nhds,nhdt->nhst", q, k) / d**0.5, dim=-1)  # (n, heads, S, S)
    o = torch.einsum("nhst,nhdt->nhds", weights, v).reshape(n, c, hh, ww)
    return x + F.conv2d(o, proj_w[:, :, None, None], proj_b)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_block(heads, bias):
    g = gen(13)
    n, c, groups = 2, 8, 4
    x = torch.randn((n, c, 4, 5), generator=g)
    norm_w, norm_b = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    qkv_w, proj_w = torch.randn((3 * c, c), generator=g) / c**0.5, torch.randn((c, c), generator=g) / c**0.5
    qkv_b = 0.1 * torch.randn(3 * c, generator=g) if bias else None
    proj_b = 0.1 * torch.randn(c, generator=g) if bias else None
    out = reference.attention_block(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, num_groups=groups, num_heads=heads)
    expected = hand_written_attention_block(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups, 1e-6, heads)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-2)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_needs_2c_channels(variance_type):
    schedule = Schedule.from_config(SchedulerConfig())
    step = StepConfig(variance_type=variance_type)
    out, sample = step_inputs(0)
    with pytest.raises(ValueError, match="2 x 3"):
        reference.posterior_step(out, sample, tvec(500), tvec(480), schedule, step, noise=torch.randn(SHAPE))


def test_noise_required_when_noise_is_added():
    schedule = Schedule.from_config(SchedulerConfig())
    out, sample = step_inputs(0)
    with pytest.raises(ValueError, match="noise"):
        reference.posterior_step(out, sample, tvec(500), tvec(480), schedule, StepConfig())
    with pytest.raises(ValueError, match="noise"):  # one sample with t > 0 is enough
        reference.posterior_step(out, sample, torch.tensor([0, 20]), torch.tensor([-1, 0]), schedule, StepConfig())
    with pytest.raises(ValueError, match="noise"):  # DDIM with eta > 0, even at the last step
        reference.posterior_step(out, sample, tvec(0), tvec(-1), schedule, StepConfig(kind="ddim", eta=0.5))
    # no noise needed: DDPM at t = 0, DDIM with eta = 0
    reference.posterior_step(out, sample, tvec(0), tvec(-1), schedule, StepConfig())
    reference.posterior_step(out, sample, tvec(500), tvec(480), schedule, StepConfig(kind="ddim"))
