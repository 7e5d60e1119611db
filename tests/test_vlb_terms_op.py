"""The fused vlb_terms op (ops/vlb_terms.py): forward and backward of every fast backend against the
float64 reference (ddpm_fast.vlb) under the tolerance rule, fp32 and bf16, each variance type and
prediction type, odd shapes, channels_last and non-contiguous inputs, batch 1, the decoder (t = 0)
beside KL terms, the hybrid loss's stop-gradient, float64 through the C++ kernel, the op's
registration (opcheck), the default backend on CUDA and bad inputs. The CUDA C++ kernels run here
emulated on the CPU (test_cuda_emulation.py, with this file's cases)."""

import pytest
import torch
from conftest import assert_close_to_reference, backend_fixture, backend_params, is_slow

from ddpm_fast import vlb
from ddpm_fast.ops import no_value_checks, vlb_terms
from ddpm_fast.schedule import Schedule

backend = pytest.fixture(params=backend_params())(backend_fixture)
SCHEDULE = Schedule.from_config(beta_schedule="squaredcos_cap_v2")


def make_inputs(shape, variance_type, prediction_type="epsilon", seed=0, t=None):
    """x0 on the 8-bit grid, x_t = q_sample, and a model output near the truth (eps, x0 or v) with
    variance values in range (learned_range: [-1, 1]; learned: around beta~_t). float32."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x0 = torch.randint(0, 256, shape, generator=g) / 127.5 - 1
    noise = torch.randn(shape, generator=g)
    if t is None:
        t = torch.randint(0, 1000, (n,), generator=g)
        t[0] = 0  # a decoder term in every batch
    ab = SCHEDULE.alphas_cumprod[t].float().reshape(-1, *[1] * (len(shape) - 1))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    truth = {"epsilon": noise, "sample": x0, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction_type]
    pred = truth + 0.2 * torch.randn(shape, generator=g)
    if variance_type == "learned_range":
        var = torch.rand(shape, generator=g) * 2 - 1
    elif variance_type == "learned":
        beta = SCHEDULE.posterior_variance.clamp(min=1e-5)[t].float().reshape(ab.shape)
        var = beta * torch.exp(0.5 * torch.randn(shape, generator=g))
    else:
        return pred, x0, x_t, t
    return torch.cat([pred, var], 1), x0, x_t, t


def reference_terms(out, x0, x_t, t, dtype, **kw):
    """(terms, d terms / d out) of the reference computing in ``dtype`` from the given inputs."""
    out = out.detach().clone().requires_grad_()
    terms = vlb.vlb_terms(SCHEDULE, out, x0, x_t, t, dtype=dtype, **kw)
    weights = torch.arange(1, t.numel() + 1, dtype=dtype)
    (terms * weights).sum().backward()
    return terms.detach(), out.grad


def fast_terms(out, x0, x_t, t, backend, **kw):
    # a leaf with out's strides (clone() would make a cropped or strided out contiguous)
    out = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype).copy_(out).requires_grad_()
    terms = vlb_terms(out, x0, x_t, t, SCHEDULE, backend=backend, **kw)
    weights = torch.arange(1, t.numel() + 1, dtype=terms.dtype)
    (terms * weights).sum().backward()
    return terms.detach(), out.grad


def check(out, x0, x_t, t, backend, **kw):
    """The tolerance rule on the terms and the gradient: the fast op vs the reference in the inputs'
    precision (float32 compute from the same inputs), both against the float64 reference."""
    ref_kw = {k: v for k, v in kw.items() if k != "mean_grad"}
    f_terms, f_grad = fast_terms(out, x0, x_t, t, backend, **kw)
    r_terms, r_grad = reference_terms(out, x0, x_t, t, torch.float32, **ref_kw)
    e_terms, e_grad = reference_terms(out.double(), x0.double(), x_t.double(), t, torch.float64, **ref_kw)
    assert f_terms.dtype == torch.float32 and f_grad.dtype == out.dtype
    assert_close_to_reference(f_terms, r_terms, e_terms.float().double())
    assert_close_to_reference(f_grad, r_grad.to(out.dtype), e_grad)
    # and plainly: within 1e-5 relative of float64 per sample
    torch.testing.assert_close(f_terms.double(), e_terms, rtol=1e-5, atol=1e-6)
    return f_terms, f_grad


VARIANTS = [
    ("learned_range", "epsilon"),
    ("learned_range", "v_prediction"),
    ("learned", "epsilon"),
    ("fixed_large", "sample"),
    ("fixed_small", "epsilon"),
]


@pytest.mark.parametrize(("variance_type", "prediction_type"), VARIANTS)
def test_matches_the_float64_reference(backend, variance_type, prediction_type):
    if is_slow(backend) and (variance_type, prediction_type) not in VARIANTS[:3]:
        pytest.skip("interpreted Triton: the learned variants cover the kernel's paths")
    args = make_inputs((4, 3, 5, 7), variance_type, prediction_type)
    check(*args, backend, prediction_type=prediction_type, variance_type=variance_type)


LAYOUTS = ["contiguous", "channels_last", "strided", "crop", "batch1"]


def layout_inputs(dtype, layout):
    """learned_range inputs in ``dtype`` laid out as ``layout`` (one of LAYOUTS)."""
    shape = (1, 3, 6, 5) if layout == "batch1" else (3, 2, 6, 5)
    out, x0, x_t, t = make_inputs(shape, "learned_range", seed=3, t=torch.tensor([0]) if layout == "batch1" else None)
    out, x0, x_t = (x.to(dtype) for x in (out, x0, x_t))
    if layout == "channels_last":
        out, x0, x_t = (x.contiguous(memory_format=torch.channels_last) for x in (out, x0, x_t))
    elif layout == "strided":  # every other column of a wider tensor: dims that do not merge
        out, x0, x_t = (torch.cat([x, x], -1)[..., ::2] for x in (out, x0, x_t))
        assert not x0.is_contiguous()
    elif layout == "crop":  # a window of a larger image: H and W do not merge into one strided dim
        out, x0, x_t = (torch.cat([x, x], -1)[..., 1:6] for x in (out, x0, x_t))
        assert not out.is_contiguous()
    return out, x0, x_t, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_and_layouts(backend, dtype, layout):
    f_terms, f_grad = check(*layout_inputs(dtype, layout), backend, variance_type="learned_range")
    if layout == "channels_last":
        assert f_grad.is_contiguous(memory_format=torch.channels_last) or f_grad.is_contiguous()


def test_clip_denoised(backend):
    """clip_denoised clamps the x0 prediction (x0 predictions: the clamp's decisions are the same in
    every precision, so the gradient's zeros line up)."""
    out, x0, x_t, t = make_inputs((3, 2, 4, 5), "learned_range", "sample", seed=4)
    out[:, :2] *= 1.5  # some predictions past [-1, 1]
    check(out, x0, x_t, t, backend, prediction_type="sample", variance_type="learned_range", clip_denoised=True)


def test_stop_gradient_on_the_mean(backend):
    """mean_grad=False: the same terms, no gradient into the prediction channels, the variance
    channels' gradient unchanged (the hybrid loss's L_vlb)."""
    out, x0, x_t, t = make_inputs((3, 2, 4, 4), "learned_range", seed=5)
    terms, grad = fast_terms(out, x0, x_t, t, backend)
    frozen_terms, frozen_grad = fast_terms(out, x0, x_t, t, backend, mean_grad=False)
    assert torch.equal(terms, frozen_terms)
    assert torch.equal(frozen_grad[:, :2], torch.zeros_like(frozen_grad[:, :2]))
    assert torch.equal(frozen_grad[:, 2:], grad[:, 2:]) and grad[:, :2].abs().sum() > 0


def test_float64_through_the_cpp_kernel():
    if "cpp" not in [p.values[0][0] for p in backend_params()]:
        pytest.skip("no C++ kernels")
    out, x0, x_t, t = (x.double() if x.is_floating_point() else x for x in make_inputs((3, 2, 5, 3), "learned_range"))
    f_terms, f_grad = fast_terms(out, x0, x_t, t, "cpp")
    e_terms, e_grad = reference_terms(out, x0, x_t, t, torch.float64, variance_type="learned_range")
    assert f_terms.dtype == torch.float64
    torch.testing.assert_close(f_terms, e_terms, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_grad, e_grad, rtol=1e-10, atol=1e-12)


def test_decoder_tail_is_finite(backend):
    """A decoder far off its data (40 sigma): finite terms and gradients in fp32 too."""
    out, x0, x_t, t = make_inputs((2, 1, 4, 4), "learned_range", seed=6, t=torch.tensor([0, 0]))
    out[:, 0] += 40 * torch.sign(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)))
    f_terms, f_grad = fast_terms(out, x0, x_t, t, backend, variance_type="learned_range")
    e_terms, _ = reference_terms(out.double(), x0.double(), x_t.double(), t, torch.float64)
    assert torch.isfinite(f_terms).all() and torch.isfinite(f_grad).all()
    torch.testing.assert_close(f_terms.double(), e_terms, rtol=1e-5, atol=0)


def test_opcheck():
    """The custom ops' registrations (schema, fake, autograd) as torch.library.opcheck sees them."""
    from ddpm_fast.ops.vlb_terms import _kernel_table, _vlb_op

    out, x0, x_t, t = make_inputs((2, 2, 3, 3), "learned_range")
    table = _kernel_table(SCHEDULE, "epsilon", "learned_range", torch.float32, "cpu")
    name = "cpp" if "cpp" in [p.values[0][0] for p in backend_params()] else "reference"
    if name == "reference":
        pytest.skip("no C++ kernels")
    torch.library.opcheck(_vlb_op, (out.requires_grad_(), x0, x_t, t, table, 1, False, True, name))


def test_default_on_cuda_follows_the_size(monkeypatch):
    """vlb_terms on CUDA by default as posterior_step: the CUDA C++ kernels while a call is bound by
    its launch (and for float64), Triton above; with Triton missing, the CUDA C++ kernels."""
    from ddpm_fast import _backends

    monkeypatch.setattr(_backends, "select_backend", lambda requested, device: requested or "triton")
    monkeypatch.setattr(_backends, "_cuda_cpp_available", lambda: True)
    cuda, below = torch.device("cuda"), _backends.ELEMENTWISE_CUDA_CPP_BELOW
    assert _backends.choose("vlb_terms", None, cuda, numel=128 * 3 * 32 * 32) == "cuda"
    assert _backends.choose("vlb_terms", None, cuda, numel=below) == "triton"
    assert _backends.choose("vlb_terms", None, cuda, numel=10, launch_bound=False) == "triton"
    assert _backends.choose("vlb_terms", None, cuda, numel=below, dtype=torch.float64) == "cuda"
    assert _backends.choose("vlb_terms", "cuda", cuda, numel=below) == "cuda"
    monkeypatch.setattr(_backends, "select_backend", lambda requested, device: requested or "cuda")  # no Triton
    assert _backends.choose("vlb_terms", None, cuda, numel=below) == "cuda"
    assert _backends.op_backend("vlb_terms", "cuda") == "cuda"


def test_bad_inputs():
    out, x0, x_t, t = make_inputs((2, 1, 3, 3), "learned_range")
    with pytest.raises(ValueError, match=r"8-bit data scaled to \[-1, 1\]"):
        vlb_terms(out, x0 * 1.5, x_t, t, SCHEDULE)
    with no_value_checks():  # the trainer checks its data on the host instead
        vlb_terms(out, x0 * 1.5, x_t, t, SCHEDULE, backend="reference")
    with pytest.raises(ValueError, match="needs a model output with 1 channels"):
        vlb_terms(out, x0, x_t, t, SCHEDULE, variance_type="fixed_small")
    with pytest.raises(ValueError, match="x_t has shape"):
        vlb_terms(out, x0, x_t[:1], t, SCHEDULE)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        vlb_terms(out, x0, x_t, torch.tensor([0, 1000]), SCHEDULE)
    with pytest.raises(ValueError, match="unknown backend 'cpu' for vlb_terms"):
        vlb_terms(out, x0, x_t, t, SCHEDULE, backend="cpu")
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):  # not here, or not on CPU tensors
        vlb_terms(out, x0, x_t, t, SCHEDULE, backend="cuda")
