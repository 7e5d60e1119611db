"""ddpm_fast.solvers: the plan / apply_step interface and DPM-Solver++ (issue 17, first part).

- Whole sampling loops equal diffusers' ``DPMSolverMultistepScheduler`` loop (set_timesteps,
  init_noise_sigma, scale_model_input, model, step with a generator; our noise_fn draws from a
  generator seeded alike, in the same order) on the toy model x t / (t + 1) over the wide grid and
  on a tiny seeded UNet2DModel for a few cases. Each is run twice: on diffusers' own fp32 table
  (upcast), which isolates the solver maths (~1e-6 seen, 1e-5 allowed), and on our float64 table,
  which also carries the table difference (DESIGN.md) into the images.
- One planned step in float32 / bf16 / fp16 against the float64 reference step written as
  diffusers writes it (the tolerance rule); a float64 loop over plan steps against a float64 loop
  over reference steps (the history ring); coefficients float64 on the requested device; the step
  with a device step index reads no tensor value on the host; bad inputs raise naming the option.
- The comparisons are shown to see a 1e-3 change of any one coefficient.
"""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference
from host_reads import no_host_reads
from test_sampler import TINY_UNET  # the same tiny UNet2DModel architecture

from ddpm_fast import Schedule, reference
from ddpm_fast.solvers import (
    DIFFUSERS_SOLVERS,
    DPMSolverMultistep,
    UniPCMultistep,
    X0Limit,
    apply_step,
    new_history,
    run,
    schedule_from_dict,
)
from ddpm_fast.solvers.base import D0, HIST, NOISE, OUT, PlanBuilder, X
from ddpm_fast.solvers.dpmsolver import reference_step

# diffusers 0.42 under numpy 2 (its set_timesteps' np.array of a tensor), not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

SHAPE = (2, 3, 8, 8)
TIGHT = 1e-5  # relative to max(1, |ref|): our float64 solver on diffusers' own table
# On our float64 table: 1e-5 too, except where sigma_0 enters. diffusers' a_bar_0 = 0.9999 is an fp32
# (ulp 6e-8), so its 1 - a_bar_0 = 1e-4 and sigma_0 = sqrt((1 - a_bar_0) / a_bar_0) are 1.7e-4 and 8e-5
# relative off ours; Karras sigmas span [sigma_0, sigma_T], so the ramp carries that into every step (seen:
# 3.1e-5 relative in SDE runs, 5e-7 with diffusers' a_bar_0 alone put into our table), and
# final_sigmas_type="sigma_min" ends there.
TABLE, TABLE_SIGMA_0 = 1e-5, 6e-5


def table_tolerance(config):
    uses_sigma_0 = config.get("use_karras_sigmas", False) or config.get("final_sigmas_type") == "sigma_min"
    return TABLE_SIGMA_0 if uses_sigma_0 else TABLE


def toy(x, t):
    return x * (t / (t + 1)).reshape(-1, 1, 1, 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noise_x_T(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=gen(seed))


def diffusers_loop(model, scheduler, x_T, seed):
    """diffusers' manual loop (its pipelines' order of calls); the SDE noise comes from gen(seed)."""
    generator = gen(seed)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        out = getattr(out, "sample", out)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def our_loop(model, scheduler, x_T, seed, table, steps=None, timesteps=None, plan_edit=None):
    """Our plan + run from the diffusers scheduler's config, on our float64 table or (table="diffusers")
    on its fp32 one upcast; the noise drawn like diffusers' step draws it (randn of x's shape)."""
    schedule = schedule_from_dict(scheduler.config)
    if table == "diffusers":
        schedule = dataclasses.replace(schedule, alphas_cumprod=scheduler.alphas_cumprod.double())
    solver = DIFFUSERS_SOLVERS[type(scheduler).__name__].from_config(scheduler.config)
    plan = solver.plan(schedule, steps, timesteps)
    assert torch.equal(plan.timesteps, scheduler.timesteps), (plan.timesteps, scheduler.timesteps)
    if plan_edit is not None:
        plan = plan_edit(plan)
    generator = gen(seed)
    return run(model, x_T, plan, lambda x: torch.randn(x.shape, generator=generator))


def reference_loop(solver, plan, model, x, noise_fn):
    """A sampling loop over ``reference_step`` (diffusers' form of each step), fed its own x0 predictions."""
    previous = []
    for s in range(plan.num_steps):
        out = model(x, plan.timesteps[s].expand(x.shape[0]))
        noise = noise_fn(x) if plan.stochastic else None
        x, m0 = reference_step(solver, plan.sigmas, s, plan.orders[s], x, out, previous, noise)
        previous = [m0, *previous][: solver.solver_order - 1]
    return x


def relative_error(ours, ref):
    return ((ours - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def check_against_diffusers(diffusers, model, config, steps=None, timesteps=None, shape=SHAPE):
    """Both tables against one diffusers run; returns diffusers' result."""
    scheduler = diffusers.DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps, timesteps=timesteps)
    x_T = noise_x_T(0, shape)
    ref = diffusers_loop(model, scheduler, x_T, seed=1)
    assert torch.isfinite(ref).all()
    tight = relative_error(our_loop(model, scheduler, x_T, 1, "diffusers", steps, timesteps), ref)
    ours = relative_error(our_loop(model, scheduler, x_T, 1, "ours", steps, timesteps), ref)
    assert tight <= TIGHT, f"on diffusers' table: {tight:.3g} > {TIGHT}"
    limit = table_tolerance(config)
    assert ours <= limit, f"on our table: {ours:.3g} > {limit}"
    return ref


# ---------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_toy_model_grid(diffusers, solver_order, algorithm_type, steps, use_karras_sigmas, prediction_type):
    config = dict(
        solver_order=solver_order,
        algorithm_type=algorithm_type,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
    )
    check_against_diffusers(diffusers, toy, config, steps)


def learned_variance_toy(x, t):
    return torch.cat([toy(x, t), torch.full_like(x, 7.0)], dim=1)  # 2C channels; the extra C are not used


OPTION_CASES = {
    "threshold-sample": dict(prediction_type="sample", thresholding=True, sample_max_value=1.5, solver_order=3),
    "threshold-eps-sde": dict(thresholding=True, algorithm_type="sde-dpmsolver++", dynamic_thresholding_ratio=0.9),
    "sigma_min": dict(final_sigmas_type="sigma_min", solver_order=3),
    "sigma_min-sde": dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++", lower_order_final=False),
    "no-lower-order-final": dict(lower_order_final=False, solver_order=3),
    "euler_at_final": dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    "heun": dict(solver_type="heun"),
    "heun-sde": dict(solver_type="heun", algorithm_type="sde-dpmsolver++"),
    "leading-offset": dict(timestep_spacing="leading", steps_offset=1, solver_order=3),
    "trailing": dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    "cosine-clipped": dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "zero-snr-v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    "zero-snr-sample-sde": dict(
        rescale_betas_zero_snr=True, prediction_type="sample", algorithm_type="sde-dpmsolver++", solver_order=3
    ),
    "short-T": dict(num_train_timesteps=100, solver_order=3),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_toy_model_options(diffusers, case):
    check_against_diffusers(diffusers, toy, OPTION_CASES[case], 10)


def test_thresholding_is_active(diffusers):
    """The thresholding case really clips (else it would test nothing more than the plain one)."""
    config = OPTION_CASES["threshold-sample"]
    clipped = check_against_diffusers(diffusers, toy, config, 10)
    plain = check_against_diffusers(diffusers, toy, {**config, "thresholding": False}, 10)
    assert (clipped - plain).abs().max() > 0.1


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_as_many_steps_as_the_order(diffusers, steps):
    """steps == solver_order, the fewest steps of that order (the warm-up's lower orders cover them,
    as in diffusers). One step jumps from sigma_T to 0: x0 = (x - sigma_vp eps) / alpha cancels to
    ~1e-3 of x, which diffusers' fp32 arithmetic feels (4e-5 relative); there the tolerance rule
    against a float64 loop (on diffusers' table) judges."""
    config = dict(solver_order=steps, algorithm_type="sde-dpmsolver++")
    if steps > 1:
        check_against_diffusers(diffusers, toy, config, steps)
        return
    scheduler = diffusers.DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    x_T = noise_x_T()
    ref = diffusers_loop(toy, scheduler, x_T, seed=1)
    ours = our_loop(toy, scheduler, x_T, 1, "diffusers", steps)
    schedule = dataclasses.replace(
        schedule_from_dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod.double()
    )
    solver = DPMSolverMultistep(**config)
    generator = gen(1)
    truth = reference_loop(
        solver,
        solver.plan(schedule, steps),
        toy,
        x_T.double(),
        lambda x: torch.randn(x.shape, generator=generator).double(),
    )
    assert_close_to_reference(ours, ref, truth)


@pytest.mark.parametrize("solver_class", [DPMSolverMultistep, UniPCMultistep], ids=["dpmsolver++", "unipc"])
@pytest.mark.parametrize(("solver_order", "steps"), [(2, 1), (3, 1), (3, 2)])
def test_fewer_steps_than_order_is_refused(solver_class, solver_order, steps):
    """diffusers lowers the order to the steps there are, silently: we refuse, naming both values."""
    solver, schedule = solver_class(solver_order=solver_order), Schedule.from_config()
    want = f"num_inference_steps={steps} is fewer than solver_order={solver_order}: ask for solver_order <= {steps} "
    with pytest.raises(ValueError, match=want + "or more steps"):
        solver.plan(schedule, steps)
    custom = [900, 500][:steps]
    with pytest.raises(ValueError, match=f"{steps} custom timesteps? (is|are) fewer than solver_order={solver_order}"):
        solver.plan(schedule, timesteps=custom)


def test_plan_timesteps_and_sigmas_cosine_karras(diffusers):
    """Karras sigmas on the cosine schedule: diffusers truncates the float timesteps there instead of
    rounding, and ours come from a float64 log-sigma table where its is fp32, so a timestep that lands
    on an integer can truncate one lower in diffusers (seen: 998 vs our 999, 936 vs 937). Its step
    cannot run this schedule anyway (the repeated first timestep starts its step index at 1)."""
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    scheduler.set_timesteps(25)
    plan = DPMSolverMultistep.from_config(scheduler.config).plan(schedule_from_dict(scheduler.config), 25)
    assert (plan.timesteps - scheduler.timesteps).abs().max() <= 1
    # sigma_0: the cosine a_bar_0 is closer to 1 still, and its fp32 1 - a_bar_0 further off (2.6e-4 seen)
    torch.testing.assert_close(plan.sigmas.float(), scheduler.sigmas, rtol=1e-3, atol=0)


def test_custom_timesteps(diffusers):
    check_against_diffusers(diffusers, toy, dict(solver_order=3), timesteps=[900, 700, 650, 400, 120, 30, 2])


def test_learned_variance(diffusers):
    check_against_diffusers(diffusers, learned_variance_toy, dict(variance_type="learned_range"), 10)


@pytest.fixture(scope="module")
def diffusers_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


@pytest.mark.parametrize(
    "config,steps",
    [
        (dict(solver_order=2), 10),
        (dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 25),
        (dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True), 10),
        (dict(solver_order=1, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"), 25),
    ],
    ids=["o2-ode-10", "o3-sde-karras-25", "o3-ode-v-karras-10", "o1-sde-v-25"],
)
def test_unet(diffusers, diffusers_unet, config, steps):
    with torch.no_grad():
        check_against_diffusers(diffusers, diffusers_unet, config, steps)


# ---------------------------------------------------------------- sensitivity of the comparisons
MIX_COLUMNS = {"x": X, "out": OUT, "d0": D0, "noise": NOISE, "hist": slice(HIST, None)}


def perturb(name):
    """A plan edit: coefficient ``name`` (a field, or a column of x_next's mix row) times 1 + 1e-3 at every step."""
    if name in MIX_COLUMNS:

        def edit(plan):
            mix = plan.mix.clone()
            mix[:, 0, MIX_COLUMNS[name]] *= 1 + 1e-3
            return dataclasses.replace(plan, mix=mix)

        return edit
    return lambda plan: dataclasses.replace(plan, **{name: getattr(plan, name) * (1 + 1e-3)})


@pytest.mark.parametrize(
    "name,config",
    [
        ("to_d_x", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("to_d_out", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("x", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("out", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("hist", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("noise", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
        ("d0", dict(solver_order=3, prediction_type="sample", thresholding=True, sample_max_value=1.5)),
    ],
)
def test_comparison_sees_a_perturbed_coefficient(diffusers, name, config):
    scheduler = diffusers.DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(10)
    x_T = noise_x_T()
    ref = diffusers_loop(toy, scheduler, x_T, seed=1)
    ours = our_loop(toy, scheduler, x_T, 1, "diffusers", 10, plan_edit=perturb(name))
    assert relative_error(ours, ref) > 3 * TABLE


# ---------------------------------------------------------------- the plan
def test_plan_is_float64_on_the_requested_device():
    solver = DPMSolverMultistep(solver_order=3, algorithm_type="sde-dpmsolver++")
    schedule = Schedule.from_config()
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        plan = solver.plan(schedule, 10, device=device)
        for name in ("to_d_x", "to_d_out", "mix", "sigmas"):
            tensor = getattr(plan, name)
            assert tensor.dtype == torch.float64 and tensor.device.type == device, (name, tensor)
        assert plan.timesteps.dtype == plan.write_slot.dtype == torch.int64
        assert plan.timesteps.device.type == plan.write_slot.device.type == device
    plan = solver.plan(schedule, 10)
    assert plan.orders == (1, 2, 3, 3, 3, 3, 3, 3, 2, 1)  # warm-up, then lower_order_final (< 15 steps)
    assert plan.mix.shape == (10, 2, HIST + 2) and plan.write_slot.shape == (10, 1) and plan.stochastic
    assert plan.to("meta").mix.device.type == "meta"
    assert plan.sigmas[-1].item() == 0.0  # final_sigmas_type="zero"


def test_plan_folds_the_conversion_unless_thresholding():
    schedule = Schedule.from_config()
    folded = DPMSolverMultistep(solver_order=2).plan(schedule, 10)
    apart = DPMSolverMultistep(solver_order=2, thresholding=True).plan(schedule, 10)
    folded_row, apart_row = folded.mix[:, 0], apart.mix[:, 0]
    assert (folded_row[:, D0] == 0).all() and (folded_row[:, OUT] != 0).all()
    assert (apart_row[:, OUT] == 0).all() and (apart_row[:, D0] != 0).all()
    b0 = apart_row[:, D0]
    torch.testing.assert_close(folded_row[:, X], apart_row[:, X] + b0 * apart.to_d_x, rtol=1e-12, atol=0)
    torch.testing.assert_close(folded_row[:, OUT], b0 * apart.to_d_out, rtol=1e-12, atol=0)
    # the ring: D_0 (alone) goes into slot s mod 1
    assert (folded.mix[:, 1, D0] == 1).all() and (folded.mix[:, 1].abs().sum(1) == 1).all()
    assert apart.x0_limit is not None and folded.x0_limit is None


def test_x0_limits():
    x0 = 3 * noise_x_T()
    torch.testing.assert_close(X0Limit("clip", clip_range=2.0)(x0), x0.clamp(-2, 2), rtol=0, atol=0)
    dynamic = X0Limit("dynamic", ratio=0.9, max_value=2.5)(x0)
    torch.testing.assert_close(dynamic, reference.dynamic_threshold(x0, 0.9, 2.5), rtol=0, atol=0)
    assert dynamic.abs().max() <= 1 and x0.abs().max() > 2.5
    with pytest.raises(ValueError, match="kind"):
        X0Limit("quantile")


# ---------------------------------------------------------------- one step: tolerance rule
def step_inputs(plan, step, dtype, seed=3):
    """x, out, the earlier x0 predictions (m1, m2) and noise in ``dtype``, and the history ring
    holding the m's in the slots the plan reads them from."""
    g = gen(seed)
    draw = lambda scale=1.0: (scale * torch.randn(SHAPE, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    x, out, noise = draw(), draw(), draw()
    previous = [draw(1.5) for _ in range(plan.orders[step] - 1)]
    history = new_history(plan, x)
    for j, m in enumerate(previous, start=1):
        history[(step - j) % plan.history_slots] = m
    return x, out, previous, noise, history


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "config",
    [
        dict(solver_order=3),
        dict(solver_order=3, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"),
        dict(solver_order=2, solver_type="heun", prediction_type="sample"),
        dict(solver_order=3, thresholding=True, sample_max_value=3.0),
    ],
    ids=["o3", "o3-sde-v", "o2-heun-x0", "o3-threshold"],
)
def test_step_matches_the_float64_reference(config, dtype):
    solver = DPMSolverMultistep(**config)
    plan = solver.plan(Schedule.from_config(), 10)
    for step in (0, 2, 5, 9):  # order 1 first, full order, last into sigma = 0
        x, out, previous, noise, history = step_inputs(plan, step, dtype)
        fast = apply_step(plan, step, x, out, history, noise)
        args = (solver, plan.sigmas, step, plan.orders[step])
        ref, m0 = reference_step(*args, x, out, previous, noise)
        ref64, m0_64 = reference_step(*args, x.double(), out.double(), [p.double() for p in previous], noise.double())
        assert_close_to_reference(fast, ref.to(dtype), ref64)
        # D_0 went into the ring as the x0 prediction
        assert_close_to_reference(history[plan.write_slot[step, 0]], m0.to(dtype), m0_64)


@pytest.mark.parametrize(
    "config",
    [dict(solver_order=3, algorithm_type="sde-dpmsolver++"), dict(solver_order=3, thresholding=True)],
    ids=["o3-sde", "o3-threshold"],
)
def test_float64_loop_matches_the_reference_loop(config):
    """The ring of history slots over a whole run: run() in float64 against the reference steps fed
    their own x0 predictions (no diffusers needed)."""
    solver = DPMSolverMultistep(**config)
    plan = solver.plan(Schedule.from_config(), 12)
    x_T = noise_x_T().double()
    noises = [torch.randn(SHAPE, generator=gen(s), dtype=torch.float64) for s in range(plan.num_steps)]
    ours_noise, ref_noise = iter(noises), iter(noises)
    ours = run(toy, x_T, plan, lambda x: next(ours_noise))
    ref = reference_loop(solver, plan, toy, x_T, lambda x: next(ref_noise))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_step_index_on_the_device_reads_nothing_on_the_host():
    """A CUDA graph replays the step with the index in a device buffer: same result, no host read."""
    plan = DPMSolverMultistep(solver_order=3, algorithm_type="sde-dpmsolver++").plan(Schedule.from_config(), 10)
    x, out, _, noise, history = step_inputs(plan, 5, torch.float32)
    expected_history = history.clone()
    expected = apply_step(plan, 5, x, out, expected_history, noise)
    index = torch.tensor(5)
    with no_host_reads():
        got = apply_step(plan, index, x, out, history, noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(history, expected_history, rtol=0, atol=0)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=0), "solver_order"),
        (dict(algorithm_type="dpm"), "algorithm_type"),
        (dict(algorithm_type="dpmsolver"), "algorithm_type"),
        (dict(algorithm_type="sde-dpmsolver"), "algorithm_type"),
        (dict(solver_type="euler"), "solver_type"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(variance_type="fixed_small"), "variance_type"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverMultistep(**options)


def test_bad_plans():
    plain = Schedule.from_config()
    zero_snr = Schedule.from_config(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    v = dict(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistep(use_karras_sigmas=True, **v).plan(zero_snr, 10)
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverMultistep().plan(zero_snr, 10)  # epsilon on a zero-terminal-SNR schedule
    trained = Schedule.from_config(trained_betas=[0.01] * 9 + [1.0], num_train_timesteps=10)
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverMultistep().plan(trained, 5)  # the same, from trained betas ending at 1
    DPMSolverMultistep(**v).plan(trained, 5)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):  # refused already by the schedule's config
        schedule_from_dict({"rescale_betas_zero_snr": True})
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            DPMSolverMultistep().plan(plain, steps)
    with pytest.raises(ValueError, match="exactly one"):
        DPMSolverMultistep().plan(plain)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistep(use_karras_sigmas=True).plan(plain, timesteps=[900, 500])
    with pytest.raises(ValueError, match="steps_offset"):
        DPMSolverMultistep(timestep_spacing="leading", steps_offset=200).plan(plain, 4)
    holed = Schedule.from_config(trained_betas=[0.01] * 8 + [1.0, 0.5], num_train_timesteps=10)
    with pytest.raises(ValueError, match="infinite sigma"):  # a_bar = 0 before the end
        DPMSolverMultistep(**v).plan(holed, 5)
    with pytest.raises(ValueError, match="repeated sigmas"):  # a zero step h at order 2
        DPMSolverMultistep(solver_order=2, timestep_spacing="leading").plan(plain, 1000)


def test_from_config():
    assert DPMSolverMultistep.from_config({"solver_order": 3, "beta_schedule": "linear"}).solver_order == 3
    with pytest.raises(ValueError, match="use_lu_lambdas"):
        DPMSolverMultistep.from_config({"use_lu_lambdas": True})
    with pytest.warns(UserWarning, match="clip_sample"):
        DPMSolverMultistep.from_config({"clip_sample": True})
    assert DPMSolverMultistep(algorithm_type="deis", solver_type="bh2").algorithm_type == "dpmsolver++"


def test_bad_step_inputs():
    plan = DPMSolverMultistep(algorithm_type="sde-dpmsolver++").plan(Schedule.from_config(), 5)
    x = noise_x_T()
    with pytest.raises(ValueError, match="noise_fn"):
        run(toy, x, plan)
    with pytest.raises(ValueError, match="channels"):
        apply_step(plan, 0, x, torch.cat([x, x], 1), new_history(plan, x))  # 2C without a learned variance
    with pytest.raises(ValueError, match="shape"):
        apply_step(plan, 0, x, x[:1], new_history(plan, x))


def random_plan(steps=3, slots=3, writes=2, limit=None, seed=0):
    """A plan with random coefficients (the interface, not a solver): every column used, writes
    into real slots and into the scratch slot."""
    g = torch.Generator().manual_seed(seed)
    builder = PlanBuilder(steps, slots, writes)
    builder.mix[:] = torch.randn(builder.mix.shape, generator=g, dtype=torch.float64).numpy()
    builder.to_d_x[:], builder.to_d_out[:] = 0.9, -0.4
    for s in range(steps):
        builder.write(s, 0, (s + 1) % slots)
        if s != 1:
            builder.write(s, 1, s % slots)  # step 1's second write goes to the scratch slot
    return builder.build(
        device="cpu",
        timesteps=np.arange(steps)[::-1].copy(),
        sigmas=np.linspace(2, 0, steps + 1),
        orders=[1] * steps,
        draws=[True] * steps,
        x0_limit=limit,
    )


@pytest.mark.parametrize("limit", [None, X0Limit("clip", clip_range=0.5)], ids=["linear", "clip"])
def test_apply_step_is_the_mix_of_its_inputs(limit):
    """The generic update written out element by element in float64: x_next from row 0, each write
    from its row, all reads before the writes (write 0 of step s lands in the slot step s reads)."""
    plan = random_plan(limit=limit)
    g = gen(5)
    x, out, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    history = torch.randn((plan.history_slots + 1, *SHAPE), generator=g, dtype=torch.float64)
    for step in range(plan.num_steps):
        before = history.clone()
        got = apply_step(plan, step, x, out, history, noise)
        d0 = 0.9 * x - 0.4 * out
        if limit is not None:
            d0 = d0.clamp(-0.5, 0.5)
        values = [x, out, d0, noise, *before[:-1]]
        rows = [sum(plan.mix[step, k, c].item() * v for c, v in enumerate(values)) for k in range(3)]
        torch.testing.assert_close(got, rows[0], rtol=1e-12, atol=1e-12)
        expected = before.clone()
        for k in range(2):
            expected[plan.write_slot[step, k]] = rows[1 + k]
        torch.testing.assert_close(history[:-1], expected[:-1], rtol=1e-12, atol=1e-12)


def test_plan_checks_its_shapes():
    plan = random_plan()
    assert (plan.history_slots, plan.num_writes, plan.stochastic) == (3, 2, True)
    with pytest.raises(ValueError, match="write_slot"):
        dataclasses.replace(plan, write_slot=plan.write_slot[:, :1])
    with pytest.raises(ValueError, match="mix"):
        dataclasses.replace(plan, mix=plan.mix[:, :, :3])
    with pytest.raises(ValueError, match="draws"):
        dataclasses.replace(plan, draws=(True,))
    with pytest.raises(ValueError, match="timesteps"):
        dataclasses.replace(plan, timesteps=plan.timesteps.double())
    with pytest.raises(ValueError, match="slot"):
        PlanBuilder(2, 2, 1).write(0, 0, 2)
