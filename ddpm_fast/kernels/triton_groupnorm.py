"""Triton GroupNorm + SiLU, forward and backward, with the time embedding folded in (the same
arithmetic as csrc/group_norm_silu_cpu.cpp and reference.group_norm_silu):

    h = x + bias_nc;  n = (h - mean) rstd w + b;  n = n (1 + scale_nc) + shift_nc;  y = SiLU(n) + residual

A program covers one (sample n, group g) of the (N, C, S) view as [BLOCK_C, BLOCK_S] tiles (the
group's C/G channels by BLOCK_S positions), strided so that NCHW and channels_last are read in
place. Statistics are fp32 whatever the input dtype: per tile a two-pass mean and sum of squared
deviations, tiles merged with Chan et al.'s pairwise update (no E[x^2] - E[x]^2).

Which path runs (groupnorm_config, a pure function of shape and SM count):
- one program per (n, g) when N * G >= 2 x the SM count, or when the group's positions fit one
  split anyway: the forward is one kernel (statistics loop, then the normalise loop; a group that
  fits one tile is loaded once), the backward too (per-channel sums loop, then the dx loop);
- split over S when N * G is smaller (batch 1 at low resolution): grid (N * G, splits). Forward:
  gn_fwd_stats_kernel writes per-(n, g, split) partial (mean, M2); gn_fwd_kernel merges the
  group's partials (the tiny reduce, in its prologue) and normalises its own slice. Backward:
  gn_bwd_partials_kernel writes per-(n, c, split) partial sums; gn_bwd_kernel merges them and
  writes dx for its slice. No float atomics: every sum has a fixed order (deterministic).
The backward writes per-(n, c) sums of g = dL/dn and g x_hat (and of dx for d bias_nc), from which
ops/groupnorm_silu.py forms dweight, dbias, dscale and dshift.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2

# Elements of one [BLOCK_C, BLOCK_S] tile held by a program (16 fp32 values a thread at 8 warps).
MAX_TILE = 4096
# Positions per split at least (smaller slices cost more in prologue than they win in parallelism).
MIN_SPLIT_BLOCK_S = 16
# SM count assumed where no CUDA device is asked (the interpreter, the AOT check): H100 SXM.
DEFAULT_SMS = 132


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    block_c: int  # channels of a group, padded to a power of two
    block_s: int  # positions per tile
    splits: int  # programs per (n, g); 1 = the one-program path
    s_per_split: int  # positions per split (a multiple of block_s), S when splits == 1
    num_warps: int

    @property
    def one_tile(self) -> bool:
        """The whole group in one tile (loaded once)."""
        return self.splits == 1 and self.s_per_split <= self.block_s


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


def groupnorm_config(n: int, c: int, groups: int, s: int, sms: int) -> GroupNormConfig:
    """Tile shape and split count for an (n, c, s) view: split the positions when N * G < 2 x SMs."""
    block_c = next_power_of_2(c // groups)
    block_s = min(next_power_of_2(max(s, 1)), max(1, MAX_TILE // block_c))
    s_per_split = max(s, 1)
    if n * groups < 2 * sms:
        want = cdiv(2 * sms, n * groups)
        block_s = min(block_s, max(MIN_SPLIT_BLOCK_S, next_power_of_2(cdiv(s, want))))
        s_per_split = cdiv(cdiv(s, want), block_s) * block_s
    splits = cdiv(s, s_per_split)
    if splits == 1:
        s_per_split = max(s, 1)
    num_warps = max(1, min(8, block_c * block_s // 512))
    return GroupNormConfig(block_c, block_s, splits, s_per_split, num_warps)


# ---------------------------------------------------------------- shared pieces
@triton.jit
def _group(G, CPG: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n, group index, its channels c, channel mask) of program (n * G + g, split)."""
    ng = tl.program_id(0)
    n = (ng // G).to(tl.int64)
    cl = tl.arange(0, BLOCK_C)
    c = ((ng % G) * CPG + cl).to(tl.int64)
    return ng, n, c, cl < CPG


@triton.jit
def _load_nc(ptr, n, c, cmask, C, fill, HAS: tl.constexpr):
    """ptr[n * C + c] in fp32 (n = 0: a per-channel (C,) value; else a per-(n, c) one), or ``fill``."""
    if HAS:
        out = tl.load(ptr + n * C + c, mask=cmask, other=fill).to(tl.float32)
    else:
        out = tl.zeros(c.shape, tl.float32) + fill
    return out


@triton.jit
def _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cmask, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT):
    """n = x_hat * wa + ba per channel: wa = w (1 + scale), ba = b (1 + scale) + shift."""
    w = _load_nc(w_ptr, 0, c, cmask, C, 1.0, HAS_W)
    b = _load_nc(b_ptr, 0, c, cmask, C, 0.0, HAS_B)
    s1 = 1.0 + _load_nc(sc_ptr, n, c, cmask, C, 0.0, HAS_SCALE)
    sh = _load_nc(sh_ptr, n, c, cmask, C, 0.0, HAS_SHIFT)
    return w * s1, b * s1 + sh


@triton.jit
def _offsets(n, c, s, sn, sc, ss):
    """int64 element offsets of a [channels, positions] tile (a sample may pass 2^31 elements)."""
    return n * sn + c[:, None] * sc + s[None, :].to(tl.int64) * ss


@triton.jit
def _load_tile(ptr, n, c, s, mask, sn, sc, ss):
    return tl.load(ptr + _offsets(n, c, s, sn, sc, ss), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_moments(h, mask):
    """(count, mean, M2) of the masked tile, two-pass."""
    cnt = tl.sum(mask.to(tl.float32))
    mean = tl.div_rn(tl.sum(tl.where(mask, h, 0.0)), tl.maximum(cnt, 1.0))
    d = tl.where(mask, h - mean, 0.0)
    return cnt, mean, tl.sum(d * d)


@triton.jit
def _merge(cnt, mean, m2, cnt_b, mean_b, m2_b):
    """Chan et al.'s update of (count, mean, M2) with another part's."""
    tot = cnt + cnt_b
    frac = tl.div_rn(cnt_b, tl.maximum(tot, 1.0))
    delta = mean_b - mean
    return tot, mean + delta * frac, m2 + m2_b + delta * delta * cnt * frac


@triton.jit
def _slice_moments(x_ptr, bnc, n, c, cmask, s_begin, s_end, x_sn, x_sc, x_ss, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of h = x + bias_nc over positions [s_begin, s_end) of the group."""
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(s_begin, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        h = _load_tile(x_ptr, n, c, s, mask, x_sn, x_sc, x_ss) + bnc[:, None]
        cnt_b, mean_b, m2_b = _tile_moments(h, mask)
        cnt, mean, m2 = _merge(cnt, mean, m2, cnt_b, mean_b, m2_b)
    return cnt, mean, m2


@triton.jit
def _activate(z, SILU: tl.constexpr):
    if SILU:
        z = z * tl.sigmoid(z)
    return z


# ---------------------------------------------------------------- forward
@triton.jit
def gn_fwd_stats_kernel(
    x_ptr,
    bnc_ptr,
    part_ptr,
    C,
    S,
    G,
    s_per_split,
    splits,
    x_sn,
    x_sc,
    x_ss,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_BNC: tl.constexpr,
):
    """Split path, pass 1: partial (mean, M2) of h over this program's slice of positions."""
    ng, n, c, cmask = _group(G, CPG, BLOCK_C)
    split = tl.program_id(1)
    s_begin = split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    bnc = _load_nc(bnc_ptr, n, c, cmask, C, 0.0, HAS_BNC)
    _, mean, m2 = _slice_moments(x_ptr, bnc, n, c, cmask, s_begin, s_end, x_sn, x_sc, x_ss, BLOCK_S)
    out = part_ptr + (ng.to(tl.int64) * splits + split) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def gn_fwd_kernel(
    x_ptr,
    y_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    bnc_ptr,
    sc_ptr,
    sh_ptr,
    mean_ptr,
    rstd_ptr,
    part_ptr,
    C,
    S,
    G,
    s_per_split,
    splits,
    eps,
    x_sn,
    x_sc,
    x_ss,
    y_sn,
    y_sc,
    y_ss,
    r_sn,
    r_sc,
    r_ss,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_BNC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU: tl.constexpr,
):
    """Statistics of the group (merged from the split partials, or computed here), then
    y = act((h - mean) rstd wa + ba) (+ residual) over this program's slice."""
    ng, n, c, cmask = _group(G, CPG, BLOCK_C)
    split = tl.program_id(1)
    s_begin = split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    bnc = _load_nc(bnc_ptr, n, c, cmask, C, 0.0, HAS_BNC)
    if SPLIT:  # the tiny reduce: merge the group's per-split partials in a fixed order
        i = tl.arange(0, SPLITS_P2)
        pmask = i < splits
        part = part_ptr + (ng.to(tl.int64) * splits + i) * 2
        p_mean = tl.load(part, mask=pmask, other=0.0)
        p_m2 = tl.load(part + 1, mask=pmask, other=0.0)
        p_cnt = tl.where(pmask, (tl.minimum(S, (i + 1) * s_per_split) - i * s_per_split) * CPG, 0).to(tl.float32)
        cnt = tl.sum(p_cnt)
        mean = tl.div_rn(tl.sum(p_cnt * p_mean), cnt)
        dev = p_mean - mean
        m2 = tl.sum(p_m2 + p_cnt * dev * dev)
    elif ONE_TILE:
        s = tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        h = _load_tile(x_ptr, n, c, s, mask, x_sn, x_sc, x_ss) + bnc[:, None]
        cnt, mean, m2 = _tile_moments(h, mask)
    else:
        cnt, mean, m2 = _slice_moments(x_ptr, bnc, n, c, cmask, 0, S, x_sn, x_sc, x_ss, BLOCK_S)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(m2, cnt) + eps))
    if split == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    wa, ba = _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cmask, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    wa = wa * rstd
    if ONE_TILE:
        out = _activate(tl.where(mask, h - mean, 0.0) * wa[:, None] + ba[:, None], SILU)
        if HAS_RES:
            out += _load_tile(res_ptr, n, c, s, mask, r_sn, r_sc, r_ss)
        y_off = _offsets(n, c, s, y_sn, y_sc, y_ss)
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(s_begin, s_end, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            h = _load_tile(x_ptr, n, c, s, mask, x_sn, x_sc, x_ss) + bnc[:, None]
            out = _activate(tl.where(mask, h - mean, 0.0) * wa[:, None] + ba[:, None], SILU)
            if HAS_RES:
                out += _load_tile(res_ptr, n, c, s, mask, r_sn, r_sc, r_ss)
            y_off = _offsets(n, c, s, y_sn, y_sc, y_ss)
            tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward
@triton.jit
def _grad_tile(
    x_ptr, dy_ptr, n, c, s, mask, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss, SILU: tl.constexpr
):
    """(x_hat, g = dL/dn) on a tile, zero where masked."""
    h = _load_tile(x_ptr, n, c, s, mask, x_sn, x_sc, x_ss) + bnc[:, None]
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    g = _load_tile(dy_ptr, n, c, s, mask, d_sn, d_sc, d_ss)
    if SILU:
        z = xhat * wa[:, None] + ba[:, None]
        sig = tl.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    return xhat, tl.where(mask, g, 0.0)


@triton.jit
def _slice_grad_sums(
    x_ptr, dy_ptr, n, c, cmask, s_begin, s_end, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """Per-channel sums of g and g x_hat over positions [s_begin, s_end)."""
    sum_g = tl.zeros((BLOCK_C,), tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(s_begin, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        xhat, g = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss, SILU
        )
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
    return sum_g, sum_gx


@triton.jit
def gn_bwd_partials_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    bnc_ptr,
    sc_ptr,
    sh_ptr,
    mean_ptr,
    rstd_ptr,
    pg_ptr,
    pgx_ptr,
    C,
    S,
    G,
    s_per_split,
    splits,
    x_sn,
    x_sc,
    x_ss,
    d_sn,
    d_sc,
    d_ss,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_BNC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
):
    """Split path, pass 1: per-(n, c, split) partial sums of g and g x_hat."""
    ng, n, c, cmask = _group(G, CPG, BLOCK_C)
    split = tl.program_id(1)
    s_begin = split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    bnc = _load_nc(bnc_ptr, n, c, cmask, C, 0.0, HAS_BNC)
    wa, ba = _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cmask, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    sum_g, sum_gx = _slice_grad_sums(
        x_ptr, dy_ptr, n, c, cmask, s_begin, s_end, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss,
        BLOCK_C, BLOCK_S, SILU,
    )  # fmt: skip
    out = (n * C + c) * splits + split
    tl.store(pg_ptr + out, sum_g, mask=cmask)
    tl.store(pgx_ptr + out, sum_gx, mask=cmask)


@triton.jit
def gn_bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    bnc_ptr,
    sc_ptr,
    sh_ptr,
    mean_ptr,
    rstd_ptr,
    pg_ptr,
    pgx_ptr,
    pdb_ptr,
    C,
    S,
    G,
    s_per_split,
    splits,
    inv_m,
    x_sn,
    x_sc,
    x_ss,
    d_sn,
    d_sc,
    d_ss,
    o_sn,
    o_sc,
    o_ss,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_BNC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
):
    """dx = rstd (wa g - mean_group(wa g) - x_hat mean_group(wa g x_hat)) over this program's
    slice, with the per-channel sums merged from the split partials or computed here (and then
    stored: splits == 1), and per-(n, c, split) sums of dx for d bias_nc."""
    ng, n, c, cmask = _group(G, CPG, BLOCK_C)
    split = tl.program_id(1)
    s_begin = split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    bnc = _load_nc(bnc_ptr, n, c, cmask, C, 0.0, HAS_BNC)
    wa, ba = _affine(w_ptr, b_ptr, sc_ptr, sh_ptr, n, c, cmask, C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    if SPLIT:
        i = tl.arange(0, SPLITS_P2)
        pmask = cmask[:, None] & (i < splits)[None, :]
        part = (n * C + c)[:, None] * splits + i[None, :]
        sum_g = tl.sum(tl.load(pg_ptr + part, mask=pmask, other=0.0), axis=1)
        sum_gx = tl.sum(tl.load(pgx_ptr + part, mask=pmask, other=0.0), axis=1)
    elif ONE_TILE:
        s = tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        xhat, g = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss, SILU
        )
        sum_g = tl.sum(g, axis=1)
        sum_gx = tl.sum(g * xhat, axis=1)
    else:
        sum_g, sum_gx = _slice_grad_sums(
            x_ptr, dy_ptr, n, c, cmask, 0, S, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss,
            BLOCK_C, BLOCK_S, SILU,
        )  # fmt: skip
    if not SPLIT:
        tl.store(pg_ptr + n * C + c, sum_g, mask=cmask)
        tl.store(pgx_ptr + n * C + c, sum_gx, mask=cmask)
    m1 = tl.sum(wa * sum_g) * inv_m
    m2 = tl.sum(wa * sum_gx) * inv_m
    if ONE_TILE:
        dx = tl.where(mask, rstd * (wa[:, None] * g - m1 - xhat * m2), 0.0)
        dx_off = _offsets(n, c, s, o_sn, o_sc, o_ss)
        tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        sum_dx = tl.sum(dx, axis=1)
    else:
        sum_dx = tl.zeros((BLOCK_C,), tl.float32)
        for start in range(s_begin, s_end, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_end)[None, :]
            xhat, g = _grad_tile(
                x_ptr, dy_ptr, n, c, s, mask, bnc, mean, rstd, wa, ba, x_sn, x_sc, x_ss, d_sn, d_sc, d_ss, SILU
            )
            dx = tl.where(mask, rstd * (wa[:, None] * g - m1 - xhat * m2), 0.0)
            dx_off = _offsets(n, c, s, o_sn, o_sc, o_ss)
            tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            sum_dx += tl.sum(dx, axis=1)
    if HAS_BNC:
        tl.store(pdb_ptr + (n * C + c) * splits + split, sum_dx, mask=cmask)


# ---------------------------------------------------------------- launchers
def _flags(weight, bias, bias_nc, scale_nc, shift_nc) -> dict:
    return dict(
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_BNC=bias_nc is not None,
        HAS_SCALE=scale_nc is not None,
        HAS_SHIFT=shift_nc is not None,
    )


def _check(x: torch.Tensor, num_groups: int) -> None:
    if x.dtype == torch.float64:
        raise TypeError("the triton backend does not take float64: use backend='cpp' or 'reference'")
    if x.dim() != 3 or x.shape[1] % num_groups:
        raise ValueError(f"expected an (N, C, S) view with C divisible by {num_groups}, got {tuple(x.shape)}")


def group_norm_silu_fwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_nc: torch.Tensor | None,
    scale_nc: torch.Tensor | None,
    shift_nc: torch.Tensor | None,
    residual: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    y: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    sms: int | None = None,
) -> None:
    """Same arguments as torch.ops.ddpm_fast_C.group_norm_silu_fwd: (N, C, S) views x, residual
    and y; weight, bias (C,) and bias_nc, scale_nc, shift_nc (N, C) contiguous; mean and rstd
    (N, G) fp32 contiguous outputs. ``sms`` overrides the SM count of the split decision."""
    _check(x, num_groups)
    n, c, s = x.shape
    cfg = groupnorm_config(n, c, num_groups, s, num_sms(x.device) if sms is None else sms)
    dummy = mean  # a valid pointer for the arguments a specialisation never reads
    ptrs = [t if t is not None else dummy for t in (weight, bias, bias_nc, scale_nc, shift_nc)]
    res = residual if residual is not None else y
    common = dict(CPG=c // num_groups, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s)
    split = cfg.splits > 1
    part = torch.empty((n * num_groups, cfg.splits, 2), dtype=torch.float32, device=x.device) if split else dummy
    grid = (n * num_groups, cfg.splits)
    if split:
        launch(
            gn_fwd_stats_kernel,
            grid,
            (x, ptrs[2], part),
            (c, s, num_groups, cfg.s_per_split, cfg.splits, *x.stride()),
            cfg.num_warps,
            **common,
            HAS_BNC=bias_nc is not None,
        )
    launch(
        gn_fwd_kernel,
        grid,
        (x, y, res, *ptrs, mean, rstd, part),
        (c, s, num_groups, cfg.s_per_split, cfg.splits, float(eps), *x.stride(), *y.stride(), *res.stride()),
        cfg.num_warps,
        **common,
        SPLIT=split,
        SPLITS_P2=next_power_of_2(cfg.splits),
        ONE_TILE=cfg.one_tile,
        **_flags(weight, bias, bias_nc, scale_nc, shift_nc),
        HAS_RES=residual is not None,
        SILU=bool(silu),
    )


def group_norm_silu_bwd_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_nc: torch.Tensor | None,
    scale_nc: torch.Tensor | None,
    shift_nc: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
    grad_x: torch.Tensor,
    sum_g: torch.Tensor,
    sum_g_xhat: torch.Tensor,
    grad_bias_nc: torch.Tensor | None,
    sms: int | None = None,
) -> None:
    """Same arguments as torch.ops.ddpm_fast_C.group_norm_silu_bwd: writes grad_x and the
    per-(n, c) sums of g, g x_hat and (when grad_bias_nc is given) dx, each (N, C) fp32."""
    _check(x, num_groups)
    n, c, s = x.shape
    cfg = groupnorm_config(n, c, num_groups, s, num_sms(x.device) if sms is None else sms)
    split = cfg.splits > 1
    dummy = mean
    ptrs = [t if t is not None else dummy for t in (weight, bias, bias_nc, scale_nc, shift_nc)]
    flags = _flags(weight, bias, bias_nc, scale_nc, shift_nc)
    common = dict(CPG=c // num_groups, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s)
    grid = (n * num_groups, cfg.splits)
    if split:
        pg = torch.empty((n, c, cfg.splits), dtype=torch.float32, device=x.device)
        pgx = torch.empty_like(pg)
        launch(
            gn_bwd_partials_kernel,
            grid,
            (x, grad_y, *ptrs, mean, rstd, pg, pgx),
            (c, s, num_groups, cfg.s_per_split, cfg.splits, *x.stride(), *grad_y.stride()),
            cfg.num_warps,
            **common,
            **flags,
            SILU=bool(silu),
        )
    else:
        pg, pgx = sum_g, sum_g_xhat
    pdb = None
    if grad_bias_nc is not None:
        pdb = torch.empty((n, c, cfg.splits), dtype=torch.float32, device=x.device) if split else grad_bias_nc
    launch(
        gn_bwd_kernel,
        grid,
        (x, grad_y, grad_x, *ptrs, mean, rstd, pg, pgx, pdb if pdb is not None else dummy),
        (c, s, num_groups, cfg.s_per_split, cfg.splits, 1.0 / (c // num_groups * s))
        + (*x.stride(), *grad_y.stride(), *grad_x.stride()),
        cfg.num_warps,
        **common,
        SPLIT=split,
        SPLITS_P2=next_power_of_2(cfg.splits),
        ONE_TILE=cfg.one_tile,
        **flags,
        SILU=bool(silu),
    )
    if split:  # the per-split partials, summed in a fixed order
        torch.sum(pg, dim=2, out=sum_g)
        torch.sum(pgx, dim=2, out=sum_g_xhat)
        if grad_bias_nc is not None:
            torch.sum(pdb, dim=2, out=grad_bias_nc)
