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
  eager       solvers.apply_step (the plain PyTorch update of the same plan)
  compile     torch.compile of apply_step at that step
bytes: the tensors the update must move, each once (fp32): the reads and writes above.
extra_info: GB/s (roofline), speedup_vs_diffusers (diffusers' median / this one's, same group).
CPU: one torch thread (conftest.one_cpu_thread), as the sampler benchmarks.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, compile_fn, kernel_backends, tensor_bytes

from ddpm_fast import Schedule
from ddpm_fast.ops import no_value_checks, solver_step
from ddpm_fast.solvers import DPMSolverMultistep, apply_step, new_history

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
            with no_value_checks():
                return solver_step(plan, STEP, x, out, history, noise=noise, seed=seed, backend=impl)

    # x and out read, x_next written; the history slots read and the writes; the noise when given
    tensors = 3 + plan.history_slots + plan.num_writes + (noise_kind == "given")
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
