"""posterior_step: one fused reverse step (guidance -> x0 -> clip -> posterior mean -> + sigma z),
against the reference.

Variants (DDPM = eps prediction, fixed_small, clip_sample; bytes = full-tensor reads + writes
the step cannot avoid):
  ddpm-given            noise passed in             read model_output, sample, noise; write prev   4
  ddpm-drawn            noise drawn in-kernel       read model_output, sample; write prev          3
  ddim                  DDIM, eta 0 (no noise)      read model_output, sample; write prev          3
  ddpm-given-cfg        guidance 7.5 on a 2N output read 2N model_output, sample, noise; write     5
  ddpm-given-threshold  dynamic thresholding (0.995) instead of clip; counted as ddpm-given's 4
                        tensors, so its time and GB/s next to ddpm-given's are what thresholding
                        costs (the fast path reads the inputs twice and takes a per-sample top-k)
Implementations: each fast backend on the device (cpp on CPU; triton and cuda on CUDA), the
reference in eager mode ("eager": noise from torch.randn with a generator) and under
torch.compile ("compile": torch.randn_like inside the graph). Fast backends run under
no_value_checks(), as the sampling loop calls them. Timesteps are per sample, t in [20, 1000);
DDPM steps to t - 1, DDIM to t - 20 (50 steps).

Launch-bound case: on CUDA, 256x3x32x32 moves 3-5 MB, a few microseconds at copy speed, so its
per-call time is host time (the op wrapper, the launch). Its benchmarks carry
``extra_info["regime"] = "launch-bound"`` on CUDA (the larger shapes "bandwidth");
test_bench_launch.py times the layers of such a call one by one.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import CASES, DEVICE, DTYPES, ON_CUDA, compile_fn, kernel_backends, op_cases, tensor_bytes

from ddpm_fast import Schedule, StepConfig, posterior_step, reference
from ddpm_fast.ops import no_value_checks

SCHEDULE = Schedule.from_config(device=DEVICE)
LAUNCH_BOUND = (256, 3, 32, 32)  # the CIFAR batch: host time on a GPU
DDPM = StepConfig(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)
DDIM = StepConfig(kind="ddim", prediction_type="epsilon", clip_sample=True, eta=0.0)
THRESHOLD = StepConfig(kind="ddpm", thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
GUIDANCE = 7.5
# variant: (config, noise: "given" | "drawn" | None, guided, tensors read + written)
VARIANTS = {
    "ddpm-given": (DDPM, "given", False, 4),
    "ddpm-drawn": (DDPM, "drawn", False, 3),
    "ddim": (DDIM, None, False, 3),
    "ddpm-given-cfg": (DDPM, "given", True, 5),
    "ddpm-given-threshold": (THRESHOLD, "given", False, 4),
}
IMPLS = [*kernel_backends(), "eager", "compile"]


def _ddpm(mo, x, t, prev_t, noise):
    return reference.posterior_step(mo, x, t, prev_t, SCHEDULE, DDPM, noise)[0]


def _ddpm_drawn(mo, x, t, prev_t):
    return _ddpm(mo, x, t, prev_t, torch.randn_like(x))


def _ddim(mo, x, t, prev_t):
    return reference.posterior_step(mo, x, t, prev_t, SCHEDULE, DDIM)[0]


def _ddpm_cfg(mo, x, t, prev_t, noise):
    return reference.posterior_step(mo, x, t, prev_t, SCHEDULE, DDPM, noise, GUIDANCE)[0]


def _ddpm_threshold(mo, x, t, prev_t, noise):
    return reference.posterior_step(mo, x, t, prev_t, SCHEDULE, THRESHOLD, noise)[0]


REFERENCE = {
    "ddpm-given": _ddpm,
    "ddpm-drawn": _ddpm_drawn,
    "ddim": _ddim,
    "ddpm-given-cfg": _ddpm_cfg,
    "ddpm-given-threshold": _ddpm_threshold,
}


@functools.cache
def compiled(variant: str):
    """One compiled reference per variant; dynamo specialises it per (shape, dtype)."""
    return compile_fn(REFERENCE[variant])


@pytest.mark.parametrize(("impl", "shape", "dtype", "variant"), op_cases("posterior_step", CASES, VARIANTS, IMPLS))
def test_posterior_step(roofline, impl, shape, dtype, variant):
    config, noise_kind, guided, tensors = VARIANTS[variant]
    n = shape[0]
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator(DEVICE).manual_seed(0)
    model_output = torch.randn((2 * n if guided else n, *shape[1:]), device=DEVICE, generator=gen).to(torch_dtype)
    sample = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype)
    noise = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype)
    t = torch.randint(20, SCHEDULE.num_train_timesteps, (n,), device=DEVICE, generator=gen)
    prev_t = t - (20 if config.kind == "ddim" else 1)
    args = (model_output, sample, t, prev_t)

    if impl in ("eager", "compile"):
        step = REFERENCE[variant] if impl == "eager" else compiled(variant)
        if noise_kind == "given":
            fn = lambda: step(*args, noise)  # noqa: E731
        elif noise_kind == "drawn" and impl == "eager":
            fn = lambda: _ddpm(*args, torch.randn(shape, device=DEVICE, dtype=torch_dtype, generator=gen))  # noqa: E731
        else:  # ddim (no noise), or compile drawing in the graph
            fn = lambda: step(*args)  # noqa: E731
    else:
        kwargs = {"noise": noise} if noise_kind == "given" else {"generator": gen}
        guidance = GUIDANCE if guided else None

        def fn():
            with no_value_checks():
                return posterior_step(*args, SCHEDULE, config, guidance_scale=guidance, backend=impl, **kwargs)

    if ON_CUDA:
        roofline.benchmark.extra_info["regime"] = "launch-bound" if shape == LAUNCH_BOUND else "bandwidth"
    roofline(fn, bytes_moved=tensor_bytes(shape, torch_dtype, tensors))
