"""q_sample: x_t = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps in one pass, against the reference.

Variants (bytes = full-tensor reads + writes the op cannot avoid):
  given    noise passed in                  read x0, noise; write x_t           3 tensors
  drawn    noise drawn in-kernel            read x0; write x_t, noise           3 tensors
  drawn-v  drawn, + v target in the pass    read x0; write x_t, noise, v        4 tensors
Implementations: each fast backend on the device (cpp on CPU; triton and cuda on CUDA), the
reference in eager mode ("eager": noise from torch.randn with a generator) and under
torch.compile ("compile": torch.randn_like inside the graph). Fast backends run under
no_value_checks(), as a training loop calls them: no host-side check of t.

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

from ddpm_fast import Schedule, q_sample, reference
from ddpm_fast.ops import no_value_checks

SCHEDULE = Schedule.from_config(device=DEVICE)
LAUNCH_BOUND = (256, 3, 32, 32)  # the CIFAR batch: host time on a GPU
VARIANTS = {"given": 3, "drawn": 3, "drawn-v": 4}  # tensors read + written
IMPLS = [*kernel_backends(), "eager", "compile"]


def _given(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return reference.q_sample(x0, t, SCHEDULE, noise)


def _given_v(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.q_sample(x0, t, SCHEDULE, noise), reference.training_target(x0, noise, t, SCHEDULE, "v_prediction")


def _drawn(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn_like(x0)
    return _given(x0, t, noise), noise


def _drawn_v(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noise = torch.randn_like(x0)
    return *_given_v(x0, t, noise), noise


@functools.cache
def compiled(variant: str):
    """One compiled reference per variant; dynamo specialises it per (shape, dtype)."""
    return compile_fn({"given": _given, "drawn": _drawn, "drawn-v": _drawn_v}[variant])


@pytest.mark.parametrize(("impl", "shape", "dtype", "variant"), op_cases("q_sample", CASES, VARIANTS, IMPLS))
def test_q_sample(roofline, impl, shape, dtype, variant):
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator(DEVICE).manual_seed(0)
    x0 = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype)
    noise = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype)
    t = torch.randint(0, SCHEDULE.num_train_timesteps, (shape[0],), device=DEVICE, generator=gen)

    if impl == "eager":
        draw = lambda: torch.randn(shape, device=DEVICE, dtype=torch_dtype, generator=gen)  # noqa: E731
        fn = {
            "given": lambda: _given(x0, t, noise),
            "drawn": lambda: _given(x0, t, draw()),
            "drawn-v": lambda: _given_v(x0, t, draw()),
        }[variant]
    elif impl == "compile":
        step = compiled(variant)
        fn = (lambda: step(x0, t, noise)) if variant == "given" else (lambda: step(x0, t))
    else:
        kwargs = {"noise": noise} if variant == "given" else {"generator": gen}
        target = "v_prediction" if variant == "drawn-v" else None

        def fn():
            with no_value_checks():
                return q_sample(x0, t, SCHEDULE, target=target, backend=impl, **kwargs)

    if ON_CUDA:
        roofline.benchmark.extra_info["regime"] = "launch-bound" if shape == LAUNCH_BOUND else "bandwidth"
    roofline(fn, bytes_moved=tensor_bytes(shape, torch_dtype, VARIANTS[variant]))
