"""Triton vlb_terms (ops/vlb_terms.py): the variational bound's per-element terms, summed per
(n, c) row tile (forward), and their derivatives in the model output (backward). One program covers
BLOCK elements of one (n, c) row of the (N, C, S) view. fp32 throughout; the decoder's Gaussian CDF
is computed in log space from Numerical Recipes' erfc approximation (erfcc: t exp(-u^2 + P(t)),
fractional error < 1.2e-7 everywhere), taken as a log so that tails never underflow."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Operands, cdiv, elementwise_config, launch, offset, row_index

FIXED, LEARNED_RANGE, LEARNED = 0, 1, 2
TABLE_COLS = 8


@triton.jit
def _log1p_neg(p):
    """log(1 - p) for p in [0, 0.5] (Kahan's log1p: exact rounding of 1 - p accounted for)."""
    w = 1.0 - p
    exact = w == 1.0
    return tl.where(exact, -p, tl.log(w) * (-p) / tl.where(exact, -1.0, w - 1.0))


@triton.jit
def _neg_expm1(x):
    """-expm1(x) = 1 - exp(x) for x <= 0 (Kahan's expm1)."""
    u = tl.exp(x)
    general = (u != 1.0) & (u - 1.0 != -1.0)
    safe = tl.where(general, u, 0.5)  # the other lanes' values are not used: no 0/0, no log(0)
    em1 = tl.where(u == 1.0, x, tl.where(general, (safe - 1.0) * x / tl.log(safe), -1.0))
    return -em1


@triton.jit
def _log_ndtr(z):
    """log Phi(z) in fp32: log(erfc(|z| / sqrt 2) / 2) as a log (no underflow), mirrored for z > 0."""
    u = tl.abs(z) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * u)
    p = -0.82215223 + t * 0.17087277
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    p = -1.26551223 + t * p
    lower = -0.6931471805599453 + tl.log(t) - u * u + p  # log Phi(-|z|)
    return tl.where(z > 0, _log1p_neg(tl.exp(lower)), lower)


@triton.jit
def _kl_var_term(d):
    """f(d) = d - 1 + exp(-d): its series for |d| < 0.5, else directly."""
    s = -2.7557319e-7 * d + 2.4801587e-5
    s = s * d - 1.9841270e-4
    s = s * d + 1.3888889e-3
    s = s * d - 8.3333333e-3
    s = s * d + 4.1666667e-2
    s = s * d - 1.6666667e-1
    s = s * d + 0.5
    return tl.where((d < 0.5) & (d > -0.5), d * d * s, (d - 1.0) + tl.exp(-d))


@triton.jit
def _element(tab_ptr, t, out, v, x0, xt, VAR: tl.constexpr, CLIP: tl.constexpr):
    """The term (nats) of each element and its derivatives in the mean and variance outputs."""
    base = tab_ptr + t * 8
    c1 = tl.load(base)
    c2 = tl.load(base + 1)
    lvq = tl.load(base + 2)
    lvp_fixed = tl.load(base + 3)
    span = tl.load(base + 4)
    a = tl.load(base + 5)
    b = tl.load(base + 6)
    dfix = tl.load(base + 7)
    raw = a * xt + b * out
    if CLIP:
        x0p = tl.minimum(tl.maximum(raw, -1.0), 1.0)
        mask = tl.where((raw >= -1.0) & (raw <= 1.0), 1.0, 0.0)
    else:
        x0p = raw
        mask = 1.0
    if VAR == 1:
        d = (v + 1.0) * (0.5 * span)
        lvp = lvq + d
        dv = 0.5 * span
    elif VAR == 2:
        lvp = tl.log(tl.maximum(v, 1e-20))
        d = lvp - lvq
        dv = tl.where(v > 1e-20, 1.0 / tl.maximum(v, 1e-20), 0.0)
    else:
        d = dfix + 0.0 * out
        lvp = lvp_fixed + 0.0 * out
        dv = 0.0 * out
    # KL (t > 0)
    diff = c1 * (x0 - x0p)
    e = tl.exp(-lvp)
    f = _kl_var_term(d)
    kl = 0.5 * (f + diff * diff * e)
    kl_m = -(diff * e) * c1 * b * mask
    kl_v = 0.5 * ((d - f) - diff * diff * e) * dv
    # decoder (t == 0): -log P(bin of x0) under N(mean, exp(lvp))
    m = c1 * x0p + c2 * xt
    inv_s = tl.exp(-0.5 * lvp)
    zb = (x0 - m + 1.0 / 255.0) * inv_s
    za = (x0 - m - 1.0 / 255.0) * inv_s
    flip = za > 0
    hi = tl.where(flip, -za, zb)
    lo = tl.where(flip, -zb, za)
    lh = _log_ndtr(hi)
    middle = lh + tl.log(_neg_expm1(tl.minimum(_log_ndtr(lo) - lh, 0.0)))
    first = x0 < -0.999
    last = x0 > 0.999
    logp = tl.where(first, _log_ndtr(zb), tl.where(last, _log_ndtr(-za), middle))
    rb = tl.where(last, 0.0, tl.exp(-0.5 * zb * zb - 0.9189385332046727 - logp))
    ra = tl.where(first, 0.0, tl.exp(-0.5 * za * za - 0.9189385332046727 - logp))
    dec_m = (rb - ra) * inv_s * c1 * b * mask
    dec_v = 0.5 * (rb * zb - ra * za) * dv
    decoder = t == 0
    return (
        tl.where(decoder, -logp, kl),
        tl.where(decoder, dec_m, kl_m),
        tl.where(decoder, dec_v, kl_v),
    )


@triton.jit
def _load_tile(mo_ptr, x0_ptr, xt_ptr, t_ptr, C, S, T, LAYOUTS: tl.constexpr, VAR: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile: (row, n, c, s, mask), its clamped timestep, model_output's channel count
    CM (2C with a variance channel) and the tile's fp32 out, v (= out without VAR), x0 and x_t."""
    row, n, c, s, mask = row_index(C, S, BLOCK)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + n), 0), T - 1)
    if VAR != 0:
        CM = 2 * C
    else:
        CM = C
    out = tl.load(mo_ptr + offset(n, c, s, CM, S, LAYOUTS & 1), mask=mask, other=0.0).to(tl.float32)
    if VAR != 0:
        v = tl.load(mo_ptr + offset(n, c + C, s, CM, S, LAYOUTS & 1), mask=mask, other=0.0).to(tl.float32)
    else:
        v = out
    x0 = tl.load(x0_ptr + offset(n, c, s, C, S, (LAYOUTS >> 1) & 1), mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + offset(n, c, s, C, S, (LAYOUTS >> 2) & 1), mask=mask, other=0.0).to(tl.float32)
    return row, n, c, s, mask, t, CM, out, v, x0, xt


@triton.jit
def vlb_terms_fwd_kernel(
    mo_ptr,
    x0_ptr,
    xt_ptr,
    t_ptr,
    tab_ptr,
    partial_ptr,
    C,
    S,
    T,
    TILES,
    LAYOUTS: tl.constexpr,
    VAR: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partial[row * TILES + tile] = the sum of the tile's terms (nats). LAYOUTS: bit i set where
    tensor i of (model_output, x0, x_t) is NHWC; model_output has 2C channels when VAR != 0."""
    row, n, c, s, mask, t, CM, out, v, x0, xt = _load_tile(mo_ptr, x0_ptr, xt_ptr, t_ptr, C, S, T, LAYOUTS, VAR, BLOCK)
    value, _, _ = _element(tab_ptr, t, out, v, x0, xt, VAR, CLIP)
    tl.store(partial_ptr + row * TILES + tl.program_id(1), tl.sum(tl.where(mask, value, 0.0), axis=0))


@triton.jit
def vlb_terms_bwd_kernel(
    mo_ptr,
    x0_ptr,
    xt_ptr,
    t_ptr,
    tab_ptr,
    scale_ptr,
    grad_ptr,
    C,
    S,
    T,
    LAYOUTS: tl.constexpr,
    VAR: tl.constexpr,
    CLIP: tl.constexpr,
    MEAN_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad (shaped like model_output) = scale[n] x the element's derivatives; the mean channels get
    0 where not MEAN_GRAD (the stop-gradient of the hybrid loss). LAYOUTS: bits of (model_output, x0,
    x_t, grad)."""
    row, n, c, s, mask, t, CM, out, v, x0, xt = _load_tile(mo_ptr, x0_ptr, xt_ptr, t_ptr, C, S, T, LAYOUTS, VAR, BLOCK)
    _, g_m, g_v = _element(tab_ptr, t, out, v, x0, xt, VAR, CLIP)
    scale = tl.load(scale_ptr + n)
    ty = grad_ptr.dtype.element_ty
    g_layout = (LAYOUTS >> 3) & 1
    if MEAN_GRAD:
        gm = g_m * scale
    else:
        gm = 0.0 * g_m
    tl.store(grad_ptr + offset(n, c, s, CM, S, g_layout), gm.to(ty), mask=mask)
    if VAR != 0:
        tl.store(grad_ptr + offset(n, c + C, s, CM, S, g_layout), (g_v * scale).to(ty), mask=mask)


def vlb_terms_fwd_triton(
    model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor, var: int,
    clip: bool,
) -> torch.Tensor:  # fmt: skip
    """(N, C * tiles) fp32 partial sums (nats) over (N, C, S) views; the op reduces them."""
    n, c, s = x0.shape
    block, num_warps = elementwise_config(s)
    tiles = cdiv(s, block)
    partial = torch.empty((n, c * tiles), dtype=torch.float32, device=x0.device)
    ops = Operands()
    mo, x0, x_t = ops.read(model_output), ops.read(x0), ops.read(x_t)
    launch(
        vlb_terms_fwd_kernel,
        (n * c, tiles),
        (mo, x0, x_t, t, table, partial),
        (c, s, table.shape[0], tiles),
        num_warps,
        LAYOUTS=ops.code,
        VAR=var,
        CLIP=clip,
        BLOCK=block,
    )
    return partial


def vlb_terms_bwd_triton(
    scale: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
    table: torch.Tensor, var: int, clip: bool, mean_grad: bool, grad: torch.Tensor,
) -> None:  # fmt: skip
    """Write grad (an (N, C or 2C, S) view shaped like model_output) in place; scale: (N,) fp32."""
    n, c, s = x0.shape
    block, num_warps = elementwise_config(s)
    ops = Operands()
    mo, x0, x_t, g = ops.read(model_output), ops.read(x0), ops.read(x_t), ops.write(grad)
    launch(
        vlb_terms_bwd_kernel,
        (n * c, cdiv(s, block)),
        (mo, x0, x_t, t, table, scale, g),
        (c, s, table.shape[0]),
        num_warps,
        LAYOUTS=ops.code,
        VAR=var,
        CLIP=clip,
        MEAN_GRAD=mean_grad,
        BLOCK=block,
    )
    ops.finish()
