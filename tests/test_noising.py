"""q_sample: every fast backend against the reference (given and in-kernel noise), the noise's
statistics, autograd, torch.compile and input checks."""

import math

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
from ddpm_fast import q_sample, reference
from ddpm_fast._backends import cpu_isas, use_cpu_isa
from ddpm_fast.ops import no_value_checks

try:  # a global: the test kernels' calls resolve in this module's namespace
    from ddpm_fast.kernels.launch import philox_normal
except ImportError:  # no triton
    philox_normal = None

TARGETS = (None, "epsilon", "sample", "v_prediction")
LOW_DTYPES = (torch.bfloat16, torch.float16)


def timesteps(n: int, device, seed: int = 0) -> torch.Tensor:
    """Per-sample timesteps: 0 and T-1 first (when n allows), then random ones."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (n,), generator=g)
    t[0] = 0
    if n > 1:
        t[1] = T - 1
    return t.to(device)


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).to(device)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x0, noise


def reference_outputs(x0, t, schedule, noise, target):
    """(x_t, target) of the reference in x0's dtype and from the inputs upcast to float64, on CPU."""
    x0, t, noise = x0.cpu(), t.cpu(), noise.cpu()
    out = {}
    for key, (a, z) in {"same": (x0, noise), "64": (x0.double(), noise.double())}.items():
        x_t = reference.q_sample(a, t, schedule, z)
        tgt = None if target is None else reference.training_target(a, z, t, schedule, target)
        out[key] = (x_t, tgt)
    return out


def check_given_noise(backend, x0, t, schedule, noise, target, plain_fp32=True):
    x_t, noise_out, tgt = q_sample(x0, t, schedule, noise=noise, target=target, backend=backend)
    ref = reference_outputs(x0, t, schedule, noise, target)
    assert x_t.shape == x0.shape and x_t.dtype == x0.dtype and x_t.device == x0.device
    assert torch.equal(noise_out.cpu(), noise.cpu())
    assert_close_to_reference(x_t, ref["same"][0], ref["64"][0])
    if target is None:
        assert tgt is None
    else:
        assert tgt.shape == x0.shape and tgt.dtype == x0.dtype
        assert_close_to_reference(tgt, ref["same"][1], ref["64"][1])
    if plain_fp32 and x0.dtype == torch.float32:
        assert_close_fp32(x_t, ref["same"][0])
        if target is not None:
            assert_close_fp32(tgt, ref["same"][1])
    return x_t, tgt


# ------------------------------------------------------------------ given noise vs reference
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_targets(backend, device, schedule, dtype, target):
    shape = (5, 3, 7, 9)
    x0, noise = make_inputs(shape, dtype, device)
    t = timesteps(shape[0], device)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            q_sample(x0, t, schedule, noise=noise, target=target, backend=backend)
        return
    check_given_noise(backend, x0, t, schedule, noise, target)


SHAPES = [(1, 3, 8, 8), (5, 3, 7, 9), (2, 4, 33, 1), (3, 16), (2, 3, 2, 3, 5)]
LAYOUTS = ("contiguous", "channels_last", "sliced")


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in a memory layout: NCHW, channels_last, or a non-contiguous view with x's values."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    # a strided slice of a bigger tensor holding x's values at every other position of dim 2 (dim 1 if 2-D)
    dim = 2 if x.dim() > 2 else 1
    big_shape = list(x.shape)
    big_shape[dim] *= 2
    big = torch.full(big_shape, float("nan"), dtype=x.dtype, device=x.device)
    index = [slice(None)] * x.dim()
    index[dim] = slice(None, None, 2)
    big[tuple(index)] = x
    view = big[tuple(index)]
    assert not view.is_contiguous()
    return view


def shape_layout_cases():
    for backend in FAST_BACKENDS:
        for shape in SHAPES:
            for layout in LAYOUTS:
                if layout == "channels_last" and len(shape) != 4:
                    continue
                for target in ("v_prediction", None) if not is_slow(backend) else ("v_prediction",):
                    yield pytest.param(backend, shape, layout, target, id=f"{backend}-{shape}-{layout}-{target}")


@pytest.mark.parametrize("backend,shape,layout,target", list(shape_layout_cases()))
def test_shapes_and_layouts(schedule, backend, shape, layout, target):
    device = backend_device(backend)
    x0c, noisec = make_inputs(shape, torch.float32, device, seed=1)
    t = timesteps(shape[0], device, seed=2)
    x0, noise = lay_out(x0c, layout), lay_out(noisec, layout)
    x_t, tgt = check_given_noise(backend, x0, t, schedule, noise, target)
    if layout == "channels_last":
        assert x_t.is_contiguous(memory_format=torch.channels_last)
        assert tgt is None or tgt.is_contiguous(memory_format=torch.channels_last)
    # the layout changes nothing in the values
    x_tc, _, _ = q_sample(x0c, t, schedule, noise=noisec, target=target, backend=backend)
    assert torch.equal(x_t.cpu(), x_tc.cpu())


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)], ids=str)
def test_empty_inputs(backend, device, schedule, shape):
    """No sample, or samples without elements: empty results, given or drawn noise, any target."""
    x0 = torch.empty(shape, device=device)
    t = torch.full((shape[0],), 5, device=device)
    for noise in (None, torch.empty(shape, device=device)):
        g = torch.Generator().manual_seed(0) if noise is None else None
        x_t, z, tgt = q_sample(x0, t, schedule, noise=noise, generator=g, target="v_prediction", backend=backend)
        assert x_t.shape == z.shape == tgt.shape == shape


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_channels_last(backend, device, schedule, dtype):
    x0, noise = make_inputs((2, 3, 4, 5), dtype, device, seed=3)
    x0, noise = lay_out(x0, "channels_last"), lay_out(noise, "channels_last")
    t = timesteps(2, device)
    x_t, tgt = check_given_noise(backend, x0, t, schedule, noise, "v_prediction")
    assert x_t.is_contiguous(memory_format=torch.channels_last) and tgt.is_contiguous(memory_format=torch.channels_last)


def test_int_timestep_and_scalar_tensor(backend, device, schedule):
    x0, noise = make_inputs((3, 2, 4, 4), torch.float32, device, seed=4)
    expected = reference.q_sample(x0.cpu(), torch.full((3,), 417), schedule, noise.cpu())
    for t in (417, torch.tensor(417, device=device)):
        x_t, _, _ = q_sample(x0, t, schedule, noise=noise, backend=backend)
        assert_close_fp32(x_t, expected)


def test_noise_of_another_dtype_is_cast(backend, device, schedule):
    x0, noise = make_inputs((2, 3, 4, 4), torch.bfloat16, device, seed=5)
    noise32 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6)).to(device)
    t = timesteps(2, device)
    x_t, noise_out, _ = q_sample(x0, t, schedule, noise=noise32, backend=backend)
    assert noise_out.dtype == torch.bfloat16 and torch.equal(noise_out.cpu(), noise32.cpu().bfloat16())
    ref = reference.q_sample(x0.cpu(), t.cpu(), schedule, noise32.cpu().bfloat16())
    ref64 = reference.q_sample(x0.cpu().double(), t.cpu(), schedule, noise32.cpu().bfloat16().double())
    assert_close_to_reference(x_t, ref, ref64)


def test_other_schedules(backend, device):
    for cfg in (
        dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=50),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    ):
        sched = ddpm_fast.Schedule.from_config(**cfg)
        n = sched.num_train_timesteps
        x0, noise = make_inputs((3, 2, 3, 5), torch.float32, device, seed=7)
        t = torch.tensor([0, n // 2, n - 1], device=device)
        check_given_noise(backend, x0, t, sched, noise, "v_prediction")


# ------------------------------------------------------------------ in-kernel noise
NOISE_BACKENDS = ["reference", *FAST_BACKENDS]


# rows of 35 and 117 elements: Philox blocks of 4 straddle rows, and a row spans several CPU steps;
# rows of 20 and 1280 (a multiple of 4: Triton draws 4 normals a Philox call, over two tiles)
@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (3, 2, 9, 13), (2, 3, 4, 5), (1, 2, 32, 40)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_in_kernel_noise_is_philox(schedule, backend, dtype, shape):
    device = backend_device(backend)
    x0, _ = make_inputs(shape, dtype, device, seed=8)
    t = timesteps(shape[0], device)
    g = torch.Generator().manual_seed(1234)
    seed = seed_of(g)
    x_t, noise, tgt = q_sample(x0, t, schedule, generator=g, target="v_prediction", backend=backend)
    expected = reference.philox_randn(seed, shape)
    assert noise.dtype == dtype and noise.shape == shape and noise.device == x0.device
    # bit-compatible up to the rounding of log/cos in each math library (and the output dtype)
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(noise.cpu().float(), expected.to(dtype).float(), rtol=rtol, atol=1e-5)
    assert expected.abs().max() > 2  # a genuine normal draw, not zeros
    # x_t and the target are computed from the returned (rounded) noise
    ref = reference_outputs(x0, t, schedule, noise, "v_prediction")
    assert_close_to_reference(x_t, ref["same"][0], ref["64"][0])
    assert_close_to_reference(tgt, ref["same"][1], ref["64"][1])
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not is_slow(backend)):
        assert_mostly_identical(x_t, ref["same"][0])
        assert_mostly_identical(tgt, ref["same"][1])


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_generator_semantics(schedule, backend):
    device = backend_device(backend)
    shape = (2, 3, 4, 5)
    x0, _ = make_inputs(shape, torch.float32, device, seed=9)
    t = timesteps(2, device)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = q_sample(x0, t, schedule, generator=g1, backend=backend)
    same = q_sample(x0, t, schedule, generator=g2, backend=backend)
    assert torch.equal(first[1], same[1]) and torch.equal(first[0], same[0])
    # the generator advances exactly as one torch.randint draw does
    g3 = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (1,), generator=g3, dtype=torch.int64)
    assert torch.equal(g1.get_state(), g3.get_state())
    second = q_sample(x0, t, schedule, generator=g1, backend=backend)
    assert not torch.equal(first[1], second[1])
    assert (first[1] != second[1]).float().mean() > 0.99
    # a different seed gives different noise
    other = q_sample(x0, t, schedule, generator=torch.Generator().manual_seed(8), backend=backend)
    assert (first[1] != other[1]).float().mean() > 0.99


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_noise_is_layout_independent(schedule, backend):
    device = backend_device(backend)
    shape = (2, 3, 4, 5)
    x0, _ = make_inputs(shape, torch.float32, device, seed=10)
    t = timesteps(2, device)
    base = q_sample(x0, t, schedule, generator=torch.Generator().manual_seed(3), backend=backend)
    for layout in ("channels_last", "sliced"):
        out = q_sample(lay_out(x0, layout), t, schedule, generator=torch.Generator().manual_seed(3), backend=backend)
        assert torch.equal(out[1].cpu(), base[1].cpu()), layout
        assert torch.equal(out[0].cpu(), base[0].cpu()), layout
        if layout == "channels_last" and backend != "reference":  # fast ops keep the memory format
            assert out[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(len(FAST_BACKENDS) < 2, reason="needs two fast backends")
def test_backends_draw_the_same_noise(schedule):
    shape = (2, 3, 5, 6)
    results = []
    for backend in FAST_BACKENDS:
        device = backend_device(backend)
        x0, _ = make_inputs(shape, torch.float32, device, seed=11)
        results.append(q_sample(x0, 5, schedule, generator=torch.Generator().manual_seed(99), backend=backend)[1].cpu())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ statistics of the drawn noise
def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def stats_cases():
    for backend in FAST_BACKENDS:
        yield pytest.param(backend, (2, 2, 64, 64) if is_slow(backend) else (8, 4, 128, 256), id=backend)


@pytest.mark.parametrize("backend,shape", list(stats_cases()))
def test_noise_statistics(schedule, backend, shape):
    scipy_stats = pytest.importorskip("scipy.stats")
    device = backend_device(backend)
    x0 = torch.zeros(shape, device=device)
    g = torch.Generator().manual_seed(2024)
    z = q_sample(x0, 3, schedule, generator=g, backend=backend)[1].cpu().double()
    z2 = q_sample(x0, 3, schedule, generator=g, backend=backend)[1].cpu().double()
    n = z.numel()
    bound = 5 / math.sqrt(n)
    flat = z.flatten()
    assert abs(flat.mean().item()) < bound
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    for lag in (1, 2, 3, 4):  # neighbours within a Philox block (1-3: one call) and the next block's lane (4)
        assert abs(_corr(flat[:-lag], flat[lag:])) < bound, lag
    assert abs(_corr(flat[:-1] ** 2, flat[1:] ** 2)) < bound  # r cos, r sin of one pair: independent
    assert abs(_corr(flat[: n // 2], flat[n // 2 :])) < 5 / math.sqrt(n // 2)  # far apart halves
    per_sample = n // shape[0]
    assert abs(_corr(z[0], z[1])) < 5 / math.sqrt(per_sample)  # samples of a batch
    assert abs(_corr(z[:, 0], z[:, 1])) < 5 / math.sqrt(n // shape[1])  # channels
    assert abs(_corr(z, z2)) < bound  # consecutive calls
    # tails: the fraction beyond 3 sigma is that of a normal (0.27%)
    frac = (flat.abs() > 3).double().mean().item()
    assert abs(frac - 0.0026998) < 5 * math.sqrt(0.0027 / n)


# ------------------------------------------------------------------ the noise contract (tl.randn4x)
HAS_CPP = "cpp" in FAST_BACKENDS
CONTRACT_SEED = 0x0123456789ABCDEF  # both key words nonzero
# (offset, count): partial blocks at either end, odd counts, and across 2^32 and 2^34 elements
# (at 2^34 the block counter's low word carries into the high word)
FILL_CASES = [
    (0, 1),
    (0, 64),
    (1, 17),
    (3, 5),
    (5, 1031),
    (2**32 - 6, 17),
    (2**32 - 1, 3),
    (2**34 - 6, 17),
    (2**34 - 37, 201),
    (2**34 + 1, 2),
    (2**40 + 3, 67),
]


def test_reference_offset_is_a_slice():
    whole = reference.philox_randn(CONTRACT_SEED, (301,))
    for offset in (1, 2, 3, 4, 5, 150):
        assert torch.equal(reference.philox_randn(CONTRACT_SEED, (301 - offset,), offset=offset), whole[offset:])
    assert torch.equal(reference.philox_randn(CONTRACT_SEED, (2, 3, 5), offset=7), whole[7:37].reshape(2, 3, 5))


def test_reference_is_triton_randn4x():
    """reference.philox_randn is lane L % 4 of tl.randn4x(seed, L // 4), straight from Triton."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def randn4x_lanes(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        element = offset + i.to(tl.int64)
        n0, n1, n2, n3 = tl.randn4x(seed, element // 4)
        lane = element % 4
        z = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
        tl.store(out_ptr + i, z, mask=i < n)

    device = backend_device("triton")
    for offset, count in [(0, 64), (3, 61), (2**34 - 6, 17)]:
        out = torch.empty(64, device=device)
        randn4x_lanes[(1,)](out, CONTRACT_SEED, offset, count, BLOCK=64)
        expected = reference.philox_randn(CONTRACT_SEED, (count,), offset=offset)
        torch.testing.assert_close(out[:count].cpu(), expected, rtol=1e-5, atol=1e-5)


def test_triton_noise_at_any_offset():
    """The kernels' launch.philox_normal (its own sin/cos polynomial) against the reference over
    many angles, at offsets that cut Philox blocks and across the 2^34 carry."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def normals(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, philox_normal(seed, offset + i.to(tl.int64)), mask=i < n)

    device = backend_device("triton")
    for offset, count in [(0, 16384), (3, 16381), (2**34 - 37, 201)]:
        out = torch.empty(16384, device=device)
        normals[(1,)](out, CONTRACT_SEED, offset, count, BLOCK=16384)
        expected = reference.philox_randn(CONTRACT_SEED, (count,), offset=offset)
        torch.testing.assert_close(out[:count].cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="needs the C++ extension")
@pytest.mark.parametrize("offset,count", FILL_CASES, ids=str)
@pytest.mark.parametrize("portable", [False, True], ids=["dispatched", "portable"])
@pytest.mark.parametrize("isa", cpu_isas())
def test_cpu_fill_at_any_offset(isa, portable, offset, count):
    """The C++ bulk draw (AVX2 where the CPU has it; the portable loop of other CPUs, in each ISA
    build) against the reference, at offsets and counts that cut Philox blocks and the vector
    loop's steps anywhere."""
    from ddpm_fast import _C

    with use_cpu_isa(isa):
        got = torch.tensor(_C.philox_randn_fill(CONTRACT_SEED, offset, count, portable=portable))
    expected = reference.philox_randn(CONTRACT_SEED, (count,), offset=offset)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="needs the C++ extension")
def test_cpu_fill_empty_and_bad_counts():
    from ddpm_fast import _C

    assert (
        _C.philox_randn_fill(CONTRACT_SEED, 5, 0) == []
        and _C.philox_randn_fill(CONTRACT_SEED, 5, 0, portable=True) == []
    )
    with pytest.raises(ValueError, match="count"):
        _C.philox_randn_fill(CONTRACT_SEED, 0, -1)


@pytest.mark.parametrize(
    "source", ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no _C"))]
)
def test_block_lanes_are_independent(source):
    """The 4 normals of one Philox call (r cos, r sin of words 0-1; the same of words 2-3) are
    standard normals, uncorrelated, with uncorrelated squares (a shared radius or angle would
    correlate those), and r^2 = z0^2 + z1^2 is chi^2 with 2 degrees of freedom."""
    scipy_stats = pytest.importorskip("scipy.stats")
    blocks = 2**16
    if source == "cpp":
        from ddpm_fast import _C

        z = torch.tensor(_C.philox_randn_fill(CONTRACT_SEED, 0, 4 * blocks))
    else:
        z = reference.philox_randn(CONTRACT_SEED, (4 * blocks,))
    lanes = z.double().reshape(blocks, 4)
    bound = 5 / math.sqrt(blocks)
    for k in range(4):
        assert abs(lanes[:, k].mean().item()) < bound, k
        assert abs(lanes[:, k].var().item() - 1) < 5 * math.sqrt(2 / blocks), k
        assert scipy_stats.kstest(lanes[:, k].numpy(), "norm").pvalue > 1e-3, k
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(_corr(lanes[:, a], lanes[:, b])) < bound, (a, b)
            assert abs(_corr(lanes[:, a] ** 2, lanes[:, b] ** 2)) < bound, (a, b)
    for pair in ((0, 1), (2, 3)):
        radius2 = (lanes[:, pair[0]] ** 2 + lanes[:, pair[1]] ** 2).numpy()
        assert scipy_stats.kstest(radius2, "expon", args=(0, 2)).pvalue > 1e-3, pair


# ------------------------------------------------------------------ autograd
@pytest.mark.parametrize("target", TARGETS)
def test_autograd_matches_reference(backend, device, schedule, target):
    shape = (3, 2, 4, 5)
    x0, noise = make_inputs(shape, torch.float32, device, seed=12)
    t = timesteps(3, device)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(13)).to(device)
    w2 = torch.randn(shape, generator=torch.Generator().manual_seed(14)).to(device)

    def loss(x_t, tgt):
        out = (x_t * w).sum()
        return out if tgt is None else out + (tgt * w2).sum()

    a, z = x0.clone().requires_grad_(), noise.clone().requires_grad_()
    x_t, _, tgt = q_sample(a, t, schedule, noise=z, target=target, backend=backend)
    grads = torch.autograd.grad(loss(x_t, tgt), [a, z])

    ra, rz = x0.clone().requires_grad_(), noise.clone().requires_grad_()
    rx_t = reference.q_sample(ra, t, schedule, rz)
    rtgt = None if target is None else reference.training_target(ra, rz, t, schedule, target)
    ref_grads = torch.autograd.grad(loss(rx_t, rtgt), [ra, rz])
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close_fp32(got, want)


@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
def test_autograd_x0_only(backend, device, schedule, target):
    """Gradients reach x0 with in-kernel noise, and with a given noise that needs no grad."""
    shape = (2, 3, 4, 4)
    x0, noise = make_inputs(shape, torch.float32, device, seed=15)
    t = timesteps(2, device)
    for kwargs in (dict(generator=torch.Generator().manual_seed(0)), dict(noise=noise)):
        a = x0.clone().requires_grad_()
        x_t, z, tgt = q_sample(a, t, schedule, target=target, backend=backend, **kwargs)
        (ga,) = torch.autograd.grad((x_t * 2).sum() + (tgt * 3).sum(), [a])
        ra = x0.clone().requires_grad_()
        rz = z.detach()
        want = (reference.q_sample(ra, t, schedule, rz) * 2).sum() + (
            reference.training_target(ra, rz, t, schedule, target) * 3
        ).sum()
        (gr,) = torch.autograd.grad(want, [ra])
        assert_close_fp32(ga, gr)


@pytest.mark.parametrize("target", TARGETS)
def test_gradcheck_fp64_cpp(schedule, target):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    g = torch.Generator().manual_seed(16)
    x0 = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 999])

    def fn(a, z):
        x_t, _, tgt = q_sample(a, t, schedule, noise=z, target=target, backend="cpp")
        return x_t if tgt is None else (x_t, tgt)

    assert torch.autograd.gradcheck(fn, (x0, noise))


# ------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_matches_eager(schedule):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    x0, noise = make_inputs((2, 3, 4, 4), torch.float32, "cpu", seed=17)
    t = timesteps(2, "cpu")

    def fn(a, z, tt):
        x_t, _, tgt = q_sample(a, tt, schedule, noise=z, target="v_prediction", backend="cpp")
        return x_t * 2 + 1, tgt

    want = fn(x0, noise, t)  # eager first (warms the schedule's table cache)
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True)(x0, noise, t)
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs(schedule):
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="x0"):
        q_sample(torch.zeros(2, 3, 4, 4, dtype=torch.int64), t, schedule)
    with pytest.raises(TypeError, match="x0"):
        q_sample(x0.numpy(), t, schedule)
    with pytest.raises(ValueError, match="batch"):
        q_sample(torch.randn(4), torch.tensor([1, 2, 3, 4]), schedule)
    with pytest.raises(TypeError, match="integer"):
        q_sample(x0, torch.tensor([1.0, 2.0]), schedule)
    with pytest.raises(TypeError, match="integer"):
        q_sample(x0, torch.tensor([True, False]), schedule)
    with pytest.raises(TypeError, match="int"):
        q_sample(x0, 3.0, schedule)
    for bad in (torch.tensor([0, T]), torch.tensor([-1, 5])):
        with pytest.raises(ValueError, match=r"\[0, 999\]"):
            q_sample(x0, bad, schedule)
    with pytest.raises(ValueError, match="shape"):
        q_sample(x0, torch.tensor([1, 2, 3]), schedule)
    with pytest.raises(ValueError, match="shape"):
        q_sample(x0, torch.tensor([[1, 2]]), schedule)
    with pytest.raises(ValueError, match="device"):
        q_sample(x0, t.to("meta"), schedule)
    with pytest.raises(ValueError, match="noise has shape"):
        q_sample(x0, t, schedule, noise=torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="noise"):
        q_sample(x0, t, schedule, noise=torch.zeros(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="either noise or generator"):
        q_sample(x0, t, schedule, noise=torch.randn_like(x0), generator=torch.Generator())
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        q_sample(x0, t, schedule, target="score")
    with pytest.raises(ValueError, match="unknown backend"):
        q_sample(x0, t, schedule, backend="metal")


@pytest.mark.skipif(not ddpm_fast.backends()["cpp"][0], reason="needs the C++ extension")
def test_kernel_boundary_merges_trailing_dims(schedule):
    """The private op reads (N, C, ...) tensors whose dims after the second merge (any rank, any
    of them a 3-D view of the same (N, C, S)), and refuses one whose dims do not."""
    kernel = torch.ops.ddpm_fast_C.q_sample
    sqrt_ab = schedule.kernel_table("sqrt_alphas_cumprod")
    sqrt_1mab = schedule.kernel_table("sqrt_one_minus_alphas_cumprod")
    x0, noise = make_inputs((2, 3, 2, 3, 5), torch.float32, "cpu", seed=4)
    t = timesteps(2, "cpu", seed=5)
    want = reference.q_sample(x0, t, schedule, noise)
    x_t = torch.empty(2, 3, 30)  # a 3-D output for 5-D inputs
    kernel(x0, t, sqrt_ab, sqrt_1mab, noise.view(2, 3, 30), None, x_t, None, None, 0)
    assert_close_fp32(x_t.view_as(x0), want)
    with pytest.raises(RuntimeError, match="do not merge"):
        kernel(x0, t, sqrt_ab, sqrt_1mab, lay_out(noise, "sliced"), None, x_t, None, None, 0)
    with pytest.raises(RuntimeError, match="noise has shape"):
        kernel(x0, t, sqrt_ab, sqrt_1mab, noise[:, :, :1], None, x_t, None, None, 0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_other_device_inputs(schedule):
    x0 = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="device"):
        q_sample(x0, torch.tensor([1, 2]), schedule)
    with pytest.raises(ValueError, match="noise is on"):
        q_sample(x0, torch.tensor([1, 2], device="cuda"), schedule, noise=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="cpp"):
        q_sample(x0, torch.tensor([1, 2], device="cuda"), schedule, backend="cpp")


def test_unavailable_backends(schedule):
    x0 = torch.randn(2, 3, 4, 4)
    available = ddpm_fast.backends()
    if not available["cuda"][0]:
        with pytest.raises(RuntimeError, match="not available"):
            q_sample(x0, 1, schedule, backend="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            q_sample(x0, 1, schedule, backend="cuda")


def test_aliases_accepted(schedule):
    x0, noise = make_inputs((2, 3, 4, 4), torch.float32, "cpu", seed=18)
    a = q_sample(x0, 5, schedule, noise=noise, target="v", backend="reference")[2]
    b = q_sample(x0, 5, schedule, noise=noise, target="v_prediction", backend="reference")[2]
    assert torch.equal(a, b)


def test_default_backend(schedule):
    x0, noise = make_inputs((2, 3, 4, 4), torch.float32, "cpu", seed=19)
    got = q_sample(x0, 5, schedule, noise=noise)[0]
    assert_close_fp32(got, reference.q_sample(x0, torch.tensor([5, 5]), schedule, noise))


def test_no_value_checks_clamps(backend, device, schedule):
    x0, noise = make_inputs((3, 2, 3, 4), torch.float32, device, seed=20)
    bad = torch.tensor([-7, 5, T + 40], device=device)
    with no_value_checks():
        x_t, _, tgt = q_sample(x0, bad, schedule, noise=noise, target="v_prediction", backend=backend)
    clamped = bad.clamp(0, T - 1)
    ref = reference_outputs(x0, clamped, schedule, noise, "v_prediction")
    assert_close_fp32(x_t, ref["same"][0])
    assert_close_fp32(tgt, ref["same"][1])
    # the checks are back on after the context
    with pytest.raises(ValueError):
        q_sample(x0, bad, schedule, noise=noise, backend=backend)
