"""solver_step: the fused planned step against ``solvers.base.apply_step``.

Every fast backend (cpp once per vector-ISA build, triton under the interpreter when there is no
GPU, the CUDA C++ kernel compiled with g++ against tests/cuda_emulation/) against apply_step in the
inputs' dtype and in float64, under the tolerance rule (conftest.assert_close_to_reference), for
x_next and every history slot; the scratch slot R is never written by the kernels. Plans from
DPMSolverMultistep (orders 1-3, ODE and SDE, dynamic thresholding) and random plans with (R, W)
from (0, 0) to (4, 2) (writes into the slot a step reads, and into the scratch slot) with no
limit, a clip and dynamic thresholding; dtypes (x fp32, bf16, fp16, fp64 on cpp; model outputs of
another dtype), layouts (channels_last x and/or history slots, sliced inputs and history, odd
rows, batch 1, 2-D and 5-D, rows longer than a chunk), guidance, learned variance (its channels
NaN: never read), in-kernel Philox noise (= reference.philox_randn), a step index on the device
read by no host code, a whole sampling loop against solvers.run, torch.compile, and bad inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import math
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch
from conftest import (
    FAST_BACKENDS,
    assert_close_to_reference,
    assert_mostly_identical,
    backend_device,
    backend_params,
    is_slow,
)
from host_reads import no_host_reads

import ddpm_fast
from ddpm_fast import Schedule, reference
from ddpm_fast._backends import choose, use_cpu_isa
from ddpm_fast.ops import no_value_checks, solver_step
from ddpm_fast.solvers import DPMSolverMultistep, X0Limit, apply_step, new_history, run
from ddpm_fast.solvers.base import D0, HIST, PlanBuilder

pytestmark = pytest.mark.usefixtures("one_thread")
# the op's module (ddpm_fast.ops.solver_step is the function: ops/__init__ exports it by that name)
solver_step_module = importlib.import_module("ddpm_fast.ops.solver_step")

SHAPE = (3, 3, 5, 7)  # rows of 35: not a multiple of 4 (Philox blocks straddle rows) nor of a block
LIMITS = {
    "none": None,
    "clip": X0Limit("clip", clip_range=0.8),
    # max_value > 1 so that the per-sample scale is not always clamped to 1
    "dynamic": X0Limit("dynamic", ratio=0.9, max_value=2.5),
}
DPM_CONFIGS = {
    "o1": dict(solver_order=1),
    "o2": dict(solver_order=2),
    "o3": dict(solver_order=3),
    "o2-sde": dict(solver_order=2, algorithm_type="sde-dpmsolver++"),
    "o3-sde-v": dict(solver_order=3, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"),
    "o3-threshold-x0": dict(solver_order=3, thresholding=True, prediction_type="sample", sample_max_value=2.0),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fast_backend_params(thin: bool = False) -> list:
    """backend_params() (cpp per ISA build, triton, cuda where there is a GPU); ``thin`` keeps the
    first C++ build only (cases whose ISA builds share one code path)."""
    params = backend_params()
    if thin:
        params = [p for i, p in enumerate(params) if p.values[0][0] != "cpp" or i == 0]
    return params


def isa_build(isa: str | None):
    """The C++ kernels' ISA build for the block (no-op for other backends)."""
    return use_cpu_isa(isa) if isa else contextlib.nullcontext()


def random_plan(steps=3, slots=3, writes=2, limit=None, seed=0, draws=True, learned_variance=False):
    """A plan with random coefficients over every column (as tests/test_solvers.py's random_plan,
    for any R and W): write k of step s goes to slot (s + k + 1) mod R, except write 1 of step 1,
    which goes to the scratch slot R."""
    g = gen(seed)
    builder = PlanBuilder(steps, slots, writes)
    builder.mix[:] = torch.randn(builder.mix.shape, generator=g, dtype=torch.float64).numpy()
    builder.to_d_x[:] = 0.5 + torch.rand(steps, generator=g, dtype=torch.float64).numpy()
    builder.to_d_out[:] = -0.2 - torch.rand(steps, generator=g, dtype=torch.float64).numpy()
    for s in range(steps):
        for k in range(writes):
            if slots and not (s == 1 and k == 1):
                builder.write(s, k, (s + k + 1) % slots)
    return builder.build(
        device="cpu",
        timesteps=np.arange(steps)[::-1].copy(),
        sigmas=np.linspace(2, 0, steps + 1),
        orders=[1] * steps,
        draws=[draws] * steps,
        x0_limit=limit,
        learned_variance=learned_variance,
    )


def dpm_plan(name: str, steps: int = 10):
    return DPMSolverMultistep(**DPM_CONFIGS[name]).plan(Schedule.from_config(), steps)


def make_inputs(plan, shape=SHAPE, dtype=torch.float32, mo_dtype=None, guided=False, learned=False, seed=0):
    """(x, model_output, noise, history) on the CPU; a learned variance's channels hold NaN (the op
    must not read them); every history slot holds values, the scratch slot too."""
    g = gen(seed)
    n, c = shape[:2]
    draw = lambda s, scale=1.0: scale * torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    x = draw(shape)
    mo = draw((2 * n if guided else n, 2 * c if learned else c, *shape[2:]))
    if learned:
        mo[:, c:] = float("nan")
    noise = draw(shape)
    history = draw((plan.history_slots + 1, *shape), 1.5)
    mo_dtype = dtype if mo_dtype is None else mo_dtype
    return x.to(dtype), mo.to(mo_dtype), noise.to(dtype), history.to(dtype)


def reference_step(plan, step, x, mo, history, noise, guidance):
    """apply_step's (x_next, history) in the inputs' dtypes and from the inputs upcast to float64,
    on the CPU; guidance combined on the first C channels in the compute dtype."""
    plan = plan.to("cpu")

    def one(x, mo, history, noise):
        out = mo[:, : x.shape[1]].to(reference.compute_dtype(x))
        if guidance is not None:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        history = history.clone()
        return apply_step(plan, step, x, out, history, noise), history

    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    up = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    return one(*map(cpu, (x, mo, history, noise))), one(*map(up, (x, mo, history, noise)))


def to_device(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


def check(backend, plan, step, x, mo, history, noise=None, seed=None, guidance=None, ref_noise=None):
    """Run the op on a copy of ``history``; compare x_next and every slot with the reference; the
    kernels leave the scratch slot as it was. ``ref_noise``: the noise the reference adds (seeded)."""
    device = x.device
    plan = plan.to(device)
    h = history.clone()
    got = solver_step(plan, step, x, mo, h, noise=noise, seed=seed, guidance_scale=guidance, backend=backend)
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == device
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    step_index = step if isinstance(step, int) else step.cpu()
    (r, rh), (e, eh) = reference_step(plan, step_index, x, mo, history, noise if seed is None else ref_noise, guidance)
    assert_close_to_reference(got, r, e)
    slots = plan.history_slots
    for slot in range(slots):
        assert_close_to_reference(h[slot], rh[slot], eh[slot])
    if backend != "reference":
        assert torch.equal(h[slots].cpu(), history[slots].cpu()), "the scratch slot was written"
    return got, h


# ---------------------------------------------------------------- plans from DPM-Solver++
def dpm_params():
    for param in fast_backend_params():
        name = param.values[0][0]
        for i, config in enumerate(DPM_CONFIGS):
            if is_slow(name) and i % 2:
                continue
            yield pytest.param(param.values[0], config, id=f"{param.id}-{config}")


@pytest.mark.parametrize("backend_isa,config", list(dpm_params()))
def test_dpmsolver_plans(backend_isa, config):
    name, isa = backend_isa
    plan = dpm_plan(config)
    device = backend_device(name)
    steps = (0, 5, 9) if is_slow(name) else (0, 1, 2, 5, 8, 9)  # the warm-up orders, full order, the last
    with isa_build(isa):
        for step in steps:
            x, mo, noise, history = to_device(device, *make_inputs(plan, seed=step))
            check(name, plan, step, x, mo, history, noise if plan.draws[step] else None)


# ---------------------------------------------------------------- random plans, every (R, W)
RW = [(0, 0), (0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (4, 0)]


def random_params():
    for param in fast_backend_params():
        name = param.values[0][0]
        for i, (slots, writes) in enumerate(RW):
            for j, limit in enumerate(LIMITS):
                if is_slow(name) and (i + j) % 3:
                    continue
                yield pytest.param(param.values[0], slots, writes, limit, id=f"{param.id}-R{slots}W{writes}-{limit}")


@pytest.mark.parametrize("backend_isa,slots,writes,limit", list(random_params()))
def test_random_plans(backend_isa, slots, writes, limit):
    """Every column used, writes into real slots and the scratch slot, a write into the slot the
    step reads (write 0 of step s lands in slot s + 1, which it reads: all reads come first)."""
    name, isa = backend_isa
    plan = random_plan(slots=slots, writes=writes, limit=LIMITS[limit], seed=slots * 3 + writes)
    device = backend_device(name)
    with isa_build(isa):
        for step in range(plan.num_steps):
            x, mo, noise, history = to_device(device, *make_inputs(plan, seed=10 + step))
            check(name, plan, step, x, mo, history, noise)
    if slots and writes:  # without noise: the column is skipped, not multiplied by zero
        x, mo, _, history = to_device(device, *make_inputs(plan, seed=4))
        check(name, plan, 0, x, mo, history, None)


def unused_params():
    for param in fast_backend_params():
        for limit in ("none", "clip"):
            if is_slow(param.values[0][0]) and limit == "clip":
                continue
            yield pytest.param(param.values[0], limit, id=f"{param.id}-{limit}")


@pytest.mark.parametrize("backend_isa,limit", list(unused_params()))
def test_unused_slots_and_d0_are_not_read(backend_isa, limit):
    """A slot whose coefficients are zero in every row of the step is not read (Heun's predictor
    writes slot 0 without reading it; a warm-up step of a multistep solver reads fewer slots), and
    D_0 with a zero column drops out: NaN there changes nothing. Steps: slot 1 unused (slots 0, 2
    read: the kernels compact the slots they read), every slot unused, and D_0 unused too. The
    reference (apply_step) sees those slots zeroed."""
    name, isa = backend_isa
    plan = random_plan(steps=3, slots=3, writes=2, limit=LIMITS[limit], seed=11, draws=False)
    plan.mix[0, :, HIST + 1] = 0.0
    plan.mix[1, :, HIST:] = 0.0
    plan.mix[2, :, HIST:] = 0.0
    plan.mix[2, :, D0] = 0.0
    device = backend_device(name)
    with isa_build(isa):
        for step, unused in ((0, [1]), (1, [0, 1, 2]), (2, [0, 1, 2])):
            x, mo, _, history = to_device(device, *make_inputs(plan, seed=20 + step))
            poisoned = history.clone()
            poisoned[unused] = float("nan")
            h = poisoned.clone()
            got = solver_step(plan, step, x, mo, h, backend=name)
            (r, rh), (e, eh) = reference_step(plan, step, x, mo, history, None, None)  # the unused slots as given
            assert_close_to_reference(got, r, e)
            written = [int(k) for k in plan.write_slot[step] if k < plan.history_slots]
            for slot in range(plan.history_slots):
                if slot in written:
                    assert_close_to_reference(h[slot], rh[slot], eh[slot])
                else:  # an unused slot is neither read nor written: its NaN stays
                    assert torch.equal(h[slot].isnan().cpu(), poisoned[slot].isnan().cpu())


def test_reference_backend_is_apply_step():
    plan = random_plan(limit=LIMITS["clip"])
    x, mo, noise, history = make_inputs(plan)
    for step in range(plan.num_steps):
        h1, h2 = history.clone(), history.clone()
        got = solver_step(plan, step, x, mo, h1, noise=noise, backend="reference")
        want = apply_step(plan, step, x, mo, h2, noise)
        assert torch.equal(got, want) and torch.equal(h1, h2)


# ---------------------------------------------------------------- dtypes
DTYPE_PAIRS = {  # (x and history dtype, model_output dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32-x-bf16-mo": (torch.float32, torch.bfloat16),
    "fp16-x-fp32-mo": (torch.float16, torch.float32),
    "fp32-x-fp64-mo": (torch.float32, torch.float64),
    "fp64": (torch.float64, torch.float64),
}


def dtype_params():
    for param in fast_backend_params():
        name = param.values[0][0]
        for i, pair in enumerate(DTYPE_PAIRS):
            for j, limit in enumerate(("clip", "dynamic")):
                if is_slow(name) and (i + j) % 2:
                    continue
                yield pytest.param(param.values[0], pair, limit, id=f"{param.id}-{pair}-{limit}")


@pytest.mark.parametrize("backend_isa,pair,limit", list(dtype_params()))
def test_dtypes(backend_isa, pair, limit):
    name, isa = backend_isa
    dtype, mo_dtype = DTYPE_PAIRS[pair]
    plan = random_plan(slots=2, writes=2, limit=LIMITS[limit], seed=7)
    device = backend_device(name)
    x, mo, noise, history = to_device(device, *make_inputs(plan, dtype=dtype, mo_dtype=mo_dtype, guided=True, seed=7))
    with isa_build(isa):
        if name == "triton" and torch.float64 in (dtype, mo_dtype):
            with pytest.raises(TypeError, match="float64"):
                solver_step(plan, 1, x, mo, history.clone(), noise=noise, guidance_scale=2.5, backend=name)
            return
        got, _ = check(name, plan, 1, x, mo, history, noise, guidance=2.5)
    if dtype in (torch.float16, torch.bfloat16) and not (dtype == torch.bfloat16 and is_slow(name)):
        (r, _), _ = reference_step(plan, 1, x, mo, history, noise, 2.5)
        assert_mostly_identical(got, r)  # fp32 arithmetic, one rounding


# ---------------------------------------------------------------- shapes and layouts
def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def history_channels_last(h: torch.Tensor) -> torch.Tensor:
    """(R + 1, N, C, H, W) whose slots are each channels_last (stored (R + 1, N, H, W, C))."""
    return h.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def spatial_slice(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """x's values at every other index of ``dim`` of a bigger NaN tensor (not viewable as (N, C, S))."""
    shape = list(x.shape)
    shape[dim] *= 2
    big = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    index = [slice(None)] * x.dim()
    index[dim] = slice(None, None, 2)
    big[tuple(index)] = x
    return big[tuple(index)]


def channel_slice(x: torch.Tensor) -> torch.Tensor:
    big = torch.full((x.shape[0], x.shape[1] + 2, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device)
    big[:, 1 : 1 + x.shape[1]] = x
    return big[:, 1 : 1 + x.shape[1]]


LAYOUTS = {
    "batch1": ((1, 3, 4, 4), None),
    "odd": ((3, 5, 7, 11), None),
    "2d": ((4, 10), None),
    "5d": ((2, 3, 2, 3, 4), None),
    "long-rows": ((2, 2, 33, 37), None),  # 1221 elements a row: several C++ chunks, two 1024-blocks
    "channels_last": ((2, 3, 5, 7), "channels_last"),
    "history_channels_last": ((2, 3, 5, 7), "history_channels_last"),
    "mo_channel_slice": ((3, 3, 4, 5), "mo_channel_slice"),
    "x_slice": ((2, 3, 4, 5), "x_slice"),
    "history_slice": ((2, 3, 4, 5), "history_slice"),
}


def apply_layout(layout, x, mo, noise, history):
    if layout == "channels_last":
        return channels_last(x), channels_last(mo), channels_last(noise), history
    if layout == "history_channels_last":
        return channels_last(x), mo, noise, history_channels_last(history)
    if layout == "mo_channel_slice":
        return x, channel_slice(mo), noise, history
    if layout == "x_slice":
        return spatial_slice(x), mo, spatial_slice(noise), history
    if layout == "history_slice":
        return x, mo, noise, spatial_slice(history, dim=3)
    return x, mo, noise, history


def layout_params():
    for param in fast_backend_params(thin=True):
        name = param.values[0][0]
        for i, layout in enumerate(LAYOUTS):
            if is_slow(name) and layout == "long-rows":
                continue
            yield pytest.param(param.values[0], layout, i % 2 == 0, id=f"{param.id}-{layout}")


@pytest.mark.parametrize("backend_isa,layout,guided", list(layout_params()))
def test_shapes_and_layouts(backend_isa, layout, guided):
    name, isa = backend_isa
    shape, how = LAYOUTS[layout]
    plan = random_plan(slots=2, writes=2, limit=LIMITS["dynamic" if guided else "clip"], seed=3)
    device = backend_device(name)
    plain = to_device(device, *make_inputs(plan, shape, guided=guided, seed=5))
    x, mo, noise, history = apply_layout(how, *plain)
    with isa_build(isa):
        got, h = check(name, plan, 2, x, mo, history, noise, guidance=1.5 if guided else None)
        if how is not None:  # the layout changes no value
            h_plain = plain[3].clone()
            want = solver_step(plan, 2, *plain[:2], h_plain, noise=plain[2], guidance_scale=1.5 if guided else None,
                               backend=name)  # fmt: skip
            assert torch.equal(got.cpu(), want.cpu()) and torch.equal(h.cpu(), h_plain.cpu())


def test_history_layouts_taken_in_place():
    """Slots the kernels index (NCHW, channels_last) are written in place; others through a copy."""
    history = torch.zeros(3, 2, 3, 4, 5)
    for backend in ("cpp", "cuda", "triton"):
        for h in (history, history_channels_last(history)):
            assert solver_step_module._history_arg(h, backend)[1] is False
        assert solver_step_module._history_arg(spatial_slice(history, dim=3), backend)[1] is True


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=str)
def test_empty_inputs(backend, shape):
    plan = random_plan(slots=2, writes=1, limit=LIMITS["dynamic"])
    device = backend_device(backend)
    x = torch.empty(shape, device=device)
    history = new_history(plan, x)
    got = solver_step(plan.to(device), 0, x, x, history, noise=x, backend=backend)
    assert got.shape == shape


# ---------------------------------------------------------------- guidance and learned variance
@pytest.mark.parametrize("name", ["reference", *FAST_BACKENDS])
def test_guidance_and_learned_variance(name):
    """uncond + s (cond - uncond) on the first C of 2C channels (the variance channels hold NaN):
    s = 1 is the conditional step alone, s = 0 the unconditional one."""
    plan = random_plan(slots=2, writes=1, limit=LIMITS["clip"], seed=9, learned_variance=True)
    device = backend_device(name)
    x, mo, noise, history = to_device(device, *make_inputs(plan, guided=True, learned=True, seed=9))
    check(name, plan, 0, x, mo, history, noise, guidance=4.5)
    uncond, cond = mo.chunk(2)
    step = lambda m, s: solver_step(plan, 0, x, m, history.clone(), noise=noise, guidance_scale=s, backend=name)  # noqa: E731
    torch.testing.assert_close(step(mo, 1.0), step(cond, None), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step(mo, 0.0), step(uncond, None), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(step(cond[:, :3].contiguous(), None)).all()


# ---------------------------------------------------------------- in-kernel noise
SEED = 0x1234_5678_9ABC


@pytest.mark.parametrize("shape", [SHAPE, (2, 2, 4, 8)], ids=["rows35", "rows32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["reference", *FAST_BACKENDS])
def test_seeded_noise(name, dtype, shape):
    """seed: the noise is reference.philox_randn(seed, x.shape) (rounded to x's dtype), whatever the
    layout; the same seed gives the same step, another seed another."""
    plan = dpm_plan("o3-sde-v")
    device = backend_device(name)
    x, mo, _, history = to_device(device, *make_inputs(plan, shape, dtype=dtype, seed=11))
    seed = torch.tensor(SEED, device=device)
    z = reference.philox_randn(SEED, shape).to(dtype)
    got, _ = check(name, plan, 4, x, mo, history, seed=seed, ref_noise=z)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not is_slow(name)):
        (r, _), _ = reference_step(plan, 4, x, mo, history, z, None)
        assert_mostly_identical(got, r)
    again = solver_step(plan, 4, x, mo, history.clone(), seed=seed.clone(), backend=name)
    assert torch.equal(again, got)
    other = solver_step(plan, 4, x, mo, history.clone(), seed=seed + 1, backend=name)
    assert (other.cpu() != got.cpu()).float().mean() > 0.5
    if len(shape) == 4 and name != "reference":
        cl = solver_step(plan, 4, channels_last(x), channels_last(mo), history.clone(), seed=seed, backend=name)
        assert torch.equal(cl.cpu(), got.cpu())


# ---------------------------------------------------------------- no host reads, CUDA graphs
@pytest.mark.parametrize("limit", ["clip", "dynamic"])
@pytest.mark.parametrize("name", ["reference", *FAST_BACKENDS])
def test_device_step_reads_nothing_on_the_host(name, limit):
    """A CUDA graph replays the step with the index (and the seed) in device buffers: the same
    result as a Python int step, and no Python read of a tensor value (the interpreted Triton
    backend reads its tensors by design: it runs the kernel in numpy)."""
    plan = random_plan(slots=3, writes=2, limit=LIMITS[limit], seed=12)
    device = backend_device(name)
    plan = plan.to(device)
    x, mo, noise, history = to_device(device, *make_inputs(plan, seed=12))
    row = torch.tensor([2, SEED], device=device)  # [step, seed] as a sampler's per-step row
    kwargs = [dict(noise=noise)] + ([dict(seed=row[1])] if name != "reference" else [])
    for kw in kwargs:
        want_h = history.clone()
        want = solver_step(plan, 2, x, mo, want_h, backend=name, **kw)
        got_h = history.clone()
        guard = no_host_reads() if not is_slow(name) else contextlib.nullcontext()
        with no_value_checks(), guard:
            got = solver_step(plan, row[0], x, mo, got_h, backend=name, **kw)
        assert torch.equal(got, want) and torch.equal(got_h, want_h)


def toy(x, t):
    return x * (t / (t + 1)).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def feed(noises):
    """run()'s noise_fn: the next of ``noises`` at each call."""
    draws = iter(noises)
    return lambda x: next(draws)


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("config", ["o3-sde-v", "o3-threshold-x0"])
def test_whole_loop_matches_run(name, config):
    """A sampling loop of fused steps (the history ring over every step) against solvers.run()."""
    plan = dpm_plan(config, steps=6 if is_slow(name) else 12)
    device = backend_device(name)
    shape = (2, 3, 4, 4)
    x_T = torch.randn(shape, generator=gen(13))
    noises = [torch.randn(shape, generator=gen(100 + s)) for s in range(plan.num_steps)]
    want = run(toy, x_T, plan, feed(noises))
    want64 = run(toy, x_T.double(), plan, feed([z.double() for z in noises]))
    draws = iter(noises)
    plan = plan.to(device)
    x = x_T.to(device) * plan.init_noise_sigma
    history = new_history(plan, x)
    index = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(plan.num_steps):
        index.fill_(s)
        out = toy(x, plan.timesteps[s].expand(shape[0]))
        noise = next(draws).to(device) if plan.draws[s] else None
        x = solver_step(plan, index, x, out, history, noise=noise, backend=name)
    assert_close_to_reference(x, want, want64, factor=4.0)


# ---------------------------------------------------------------- choice, custom op
def test_default_backend():
    device = torch.device("cpu")
    want = "cpp" if "cpp" in FAST_BACKENDS else "reference"
    assert choose("solver_step", None, device, numel=100, dtype=torch.float32) == want
    with pytest.raises(ValueError, match="unknown backend"):
        choose("solver_step", "sdpa", device)


@pytest.mark.skipif("cpp" not in FAST_BACKENDS, reason="cpp backend not built")
def test_custom_op_path_and_opcheck():
    """With gradients on, the call goes through torch.library's op (schema, fake, mutation of
    history): the same result; opcheck tests its registration."""
    plan = random_plan(slots=2, writes=2, limit=LIMITS["dynamic"], seed=14)
    x, mo, noise, history = make_inputs(plan, seed=14)
    want_h = history.clone()
    want = solver_step(plan, 1, x, mo, want_h, noise=noise, backend="cpp")
    got_h = history.clone()
    got = solver_step(plan, 1, x, mo.requires_grad_(), got_h, noise=noise, backend="cpp")
    assert torch.equal(got, want) and torch.equal(got_h, want_h)
    args = (mo.detach(), x, history.clone(), torch.tensor(1), 0, plan.to_d_x, plan.to_d_out, plan.mix)
    args += (plan.write_slot, noise, None, 2, 1.0, 0.9, 2.5, None, "cpp")
    torch.library.opcheck(solver_step_module._solver_step_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpp" not in FAST_BACKENDS, reason="cpp backend not built")
def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) keeps the op as one node (dynamic thresholding, a device step)."""
    plan = dpm_plan("o3-threshold-x0")
    x, mo, _, history = make_inputs(plan, (2, 3, 4, 4), seed=15)

    def fn(x, mo, history, step):
        return solver_step(plan, step, x, mo, history, backend="cpp") * 2

    want_h = history.clone()
    want = fn(x, mo, want_h, torch.tensor(5))
    got_h = history.clone()
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True)(x, mo, got_h, torch.tensor(5))
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(got_h, want_h)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    plan = random_plan(slots=2, writes=1)
    x, mo, noise, history = make_inputs(plan)
    step = lambda *a, **k: solver_step(plan, *a, **k)  # noqa: E731
    with pytest.raises(TypeError, match="SolverPlan"):
        solver_step(None, 0, x, mo, history)
    with pytest.raises(TypeError, match="x must be float32"):
        step(0, x.long(), mo, history)
    with pytest.raises(TypeError, match="history has dtype"):
        step(0, x, mo, history.double())
    with pytest.raises(ValueError, match="history must have shape"):
        step(0, x, mo, history[1:])
    with pytest.raises(ValueError, match="history must have shape"):
        step(0, x, mo, history[:, :2])
    with pytest.raises(TypeError, match="history must be"):
        step(0, x, mo, None)
    with pytest.raises(ValueError, match="channels"):
        step(0, x, torch.cat([mo, mo], 1), history)  # 2C without a learned variance
    with pytest.raises(ValueError, match="batch"):
        step(0, x, mo[:2], history)
    with pytest.raises(ValueError, match="uncond, cond"):
        step(0, x, mo, history, guidance_scale=2.0)
    with pytest.raises(ValueError, match="shape"):
        step(0, x, mo[..., :3], history)
    with pytest.raises(ValueError, match="either noise or seed"):
        step(0, x, mo, history, noise=noise, seed=torch.tensor(1))
    with pytest.raises(TypeError, match="seed"):
        step(0, x, mo, history, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="noise has shape"):
        step(0, x, mo, history, noise=noise[:1])
    for bad in (3, -1):
        with pytest.raises(IndexError, match="out of range"):
            step(bad, x, mo, history)
    with pytest.raises(IndexError, match="out of range"):
        step(torch.tensor(7), x, mo, history)
    with pytest.raises(TypeError, match="int64"):
        step(torch.tensor(1.0), x, mo, history)
    with pytest.raises(TypeError, match="step must be"):
        step(1.0, x, mo, history)
    with pytest.raises(ValueError, match="plan is on meta"):
        solver_step(plan.to("meta"), 0, x, mo, history)
    with pytest.raises(ValueError, match="unknown backend"):
        step(0, x, mo, history, backend="sdpa")
    for slots, writes in ((5, 1), (2, 3)):
        big = random_plan(slots=slots, writes=writes)
        with pytest.raises(ValueError, match="at most 4 history slots and 2 writes"):
            solver_step(big, 0, x, mo, new_history(big, x))


def test_langevin_steps_are_refused():
    plan = random_plan()
    langevin = dataclasses.replace(plan, langevin_snr=(0.0, 0.16, 0.0))
    x, mo, noise, history = make_inputs(plan)
    solver_step(langevin, 0, x, mo, history, noise=noise)
    with pytest.raises(ValueError, match="Langevin"):
        solver_step(langevin, 1, x, mo, history, noise=noise)


# ---------------------------------------------------------------- the CUDA C++ kernel, emulated
@pytest.fixture(scope="module")
def emulated_solver_op(tmp_path_factory):
    """A stand-in for torch.ops.ddpm_fast_C whose solver_step runs csrc/solver_step_cuda.cu compiled
    with g++ against tests/cuda_emulation/ (one thread at a time; see test_cuda_emulation.py)."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    from test_cuda_emulation import DTYPE_CODES, EMULATION, ROOT, _ptr, rewrite_launches

    out_dir = tmp_path_factory.mktemp("solver_emulation")
    source = out_dir / "solver_step_cuda.cpp"
    source.write_text(rewrite_launches((ROOT / "csrc" / "solver_step_cuda.cu").read_text()))
    target = out_dir / "emulated_solver.so"
    command = ["g++", "-std=c++17", "-O1", "-D__CUDA_ARCH__=900", f"-I{EMULATION}", f"-I{ROOT / 'csrc'}"]
    command += ["-include", "emulate.h", "-shared", "-fPIC", str(source), str(EMULATION / "solver_c_api.cpp")]
    build = subprocess.run([*command, "-o", str(target)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    lib = ctypes.CDLL(str(target))

    def strides(t):
        return [0, 0, 0] if t is None else _view3_strides(t)

    def op(mo, x, history, step_t, step, to_d_x, to_d_out, mix, write_slot, noise, seed, scale, x_next, abs_d0, *rest):
        guidance_scale, clip_range, limit, guided = rest[:4]
        guide, guide_coef = (rest[4], rest[5]) if len(rest) > 4 else (None, None)
        n, c = x.shape[:2]
        ptrs = [_ptr(t) for t in (mo, x, noise, x_next, history, abs_d0, step_t, to_d_x, to_d_out, mix)]
        ptrs += [_ptr(t) for t in (write_slot, scale, seed, guide, guide_coef)]
        ints = [v for t in (mo, x, noise, x_next, history[0], abs_d0) for v in strides(t)]
        ints += [history.stride(0), n * mo.stride(0), step, mix.shape[0], n, c, math.prod(x.shape[2:])]
        ints += [mix.shape[2] - 4, mix.shape[1] - 1, limit, int(guided), DTYPE_CODES[mo.dtype], DTYPE_CODES[x.dtype]]
        ints += strides(guide)
        status = lib.emulated_solver_step(
            (ctypes.c_void_p * 15)(*ptrs),
            (ctypes.c_int64 * len(ints))(*ints),
            (ctypes.c_double * 2)(guidance_scale, clip_range),
        )
        assert status == 0

    return types.SimpleNamespace(ddpm_fast_C=types.SimpleNamespace(solver_step=op))


def _view3_strides(t: torch.Tensor) -> list[int]:
    """(N, C, S) element strides of an (N, C, ...) tensor whose dims after the second merge."""
    inner, extent = 1, 1
    found = False
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1:
            continue
        if not found:
            inner, extent, found = t.stride(d), t.shape[d], True
            continue
        assert t.stride(d) == inner * extent, "dims after the second do not merge"
        extent *= t.shape[d]
    return [t.stride(0), t.stride(1), inner]


@pytest.fixture
def on_emulated_cuda(monkeypatch, emulated_solver_op):
    """solver_step with backend='cuda' runs the emulated CUDA kernel on CPU tensors."""
    from test_cuda_emulation import _TorchWithOps

    if not ddpm_fast.backends()["cpp"][0]:
        pytest.skip("needs the C++ extension (its quantile op)")
    monkeypatch.setattr(solver_step_module, "torch", _TorchWithOps(emulated_solver_op))
    monkeypatch.setattr(solver_step_module, "choose", lambda op, requested, device, **facts: "cuda")


@pytest.mark.parametrize("slots,writes", [(0, 1), (2, 1), (4, 2)])
@pytest.mark.parametrize("limit", list(LIMITS))
def test_emulated_cuda_random_plans(on_emulated_cuda, slots, writes, limit):
    plan = random_plan(slots=slots, writes=writes, limit=LIMITS[limit], seed=20 + slots)
    for step in range(plan.num_steps):
        x, mo, noise, history = make_inputs(plan, seed=20 + step)
        check("cuda", plan, step, x, mo, history, noise)


@pytest.mark.parametrize("config", list(DPM_CONFIGS))
def test_emulated_cuda_dpmsolver(on_emulated_cuda, config):
    plan = dpm_plan(config)
    for step in (0, 2, 9):
        x, mo, noise, history = make_inputs(plan, seed=step)
        check("cuda", plan, step, x, mo, history, noise if plan.draws[step] else None)


@pytest.mark.parametrize("pair", list(DTYPE_PAIRS))
def test_emulated_cuda_dtypes(on_emulated_cuda, pair):
    dtype, mo_dtype = DTYPE_PAIRS[pair]
    plan = random_plan(slots=2, writes=2, limit=LIMITS["dynamic"], seed=21, learned_variance=True)
    x, mo, noise, history = make_inputs(plan, dtype=dtype, mo_dtype=mo_dtype, guided=True, learned=True, seed=21)
    got, _ = check("cuda", plan, 1, x, mo, history, noise, guidance=2.5)
    if dtype in (torch.float16, torch.bfloat16):
        (r, _), _ = reference_step(plan, 1, x, mo, history, noise, 2.5)
        assert_mostly_identical(got, r)


@pytest.mark.parametrize("layout", ["channels_last", "history_channels_last", "x_slice", "mo_channel_slice"])
def test_emulated_cuda_layouts_and_seeded_noise(on_emulated_cuda, layout):
    plan = dpm_plan("o3-sde-v")
    shape = (2, 3, 4, 5) if layout != "channels_last" else (2, 3, 4, 8)  # rows of 20 / 32: quad tiles
    x, mo, noise, history = apply_layout(LAYOUTS[layout][1], *make_inputs(plan, shape, seed=22))
    check("cuda", plan, 3, x, mo, history, noise)
    for odd in (False, True):  # a row length that is / is not a multiple of 4: both thread mappings
        shp = (2, 3, 5, 7) if odd else shape
        x, mo, _, history = apply_layout(LAYOUTS[layout][1], *make_inputs(plan, shp, seed=23))
        z = reference.philox_randn(SEED, shp)
        check("cuda", plan, 3, x, mo, history, seed=torch.tensor(SEED), ref_noise=z)
    row = torch.tensor([3, SEED])
    want = solver_step(plan, 3, x, mo, history.clone(), seed=row[1])
    with no_value_checks(), no_host_reads():
        got = solver_step(plan, row[0], x, mo, history.clone(), seed=row[1])
    assert torch.equal(got, want)
