"""Triton q_sample: one pass over x0 (and the given noise) writing x_t, the drawn noise and the
training target. One program covers BLOCK elements of one (n, c) row of the (N, C, S) view;
noise element i (logical NCHW index) is lane i % 4 of tl.randn4x(seed, i // 4) (launch.tile_noise),
as in the C++/CUDA kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import elementwise_config, quad_noise, row_index, tile_noise


@triton.jit
def q_sample_kernel(
    x0_ptr,
    noise_ptr,
    xt_ptr,
    noise_out_ptr,
    target_ptr,
    t_ptr,
    sqrt_ab_ptr,
    sqrt_1mab_ptr,
    seed_ptr,
    C,
    S,
    T,
    x_sn,
    x_sc,
    x_ss,
    z_sn,
    z_sc,
    z_ss,
    o_sn,
    o_sc,
    o_ss,
    zo_sn,
    zo_sc,
    zo_ss,
    g_sn,
    g_sc,
    g_ss,
    HAS_NOISE: tl.constexpr,
    TARGET: tl.constexpr,
    QUAD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, n, c, s, mask = row_index(C, S, BLOCK)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + n), 0), T - 1)
    sa = tl.load(sqrt_ab_ptr + t)
    s1a = tl.load(sqrt_1mab_ptr + t)
    x0 = tl.load(x0_ptr + n * x_sn + c * x_sc + s * x_ss, mask=mask).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(noise_ptr + n * z_sn + c * z_sc + s * z_ss, mask=mask).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        drawn = tile_noise(seed, row, S, s, BLOCK, QUAD_NOISE).to(noise_out_ptr.dtype.element_ty)  # as stored
        tl.store(noise_out_ptr + n * zo_sn + c * zo_sc + s * zo_ss, drawn, mask=mask)
        z = drawn.to(tl.float32)
    out_ty = xt_ptr.dtype.element_ty
    tl.store(xt_ptr + n * o_sn + c * o_sc + s * o_ss, (sa * x0 + s1a * z).to(out_ty), mask=mask)
    if TARGET != 0:
        if TARGET == 1:
            tgt = z
        elif TARGET == 2:
            tgt = x0
        else:
            tgt = sa * z - s1a * x0
        tl.store(target_ptr + n * g_sn + c * g_sc + s * g_ss, tgt.to(out_ty), mask=mask)


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
    """Launch on (N, C, S) views (see ops/noising.py); outputs are written in place."""
    n, c, s = x0.shape
    block, num_warps = elementwise_config(s, x0.device)
    dummy = x_t  # a valid pointer for the arguments a specialisation never reads
    z, zo, g = (
        noise if noise is not None else dummy,
        noise_out if noise_out is not None else dummy,
        target if target is not None else dummy,
    )
    grid = (n * c, triton.cdiv(s, block))
    q_sample_kernel[grid](
        x0,
        z,
        x_t,
        zo,
        g,
        t,
        sqrt_ab,
        sqrt_1mab,
        seed if seed is not None else t,
        c,
        s,
        sqrt_ab.numel(),
        *x0.stride(),
        *z.stride(),
        *x_t.stride(),
        *zo.stride(),
        *g.stride(),
        HAS_NOISE=noise is not None,
        TARGET=target_kind,
        QUAD_NOISE=noise is None and quad_noise(s),
        BLOCK=block,
        num_warps=num_warps,
    )
