"""group_norm_silu: every fast backend against torch's GroupNorm + SiLU and reference.group_norm_silu
(forward and every gradient) over what can be folded in, dtypes, the U-Net's shapes, layouts, the
Triton launch paths (split reduction, one program per group), fp16 near overflow, gradcheck,
torch.compile and input checks."""

import functools
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAST_BACKENDS,
    HAS_CUDA,
    assert_close_fp32,
    assert_close_to_reference,
    backend_device,
    backend_fixture,
    backend_params,
    is_slow,
)

import ddpm_fast
from ddpm_fast import group_norm_silu, reference
from ddpm_fast._backends import cpu_isas, use_cpu_isa

EXTRAS = ("bias_nc", "scale_shift", "residual")
NAMES = ("x", "weight", "bias", "bias_nc", "scale_nc", "shift_nc", "residual")


def make_inputs(shape, dtype=torch.float32, device="cpu", *, extras=EXTRAS, affine=True, seed=0, channels_last=False):
    """{name: tensor} drawn in fp64 and cast: x (offset, so the mean matters), weight/bias (C,),
    bias_nc/scale_nc/shift_nc (N, C), residual shaped like x."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]

    def draw(*size, scale=1.0, offset=0.0):
        return torch.randn(size, generator=g, dtype=torch.float64) * scale + offset

    t = {"x": draw(*shape, scale=2.0, offset=0.5)}
    if affine:
        t["weight"], t["bias"] = draw(c, scale=0.5, offset=1.0), draw(c, scale=0.5)
    if "bias_nc" in extras:
        t["bias_nc"] = draw(n, c)
    if "scale_shift" in extras:
        t["scale_nc"], t["shift_nc"] = draw(n, c, scale=0.3), draw(n, c, scale=0.5)
    if "residual" in extras:
        t["residual"] = draw(*shape)
    t = {k: v.to(dtype) for k, v in t.items()}
    if channels_last:
        for k in ("x", "residual"):
            if k in t:
                t[k] = t[k].to(memory_format=torch.channels_last)
    return {k: v.to(device) for k, v in t.items()}


def grad_output(shape, dtype, device, seed=99):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def apply(fn, t, groups, silu=True, eps=1e-5, **kw):
    return fn(
        t["x"],
        groups,
        t.get("weight"),
        t.get("bias"),
        eps,
        bias_nc=t.get("bias_nc"),
        scale_nc=t.get("scale_nc"),
        shift_nc=t.get("shift_nc"),
        silu=silu,
        residual=t.get("residual"),
        **kw,
    )


def forward_and_grads(fn, t, grad_y):
    """y and {name: dL/d name} for L = <y, grad_y>, every input a leaf."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    y = fn(leaves)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return y.detach(), dict(zip(leaves, grads, strict=True))


# group_norm_silu has C++ CPU and Triton kernels, no CUDA C++ one (CUDA tensors go to Triton):
# its tests run on those backends, not on every fast backend of the machine.
backend = pytest.fixture(params=backend_params(exclude=("cuda",)))(backend_fixture)


def check_against_reference(backend, t, groups, silu=True, eps=1e-5):
    """The tolerance rule (DESIGN.md) on y and every gradient: the fast op in dtype D and the
    reference in D against the reference from the inputs upcast to fp64."""
    device = backend_device(backend)
    gy = grad_output(t["x"].shape, t["x"].dtype, device)
    if t["x"].dim() == 4 and not t["x"].is_contiguous() and t["x"].is_contiguous(memory_format=torch.channels_last):
        gy = gy.contiguous(memory_format=torch.channels_last)  # as a channels_last network's backward hands it
    fast = lambda u: apply(group_norm_silu, u, groups, silu, eps, backend=backend)  # noqa: E731
    ref = lambda u: apply(reference.group_norm_silu, u, groups, silu, eps)  # noqa: E731
    y, grads = forward_and_grads(fast, {k: v.to(device) for k, v in t.items()}, gy)
    cpu = {k: v.cpu() for k, v in t.items()}
    ry, rgrads = forward_and_grads(ref, cpu, gy.cpu())
    ey, egrads = forward_and_grads(ref, {k: v.double() for k, v in cpu.items()}, gy.cpu().double())
    assert y.dtype == t["x"].dtype and y.shape == t["x"].shape
    assert_close_to_reference(y, ry, ey)
    for name, grad in grads.items():
        assert grad.dtype == t[name].dtype and grad.shape == t[name].shape, name
        try:
            assert_close_to_reference(grad, rgrads[name], egrads[name])
        except AssertionError as err:
            raise AssertionError(f"gradient of {name}: {err}") from err
    return y


def tiny(backend: str, shape, big):
    """``shape`` for compiled backends, ``big`` replaced by the small one under the interpreter."""
    return shape if is_slow(backend) else big


# ------------------------------------------------------------------ against torch's GroupNorm + SiLU
@pytest.mark.parametrize("silu", [True, False])
def test_matches_torch_group_norm_silu(backend, silu):
    shape, groups = tiny(backend, (2, 8, 3, 3), (4, 64, 8, 8)), 4 if is_slow(backend) else 32
    t = make_inputs(shape, extras=(), seed=1)
    device = backend_device(backend)
    gy = grad_output(shape, torch.float32, "cpu")

    def torch_fn(u):
        n = F.group_norm(u["x"], groups, u["weight"], u["bias"], 1e-6)
        return F.silu(n) if silu else n

    y, grads = forward_and_grads(
        lambda u: apply(group_norm_silu, u, groups, silu, 1e-6, backend=backend),
        {k: v.to(device) for k, v in t.items()},
        gy.to(device),
    )
    ty, tgrads = forward_and_grads(torch_fn, t, gy)
    assert_close_fp32(y, ty, rtol=1e-4)
    for name in grads:
        assert_close_fp32(grads[name], tgrads[name], rtol=1e-4)


# ------------------------------------------------------------------ what is folded in
FOLDS = {
    "plain": dict(extras=(), affine=True),
    "no-affine": dict(extras=(), affine=False),
    "bias_nc": dict(extras=("bias_nc",), affine=True),
    "scale_shift": dict(extras=("scale_shift",), affine=True),
    "residual": dict(extras=("residual",), affine=True),
    "all": dict(extras=EXTRAS, affine=True),
    "all-no-affine": dict(extras=EXTRAS, affine=False),
}


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("fold", list(FOLDS))
def test_folded_in(backend, fold, silu):
    if is_slow(backend) and not silu and fold not in ("all", "plain"):
        pytest.skip("interpreter: silu=False covered by 'all' and 'plain'")
    shape, groups = tiny(backend, (2, 6, 3, 2), (3, 48, 7, 5)), 3 if is_slow(backend) else 16
    check_against_reference(backend, make_inputs(shape, seed=2, **FOLDS[fold]), groups, silu)


def test_scale_shift_alone(backend):
    """scale_nc without shift_nc and shift_nc without scale_nc."""
    t = make_inputs((2, 4, 3, 3), seed=3)
    for drop in ("scale_nc", "shift_nc"):
        check_against_reference(backend, {k: v for k, v in t.items() if k != drop}, 2)


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    shape, groups = tiny(backend, (2, 8, 3, 3), (3, 64, 6, 6)), 4 if is_slow(backend) else 32
    t = make_inputs(shape, dtype, seed=4)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            apply(group_norm_silu, {k: v.to(backend_device(backend)) for k, v in t.items()}, groups, backend=backend)
        return
    check_against_reference(backend, t, groups)


def test_fp32_parameters_with_bf16_x(backend):
    """fp32 weights (autocast keeps them fp32) with a bf16 x: y in bf16, each gradient in its input's dtype."""
    t = make_inputs((2, 8, 3, 3), torch.bfloat16, seed=5)
    for k in ("weight", "bias", "bias_nc", "scale_nc", "shift_nc"):
        t[k] = t[k].float()
    check_against_reference(backend, t, 4)


@pytest.mark.parametrize("extras", [EXTRAS, ()])
def test_gradcheck_fp64_cpp(extras):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    t = make_inputs((2, 4, 3, 2), torch.float64, extras=extras, seed=6)
    names = list(t)
    leaves = [t[k].requires_grad_() for k in names]

    def fn(*args):
        u = dict(zip(names, args, strict=True))
        return apply(group_norm_silu, u, 2, backend="cpp")

    assert torch.autograd.gradcheck(fn, leaves)
    u = {k: v.detach().requires_grad_() for k, v in t.items()}
    assert torch.autograd.gradcheck(lambda x: group_norm_silu(x, 2, silu=False, backend="cpp"), (u["x"],))


# ------------------------------------------------------------------ shapes
# The DDPM-CIFAR10 U-Net's GroupNorms (32 groups): widths 128/256 at 32..4 pixels, the skip
# concatenations' 384 and 512; batch 2 (cpp; the interpreter runs the tiny ones below).
UNET_SHAPES = [
    (2, 128, 32, 32),
    (2, 256, 16, 16),
    (2, 256, 8, 8),
    (2, 256, 4, 4),
    (2, 384, 16, 16),
    (2, 512, 8, 8),
    (2, 512, 4, 4),
    (1, 128, 32, 32),
]


@pytest.mark.parametrize("shape", UNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_unet_shapes_cpp(shape):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    check_against_reference("cpp", make_inputs(shape, seed=7), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("extras", [EXTRAS, ()], ids=["all", "plain"])
def test_cpp_short_rows_run_a_group_at_once(dtype, extras):
    """NCHW rows of at most 63 positions (7x7 and below): the forward and the backward take a group's
    rows as one block with coefficients looked up by channel (csrc/group_norm_silu_cpu.cpp, kBlockRows,
    ByChannel); the forward up to 255 (9x9 and 15x15 here: the backward's rows beside the forward's
    block); every dtype and fold, rows off the vector widths, blocks from 2 to 10 vectors of 16 (and
    not a whole one), more channels per group than lanes (32: a vector's channels start past the
    table's first 16), and an x whose positions are not contiguous (copied to NCHW first)."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    cases = [((2, 64, 4, 5), 8), ((3, 48, 2, 3), 16), ((1, 32, 4, 8), 4), ((2, 32, 7, 7), 8), ((2, 96, 2, 3), 3)]
    cases += [((2, 32, 9, 9), 8), ((1, 16, 15, 15), 4)]
    for shape, groups in cases:
        t = make_inputs(shape, dtype, seed=23, extras=extras)
        check_against_reference("cpp", t, groups)
        t["x"] = t["x"].transpose(2, 3).contiguous().transpose(2, 3)  # positions not contiguous
        check_against_reference("cpp", t, groups)


# (shape, groups): odd channel counts, 1x1, batch 1, non-square, 3-D and 2-D inputs.
ODD_SHAPES = {
    "C96-G3": ((2, 96, 5, 5), 3),
    "C384-G32-1x1": ((3, 384, 1, 1), 32),
    "C512-G32-2x2": ((1, 512, 2, 2), 32),
    "C128-G32-batch1": ((1, 128, 3, 3), 32),
    "C6-G6": ((2, 6, 4, 3), 6),
    "C5-G1-odd": ((2, 5, 7, 3), 1),
    "3d": ((3, 12, 10), 4),
    "2d": ((5, 12), 3),
}


@pytest.mark.parametrize("name", list(ODD_SHAPES))
def test_odd_shapes(backend, name):
    shape, groups = ODD_SHAPES[name]
    if is_slow(backend) and name in ("C96-G3", "C384-G32-1x1"):
        shape = (1, *shape[1:3], 1)  # fewer and smaller programs under the interpreter
    check_against_reference(backend, make_inputs(shape, seed=8), groups)


def test_empty_batch(backend):
    device = backend_device(backend)
    x = torch.zeros(0, 8, 3, 3, device=device, requires_grad=True)
    y = group_norm_silu(x, 4, bias_nc=torch.zeros(0, 8, device=device), backend=backend)
    assert y.shape == x.shape
    (g,) = torch.autograd.grad(y.sum(), [x])
    assert g.shape == x.shape


# ------------------------------------------------------------------ layouts
def test_channels_last(backend):
    shape, groups = tiny(backend, (2, 8, 3, 3), (2, 64, 8, 8)), 4 if is_slow(backend) else 32
    device = backend_device(backend)
    t = make_inputs(shape, seed=9, channels_last=True)
    y = check_against_reference(backend, t, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)
    flat = make_inputs(shape, seed=9)
    gy = grad_output(shape, torch.float32, device)
    fast = lambda u: apply(group_norm_silu, u, groups, backend=backend)  # noqa: E731
    y_cl, g_cl = forward_and_grads(fast, {k: v.to(device) for k, v in t.items()}, gy)
    y_nchw, g_nchw = forward_and_grads(fast, {k: v.to(device) for k, v in flat.items()}, gy)
    assert g_cl["x"].is_contiguous(memory_format=torch.channels_last)
    assert_close_fp32(y_cl, y_nchw)
    for name in g_cl:
        assert_close_fp32(g_cl[name], g_nchw[name])


# name: (shape, groups, dtype) for the cpp kernel's channels_last passes (vectorised along C): batch 1
# (positions split across the threads), channel counts off the 8-lane width, 1x1, every dtype.
CPP_CHANNELS_LAST = {
    "batch1-32x32": ((1, 128, 32, 32), 32, torch.float32),
    "C12-G3-odd": ((3, 12, 5, 7), 3, torch.float32),
    # at 16 lanes: register blocks of 64 channels (sums) and steps of 4 vectors (SiLU rows), then a tail
    "C96-G3-blocks-and-tail": ((2, 96, 6, 5), 3, torch.float32),
    "C200-G8-blocks-and-tail": ((1, 200, 3, 5), 8, torch.float32),
    "1x1": ((2, 64, 1, 1), 32, torch.float32),
    "bf16": ((1, 64, 9, 9), 32, torch.bfloat16),
    "fp16": ((2, 24, 6, 5), 6, torch.float16),
    "fp64": ((1, 20, 7, 7), 5, torch.float64),
}


@pytest.mark.parametrize("name", list(CPP_CHANNELS_LAST))
def test_channels_last_cpp(name):
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    shape, groups, dtype = CPP_CHANNELS_LAST[name]
    t = make_inputs(shape, dtype, seed=15, channels_last=True)
    y = check_against_reference("cpp", t, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_against_reference("cpp", t, groups, silu=False)
    bare = {"x": t["x"], "bias_nc": t["bias_nc"]}  # no affine, scale/shift or residual
    check_against_reference("cpp", bare, groups)
    check_against_reference("cpp", {"x": t["x"]}, groups)  # and no bias_nc (no d bias_nc sums)


def test_channels_last_x_nchw_residual_cpp():
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    t = make_inputs((2, 16, 5, 6), seed=16, channels_last=True)
    t["residual"] = t["residual"].contiguous()
    check_against_reference("cpp", t, 4)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((1, 64, 16, 16), True), ((1, 256, 8, 8), False), ((1, 512, 4, 4), False)],
    ids=["channels_last", "nchw-rows", "nchw-short-rows"],
)
def test_cpp_independent_of_threads(shape, channels_last):
    """The kernels' tasks and reduction order depend on the shape only: one thread and two give the
    same bits, forward and backward. channels_last: one image per task, or its positions split
    across the threads; NCHW (rows, and short rows a group at once): a batch-1 call of 16K or 8K
    elements splits its groups across the threads (kTaskElems)."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    t = make_inputs(shape, seed=17, channels_last=channels_last)
    gy = grad_output(shape, torch.float32, "cpu").contiguous(memory_format=layout)
    fast = lambda u: apply(group_norm_silu, u, 32, backend="cpp")  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = forward_and_grads(fast, t, gy)
        torch.set_num_threads(max(2, threads))
        y2, g2 = forward_and_grads(fast, t, gy)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)
    assert g1["x"].is_contiguous(memory_format=layout)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_cpp_batch1_gradients_share_no_memory():
    """At batch 1 the C++ node hands back dweight and dbias as the image's own sums (no sum op).
    d shift_nc is the same sums of g as dbias (no scale_nc): accumulated over two backward passes,
    each .grad must be twice the first, which fails if one's in-place accumulation reaches the other."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    x = torch.randn(1, 8, 3, 3, generator=torch.Generator().manual_seed(3))
    w, b = torch.randn(8).requires_grad_(), torch.randn(8).requires_grad_()
    shift = torch.randn(1, 8).requires_grad_()
    leaves = (w, b, shift)

    def backward():
        group_norm_silu(x, 4, w, b, shift_nc=shift, backend="cpp").square().sum().backward()

    backward()
    first = [t.grad.clone() for t in leaves]
    torch.testing.assert_close(first[1], first[2].view(8), rtol=0, atol=0)
    backward()
    for t, g in zip(leaves, first, strict=True):
        torch.testing.assert_close(t.grad, 2 * g, rtol=1e-6, atol=1e-6)


def _cpp_forward_and_grads(t, groups, channels_last=False, gy=None):
    if gy is None:
        gy = grad_output(t["x"].shape, t["x"].dtype, "cpu")
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    return forward_and_grads(lambda u: apply(group_norm_silu, u, groups, backend="cpp"), t, gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_avx512_and_avx2_builds_give_the_same_bits(dtype):
    """The float and bfloat16 rows' AVX-512 (16 lanes) and AVX2 (8 lanes) builds do the same arithmetic
    per element and sum through the same 32 partials (csrc/simd.h): the same bits, forward and backward,
    NCHW and channels_last, rows that end off both widths. Runs where the CPU has AVX-512."""
    if "cpp" not in FAST_BACKENDS or "avx512" not in cpu_isas():
        pytest.skip("needs the cpp backend on a CPU with AVX-512")
    cases = [((2, 64, 9, 11), 8, False), ((2, 48, 5, 7), 4, True), ((1, 40, 3, 3), 5, True), ((2, 80, 3, 5), 8, True)]
    cases.append(((2, 64, 4, 5), 8, False))  # NCHW short rows: a group as one block
    cases.append(((2, 32, 6, 7), 4, False))  # ... of 8 rows of 42
    cases.append(((1, 32, 7, 11), 8, False))  # rows of 77: 64 + 8 + 4 + 1 (the tail's narrower vectors)
    cases.append(((2, 96, 2, 3), 3, False))  # short rows, 32 channels a group: past one vector's table
    cases.append(((1, 32, 9, 9), 8, False))  # the forward's block, the backward's rows
    for shape, groups, cl in cases:
        t = make_inputs(shape, dtype, seed=21, channels_last=cl)
        results = {}
        for isa in ("avx512", "avx2"):
            with use_cpu_isa(isa):
                results[isa] = _cpp_forward_and_grads(t, groups, cl)
        (y1, g1), (y2, g2) = results["avx512"], results["avx2"]
        assert torch.equal(y1, y2), shape
        for name in g1:
            assert torch.equal(g1[name], g2[name]), (shape, name)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cpp_bf16_rows_are_the_fp32_rows_rounded_once(isa, channels_last):
    """bfloat16 tensors run the float rows, widened on load (exact) and rounded once on store
    (c10's round-to-nearest-even, NaN -> 0x7FC0): y and dx from bf16 x and dy are, bit for bit, the
    fp32 op's y and dx on the same values rounded to bf16, and NaN where those are. The per-channel
    parameters stay fp32 in both (autocast's case)."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    t = make_inputs((2, 40, 5, 7), torch.bfloat16, seed=13, channels_last=channels_last, extras=EXTRAS)
    t = {k: v if k in ("x", "residual") else v.float() for k, v in t.items()}
    t["x"][1, 5:10, 2, 3] = float("nan")  # one group of image 1 is NaN throughout
    gy = grad_output(t["x"].shape, torch.bfloat16, "cpu")
    t32 = {k: v.float() for k, v in t.items()}
    with use_cpu_isa(isa):
        y16, g16 = _cpp_forward_and_grads(t, 8, channels_last, gy)
        y32, g32 = _cpp_forward_and_grads(t32, 8, channels_last, gy.float())
    assert y16.dtype == torch.bfloat16 and y16[1, 5:10].isnan().all()
    for got, want in ((y16, y32), (g16["x"], g32["x"])):
        want = want.to(torch.bfloat16)
        nan = want.isnan()  # (ATen's vector conversion writes NaN as 0xFFFF, c10's scalar one 0x7FC0)
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_vector_and_tail_lanes_agree(isa, channels_last, dtype):
    """Inside a row, elements go through the vector loop (16, 8 or 4 lanes), the tail's narrower
    vectors (8, 4 lanes) or its scalar steps; all must do the same arithmetic (and, for bfloat16, the
    same widening and rounding). A row of 47 elements (2 x 16 + 8 + 4 + 3) repeating with period 16,
    and coefficients equal along it (one group, no affine), gives y and dx repeating with period 16,
    bit for bit: any lane whose arithmetic differs from the tail's shows as a mismatch."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    g = torch.Generator().manual_seed(5)

    def periodic_row():  # shaped like x: 47 elements along the row, repeating every 16
        row = (torch.randn(1, 16, generator=g, dtype=torch.float64).to(dtype) * 3).repeat(1, 3)[:, :47]
        if channels_last:  # the row runs along C, at each of 2 x 3 pixels
            return row.reshape(1, 47, 1, 1).expand(1, 47, 2, 3).contiguous(memory_format=torch.channels_last)
        return row.reshape(1, 1, 1, 47).expand(2, 1, 3, 47).contiguous()

    x, gy = periodic_row(), periodic_row()
    with use_cpu_isa(isa):
        (y, grads) = _cpp_forward_and_grads({"x": x}, 1, channels_last, gy)
    dim = 1 if channels_last else 3
    for out in (y, grads["x"]):
        head = out.narrow(dim, 0, 31)
        assert torch.equal(head, out.narrow(dim, 16, 31)), "a vector lane and the tail disagree"
    assert not torch.equal(y.narrow(dim, 0, 1), y.narrow(dim, 1, 1))  # the periods are not trivial


def test_mixed_and_strided_layouts(backend):
    """A channels_last residual with an NCHW x, a sliced (non-contiguous) x, an expanded grad_y."""
    device = backend_device(backend)
    t = make_inputs((2, 8, 3, 4), seed=10)
    t["residual"] = t["residual"].to(memory_format=torch.channels_last)
    check_against_reference(backend, t, 4)
    wide = make_inputs((2, 8, 3, 8), seed=11, extras=("bias_nc",))
    sliced = dict(wide, x=wide["x"][..., ::2])
    assert not sliced["x"].is_contiguous()
    check_against_reference(backend, sliced, 2)
    x = sliced["x"].to(device).requires_grad_()
    y = group_norm_silu(x, 2, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), [x])  # grad_y is an expanded scalar (all strides 0)
    xr = sliced["x"].detach().requires_grad_()
    (gr,) = torch.autograd.grad(reference.group_norm_silu(xr, 2).sum(), [xr])
    assert_close_fp32(g, gr, rtol=1e-4)


# ------------------------------------------------------------------ numerics
def test_fp16_near_overflow(backend):
    """Values ~6e4 in fp16 (max 65504): fp32 statistics of x - mean, no overflow or NaN; E[x^2] - E[x]^2
    in fp32 would lose the variance (3.6e9 vs 900)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(12)
    shape = (2, 8, 4, 4)
    x = (6.0e4 + 30 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(max=65000).half()
    t = {"x": x, "weight": torch.ones(8, dtype=torch.float16), "bias": torch.zeros(8, dtype=torch.float16)}
    t["bias_nc"] = (100 * torch.randn(2, 8, generator=g)).half()
    y = check_against_reference(backend, t, 4)
    assert torch.isfinite(y).all()
    assert y.float().abs().max() < 10  # normalised
    y0 = group_norm_silu(x.to(device), 4, silu=False, backend=backend).float().cpu()
    for sample in y0:  # each group has mean 0 and variance 1 (to fp16 rounding)
        groups = sample.reshape(4, -1)
        assert groups.mean(dim=1).abs().max() < 1e-2
        assert (groups.var(dim=1, unbiased=False) - 1).abs().max() < 1e-2


def test_constant_group_is_finite(backend):
    """A group with zero variance: rstd = 1/sqrt(eps), y = SiLU(bias), gradients finite."""
    device = backend_device(backend)
    x = torch.full((1, 4, 3, 3), 3.0, device=device, requires_grad=True)
    b = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)
    y = group_norm_silu(x, 2, None, b, backend=backend)
    assert_close_fp32(y, F.silu(b).reshape(1, 4, 1, 1).expand(1, 4, 3, 3))
    (g,) = torch.autograd.grad(y.sum(), [x])
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------ Triton launch paths
@pytest.fixture
def triton_mod():
    if "triton" not in FAST_BACKENDS:
        pytest.skip("triton backend not available")
    from ddpm_fast.kernels import triton_groupnorm

    return triton_groupnorm


def test_launch_config_is_a_pure_function_of_shape(triton_mod):
    cfg = triton_mod.groupnorm_config
    # U-Net shapes at H100's 132 SMs: batch 32 at 16x16 is one program and one tile per (n, g) ...
    big = cfg(32, 256, 32, 16 * 16, 132)
    assert big.splits == 1 and big.one_tile and big.block_c == 8
    # ... batch 1 at 32x32 (32 groups < 2 x 132) splits the positions ...
    small = cfg(1, 128, 32, 32 * 32, 132)
    assert small.splits > 1 and 32 * small.splits >= 132
    # ... a large group loops over tiles, one program per (n, g).
    loop = cfg(16, 128, 32, 64 * 64, 132)
    assert loop.splits == 1 and not loop.one_tile
    for c in (big, small, loop, cfg(1, 96, 3, 7 * 9, 132), cfg(1, 512, 32, 1, 132), cfg(2, 6, 3, 1000, 1)):
        assert c.block_c * c.block_s <= max(triton_mod.MAX_TILE, c.block_c)
        assert c.s_per_split % c.block_s == 0 or c.splits == 1


# path: (SM count the launcher assumes, MAX_TILE): which kernels run on a (1, 6, 5, 7) input, 3 groups.
PATHS = {
    "split": (132, 4096),  # 3 (n, g) < 2 x 132: two kernels, the positions split across programs
    "one-program-loop": (1, 16),  # one program per (n, g), looping over 2-channel x 8-position tiles
    "one-program-tile": (1, 4096),  # one program per (n, g), the group in one tile
}


@pytest.mark.parametrize("path", list(PATHS))
def test_triton_paths(triton_mod, monkeypatch, path):
    sms, max_tile = PATHS[path]
    monkeypatch.setattr(triton_mod, "num_sms", lambda device: sms)
    monkeypatch.setattr(triton_mod, "MAX_TILE", max_tile)
    shape = (1, 6, 5, 7)
    cfg = triton_mod.groupnorm_config(1, 6, 3, 35, sms)
    assert (cfg.splits > 1, cfg.one_tile) == {"split": (True, False), "one-program-loop": (False, False)}.get(
        path, (False, True)
    )
    t = make_inputs(shape, seed=13)
    y = check_against_reference("triton", t, 3)
    again = check_against_reference("triton", t, 3)
    assert torch.equal(y, again)  # deterministic: no atomics
    cl = make_inputs(shape, seed=13, channels_last=True)
    check_against_reference("triton", cl, 3)


def test_cpp_is_deterministic():
    """A second call gives the same bits, and so do calls from four Python threads at once, with and
    without autograd (the eager op, ddpm_fast._C.group_norm_silu_eager, releases the GIL inside)."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    t = make_inputs((4, 64, 8, 8), seed=14)
    gy = grad_output((4, 64, 8, 8), torch.float32, "cpu")
    fast = lambda u: apply(group_norm_silu, u, 32, backend="cpp")  # noqa: E731
    y1, g1 = forward_and_grads(fast, t, gy)
    y2, g2 = forward_and_grads(fast, t, gy)
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    failures = []

    def work():
        try:
            for _ in range(20):
                y, g = forward_and_grads(fast, t, gy)
                assert torch.equal(y, y1) and all(torch.equal(g[k], g1[k]) for k in g1)
                with torch.no_grad():
                    assert torch.equal(fast({k: v.detach() for k, v in t.items()}), y1)
        except Exception as err:  # reported below, from the test's thread
            failures.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures


# ------------------------------------------------------------------ autograd plumbing
def test_partial_requires_grad(backend):
    """Only some inputs need gradients: the others get None, the needed ones match the reference."""
    device = backend_device(backend)
    t = make_inputs((2, 4, 3, 3), seed=15, device=device)
    w = t["weight"].clone().requires_grad_()
    s = t["scale_nc"].clone().requires_grad_()
    y = group_norm_silu(t["x"], 2, w, t["bias"], scale_nc=s, shift_nc=t["shift_nc"], backend=backend)
    gw, gs = torch.autograd.grad(y.square().sum(), [w, s])
    cpu = {k: v.cpu() for k, v in t.items()}
    rw, rs = cpu["weight"].clone().requires_grad_(), cpu["scale_nc"].clone().requires_grad_()
    ry = reference.group_norm_silu(cpu["x"], 2, rw, cpu["bias"], scale_nc=rs, shift_nc=cpu["shift_nc"])
    rgw, rgs = torch.autograd.grad(ry.square().sum(), [rw, rs])
    assert_close_fp32(gw, rgw, rtol=1e-4)
    assert_close_fp32(gs, rgs, rtol=1e-4)
    x = t["x"].clone().requires_grad_()
    (gx,) = torch.autograd.grad(group_norm_silu(x, 2, backend=backend).sum(), [x])
    assert gx.shape == x.shape


def test_eager_autograd_matches_the_custom_op():
    """Eager calls that need gradients run a plain autograd.Function (no torch.library dispatch):
    the same outputs and gradients, bit for bit, as the registered custom op's autograd; double
    backward still raises (no formula) instead of returning silently wrong gradients."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    from ddpm_fast.ops.groupnorm_silu import _group_norm_silu_op, _GroupNormSiluFunction

    t = make_inputs((2, 8, 5, 3), seed=18)
    gy = grad_output((2, 8, 5, 3), torch.float32, "cpu")
    results = []
    for op in (_GroupNormSiluFunction.apply, _group_norm_silu_op):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
        args = [leaves.get(k) for k in ("x", "weight", "bias", "bias_nc", "scale_nc", "shift_nc", "residual")]
        y, _, _ = op(*args, 4, 1e-5, True, "cpp")
        results.append((y, torch.autograd.grad(y, list(leaves.values()), gy)))
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    x = t["x"].detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(group_norm_silu(x, 4, backend="cpp").square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gx.sum(), [x])


CPP_AUTOGRAD_CASES = {
    "all-inputs": dict(shape=(2, 8, 5, 3), extras=EXTRAS),
    "channels_last": dict(shape=(2, 8, 5, 3), extras=EXTRAS, channels_last=True),
    "no-affine": dict(shape=(3, 8, 7), extras=("bias_nc",), affine=False),
    "batch-1-2d": dict(shape=(1, 8), extras=("scale_shift",)),
    "bf16": dict(shape=(2, 8, 4, 4), extras=EXTRAS, dtype=torch.bfloat16),
    "fp64": dict(shape=(2, 8, 3, 5), extras=EXTRAS, dtype=torch.float64),
}


@pytest.mark.parametrize("case", list(CPP_AUTOGRAD_CASES))
def test_cpp_autograd_node_matches_the_custom_op(case):
    """Eager cpp calls record a C++ autograd node (csrc/group_norm_silu_autograd.cpp): y and every
    gradient equal the registered custom op's, bit for bit, with every optional input, any subset
    of them needing gradients, odd layouts of x and grad_y, and parameters in another dtype."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    from ddpm_fast.ops.groupnorm_silu import _cpp_autograd_op, _group_norm_silu_op

    spec = dict(CPP_AUTOGRAD_CASES[case])
    shape, dtype = spec.pop("shape"), spec.pop("dtype", torch.float32)
    t = make_inputs(shape, dtype, seed=21, **spec)
    for k in ("weight", "bias"):  # parameters stay fp32 under autocast-style mixed precision
        if k in t and dtype == torch.bfloat16:
            t[k] = t[k].float()
    names = ("x", "weight", "bias", "bias_nc", "scale_nc", "shift_nc", "residual")
    gy = grad_output(shape, dtype, "cpu")
    grad_ys = {"contiguous": gy, "expanded": gy[:1].expand(shape)}
    if len(shape) == 4:
        grad_ys["channels_last"] = gy.contiguous(memory_format=torch.channels_last)
        t["x"] = t["x"].transpose(2, 3).contiguous().transpose(2, 3) if case == "all-inputs" else t["x"]
    for subset in (names, ("x",), ("weight", "shift_nc", "residual")):
        for gy_name, grad_y in grad_ys.items():
            results = []
            for op in (_cpp_autograd_op(), functools.partial(_group_norm_silu_op, backend="cpp")):
                leaves = {k: v.detach().clone().requires_grad_(k in subset) for k, v in t.items()}
                args = [leaves.get(k) for k in names]
                y = op(*args, 4, 1e-5, True)
                y = y if isinstance(y, torch.Tensor) else y[0]
                wanted = [v for v in leaves.values() if v.requires_grad]
                results.append((y, torch.autograd.grad(y, wanted, grad_y) if wanted else ()))
            (y1, g1), (y2, g2) = results
            assert torch.equal(y1, y2), (subset, gy_name)
            assert len(g1) == len(g2)
            for a, b in zip(g1, g2, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b), (subset, gy_name)
    assert (
        "GroupNormSiluFunction"
        in _cpp_autograd_op()(t["x"].requires_grad_(), *[None] * 6, 4, 1e-5, True).grad_fn.name()
    )


def test_cpp_autograd_node_empty_and_no_grad():
    """An empty batch gives empty outputs and zero parameter gradients; without autograd the op
    records nothing."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    from ddpm_fast.ops.groupnorm_silu import _cpp_autograd_op

    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    y = _cpp_autograd_op()(x, w, None, None, None, None, None, 2, 1e-5, True)
    gx, gw = torch.autograd.grad(y, [x, w], torch.ones_like(y))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(4))
    with torch.no_grad():
        assert _cpp_autograd_op()(torch.randn(2, 4, 3), w, None, None, None, None, None, 2, 1e-5, True).grad_fn is None


def test_opcheck_cpp():
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    from ddpm_fast.ops.groupnorm_silu import _group_norm_silu_backward_op, _group_norm_silu_op

    t = make_inputs((2, 4, 3, 3), seed=16)
    args = [t["x"].requires_grad_(), t["weight"], t["bias"], t["bias_nc"], t["scale_nc"], None, t["residual"]]
    torch.library.opcheck(_group_norm_silu_op, (*args, 2, 1e-5, True, "cpp"))
    _, mean, rstd = _group_norm_silu_op(*args, 2, 1e-5, True, "cpp")
    gy = torch.randn_like(t["x"])
    bargs = (gy, t["x"].detach(), t["weight"], t["bias"], t["bias_nc"], t["scale_nc"], None, mean, rstd, 2, True)
    torch.library.opcheck(_group_norm_silu_backward_op, (*bargs, "cpp"))


def test_compile_fullgraph_forward_backward():
    """One training step under torch.compile(fullgraph=True): the forward and the backward each stay
    one custom-op node, and the values and gradients equal eager's."""
    if "cpp" not in FAST_BACKENDS:
        pytest.skip("cpp backend not built")
    from torch._inductor.utils import run_and_get_code

    t = make_inputs((2, 8, 3, 3), seed=17)
    names = list(t)

    def loss(*args):
        u = dict(zip(names, args, strict=True))
        return apply(group_norm_silu, u, 4, backend="cpp").square().sum()

    def step(fn):
        leaves = [t[k].detach().clone().requires_grad_() for k in names]
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves)

    want, want_grads = step(loss)
    torch._dynamo.reset()
    try:
        (got, got_grads), code = run_and_get_code(step, torch.compile(loss, fullgraph=True))
    finally:
        torch._dynamo.reset()
    code = "\n".join(code)
    assert code.count("= torch.ops.ddpm_fast.group_norm_silu.default(") == 1
    assert code.count("= torch.ops.ddpm_fast.group_norm_silu_backward.default(") == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ backends and bad inputs
def test_reference_backend_and_default():
    t = make_inputs((2, 8, 3, 3), seed=18)
    want = apply(reference.group_norm_silu, t, 4)
    assert torch.equal(apply(group_norm_silu, t, 4, backend="reference"), want)
    assert_close_fp32(apply(group_norm_silu, t, 4), want, rtol=1e-4)


def test_bad_inputs():
    x = torch.randn(2, 8, 3, 3)
    nc = torch.randn(2, 8)
    op = group_norm_silu
    with pytest.raises(TypeError, match="x"):
        op(x.to(torch.int32), 4)
    with pytest.raises(TypeError, match="x"):
        op(x.numpy(), 4)
    with pytest.raises(ValueError, match="batch"):
        op(torch.randn(8), 4)
    with pytest.raises(ValueError, match="num_groups=3 does not divide"):
        op(x, 3)
    with pytest.raises(ValueError, match="num_groups=0"):
        op(x, 0)
    with pytest.raises(TypeError, match="num_groups"):
        op(x, 4.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        op(x, 4, torch.randn(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, 4, torch.randn(8), torch.randn(8, 1))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        op(x, 4, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        op(x, 4, [1.0] * 8)
    with pytest.raises(ValueError, match=r"bias_nc must have shape \(2, 8\)"):
        op(x, 4, bias_nc=nc[:, :, None, None])
    with pytest.raises(ValueError, match="scale_nc must have shape"):
        op(x, 4, scale_nc=torch.randn(8))
    with pytest.raises(ValueError, match="shift_nc must have shape"):
        op(x, 4, shift_nc=torch.randn(1, 8))
    with pytest.raises(ValueError, match="residual must have shape"):
        op(x, 4, residual=torch.randn(2, 8, 3, 4))
    with pytest.raises(TypeError, match="residual has dtype"):
        op(x, 4, residual=x.double())
    with pytest.raises(ValueError, match="device"):
        op(x, 4, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="device"):
        op(x, 4, bias_nc=nc.to("meta"))
    for eps in (-1.0, float("nan"), True, "1e-5", None):
        with pytest.raises(ValueError, match="eps"):
            op(x, 4, eps=eps)
    op(x, 4, eps=1)  # an int, and a numpy float, are numbers
    op(x, 4, eps=np.float32(1e-5))
    with pytest.raises(TypeError, match="silu"):
        op(x, 4, silu=1)
    with pytest.raises(ValueError, match="unknown backend"):
        op(x, 4, backend="metal")
    with pytest.raises(ValueError, match="'cuda' for group_norm_silu \\(no CUDA C\\+\\+ kernel"):
        op(x, 4, backend="cuda")


def test_unavailable_triton():
    if ddpm_fast.backends()["triton"][0]:
        pytest.skip("triton is available here")
    with pytest.raises(RuntimeError, match="not available"):
        group_norm_silu(torch.randn(2, 8, 3, 3), 4, backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_other_device_inputs():
    x = torch.randn(2, 8, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on"):
        group_norm_silu(x, 4, torch.randn(8))
    with pytest.raises(ValueError, match="residual is on"):
        group_norm_silu(x, 4, residual=x.cpu())
    with pytest.raises(ValueError, match="CUDA tensors|runs on CPU"):
        group_norm_silu(x, 4, backend="cpp")
