"""Triton q_sample: one pass over x0 (and the given noise) writing x_t, the drawn noise and the
training target. One program covers BLOCK elements of one (n, c) row of the (N, C, S) view;
noise element i (logical NCHW index) is lane i % 4 of tl.randn4x(seed, i // 4) (launch.tile_noise),
as in the C++/CUDA kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Operands, cdiv, elementwise_config, launch, offset, quad_noise, row_index, tile_noise


@triton.jit
def q_sample_kernel(
    x0_ptr,
    z_ptr,
    xt_ptr,
    target_ptr,
    t_ptr,
    sqrt_ab_ptr,
    sqrt_1mab_ptr,
    seed_ptr,
    C,
    S,
    T,
    LAYOUTS: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    TARGET: tl.constexpr,
    QUAD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """z_ptr: the given noise (HAS_NOISE) or where the drawn noise goes. LAYOUTS: bit i set where
    tensor i of (x0, z, x_t, target) is NHWC (launch.Operands)."""
    row, n, c, s, mask = row_index(C, S, BLOCK)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + n), 0), T - 1)
    sa = tl.load(sqrt_ab_ptr + t)
    s1a = tl.load(sqrt_1mab_ptr + t)
    x0 = tl.load(x0_ptr + offset(n, c, s, C, S, LAYOUTS & 1), mask=mask).to(tl.float32)
    z_off = offset(n, c, s, C, S, (LAYOUTS >> 1) & 1)
    if HAS_NOISE:
        z = tl.load(z_ptr + z_off, mask=mask).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        drawn = tile_noise(seed, row, S, s, BLOCK, QUAD_NOISE).to(z_ptr.dtype.element_ty)  # as stored
        tl.store(z_ptr + z_off, drawn, mask=mask)
        z = drawn.to(tl.float32)
    out_ty = xt_ptr.dtype.element_ty
    tl.store(xt_ptr + offset(n, c, s, C, S, (LAYOUTS >> 2) & 1), (sa * x0 + s1a * z).to(out_ty), mask=mask)
    if TARGET != 0:
        if TARGET == 1:
            tgt = z
        elif TARGET == 2:
            tgt = x0
        else:
            tgt = sa * z - s1a * x0
        tl.store(target_ptr + offset(n, c, s, C, S, (LAYOUTS >> 3) & 1), tgt.to(out_ty), mask=mask)


def q_sample_triton(
    x0: torch.Tensor,
    t: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1mab: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    x_t: torch.Tensor,
    noise_out: torch.Tensor | None,
    target: torch.Tensor | None,
    target_kind: int,
) -> None:
    """Launch on (N, C, S) views (see ops/noising.py); outputs are written in place. NCHW and NHWC
    views are read and written where they are; other layouts go through copies (launch.Operands)."""
    n, c, s = x0.shape
    block, num_warps = elementwise_config(s)
    ops = Operands()
    x0 = ops.read(x0)
    z = ops.read(noise) if noise is not None else ops.write(noise_out)
    x_t = ops.write(x_t)
    target = ops.write(target)
    launch(
        q_sample_kernel,
        (n * c, cdiv(s, block)),
        (
            x0,
            z if z is not None else x_t,  # a valid pointer for the arguments a specialisation never reads
            x_t,
            target if target is not None else x_t,
            t,
            sqrt_ab,
            sqrt_1mab,
            seed if seed is not None else t,
        ),
        (c, s, sqrt_ab.numel()),
        num_warps,
        LAYOUTS=ops.code,
        HAS_NOISE=noise is not None,
        TARGET=target_kind,
        QUAD_NOISE=noise is None and quad_noise(s),
        BLOCK=block,
    )
    ops.finish()
