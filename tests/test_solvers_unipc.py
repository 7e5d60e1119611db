"""ddpm_fast.solvers.unipc: UniPC multistep as a plan (issue 17).

- Whole sampling loops equal diffusers' ``UniPCMultistepScheduler`` loop (set_timesteps,
  init_noise_sigma, scale_model_input, model, step) on the toy model x t / (t + 1) over bh1 / bh2 x
  orders 1-3 x 10 / 25 steps x Karras x eps / v, the options, and on a tiny seeded UNet2DModel for a
  few cases; each on diffusers' own fp32 table (upcast: the solver maths alone, TIGHT) and on our
  float64 table (TABLE, as test_solvers.py). Where diffusers' last update into sigma = 0 is NaN
  (bh1, or ``predict_x0=False``: inf * 0), its h -> infinity limit from diffusers' own state stands
  in for it (``diffusers_loop``), and a test shows the NaN.
- One planned step (UniC then UniP, both writes) in float32 / bf16 / fp16 against the float64
  reference step written as diffusers writes it (the tolerance rule); a float64 loop over plan
  steps against a float64 loop over reference steps (the ring and the saved sample).
- The comparisons are shown to see a 1e-3 change of any one coefficient, the writes included.
"""

import dataclasses
import warnings

import pytest
import torch
from conftest import assert_close_to_reference
from host_reads import no_host_reads
from test_sampler import TINY_UNET
from test_solvers import SHAPE, TIGHT, gen, noise_x_T, perturb, relative_error, table_tolerance, toy

from ddpm_fast import Schedule
from ddpm_fast.solvers import apply_step, new_history, run, schedule_from_dict
from ddpm_fast.solvers.base import D0, HIST, OUT, X
from ddpm_fast.solvers.unipc import UniPCMultistep, reference_step

# diffusers 0.42 under numpy 2 (its set_timesteps' np.array of a tensor), not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def nan_into_zero(config):
    """Whether diffusers' last update (into sigma = 0) computes inf * 0 = NaN for this config."""
    return config.final_sigmas_type == "zero" and (config.solver_type == "bh1" or not config.predict_x0)


def diffusers_loop(model, scheduler, x_T):
    """diffusers' manual loop. Where its last update into sigma = 0 is NaN (``nan_into_zero``), the
    result is that update's h -> infinity limit taken from its own state: the x0 prediction m_s, or
    in the eps form x_s^c / alpha_s - sigma_s eps_s (x_s^c the corrected sample UniP started from)."""
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        out = getattr(out, "sample", out)
        x = scheduler.step(out, t, x).prev_sample
    if nan_into_zero(scheduler.config):
        m = scheduler.model_outputs[-1]
        sigma = scheduler.sigmas[-2]
        x = m if scheduler.config.predict_x0 else scheduler.last_sample * (sigma**2 + 1) ** 0.5 - sigma * m
    return x


def our_loop(model, scheduler, x_T, table, steps=None, timesteps=None, plan_edit=None):
    """Our plan + run from the diffusers scheduler's config, on our float64 table or (table="diffusers")
    on its fp32 one upcast."""
    schedule = schedule_from_dict(scheduler.config)
    if table == "diffusers":
        schedule = dataclasses.replace(schedule, alphas_cumprod=scheduler.alphas_cumprod.double())
    plan = UniPCMultistep.from_config(scheduler.config).plan(schedule, steps, timesteps)
    assert torch.equal(plan.timesteps, scheduler.timesteps), (plan.timesteps, scheduler.timesteps)
    if plan_edit is not None:
        plan = plan_edit(plan)
    return run(model, x_T, plan)


def diffusers_scheduler(diffusers, config, steps):
    scheduler = diffusers.UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    return scheduler


def check_against_diffusers(diffusers, model, config, steps, shape=SHAPE, rule=False):
    """Both tables against one diffusers run; returns diffusers' result. ``rule``: for runs whose fp32
    arithmetic is ill-conditioned (diffusers' own error above TIGHT), the tolerance rule instead: on
    each table, our error against a float64 reference loop there is at most 2x diffusers' own against
    the float64 loop on its table, plus 1e-6."""
    scheduler = diffusers_scheduler(diffusers, config, steps)
    x_T = noise_x_T(0, shape)
    ref = diffusers_loop(model, scheduler, x_T)
    assert torch.isfinite(ref).all()
    ours = {table: our_loop(model, scheduler, x_T, table, steps) for table in ("diffusers", "ours")}
    if rule:
        solver = UniPCMultistep.from_config(scheduler.config)
        schedules = {"ours": schedule_from_dict(scheduler.config)}
        schedules["diffusers"] = dataclasses.replace(
            schedules["ours"], alphas_cumprod=scheduler.alphas_cumprod.double()
        )
        truth = {k: reference_loop(solver, solver.plan(v, steps), model, x_T.double()) for k, v in schedules.items()}
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


def reference_loop(solver, plan, model, x):
    """A sampling loop over ``reference_step`` (diffusers' form of each step), fed its own
    predictions and corrected samples."""
    previous, saved = [], None
    correct = solver.corrector_orders(plan.num_steps)
    for s in range(plan.num_steps):
        out = model(x, plan.timesteps[s].expand(x.shape[0]))
        last = saved if correct[s] else None
        x, m, saved = reference_step(solver, plan.sigmas, s, plan.orders[s], x, out, previous, last, correct[s])
        previous = [m, *previous][: solver.solver_order]
    return x


# ---------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_toy_model_grid(diffusers, solver_type, solver_order, steps, use_karras_sigmas, prediction_type):
    config = dict(
        solver_type=solver_type,
        solver_order=solver_order,
        use_karras_sigmas=use_karras_sigmas,
        prediction_type=prediction_type,
    )
    check_against_diffusers(diffusers, toy, config, steps)


OPTION_CASES = {
    "eps-form": dict(predict_x0=False, solver_order=3),
    "eps-form-sample-bh1": dict(predict_x0=False, prediction_type="sample", solver_type="bh1"),
    "eps-form-v-sigma_min": dict(predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    "eps-form-threshold-ignored": dict(predict_x0=False, thresholding=True, sample_max_value=0.5),
    "threshold-sample": dict(prediction_type="sample", thresholding=True, sample_max_value=1.5, solver_order=3),
    "threshold-eps-bh1": dict(thresholding=True, solver_type="bh1", dynamic_thresholding_ratio=0.9),
    "sigma_min": dict(final_sigmas_type="sigma_min", solver_order=3),
    "sigma_min-karras-bh1": dict(final_sigmas_type="sigma_min", use_karras_sigmas=True, solver_type="bh1"),
    "no-lower-order-final": dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"),
    "disable_corrector": dict(disable_corrector=[0, 1, 4, 8], solver_order=3),
    "disable_corrector-all-bh1": dict(disable_corrector=list(range(10)), solver_type="bh1"),
    "midpoint-is-bh2": dict(solver_type="midpoint"),
    "leading-offset": dict(timestep_spacing="leading", steps_offset=1, solver_order=3),
    "trailing": dict(timestep_spacing="trailing", prediction_type="v_prediction"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", solver_order=3),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "zero-snr-v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    "zero-snr-sample-bh1": dict(
        rescale_betas_zero_snr=True, prediction_type="sample", solver_type="bh1", solver_order=3
    ),
    "short-T": dict(num_train_timesteps=100, solver_order=3),
}


# fp32 ill-conditioned runs, judged by the tolerance rule (seen: diffusers 5.6e-5 and 7.5e-6 from the
# float64 loop, ours 2.5e-5 and 6.7e-6): the cosine schedule's sigma_T = 2e4 makes x0 = (x - sigma_vp eps)
# / alpha cancel to ~1e-3 of x at the first step; without lower-order final steps the last order-3 step
# extrapolates from sigma 0.34 to 0.01 (h = 3.5), amplifying the predictions' rounding.
ILL_CONDITIONED = ("cosine", "no-lower-order-final")


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_toy_model_options(diffusers, case):
    check_against_diffusers(diffusers, toy, OPTION_CASES[case], 10, rule=case in ILL_CONDITIONED)


def test_thresholding_and_corrector_are_active(diffusers):
    """The thresholding and disable_corrector cases change the result (else they would test nothing
    more than the plain one)."""
    config = OPTION_CASES["threshold-sample"]
    clipped = check_against_diffusers(diffusers, toy, config, 10)
    plain = check_against_diffusers(diffusers, toy, {**config, "thresholding": False}, 10)
    assert (clipped - plain).abs().max() > 0.1
    config = OPTION_CASES["disable_corrector"]
    without = check_against_diffusers(diffusers, toy, config, 10)
    corrected = check_against_diffusers(diffusers, toy, {**config, "disable_corrector": []}, 10)
    assert (without - corrected).abs().max() > 10 * TIGHT


def test_the_last_step_into_sigma_zero_is_the_limit(diffusers):
    """diffusers' order-1 update into sigma = 0 is NaN where it computes inf * 0 (bh1: B(h) = -h; the
    eps form: sigma_t (e^h - 1)); its bh2 x0 form gives the update's limit, the x0 prediction m_s,
    exactly. Ours is that limit in every form (the eps form's, x^c / alpha - sigma eps, is checked
    against diffusers' state in ``diffusers_loop``); in the x0 form the last mix row is the conversion alone."""
    x_T = noise_x_T()
    for config in (dict(solver_type="bh1"), dict(predict_x0=False), dict()):
        scheduler = diffusers_scheduler(diffusers, config, 10)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(toy(x, t.expand(x.shape[0])), t, x).prev_sample
        if nan_into_zero(scheduler.config):
            assert torch.isnan(x).all()
        else:
            assert torch.equal(x, scheduler.model_outputs[-1])
    plan = UniPCMultistep(solver_order=3, solver_type="bh1").plan(Schedule.from_config(), 10)
    expected = torch.zeros_like(plan.mix[-1, 0])
    expected[X], expected[OUT] = plan.to_d_x[-1], plan.to_d_out[-1]
    torch.testing.assert_close(plan.mix[-1, 0], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "orders,config",
    [
        ((1,), {}),
        ((1, 1), {}),
        ((1, 2), dict(lower_order_final=False, final_sigmas_type="sigma_min")),
        ((1, 2, 1), {}),
    ],
    ids=["1", "2", "2-no-lower-order-final", "3"],
)
def test_as_many_steps_as_the_order(diffusers, orders, config):
    """steps == solver_order, the fewest steps of that order: diffusers' warm-up (and, with
    lower_order_final, the steps left) lowers the order of the first and last: so do we. Few steps
    are long ones, ill-conditioned in fp32 (one step jumps from sigma_T to 0, where
    x0 = (x - sigma_vp eps) / alpha cancels to ~1e-3 of x; without lower-order final steps the second
    of two is an order-2 step from sigma 3.4 to 0.01): the tolerance rule judges."""
    steps = len(orders)
    config = dict(solver_order=steps, **config)
    assert UniPCMultistep(**config).step_orders(steps) == orders
    check_against_diffusers(diffusers, toy, config, steps, rule=True)


def test_custom_timesteps(diffusers):
    """diffusers' UniPC set_timesteps takes no custom timesteps; its scheduler is given them the way
    set_timesteps would set them (sigmas from its table at those timesteps, then 0)."""
    ts = [900, 700, 650, 400, 120, 30, 2]
    scheduler = diffusers_scheduler(diffusers, dict(solver_order=3), len(ts))
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
    scheduler.timesteps = torch.tensor(ts)
    scheduler.sigmas = torch.cat([table[ts], torch.zeros(1)])
    x_T = noise_x_T()
    ref = diffusers_loop(toy, scheduler, x_T)
    for table_kind in ("diffusers", "ours"):
        assert relative_error(our_loop(toy, scheduler, x_T, table_kind, timesteps=ts), ref) <= TIGHT


@pytest.fixture(scope="module")
def diffusers_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


@pytest.mark.parametrize(
    "config,steps",
    [
        (dict(solver_order=2), 10),
        (dict(solver_order=3, solver_type="bh1", use_karras_sigmas=True), 25),
        (dict(solver_order=3, prediction_type="v_prediction", disable_corrector=[2]), 10),
        (dict(solver_order=2, predict_x0=False, final_sigmas_type="sigma_min"), 10),
    ],
    ids=["o2-bh2-10", "o3-bh1-karras-25", "o3-v-disable-10", "o2-eps-form-sigma_min-10"],
)
def test_unet(diffusers, diffusers_unet, config, steps):
    with torch.no_grad():
        check_against_diffusers(diffusers, diffusers_unet, config, steps)


# ---------------------------------------------------------------- sensitivity of the comparisons
def perturb_write(k):
    """A plan edit: the row of write k (0: the prediction into the ring, 1: the corrected sample) times 1 + 1e-3."""

    def edit(plan):
        mix = plan.mix.clone()
        mix[:, 1 + k] *= 1 + 1e-3
        return dataclasses.replace(plan, mix=mix)

    return edit


@pytest.mark.parametrize(
    "name,config",
    [
        ("to_d_x", dict(solver_order=3)),
        ("to_d_out", dict(solver_order=3)),
        ("x", dict(solver_order=3)),
        ("out", dict(solver_order=3)),
        ("hist", dict(solver_order=3)),
        ("write-prediction", dict(solver_order=3)),
        ("write-corrected", dict(solver_order=3)),
        ("d0", dict(solver_order=3, prediction_type="sample", thresholding=True, sample_max_value=1.5)),
    ],
)
def test_comparison_sees_a_perturbed_coefficient(diffusers, name, config):
    scheduler = diffusers_scheduler(diffusers, config, 10)
    x_T = noise_x_T()
    ref = diffusers_loop(toy, scheduler, x_T)
    edit = perturb_write(["write-prediction", "write-corrected"].index(name)) if "write" in name else perturb(name)
    ours = our_loop(toy, scheduler, x_T, "diffusers", 10, plan_edit=edit)
    assert relative_error(ours, ref) > 3 * TIGHT


# ---------------------------------------------------------------- the plan
def test_plan_layout():
    solver = UniPCMultistep(solver_order=3, disable_corrector=[4])
    assert solver.step_orders(10) == (1, 2, 3, 3, 3, 3, 3, 3, 2, 1)  # warm-up, then the steps left
    assert solver.step_orders(30)[-3:] == (3, 2, 1)  # lower_order_final whatever the count (DPM: < 15)
    assert UniPCMultistep(solver_order=3, lower_order_final=False).step_orders(5) == (1, 2, 3, 3, 3)
    assert solver.corrector_orders(10) == (0, 1, 2, 3, 3, 0, 3, 3, 3, 2)
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        plan = solver.plan(Schedule.from_config(), 10, device=device)
        for name in ("to_d_x", "to_d_out", "mix", "sigmas"):
            tensor = getattr(plan, name)
            assert tensor.dtype == torch.float64 and tensor.device.type == device, (name, tensor)
    plan = solver.plan(Schedule.from_config(), 10)
    # ring slots 0-2, the corrected sample in slot 3, scratch 4; two writes, no noise
    assert plan.mix.shape == (10, 3, HIST + 4) and plan.write_slot.shape == (10, 2) and not plan.stochastic
    assert plan.write_slot[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 4]  # the last prediction is never read
    assert plan.write_slot[:, 1].tolist() == [3, 3, 3, 3, 4, 3, 3, 3, 3, 4]  # step 5 does not correct
    assert (plan.mix[:9, 1, D0] == 1).all() and (plan.mix[:9, 1].abs().sum(1) == 1).all()
    # x_next reads the saved sample where UniC runs (not at the last step, whose x0 limit drops x^c)
    assert (plan.mix[:9, 0, HIST + 3] != 0).tolist() == [c > 0 for c in solver.corrector_orders(10)[:9]]
    assert plan.sigmas[-1].item() == 0.0 and plan.x0_limit is None


def test_plan_folds_the_conversion_unless_thresholding():
    schedule = Schedule.from_config()
    folded = UniPCMultistep(solver_order=2).plan(schedule, 10)
    apart = UniPCMultistep(solver_order=2, thresholding=True).plan(schedule, 10)
    for k in (0, 2):  # x_next, and the corrected sample (a write)
        f, a = folded.mix[:, k], apart.mix[:, k]
        assert (f[:, D0] == 0).all() and (a[:, OUT] == 0).all()
        b = a[:, D0]
        torch.testing.assert_close(f[:, X], a[:, X] + b * apart.to_d_x, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(f[:, OUT], b * apart.to_d_out, rtol=1e-12, atol=1e-15)
    assert apart.x0_limit is not None and folded.x0_limit is None
    assert UniPCMultistep(thresholding=True, predict_x0=False).plan(schedule, 10).x0_limit is None


# ---------------------------------------------------------------- one step: tolerance rule
def step_inputs(solver, plan, step, dtype, seed=3):
    """x, out, the earlier predictions m_{s-1}, ... (newest first), the saved sample (or None) and
    the history holding them where the plan reads them."""
    g = gen(seed)
    draw = lambda scale=1.0: (scale * torch.randn(SHAPE, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    x, out = draw(), draw()
    previous = [draw(1.5) for _ in range(min(step, solver.solver_order))]
    saved = draw() if solver.corrector_orders(plan.num_steps)[step] else None
    history = new_history(plan, x)
    for j, m in enumerate(previous, start=1):
        history[(step - j) % solver.solver_order] = m
    if saved is not None:
        history[solver.solver_order] = saved
    return x, out, previous, saved, history


STEP_CONFIGS = {
    "o3-bh2": dict(solver_order=3),
    "o3-bh1-v": dict(solver_order=3, solver_type="bh1", prediction_type="v_prediction"),
    "o2-eps-form-x0": dict(solver_order=2, predict_x0=False, prediction_type="sample"),
    "o3-threshold": dict(solver_order=3, thresholding=True, sample_max_value=3.0),
    "o1-bh1": dict(solver_order=1, solver_type="bh1"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_matches_the_float64_reference(config, dtype):
    solver = UniPCMultistep(**STEP_CONFIGS[config])
    plan = solver.plan(Schedule.from_config(), 10)
    correct = solver.corrector_orders(10)
    for step in (0, 1, 2, 5, 9):  # no UniC; UniC-1 and UniP-2; full orders; the last into sigma = 0
        x, out, previous, saved, history = step_inputs(solver, plan, step, dtype)
        fast = apply_step(plan, step, x, out, history)
        args = (solver, plan.sigmas, step, plan.orders[step])
        ref, m, x_c = reference_step(*args, x, out, previous, saved, correct[step])
        up = lambda t: None if t is None else t.double()  # noqa: E731
        ref64, m64, x_c64 = reference_step(
            *args, x.double(), out.double(), [p.double() for p in previous], up(saved), correct[step]
        )
        assert_close_to_reference(fast, ref.to(dtype), ref64)
        if step < 9:  # the writes: m_s into the ring, x_s^c where the next step corrects from it
            assert_close_to_reference(history[plan.write_slot[step, 0]], m.to(dtype), m64)
            assert_close_to_reference(history[plan.write_slot[step, 1]], x_c.to(dtype), x_c64)


@pytest.mark.parametrize("config", ["o3-bh2", "o3-bh1-v", "o3-threshold", "eps-form", "disable"])
def test_float64_loop_matches_the_reference_loop(config):
    """The ring and the saved sample over a whole run: run() in float64 against the reference steps
    fed their own predictions and corrected samples (no diffusers needed)."""
    options = {
        **STEP_CONFIGS,
        "eps-form": dict(solver_order=3, predict_x0=False, prediction_type="v_prediction"),
        "disable": dict(solver_order=3, disable_corrector=[0, 3, 4]),
    }[config]
    solver = UniPCMultistep(**options)
    plan = solver.plan(Schedule.from_config(), 12)
    x_T = noise_x_T().double()
    torch.testing.assert_close(run(toy, x_T, plan), reference_loop(solver, plan, toy, x_T), rtol=1e-12, atol=1e-12)


def test_step_index_on_the_device_reads_nothing_on_the_host():
    solver = UniPCMultistep(solver_order=3)
    plan = solver.plan(Schedule.from_config(), 10)
    x, out, _, _, history = step_inputs(solver, plan, 5, torch.float32)
    expected_history = history.clone()
    expected = apply_step(plan, 5, x, out, expected_history)
    with no_host_reads():
        got = apply_step(plan, torch.tensor(5), x, out, history)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(history, expected_history, rtol=0, atol=0)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=0), "solver_order"),
        (dict(solver_order=True), "solver_order"),
        (dict(solver_type="euler"), "solver_type"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(disable_corrector=[0.5]), "disable_corrector"),
        (dict(dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        UniPCMultistep(**options)


def test_bad_plans():
    plain = Schedule.from_config()
    zero_snr = Schedule.from_config(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    v = dict(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        UniPCMultistep(use_karras_sigmas=True, **v).plan(zero_snr, 10)
    with pytest.raises(ValueError, match="prediction_type"):
        UniPCMultistep().plan(zero_snr, 10)  # epsilon on a zero-terminal-SNR schedule
    with pytest.raises(ValueError, match="lower_order_final"):  # order 2 into sigma = 0: diffusers gives inf
        UniPCMultistep(lower_order_final=False).plan(plain, 10)
    UniPCMultistep(lower_order_final=False, final_sigmas_type="sigma_min").plan(plain, 10)
    with pytest.raises(ValueError, match="repeated sigmas"):  # a zero step h at order 2
        UniPCMultistep(timestep_spacing="leading").plan(plain, 1000)
    # order 1 divides by no step (diffusers steps it): x stays where the sigmas repeat
    assert UniPCMultistep(timestep_spacing="leading", solver_order=1).plan(plain, 1000).mix.isfinite().all()
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            UniPCMultistep().plan(plain, steps)
    with pytest.raises(ValueError, match="exactly one"):
        UniPCMultistep().plan(plain)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        UniPCMultistep(use_karras_sigmas=True).plan(plain, timesteps=[900, 500])
    holed = Schedule.from_config(trained_betas=[0.01] * 8 + [1.0, 0.5], num_train_timesteps=10)
    with pytest.raises(ValueError, match="infinite sigma"):
        UniPCMultistep(**v).plan(holed, 5)


def test_from_config(diffusers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of diffusers' own config is known
        solver = UniPCMultistep.from_config(dict(diffusers.UniPCMultistepScheduler(disable_corrector=[1]).config))
    assert solver == UniPCMultistep(disable_corrector=(1,))
    for key, value in [("solver_p", object()), ("use_flow_sigmas", True), ("sigma_min", 0.1), ("flow_shift", 3.0)]:
        with pytest.raises(ValueError, match=key):
            UniPCMultistep.from_config({key: value})
    with pytest.warns(UserWarning, match="clip_sample"):
        UniPCMultistep.from_config({"clip_sample": True})
    assert UniPCMultistep.from_config({"solver_type": "logrho"}).solver_type == "bh2"
