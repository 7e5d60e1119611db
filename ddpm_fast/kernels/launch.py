"""Launch configurations, index helpers and the in-kernel noise shared by the elementwise Triton
kernels.

Configurations are a pure function of (shape, device) so that the ahead-of-time compile check
can ask for them without a GPU; no autotuning (it does not run under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024


def elementwise_config(row_len: int, device: torch.device | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel whose program covers BLOCK elements of one row of
    length ``row_len``: the whole row up to 1024 (fewer, fuller programs), at least 16."""
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(row_len, 1))))
    return block, max(1, min(8, block // 128))


@triton.jit
def row_index(C, S, BLOCK: tl.constexpr):
    """Program (row, tile) of an (N, C, S) view: row = n * C + c; s the tile's positions."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return row, row // C, row % C, s, s < S


@triton.jit
def cos_or_sin(theta, want_sin):
    """cos(theta), or sin(theta) where ``want_sin``, for theta in [0, 2 pi] (fp32): one Cody-Waite
    reduction by pi/2 (in three parts) and Cephes' minimax polynomials on [-pi/4, pi/4], as
    csrc/philox_cpu.cpp's sincos8 (within 1e-7 of the exact values). Not tl.cos and tl.sin:
    libdevice keeps a local-memory array in each for huge arguments, and both in one kernel left
    8 bytes of stack in the posterior kernel."""
    q = tl.floor(theta * 0.63661977236758134 + 0.5)  # theta = q pi/2 + x, q in 0..4
    x = tl.fma(-q, 1.5703125, theta)
    x = tl.fma(-q, 4.837512969970703125e-4, x)
    x = tl.fma(-q, 7.54978995489188216e-8, x)
    z = x * x
    s = tl.fma(z, -1.9515295891e-4, 8.3321608736e-3)
    s = tl.fma(z, s, -1.6666654611e-1)
    s = tl.fma(z * x, s, x)
    c = tl.fma(z, 2.443315711809948e-5, -1.388731625493765e-3)
    c = tl.fma(z, c, 4.166664568298827e-2)
    c = tl.fma(z * z, c, tl.fma(z, -0.5, 1.0))
    # cos(theta) = sin(theta + pi/2); sin(x + k pi/2) is s, c, -s, -c for k % 4 = 0, 1, 2, 3
    k = q.to(tl.int32) + tl.where(want_sin, 0, 1)
    v = tl.where(k % 2 == 0, s, c)
    return tl.where(k % 4 >= 2, -v, v)


@triton.jit
def philox_normal(seed, element):
    """The normal of logical element ``element`` (int64, any block shape) of the stream ``seed``:
    lane element % 4 of ``tl.randn4x(seed, element // 4)`` (the contract of csrc/philox.h), up to
    the rounding of sin and cos. Only the lane's word pair (w0, w1 or w2, w3) goes through
    Box-Muller, and only its cos or sin: one log and one polynomial an element."""
    w0, w1, w2, w3 = tl.randint4x(seed, element // 4)
    lane = element % 4
    u = tl.maximum(tl.uint_to_uniform_float(tl.where(lane < 2, w0, w2)), 1.0e-7)
    theta = 6.283185307179586 * tl.uint_to_uniform_float(tl.where(lane < 2, w1, w3))
    return tl.sqrt(-2.0 * tl.log(u)) * cos_or_sin(theta, lane % 2 == 1)


@triton.jit
def philox_normals(seed, first, BLOCK: tl.constexpr):
    """philox_normal of elements first .. first + BLOCK - 1 in order, ``first`` a multiple of 4:
    one Philox call for each 4 elements (its 4 lanes) instead of one per element. Same
    arithmetic as philox_normal, so the same bits."""
    w0, w1, w2, w3 = tl.randint4x(seed, first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64))
    r01 = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.uint_to_uniform_float(w0), 1.0e-7)))
    r23 = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.uint_to_uniform_float(w2), 1.0e-7)))
    theta01 = 6.283185307179586 * tl.uint_to_uniform_float(w1)
    theta23 = 6.283185307179586 * tl.uint_to_uniform_float(w3)
    lane0, lane1 = r01 * cos_or_sin(theta01, False), r01 * cos_or_sin(theta01, True)
    lane2, lane3 = r23 * cos_or_sin(theta23, False), r23 * cos_or_sin(theta23, True)
    # join(join(a, c), join(b, d))[j, k, m] is lane 2k + m of quad j: row-major, lanes in order
    return tl.reshape(tl.join(tl.join(lane0, lane2), tl.join(lane1, lane3)), [BLOCK])


@triton.jit
def tile_noise(seed, row, S, s, BLOCK: tl.constexpr, QUAD: tl.constexpr):
    """The noise of a row_index tile (elements row * S + s). QUAD (S % 4 == 0, so every tile
    starts on a Philox block): philox_normals, one Philox call per 4 elements; else one per
    element. Both give the same bits."""
    if QUAD:
        z = philox_normals(seed, row * S + tl.program_id(1).to(tl.int64) * BLOCK, BLOCK)
    else:
        z = philox_normal(seed, row * S + s)
    return z


def quad_noise(row_len: int) -> bool:
    """tile_noise's QUAD for rows of this length."""
    return row_len % 4 == 0
