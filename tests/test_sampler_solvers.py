"""sample() with the few-step solvers (issue 17): one loop over every plan.

- ``sample(model, scheduler=<diffusers scheduler>, noise="torch", generator=g)`` equals diffusers'
  manual loop (init_noise_sigma, scale_model_input, model, step with g) on a tiny seeded
  UNet2DModel for DPM-Solver++ (ODE and SDE), UniPC, Euler, Euler ancestral and Heun, on the fused
  step (cpp) and the reference step, and leaves the scheduler's state alone;
- the fused step in the loop equals the reference step in the loop (kernel noise, guidance, a
  learned variance's extra channels, chunks); "pc" in sample() equals its own plan loop;
- the captured loop (a fake CUDA graph on the CPU) equals the eager loop bit for bit, the
  multistep history reset per chunk; no host reads after the first step;
- scheduler names and configs: our training config gives its schedule and prediction type only;
  a diffusers config's solver options are honoured, and so are ``scheduler_options`` (over either),
  which may not touch the noise schedule.
"""

import contextlib
import inspect

import pytest
import torch
from host_reads import no_host_reads
from test_sampler import LabelledToy, fake_graphs, gen, tiny_diffusers_unet, tiny_unet, toy
from test_solvers import TABLE, TABLE_SIGMA_0

from ddpm_fast import Schedule, SchedulerConfig, sample
from ddpm_fast import sampler as ddpm_sampler
from ddpm_fast.solvers import HeunDiscrete, PredictorCorrector, pc_step, resolve, run, sampling_option_names
from ddpm_fast.solvers.base import schedule_from_dict

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

# (diffusers class, its options): the rows of the table that diffusers has
DIFFUSERS_CASES = {
    "dpm-2m": ("DPMSolverMultistepScheduler", dict(solver_order=2)),
    "dpm-sde-3m-karras": (
        "DPMSolverMultistepScheduler",
        dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    ),
    "unipc-bh2-o3": ("UniPCMultistepScheduler", dict(solver_order=3)),
    # bh1 into sigma = 0 is NaN in diffusers (inf * 0; see test_solvers_unipc): end at sigma_min
    "unipc-bh1-v": (
        "UniPCMultistepScheduler",
        dict(solver_type="bh1", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
}


def diffusers_manual_loop(model, scheduler, shape, seed, steps):
    """diffusers' loop: x_T from the generator times init_noise_sigma, then scale_model_input,
    model, step with the same generator."""
    generator = gen(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(shape[0])).sample
        step_kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x


def relative_error(ours, ref):
    return ((ours - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_sample_equals_the_diffusers_loop(diffusers, case, backend):
    cls_name, options = DIFFUSERS_CASES[case]
    unet = tiny_diffusers_unet(diffusers)
    scheduler = getattr(diffusers, cls_name)(**options)
    before = dict(scheduler.config), scheduler.timesteps.clone()
    ours = sample(
        unet,
        batch_size=2,
        num_inference_steps=10,
        scheduler=scheduler,
        noise="torch",
        generator=gen(0),
        dtype=torch.float32,
        backend=backend,
        progress=False,
    )
    assert dict(scheduler.config) == before[0] and torch.equal(scheduler.timesteps, before[1])  # untouched
    ref = diffusers_manual_loop(unet, getattr(diffusers, cls_name)(**options), (2, 3, 8, 8), 0, 10)
    assert torch.isfinite(ref).all()
    uses_sigma_0 = options.get("use_karras_sigmas") or options.get("final_sigmas_type") == "sigma_min"
    limit = TABLE_SIGMA_0 if uses_sigma_0 else TABLE  # our float64 table vs diffusers' fp32 (test_solvers)
    assert relative_error(ours, ref) <= limit


SCHEDULERS = {  # name -> its options, covering noise, multistep history and two-stage steps
    "dpmsolver++": dict(solver_order=3, algorithm_type="sde-dpmsolver++"),
    "unipc": dict(solver_order=3),
    "euler_ancestral": {},
    "heun": {},
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_fused_loop_equals_the_reference_loop(name):
    """Kernel noise (the same Philox stream on both paths), classifier-free guidance, chunks of 2
    and 1: the cpp step against the reference step, under the fp32 tolerance."""
    kw = dict(shape=(2, 5, 7), batch_size=3, chunk_size=2, class_labels=[0, 2, 1], guidance_scale=2.5)
    kw.update(scheduler=name, scheduler_config=SCHEDULERS[name], num_inference_steps=8, progress=False)
    fused = sample(LabelledToy(), generator=gen(1), backend="cpp", **kw)
    ref = sample(LabelledToy(), generator=gen(1), backend="reference", **kw)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_learned_variance_channels_are_ignored():
    """A model with a learned variance returns 2C channels; the solvers read the first C."""

    def two_c(x, t):
        return torch.cat([toy(x, t), torch.full_like(x, 7.0)], 1)

    kw = dict(shape=(3, 4, 4), batch_size=2, num_inference_steps=6, progress=False)
    config = dict(variance_type="learned_range", solver_order=2)
    with_var = sample(two_c, scheduler="dpmsolver++", scheduler_config=config, generator=gen(2), **kw)
    without = sample(toy, scheduler="dpmsolver++", scheduler_config=dict(solver_order=2), generator=gen(2), **kw)
    torch.testing.assert_close(with_var, without, rtol=0, atol=0)
    with pytest.raises(ValueError, match="6 channels .*learned_range"):
        sample(two_c, scheduler="dpmsolver++", **kw)


def test_pc_in_sample_equals_its_plan_loop():
    """'pc' (predictor + Langevin corrector) through sample() equals run() over its plan with the same noise."""
    kw = dict(shape=(2, 4, 4), batch_size=2, num_inference_steps=12, progress=False)
    config = dict(num_train_timesteps=100, corrector_steps=1)

    def model(x, t):  # a Gaussian's eps is linear in x (toy's eps vanishes at t = 0: a Langevin step's 0 / 0)
        return 0.5 * x + 0.1

    ours = sample(model, scheduler="pc", scheduler_config=config, noise="torch", generator=gen(3), **kw)
    solver = PredictorCorrector(corrector_steps=1)
    plan = solver.plan(schedule_from_dict(config), 12)
    generator = gen(3)
    x_T = torch.randn((2, 2, 4, 4), generator=generator)
    ref = run(model, x_T, plan, lambda x: torch.randn(x.shape, generator=generator), step_fn=pc_step)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert plan.num_steps == 24  # one corrector call and one predictor call per timestep


@pytest.mark.parametrize("noise", ["kernel", "torch", "per-image"])
@pytest.mark.parametrize("name", ["dpmsolver++", "heun"])
def test_graph_replay_equals_eager(monkeypatch, name, noise):
    """The captured loop on the CPU (fake graphs): static t and step rows, the history buffers
    reused and zeroed per chunk (chunks of 2, 2, 1), torch noise from one generator or one per
    image: the eager loop's images bit for bit, and the graphs replayed every step after warm-up."""
    made = fake_graphs(monkeypatch)
    monkeypatch.setattr(ddpm_sampler, "_any_cpu", lambda generators: False)  # CPU generators as CUDA ones
    options = dict(solver_order=3, algorithm_type="sde-dpmsolver++") if name == "dpmsolver++" else {}
    kw = dict(shape=(2, 3, 3), batch_size=5, chunk_size=2, class_labels=[0, 1, 2, 1, 0], guidance_scale=2.0)
    kw.update(scheduler=name, scheduler_config=dict(num_train_timesteps=100, **options), num_inference_steps=8)
    kw.update(noise="torch" if noise != "kernel" else "kernel", backend="cpp", progress=False)
    make = (lambda: [gen(i) for i in range(5)]) if noise == "per-image" else (lambda: gen(0))
    graphed = sample(LabelledToy(), generator=make(), **kw)
    eager = sample(LabelledToy(), generator=make(), cuda_graph=False, **kw)
    assert torch.equal(graphed, eager)
    calls = 8 if name == "dpmsolver++" else 2 * 8 - 1
    assert len(made) == 2 and sum(g.replays for g in made) == (calls - 1) + calls + (calls - 1)


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc", "euler_ancestral"])
def test_no_host_reads_after_the_first_step(name):
    unet = tiny_unet(seed=3, num_class_embeds=4)
    kw = dict(batch_size=3, class_labels=[0, 2, 1], guidance_scale=2.0, null_class_label=3, num_inference_steps=6)
    kw.update(scheduler=name, backend="cpp", progress=False)
    with contextlib.ExitStack() as guard:

        def enter_after_step_0(i, t, x):
            if i == 0:
                guard.enter_context(no_host_reads())

        guarded = sample(unet, generator=gen(0), callback=enter_after_step_0, **kw)
    assert torch.equal(guarded, sample(unet, generator=gen(0), **kw))


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_fewer_steps_than_the_order_is_an_error(diffusers, name, solver_order):
    """By name and as a diffusers scheduler object (which would lower the order itself), before any
    model call."""
    steps = solver_order - 1
    want = f"num_inference_steps={steps} is fewer than solver_order={solver_order}: ask for solver_order <= {steps}"
    calls = []

    def model(x, t):
        calls.append(t)
        return toy(x, t)

    kw = dict(shape=(3, 4, 4), num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match=want):
        sample(model, scheduler=name, scheduler_config=dict(solver_order=solver_order), **kw)
    cls = {"dpmsolver++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}[name]
    with pytest.raises(ValueError, match=want):
        sample(model, scheduler=getattr(diffusers, cls)(solver_order=solver_order), **kw)
    assert not calls
    assert sample(model, scheduler=name, scheduler_config=dict(solver_order=steps), **kw).isfinite().all()


def test_configs_and_names():
    # our training config (DDPM's clip_sample=True, "leading" spacing): schedule and prediction type only
    trained = SchedulerConfig(num_train_timesteps=200, prediction_type="v_prediction")
    _, heun, source = resolve("heun", trained)
    assert isinstance(heun, HeunDiscrete) and not heun.clip_sample and heun.prediction_type == "v_prediction"
    assert source is trained
    _, dpm, _ = resolve("dpmsolver++", trained)
    assert dpm.timestep_spacing == "linspace"
    # a diffusers-style dict: the solver's options are honoured
    _, dpm, source = resolve("dpmsolver++", dict(solver_order=3, beta_schedule="squaredcos_cap_v2"))
    assert dpm.solver_order == 3 and source.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="solver_order"):
        resolve("unipc", dict(solver_order=4))
    with pytest.raises(ValueError, match="unknown algorithm_type"):
        resolve("dpmsolver++", dict(algorithm_type="dpm3"))
    with pytest.raises(ValueError, match="eta"):
        resolve("euler", None, eta=1.0)


# scheduler_options over our training config -> the same run as a diffusers-style config dict
# holding the schedule and the same options (the path test_sample_equals_the_diffusers_loop covers)
SCHEDULER_OPTION_CASES = {
    "dpmsolver++": dict(solver_order=3, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
    "unipc": dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    "euler": dict(use_karras_sigmas=True, timestep_spacing="trailing"),
    "ddim": dict(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False),
    "ddpm": dict(variance_type="fixed_large", thresholding=True, dynamic_thresholding_ratio=0.9),
}


@pytest.mark.parametrize("name", list(SCHEDULER_OPTION_CASES))
def test_scheduler_options_set_the_sampler(name):
    options = SCHEDULER_OPTION_CASES[name]
    trained = SchedulerConfig(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    schedule_keys = dict(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    kw = dict(shape=(2, 5, 7), batch_size=2, scheduler=name, num_inference_steps=6, progress=False)
    run = lambda **more: sample(toy, generator=gen(0), **kw, **more)  # noqa: E731
    ours = run(scheduler_config=trained, scheduler_options=options)
    assert not torch.equal(ours, run(scheduler_config=trained))  # the options changed the run
    assert torch.equal(ours, run(scheduler_config={**schedule_keys, **options}))
    if name in ("ddpm", "ddim"):  # from a Schedule: the same table, the step and spacing options replaced
        schedule = Schedule.from_config(trained)
        assert torch.equal(ours, run(scheduler_config=schedule, scheduler_options=options))


def test_scheduler_options_errors():
    kw = dict(shape=(1, 4, 4), scheduler="dpmsolver++", num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match="'beta_end' belongs to the noise schedule the model was trained with"):
        sample(toy, scheduler_options=dict(beta_end=0.03), **kw)
    with pytest.raises(ValueError, match="'prediction_type' belongs to the noise schedule"):
        sample(toy, scheduler_options=dict(prediction_type="v_prediction"), **kw)
    with pytest.raises(ValueError, match=r"dpmsolver\+\+ has no option 'eta'; its options: algorithm_type, "):
        sample(toy, scheduler_options=dict(eta=1.0), **kw)
    with pytest.raises(ValueError, match="ddim has no option 'solver_order'"):
        sample(toy, **{**kw, "scheduler": "ddim"}, scheduler_options=dict(solver_order=2))
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3, got 5"):  # the solver checks values
        sample(toy, scheduler_options=dict(solver_order=5), **kw)
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        sample(toy, **{**kw, "scheduler": "ddim"}, scheduler_options=dict(timestep_spacing="even"))
    with pytest.raises(TypeError, match="scheduler_options must be a mapping"):
        sample(toy, scheduler_options=["solver_order=3"], **kw)
    # over a diffusers-style config, the options win; names list what each sampler takes
    _, dpm, _ = resolve("dpmsolver++", dict(solver_order=2, lower_order_final=False), options=dict(solver_order=3))
    assert dpm.solver_order == 3 and not dpm.lower_order_final
    assert "use_karras_sigmas" in sampling_option_names("euler")
    assert not set(sampling_option_names("ddpm")) & {"beta_schedule", "num_train_timesteps", "prediction_type"}


def test_cli_takes_the_names():
    from ddpm_fast import cli

    seen = {}

    def fake_sample(args):
        seen[args.scheduler] = args.steps
        return 0

    for name in ("dpmsolver++", "unipc", "euler", "euler_ancestral", "heun", "pc"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cli, "_sample", fake_sample)
            assert cli.main(["sample", "--checkpoint", "run", "--scheduler", name, "--steps", "20"]) == 0
    assert seen == dict.fromkeys(("dpmsolver++", "unipc", "euler", "euler_ancestral", "heun", "pc"), 20)
