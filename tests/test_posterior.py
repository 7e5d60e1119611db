"""posterior_step: every fast backend against the reference over the configuration product
(prediction x variance x clip x sampler x guidance), dtypes, layouts, in-kernel noise, dynamic
thresholding, torch.compile and input checks."""

import itertools

import pytest
import torch
from conftest import (
    FAST_BACKENDS,
    HAS_CUDA,
    T,
    assert_close_fp32,
    assert_close_to_reference,
    assert_mostly_identical,
    backend_device,
    is_slow,
    seed_of,
)

import ddpm_fast
from ddpm_fast import StepConfig, posterior_step, reference
from ddpm_fast._backends import cpu_isas, use_cpu_isa
from ddpm_fast.ops import no_value_checks
from ddpm_fast.ops.posterior import quantile_scale, topk_order_stats
from ddpm_fast.schedule import PREDICTION_TYPES, VARIANCE_TYPES, Schedule

# (t, prev_t) per sample: the last step, a respaced step to the end, respaced steps t -> t - 20.
STEPS = [(0, -1), (10, -1), (21, 1), (500, 480), (999, 979)]
CLIPS = ("none", "clip", "threshold")
GUIDANCE = (None, 3.0)


def make_config(kind="ddpm", pred="epsilon", var="fixed_small", clip="clip", eta=0.0, **kw) -> StepConfig:
    clip_kw = {
        "none": dict(clip_sample=False),
        "clip": dict(clip_sample=True, clip_sample_range=1.5),
        # sample_max_value > 1 so that the per-sample scale is not always clamped to 1
        "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
    }[clip]
    return StepConfig(kind=kind, prediction_type=pred, variance_type=var, eta=eta, **clip_kw, **kw)


def step_timesteps(n: int, device, rotate: int = 0):
    pairs = [STEPS[(i + rotate) % len(STEPS)] for i in range(n)]
    t = torch.tensor([p[0] for p in pairs], device=device)
    prev_t = torch.tensor([p[1] for p in pairs], device=device)
    return t, prev_t


def make_step_inputs(shape, config, guided, device, dtype=torch.float32, mo_dtype=None, seed=0, two_c=None):
    """(model_output, sample, noise): model_output (N or 2N, C or 2C, ...) with valid variance channels."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    learned = config.learned_variance if two_c is None else two_c
    rest = tuple(shape[2:])
    sample = torch.randn(shape, generator=g, dtype=torch.float64)
    mo = torch.randn((2 * n if guided else n, 2 * c if learned else c, *rest), generator=g, dtype=torch.float64)
    if config.prediction_type == "sample":
        mo[:, :c] *= 2  # x0 predictions beyond the clip range
    if config.variance_type == "learned":
        mo[:, c:] = torch.rand(mo[:, c:].shape, generator=g, dtype=torch.float64) * 0.02 + 1e-4
    elif learned:  # learned_range values in [-1, 1] (also what a 2C DDIM output carries, ignored)
        mo[:, c:] = torch.rand(mo[:, c:].shape, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    mo_dtype = dtype if mo_dtype is None else mo_dtype
    return mo.to(mo_dtype).to(device), sample.to(dtype).to(device), noise.to(dtype).to(device)


def reference_step(mo, sample, t, prev_t, schedule, config, noise, guidance):
    """The reference in the inputs' dtypes and from the inputs upcast to float64, on the CPU."""
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    mo, sample, t, prev_t, noise = map(cpu, (mo, sample, t, prev_t, noise))
    same = reference.posterior_step(mo, sample, t, prev_t, schedule, config, noise, guidance)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    ref64 = reference.posterior_step(up(mo), up(sample), t, prev_t, schedule, config, up(noise), guidance)
    return same, ref64


def check_step(backend, mo, sample, t, prev_t, schedule, config, noise, guidance, plain_fp32=True):
    """Run the fast op with return_pred_x0 and compare both outputs with the reference."""
    prev, x0 = posterior_step(
        mo,
        sample,
        t,
        prev_t,
        schedule,
        config,
        noise=noise,
        guidance_scale=guidance,
        return_pred_x0=True,
        backend=backend,
    )
    (r_prev, r_x0), (e_prev, e_x0) = reference_step(mo, sample, t, prev_t, schedule, config, noise, guidance)
    for out in (prev, x0):
        assert out.shape == sample.shape and out.dtype == sample.dtype and out.device == sample.device
        if sample.dim() == 4 and sample.is_contiguous(memory_format=torch.channels_last) and sample.shape[1] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(prev, r_prev, e_prev)
    assert_close_to_reference(x0, r_x0, e_x0)
    if plain_fp32 and sample.dtype == torch.float32:
        # plain closeness to the fp32 reference where the step is well-conditioned: not the last DDPM
        # step (1 - a_bar_0 ~ 1e-4 loses digits), nor a_bar_t < 0.01 (eps -> x0 amplifies by 1/sqrt(a_bar))
        keep = (t.cpu() > 0) & (schedule.alphas_cumprod[t.cpu()] > 0.01)
        assert_close_fp32(prev.cpu()[keep], r_prev[keep])
        assert_close_fp32(x0.cpu()[keep], r_x0[keep])
    return prev, x0


# ------------------------------------------------------------------ the configuration product
def product_cases():
    """(kind, pred, var, clip, eta, guidance, two_c) for DDPM and DDIM, and whether the interpreted
    Triton backend takes the case too (one case per (pred, var) / (pred, eta), clip and guidance rotating)."""
    cases = []
    inner = list(itertools.product(CLIPS, GUIDANCE))
    for g, (pred, var) in enumerate(itertools.product(PREDICTION_TYPES, VARIANCE_TYPES)):
        for j, (clip, guidance) in enumerate(inner):
            cases.append((("ddpm", pred, var, clip, 0.0, guidance, None), j == g % len(inner)))
    for g, (pred, eta) in enumerate(itertools.product(PREDICTION_TYPES, (0.0, 0.5, 1.0))):
        for j, (clip, guidance) in enumerate(inner):
            cases.append((("ddim", pred, "fixed_small", clip, eta, guidance, None), j == (g + 1) % len(inner)))
    # DDIM with a 2C (learned-variance) model output: the variance channels are ignored
    for i, pred in enumerate(PREDICTION_TYPES):
        cases.append((("ddim", pred, "learned_range", CLIPS[i], 0.5, GUIDANCE[i % 2], True), i == 0))
    return cases


def product_params():
    for backend in FAST_BACKENDS:
        for case, thin in product_cases():
            if is_slow(backend) and not thin:
                continue
            kind, pred, var, clip, eta, guidance, two_c = case
            cid = f"{backend}-{kind}-{pred}-{var}-{clip}-eta{eta}-g{guidance}" + ("-2C" if two_c else "")
            yield pytest.param(backend, *case, id=cid)


@pytest.mark.parametrize("backend,kind,pred,var,clip,eta,guidance,two_c", list(product_params()))
def test_config_product(schedule, backend, kind, pred, var, clip, eta, guidance, two_c):
    device = backend_device(backend)
    config = make_config(kind, pred, var, clip, eta)
    shape = (5, 3, 5, 7)
    seed = PREDICTION_TYPES.index(pred) * 10 + VARIANCE_TYPES.index(var)
    mo, sample, noise = make_step_inputs(shape, config, guidance is not None, device, seed=seed, two_c=two_c)
    t, prev_t = step_timesteps(shape[0], device)
    prev, x0 = check_step(backend, mo, sample, t, prev_t, schedule, config, noise, guidance)
    if clip == "clip":
        assert x0.abs().max() <= 1.5
    elif clip == "threshold":  # (exactly 1 in test_threshold_output_bound)
        assert x0.abs().max() <= 1.0 + 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_threshold_output_bound(backend, device, schedule, kind):
    """clamp(x0, -s, s) / s lies in [-1, 1] exactly, as in the reference and diffusers."""
    config = make_config(kind, "epsilon", clip="threshold", eta=0.5 if kind == "ddim" else 0.0)
    mo, sample, noise = make_step_inputs((5, 3, 5, 7), config, False, device, seed=0)
    t, prev_t = step_timesteps(5, device)
    _, x0 = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise, return_pred_x0=True, backend=backend)
    _, r_x0 = reference.posterior_step(mo.cpu(), sample.cpu(), t.cpu(), prev_t.cpu(), schedule, config, noise.cpu())
    assert r_x0.abs().max() == 1.0
    assert x0.abs().max() <= 1.0


def use_clipped_params():
    for backend in FAST_BACKENDS:
        for pred in PREDICTION_TYPES if not is_slow(backend) else ("sample",):
            yield pytest.param(backend, pred, id=f"{backend}-{pred}")


@pytest.mark.parametrize("backend,pred", list(use_clipped_params()))
def test_ddim_use_clipped_model_output(schedule, backend, pred):
    device = backend_device(backend)
    config = make_config("ddim", pred, clip="clip", eta=0.5, use_clipped_model_output=True)
    mo, sample, noise = make_step_inputs((5, 2, 3, 4), config, False, device, seed=3)
    t, prev_t = step_timesteps(5, device)
    check_step(backend, mo, sample, t, prev_t, schedule, config, noise, None)
    # it changes the result where x0 was clipped
    other = posterior_step(
        mo, sample, t, prev_t, schedule, make_config("ddim", pred, clip="clip", eta=0.5), noise=noise, backend=backend
    )[0]
    assert not torch.equal(
        other, posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise, backend=backend)[0]
    )


SCHEDULES = {
    "cosine-T50": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "sigmoid": dict(beta_schedule="sigmoid"),
}


SCHEDULE_CONFIGS = {
    "ddpm-v-large-clip-g3": (make_config("ddpm", "v_prediction", "fixed_large", "clip"), 3.0),
    "ddpm-x0-range-thresh": (make_config("ddpm", "sample", "learned_range", "threshold"), None),
    "ddim-v-eta1": (make_config("ddim", "v_prediction", clip="none", eta=1.0), None),
    "ddim-x0-thresh-g3": (make_config("ddim", "sample", clip="threshold", eta=0.0), 3.0),
    "ddim-eps-eta0.5-clip": (make_config("ddim", "epsilon", clip="clip", eta=0.5), None),
}


def schedule_params():
    for backend in FAST_BACKENDS:
        for i, (name, cname) in enumerate(itertools.product(SCHEDULES, SCHEDULE_CONFIGS)):
            if name == "zero_snr" and "eps" in cname:
                continue  # epsilon prediction is refused there (test_zero_terminal_snr_rejects_epsilon)
            if is_slow(backend) and i % 2:
                continue
            yield pytest.param(backend, name, cname, id=f"{backend}-{name}-{cname}")


@pytest.mark.parametrize("backend,name,cname", list(schedule_params()))
def test_other_schedules(backend, name, cname):
    device = backend_device(backend)
    sched = Schedule.from_config(**SCHEDULES[name])
    config, guidance = SCHEDULE_CONFIGS[cname]
    n = sched.num_train_timesteps
    t = torch.tensor([0, 10, n // 2, n - 1], device=device)
    mo, sample, noise = make_step_inputs((4, 2, 3, 3), config, guidance is not None, device, seed=4)
    for prev_t in ((t - 20).clamp(min=-1), torch.tensor([-1, -1, n // 2 - 7, -1], device=device)):
        check_step(backend, mo, sample, t, prev_t, sched, config, noise, guidance)


@pytest.mark.parametrize("backend,name,cname", list(schedule_params()))
def test_consecutive_steps(backend, name, cname):
    """Full-length sampling steps t -> t - 1, where 1 - a_t / a_prev = beta_t is small (on a GPU
    this needs IEEE division: the approximate one gave 4-17x the reference's error)."""
    device = backend_device(backend)
    sched = Schedule.from_config(**SCHEDULES[name])
    config, guidance = SCHEDULE_CONFIGS[cname]
    n = sched.num_train_timesteps
    t = torch.tensor([0, 10, n // 2, n - 1], device=device)
    mo, sample, noise = make_step_inputs((4, 2, 3, 3), config, guidance is not None, device, seed=4)
    check_step(backend, mo, sample, t, t - 1, sched, config, noise, guidance)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear"])
def test_ddim_last_step_to_final_alpha(backend, device, schedule_name, eta):
    """DDIM at t=0 -> prev_t=-1 with set_alpha_to_one=False (Stable Diffusion's scheduler config; the
    last step of leading spacing): a_prev = final_alpha_cumprod = a_t, so sigma = 0 and x_prev =
    sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    kw = SCHEDULES["scaled_linear"] if schedule_name == "scaled_linear" else {}
    sched = Schedule.from_config(**{**kw, "set_alpha_to_one": False})
    config = make_config("ddim", "sample", clip="threshold", eta=eta)
    mo, sample, noise = make_step_inputs((2, 3, 4, 4), config, False, device, seed=19)
    t, prev_t = torch.zeros(2, dtype=torch.int64, device=device), torch.full((2,), -1, device=device)
    for guidance in (None, 3.0):
        if guidance is not None:
            mo = torch.cat([mo * 0.5, mo])
        prev, _ = posterior_step(
            mo, sample, t, prev_t, sched, config, noise=noise, guidance_scale=guidance, backend=backend
        )
        assert torch.isfinite(prev).all()
        check_step(backend, mo, sample, t, prev_t, sched, config, noise, guidance)


def test_ddim_final_alpha_cumprod_used(backend, device):
    """DDIM's last step steps to final_alpha_cumprod: alphas_cumprod[0] when set_alpha_to_one=False."""
    one = Schedule.from_config()
    first = Schedule.from_config(set_alpha_to_one=False)
    config = make_config("ddim", "epsilon", clip="none")
    mo, sample, _ = make_step_inputs((2, 2, 3, 3), config, False, device, seed=5)
    t, prev_t = torch.tensor([20, 20], device=device), torch.tensor([-1, -1], device=device)
    a = posterior_step(mo, sample, t, prev_t, one, config, backend=backend)[0]
    b = posterior_step(mo, sample, t, prev_t, first, config, backend=backend)[0]
    assert not torch.allclose(a, b)
    check_step(backend, mo, sample, t, prev_t, first, config, None, None)


@pytest.mark.parametrize("var", ["fixed_small", "learned"])
def test_guidance_scale_semantics(backend, device, schedule, var):
    """uncond + s (cond - uncond): s = 1 is the conditional step, s = 0 the unconditional one (with
    learned variance, the variance channels always come from the conditional half)."""
    config = make_config("ddpm", "epsilon", var, "clip")
    mo, sample, noise = make_step_inputs((3, 2, 3, 4), config, True, device, seed=21)
    uncond, cond = mo.chunk(2)
    t, prev_t = step_timesteps(3, device, rotate=2)
    run = lambda m, g: posterior_step(
        m,
        sample,
        t,
        prev_t,
        schedule,
        config,
        noise=noise,
        guidance_scale=g,  # noqa: E731
        backend=backend,
    )[0]
    torch.testing.assert_close(run(mo, 1.0), run(cond, None), rtol=1e-6, atol=1e-6)
    mixed = torch.cat([uncond[:, :2], cond[:, 2:]], dim=1)
    torch.testing.assert_close(run(mo, 0.0), run(mixed, None), rtol=1e-6, atol=1e-6)
    (r, _), (e, _) = reference_step(mo, sample, t, prev_t, schedule, config, noise, 5.25)
    assert_close_to_reference(run(mo, 5.25), r, e)


# ------------------------------------------------------------------ dtypes
DTYPE_CONFIGS = {
    "ddpm-eps-small-clip": (make_config("ddpm", "epsilon", "fixed_small", "clip"), None),
    "ddim-v-eta0.5-thresh": (make_config("ddim", "v_prediction", clip="threshold", eta=0.5), None),
    "ddpm-x0-range-guided": (make_config("ddpm", "sample", "learned_range", "none"), 7.5),
    "ddpm-v-learned-thresh-guided": (make_config("ddpm", "v_prediction", "learned", "threshold"), 1.5),
}
DTYPE_PAIRS = {  # (sample dtype, model_output dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32-sample-bf16-mo": (torch.float32, torch.bfloat16),
    "fp16-sample-fp32-mo": (torch.float16, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "fp32-sample-fp64-mo": (torch.float32, torch.float64),
}


def dtype_params():
    for backend in FAST_BACKENDS:
        for pair in DTYPE_PAIRS:
            for i, name in enumerate(DTYPE_CONFIGS):
                if is_slow(backend) and i % 2 != list(DTYPE_PAIRS).index(pair) % 2:
                    continue
                yield pytest.param(backend, pair, name, id=f"{backend}-{pair}-{name}")


@pytest.mark.parametrize("backend,pair,name", list(dtype_params()))
def test_dtypes(schedule, backend, pair, name):
    device = backend_device(backend)
    dtype, mo_dtype = DTYPE_PAIRS[pair]
    config, guidance = DTYPE_CONFIGS[name]
    mo, sample, noise = make_step_inputs((5, 3, 4, 5), config, guidance is not None, device, dtype, mo_dtype, seed=6)
    t, prev_t = step_timesteps(5, device, rotate=1)
    if backend == "triton" and torch.float64 in (dtype, mo_dtype):
        with pytest.raises(TypeError, match="float64"):
            posterior_step(
                mo, sample, t, prev_t, schedule, config, noise=noise, guidance_scale=guidance, backend=backend
            )
        return
    prev, _ = check_step(backend, mo, sample, t, prev_t, schedule, config, noise, guidance)
    assert prev.dtype == dtype


def test_fp64_uses_fp64_scalars(schedule):
    """eta, guidance_scale, clip_sample_range reach the fp64 kernels unrounded."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    # eta 0.3, guidance 7.3 and clip range 0.7 are not fp32 values
    config = StepConfig(kind="ddim", prediction_type="epsilon", clip_sample=True, clip_sample_range=0.7, eta=0.3)
    mo, sample, noise = make_step_inputs((3, 2, 4, 4), config, True, "cpu", torch.float64, seed=7)
    t, prev_t = torch.tensor([5, 40, 999]), torch.tensor([0, 20, 979])
    check_step("cpp", mo, sample, t, prev_t, schedule, config, noise, 7.3)


def test_fp64_ddim_last_step_with_final_alpha_is_finite():
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    sched = Schedule.from_config(set_alpha_to_one=False)  # final_alpha_cumprod = alphas_cumprod[0] = 0.9999
    config = StepConfig(kind="ddim", prediction_type="epsilon", clip_sample=False, eta=1.0)
    mo, sample, noise = make_step_inputs((2, 2, 2, 3), config, False, "cpu", torch.float64, seed=7)
    t, prev_t = torch.tensor([0, 0]), torch.tensor([-1, -1])
    prev, _ = posterior_step(mo, sample, t, prev_t, sched, config, noise=noise, backend="cpp")
    assert torch.isfinite(prev).all()
    check_step("cpp", mo, sample, t, prev_t, sched, config, noise, None)


# ------------------------------------------------------------------ shapes and layouts
LAYOUT_CONFIGS = [
    (make_config("ddpm", "v_prediction", "learned_range", "threshold"), 3.0),
    (make_config("ddim", "epsilon", clip="clip", eta=0.5), None),
]


def channel_slice(x: torch.Tensor, lo: int = 1) -> torch.Tensor:
    """x's values as a non-contiguous channel slice of a bigger tensor."""
    big = torch.full((x.shape[0], x.shape[1] + 3, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device)
    big[:, lo : lo + x.shape[1]] = x
    view = big[:, lo : lo + x.shape[1]]
    assert not view.is_contiguous()
    return view


def spatial_slice(x: torch.Tensor) -> torch.Tensor:
    """x's values at every other row of a bigger tensor (not viewable as (N, C, S))."""
    big = torch.full((*x.shape[:2], 2 * x.shape[2], *x.shape[3:]), float("nan"), dtype=x.dtype, device=x.device)
    big[:, :, ::2] = x
    return big[:, :, ::2]


def apply_layout(layout: str | None, mo, sample, noise):
    """(model_output, sample, noise) with the same values in one of LAYOUTS' memory layouts."""
    if layout == "channels_last":
        return tuple(x.contiguous(memory_format=torch.channels_last) for x in (mo, sample, noise))
    if layout == "mo_channels_last":
        return mo.contiguous(memory_format=torch.channels_last), sample, noise
    if layout == "mo_channel_slice":
        return channel_slice(mo), sample, noise
    if layout == "sample_slice":
        return mo, spatial_slice(sample), spatial_slice(noise)
    if layout == "expanded_sample":  # one sample broadcast over the batch (stride 0)
        return mo, sample[:1].expand(sample.shape), noise
    return mo, sample, noise


LAYOUTS = {
    "batch1": ((1, 3, 8, 8), None),
    "odd": ((3, 5, 7, 11), None),
    "2d": ((4, 10), None),
    "5d": ((2, 3, 2, 3, 4), None),
    "channels_last": ((2, 3, 5, 7), "channels_last"),
    "mo_channels_last": ((2, 3, 5, 7), "mo_channels_last"),
    "mo_channel_slice": ((3, 3, 4, 5), "mo_channel_slice"),
    "sample_slice": ((2, 3, 4, 5), "sample_slice"),
    "expanded_sample": ((3, 2, 4, 5), "expanded_sample"),
}


def layout_params():
    for backend in FAST_BACKENDS:
        for name in LAYOUTS:
            for i in range(len(LAYOUT_CONFIGS)):
                if is_slow(backend) and i != list(LAYOUTS).index(name) % 2:
                    continue
                yield pytest.param(backend, name, i, id=f"{backend}-{name}-{i}")


@pytest.mark.parametrize("backend,name,config_index", list(layout_params()))
def test_shapes_and_layouts(schedule, backend, name, config_index):
    device = backend_device(backend)
    shape, layout = LAYOUTS[name]
    config, guidance = LAYOUT_CONFIGS[config_index]
    mo, sample, noise = make_step_inputs(shape, config, guidance is not None, device, seed=8)
    base = posterior_step(
        mo,
        sample,
        *step_timesteps(shape[0], device, rotate=2),
        schedule,
        config,
        noise=noise,
        guidance_scale=guidance,
        return_pred_x0=True,
        backend=backend,
    )
    mo, sample, noise = apply_layout(layout, mo, sample, noise)
    t, prev_t = step_timesteps(shape[0], device, rotate=2)
    prev, x0 = check_step(backend, mo, sample, t, prev_t, schedule, config, noise, guidance)
    if layout in ("channels_last", "mo_channels_last", "mo_channel_slice", "sample_slice"):
        # the layout changes nothing in the values
        assert torch.equal(prev.cpu(), base[0].cpu()) and torch.equal(x0.cpu(), base[1].cpu())


# ------------------------------------------------------------------ in-kernel noise
NOISE_CONFIGS = {
    "ddpm-small": (make_config("ddpm", "epsilon", "fixed_small", "clip"), None),
    "ddpm-learned-guided": (make_config("ddpm", "v_prediction", "learned", "none"), 3.0),
    "ddim-eta1-thresh": (make_config("ddim", "sample", clip="threshold", eta=1.0), None),
}


# rows of 15 elements (Philox blocks straddle rows) and of 32 (Triton draws 4 normals a call)
@pytest.mark.parametrize("shape", [(5, 2, 3, 5), (3, 2, 4, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(NOISE_CONFIGS))
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_in_kernel_noise(schedule, backend, name, dtype, shape):
    device = backend_device(backend)
    config, guidance = NOISE_CONFIGS[name]
    mo, sample, _ = make_step_inputs(shape, config, guidance is not None, device, dtype, seed=9)
    t, prev_t = step_timesteps(shape[0], device)
    g = torch.Generator().manual_seed(31337)
    seed = seed_of(g)
    prev, x0 = posterior_step(
        mo,
        sample,
        t,
        prev_t,
        schedule,
        config,
        generator=g,
        guidance_scale=guidance,
        return_pred_x0=True,
        backend=backend,
    )
    noise = reference.philox_randn(seed, shape).to(dtype)
    (r_prev, r_x0), (e_prev, e_x0) = reference_step(mo, sample, t, prev_t, schedule, config, noise, guidance)
    assert_close_to_reference(prev, r_prev, e_prev)
    assert_close_to_reference(x0, r_x0, e_x0)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not is_slow(backend)):
        assert_mostly_identical(prev, r_prev)
    # the noise was really added: without it the result differs (sigma is ~0 on steps to the end,
    # and bf16's 8-bit mantissa rounds a small sigma z away more often)
    (m_prev, _), _ = reference_step(mo, sample, t, prev_t, schedule, config, torch.zeros_like(noise), guidance)
    noisy = ((t > 0) & (prev_t >= 0)).cpu()
    assert (prev.cpu()[noisy] != m_prev[noisy]).float().mean() > (0.8 if dtype == torch.bfloat16 else 0.9)
    # the same generator state gives the same result; the generator advanced by one draw
    again = posterior_step(
        mo,
        sample,
        t,
        prev_t,
        schedule,
        config,
        generator=torch.Generator().manual_seed(31337),
        guidance_scale=guidance,
        backend=backend,
    )[0]
    assert torch.equal(again, prev)
    assert seed_of(g) != seed
    nxt = posterior_step(
        mo, sample, t, prev_t, schedule, config, generator=g, guidance_scale=guidance, backend=backend
    )[0]
    assert not torch.equal(nxt.cpu()[noisy], prev.cpu()[noisy])


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_in_kernel_noise_layout_independent(schedule, backend):
    """The drawn noise is indexed by the logical NCHW position: channels_last gives the same step."""
    device = backend_device(backend)
    config = make_config("ddpm", "epsilon", "fixed_large", "clip")
    mo, sample, _ = make_step_inputs((2, 3, 4, 5), config, False, device, seed=18)
    t, prev_t = step_timesteps(2, device, rotate=3)
    base = posterior_step(
        mo, sample, t, prev_t, schedule, config, generator=torch.Generator().manual_seed(5), backend=backend
    )[0]
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    other = posterior_step(
        cl(mo), cl(sample), t, prev_t, schedule, config, generator=torch.Generator().manual_seed(5), backend=backend
    )[0]
    torch.testing.assert_close(other, base, rtol=0, atol=0)


def test_ddim_eta0_needs_no_generator(backend, device, schedule):
    config = make_config("ddim", "epsilon", clip="clip", eta=0.0)
    mo, sample, _ = make_step_inputs((5, 2, 3, 4), config, False, device, seed=10)
    t, prev_t = step_timesteps(5, device)
    rng_state = lambda: torch.cuda.get_rng_state() if device.type == "cuda" else torch.random.get_rng_state()  # noqa: E731
    state = rng_state()
    a = posterior_step(mo, sample, t, prev_t, schedule, config, backend=backend)[0]
    b = posterior_step(mo, sample, t, prev_t, schedule, config, backend=backend)[0]
    assert torch.equal(a, b)
    assert torch.equal(state, rng_state())  # the global RNG was not touched
    g = torch.Generator().manual_seed(1)
    c = posterior_step(mo, sample, t, prev_t, schedule, config, generator=g, backend=backend)[0]
    assert torch.equal(a, c)
    (r, _), (e, _) = reference_step(mo, sample, t, prev_t, schedule, config, None, None)
    assert_close_to_reference(a, r, e)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)], ids=str)
@pytest.mark.parametrize("clip", CLIPS)
def test_empty_inputs(backend, device, schedule, shape, clip):
    """No sample, or samples without elements: empty results, drawn or given noise (a per-sample
    quantile of nothing leaves the scale at 1)."""
    config = make_config("ddpm", "epsilon", "fixed_small", clip)
    x = torch.empty(shape, device=device)
    t = torch.full((shape[0],), 5, device=device)
    for noise in (None, torch.empty(shape, device=device)):
        g = torch.Generator().manual_seed(0) if noise is None else None
        prev, x0 = posterior_step(
            x, x, t, t - 1, schedule, config, noise=noise, generator=g, return_pred_x0=True, backend=backend
        )
        assert prev.shape == shape and x0.shape == shape


@pytest.mark.parametrize("var", ["fixed_small", "learned_range"])
def test_ddpm_last_step_adds_no_noise(backend, device, schedule, var):
    config = make_config("ddpm", "epsilon", var, "clip")
    mo, sample, noise = make_step_inputs((3, 2, 3, 4), config, False, device, seed=11)
    t, prev_t = torch.zeros(3, dtype=torch.int64, device=device), torch.full((3,), -1, device=device)
    drawn = posterior_step(
        mo, sample, t, prev_t, schedule, config, generator=torch.Generator().manual_seed(0), backend=backend
    )[0]
    given = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise * 100, backend=backend)[0]
    (r, _), (e, _) = reference_step(mo, sample, t, prev_t, schedule, config, None, None)
    assert_close_to_reference(drawn, r, e)
    assert torch.equal(drawn, given)


# ------------------------------------------------------------------ dynamic thresholding
@pytest.mark.parametrize("ratio", [1.0, 0.995, 0.9, 0.5, 0.25, 1e-4])
@pytest.mark.parametrize("numel", [105, 4096])
def test_quantile_scale_matches_torch_quantile(ratio, numel):
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(3, numel, generator=g) * 2).abs()
    x[1] *= 0.1  # a sample whose scale clamps to 1
    max_value = 3.0
    got = quantile_scale(x, ratio, max_value)
    want = torch.quantile(x, ratio, dim=1).clamp(min=1.0, max=max_value)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got[1] == 1.0


def order_stat_rows() -> torch.Tensor:
    """Rows that stress a select on float bits: ties across the rank, zeros and -0.0, one bin
    holding everything, inf, tiny and huge magnitudes, a lone large value."""
    g = torch.Generator().manual_seed(14)
    m = 203
    rows = [
        (torch.randn(m, generator=g) * 2).abs(),
        torch.full((m,), 0.75),
        torch.randint(0, 4, (m,), generator=g).float() * 0.5,
        1.0 + torch.rand(m, generator=g) * 1e-3,  # one histogram bin
        torch.where(torch.rand(m, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0)),
        torch.cat([torch.zeros(m - 1), torch.tensor([float("inf")])]),
        torch.rand(m, generator=g) * 1e-38,  # subnormals
        torch.rand(m, generator=g) * 1e30,
        torch.cat([torch.rand(m - 1, generator=g), torch.tensor([7.0])]),
    ]
    return torch.stack(rows)


def kernel_order_stats(flat: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.ddpm_fast_C.abs_order_stats(flat, lo)


ORDER_STAT_IMPLS = [pytest.param(topk_order_stats, id="topk")]
if "cpp" in FAST_BACKENDS:
    ORDER_STAT_IMPLS.append(pytest.param(kernel_order_stats, id="radix-cpp"))


@pytest.mark.parametrize("impl", ORDER_STAT_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adjacent_order_stats(impl, dtype):
    """Both order-statistic paths (radix select on CPU, top-k elsewhere) give the sorted row's
    values at ranks lo and lo + 1 (lo again at the end), at every rank."""
    rows = order_stat_rows().to(dtype)
    ordered = rows.sort(dim=1).values
    m = rows.shape[1]
    for lo in (0, 1, 50, 101, 102, 150, 201, 202):
        got_lo, got_hi = impl(rows, lo)
        assert torch.equal(got_lo, ordered[:, lo]), lo
        assert torch.equal(got_hi, ordered[:, min(lo + 1, m - 1)]), lo
    one = rows[:, :1].contiguous()  # one element: both ranks are it
    assert all(torch.equal(v, one[:, 0]) for v in impl(one, 0))


@pytest.mark.skipif("cpp" not in FAST_BACKENDS, reason="needs the C++ extension")
def test_order_stats_kernel_refuses_bad_input():
    x = torch.rand(2, 5)
    with pytest.raises(RuntimeError, match="rank"):
        kernel_order_stats(x, 5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        kernel_order_stats(x.half(), 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel_order_stats(x.t(), 1)


def threshold_params():
    for backend in FAST_BACKENDS:
        yield pytest.param(backend, (3, 3, 5, 7), 1.0, 2.0, id=f"{backend}-small-ratio1")
        yield pytest.param(backend, (3, 3, 5, 7), 0.995, 10.0, id=f"{backend}-small-ratio0.995")
        if not is_slow(backend):  # per-sample numel 4096: k = 2049 > 1024 (kthvalue path) at ratio 0.5
            for ratio in (1.0, 0.995, 0.5):
                yield pytest.param(backend, (2, 4, 32, 32), ratio, 10.0, id=f"{backend}-large-ratio{ratio}")


@pytest.mark.parametrize("backend,shape,ratio,max_value", list(threshold_params()))
def test_threshold_scale(schedule, backend, shape, ratio, max_value):
    """With x0 prediction, pred_x0 is the thresholded model output: compare with the torch.quantile reference."""
    device = backend_device(backend)
    config = StepConfig(
        prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
    )
    g = torch.Generator().manual_seed(13)
    mo = torch.randn(shape, generator=g) * torch.tensor([3.0, 0.2, 1.7][: shape[0]]).reshape(-1, 1, 1, 1)
    sample, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mo, sample, noise = mo.to(device), sample.to(device), noise.to(device)
    t, prev_t = step_timesteps(shape[0], device, rotate=3)
    _, x0 = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise, return_pred_x0=True, backend=backend)
    want = reference.dynamic_threshold(mo.cpu(), ratio, max_value)
    assert_close_fp32(x0, want)
    # the per-sample scale: where x0 is not clamped, x0 = mo / s
    s = torch.quantile(mo.cpu().abs().flatten(1), ratio, dim=1).clamp(1.0, max_value)
    assert s[1] == 1.0 and (s[0] > 1.0)
    check_step(backend, mo, sample, t, prev_t, schedule, config, noise, None)


# ------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_matches_eager(schedule):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    config = make_config("ddpm", "v_prediction", "learned_range", "threshold")
    mo, sample, noise = make_step_inputs((2, 3, 4, 4), config, True, "cpu", seed=14)
    t, prev_t = step_timesteps(2, "cpu", rotate=3)

    def fn(m, x, tt, pt, z):
        prev, x0 = posterior_step(
            m, x, tt, pt, schedule, config, noise=z, guidance_scale=3.0, return_pred_x0=True, backend="cpp"
        )
        return prev * 2, x0

    want = fn(mo, sample, t, prev_t, noise)  # eager first (warms the schedule's table cache)
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True)(mo, sample, t, prev_t, noise)
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs(schedule):
    cfg = StepConfig()
    x = torch.randn(2, 3, 4, 4)
    mo = torch.randn(2, 3, 4, 4)
    t, p = torch.tensor([5, 9]), torch.tensor([4, 8])
    step = lambda *a, **k: posterior_step(*a, **k)  # noqa: E731
    with pytest.raises(ValueError, match="batch"):
        step(torch.randn(3, 3, 4, 4), x, t, p, schedule, cfg)
    with pytest.raises(ValueError, match="spatial"):
        step(torch.randn(2, 3, 4, 5), x, t, p, schedule, cfg)
    with pytest.raises(ValueError, match="channels"):
        step(torch.randn(2, 4, 4, 4), x, t, p, schedule, cfg)
    with pytest.raises(ValueError, match="uncond, cond"):
        step(torch.randn(3, 3, 4, 4), x, t, p, schedule, cfg, guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond, cond"):
        step(mo, x, t, p, schedule, cfg, guidance_scale=2.0)
    for var in ("learned", "learned_range"):
        with pytest.raises(ValueError, match="2 x 3"):
            step(mo, x, t, p, schedule, StepConfig(variance_type=var))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        step(mo, x, torch.tensor([5, T]), p, schedule, cfg)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        step(mo, x, torch.tensor([-1, 5]), p, schedule, cfg)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        step(mo, x, t, torch.tensor([-2, 4]), schedule, cfg)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        step(mo, x, t, torch.tensor([4, T]), schedule, cfg)
    with pytest.raises(ValueError, match="device"):
        step(mo, x, t.to("meta"), p, schedule, cfg)
    with pytest.raises(ValueError, match="device"):
        step(mo, x, t, p.to("meta"), schedule, cfg)
    with pytest.raises(ValueError, match="shape"):
        step(mo, x, torch.tensor([1, 2, 3]), p, schedule, cfg)
    with pytest.raises(TypeError, match="integer"):
        step(mo, x, t.float(), p, schedule, cfg)
    with pytest.raises(TypeError, match="integer"):
        step(mo, x, t, p.double(), schedule, cfg)
    with pytest.raises(TypeError, match="sample"):
        step(mo, x.to(torch.int32), t, p, schedule, cfg)
    with pytest.raises(TypeError, match="model_output"):
        step(mo.to(torch.uint8), x, t, p, schedule, cfg)
    with pytest.raises(ValueError, match="batch"):
        step(torch.randn(2), torch.randn(2), t, p, schedule, cfg)
    with pytest.raises(ValueError, match="eta"):
        StepConfig(kind="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        StepConfig(kind="ddim", eta=-0.1)
    with pytest.raises(ValueError, match="noise has shape"):
        step(mo, x, t, p, schedule, cfg, noise=torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="either noise or generator"):
        step(mo, x, t, p, schedule, cfg, noise=torch.randn_like(x), generator=torch.Generator())
    with pytest.raises(TypeError, match="StepConfig"):
        step(mo, x, t, p, schedule, {"kind": "ddpm"})
    with pytest.raises(ValueError, match="unknown backend"):
        step(mo, x, t, p, schedule, cfg, backend="metal")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        StepConfig(prediction_type="score")


def test_cpp_isa_builds_give_the_same_bits(schedule):
    """The C++ step and noising stages keep the reference's fp32 operations in every vector-ISA build
    (AVX-512, AVX2, baseline: no FMA contraction), so each build this CPU runs gives the same bits:
    a result never depends on which CPU ran it. Given noise (in-kernel draws use libmvec's log/cos,
    whose vector widths differ in the last bits); rows of 1..41 elements cover every build's tails."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    configs = [
        make_config(kind, pred, var, clip, eta)
        for kind, pred, var, clip, eta in [
            ("ddpm", "epsilon", "fixed_small", "clip", 0.0),
            ("ddpm", "v_prediction", "learned_range", "threshold", 0.0),
            ("ddim", "sample", "fixed_small", "none", 0.5),
            ("ddim", "epsilon", "fixed_small", "threshold", 1.0),
        ]
    ]
    results = {}
    for isa in cpu_isas():
        with use_cpu_isa(isa):
            out = []
            for i, config in enumerate(configs):
                for rows in (1, 7, 41):
                    shape = (3, 2, rows)
                    mo, sample, noise = make_step_inputs(shape, config, i % 2 == 0, "cpu", seed=i)
                    t, prev_t = step_timesteps(3, "cpu", rotate=i)
                    out += posterior_step(
                        mo,
                        sample,
                        t,
                        prev_t,
                        schedule,
                        config,
                        noise=noise,
                        guidance_scale=3.0 if i % 2 == 0 else None,
                        return_pred_x0=True,
                        backend="cpp",
                    )
                    x_t, _, target = ddpm_fast.q_sample(
                        sample, t, schedule, noise=noise, target="v_prediction", backend="cpp"
                    )
                    out += [x_t, target]
            results[isa] = out
    first, *others = cpu_isas()
    for isa in others:
        for a, b in zip(results[first], results[isa], strict=True):
            assert torch.equal(a, b), f"{isa} build differs from {first}"


def test_zero_terminal_snr_rejects_epsilon():
    sched = Schedule.from_config(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    x = torch.randn(2, 3, 4, 4)
    for backend in ["reference", *FAST_BACKENDS]:
        device = backend_device(backend)
        with pytest.raises(ValueError, match="zero-terminal-SNR"):
            posterior_step(
                x.to(device), x.to(device), 5, 4, sched, StepConfig(prediction_type="epsilon"), backend=backend
            )


def test_ddim_eta1_from_zero_terminal_snr_has_no_direction_term(backend, device):
    """From a_bar_t = 0 with eta = 1, sigma^2 = 1 - a_bar_prev and the direction term's variance
    1 - a_bar_prev - sigma^2 is exactly 0: prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) z on every
    backend and CPU (a sqrt squared again left ~1e-3 of eps there on AVX-512)."""
    sched = Schedule.from_config(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    ts = sched.timesteps(10)
    prev = sched.previous_timesteps(ts, "ddim")
    cfg = StepConfig.from_scheduler(sched.config, "ddim", eta=1.0)
    g = torch.Generator().manual_seed(3)
    mo, x, z = (torch.randn(2, 3, 8, 8, generator=g).mul(100 if i == 1 else 1) for i in range(3))  # eps ~ 100 x
    t, p = ts[:1].expand(2).to(device), prev[:1].expand(2).to(device)
    out, x0 = posterior_step(
        mo.to(device), x.to(device), t, p, sched, cfg, noise=z.to(device), return_pred_x0=True, backend=backend
    )
    a_prev = sched.alphas_cumprod[prev[0]].item()
    expected = a_prev**0.5 * x0.cpu() + (1 - a_prev) ** 0.5 * z
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_other_device_inputs(schedule):
    x = torch.randn(2, 3, 4, 4, device="cuda")
    t = torch.tensor([5, 9], device="cuda")
    with pytest.raises(ValueError, match="device"):
        posterior_step(x, x, t.cpu(), t - 1, schedule, StepConfig())
    with pytest.raises(ValueError, match="model_output is on"):
        posterior_step(x.cpu(), x, t, t - 1, schedule, StepConfig())
    with pytest.raises(ValueError, match="noise is on"):
        posterior_step(x, x, t, t - 1, schedule, StepConfig(), noise=x.cpu())


def test_unavailable_backend(schedule):
    x = torch.randn(2, 3, 4, 4)
    if not ddpm_fast.backends()["cuda"][0]:
        with pytest.raises(RuntimeError, match="not available"):
            posterior_step(x, x, 5, 4, schedule, StepConfig(), backend="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            posterior_step(x, x, 5, 4, schedule, StepConfig(), backend="cuda")


def test_reference_backend_and_default(schedule):
    config = make_config("ddpm", "epsilon", "fixed_large", "clip")
    mo, sample, noise = make_step_inputs((5, 2, 3, 3), config, False, "cpu", seed=15)
    t, prev_t = step_timesteps(5, "cpu")
    want = reference.posterior_step(mo, sample, t, prev_t, schedule, config, noise)
    got = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise, return_pred_x0=True, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    default = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise)
    assert default[1] is None
    assert_close_fp32(default[0], want[0])


def test_int_timesteps_broadcast(backend, device, schedule):
    config = make_config("ddim", "v_prediction", clip="clip", eta=0.5)
    mo, sample, noise = make_step_inputs((3, 2, 3, 3), config, False, device, seed=16)
    got = posterior_step(mo, sample, 400, 380, schedule, config, noise=noise, backend=backend)[0]
    tt = torch.full((3,), 400, device=device)
    (r, _), _ = reference_step(mo, sample, tt, tt - 20, schedule, config, noise, None)
    assert_close_fp32(got, r)


def test_no_value_checks_clamps(backend, device, schedule):
    config = make_config("ddpm", "epsilon", "fixed_small", "clip")
    mo, sample, noise = make_step_inputs((2, 2, 3, 3), config, False, device, seed=17)
    t, prev_t = torch.tensor([T + 50, 300], device=device), torch.tensor([T - 1, 280], device=device)
    with no_value_checks():
        got = posterior_step(mo, sample, t, prev_t, schedule, config, noise=noise, backend=backend)[0]
    (r, _), _ = reference_step(mo, sample, t.clamp(max=T - 1), prev_t, schedule, config, noise, None)
    assert torch.isfinite(got).all()
    assert_close_fp32(got, r)
