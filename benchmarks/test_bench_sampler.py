"""sample(): images/s against diffusers' pipelines with the same U-Net, the same steps, the same device.

Groups:
  sampler-unet-<model>-<kind><steps>-b<batch>   a U-Net sampling run, end to end (x_T draw to output)
    diffusers       DDPMPipeline / DDIMPipeline(output_type="pt"), progress bar off; on CUDA the
                    U-Net cast to bf16 (diffusers' usual half-precision setup)
    ddpm_fast       sample() with the same diffusers UNet2DModel (kernel noise; on CUDA bf16
                    autocast and the CUDA-graph loop)
    ddpm_fast-torch-noise   the same with noise="torch" (diffusers' draws; the GPU one uses a CUDA
                    generator, so the loop is still captured)
    ddpm_fast-unet  sample() with ddpm_fast.UNet holding the same weights
  sampler-loop-<kind><steps>-b<batch>   the loop alone: the toy model (x, t) -> x * t / (t + 1)
    diffusers       DDPMScheduler / DDIMScheduler.step loop (the pipelines' loop body)
    eager           the loop over ddpm_fast.reference.posterior_step
    compile         the loop over torch.compile(reference.posterior_step)
    ddpm_fast       sample(toy)
Models: CPU (one torch thread, fp32) the cifar10 preset at 32 x 32, 8 images x 10 DDIM steps, and
the "tiny" preset at 16 x 16, 64 images x 50 DDIM steps and 4 images x 20 DDPM steps (issue 21's
CPU cases; the loop alone at batch 8, DDPM 200 and DDIM 50 steps); CUDA the cifar10 preset
(35.7M parameters), batch 256, DDPM 1000 and DDIM 50 steps (the loop alone too). diffusers' U-Net
is ddpm_fast.UNet's copy (to_diffusers()): the same weights. extra_info: images/s, TFLOP/s of
the U-Net forwards (counted with torch's FlopCounterMode), speedup_vs_diffusers (diffusers' median
/ this one's, same group) and, on the CPU, time_split_3_steps (a profiled 3-step run's time in
convolutions and elsewhere).
U-Net runs: a 3-step warm-up, then 3 timed runs (one at 1000 steps).
  sampler-unet-<model>-<kind><steps>-b<batch>-bf16   CPUs with bf16 units only (AMX or AVX512-BF16,
  where sample() autocasts to bf16 by default): cifar10 8 x 10 and tiny 64 x 50 DDIM steps in bf16,
  diffusers' pipeline with its U-Net cast to bf16 against sample() under bf16 autocast with either
  U-Net ("ddpm_fast": diffusers', "ddpm_fast-unet": ours)

  sampler-unet-<model>-dpmsolver++<steps>-b<batch>   DPM-Solver++ (solver_order=2, diffusers'
  DPMSolverMultistepScheduler defaults otherwise) with the same U-Net; CPU: the tiny preset at
  16 x 16, 64 images x 20 steps, fp32, one thread; CUDA: the cifar10 preset, 256 x 20, bf16
    diffusers       the manual loop: set_timesteps, x_T * init_noise_sigma, then per step
                    scale_model_input, the U-Net, scheduler.step (no pipeline exists for it)
    ddpm_fast       sample(scheduler=DPMSolverMultistepScheduler(solver_order=2)), the same U-Net
    ddpm_fast-unet  the same with ddpm_fast.UNet holding the same weights
    ddpm_fast-ddim  sample() with DDIM at the same number of steps, for reference: its ratio to
                    diffusers' DPM-Solver++ run is vs_diffusers_dpmsolver (not a speedup of the same
                    sampler)
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import DEVICE, ON_CUDA, compile_fn, sync, time_split

import ddpm_fast
from ddpm_fast import Schedule, StepConfig, reference, sample
from ddpm_fast._backends import cpu_has_bf16_units

diffusers = pytest.importorskip("diffusers")

DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
SIZES = {"cifar10": 32, "tiny": 16}
if ON_CUDA:  # (preset, images, kind, steps)
    UNET_RUNS = [("cifar10", 256, "ddpm", 1000), ("cifar10", 256, "ddim", 50)]
    LOOP_SHAPE = (256, 3, 32, 32)
else:
    UNET_RUNS = [("cifar10", 8, "ddim", 10), ("tiny", 64, "ddim", 50), ("tiny", 4, "ddpm", 20)]
    LOOP_SHAPE = (8, 3, 32, 32)
LOOP_RUNS = [("ddpm", 1000 if ON_CUDA else 200), ("ddim", 50)]
UNET_IMPLS = ["diffusers", "ddpm_fast", "ddpm_fast-torch-noise", "ddpm_fast-unet"]
LOOP_IMPLS = ["diffusers", "eager", "compile", "ddpm_fast"]
_DIFFUSERS_MEDIAN: dict[str, float] = {}


@functools.cache
def models(preset: str):
    """(diffusers UNet2DModel, ddpm_fast.UNet) with identical weights, in eval mode on DEVICE."""
    from ddpm_fast.unet import preset_config

    torch.manual_seed(0)
    ours = ddpm_fast.UNet(preset_config(preset, sample_size=SIZES[preset], dropout=0.0)).eval().to(DEVICE)
    return ours.to_diffusers().eval(), ours


@functools.cache
def diffusers_unet(preset: str, dtype: torch.dtype = DTYPE):
    """The diffusers pipelines' copy of the U-Net, in dtype (DTYPE: bf16 on CUDA)."""
    return copy.deepcopy(models(preset)[0]).to(dtype)


@functools.cache
def flops_per_image(preset: str) -> int:
    """FLOPs of one U-Net forward on one image (FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    theirs, _ = models(preset)
    x = torch.randn(1, 3, SIZES[preset], SIZES[preset], device=DEVICE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        theirs(x, torch.tensor([10], device=DEVICE))
    return counter.get_total_flops()


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _generator() -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(0)


def unet_fn(impl: str, preset: str, batch: int, kind: str, steps: int, dtype: torch.dtype = DTYPE):
    theirs, ours = models(preset)
    scheduler = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
    if impl == "diffusers":
        unet = diffusers_unet(preset, dtype)
        pipe = (diffusers.DDPMPipeline if kind == "ddpm" else diffusers.DDIMPipeline)(unet, scheduler)
        pipe.set_progress_bar_config(disable=True)

        def run(n=steps):
            with torch.no_grad():
                return pipe(batch_size=batch, generator=_generator(), num_inference_steps=n, output_type="pt").images

        return run
    model = ours if impl == "ddpm_fast-unet" else theirs
    noise = "torch" if impl == "ddpm_fast-torch-noise" else "kernel"

    def run(n=steps):
        return sample(model, batch_size=batch, scheduler=scheduler, num_inference_steps=n, noise=noise,
                      generator=_generator(), output_type="pt", progress=False, dtype=dtype)  # fmt: skip

    return run


# CPUs with bf16 units (AMX, AVX512-BF16), where sample() autocasts to bf16 by default: the same
# runs in bf16, diffusers' pipeline with its U-Net cast to bf16 (its usual half-precision setup).
BF16_CPU_RUNS = [("cifar10", 8, "ddim", 10), ("tiny", 64, "ddim", 50)] if not ON_CUDA and cpu_has_bf16_units() else []
BF16_CPU_IMPLS = ["diffusers", "ddpm_fast", "ddpm_fast-unet"]


def _unet_cases():
    runs = [(run, UNET_IMPLS, DTYPE, "") for run in UNET_RUNS]
    runs += [(run, BF16_CPU_IMPLS, torch.bfloat16, "-bf16") for run in BF16_CPU_RUNS]
    for (preset, batch, kind, steps), impls, dtype, suffix in runs:
        group = f"sampler-unet-{preset}-{kind}{steps}-b{batch}{suffix}"
        for impl in impls:
            if ON_CUDA and steps >= 1000 and impl == "ddpm_fast-torch-noise":
                continue  # one timed run each at 1000 steps: keep the device time down
            yield pytest.param(
                impl, preset, batch, kind, steps, dtype, id=f"{impl}-{preset}-b{batch}-{kind}{steps}{suffix}",
                marks=pytest.mark.benchmark(group=group),
            )  # fmt: skip


def _timed(benchmark, roofline, fn, flops: int, rounds: int) -> None:
    """Warm up with a 3-step run (cudnn autotune, compile, graph capture), then time ``rounds`` full runs."""
    fn(3)
    sync()

    def once():
        out = fn()
        sync()
        return out

    benchmark.pedantic(once, rounds=rounds, iterations=1)
    roofline.record(0, flops, DTYPE)


def _report(benchmark, group: str, impl: str, images: int) -> None:
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["images/s"] = images / median
    if impl == "diffusers":
        _DIFFUSERS_MEDIAN[group] = median
    elif group in _DIFFUSERS_MEDIAN:
        benchmark.extra_info["speedup_vs_diffusers"] = _DIFFUSERS_MEDIAN[group] / median


@pytest.mark.parametrize(("impl", "preset", "batch", "kind", "steps", "dtype"), list(_unet_cases()))
def test_sample_unet(benchmark, roofline, impl, preset, batch, kind, steps, dtype):
    fn = unet_fn(impl, preset, batch, kind, steps, dtype)
    _timed(benchmark, roofline, fn, flops_per_image(preset) * batch * steps, rounds=1 if steps >= 1000 else 3)
    benchmark.extra_info.update(
        batch=batch, steps=steps, model=preset, dtype=str(dtype), torch_threads=torch.get_num_threads()
    )
    if benchmark.stats is not None and not ON_CUDA:  # where the time goes: one profiled 3-step run
        benchmark.extra_info["time_split_3_steps"] = time_split(lambda: fn(3))
    _report(benchmark, f"unet-{preset}-{kind}{steps}-b{batch}-{dtype}", impl, batch)


# ---------------------------------------------------------------- the loop alone
def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * (t / (t + 1)).to(x.dtype).reshape(-1, 1, 1, 1)


@functools.cache
def compiled_step():
    return compile_fn(reference.posterior_step)


def loop_fn(impl: str, kind: str, steps: int):
    scheduler = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
    n = LOOP_SHAPE[0]
    if impl == "diffusers":

        def run():
            scheduler.set_timesteps(steps)
            g = _generator()
            x = torch.randn(LOOP_SHAPE, generator=g, device=DEVICE)
            for t in scheduler.timesteps:
                x = scheduler.step(toy(x, t.expand(n)), t, x, generator=g).prev_sample
            return x

        return run
    if impl == "ddpm_fast":
        return lambda: sample(toy, shape=LOOP_SHAPE[1:], batch_size=n, scheduler=scheduler, num_inference_steps=steps,
                              generator=_generator(), progress=False)  # fmt: skip
    schedule = Schedule.from_config(dict(scheduler.config), device=DEVICE)
    config = StepConfig.from_scheduler(schedule.config, kind)
    ts = schedule.timesteps(steps)
    prev = schedule.previous_timesteps(ts, kind)
    step = reference.posterior_step if impl == "eager" else compiled_step()
    pairs = [(t.expand(n), p.expand(n)) for t, p in zip(ts, prev, strict=True)]

    def run():
        g = _generator()
        x = torch.randn(LOOP_SHAPE, generator=g, device=DEVICE)
        for t, p in pairs:
            noise = torch.randn(LOOP_SHAPE, generator=g, device=DEVICE) if kind == "ddpm" else None
            x = step(toy(x, t), x, t, p, schedule, config, noise)[0]
        return x

    return run


def _loop_cases():
    for kind, steps in LOOP_RUNS:
        group = f"sampler-loop-{kind}{steps}-b{LOOP_SHAPE[0]}"
        for impl in LOOP_IMPLS:
            yield pytest.param(impl, kind, steps, id=f"{impl}-{kind}{steps}", marks=pytest.mark.benchmark(group=group))


@pytest.mark.parametrize(("impl", "kind", "steps"), list(_loop_cases()))
def test_sample_loop(benchmark, roofline, impl, kind, steps):
    roofline(loop_fn(impl, kind, steps), warmup=1)
    benchmark.extra_info.update(
        batch=LOOP_SHAPE[0], steps=steps, model="toy x * t / (t + 1)", torch_threads=torch.get_num_threads()
    )
    _report(benchmark, f"loop-{kind}{steps}", impl, LOOP_SHAPE[0])


# ---------------------------------------------------------------- DPM-Solver++ with the U-Net
DPM_RUNS = [("cifar10", 256, 20)] if ON_CUDA else [("tiny", 64, 20)]  # (preset, images, steps)
DPM_IMPLS = ["diffusers", "ddpm_fast", "ddpm_fast-unet", "ddpm_fast-ddim"]


def dpm_fn(impl: str, preset: str, batch: int, steps: int):
    size = SIZES[preset]
    if impl == "diffusers":
        unet = diffusers_unet(preset)
        scheduler = diffusers.DPMSolverMultistepScheduler(solver_order=2)

        def run(n=steps):
            scheduler.set_timesteps(n, device=DEVICE)
            x = torch.randn((batch, 3, size, size), generator=_generator(), device=DEVICE, dtype=DTYPE)
            x = x * scheduler.init_noise_sigma
            with torch.no_grad():
                for t in scheduler.timesteps:
                    out = unet(scheduler.scale_model_input(x, t), t).sample
                    x = scheduler.step(out, t, x).prev_sample
            return x

        return run
    theirs, ours = models(preset)
    model = ours if impl == "ddpm_fast-unet" else theirs
    scheduler = (
        diffusers.DDIMScheduler() if impl == "ddpm_fast-ddim" else diffusers.DPMSolverMultistepScheduler(solver_order=2)
    )

    def run(n=steps):
        return sample(model, batch_size=batch, scheduler=scheduler, num_inference_steps=n, generator=_generator(),
                      output_type="tensor", progress=False, dtype=DTYPE)  # fmt: skip

    return run


def _dpm_cases():
    for preset, batch, steps in DPM_RUNS:
        group = f"sampler-unet-{preset}-dpmsolver++{steps}-b{batch}"
        for impl in DPM_IMPLS:
            yield pytest.param(
                impl, preset, batch, steps, id=f"{impl}-{preset}-b{batch}-dpmsolver++{steps}",
                marks=pytest.mark.benchmark(group=group),
            )  # fmt: skip


@pytest.mark.parametrize(("impl", "preset", "batch", "steps"), list(_dpm_cases()))
def test_sample_dpmsolver(benchmark, roofline, impl, preset, batch, steps):
    fn = dpm_fn(impl, preset, batch, steps)
    _timed(benchmark, roofline, fn, flops_per_image(preset) * batch * steps, rounds=3)
    benchmark.extra_info.update(
        batch=batch, steps=steps, model=preset, dtype=str(DTYPE), torch_threads=torch.get_num_threads(),
        sampler="DDIM (eta 0)" if impl == "ddpm_fast-ddim" else "DPM-Solver++ (solver_order=2)",
    )  # fmt: skip
    if benchmark.stats is not None and not ON_CUDA:
        benchmark.extra_info["time_split_3_steps"] = time_split(lambda: fn(3))
    key = f"dpm-{preset}-{steps}-b{batch}"
    if impl == "ddpm_fast-ddim":  # a different sampler: a ratio, not speedup_vs_diffusers
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["images/s"] = batch / median
            if key in _DIFFUSERS_MEDIAN:
                benchmark.extra_info["vs_diffusers_dpmsolver"] = _DIFFUSERS_MEDIAN[key] / median
        return
    _report(benchmark, key, impl, batch)
