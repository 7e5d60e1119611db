"""Classifier guidance inside the fused steps (issue 20): a guidance gradient g is one more input of
posterior_step and solver_step.

- the reference (``reference.posterior_step(..., guide=)``, ``apply_step(..., guide=)``) equals a
  float64 transcription of Dhariwal & Nichol's formulas written here from the paper and their code:
  DDPM ``condition_mean`` (mean + sigma_t^2 g after the x0 clip), DDIM / the solvers
  ``condition_score`` after the clip (eps - sqrt(1 - a_bar) g and x0 + (1 - a_bar) / sqrt(a_bar) g;
  the model output converted for x0 and v predictions);
- every fast backend (cpp per ISA build, triton interpreted, the CUDA kernel emulated with g++)
  equals the reference under the tolerance rule, fp32 and bf16, odd rows, batch 1, channels_last
  and sliced inputs, with classifier-free guidance on top;
- a zero guide gives the unguided step bit for bit; bad guides are refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types

import pytest
import torch
from conftest import FAST_BACKENDS, assert_close_to_reference, backend_params, is_slow
from test_cuda_emulation import emulated_ops  # noqa: F401 (a module fixture used below)
from test_solver_step import emulated_solver_op  # noqa: F401 (a module fixture used below)

import ddpm_fast
from ddpm_fast import Schedule, StepConfig, posterior_step, reference
from ddpm_fast.ops import posterior as posterior_module
from ddpm_fast.ops import solver_step
from ddpm_fast.solvers import DPMSolverMultistep, EulerDiscrete, apply_step, new_history
from ddpm_fast.solvers.base import with_guidance

pytestmark = pytest.mark.usefixtures("one_thread")
solver_module = importlib.import_module("ddpm_fast.ops.solver_step")

# (t, prev_t) per sample: the last DDPM step, a respaced step to the end, steps mid-way and at the top
STEPS = [(0, -1), (10, -1), (500, 480), (999, 979), (260, 240)]
CASES = {  # kind, prediction, variance, clip, eta
    "ddpm-eps-small-clip": ("ddpm", "epsilon", "fixed_small", True, 0.0),
    "ddpm-x0-large": ("ddpm", "sample", "fixed_large", False, 0.0),
    "ddpm-v-range-clip": ("ddpm", "v_prediction", "learned_range", True, 0.0),
    "ddpm-eps-learned": ("ddpm", "epsilon", "learned", False, 0.0),
    "ddim-eps-clip": ("ddim", "epsilon", "fixed_small", True, 0.0),
    "ddim-x0-eta1": ("ddim", "sample", "fixed_small", False, 1.0),
    "ddim-v-eta0.5-clip": ("ddim", "v_prediction", "fixed_small", True, 0.5),
}


def make_config(name: str) -> StepConfig:
    kind, pred, var, clip, eta = CASES[name]
    return StepConfig(kind=kind, prediction_type=pred, variance_type=var, clip_sample=clip, eta=eta)


def step_inputs(config: StepConfig, shape=(5, 3, 5, 7), guided=False, seed=0):
    """float64 (model_output, sample, noise, guide, t, prev_t); valid variance channels."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    mo = torch.randn((2 * n if guided else n, 2 * c if config.learned_variance else c, *shape[2:]), generator=g)
    mo = mo.double()
    if config.variance_type == "learned":
        mo[:, c:] = torch.rand(mo[:, c:].shape, generator=g, dtype=torch.float64) * 0.02 + 1e-4
    elif config.learned_variance:
        mo[:, c:] = torch.rand(mo[:, c:].shape, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    guide = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([STEPS[i % len(STEPS)][0] for i in range(n)])
    prev_t = torch.tensor([STEPS[i % len(STEPS)][1] for i in range(n)])
    return mo, x, noise, guide, t, prev_t


# ---------------------------------------------------------------- the paper's formulas in float64
def eps_of(out: float, x: float, a: float, pred: str) -> float:
    if pred == "epsilon":
        return out
    if pred == "sample":
        return (x - math.sqrt(a) * out) / math.sqrt(1 - a)
    return math.sqrt(a) * out + math.sqrt(1 - a) * x


def transcribed_step(mo, x, noise, guide, t, prev_t, schedule, config, guidance_scale=None):
    """One guided step, element by element in Python floats, from the paper and guided_diffusion's
    code: DDPM's condition_mean (the posterior mean of the clipped x0, + Sigma g with Sigma the step's
    variance, then + sigma z where t > 0); DDIM's condition_score after the clip (x0 clipped from the
    model's eps; eps' = eps - sqrt(1 - a) g, x0' = x0 + (1 - a) / sqrt(a) g, not clipped again; the
    DDIM update with x0', eps'). (guided_diffusion takes eps from the clipped x0, diffusers'
    use_clipped_model_output=True; without it the step's eps is the model's, guided the same way.)"""
    ab = schedule.alphas_cumprod.double().tolist()
    n, c = x.shape[:2]
    if guidance_scale is not None:
        uncond, cond = mo[:n], mo[n:]
        mo = torch.cat([uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], 1)
    out = torch.empty_like(x)
    r = config.clip_sample_range
    clip = (lambda v: min(max(v, -r), r)) if config.clip_sample else (lambda v: v)  # noqa: E731
    for i in range(n):
        a = ab[int(t[i])]
        final = 1.0 if config.kind == "ddpm" else schedule.final_alpha_cumprod
        a_prev = ab[int(prev_t[i])] if prev_t[i] >= 0 else final
        for idx in torch.cartesian_prod(*[torch.arange(d) for d in x.shape[1:]]).tolist():
            ch, rest = idx[0], tuple(idx[1:])
            o, xv, z, g = (float(v[(i, ch, *rest)]) for v in (mo, x, noise, guide))
            eps = eps_of(o, xv, a, config.prediction_type)
            if config.kind == "ddpm":
                x0 = clip((xv - math.sqrt(1 - a) * eps) / math.sqrt(a))
                beta = 1 - a / a_prev
                mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * xv
                beta_tilde = max((1 - a_prev) / (1 - a) * beta, 1e-20)
                v_out = float(mo[(i, c + ch, *rest)]) if config.learned_variance else 0.0
                if config.variance_type == "fixed_small":
                    variance = beta_tilde
                elif config.variance_type == "fixed_large":
                    variance = beta
                elif config.variance_type == "learned":
                    variance = v_out
                else:  # learned_range: log-space interpolation between beta_tilde and beta
                    frac = (v_out + 1) / 2
                    variance = math.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
                value = mean + variance * g + (math.sqrt(variance) * z if t[i] > 0 else 0.0)
            else:
                x0 = clip((xv - math.sqrt(1 - a) * eps) / math.sqrt(a)) + (1 - a) / math.sqrt(a) * g
                eps = eps - math.sqrt(1 - a) * g
                var = config.eta**2 * max((1 - a_prev) / (1 - a) * (1 - a / a_prev), 0.0)
                value = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - var, 0.0)) * eps + math.sqrt(var) * z
            out[(i, ch, *rest)] = value
    return out


@pytest.mark.parametrize("cfg", [None, 2.5], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("name", list(CASES))
def test_reference_is_the_papers_formulas(schedule, name, cfg):
    config = make_config(name)
    mo, x, noise, guide, t, prev_t = step_inputs(config, (5, 2, 2, 3), guided=cfg is not None, seed=1)
    prev, _ = reference.posterior_step(mo, x, t, prev_t, schedule, config, noise, cfg, guide)
    want = transcribed_step(mo, x, noise, guide, t, prev_t, schedule, config, cfg)
    torch.testing.assert_close(prev, want, rtol=1e-10, atol=1e-10)
    unguided, _ = reference.posterior_step(mo, x, t, prev_t, schedule, config, noise, cfg)
    assert (prev - unguided)[2:].abs().min() > 0  # the guide moves every element of a mid-way step


# ---------------------------------------------------------------- the fast posterior_step
@pytest.fixture
def emulated_cuda(monkeypatch, emulated_ops, emulated_solver_op):  # noqa: F811
    """backend='cuda' runs the CUDA kernels of csrc/ compiled with g++ for the CPU (tests/cuda_emulation)."""
    if not ddpm_fast.backends()["cpp"][0]:
        pytest.skip("needs the C++ extension (its quantile op)")
    from test_cuda_emulation import _TorchWithOps

    ops = types.SimpleNamespace(
        ddpm_fast_C=types.SimpleNamespace(
            posterior_step=emulated_ops.ddpm_fast_C.posterior_step,
            solver_step=emulated_solver_op.ddpm_fast_C.solver_step,
            abs_order_stats=torch.ops.ddpm_fast_C.abs_order_stats,
        )
    )
    for module in (posterior_module, solver_module):
        monkeypatch.setattr(module, "torch", _TorchWithOps(ops))
        monkeypatch.setattr(module, "choose", lambda op, requested, device, **facts: "cuda")


def fast_params():
    params = list(backend_params(exclude=("cuda",)))
    return params + [pytest.param(("cuda-emulated", None), id="cuda-emulated")]


@pytest.fixture(params=fast_params())
def fast_backend(request):
    """(backend name for the op, its device): cpp per ISA build, triton, the emulated CUDA kernel."""
    name, isa = request.param
    if name == "cuda-emulated":
        request.getfixturevalue("emulated_cuda")
        yield "cuda", torch.device("cpu")
        return
    from ddpm_fast._backends import use_cpu_isa

    with use_cpu_isa(isa) if isa else _null():
        yield name, torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


LAYOUTS = ("contiguous", "channels_last", "sliced", "batch1")


def lay_out(layout: str, *tensors):
    if layout == "channels_last":
        return tuple(v.contiguous(memory_format=torch.channels_last) for v in tensors)
    if layout == "sliced":  # every other column of a wider tensor: dims that do not merge
        return tuple(torch.cat([v, v], dim=-1)[..., ::2] for v in tensors)
    return tensors


def check_guided(backend, device, config, dtype, layout, cfg, schedule, seed=0, check_x0=True):
    shape = (1, 3, 5, 7) if layout == "batch1" else (5, 3, 5, 7)
    mo, x, noise, guide, t, prev_t = step_inputs(config, shape, guided=cfg is not None, seed=seed)
    mo, x, noise, guide = lay_out(layout, mo.to(dtype), x.to(dtype), noise.to(dtype), guide.float())
    mo, x, noise, guide, t, prev_t = (v.to(device) for v in (mo, x, noise, guide, t, prev_t))
    prev, x0 = posterior_step(
        mo, x, t, prev_t, schedule, config, noise=noise, guidance_scale=cfg, guide=guide, return_pred_x0=True,
        backend=backend,
    )  # fmt: skip
    cpu = [v.cpu() for v in (mo, x, t, prev_t, noise)]
    same = reference.posterior_step(*cpu[:4], schedule, config, cpu[4], cfg, guide.cpu().to(dtype))
    up = [v.double() if v.is_floating_point() else v for v in cpu]
    ref64 = reference.posterior_step(*up[:4], schedule, config, up[4], cfg, guide.cpu().to(dtype).double())
    assert prev.dtype == dtype and prev.shape == x.shape
    assert_close_to_reference(prev, same[0], ref64[0])
    if check_x0:
        assert_close_to_reference(x0, same[1], ref64[1])


def case_params():
    for i, name in enumerate(CASES):
        yield pytest.param(name, LAYOUTS[i % len(LAYOUTS)], None if i % 3 else 2.0, id=f"{name}-{LAYOUTS[i % 4]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,layout,cfg", list(case_params()))
def test_guided_posterior_step(fast_backend, schedule, name, layout, cfg, dtype):
    backend, device = fast_backend
    if is_slow(backend) and (dtype != torch.float32 or name not in ("ddpm-v-range-clip", "ddim-x0-eta1")):
        pytest.skip("the interpreted Triton kernel takes two cases (each program costs ~1.5 ms)")
    check_guided(backend, device, make_config(name), dtype, layout, cfg, schedule)


@pytest.mark.parametrize("name", ["ddpm-eps-small-clip", "ddim-v-eta0.5-clip"])
def test_guided_dynamic_thresholding(fast_backend, schedule, name):
    """The guide comes after the threshold, whose first pass reads the unguided x0. (Not pred_x0 itself: at t = 999
    the thresholded x0 of this seed misses the rule by 1e-6 without a guide as well, its quantile's
    rounding magnified 1 / sqrt(a_bar) = 157 times.)"""
    backend, device = fast_backend
    config = dataclasses.replace(
        make_config(name), clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5
    )
    check_guided(backend, device, config, torch.float32, "contiguous", None, schedule, seed=4, check_x0=False)


def test_zero_guide_is_the_unguided_step(schedule):
    """guide = 0 gives the step without a guide bit for bit (the guide only adds c g), on every fast
    backend here; the C++ kernel then leaves its single-loop eps path for the staged one."""
    for backend in FAST_BACKENDS:
        for name in ("ddpm-eps-small-clip", "ddim-eps-clip", "ddim-v-eta0.5-clip"):
            config = make_config(name)
            mo, x, noise, _, t, prev_t = (v.float() if v.is_floating_point() else v for v in step_inputs(config))
            kw = dict(noise=noise, backend=backend)
            plain, _ = posterior_step(mo, x, t, prev_t, schedule, config, **kw)
            zero, _ = posterior_step(mo, x, t, prev_t, schedule, config, guide=torch.zeros_like(x), **kw)
            assert torch.equal(plain, zero), (backend, name)


# ---------------------------------------------------------------- solver_step
SOLVERS = {
    "dpm-o2": lambda: DPMSolverMultistep(solver_order=2),
    "dpm-o3-sde-v": lambda: DPMSolverMultistep(
        solver_order=3, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"
    ),
    "dpm-x0-clip": lambda: DPMSolverMultistep(prediction_type="sample", thresholding=True, sample_max_value=2.0),
    "euler": lambda: EulerDiscrete(),
}


def test_with_guidance_coefficients():
    """guide_coef is the eps shift -sqrt(1 - a_bar) in the model's own parametrization, at each step's
    noise level, and a_bar from the plan's sigma is the schedule's a_bar at the step's timestep."""
    schedule = Schedule.from_config()
    for name, make in SOLVERS.items():
        solver = make()
        plan = with_guidance(solver.plan(schedule, 10), solver.prediction_type)
        ts = plan.timesteps.long()
        a = schedule.alphas_cumprod.double()[ts] if plan.timesteps.dtype == torch.int64 else None
        sig = plan.sigmas[:-1]
        a_sig = 1 / (1 + sig**2)
        if a is not None:
            torch.testing.assert_close(a_sig, a, rtol=1e-12, atol=0)
        want = {
            "epsilon": -((1 - a_sig) ** 0.5),
            "sample": (1 - a_sig) / a_sig**0.5,
            "v_prediction": -((1 - a_sig) ** 0.5) / a_sig**0.5,
        }[solver.prediction_type]
        torch.testing.assert_close(plan.guide_coef, want, rtol=1e-14, atol=0, msg=name)


def transcribed_output(out, x, g, sigma, pred):
    """The model output whose eps is eps - sqrt(1 - a) g at x (a = 1 / (1 + sigma^2)), from the
    definitions eps, x0 = (x - sqrt(1 - a) eps) / sqrt(a), v = sqrt(a) eps - sqrt(1 - a) x0."""
    a = 1 / (1 + sigma**2)
    eps = eps_of(out, x, a, pred) - math.sqrt(1 - a) * g
    if pred == "epsilon":
        return eps
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return x0 if pred == "sample" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0


@pytest.mark.parametrize("name", [n for n in SOLVERS if n != "dpm-x0-clip"])
def test_apply_step_guide_is_the_formula(name):
    """Without a limit, guiding = stepping the model output whose eps is eps - sqrt(1 - a) g."""
    solver = SOLVERS[name]()
    plan = with_guidance(solver.plan(Schedule.from_config(), 10), solver.prediction_type)
    _, x, noise, guide, _, _ = step_inputs(StepConfig(), (2, 2, 3, 3), seed=3)
    mo = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for s in (0, 4, 9):
        sigma = plan.sigmas[s].item()
        shifted = mo.clone().flatten()
        values = zip(mo.flatten().tolist(), x.flatten().tolist(), guide.flatten().tolist(), strict=True)
        for k, (o, xv, g) in enumerate(values):
            shifted[k] = transcribed_output(o, xv, g, sigma, solver.prediction_type)
        h1, h2 = new_history(plan, x), new_history(plan, x)
        noise_s = noise if plan.draws[s] else None
        got = apply_step(plan, s, x, mo, h1, noise_s, guide=guide)
        want = apply_step(plan, s, x, shifted.reshape(x.shape), h2, noise_s)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-10)


def test_apply_step_guides_after_the_limit():
    """With an x0 limit the shift comes after it: out + c g and limit(p x + q out) + q c g, the rows
    of the mix over them (guided_diffusion guides the clipped x0)."""
    solver = SOLVERS["dpm-x0-clip"]()
    plan = with_guidance(solver.plan(Schedule.from_config(), 10), solver.prediction_type)
    _, x, noise, guide, _, _ = step_inputs(StepConfig(), (2, 2, 3, 3), seed=5)
    mo = 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for s in (0, 5):
        history = torch.randn((plan.history_slots + 1, *x.shape), generator=torch.Generator().manual_seed(s)).double()
        got = apply_step(plan, s, x, mo, history.clone(), None, guide=guide)
        shift = plan.guide_coef[s] * guide
        p, q = plan.to_d_x[s], plan.to_d_out[s]
        d0 = plan.x0_limit(p * x + q * mo) + q * shift
        values = [x, mo + shift, d0, torch.zeros_like(x), *history[: plan.history_slots]]
        mix = plan.mix[s, 0]
        want = sum(mix[c] * v for c, v in enumerate(values))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def solver_case_params():
    for i, name in enumerate(SOLVERS):
        yield pytest.param(name, LAYOUTS[i % len(LAYOUTS)], None if i % 2 else 2.0, id=f"{name}-{LAYOUTS[i % 4]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,layout,cfg", list(solver_case_params()))
def test_guided_solver_step(fast_backend, name, layout, cfg, dtype):
    backend, device = fast_backend
    if is_slow(backend) and (dtype != torch.float32 or name != "dpm-o3-sde-v"):
        pytest.skip("the interpreted Triton kernel takes one case (each program costs ~1.5 ms)")
    solver = SOLVERS[name]()
    plan = with_guidance(solver.plan(Schedule.from_config(), 10), solver.prediction_type)
    shape = (1, 3, 5, 7) if layout == "batch1" else (3, 3, 5, 7)
    g = torch.Generator().manual_seed(7)
    n = shape[0]
    mo = torch.randn(((2 if cfg else 1) * n, *shape[1:]), generator=g)
    x, noise, guide = (torch.randn(shape, generator=g) for _ in range(3))
    history = 1.5 * torch.randn((plan.history_slots + 1, *shape), generator=g)
    mo, x, noise = lay_out(layout, mo.to(dtype), x.to(dtype), noise.to(dtype))
    history = history.to(dtype)
    plan = plan.to(device)
    for s in (1, 6):
        z = noise.to(device) if plan.draws[s] else None
        h = history.clone().to(device)
        got = solver_step(plan, s, x.to(device), mo.to(device), h, noise=z, guidance_scale=cfg, guide=guide.to(device),
                          backend=backend)  # fmt: skip

        def ref(cast, s=s, z=z):
            out = mo.to(cast)[:, :3]
            if cfg:
                uncond, cond = out.chunk(2)
                out = uncond + cfg * (cond - uncond)
            hh = history.to(cast).clone()
            zz = None if z is None else noise.to(cast)
            return apply_step(plan.to("cpu"), s, x.to(cast), out, hh, zz, guide.to(dtype).to(cast)), hh

        (same, h_same), (r64, h64) = ref(dtype), ref(torch.float64)
        assert_close_to_reference(got, same, r64)
        assert_close_to_reference(h.cpu(), h_same, h64)


def test_bad_guides(schedule):
    config = make_config("ddim-eps-clip")
    mo, x, noise, guide, t, prev_t = (v.float() if v.is_floating_point() else v for v in step_inputs(config))
    with pytest.raises(ValueError, match="guide has shape"):
        posterior_step(mo, x, t, prev_t, schedule, config, noise=noise, guide=guide[:, :2])
    with pytest.raises(TypeError, match="guide must be a floating-point tensor"):
        posterior_step(mo, x, t, prev_t, schedule, config, noise=noise, guide=guide.long())
    solver = DPMSolverMultistep()
    plan = solver.plan(schedule, 10)
    with pytest.raises(ValueError, match="with_guidance"):
        solver_step(plan, 0, x, mo, new_history(plan, x), guide=guide)
    with pytest.raises(ValueError, match="with_guidance"):
        apply_step(plan, 0, x, mo, new_history(plan, x), guide=guide)
