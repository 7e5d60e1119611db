"""attention: softmax(q k^T / sqrt(D)) v over (B, H, S, D), forward and forward+backward.

FLOPs: 4 B H S^2 D forward (two GEMMs); the backward 2.5x that (five GEMMs, one recomputed), so
fwd+bwd = 3.5 x 4 B H S^2 D. TFLOP/s and % of the dtype's peak via the roofline fixture.
Shapes (CUDA, bf16): the CIFAR U-Net's (128, 1, 256, 256), the 256x256 models' (16, 1, 256, 512)
(beyond SDPA's flash head_dim) and long sequences (4, 8, 4096, 64); on the CPU (fp32) smaller ones.
Implementations:
  triton        ddpm_fast.attention(backend="triton") (CUDA only; never the interpreter)
  auto          ddpm_fast.attention with its default dispatch
  sdpa-flash / sdpa-efficient / sdpa-math   F.scaled_dot_product_attention under sdpa_kernel
                (skipped where that kernel does not take the case)
  bmm           plain softmax(q @ k^T * scale) @ v in the input dtype
  eager         reference.attention (fp32 softmax)
  compile       torch.compile(reference.attention)
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_CUDA, compile_fn, shape_id
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm_fast import attention, backends, reference

SHAPES = [(128, 1, 256, 256), (16, 1, 256, 512), (4, 8, 4096, 64)] if ON_CUDA else [
    (8, 1, 256, 256), (2, 1, 256, 512), (1, 8, 512, 64),
]  # fmt: skip
DTYPES = {"bf16": torch.bfloat16} if ON_CUDA else {"fp32": torch.float32}
MODES = {"fwd": 1.0, "fwd+bwd": 3.5}  # FLOPs in units of the forward's
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-math": SDPBackend.MATH}  # fmt: skip
IMPLS = [*(["triton"] if ON_CUDA and backends()["triton"][0] else []), "auto", *SDPA, "bmm", "eager", "compile"]


def _bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


@functools.cache
def compiled():
    return compile_fn(reference.attention)


def _op(impl: str):
    if impl == "triton":
        return lambda q, k, v: attention(q, k, v, backend="triton")
    if impl == "auto":
        return attention
    if impl in SDPA:

        def run(q, k, v):
            with sdpa_kernel(SDPA[impl]):
                return F.scaled_dot_product_attention(q, k, v)

        return run
    return {"bmm": _bmm, "eager": reference.attention, "compile": compiled()}[impl]


def _cases():
    for shape in SHAPES:
        for dtype in DTYPES:
            for mode in MODES:
                group = f"attention-{shape_id(shape)}-{dtype}-{mode}"
                for impl in IMPLS:
                    yield pytest.param(
                        impl, shape, dtype, mode, id=f"{impl}-{dtype}-{shape_id(shape)}-{mode}",
                        marks=pytest.mark.benchmark(group=group),
                    )  # fmt: skip


@pytest.mark.parametrize(("impl", "shape", "dtype", "mode"), list(_cases()))
def test_attention(roofline, impl, shape, dtype, mode):
    torch_dtype = DTYPES[dtype]
    b, h, s, d = shape
    gen = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype) for _ in range(3))
    op = _op(impl)
    if mode == "fwd":
        fn = lambda: op(q, k, v)  # noqa: E731
    else:
        leaves = [t.requires_grad_() for t in (q, k, v)]
        grad_o = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype)
        fn = lambda: torch.autograd.grad(op(*leaves), leaves, grad_o)  # noqa: E731
    try:
        fn()
    except RuntimeError as err:  # an SDPA kernel that does not take this case (head_dim, dtype, device)
        if impl in SDPA:
            pytest.skip(f"{impl}: {str(err).splitlines()[0][:120]}")
        raise
    roofline(fn, flops=int(MODES[mode] * 4 * b * h * s * s * d), flop_dtype=torch_dtype)
