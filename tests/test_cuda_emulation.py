"""The CUDA C++ kernels, run on the CPU: csrc/noising_cuda.cu, posterior_cuda.cu and
vlb_terms_cuda.cu compiled with g++ against stand-in CUDA headers (tests/cuda_emulation/), each
launch stepped one thread at a time (the threads of a block that synchronise, as in vlb_terms'
block reduction, as fibers switched at each __syncthreads). GPUs are rare on the machines this
project is built on; this checks the CUDA kernels everywhere:

- the harness (harness.cpp): which elements each thread takes, and the in-kernel noise lanes,
  bit for bit;
- the ops: q_sample, posterior_step and vlb_terms run end to end (the Python wrappers, the
  quantile of dynamic thresholding) with the emulated kernels in place of the CUDA ones, against the
  reference, over every step configuration.

The math library is the host's (the stand-in half and bfloat16 types round to nearest even,
as the GPU's conversions do), so values follow the reference's tolerance rule, not a GPU's
bits. What the emulation cannot see: timing, memory coalescing, races (threads run one at a time
between barriers, so a missing __syncthreads goes unnoticed)."""

import ctypes
import importlib
import itertools
import math
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import test_vlb_terms_op as vlb_op
import torch
from conftest import assert_close_to_reference, assert_mostly_identical
from test_noising import LOW_DTYPES, TARGETS, lay_out, make_inputs, reference_outputs, timesteps
from test_posterior import (
    CLIPS,
    DTYPE_CONFIGS,
    DTYPE_PAIRS,
    GUIDANCE,
    apply_layout,
    check_step,
    make_config,
    make_step_inputs,
    reference_step,
    step_timesteps,
)

import ddpm_fast
from ddpm_fast import q_sample
from ddpm_fast.ops import noising, posterior, vlb_terms
from ddpm_fast.ops._common import as_3d
from ddpm_fast.schedule import PREDICTION_TYPES, VARIANCE_TYPES

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCH = re.compile(r"(\w+<[^<>]*>)<<<([^,]+), (\w+), 0, stream>>>\(([^;]*)\);")


def rewrite_launches(source: str, launches: int = 1) -> str:
    """kernel<<<blocks, threads, 0, stream>>>(args); -> emulate_launch(blocks, threads, [&] { kernel(args); });
    emulate_launch_synced (a fiber per thread) where the kernels synchronise with __syncthreads."""
    runner = "emulate_launch_synced" if "__syncthreads" in source else "emulate_launch"
    rewritten, count = LAUNCH.subn(rf"{runner}(\2, \3, [&] {{ \1(\4); }});", source)
    assert count == launches, f"expected {launches} kernel launches, found {count}"
    return rewritten


def compile_emulation(out_dir: Path, main: Path | None) -> Path:
    """The .cu files of q_sample, posterior_step and vlb_terms (launches rewritten) plus ``main`` as
    an executable, or as a shared library with c_api.cpp's entry points when main is None."""
    sources = []
    for name, launches in (("noising_cuda.cu", 1), ("posterior_cuda.cu", 1), ("vlb_terms_cuda.cu", 3)):
        out = out_dir / name.replace(".cu", ".cpp")
        out.write_text(rewrite_launches((ROOT / "csrc" / name).read_text(), launches))
        sources.append(str(out))
    target = out_dir / ("emulated" if main is not None else "emulated.so")
    flags = [] if main is not None else ["-shared", "-fPIC"]
    command = [
        "g++",
        "-std=c++17",
        "-O1",
        "-D__CUDA_ARCH__=900",  # the kernels' device branches (sincosf, __umulhi)
        f"-I{EMULATION}",
        f"-I{ROOT / 'csrc'}",
        "-include",
        "emulate.h",
        *flags,
        *sources,
        str(main if main is not None else EMULATION / "c_api.cpp"),
        "-o",
        str(target),
    ]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return target


def test_thread_mapping_and_noise_lanes(tmp_path):
    binary = compile_emulation(tmp_path, EMULATION / "harness.cpp")
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all match" in run.stdout, run.stdout + run.stderr


# ------------------------------------------------------------------ the ops on emulated kernels
def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _strides(x: torch.Tensor | None) -> list[int]:
    return [0, 0, 0] if x is None else list(as_3d(x).stride())


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # kernel_args.h DType


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """A stand-in for torch.ops.ddpm_fast_C whose q_sample and posterior_step run the emulated
    CUDA kernels (same signatures; tensors on the CPU)."""
    lib = ctypes.CDLL(str(compile_emulation(tmp_path_factory.mktemp("emulation"), None)))

    def q_sample_op(x0, t, sqrt_ab, sqrt_1mab, noise, seed, x_t, noise_out, target, target_kind):
        ptrs = [_ptr(x) for x in (x0, noise, x_t, noise_out, target, t, sqrt_ab, sqrt_1mab, seed)]
        n, c, s = as_3d(x0).shape
        ints = [v for x in (x0, noise, x_t, noise_out, target) for v in _strides(x)]
        ints += [sqrt_ab.numel(), n, c, s, target_kind, DTYPE_CODES[x0.dtype]]
        status = lib.emulated_q_sample((ctypes.c_void_p * 9)(*ptrs), (ctypes.c_int64 * len(ints))(*ints))
        assert status == 0

    def posterior_op(mo, sample, t, prev_t, table, noise, seed, scale, prev, pred_x0, abs_x0, *rest):
        final, guidance_scale, clip_range, eta, kind, pred, var, clip, guided, use_clipped = rest[:10]
        guide = rest[10] if len(rest) > 10 else None
        ptrs = [_ptr(x) for x in (mo, sample, noise, prev, pred_x0, abs_x0, t, prev_t, table, scale, seed, guide)]
        n, c, s = as_3d(sample).shape
        ints = [v for x in (mo, sample, noise, prev, pred_x0, abs_x0) for v in _strides(x)]
        ints += [n * mo.stride(0), c * mo.stride(1), table.numel(), n, c, s]  # mo_half, mo_var as the C++ glue
        ints += [kind, pred, var, clip, int(guided), int(mo.shape[1] == 2 * c), int(use_clipped)]
        ints += [DTYPE_CODES[mo.dtype], DTYPE_CODES[sample.dtype], *_strides(guide)]
        reals = [final, guidance_scale, clip_range, eta]
        status = lib.emulated_posterior_step(
            (ctypes.c_void_p * 12)(*ptrs), (ctypes.c_int64 * len(ints))(*ints), (ctypes.c_double * 4)(*reals)
        )
        assert status == 0

    def vlb_args(mo, x0, x_t, t, table, var, clip, grad=None, g=None, terms=None, mean_grad=True):
        ptrs = [_ptr(x) for x in (mo, x0, x_t, grad, t, table, g, terms)]
        n, c, s = as_3d(x0).shape
        ints = [v for x in (mo, x0, x_t, grad) for v in _strides(x)]
        ints += [c * mo.stride(1), 0 if grad is None else c * grad.stride(1), table.shape[0], n, c, s]  # as the glue
        ints += [var, int(clip), int(mean_grad), DTYPE_CODES[x0.dtype]]
        per = 1.0 / (c * s * math.log(2.0))
        return (ctypes.c_void_p * 8)(*ptrs), (ctypes.c_int64 * len(ints))(*ints), (ctypes.c_double * 1)(per)

    def vlb_fwd_op(mo, x0, x_t, t, table, var, clip, terms):
        assert terms.is_contiguous() and terms.dtype == (torch.float64 if x0.dtype == torch.float64 else torch.float32)
        assert lib.emulated_vlb_terms_fwd(*vlb_args(mo, x0, x_t, t, table, var, clip, terms=terms)) == 0

    def vlb_bwd_op(grad_terms, mo, x0, x_t, t, table, var, clip, mean_grad, grad):
        g = grad_terms.double().contiguous()  # as the glue
        args = vlb_args(mo, x0, x_t, t, table, var, clip, grad=grad, g=g, mean_grad=mean_grad)
        assert lib.emulated_vlb_terms_bwd(*args) == 0

    kernels = types.SimpleNamespace(
        q_sample=q_sample_op,
        posterior_step=posterior_op,
        vlb_terms_fwd=vlb_fwd_op,
        vlb_terms_bwd=vlb_bwd_op,
        abs_order_stats=torch.ops.ddpm_fast_C.abs_order_stats,  # the CPU quantile (CUDA uses topk)
    )
    return types.SimpleNamespace(ddpm_fast_C=kernels)


class _TorchWithOps:
    """torch, but with another ``torch.ops`` (what the op modules launch through)."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def on_emulated_cuda(monkeypatch, emulated_ops):
    """q_sample / posterior_step with backend='cuda' run the emulated kernels on CPU tensors."""
    if not ddpm_fast.backends()["cpp"][0]:
        pytest.skip("needs the C++ extension (its quantile op)")
    for module in (noising, posterior):
        monkeypatch.setattr(module, "torch", _TorchWithOps(emulated_ops))
        monkeypatch.setattr(module, "choose", lambda op, requested, device, **facts: "cuda")


def posterior_cases():
    kinds = (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5))
    for pred, var, clip, (kind, eta), guidance in itertools.product(
        PREDICTION_TYPES, VARIANCE_TYPES, CLIPS, kinds, GUIDANCE
    ):
        if kind == "ddim" and var != "fixed_small":  # DDIM ignores the variance type
            continue
        yield pytest.param(pred, var, clip, kind, eta, guidance, id=f"{kind}{eta}-{pred}-{var}-{clip}-g{guidance}")


@pytest.mark.parametrize("pred,var,clip,kind,eta,guidance", list(posterior_cases()))
def test_posterior_step_every_configuration(on_emulated_cuda, schedule, pred, var, clip, kind, eta, guidance):
    config = make_config(kind, pred, var, clip, eta=eta)
    shape = (5, 3, 4, 7)  # every STEPS pair once; rows of 28 (a multiple of 4)
    mo, sample, noise = make_step_inputs(shape, config, guidance is not None, "cpu", seed=21)
    t, prev_t = step_timesteps(shape[0], "cpu")
    check_step("cuda", mo, sample, t, prev_t, schedule, config, noise, guidance)


@pytest.mark.parametrize(
    "layout", ["channels_last", "mo_channels_last", "mo_channel_slice", "sample_slice", "expanded_sample", "odd"]
)
def test_posterior_step_layouts_and_drawn_noise(on_emulated_cuda, schedule, layout):
    config = make_config("ddpm", "v_prediction", "learned_range", "threshold")
    shape = (3, 3, 5, 7) if layout == "odd" else (3, 3, 4, 8)
    mo, sample, noise = apply_layout(layout, *make_step_inputs(shape, config, True, "cpu", seed=22))
    t, prev_t = step_timesteps(shape[0], "cpu", rotate=2)
    check_step("cuda", mo, sample, t, prev_t, schedule, config, noise, 2.0)
    # drawn in-kernel: the reference's Philox normals, up to the host's sin/cos/log
    seed_gen = torch.Generator().manual_seed(5)
    prev, _ = posterior.posterior_step(
        mo, sample, t, prev_t, schedule, config, generator=seed_gen, guidance_scale=2.0, backend="cuda"
    )
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5), dtype=torch.int64).item()
    z = ddpm_fast.reference.philox_randn(seed, shape)
    (want, _), (want64, _) = reference_step(mo, sample, t, prev_t, schedule, config, z, 2.0)
    assert_close_to_reference(prev, want, want64)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_q_sample(on_emulated_cuda, schedule, target, layout):
    shape = (3, 2, 5, 8)
    x0, noise = make_inputs(shape, torch.float32, "cpu", seed=23)
    t = timesteps(shape[0], "cpu")
    x0, noise = lay_out(x0, layout), lay_out(noise, layout)
    x_t, _, tgt = q_sample(x0, t, schedule, noise=noise, target=target, backend="cuda")
    ref = reference_outputs(x0, t, schedule, noise, target)
    assert_close_to_reference(x_t, ref["same"][0], ref["64"][0])
    if target is not None:
        assert_close_to_reference(tgt, ref["same"][1], ref["64"][1])
    g = torch.Generator().manual_seed(9)
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9), dtype=torch.int64).item()
    _, drawn, _ = q_sample(x0, t, schedule, generator=g, target=target, backend="cuda")
    torch.testing.assert_close(drawn, ddpm_fast.reference.philox_randn(seed, shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(DTYPE_CONFIGS))
@pytest.mark.parametrize("pair", list(DTYPE_PAIRS))
def test_posterior_step_dtypes(on_emulated_cuda, schedule, pair, name):
    """Storage dtypes of the sample and the model output, each read and rounded as on the GPU
    (the stand-in half and bfloat16 types round to nearest even)."""
    dtype, mo_dtype = DTYPE_PAIRS[pair]
    config, guidance = DTYPE_CONFIGS[name]
    mo, sample, noise = make_step_inputs((5, 3, 4, 5), config, guidance is not None, "cpu", dtype, mo_dtype, seed=6)
    t, prev_t = step_timesteps(5, "cpu", rotate=1)
    prev, _ = check_step("cuda", mo, sample, t, prev_t, schedule, config, noise, guidance)
    assert prev.dtype == dtype


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_q_sample_low_precision(on_emulated_cuda, schedule, dtype):
    """fp32 arithmetic, one rounding to the storage dtype; drawn noise rounded before use."""
    shape = (3, 2, 5, 8)
    x0, noise = make_inputs(shape, dtype, "cpu", seed=24)
    t = timesteps(shape[0], "cpu")
    x_t, _, tgt = q_sample(x0, t, schedule, noise=noise, target="v_prediction", backend="cuda")
    ref = reference_outputs(x0, t, schedule, noise, "v_prediction")
    assert_close_to_reference(x_t, ref["same"][0], ref["64"][0])
    assert_mostly_identical(x_t, ref["same"][0])
    assert_mostly_identical(tgt, ref["same"][1])
    x_t, drawn, _ = q_sample(x0, t, schedule, generator=torch.Generator().manual_seed(3), backend="cuda")
    assert drawn.dtype == dtype
    ref = reference_outputs(x0, t, schedule, drawn, None)  # x_t from the noise as stored
    assert_mostly_identical(x_t, ref["same"][0])


# ------------------------------------------------------------------ vlb_terms (a block reduction: fibers)
@pytest.fixture
def on_emulated_vlb(monkeypatch, emulated_ops):
    """vlb_terms with backend='cuda' runs the emulated kernels (forward: per-tile partials from a
    __syncthreads tree, then a per-sample sum; backward: elementwise) on CPU tensors."""
    if not ddpm_fast.backends()["cpp"][0]:
        pytest.skip("needs the C++ extension (the op's registration)")
    module = importlib.import_module("ddpm_fast.ops.vlb_terms")
    monkeypatch.setattr(module, "torch", _TorchWithOps(emulated_ops))
    monkeypatch.setattr(module, "choose", lambda op, requested, device, **facts: "cuda")


@pytest.mark.parametrize(("variance_type", "prediction_type"), vlb_op.VARIANTS)
def test_vlb_terms_every_variance_type(on_emulated_vlb, variance_type, prediction_type):
    args = vlb_op.make_inputs((4, 3, 5, 7), variance_type, prediction_type)
    vlb_op.check(*args, "cuda", prediction_type=prediction_type, variance_type=variance_type)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned", "fixed_large"])
def test_vlb_terms_clip_denoised(on_emulated_vlb, variance_type):
    out, x0, x_t, t = vlb_op.make_inputs((3, 2, 4, 5), variance_type, "sample", seed=4)
    out[:, :2] *= 1.5  # some x0 predictions past [-1, 1]
    vlb_op.check(out, x0, x_t, t, "cuda", prediction_type="sample", variance_type=variance_type, clip_denoised=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", vlb_op.LAYOUTS)
def test_vlb_terms_dtypes_and_layouts(on_emulated_vlb, dtype, layout):
    _, grad = vlb_op.check(*vlb_op.layout_inputs(dtype, layout), "cuda", variance_type="learned_range")
    assert grad.dtype == dtype


def test_vlb_terms_several_tiles_per_row(on_emulated_vlb):
    """Rows of 1155 elements (two 1024-element tiles, the second partial): the partials of a sample
    summed in order; the same bits on a second run."""
    out, x0, x_t, t = vlb_op.make_inputs((2, 2, 33, 35), "learned_range", seed=7)
    first = vlb_op.check(out, x0, x_t, t, "cuda", variance_type="learned_range")
    second = vlb_op.fast_terms(out, x0, x_t, t, "cuda", variance_type="learned_range")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_vlb_terms_stop_gradient_on_the_mean(on_emulated_vlb):
    out, x0, x_t, t = vlb_op.make_inputs((3, 2, 4, 4), "learned_range", seed=5)
    terms, grad = vlb_op.fast_terms(out, x0, x_t, t, "cuda")
    frozen_terms, frozen_grad = vlb_op.fast_terms(out, x0, x_t, t, "cuda", mean_grad=False)
    assert torch.equal(terms, frozen_terms)
    assert torch.equal(frozen_grad[:, :2], torch.zeros_like(frozen_grad[:, :2]))
    assert torch.equal(frozen_grad[:, 2:], grad[:, 2:]) and grad[:, :2].abs().sum() > 0


def test_vlb_terms_float64(on_emulated_vlb):
    out, x0, x_t, t = (x.double() if x.is_floating_point() else x for x in vlb_op.make_inputs((3, 2, 5, 3), "learned"))
    f_terms, f_grad = vlb_op.fast_terms(out, x0, x_t, t, "cuda", variance_type="learned")
    e_terms, e_grad = vlb_op.reference_terms(out, x0, x_t, t, torch.float64, variance_type="learned")
    assert f_terms.dtype == torch.float64
    torch.testing.assert_close(f_terms, e_terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_grad, e_grad, rtol=1e-10, atol=1e-12)


def test_vlb_terms_decoder_tail_is_finite(on_emulated_vlb):
    out, x0, x_t, t = vlb_op.make_inputs((2, 1, 4, 4), "learned_range", seed=6, t=torch.tensor([0, 0]))
    out[:, 0] += 40 * torch.sign(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)))
    f_terms, f_grad = vlb_op.fast_terms(out, x0, x_t, t, "cuda", variance_type="learned_range")
    e_terms, _ = vlb_op.reference_terms(out.double(), x0.double(), x_t.double(), t, torch.float64)
    assert torch.isfinite(f_terms).all() and torch.isfinite(f_grad).all()
    torch.testing.assert_close(f_terms.double(), e_terms, rtol=1e-5, atol=0)


def test_vlb_terms_bad_inputs(on_emulated_vlb):
    """The op's checks run before any kernel, on the CUDA path too."""
    out, x0, x_t, t = vlb_op.make_inputs((2, 1, 3, 3), "learned_range")
    with pytest.raises(ValueError, match=r"8-bit data scaled to \[-1, 1\]"):
        vlb_terms(out, x0 * 1.5, x_t, t, vlb_op.SCHEDULE, backend="cuda")
    with pytest.raises(ValueError, match="needs a model output with 1 channels"):
        vlb_terms(out, x0, x_t, t, vlb_op.SCHEDULE, variance_type="fixed_small", backend="cuda")
    with pytest.raises(ValueError, match="x_t has shape"):
        vlb_terms(out, x0, x_t[:1], t, vlb_op.SCHEDULE, backend="cuda")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        vlb_terms(out, x0, x_t, torch.tensor([0, 1000]), vlb_op.SCHEDULE, backend="cuda")
