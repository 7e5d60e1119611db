"""ddpm_fast.solvers.pc: the score-SDE predictor-corrector sampler "pc" (issue 17).

- On a Gaussian toy whose exact score is known (data x0 ~ N(MU, S^2) per element, the model's output
  the exact eps / v / x0 prediction in closed form), the samples' mean and variance match the
  data's within 5 standard errors at 200 steps, with 0, 1 and 2 corrector steps; a wrong model
  (scaled score, shifted mean) fails the same check.
- The plan loop against ``reference_sample`` (the paper's formulas, independent of the plan) with
  the same noise: the predictor alone bit for bit in float64 (eps prediction), with correctors to
  1e-10; float32 under the tolerance rule; a device step index reads nothing on the host; the
  plan's layout; bad options raise naming the option.

The sampling error and the scheme's own bias. With M = 8 x 1024 = 8192 elements, the standard
errors are S / sqrt(M) = 0.0055 for the mean and S^2 sqrt(2 / M) = 1.56% of S^2 for the variance;
the check allows 5 of each. The scheme is first order and its Langevin steps unadjusted, so its
output is not exactly N(MU, S^2): at 200 steps the variance comes out ~3.0% high from the predictor
alone (the exact Gaussian moment recursion of this scheme: 6.1% at 100 steps, 0.6% at 1000), and
~2.5% high with correctors (unadjusted Langevin's stationary variance is v (1 + alpha snr^2), snr =
0.16), plus a part that shrinks as 1 / D with the per-sample norms over D elements (+7.7% in all at
D = 64, +2.2% at D = 1024): so D = 1024 here. Over 30 seeds the variance was off by +1.9 to +2.1
standard errors on average (at most +4.4), the mean by 0 +- 1.1. The check's power: a model whose eps
is 20% too large moves the variance by -7.4 standard errors or more, one of data N(MU + 0.05, S^2)
the mean by ~+9 (seeds 0-14); a 10% larger eps is seen without correctors (-9.4 on average) but not
reliably with them (-3.7 to -4.8: the corrector pulls toward the wrong model's own marginals).
"""

import dataclasses
import math

import pytest
import torch
from conftest import assert_close_to_reference
from host_reads import no_host_reads

from ddpm_fast import Schedule
from ddpm_fast.solvers.base import D0, NOISE, OUT, X, new_history, run
from ddpm_fast.solvers.pc import PredictorCorrector, pc_step, reference_sample

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.3, 0.5
STAT_SHAPE = (8, 1, 32, 32)  # M = 8192 elements, D = 1024 per sample
SHAPE = (3, 2, 4, 4)
SCHEDULE = Schedule.from_config()


def gaussian_model(prediction_type="epsilon", mu=MU, s=S, eps_scale=1.0, schedule=SCHEDULE):
    """The exact prediction for data N(mu, s^2): with v_t = a s^2 + 1 - a,
    eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / v_t, x0*(x_t) = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / v_t,
    v* = sqrt(a) eps* - sqrt(1 - a) x0*. ``eps_scale`` scales eps* (a wrong model: a scaled score)."""

    def model(x, t):
        a = schedule.alphas_cumprod[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        v_t = a * s * s + 1 - a
        eps = eps_scale * (1 - a).sqrt() * (x - a.sqrt() * mu) / v_t
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


def noise_source(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=dtype).to(x.dtype)


def sample(solver, model, steps, shape, seed=0, dtype=torch.float64):
    plan = solver.plan(SCHEDULE, steps)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return run(model, x_T, plan, noise_source(seed + 1, dtype), step_fn=pc_step)


def standard_errors_off(x):
    """(mean - MU) and (variance - S^2) in standard errors of M i.i.d. N(MU, S^2) samples."""
    m = x.numel()
    mean, var = x.mean().item(), x.var().item()
    return (mean - MU) / (S / math.sqrt(m)), (var - S * S) / (S * S * math.sqrt(2.0 / m))


# ---------------------------------------------------------------- the Gaussian toy: right distribution
@pytest.mark.parametrize(
    "prediction_type,corrector_steps",
    [("epsilon", 0), ("epsilon", 1), ("epsilon", 2), ("v_prediction", 1), ("sample", 1)],
)
def test_gaussian_samples_have_the_data_moments(prediction_type, corrector_steps):
    solver = PredictorCorrector(corrector_steps=corrector_steps, prediction_type=prediction_type)
    x = sample(solver, gaussian_model(prediction_type), 200, STAT_SHAPE)
    mean_off, var_off = standard_errors_off(x)
    assert abs(mean_off) <= 5 and abs(var_off) <= 5, (mean_off, var_off)


@pytest.mark.parametrize("corrector_steps", [0, 1, 2])
@pytest.mark.parametrize("wrong", [dict(eps_scale=1.2), dict(mu=MU + 0.05)], ids=["score-x1.2", "mean+0.05"])
def test_a_wrong_model_fails_the_check(corrector_steps, wrong):
    """The check has power: the score of eps * 1.2 or of data N(MU + 0.05, S^2) is seen."""
    solver = PredictorCorrector(corrector_steps=corrector_steps)
    x = sample(solver, gaussian_model(**wrong), 200, STAT_SHAPE)
    mean_off, var_off = standard_errors_off(x)
    assert max(abs(mean_off), abs(var_off)) > 5, (mean_off, var_off)


# ---------------------------------------------------------------- the plan loop against the reference loop
def both_loops(solver, steps, dtype=torch.float64, seed=0, model=None, plan_edit=None):
    """(plan loop, reference loop) from the same x_T and noise stream."""
    model = gaussian_model(solver.prediction_type) if model is None else model
    plan = solver.plan(SCHEDULE, steps)
    if plan_edit is not None:
        plan = plan_edit(plan)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ours = run(model, x_T, plan, noise_source(seed + 1, dtype), step_fn=pc_step)
    ref = reference_sample(
        solver,
        SCHEDULE,
        plan.timesteps[:: solver.corrector_steps + 1].tolist(),
        model,
        x_T,
        noise_source(seed + 1, dtype),
    )
    return ours, ref


@pytest.mark.parametrize("noise_removal", [True, False])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_predictor_alone_equals_the_reference_bit_for_bit(noise_removal, spacing):
    """eps prediction: the plan's coefficients are the reference's float64 scalars (the score's
    conversion folds in as 0 x + 1 out), and apply_step does the reference's multiplies and adds in
    the same order, so the float64 loops are equal."""
    solver = PredictorCorrector(corrector_steps=0, noise_removal=noise_removal, timestep_spacing=spacing)
    ours, ref = both_loops(solver, 50)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_predictor_alone_other_predictions_to_1e12(prediction_type):
    """v and x0 predictions: the plan folds the conversion to eps into the x and out coefficients
    (one rounding per coefficient where the reference converts, then steps), so not bitwise."""
    solver = PredictorCorrector(corrector_steps=0, prediction_type=prediction_type)
    ours, ref = both_loops(solver, 50)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(corrector_steps=1),
        dict(corrector_steps=2, snr=0.3, noise_removal=False),
        dict(corrector_steps=1, prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(corrector_steps=3, prediction_type="sample", snr=0.05),
    ],
    ids=["c1", "c2-snr0.3-noisy-end", "c1-v-trailing", "c3-x0-snr0.05"],
)
def test_corrector_loop_matches_the_reference(options):
    solver = PredictorCorrector(**options)
    ours, ref = both_loops(solver, 30)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("column", [X, D0], ids=["x", "step-size"])
def test_the_comparison_sees_a_perturbed_langevin_coefficient(column):
    """A 1e-6 relative change of a Langevin row's coefficient moves the loop far past 1e-10."""
    solver = PredictorCorrector(corrector_steps=1)

    def edit(plan):
        mix = plan.mix.clone()
        langevin = torch.tensor(plan.langevin_snr) > 0
        mix[langevin, 0, column] *= 1 + 1e-6
        return dataclasses.replace(plan, mix=mix)

    ours, ref = both_loops(solver, 30, plan_edit=edit)
    assert (ours - ref).abs().max() > 1e-8


@pytest.mark.parametrize("options", [dict(corrector_steps=0), dict(corrector_steps=2)], ids=["c0", "c2"])
def test_float32_loop_under_the_tolerance_rule(options):
    """The float32 plan loop's error against the float64 reference loop is at most twice the float32
    reference loop's own (plus the floor), from the same x_T and noise (float32 noise, upcast)."""
    solver = PredictorCorrector(**options)
    model = gaussian_model()
    plan = solver.plan(SCHEDULE, 20)
    ts = plan.timesteps[:: solver.corrector_steps + 1].tolist()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    fast = run(model, x_T, plan, noise_source(5, torch.float32), step_fn=pc_step)
    ref32 = reference_sample(solver, SCHEDULE, ts, model, x_T, noise_source(5, torch.float32))
    ref64 = reference_sample(solver, SCHEDULE, ts, model, x_T.double(), noise_source(5, torch.float32))
    assert fast.dtype == ref32.dtype == torch.float32 and ref64.dtype == torch.float64
    assert_close_to_reference(fast, ref32, ref64)


def test_step_index_on_the_device_reads_nothing_on_the_host():
    """A captured graph replays pc_step with the index in a device tensor: both kinds of step (and
    the last, noiseless one) give the host index's result bit for bit, with no host read."""
    plan = PredictorCorrector(corrector_steps=1).plan(SCHEDULE, 5)
    g = torch.Generator().manual_seed(7)
    x, out, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    history = new_history(plan, x)
    cases = [(s, noise if plan.draws[s] else None) for s in (0, 1, plan.num_steps - 1)]
    assert plan.langevin_snr[0] > 0 and plan.langevin_snr[1] == 0 and not plan.draws[-1]
    expected = [pc_step(plan, s, x, out, history, z) for s, z in cases]
    indices = [torch.tensor(s) for s, _ in cases]
    with no_host_reads():
        got = [pc_step(plan, i, x, out, history, z) for i, (_, z) in zip(indices, cases, strict=True)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_captured_step_replays_the_whole_run():
    """CUDA: the model and pc_step captured once with the step index in a device tensor, replayed
    for every step (Langevin and predictor alike), give the eager host-index loop's sample."""
    device = torch.device("cuda")
    schedule = SCHEDULE.to(device)
    plan = PredictorCorrector(corrector_steps=1, noise_removal=False).plan(schedule, 10)  # every step draws
    model = gaussian_model(schedule=schedule)
    g = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(SHAPE, device=device, generator=g)
    noises = torch.randn((plan.num_steps, *SHAPE), device=device, generator=g)

    x, history = x_T.clone(), new_history(plan, x_T)
    for s in range(plan.num_steps):
        x = pc_step(plan, s, x, model(x, plan.timesteps[s].expand(SHAPE[0])), history, noises[s])

    state, noise, index = x_T.clone(), noises[0].clone(), torch.zeros((), dtype=torch.int64, device=device)
    graph_history = new_history(plan, state)

    def body():
        return pc_step(plan, index, state, model(state, plan.timesteps[index].expand(SHAPE[0])), graph_history, noise)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = body()
    state.copy_(x_T)
    for s in range(plan.num_steps):
        index.fill_(s)
        noise.copy_(noises[s])
        graph.replay()
        state.copy_(result)
    torch.testing.assert_close(state, x, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the plan
def test_plan_layout():
    solver = PredictorCorrector(corrector_steps=2, snr=0.2)
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        plan = solver.plan(SCHEDULE, 10, device=device)
        for name in ("to_d_x", "to_d_out", "mix", "sigmas"):
            assert getattr(plan, name).dtype == torch.float64 and getattr(plan, name).device.type == device
    plan = solver.plan(SCHEDULE, 10)
    ts = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]  # linspace spacing
    assert plan.num_steps == 30 and plan.timesteps.tolist() == [t for t in ts for _ in range(3)]
    assert plan.langevin_snr == (0.2, 0.2, 0.0) * 10 and plan.history_slots == 0 and plan.num_writes == 0
    assert plan.draws == (True,) * 29 + (False,)  # noise_removal: the last predictor step adds none
    langevin = torch.tensor(plan.langevin_snr) > 0
    assert torch.equal(plan.mix[:, 0, D0] != 0, langevin)  # what pc_step reads on the device
    alphas = 1 - SCHEDULE.betas[plan.timesteps]
    torch.testing.assert_close(plan.mix[langevin, 0, D0], (2 * alphas * 0.2**2)[langevin], rtol=1e-15, atol=0)
    assert (plan.mix[langevin, 0, X] == 1).all() and (plan.mix[langevin, 0, OUT] == 0).all()
    assert (plan.mix[langevin, 0, NOISE] == 0).all() and (plan.mix[~langevin, 0, D0] == 0).all()
    # D_0 is the score -eps / sqrt(1 - a_bar) at every step
    a = SCHEDULE.alphas_cumprod[plan.timesteps]
    torch.testing.assert_close(plan.to_d_out, -1 / (1 - a).sqrt(), rtol=1e-15, atol=0)
    assert (plan.to_d_x == 0).all()
    assert plan.sigmas[-1].item() == 0 and plan.init_noise_sigma == 1.0 and plan.x0_limit is None


def test_every_timestep_is_the_papers_algorithm_5():
    """With all T timesteps the predictor's beta is the schedule's own beta_t: x_mean = (2 - sqrt(1 -
    beta_t)) x + beta_t s, noise sqrt(beta_t) (Song et al. Alg. 5)."""
    plan = PredictorCorrector(corrector_steps=0).plan(SCHEDULE, 1000)
    beta, a = SCHEDULE.betas.flip(0), SCHEDULE.alphas_cumprod.flip(0)
    torch.testing.assert_close(plan.mix[:, 0, X], 2 - (1 - beta).sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(plan.mix[:, 0, OUT], -beta / (1 - a).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(plan.mix[:-1, 0, NOISE], beta[:-1].sqrt(), rtol=1e-10, atol=0)


def test_learned_variance_and_custom_timesteps():
    solver = PredictorCorrector(corrector_steps=1, variance_type="learned_range")
    model = gaussian_model()
    with_variance = lambda x, t: torch.cat([model(x, t), torch.full_like(x, 7.0)], dim=1)  # noqa: E731
    plan = solver.plan(SCHEDULE, timesteps=[900, 500, 120, 3])
    assert plan.learned_variance and plan.timesteps.tolist() == [900, 900, 500, 500, 120, 120, 3, 3]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = run(with_variance, x_T, plan, noise_source(3), step_fn=pc_step)
    ref = reference_sample(solver, SCHEDULE, [900, 500, 120, 3], with_variance, x_T, noise_source(3))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(corrector_steps=-1), "corrector_steps"),
        (dict(corrector_steps=1.5), "corrector_steps"),
        (dict(corrector_steps=True), "corrector_steps"),
        (dict(snr=0.0), "snr"),
        (dict(snr=-0.1), "snr"),
        (dict(snr=math.inf), "snr"),
        (dict(snr=math.nan), "snr"),
        (dict(snr="0.16"), "snr"),
        (dict(noise_removal=1), "noise_removal"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(variance_type="fixed_small"), "variance_type"),
        (dict(steps_offset=0.5), "steps_offset"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        PredictorCorrector(**options)


def test_bad_plans_and_steps():
    solver = PredictorCorrector()
    zero_snr = Schedule.from_config(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        PredictorCorrector(prediction_type="v_prediction").plan(zero_snr, 10)
    with pytest.raises(ValueError, match="exactly one"):
        solver.plan(SCHEDULE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        solver.plan(SCHEDULE, 1001)
    with pytest.raises(ValueError, match="steps_offset"):
        PredictorCorrector(timestep_spacing="leading", steps_offset=300).plan(SCHEDULE, 4)
    plan = solver.plan(SCHEDULE, 4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="Langevin"):
        run(gaussian_model(), x, plan, noise_source(0))  # no step_fn: base.run refuses
    with pytest.raises(ValueError, match="needs noise"):
        pc_step(plan, 0, x, x, new_history(plan, x), None)


def test_from_config():
    solver = PredictorCorrector.from_config({"corrector_steps": 2, "snr": 0.1, "beta_schedule": "linear"})
    assert (solver.corrector_steps, solver.snr) == (2, 0.1)
    with pytest.warns(UserWarning, match="clip_sample"):
        PredictorCorrector.from_config({"clip_sample": True, "_class_name": "DDPMScheduler"})
