"""group_norm_silu: GroupNorm with the time embedding added before it, + SiLU (diffusers'
ResnetBlock2D norm2: x + temb[:, :, None, None] -> GroupNorm(32) -> SiLU), against the reference.

Modes (bytes = full-tensor reads + writes the op cannot avoid; weights and (N, C) inputs left out):
  fwd       y = SiLU(GroupNorm(x + temb) * w + b)     read x; write y                 2 tensors
  fwd+bwd   the forward, then dx, dw, db, d temb       + read x, dy; write dx          5 tensors
Shapes (32 groups; fp32; bf16 too on CUDA, and on the CPU at (32, 256, 16, 16)): the CIFAR U-Net's
at batch 128 (128, 128, 32, 32) and batch 1 (1, 128, 32, 32) and (1, 256, 8, 8) (sampling one image),
its 4x4 and 8x8 levels at batch 64 (64, 256, 4, 4: rows of 16 positions; 64, 256, 8, 8), the 2x2 and
6x6 levels of 32- and 96-pixel images at batch 64 (rows of 4 and 36), plus (32, 256, 16, 16) and
(8, 128, 64, 64).
Layouts: NCHW everywhere; channels_last ("-cl" modes) at (32, 256, 16, 16) and (1, 128, 32, 32).
Implementations: each fast backend on the device (cpp on CPU; triton on CUDA: this op has no CUDA
C++ kernel), the reference in eager mode ("eager") and under torch.compile ("compile", which
compiles the backward too).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, DTYPES, ON_CUDA, compile_fn, kernel_backends, op_cases, tensor_bytes

from ddpm_fast import group_norm_silu, reference

GROUPS = 32
SHAPES = [
    *[(128, 128, 32, 32), (32, 256, 16, 16), (8, 128, 64, 64), (1, 128, 32, 32), (1, 256, 8, 8)],
    *[(64, 256, 4, 4), (64, 256, 2, 2), (64, 256, 6, 6)],  # short rows: a group at once (kBlockRows)
    (64, 256, 8, 8),  # the 8x8 level at batch 64: the forward's block (kForwardBlockRows), the backward's rows
]
CL_SHAPES = [(32, 256, 16, 16), (1, 128, 32, 32)]  # also benchmarked channels_last
DTYPE_NAMES_HERE = ("fp32", "bf16") if ON_CUDA else ("fp32",)
# On the CPU, bf16 (what the U-Net's GroupNorms get under autocast) at the 16x16 U-Net shape only
BF16_CPU_SHAPES = [] if ON_CUDA else [(32, 256, 16, 16)]
MODES = {"fwd": 2, "fwd+bwd": 5}  # tensors read + written
CL_MODES = {f"{mode}-cl": count for mode, count in MODES.items()}
IMPLS = [*(name for name in kernel_backends() if name != "cuda"), "eager", "compile"]
PARAMS = (
    op_cases("group_norm_silu", [(shape, dtype) for dtype in DTYPE_NAMES_HERE for shape in SHAPES], MODES, IMPLS)
    + op_cases(
        "group_norm_silu", [(shape, dtype) for dtype in DTYPE_NAMES_HERE for shape in CL_SHAPES], CL_MODES, IMPLS
    )
    + op_cases("group_norm_silu", [(shape, "bf16") for shape in BF16_CPU_SHAPES], {**MODES, **CL_MODES}, IMPLS)
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return reference.group_norm_silu(x, GROUPS, w, b, bias_nc=temb)


@functools.cache
def compiled():
    """One compiled reference; dynamo specialises it per (shape, dtype, requires_grad)."""
    return compile_fn(_reference)


@pytest.mark.parametrize(("impl", "shape", "dtype", "mode"), PARAMS)
def test_group_norm_silu(roofline, impl, shape, dtype, mode):
    torch_dtype = DTYPES[dtype]
    n, c = shape[:2]
    layout = torch.channels_last if mode.endswith("-cl") else torch.contiguous_format
    mode = mode.removesuffix("-cl")
    gen = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype).contiguous(memory_format=layout)
    w = 1 + 0.1 * torch.randn(c, device=DEVICE, generator=gen)
    b = 0.1 * torch.randn(c, device=DEVICE, generator=gen)
    temb = torch.randn(n, c, device=DEVICE, generator=gen)
    if impl == "eager":
        op = _reference
    elif impl == "compile":
        op = compiled()
    else:
        op = lambda x, w, b, temb: group_norm_silu(x, GROUPS, w, b, bias_nc=temb, backend=impl)  # noqa: E731

    if mode == "fwd":
        fn = lambda: op(x, w, b, temb)  # noqa: E731
    else:
        leaves = [t.requires_grad_() for t in (x, w, b, temb)]
        grad_y = torch.randn(shape, device=DEVICE, generator=gen).to(torch_dtype).contiguous(memory_format=layout)
        fn = lambda: torch.autograd.grad(op(*leaves), leaves, grad_y)  # noqa: E731

    roofline(fn, bytes_moved=tensor_bytes(shape, torch_dtype, MODES[mode]))
