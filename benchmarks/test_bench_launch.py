"""Launch cost: what one q_sample / posterior_step call costs where the tensors are small enough
that the host, not the kernel, sets the time (256x3x32x32 on a GPU: the kernels move 3-4 MB, a
few microseconds at copy speed). Each layer of a call is timed alone, side by side:

  triton, cuda, cpp     the op (ops/), as a training or sampling loop calls it (no value checks)
  eager, compile        the reference, eager and under torch.compile (as test_bench_noising/posterior)
  triton-launcher       the Triton launcher on prepared (N, C, S) views and outputs: layouts,
                        configuration, the cached launch (kernels/launch.py)
  triton-launcher-jit   the same through kernel[grid](...) every call (Triton's JIT binding and
                        specialising every argument; the cached launch off)
  triton-launcher-args  the launcher with the kernel stubbed out: its own argument preparation
  C-kernel              the private C++/CUDA op (torch.ops.ddpm_fast_C) on the same views

On CUDA: 256x3x32x32 fp32; per call = the median of one call + synchronize, and back-to-back
(``back_to_back_s``) = 20 calls, one synchronize, divided by 20: the host cost where it exceeds
the kernel's. On the CPU: (2, 3, 4, 4) fp32, so that the op-vs-C-kernel gap is the op wrapper's
own overhead; the Triton launcher rows run the JIT through ddpm_fast._aot.StandInDriver (compiled
for sm_90 ahead of time; its launcher records instead of launching): the host work of a Triton
call up to the CUDA launch. Ids read ``test_launch[<layer>-<op variant>]``, one group per variant.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import pytest
import torch
from conftest import DEVICE, ON_CUDA, compile_fn, tensor_bytes

import ddpm_fast
from ddpm_fast import Schedule, StepConfig, posterior_step, q_sample, reference
from ddpm_fast._backends import load_extension
from ddpm_fast.ops import no_value_checks
from ddpm_fast.ops._common import as_3d

SHAPE = (256, 3, 32, 32) if ON_CUDA else (2, 3, 4, 4)
SCHEDULE = Schedule.from_config(device=DEVICE)
DDPM = StepConfig(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)
# variant: (op, noise given, tensors read + written)
VARIANTS = {
    "q_sample-given": ("q_sample", True, 3),
    "q_sample-drawn": ("q_sample", False, 3),
    "posterior-ddpm-given": ("posterior", True, 4),
    "posterior-ddpm-drawn": ("posterior", False, 3),
}


def _triton_host() -> str | None:
    """How the Triton launcher rows run here: 'gpu'; 'stand-in' on the CPU (compiled ahead of time,
    never launched); None without triton, or under the interpreter (its per-program cost would
    swamp the launch)."""
    if ON_CUDA:
        return "gpu" if ddpm_fast.backends()["triton"][0] else None
    if os.environ.get("TRITON_INTERPRET") == "1" or importlib.util.find_spec("triton") is None:
        return None
    return "stand-in"


def _impls() -> list[str]:
    available = ddpm_fast.backends()
    impls = [name for name in (("triton", "cuda") if ON_CUDA else ("cpp",)) if available[name][0]]
    impls += ["eager", "compile"]
    if _triton_host() is not None:
        impls += ["triton-launcher", "triton-launcher-jit", "triton-launcher-args"]
    if available["cuda" if ON_CUDA else "cpp"][0]:
        impls.append("C-kernel")
    return impls


def _cases() -> list:
    return [
        pytest.param(impl, variant, id=f"{impl}-{variant}", marks=pytest.mark.benchmark(group=f"launch-{variant}"))
        for variant in VARIANTS
        for impl in _impls()
    ]


class _Inputs:
    """One variant's tensors, and the private launchers' arguments on (N, C, S) views."""

    def __init__(self, variant: str):
        op, given, _ = VARIANTS[variant]
        gen = torch.Generator(DEVICE).manual_seed(0)
        self.op, self.given, self.gen = op, given, gen
        self.x = torch.randn(SHAPE, device=DEVICE, generator=gen)
        self.noise = torch.randn(SHAPE, device=DEVICE, generator=gen) if given else None
        self.t = torch.randint(20, SCHEDULE.num_train_timesteps, (SHAPE[0],), device=DEVICE, generator=gen)
        self.prev_t = self.t - 1
        self.seed = None if given else torch.zeros(1, dtype=torch.int64, device=DEVICE)
        v = as_3d
        outs = [torch.empty_like(v(self.x)) for _ in range(3)]
        if op == "q_sample":
            table = functools.partial(SCHEDULE.kernel_table, dtype=torch.float32, device=DEVICE)
            sqrt_ab, sqrt_1mab = table("sqrt_alphas_cumprod"), table("sqrt_one_minus_alphas_cumprod")
            noise = None if self.noise is None else v(self.noise)
            self.private_args = (v(self.x), self.t, sqrt_ab, sqrt_1mab, noise, self.seed, outs[0])
            self.private_args += (None if given else outs[1], None, 0)
        else:
            table = SCHEDULE.kernel_table("alphas_cumprod", torch.float32, DEVICE)
            noise = None if self.noise is None else v(self.noise)
            # eps prediction, fixed_small, clip to [-1, 1] (the codes of csrc/kernel_args.h), no guidance
            self.private_args = (v(self.x), v(self.x), self.t, self.prev_t, table, noise, self.seed, None, outs[0])
            self.private_args += (None, None, 1.0, 1.0, 1.0, 0.0, 0, 0, 0, 1, False, False)

    def op_call(self, backend: str):
        kwargs = {"noise": self.noise} if self.given else {"generator": self.gen}
        if self.op == "q_sample":
            return lambda: q_sample(self.x, self.t, SCHEDULE, backend=backend, **kwargs)
        return lambda: posterior_step(self.x, self.x, self.t, self.prev_t, SCHEDULE, DDPM, backend=backend, **kwargs)

    def reference_call(self, compiled: bool):
        fn = _compiled(self.op, self.given) if compiled else _REFERENCE[self.op]
        if self.given:
            return lambda: fn(self.x, self.t, self.noise)
        if compiled:
            return lambda: fn(self.x, self.t)
        return lambda: fn(self.x, self.t, torch.randn(SHAPE, device=DEVICE, generator=self.gen))


def _q_sample_ref(x, t, noise):
    return reference.q_sample(x, t, SCHEDULE, noise)


def _posterior_ref(x, t, noise):
    return reference.posterior_step(x, x, t, t - 1, SCHEDULE, DDPM, noise)[0]


_REFERENCE = {"q_sample": _q_sample_ref, "posterior": _posterior_ref}


@functools.cache
def _compiled(op: str, given: bool):
    """One compiled reference per (op, noise given or drawn in the graph)."""
    ref = _REFERENCE[op]
    return compile_fn(ref if given else lambda x, t: ref(x, t, torch.randn_like(x)))


class _Stub:
    """A kernel that is never launched: ``kernel[grid](...)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _launcher_mode(impl: str, module, kernel_name: str):
    """The Triton launcher as ``impl`` times it: cached launch, the JIT every call, or a stub kernel;
    on the CPU through the stand-in driver."""
    from ddpm_fast.kernels import launch

    cached, kernel = launch.CACHED_LAUNCH, getattr(module, kernel_name)
    launch.CACHED_LAUNCH = impl == "triton-launcher"
    if impl == "triton-launcher-args":
        setattr(module, kernel_name, _Stub())
    try:
        if _triton_host() == "stand-in" and impl != "triton-launcher-args":
            from ddpm_fast._aot import StandInDriver

            with StandInDriver():
                yield
        else:
            yield
    finally:
        launch.CACHED_LAUNCH = cached
        setattr(module, kernel_name, kernel)


@pytest.mark.parametrize(("impl", "variant"), _cases())
def test_launch(roofline, impl, variant):
    inputs = _Inputs(variant)
    op = VARIANTS[variant][0]
    nbytes = tensor_bytes(SHAPE, torch.float32, VARIANTS[variant][2]) if ON_CUDA else 0
    if impl in ("eager", "compile"):
        roofline(inputs.reference_call(impl == "compile"), bytes_moved=nbytes)
        return
    if impl in ("triton", "cuda", "cpp"):
        call = inputs.op_call(impl)

        def fn():
            with no_value_checks():
                return call()

        roofline(fn, bytes_moved=nbytes)
        return
    if impl == "C-kernel":
        load_extension()
        kernel = torch.ops.ddpm_fast_C.q_sample if op == "q_sample" else torch.ops.ddpm_fast_C.posterior_step
        roofline(lambda: kernel(*inputs.private_args), bytes_moved=nbytes)
        return
    if op == "q_sample":
        from ddpm_fast.kernels import triton_noising as module

        launcher, kernel_name = module.q_sample_triton, "q_sample_kernel"
    else:
        from ddpm_fast.kernels import triton_posterior as module

        launcher, kernel_name = module.posterior_step_triton, "posterior_kernel"
    with _launcher_mode(impl, module, kernel_name):
        roofline(lambda: launcher(*inputs.private_args), bytes_moved=nbytes if impl != "triton-launcher-args" else 0)
