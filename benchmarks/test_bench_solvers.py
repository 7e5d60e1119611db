"""solver_step: the cost of one DPM-Solver++ step (the update alone, no model) against diffusers.

Groups ``solver_step-<variant>-<N>x3x32x32``, one step in the middle of a 10-step run (full order),
fp32, N = 8 and 64 images:
  o2          dpmsolver++, solver_order=2       reads x, out, 1 history slot; writes x_next, 1 slot
  o3          dpmsolver++, solver_order=3       reads x, out, 2 slots; writes x_next, 1 slot
  o3-sde      sde-dpmsolver++, order 3, the noise given (the same tensor to every implementation)
  o3-sde-drawn  the same, noise drawn: ours in-kernel (Philox, seed), the others torch.randn
Implementations:
  diffusers   DPMSolverMultistepScheduler.step() (its state reset to the same step before each call;
              the model output converted and pushed into its list of outputs, as in a run)
  cpp         ddpm_fast.ops.solver_step (fused, one pass), under no_value_checks() as a loop calls it
              (entered once around the timing: the context manager itself costs ~1 us a call)
  eager       solvers.apply_step (the plain PyTorch update of the same plan)
  compile     torch.compile of apply_step at that step
bytes: the tensors the update must move, each once (fp32): the reads and writes above.
extra_info: GB/s (roofline), speedup_vs_diffusers (diffusers' median / this one's, same group).
CPU: one torch thread (conftest.one_cpu_thread), as the sampler benchmarks.

The other linear solvers (``test_other_solver_step``): groups ``solver_step-<variant>-64x3x32x32``,
fp32, one step in the middle of a 10-step run (10 sigmas for Heun: 19 model calls), the plan from
``ddpm_fast.solvers`` via ``from_config(dict(scheduler.config))`` on
``schedule_from_dict(scheduler.config)`` (diffusers' defaults for each scheduler):
  unipc-o3        UniPCMultistepScheduler(solver_order=3), bh2, step 5: UniC of order 3 on the saved
                  sample then UniP of order 3; reads x, out, 3 prediction slots, the saved sample;
                  writes x_next, 2 slots (the new prediction, the corrected sample)
  euler           EulerDiscreteScheduler, step 5: reads x, out; writes x_next
  euler-a         EulerAncestralDiscreteScheduler, step 5, the noise given to ours, eager and compile
                  (diffusers' step takes no noise: it draws, as in euler-a-drawn)
  euler-a-drawn   the same, noise drawn: ours in-kernel (Philox, seed), the others torch.randn
  heun-predictor  HeunDiscreteScheduler, call 8 (stage 1, Euler from s_4 to s_5): reads x, out;
                  writes x_next, the saved partial sum (1 slot)
  heun-corrector  call 9 (stage 2, the trapezoid): reads x, out, the saved slot; writes x_next
Implementations as above; diffusers' state is reset before each call to that of a run at this step
(step index; UniPC: model_outputs, timestep_list, last_sample, this_order, lower_order_nums; Heun's
corrector: prev_derivative, dt, sample), and for the Euler family ``diffusers+scale`` is step()
followed by the next call's scale_model_input(): the per-call work outside the model that our step
(which maps one model input to the next, the VE scaling folded in) replaces.
speedup_vs_diffusers is against step() alone. bytes: the tensors this step must move, each once:
x, out, x_next, the history slots with a nonzero coefficient at this step, the writes to real
(non-scratch) slots, and the noise when given.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, compile_fn, kernel_backends, tensor_bytes

from ddpm_fast import Schedule
from ddpm_fast.ops import no_value_checks, solver_step
from ddpm_fast.solvers import (
    DPMSolverMultistep,
    EulerAncestralDiscrete,
    EulerDiscrete,
    HeunDiscrete,
    UniPCMultistep,
    apply_step,
    new_history,
    schedule_from_dict,
)
from ddpm_fast.solvers.base import HIST

diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.usefixtures("one_cpu_thread"),
    # diffusers 0.42 under numpy 2 (its set_timesteps' np.array of a tensor)
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
]

STEPS, STEP = 10, 5  # a step of full order (lower_order_final applies to the last two of 10)
BATCHES = (8, 64)
VARIANTS = {  # name: (DPMSolverMultistepScheduler options, noise: None | "given" | "drawn")
    "o2": (dict(solver_order=2), None),
    "o3": (dict(solver_order=3), None),
    "o3-sde": (dict(solver_order=3, algorithm_type="sde-dpmsolver++"), "given"),
    "o3-sde-drawn": (dict(solver_order=3, algorithm_type="sde-dpmsolver++"), "drawn"),
}
IMPLS = ["diffusers", *kernel_backends(), "eager", "compile"]
_DIFFUSERS_MEDIAN: dict[str, float] = {}


def cases():
    for n in BATCHES:
        for variant in VARIANTS:
            group = f"solver_step-{variant}-{n}x3x32x32"
            for impl in IMPLS:
                yield pytest.param(
                    impl, variant, n, id=f"{impl}-{variant}-{n}", marks=pytest.mark.benchmark(group=group)
                )


@functools.cache
def plan_for(variant: str):
    options, _ = VARIANTS[variant]
    return DPMSolverMultistep(**options).plan(Schedule.from_config(), STEPS, device=DEVICE)


@functools.cache
def compiled(variant: str):
    plan = plan_for(variant)
    return compile_fn(lambda x, out, history, noise: apply_step(plan, STEP, x, out, history, noise))


def diffusers_step(variant: str, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None):
    """scheduler.step() at STEP, its state (step index, order warm-up, earlier outputs) reset each call."""
    options, noise_kind = VARIANTS[variant]
    scheduler = diffusers.DPMSolverMultistepScheduler(**options)
    scheduler.set_timesteps(STEPS, device=DEVICE)
    order = scheduler.config.solver_order
    previous = [torch.randn_like(x) for _ in range(order)]
    t = scheduler.timesteps[STEP]
    generator = torch.Generator(DEVICE).manual_seed(0)

    def fn():
        scheduler._step_index = STEP
        scheduler.lower_order_nums = order
        scheduler.model_outputs = list(previous)
        if noise_kind == "drawn":
            return scheduler.step(out, t, x, generator=generator).prev_sample
        return scheduler.step(out, t, x, variance_noise=noise).prev_sample

    return fn


@pytest.mark.parametrize(("impl", "variant", "n"), list(cases()))
def test_solver_step(roofline, impl, variant, n):
    plan = plan_for(variant)
    _, noise_kind = VARIANTS[variant]
    shape = (n, 3, 32, 32)
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen)
    out = torch.randn(shape, device=DEVICE, generator=gen)
    noise = torch.randn(shape, device=DEVICE, generator=gen) if noise_kind == "given" else None
    history = new_history(plan, x)
    history.normal_(generator=gen)

    if impl == "diffusers":
        fn = diffusers_step(variant, x, out, noise)
    elif impl in ("eager", "compile"):
        step = compiled(variant) if impl == "compile" else functools.partial(apply_step, plan, STEP)
        if noise_kind == "drawn":
            fn = lambda: step(x, out, history, torch.randn(shape, device=DEVICE, generator=gen))  # noqa: E731
        else:
            fn = lambda: step(x, out, history, noise)  # noqa: E731
    else:
        seed = torch.tensor(1234, device=DEVICE) if noise_kind == "drawn" else None

        def fn():
            return solver_step(plan, STEP, x, out, history, noise=noise, seed=seed, backend=impl)

    # x and out read, x_next written; the history slots read and the writes; the noise when given
    tensors = 3 + plan.history_slots + plan.num_writes + (noise_kind == "given")
    with no_value_checks():  # entered once, outside the timed calls
        roofline(fn, bytes_moved=tensor_bytes(shape, torch.float32, tensors))
    group = roofline.benchmark.group
    stats = roofline.benchmark.stats
    if stats is None:
        return
    median = stats.stats.median
    if impl == "diffusers":
        _DIFFUSERS_MEDIAN[group] = median
    elif group in _DIFFUSERS_MEDIAN:
        roofline.benchmark.extra_info["speedup_vs_diffusers"] = _DIFFUSERS_MEDIAN[group] / median


# ---------------------------------------------------------------- UniPC, Euler, Euler ancestral, Heun
OTHER_N = 64
# name: (diffusers scheduler class name, its options, our solver class, step index, noise kind)
OTHER_VARIANTS = {
    "unipc-o3": ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2"), UniPCMultistep, 5, None),
    "euler": ("EulerDiscreteScheduler", {}, EulerDiscrete, 5, None),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, EulerAncestralDiscrete, 5, "given"),
    "euler-a-drawn": ("EulerAncestralDiscreteScheduler", {}, EulerAncestralDiscrete, 5, "drawn"),
    "heun-predictor": ("HeunDiscreteScheduler", {}, HeunDiscrete, 8, None),
    "heun-corrector": ("HeunDiscreteScheduler", {}, HeunDiscrete, 9, None),
}
SIGMA_SCALED = ("Euler", "Heun")  # schedulers whose loop calls scale_model_input before the model


def other_impls(variant: str) -> list[str]:
    scaled = OTHER_VARIANTS[variant][0].startswith(SIGMA_SCALED)
    return ["diffusers", *(["diffusers+scale"] if scaled else []), *kernel_backends(), "eager", "compile"]


def other_cases():
    for variant in OTHER_VARIANTS:
        group = f"solver_step-{variant}-{OTHER_N}x3x32x32"
        for impl in other_impls(variant):
            yield pytest.param(
                impl, variant, id=f"{impl}-{variant}-{OTHER_N}", marks=pytest.mark.benchmark(group=group)
            )


def new_scheduler(variant: str):
    name, options, _, _, _ = OTHER_VARIANTS[variant]
    scheduler = getattr(diffusers, name)(**options)
    scheduler.set_timesteps(STEPS, device=DEVICE)
    return scheduler


@functools.cache
def other_plan(variant: str):
    _, _, solver, _, _ = OTHER_VARIANTS[variant]
    config = dict(new_scheduler(variant).config)
    return solver.from_config(config).plan(schedule_from_dict(config), STEPS, device=DEVICE)


@functools.cache
def other_compiled(variant: str):
    plan, step = other_plan(variant), OTHER_VARIANTS[variant][3]
    return compile_fn(lambda x, out, history, noise: apply_step(plan, step, x, out, history, noise))


def step_tensors(plan, step: int, noise_given: bool) -> int:
    """Full-size tensors one step must move: x, out, x_next, the slots read (nonzero coefficient),
    the writes into real slots (slot R is the scratch), the noise when given."""
    slots = plan.history_slots
    mix = plan.mix[step].cpu()
    reads = int((mix[:, HIST:] != 0).any(0).sum()) if slots else 0
    writes = int((plan.write_slot[step].cpu() != slots).sum()) if plan.num_writes else 0
    return 3 + reads + writes + noise_given


def other_diffusers_step(variant: str, x: torch.Tensor, out: torch.Tensor, scale: bool):
    """scheduler.step() at the variant's step (then, with ``scale``, the next scale_model_input),
    the scheduler's state reset before each call to what a run has there."""
    name, _, _, step, noise_kind = OTHER_VARIANTS[variant]
    scheduler = new_scheduler(variant)
    t = scheduler.timesteps[step]
    t_next = scheduler.timesteps[step + 1]
    generator = torch.Generator(DEVICE).manual_seed(0)
    gen = torch.Generator(DEVICE).manual_seed(1)
    kwargs = {"generator": generator} if noise_kind else {}
    reset = lambda: None  # noqa: E731
    if name == "UniPCMultistepScheduler":
        order = scheduler.config.solver_order
        previous = [torch.randn(x.shape, device=DEVICE, generator=gen) for _ in range(order)]
        last_sample = torch.randn(x.shape, device=DEVICE, generator=gen)
        times = [scheduler.timesteps[step - order + i] for i in range(order)]

        def reset():
            scheduler.model_outputs = list(previous)
            scheduler.timestep_list = list(times)
            scheduler.last_sample = last_sample
            scheduler.this_order = order
            scheduler.lower_order_nums = order

    elif name == "HeunDiscreteScheduler" and step % 2 == 1:  # the corrector: stage 1's saved state
        derivative = torch.randn(x.shape, device=DEVICE, generator=gen)
        saved = torch.randn(x.shape, device=DEVICE, generator=gen)
        dt = float(scheduler.sigmas[step] - scheduler.sigmas[step - 1])

        def reset():
            scheduler.prev_derivative, scheduler.dt, scheduler.sample = derivative, dt, saved

    elif name == "HeunDiscreteScheduler":

        def reset():
            scheduler.prev_derivative, scheduler.dt, scheduler.sample = None, None, None

    def fn():
        scheduler._step_index = step
        scheduler.is_scale_input_called = True
        reset()
        prev = scheduler.step(out, t, x, **kwargs).prev_sample
        return scheduler.scale_model_input(prev, t_next) if scale else prev

    return fn


@pytest.mark.parametrize(("impl", "variant"), list(other_cases()))
def test_other_solver_step(roofline, impl, variant):
    plan = other_plan(variant)
    step, noise_kind = OTHER_VARIANTS[variant][3], OTHER_VARIANTS[variant][4]
    shape = (OTHER_N, 3, 32, 32)
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen)
    out = torch.randn(shape, device=DEVICE, generator=gen)
    noise = torch.randn(shape, device=DEVICE, generator=gen) if noise_kind == "given" else None
    history = new_history(plan, x)
    history.normal_(generator=gen)

    if impl in ("diffusers", "diffusers+scale"):
        fn = other_diffusers_step(variant, x, out, scale=impl == "diffusers+scale")
    elif impl in ("eager", "compile"):
        step_fn = other_compiled(variant) if impl == "compile" else functools.partial(apply_step, plan, step)
        if noise_kind == "drawn":
            fn = lambda: step_fn(x, out, history, torch.randn(shape, device=DEVICE, generator=gen))  # noqa: E731
        else:
            fn = lambda: step_fn(x, out, history, noise)  # noqa: E731
    else:
        seed = torch.tensor(1234, device=DEVICE) if noise_kind == "drawn" else None

        def fn():
            return solver_step(plan, step, x, out, history, noise=noise, seed=seed, backend=impl)

    with no_value_checks():  # entered once, outside the timed calls
        roofline(fn, bytes_moved=tensor_bytes(shape, torch.float32, step_tensors(plan, step, noise_kind == "given")))
    info = roofline.benchmark.extra_info
    info.update(step=step, order=plan.orders[step], tensors=step_tensors(plan, step, noise_kind == "given"))
    stats = roofline.benchmark.stats
    if stats is None:
        return
    group, median = roofline.benchmark.group, stats.stats.median
    if impl == "diffusers":
        _DIFFUSERS_MEDIAN[group] = median
    elif group in _DIFFUSERS_MEDIAN:
        info["speedup_vs_diffusers"] = _DIFFUSERS_MEDIAN[group] / median
