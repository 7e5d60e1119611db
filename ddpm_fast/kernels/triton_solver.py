"""Triton solver_step: one planned linear solver step in one pass, the same arithmetic as
csrc/solver_step.h and solvers.base.apply_step. The step index is read from a device tensor (or
taken as an int), the step's coefficients from the plan's float64 tensors; R (history slots) and
W (writes) are constexprs, so each slot and row is unrolled. With PHASE1 it writes |D_0| only (the
first pass of dynamic thresholding). With HAS_GUIDE a guidance gradient g (one more input of the same pass)
moves, after the limit, the model output by shift = guide_coef[step] g and D_0 by to_d_out shift."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    NHWC,
    Operands,
    cdiv,
    elementwise_config,
    launch,
    layout_of,
    offset,
    quad_noise,
    row_index,
    tile_noise,
)

# Codes shared with csrc/solver_step.h (constexpr globals: the compiler reads them in kernels).
LIMIT_NONE, LIMIT_CLIP, LIMIT_DYNAMIC = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _coef(row_ptr, col):
    return tl.load(row_ptr + col).to(tl.float32)


@triton.jit
def _mix_row(row_ptr, x, out, d0, z, h0, h1, h2, h3, HAS_Z: tl.constexpr, R: tl.constexpr):
    """One row of the mix over [x, out, D_0, z, H_0..H_{R-1}], summed as apply_step sums it."""
    acc = _coef(row_ptr, 0) * x + _coef(row_ptr, 1) * out
    acc = acc + _coef(row_ptr, 2) * d0
    if HAS_Z:
        acc = acc + _coef(row_ptr, 3) * z
    if R > 0:
        hs = _coef(row_ptr, 4) * h0
        if R > 1:
            hs = hs + _coef(row_ptr, 5) * h1
        if R > 2:
            hs = hs + _coef(row_ptr, 6) * h2
        if R > 3:
            hs = hs + _coef(row_ptr, 7) * h3
        acc = acc + hs
    return acc


@triton.jit
def _slot_read(row_ptr, cols, col, W: tl.constexpr):
    """Whether a history column has a nonzero coefficient in some row of the step (else the slot
    is not read: its terms, 0 * H, drop out; csrc/solver_step.h)."""
    used = tl.load(row_ptr + col) != 0
    if W > 0:
        used = used | (tl.load(row_ptr + cols + col) != 0)
    if W > 1:
        used = used | (tl.load(row_ptr + 2 * cols + col) != 0)
    return used


@triton.jit
def _write(hist_ptr, slot_ptr, off, hist_slot, value, mask, R: tl.constexpr):
    """Store a write into its slot, unless it names the scratch slot R (clamped to [0, R])."""
    slot = tl.minimum(tl.maximum(tl.load(slot_ptr), 0), R)
    if slot < R:
        tl.store(hist_ptr + slot * hist_slot + off, value.to(hist_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "step"])
def solver_step_kernel(
    mo_ptr,
    x_ptr,
    noise_ptr,
    next_ptr,
    aux_ptr,
    hist_ptr,
    step_ptr,
    to_d_x_ptr,
    to_d_out_ptr,
    mix_ptr,
    slot_ptr,
    scale_ptr,
    seed_ptr,
    guide_ptr,
    guide_coef_ptr,
    N,
    C,
    S,
    hist_slot,
    step,
    num_steps,
    guidance_scale,
    clip_range,
    LAYOUTS: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    LIMIT: tl.constexpr,
    GUIDED: tl.constexpr,
    HAS_VAR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    DRAW_NOISE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    PHASE1: tl.constexpr,
    QUAD_NOISE: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(N, C, S) views; model_output (N or 2N with GUIDED, C or 2C with HAS_VAR, S); history
    (R + 1, N, C, S), slot r at hist_ptr + r * hist_slot. aux_ptr: |D_0| (PHASE1); guide_ptr: g and
    guide_coef_ptr: the plan's (S,) float64 coefficients (HAS_GUIDE). LAYOUTS: bit i set where
    tensor i of (model_output, x, noise, x_next, aux, history slots, guide) is NHWC."""
    row, n, c, s, mask = row_index(C, S, BLOCK)
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr)
    step = tl.minimum(tl.maximum(step, 0), num_steps - 1).to(tl.int64)

    mo_c = C * 2 if HAS_VAR else C
    mo_nhwc: tl.constexpr = LAYOUTS & 1
    out = tl.load(mo_ptr + offset(n, c, s, mo_c, S, mo_nhwc), mask=mask).to(tl.float32)
    if GUIDED:
        cond = tl.load(mo_ptr + offset(n + N, c, s, mo_c, S, mo_nhwc), mask=mask).to(tl.float32)
        out = out + guidance_scale * (cond - out)
    x = tl.load(x_ptr + offset(n, c, s, C, S, (LAYOUTS >> 1) & 1), mask=mask).to(tl.float32)
    d0 = tl.load(to_d_x_ptr + step).to(tl.float32) * x + tl.load(to_d_out_ptr + step).to(tl.float32) * out

    if PHASE1:
        tl.store(aux_ptr + offset(n, c, s, C, S, (LAYOUTS >> 4) & 1), tl.abs(d0), mask=mask)
    else:
        if LIMIT == LIMIT_CLIP:
            d0 = tl.minimum(tl.maximum(d0, -clip_range), clip_range)
        elif LIMIT == LIMIT_DYNAMIC:
            thresh = tl.load(scale_ptr + n)
            d0 = tl.div_rn(tl.minimum(tl.maximum(d0, -thresh), thresh), thresh)
        if HAS_GUIDE:  # after the limit (solvers.base.apply_step)
            g = tl.load(guide_ptr + offset(n, c, s, C, S, (LAYOUTS >> 6) & 1), mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(guide_coef_ptr + step).to(tl.float32) * g
            out = out + shift
            d0 = d0 + tl.load(to_d_out_ptr + step).to(tl.float32) * shift

        out_ty = next_ptr.dtype.element_ty
        if HAS_NOISE:
            z = tl.load(noise_ptr + offset(n, c, s, C, S, (LAYOUTS >> 2) & 1), mask=mask, other=0.0).to(tl.float32)
        elif DRAW_NOISE:
            seed = tl.load(seed_ptr)
            z = tile_noise(seed, row, S, s, BLOCK, QUAD_NOISE).to(out_ty).to(tl.float32)  # as if stored, then read
        else:
            z = 0.0

        # every history value is read before any write; slot r at h_off + r hist_slot (int64 sums);
        # a slot without a nonzero coefficient this step is not read (masked off)
        cols: tl.constexpr = 4 + R
        rows = mix_ptr + step * ((1 + W) * cols)
        h_off = offset(n, c, s, C, S, (LAYOUTS >> 5) & 1)
        h0, h1, h2, h3 = 0.0, 0.0, 0.0, 0.0
        if R > 0:
            m0 = tl.where(_slot_read(rows, cols, 4, W), mask, False)
            h0 = tl.load(hist_ptr + h_off, mask=m0, other=0.0).to(tl.float32)
        if R > 1:
            m1 = tl.where(_slot_read(rows, cols, 5, W), mask, False)
            h1 = tl.load(hist_ptr + (h_off + hist_slot), mask=m1, other=0.0).to(tl.float32)
        if R > 2:
            m2 = tl.where(_slot_read(rows, cols, 6, W), mask, False)
            h2 = tl.load(hist_ptr + (h_off + hist_slot + hist_slot), mask=m2, other=0.0).to(tl.float32)
        if R > 3:
            m3 = tl.where(_slot_read(rows, cols, 7, W), mask, False)
            h3 = tl.load(hist_ptr + (h_off + hist_slot + hist_slot + hist_slot), mask=m3, other=0.0).to(tl.float32)

        has_z: tl.constexpr = HAS_NOISE or DRAW_NOISE
        x_next = _mix_row(rows, x, out, d0, z, h0, h1, h2, h3, has_z, R)
        if W > 0:
            w0 = _mix_row(rows + cols, x, out, d0, z, h0, h1, h2, h3, has_z, R)
        if W > 1:
            w1 = _mix_row(rows + 2 * cols, x, out, d0, z, h0, h1, h2, h3, has_z, R)
        tl.store(next_ptr + offset(n, c, s, C, S, (LAYOUTS >> 3) & 1), x_next.to(out_ty), mask=mask)
        if W > 0:
            _write(hist_ptr, slot_ptr + step * W, h_off, hist_slot, w0, mask, R)
        if W > 1:
            _write(hist_ptr, slot_ptr + step * W + 1, h_off, hist_slot, w1, mask, R)


def solver_step_triton(
    model_output: torch.Tensor,
    x: torch.Tensor,
    history: torch.Tensor,
    step_t: torch.Tensor | None,
    step: int,
    to_d_x: torch.Tensor,
    to_d_out: torch.Tensor,
    mix: torch.Tensor,
    write_slot: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    thresh_scale: torch.Tensor | None,
    x_next: torch.Tensor,
    abs_d0: torch.Tensor | None,
    guidance_scale: float,
    clip_range: float,
    limit: int,
    guidance: bool,
    guide: torch.Tensor | None = None,
    guide_coef: torch.Tensor | None = None,
) -> None:
    """Same arguments as torch.ops.ddpm_fast_C.solver_step, on (N, C, S) views and an (R + 1, N,
    C, S) history whose slots are NCHW or NHWC (ops.solver_step arranges that). NCHW and NHWC views
    are read and written where they are; other layouts go through copies (launch.Operands)."""
    n, c, s = x.shape
    if x.dtype == torch.float64:
        raise TypeError("the triton solver_step does not take float64: use backend='cpp' or 'reference'")
    if (guide is None) != (guide_coef is None):
        raise ValueError("a guide needs its plan's guide_coef")
    if limit == LIMIT_DYNAMIC.value and thresh_scale is None and abs_d0 is None:
        raise ValueError("dynamic thresholding needs the per-sample scale (phase 2) or the abs_d0 buffer (phase 1)")
    slots, writes = mix.shape[2] - 4, mix.shape[1] - 1
    hist_layout = layout_of(history[0])
    if hist_layout is None:
        raise ValueError("the history's slots must be NCHW or NHWC (N, C, S) views")
    block, num_warps = elementwise_config(s)
    ops = Operands()
    mo, xv, z = ops.read(model_output), ops.read(x), ops.read(noise)
    out = ops.write(x_next)
    aux = ops.write(abs_d0)
    ops.read(None)  # bit 5: the history's slots, set below
    g = ops.read(guide)
    code = ops.code | (32 if hist_layout == NHWC else 0)
    launch(
        solver_step_kernel,
        (n * c, cdiv(s, block)),
        (
            mo,
            xv,
            z if z is not None else out,  # a valid pointer for the arguments a specialisation never reads
            out,
            aux if aux is not None else out,
            history,
            step_t if step_t is not None else to_d_x,
            to_d_x,
            to_d_out,
            mix,
            write_slot if writes else to_d_x,  # (S, 0) when W = 0: never read
            thresh_scale if thresh_scale is not None else to_d_x,
            seed if seed is not None else to_d_x,
            g if g is not None else xv,
            guide_coef if guide is not None else to_d_x,
        ),
        (n, c, s, history.stride(0), step, mix.shape[0], float(guidance_scale), float(clip_range)),
        num_warps,
        LAYOUTS=code,
        R=slots,
        W=writes,
        LIMIT=limit,
        GUIDED=guidance,
        HAS_VAR=model_output.shape[1] == 2 * c,
        HAS_NOISE=noise is not None,
        DRAW_NOISE=noise is None and seed is not None,
        STEP_ON_DEVICE=step_t is not None,
        PHASE1=abs_d0 is not None,
        QUAD_NOISE=noise is None and seed is not None and quad_noise(s),
        HAS_GUIDE=guide is not None,
        BLOCK=block,
    )
    ops.finish()
