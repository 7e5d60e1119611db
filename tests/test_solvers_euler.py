"""ddpm_fast.solvers.euler / heun: Euler, Euler ancestral and Heun as plans (issue 17).

- Whole sampling loops equal diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``
  and ``HeunDiscreteScheduler`` loops (set_timesteps, init_noise_sigma, scale_model_input, model,
  step with a generator; our noise_fn draws from a generator seeded alike) on the toy model
  x t / (t + 1) over each scheduler x 10 / 25 steps x Karras x eps / v x the three spacings, the
  options (churn, final sigma, zero SNR, clip, custom timesteps, ...), and on a tiny seeded
  UNet2DModel for a few cases; each on diffusers' own fp32 table (upcast: the solver maths alone,
  TIGHT) and on our float64 table (TABLE, as test_solvers.py). Our state is diffusers' sample over
  sqrt(1 + sigma^2), the two meeting at the final sigma = 0, so the final samples compare directly.
- One planned step (for Heun: a predictor and its corrector, through the history slot) in
  float32 / bf16 / fp16 against the float64 reference written as diffusers writes it (the
  tolerance rule); a float64 loop over plan steps against a float64 loop over reference steps.
- The comparisons are shown to see a 1e-3 change of any one coefficient, Heun's write included.
"""

import dataclasses
import inspect

import pytest
import torch
from conftest import assert_close_to_reference
from test_sampler import TINY_UNET
from test_solvers import SHAPE, TIGHT, gen, noise_x_T, perturb, relative_error, table_tolerance, toy

from ddpm_fast import Schedule
from ddpm_fast.solvers import apply_step, new_history, run, schedule_from_dict
from ddpm_fast.solvers.base import D0, HIST
from ddpm_fast.solvers.euler import EulerAncestralDiscrete, EulerDiscrete
from ddpm_fast.solvers.euler import reference_step as euler_reference_step
from ddpm_fast.solvers.heun import HeunDiscrete
from ddpm_fast.solvers.heun import reference_step as heun_reference_step

# diffusers 0.42 under numpy 2 (its set_timesteps' np.array of a tensor), not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

SOLVERS = {
    "euler": ("EulerDiscreteScheduler", EulerDiscrete),
    "ancestral": ("EulerAncestralDiscreteScheduler", EulerAncestralDiscrete),
    "heun": ("HeunDiscreteScheduler", HeunDiscrete),
}
# Karras timesteps: ours from a float64 log table, diffusers' from an fp32 one; seen on its table: 1 ulp
# near t = 999, up to 6 ulps (4.2e-7 relative) at t < 10, where log sigma changes fastest in t.
KARRAS_RTOL, KARRAS_ATOL = 3e-7, 1e-6


def diffusers_loop(model, scheduler, x_T, seed, **step_options):
    """diffusers' manual loop (its pipelines' order of calls); noise from gen(seed) where step draws."""
    generator = gen(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = dict(step_options, **({"generator": generator} if takes_generator else {}))
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        out = getattr(out, "sample", out)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def our_plan(name, scheduler, table, steps=None, timesteps=None, **step_options):
    """Our plan from the diffusers scheduler's config (plus Euler's step options), on our float64
    table or (table="diffusers") on its fp32 one upcast; its timesteps checked against diffusers'."""
    schedule = schedule_from_dict(scheduler.config)
    if table == "diffusers":
        schedule = dataclasses.replace(schedule, alphas_cumprod=scheduler.alphas_cumprod.double())
    solver = dataclasses.replace(SOLVERS[name][1].from_config(scheduler.config), **step_options)
    plan = solver.plan(schedule, steps, timesteps)
    assert plan.timesteps.dtype == torch.float32
    if not scheduler.config.get("use_karras_sigmas", False):
        assert torch.equal(plan.timesteps, scheduler.timesteps), (plan.timesteps, scheduler.timesteps)
    elif table == "diffusers":
        torch.testing.assert_close(plan.timesteps, scheduler.timesteps, rtol=KARRAS_RTOL, atol=KARRAS_ATOL)
    else:  # the table difference moves the continuous timesteps (seen: 5.5e-3 at t = 216)
        torch.testing.assert_close(plan.timesteps, scheduler.timesteps, rtol=0, atol=1e-2)
    return plan


TABLES = ("diffusers", "ours")


def our_loop(model, plan, x_T, seed):
    generator = gen(seed)
    return run(model, x_T, plan, lambda x: torch.randn(x.shape, generator=generator))


def check_against_diffusers(
    diffusers, name, model, config, steps=None, timesteps=None, shape=SHAPE, rule=False, **step_options
):
    """Both tables against one diffusers run; returns diffusers' result. ``rule``: for runs whose fp32
    arithmetic is ill-conditioned (diffusers' own error above TIGHT: a first sigma in the thousands,
    or one step from sigma_max to 0), the tolerance rule instead: on each table, our error against a
    float64 reference loop there is at most 2x diffusers' own against the float64 loop on its table,
    plus 1e-6."""
    scheduler = getattr(diffusers, SOLVERS[name][0])(**config)
    scheduler.set_timesteps(steps, **({} if timesteps is None else {"timesteps": timesteps}))
    x_T = noise_x_T(0, shape)
    ref = diffusers_loop(model, scheduler, x_T, seed=1, **step_options)
    assert torch.isfinite(ref).all()
    plans = {table: our_plan(name, scheduler, table, steps, timesteps, **step_options) for table in TABLES}
    ours = {table: our_loop(model, plan, x_T, 1) for table, plan in plans.items()}
    if rule:
        solver = dataclasses.replace(SOLVERS[name][1].from_config(scheduler.config), **step_options)
        truth = {table: float64_loop(solver, plan, model, x_T, 1) for table, plan in plans.items()}
        allowed = 2 * relative_error(ref.double(), truth["diffusers"]) + 1e-6
        for table, result in ours.items():
            error = relative_error(result.double(), truth[table])
            assert error <= allowed, f"on {table} table: {error:.3g} from the float64 loop > {allowed:.3g}"
        return ref
    tight, loose = relative_error(ours["diffusers"], ref), relative_error(ours["ours"], ref)
    assert tight <= TIGHT, f"on diffusers' table: {tight:.3g} > {TIGHT}"
    limit = table_tolerance(config)
    assert loose <= limit, f"on our table: {loose:.3g} > {limit}"
    return ref


def float64_loop(solver, plan, model, x_T, seed):
    """The float64 reference loop from x_T, its noise drawn as diffusers draws it (fp32 randn)."""
    generator = gen(seed)
    noise_fn = lambda x: torch.randn(x.shape, generator=generator).double()  # noqa: E731
    return reference_loop(solver, plan, model, x_T.double() * plan.init_noise_sigma, noise_fn)


# ---------------------------------------------------------------- against diffusers
GRID = [
    pytest.param(name, spacing, karras, id=f"{name}-{spacing}-{'karras' if karras else 'plain'}")
    for name in SOLVERS
    for spacing in ("linspace", "leading", "trailing")
    for karras in ((False,) if name == "ancestral" else (False, True))
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name,timestep_spacing,use_karras_sigmas", GRID)
def test_toy_model_grid(diffusers, name, timestep_spacing, use_karras_sigmas, steps, prediction_type):
    config = dict(timestep_spacing=timestep_spacing, prediction_type=prediction_type)
    if use_karras_sigmas:
        config["use_karras_sigmas"] = True
    check_against_diffusers(diffusers, name, toy, config, steps)


ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
OPTION_CASES = {
    # x0 prediction ends in the last step's output, which the toy model makes 0 at t = 0 (linspace's
    # and leading's last timestep): those cases take spacings that end above 0
    "euler-sample": ("euler", dict(prediction_type="sample", timestep_spacing="trailing"), {}),
    "euler-sigma_min": ("euler", dict(final_sigmas_type="sigma_min"), {}),
    "euler-sigma_min-karras-v": (
        "euler",
        dict(final_sigmas_type="sigma_min", use_karras_sigmas=True, prediction_type="v_prediction"),
        {},
    ),
    "euler-karras-bounds": ("euler", dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=80.0), {}),
    "euler-churn": ("euler", {}, dict(s_churn=1.0)),
    "euler-churn-window-v": (
        "euler",
        dict(prediction_type="v_prediction", use_karras_sigmas=True),
        dict(s_churn=4.0, s_tmin=0.5, s_tmax=30.0, s_noise=1.003),
    ),
    "euler-churn-sample-leading": (
        "euler",
        dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1),
        dict(s_churn=2.0),
    ),
    "euler-leading-offset": ("euler", dict(timestep_spacing="leading", steps_offset=1), {}),
    "euler-scaled_linear-karras": ("euler", dict(SCALED_LINEAR, use_karras_sigmas=True), {}),
    "euler-cosine": ("euler", dict(beta_schedule="squaredcos_cap_v2"), {}),
    "euler-zero-snr-v": ("euler", dict(ZERO_SNR, prediction_type="v_prediction"), {}),
    "euler-zero-snr-sample": ("euler", dict(ZERO_SNR, prediction_type="sample"), {}),
    "euler-short-T": ("euler", dict(num_train_timesteps=100), {}),
    "ancestral-zero-snr-v": ("ancestral", dict(ZERO_SNR, prediction_type="v_prediction"), {}),
    "ancestral-leading-offset": ("ancestral", dict(timestep_spacing="leading", steps_offset=1), {}),
    "ancestral-scaled_linear": ("ancestral", SCALED_LINEAR, {}),
    "heun-sample": ("heun", dict(prediction_type="sample", timestep_spacing="trailing"), {}),
    "heun-clip-sample": (
        "heun",
        dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing"),
        {},
    ),
    "heun-clip-eps-karras": ("heun", dict(clip_sample=True, clip_sample_range=1.5, use_karras_sigmas=True), {}),
    "heun-clip-v-leading": (
        "heun",
        dict(prediction_type="v_prediction", clip_sample=True, timestep_spacing="leading", steps_offset=1),
        {},
    ),
    "heun-ddpm-betas": ("heun", dict(beta_start=0.0001, beta_end=0.02), {}),
    "heun-cosine": ("heun", dict(beta_schedule="squaredcos_cap_v2"), {}),
    "heun-short-T": ("heun", dict(num_train_timesteps=100, use_karras_sigmas=True), {}),
}


# The cosine schedule's last beta is capped at 0.999, so sigma_max = 2.0e4 (linear: 157), and diffusers'
# fp32 first step from there is off by 7e-5 (Euler) / 9e-5 (Heun): the tolerance rule judges.
RULE_CASES = ("euler-cosine", "heun-cosine")


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_toy_model_options(diffusers, case):
    name, config, step_options = OPTION_CASES[case]
    check_against_diffusers(diffusers, name, toy, config, 10, rule=case in RULE_CASES, **step_options)


def test_clip_and_churn_are_active(diffusers):
    """The clip and churn cases really clip and add noise (else they would test nothing more)."""
    name, config, _ = OPTION_CASES["heun-clip-sample"]
    clipped = check_against_diffusers(diffusers, name, toy, config, 10)
    plain = check_against_diffusers(diffusers, name, toy, {**config, "clip_sample": False}, 10)
    assert (clipped - plain).abs().max() > 0.1
    churned = check_against_diffusers(diffusers, "euler", toy, {}, 10, s_churn=1.0)
    assert (churned - check_against_diffusers(diffusers, "euler", toy, {}, 10)).abs().max() > 0.1


def continuous_toy(x, t):
    """A model for 0.25 log sigma timesteps (in [-1.2, 1.3], where t / (t + 1) has a pole)."""
    return x * (0.5 + 0.1 * t).reshape(-1, 1, 1, 1)


def test_continuous_timesteps(diffusers):
    """timestep_type="continuous" with v prediction passes the model 0.25 log sigma (float32 of our
    float64 sigmas, diffusers' fp32 ones)."""
    config = dict(timestep_type="continuous", prediction_type="v_prediction")
    scheduler = diffusers.EulerDiscreteScheduler(**config)
    scheduler.set_timesteps(10)
    x_T = noise_x_T()
    ref = diffusers_loop(continuous_toy, scheduler, x_T, seed=1)
    schedule = dataclasses.replace(
        schedule_from_dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod.double()
    )
    plan = EulerDiscrete.from_config(scheduler.config).plan(schedule, 10)
    torch.testing.assert_close(plan.timesteps, scheduler.timesteps, rtol=KARRAS_RTOL, atol=KARRAS_ATOL)
    assert relative_error(our_loop(continuous_toy, plan, x_T, 1), ref) <= TIGHT


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_custom_timesteps(diffusers, name):
    check_against_diffusers(diffusers, name, toy, {}, timesteps=[900, 700, 650, 400, 120, 30, 2])


@pytest.mark.parametrize("name", list(SOLVERS))
def test_one_and_two_steps(diffusers, name):
    for steps in (1, 2):
        # one step from sigma_max ~ 157 to 0 cancels to ~1e-3 of x in diffusers' fp32 (6e-5 relative)
        check_against_diffusers(diffusers, name, toy, dict(timestep_spacing="trailing"), steps, rule=steps == 1)


@pytest.fixture(scope="module")
def diffusers_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


@pytest.mark.parametrize(
    "name,config,steps,step_options",
    [
        ("euler", dict(use_karras_sigmas=True), 10, {}),
        ("euler", dict(prediction_type="v_prediction"), 25, dict(s_churn=1.0)),
        ("ancestral", dict(timestep_spacing="trailing"), 25, {}),
        ("heun", dict(use_karras_sigmas=True, prediction_type="v_prediction"), 10, {}),
        ("heun", dict(clip_sample=True, timestep_spacing="leading"), 10, {}),
    ],
    ids=["euler-karras-10", "euler-v-churn-25", "ancestral-trailing-25", "heun-v-karras-10", "heun-clip-leading-10"],
)
def test_unet(diffusers, diffusers_unet, name, config, steps, step_options):
    with torch.no_grad():
        check_against_diffusers(diffusers, name, diffusers_unet, config, steps, **step_options)


# ---------------------------------------------------------------- sensitivity of the comparisons
def perturb_write(plan):
    mix = plan.mix.clone()
    mix[:, 1] *= 1 + 1e-3
    return dataclasses.replace(plan, mix=mix)


@pytest.mark.parametrize(
    "name,coefficient,config,step_options",
    [
        ("euler", "x", {}, {}),
        ("euler", "out", dict(prediction_type="v_prediction"), {}),
        ("euler", "noise", {}, dict(s_churn=1.0)),
        ("ancestral", "x", {}, {}),
        ("ancestral", "out", {}, {}),
        ("ancestral", "noise", {}, {}),
        ("heun", "x", {}, {}),
        ("heun", "out", {}, {}),
        ("heun", "hist", {}, {}),
        ("heun", "write", {}, {}),
        ("heun", "d0", dict(clip_sample=True), {}),
        ("heun", "to_d_x", dict(clip_sample=True), {}),
        ("heun", "to_d_out", dict(clip_sample=True), {}),
    ],
)
def test_comparison_sees_a_perturbed_coefficient(diffusers, name, coefficient, config, step_options):
    scheduler = getattr(diffusers, SOLVERS[name][0])(**config)
    scheduler.set_timesteps(10)
    x_T = noise_x_T()
    ref = diffusers_loop(toy, scheduler, x_T, seed=1, **step_options)
    plan = our_plan(name, scheduler, "diffusers", 10, **step_options)
    plan = perturb_write(plan) if coefficient == "write" else perturb(coefficient)(plan)
    assert relative_error(our_loop(toy, plan, x_T, 1), ref) > 3 * TIGHT


# ---------------------------------------------------------------- the plan
def test_heun_plan_interleaves_as_diffusers(diffusers):
    """2n - 1 calls at t_0, t_1, t_1, ...; the plan's sigmas are diffusers' interleaved ones; the
    predictor writes slot 0, the corrector reads it, the last (Euler into 0) returns D_0."""
    scheduler = diffusers.HeunDiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(6)
    schedule = dataclasses.replace(
        schedule_from_dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod.double()
    )
    plan = HeunDiscrete(use_karras_sigmas=True).plan(schedule, 6)
    assert plan.num_steps == 11 and plan.orders == (1, 2) * 5 + (1,) and not plan.stochastic
    torch.testing.assert_close(plan.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    assert torch.equal(plan.timesteps[1::2], plan.timesteps[2::2])
    assert (plan.write_slot[0::2][:-1] == 0).all() and (plan.write_slot[1::2] == 1).all() and plan.write_slot[-1] == 1
    assert (plan.mix[1::2, 0, HIST] == 1).all() and (plan.mix[0::2, 0, HIST] == 0).all()
    clipped = HeunDiscrete(clip_sample=True).plan(schedule, 6)
    last = clipped.mix[-1, 0]
    assert last[D0] == 1 and last.abs().sum() == 1  # x_next = D_0 into sigma = 0
    assert clipped.x0_limit is not None and clipped.x0_limit.kind == "clip"


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("timestep_spacing", ["linspace", "leading", "trailing"])
def test_init_noise_sigma(diffusers, name, timestep_spacing):
    """x_T = plan.init_noise_sigma z is diffusers' first model input, init_noise_sigma z / sqrt(1 + sigma_0^2)."""
    scheduler = getattr(diffusers, SOLVERS[name][0])(timestep_spacing=timestep_spacing)
    scheduler.set_timesteps(10)
    plan = our_plan(name, scheduler, "diffusers", 10)
    first_input = scheduler.scale_model_input(torch.ones(1) * scheduler.init_noise_sigma, scheduler.timesteps[0])
    torch.testing.assert_close(
        torch.tensor([plan.init_noise_sigma], dtype=torch.float32), first_input, rtol=1e-6, atol=0
    )


def test_plans_are_float64_on_the_requested_device():
    schedule = Schedule.from_config()
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for solver in (EulerDiscrete(s_churn=1.0), EulerAncestralDiscrete(), HeunDiscrete(clip_sample=True)):
        for device in devices:
            plan = solver.plan(schedule, 10, device=device)
            for name in ("to_d_x", "to_d_out", "mix", "sigmas"):
                tensor = getattr(plan, name)
                assert tensor.dtype == torch.float64 and tensor.device.type == device, (name, tensor)
            assert plan.timesteps.dtype == torch.float32 and plan.timesteps.device.type == device
    assert EulerDiscrete(s_churn=1.0, s_tmax=10.0).plan(schedule, 10).draws == (False,) * 3 + (True,) * 7
    assert EulerDiscrete().plan(schedule, 10).draws == (False,) * 10
    assert EulerAncestralDiscrete().plan(schedule, 10).draws == (True,) * 10  # the last too, as diffusers


# ---------------------------------------------------------------- one step: tolerance rule
def draw(g, dtype, scale=1.0):
    return (scale * torch.randn(SHAPE, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "solver",
    [
        EulerDiscrete(use_karras_sigmas=True),
        EulerDiscrete(prediction_type="v_prediction", s_churn=2.0),
        EulerDiscrete(prediction_type="sample", final_sigmas_type="sigma_min"),
        EulerAncestralDiscrete(),
        EulerAncestralDiscrete(prediction_type="v_prediction", timestep_spacing="leading"),
    ],
    ids=["euler-karras", "euler-v-churn", "euler-x0-sigma_min", "ancestral", "ancestral-v-leading"],
)
def test_euler_step_matches_the_float64_reference(solver, dtype):
    plan = solver.plan(Schedule.from_config(), 10)
    g = gen(3)
    for step in (0, 4, 9):
        x, out, noise = draw(g, dtype), draw(g, dtype), draw(g, dtype)
        noise_in = noise if plan.draws[step] else None
        fast = apply_step(plan, step, x, out, new_history(plan, x), noise_in)
        ref = euler_reference_step(solver, plan.sigmas, step, x, out, noise_in)
        wide = noise_in.double() if noise_in is not None else None
        ref64 = euler_reference_step(solver, plan.sigmas, step, x.double(), out.double(), wide)
        assert_close_to_reference(fast, ref.to(dtype), ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "solver",
    [
        HeunDiscrete(),
        HeunDiscrete(prediction_type="v_prediction", use_karras_sigmas=True),
        HeunDiscrete(clip_sample=True),
    ],
    ids=["eps", "v-karras", "clip"],
)
def test_heun_step_matches_the_float64_reference(solver, dtype):
    """A predictor and its corrector (the saved half step through the history slot) on fixed model
    outputs, then the last Euler step into 0, against diffusers' form of each with its saved state."""
    plan = solver.plan(Schedule.from_config(), 10)
    g = gen(3)
    for first in (0, 6, plan.num_steps - 1):
        x, out1, out2 = draw(g, dtype), draw(g, dtype, 1.5), draw(g, dtype, 1.5)
        history = new_history(plan, x)
        fast = apply_step(plan, first, x, out1, history)
        ref, state = heun_reference_step(solver, plan.sigmas, first, x, out1)
        ref64, state64 = heun_reference_step(solver, plan.sigmas, first, x.double(), out1.double())
        assert_close_to_reference(fast, ref.to(dtype), ref64)
        if first == plan.num_steps - 1:
            break
        fast = apply_step(plan, first + 1, fast, out2, history)
        ref, _ = heun_reference_step(solver, plan.sigmas, first + 1, ref.to(dtype), out2, state)
        ref64, _ = heun_reference_step(solver, plan.sigmas, first + 1, ref64, out2.double(), state64)
        assert_close_to_reference(fast, ref.to(dtype), ref64)


def reference_loop(solver, plan, model, x, noise_fn):
    """A float64 sampling loop over the reference steps (diffusers' form, its own saved state)."""
    state = None
    for s in range(plan.num_steps):
        out = model(x, plan.timesteps[s].expand(x.shape[0]))
        if isinstance(solver, HeunDiscrete):
            x, state = heun_reference_step(solver, plan.sigmas, s, x, out, state)
        else:
            x = euler_reference_step(solver, plan.sigmas, s, x, out, noise_fn(x) if plan.draws[s] else None)
    return x


@pytest.mark.parametrize(
    "solver",
    [
        EulerDiscrete(s_churn=1.0, s_tmax=20.0, use_karras_sigmas=True),
        EulerAncestralDiscrete(prediction_type="v_prediction"),
        HeunDiscrete(prediction_type="sample", clip_sample=True, clip_sample_range=0.8),
    ],
    ids=["euler-churn", "ancestral-v", "heun-clip"],
)
def test_float64_loop_matches_the_reference_loop(solver):
    plan = solver.plan(Schedule.from_config(), 12)
    x_T = noise_x_T().double()
    noises = [torch.randn(SHAPE, generator=gen(s), dtype=torch.float64) for s in range(plan.num_steps)]
    ours_noise, ref_noise = iter(noises), iter(noises)
    ours = run(toy, x_T, plan, lambda x: next(ours_noise))
    ref = reference_loop(solver, plan, toy, x_T * plan.init_noise_sigma, lambda x: next(ref_noise))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "cls,options,match",
    [
        (EulerDiscrete, dict(interpolation_type="log_linear"), "interpolation_type"),
        (EulerDiscrete, dict(prediction_type="flow_prediction"), "prediction_type"),
        (EulerDiscrete, dict(final_sigmas_type="one"), "final_sigmas_type"),
        (EulerDiscrete, dict(timestep_spacing="uniform"), "timestep_spacing"),
        (EulerDiscrete, dict(timestep_type="ddim"), "timestep_type"),
        (EulerDiscrete, dict(sigma_min=0.0), "sigma_min"),
        (EulerDiscrete, dict(s_churn=-1.0), "s_churn"),
        (EulerAncestralDiscrete, dict(prediction_type="sample"), "prediction_type"),
        (EulerAncestralDiscrete, dict(timestep_spacing="uniform"), "timestep_spacing"),
        (HeunDiscrete, dict(prediction_type="flow_prediction"), "prediction_type"),
        (HeunDiscrete, dict(clip_sample_range=0.0), "clip_sample_range"),
    ],
)
def test_bad_options(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_bad_plans():
    plain = Schedule.from_config()
    zero_snr = Schedule.from_config(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    for solver in (EulerDiscrete(), EulerAncestralDiscrete(), HeunDiscrete()):
        with pytest.raises(ValueError, match="prediction_type"):
            solver.plan(zero_snr, 10)  # epsilon on a zero-terminal-SNR schedule
        for steps in (0, 1001):
            with pytest.raises(ValueError, match="num_inference_steps"):
                solver.plan(plain, steps)
        with pytest.raises(ValueError, match="exactly one"):
            solver.plan(plain)
        with pytest.raises(ValueError, match="steps_offset"):
            dataclasses.replace(solver, timestep_spacing="leading", steps_offset=300).plan(plain, 4)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        HeunDiscrete(use_karras_sigmas=True).plan(plain, timesteps=[900, 500])
    for solver in (EulerDiscrete, HeunDiscrete):
        with pytest.raises(ValueError, match="use_karras_sigmas"):
            solver(use_karras_sigmas=True, prediction_type="v_prediction").plan(zero_snr, 10)
    holed = Schedule.from_config(trained_betas=[0.01] * 8 + [1.0, 0.5], num_train_timesteps=10)
    with pytest.raises(ValueError, match="infinite sigma"):  # a_bar = 0 before the end
        EulerDiscrete(prediction_type="v_prediction").plan(holed, 5)


def test_from_config():
    assert EulerDiscrete.from_config({"use_karras_sigmas": True, "beta_schedule": "linear"}).use_karras_sigmas
    assert HeunDiscrete.from_config({"clip_sample": True, "_class_name": "HeunDiscreteScheduler"}).clip_sample
    for cls, key in (
        (EulerDiscrete, "interpolation_type"),
        (EulerDiscrete, "use_beta_sigmas"),
        (HeunDiscrete, "use_exponential_sigmas"),
    ):
        with pytest.raises(ValueError, match=key):
            cls.from_config({key: "log_linear" if key == "interpolation_type" else True})
    with pytest.warns(UserWarning, match="clip_sample"):
        EulerAncestralDiscrete.from_config({"clip_sample": True})
    with pytest.warns(UserWarning, match="solver_order"):
        HeunDiscrete.from_config({"solver_order": 2})
