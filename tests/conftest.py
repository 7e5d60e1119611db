"""Shared test setup for ddpm_fast.

- Without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors: this sets
  ``TRITON_INTERPRET=1`` before anything imports triton (importing torch does not).
- ``FAST_BACKENDS`` lists the available non-reference backends (``ddpm_fast.backends()``): cpp and
  triton here, cpp, cuda and triton on a GPU machine, where the cuda and triton backends take
  CUDA tensors (``backend_device``). The ``backend`` fixture runs the cpp backend once per
  vector-ISA build of the CPU kernels that the machine supports (AVX-512, AVX2, baseline).
- ``assert_close_to_reference`` is the tolerance rule of DESIGN.md ("Numerics"): the fast op's
  error against the float64 reference may be at most twice the reference's own error in the same
  dtype, plus a small floor.
"""

import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (ddpm_fast imports it lazily)
# sample()'s default dtype is bf16 autocast on a CPU with bf16 units (AMX or AVX512-BF16: a CI
# machine may have them). The suite and its subprocesses compare fp32 runs, as on a CPU without;
# tests/test_sampler.py::test_default_dtype_follows_the_cpu checks the choice itself.
os.environ["DDPM_FAST_CPU_BF16"] = "0"

import pytest  # noqa: E402

import ddpm_fast  # noqa: E402
from ddpm_fast._backends import cpu_isas, use_cpu_isa  # noqa: E402
from ddpm_fast.schedule import Schedule  # noqa: E402

if HAS_CUDA:  # fp32 GPU tests compare against an IEEE fp32 reference
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

T = 1000


def fast_backends() -> list[str]:
    """The available backends other than the reference, in ddpm_fast's order."""
    return [name for name, (ok, _) in ddpm_fast.backends().items() if ok and name != "reference"]


FAST_BACKENDS = fast_backends()
# The Triton interpreter costs ~1.5 ms per program instance: tests thin their triton cases then.
TRITON_INTERPRETED = "triton" in FAST_BACKENDS and not HAS_CUDA


def backend_device(backend: str) -> torch.device:
    """Where a backend's tensors live: CUDA for cuda (and triton on a GPU machine), else CPU."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def is_slow(backend: str) -> bool:
    """True for the interpreted Triton backend (keep its shapes tiny and its cases few)."""
    return backend == "triton" and TRITON_INTERPRETED


def backend_params(exclude: tuple[str, ...] = ()) -> list:
    """Params for a ``backend`` fixture: each fast backend not excluded, the C++ one once per
    vector-ISA build that this CPU can run (ids cpp-avx512, cpp-avx2, cpp-base), so that every
    build of the CPU kernels is tested on the machine at hand."""
    params = []
    for name in FAST_BACKENDS:
        if name in exclude:
            continue
        if name == "cpp":
            params += [pytest.param(("cpp", isa), id=f"cpp-{isa}") for isa in cpu_isas()]
        else:
            params.append(pytest.param((name, None), id=name))
    return params


def backend_fixture(request):
    """The body of a ``backend`` fixture over backend_params: the name, with the C++ kernels'
    ISA build selected for the test's duration."""
    name, isa = request.param
    with use_cpu_isa(isa) if isa else contextlib.nullcontext():
        yield name


backend = pytest.fixture(params=backend_params())(backend_fixture)


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


@pytest.fixture(scope="session")
def diffusers():
    """diffusers, the oracle of the equivalence tests: a test that takes this fixture skips where
    diffusers is missing (the GPU machines without the wheels of benchmarks/fetch_gpu_wheels.sh),
    and only that test."""
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def schedule() -> Schedule:
    """diffusers' default DDPM schedule: linear betas 1e-4..0.02, T = 1000, on the CPU."""
    return Schedule.from_config()


def tolerance_floor(dtype: torch.dtype, magnitude: float) -> float:
    """Absolute slack on top of 2x the reference's error: 1e-6 relative in fp32, one ulp of the
    output dtype at the data's magnitude for fp16/bf16 (outputs are rounded), ~1e-12 in fp64."""
    scale = max(1.0, magnitude)
    if dtype == torch.float64:
        return 1e-12 * scale
    if dtype == torch.float32:
        return 1e-6 * scale
    return torch.finfo(dtype).eps * scale


def _per_sample_max(err: torch.Tensor) -> torch.Tensor:
    return err.reshape(err.shape[0], -1).amax(dim=1) if err.dim() >= 2 else err.reshape(1, -1).amax(dim=1)


def assert_close_to_reference(
    fast: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    ref64: torch.Tensor,
    factor: float = 2.0,
    reduction: bool = False,
) -> None:
    """fast and ref_same_dtype are the fast op and the reference in dtype D; ref64 the reference
    computed from the same inputs upcast to float64. Per sample (dim 0), the fast op's max error
    against ref64 may be at most ``factor`` times the reference's own, plus tolerance_floor.
    ``reduction``: the values are long sums (a parameter's gradient over a batch and its positions),
    whose floor is 10x an elementwise one (DESIGN.md: ~1e-4 vs ~1e-5): the fp32 reference's own
    error there depends on how ATen's kernels for this CPU order the sums, so 2x it alone is not a
    bound that holds on every CPU."""
    assert fast.shape == ref_same_dtype.shape == ref64.shape, (fast.shape, ref_same_dtype.shape, ref64.shape)
    assert fast.dtype == ref_same_dtype.dtype, (fast.dtype, ref_same_dtype.dtype)
    f, r, e = (x.detach().to("cpu", torch.float64) for x in (fast, ref_same_dtype, ref64))
    assert torch.isfinite(e).all(), "the float64 reference is not finite: the test case is ill-posed"
    finite = torch.isfinite(r)
    bad = finite & ~torch.isfinite(f)
    assert not bad.any(), f"fast output is not finite at {bad.nonzero()[:5].tolist()} where the reference is"
    f, r, e = (torch.where(finite, x, torch.zeros_like(x)) for x in (f, r, e))
    fast_err = _per_sample_max((f - e).abs())
    ref_err = _per_sample_max((r - e).abs())
    floor = tolerance_floor(fast.dtype, e.abs().max().item()) * (10 if reduction else 1)
    allowed = factor * ref_err + floor
    worst = (fast_err - allowed).argmax()
    assert (fast_err <= allowed).all(), (
        f"{fast.dtype}: sample {worst.item()}: fast error {fast_err[worst].item():.3g} > {factor} x reference error "
        f"{ref_err[worst].item():.3g} + floor {floor:.3g} (|ref| max {e.abs().max().item():.3g})"
    )


def assert_close_fp32(fast: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5):
    """Plain closeness of two fp32 results: rtol 1e-5, atol 1e-6 * max(1, |ref| max)."""
    ref = ref.detach().cpu()
    atol = 1e-6 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    torch.testing.assert_close(fast.detach().cpu(), ref, rtol=rtol, atol=atol)


def assert_mostly_identical(fast: torch.Tensor, ref: torch.Tensor, max_mismatch: float = 0.02) -> None:
    """For fp16/bf16 outputs: where the fast op does the reference's fp32 arithmetic (up to fp32
    rounding) and rounds once to the output dtype, the two agree bit for bit except where the fp32
    values straddle a rounding boundary (rare). This sees differences far below the tolerance
    rule's floor, e.g. a drawn noise not rounded to fp16 before use. (Not for bf16 on the Triton
    interpreter, whose fp32 -> bf16 cast truncates instead of rounding to nearest.)"""
    rate = (fast.detach().cpu() != ref.detach().cpu()).float().mean().item()
    assert rate <= max_mismatch, f"{rate:.1%} of the elements differ from the reference"


def seed_of(generator: torch.Generator) -> int:
    """The Philox key the ops draw from ``generator`` (ops/_common.seed_from), without advancing it."""
    g = torch.Generator(device=generator.device)
    g.set_state(generator.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=g, device=generator.device, dtype=torch.int64).item())


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    faster than two there, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
