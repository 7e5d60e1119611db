"""solver_step: one planned linear solver step (DPM-Solver++, UniPC, Euler, Heun, ...) in one pass
over memory: guidance combine -> D_0 = limit(p x + q out) -> x_next and the history writes, each a
row of the plan's mix over [x, out, D_0, z, H_0..H_{R-1}] (``solvers/base.py``: ``apply_step`` is
the reference). The step's coefficients are read by the kernel from the plan's device tensors at
the step index, which may itself be a device tensor: a replayed CUDA graph steps through the plan
and nothing is read on the host. Dynamic thresholding adds a first pass (|D_0|) and a per-sample
quantile, as posterior_step does it. A guidance gradient g (``guide=``) is one more input of the same
pass: after the limit, out + shift and D_0 + to_d_out shift with shift = guide_coef[step] g
(``solvers.base.apply_step``, ``with_guidance``)."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from .. import reference
from .._backends import choose, load_extension
from ..solvers.base import SolverPlan, apply_step
from ._common import (
    check_float,
    direct_call_ok,
    kernel_view,
    kernel_views,
    new_like,
    noise_arg,
    value_checks_enabled,
)
from .posterior import quantile_scale

# The kernels' limits (csrc/solver_step.h SolverLimit) and sizes.
LIMITS = {None: 0, "clip": 1, "dynamic": 2}
LIMIT_NONE, LIMIT_CLIP, LIMIT_DYNAMIC = 0, 1, 2
MAX_SLOTS = 4  # R: history slots a step reads
MAX_WRITES = 2  # W: history writes per step


def _history_arg(history: torch.Tensor, backend: str) -> tuple[torch.Tensor, bool]:
    """(the history as the backend's kernels take it, whether it must be copied back afterwards).
    The C++/CUDA kernels take (R + 1, N, C, ...) with slots whose dims after the second merge; the
    Triton one an (R + 1, N, C, S) view whose slots are NCHW or NHWC. Others go through a copy."""
    if backend == "triton":
        from ..kernels.launch import layout_of

        r1, n, c = history.shape[:3]
        try:
            hist = history.view(r1, n, c, -1) if n * c else history.reshape(r1, n, c, -1)
        except RuntimeError:
            hist = None
        if hist is not None and layout_of(hist[0]) is not None:
            return hist, False
        return history.reshape(r1, n, c, -1).contiguous(), True
    if history.is_contiguous():
        return history, False
    slot = history[0]
    if kernel_view(slot) is slot:
        return history, False
    return history.contiguous(), True


def _solver_step_impl(
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
    limit: int,
    clip_range: float,
    ratio: float,
    max_value: float,
    guidance_scale: float | None,
    backend: str,
    guide: torch.Tensor | None = None,
    guide_coef: torch.Tensor | None = None,
) -> torch.Tensor:
    if backend == "triton":
        from ..kernels.triton_solver import solver_step_triton as launch
    else:  # cpp and cuda: the _C op, routed by device
        load_extension()
        launch = torch.ops.ddpm_fast_C.solver_step
    in_view, out_view = kernel_views(backend)
    mo3, x3 = in_view(model_output), in_view(x)
    z3 = in_view(noise) if noise is not None else None
    g3 = in_view(guide) if guide is not None else None
    hist, copy_back = _history_arg(history, backend)
    guided = guidance_scale is not None
    g = 1.0 if guidance_scale is None else guidance_scale
    x_next = new_like(x)
    out3 = out_view(x_next)
    plan_args = (step_t, step, to_d_x, to_d_out, mix, write_slot)
    scale = None
    if limit == LIMIT_DYNAMIC:  # phase 1: |D_0| per element, then the per-sample quantile
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        abs_d0 = torch.empty(x3.shape, dtype=stat_dtype, device=x.device)
        launch(mo3, x3, hist, *plan_args, None, None, None, out3, abs_d0, g, clip_range, limit, guided, g3, guide_coef)
        scale = quantile_scale(abs_d0, ratio, max_value).to(stat_dtype)
    launch(mo3, x3, hist, *plan_args, z3, seed, scale, out3, None, g, clip_range, limit, guided, g3, guide_coef)
    if copy_back:
        history.copy_(hist.view(history.shape))
    return x_next


_solver_step_op = torch.library.custom_op("ddpm_fast::solver_step", mutates_args=("history",))(_solver_step_impl)


@_solver_step_op.register_fake
def _(
    model_output,
    x,
    history,
    step_t,
    step,
    to_d_x,
    to_d_out,
    mix,
    write_slot,
    noise,
    seed,
    limit,
    clip_range,
    ratio,
    max_value,
    guidance_scale,
    backend,
    guide=None,
    guide_coef=None,
):
    return torch.empty_like(x)


@dataclasses.dataclass(frozen=True)
class _PlanArgs:
    """What the kernels take from a plan, worked out once per plan (a frozen dataclass)."""

    slots: int
    writes: int
    steps: int
    device: torch.device
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # to_d_x, to_d_out, mix, write_slot
    limit: tuple[int, float, float, float]  # code, clip_range, ratio, max_value
    learned_variance: bool
    langevin: tuple[float, ...] | None
    guide_coef: torch.Tensor | None


_PLAN_ARGS: weakref.WeakKeyDictionary[SolverPlan, _PlanArgs] = weakref.WeakKeyDictionary()


def _plan_args(plan: SolverPlan) -> _PlanArgs:
    if not isinstance(plan, SolverPlan):
        raise TypeError(f"plan must be a SolverPlan, got {type(plan).__name__}")
    args = _PLAN_ARGS.get(plan)
    if args is not None:
        return args
    slots, writes = plan.history_slots, plan.num_writes
    if slots > MAX_SLOTS or writes > MAX_WRITES:
        raise ValueError(
            f"solver_step takes at most {MAX_SLOTS} history slots and {MAX_WRITES} writes; this plan has "
            f"{slots} and {writes} (step it with solvers.apply_step)"
        )
    limit = plan.x0_limit
    args = _PlanArgs(
        slots=slots,
        writes=writes,
        steps=plan.num_steps,
        device=plan.device,
        tensors=tuple(t.contiguous() for t in (plan.to_d_x, plan.to_d_out, plan.mix, plan.write_slot)),
        limit=(LIMIT_NONE, 1.0, 1.0, 1.0)
        if limit is None
        else (LIMITS[limit.kind], float(limit.clip_range), float(limit.ratio), float(limit.max_value)),
        learned_variance=plan.learned_variance,
        langevin=plan.langevin_snr,
        guide_coef=None if plan.guide_coef is None else plan.guide_coef.contiguous(),
    )
    _PLAN_ARGS[plan] = args
    return args


def _check_model_output(plan: _PlanArgs, model_output: torch.Tensor, x: torch.Tensor, guided: bool) -> None:
    mo_shape, x_shape = model_output.shape, x.shape
    if model_output.device != x.device:
        raise ValueError(f"model_output is on {model_output.device}, x on {x.device}")
    if mo_shape == x_shape and not guided:  # the common case, every step of a loop
        return
    n, c = x_shape[0], x_shape[1]
    if mo_shape[2:] != x_shape[2:]:
        raise ValueError(f"model_output shape {tuple(mo_shape)} does not fit x shape {tuple(x_shape)}")
    want = 2 * n if guided else n
    if mo_shape[0] != want:
        halves = " (with guidance: [uncond, cond] halves of N each)" if guided else ""
        raise ValueError(f"model_output batch {model_output.shape[0]}, expected {want}{halves}")
    channels = model_output.shape[1]
    if channels != c and not (plan.learned_variance and channels == 2 * c):
        extra = f" (or {2 * c} with a learned variance)" if plan.learned_variance else ""
        raise ValueError(f"model_output has {channels} channels, expected {c}{extra}")


def _check_history(plan: _PlanArgs, history: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(history, torch.Tensor):
        raise TypeError(f"history must be a torch.Tensor, got {type(history).__name__}")
    shape = history.shape
    if shape[1:] != x.shape or shape[0] != plan.slots + 1:
        want = (plan.slots + 1, *x.shape)
        raise ValueError(
            f"history must have shape (R + 1, *x.shape) = {want} (solvers.new_history), got {tuple(shape)}"
        )
    if history.dtype != x.dtype:
        raise TypeError(f"history has dtype {history.dtype}, x {x.dtype}: they must match")
    if history.device != x.device:
        raise ValueError(f"history is on {history.device}, x on {x.device}")


def _step_arg(plan: _PlanArgs, step: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(device step tensor or None, host step int) for the kernels."""
    steps = plan.steps
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1:
            raise TypeError(f"step must be an int or a one-element int64 tensor, got {step.dtype} {tuple(step.shape)}")
        if step.device != plan.device:
            raise ValueError(f"step is on {step.device}; keep it on the plan's device ({plan.device})")
        if value_checks_enabled(step.device):
            value = int(step)
            if not 0 <= value < steps:
                raise IndexError(f"step {value} out of range for a plan of {steps} steps")
        return step, 0
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or a one-element int64 tensor, got {type(step).__name__}")
    if not 0 <= step < steps:
        raise IndexError(f"step {step} out of range for a plan of {steps} steps")
    if plan.langevin is not None and plan.langevin[step]:
        raise ValueError(f"step {step} is a Langevin corrector step (not linear): its solver's step_fn takes it")
    return None, step


def _seed_arg(seed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed must be a one-element int64 tensor (a Philox key) on x's device")
    if seed.device != x.device:
        raise ValueError(f"seed is on {seed.device}, x on {x.device}")
    return seed


def solver_step(
    plan: SolverPlan,
    step: int | torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    backend: str | None = None,
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step ``step`` of ``plan`` (``apply_step``'s update) in one fused kernel (two with dynamic
    thresholding); the plan's history writes go into ``history`` in place.

    Args:
        plan: a ``SolverPlan`` on x's device, with R <= 4 history slots and W <= 2 writes.
        step: a Python int, or a one-element int64 tensor on the plan's device (read by the kernel:
            no host read, so a CUDA graph can replay the step with a new index).
        x: (N, C, ...) the state; float32, bfloat16, float16 (computed in float32) or float64
            (cpp and reference only, computed in float64). The output has its dtype and layout.
        model_output: (N, C, ...) any float dtype; (N, 2C, ...) with ``plan.learned_variance``
            (the first C channels are read in place); (2N, ...) halves [uncond, cond] with
            ``guidance_scale``, combined as uncond + s (cond - uncond).
        history: (R + 1, *x.shape) in x's dtype (``solvers.new_history``); slot R is the scratch
            slot, which the kernels do not write. The kernels read only the slots with a nonzero
            coefficient at this step (the reference reads them all: 0 * NaN is NaN there).
        noise: z shaped like x; or ``seed``, a one-element int64 Philox key on x's device, for noise
            drawn in-kernel (``reference.philox_randn(seed, x.shape)``, as posterior_step draws it);
            neither: the noise column is skipped. Whether a step draws is the caller's (``plan.draws``).
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest here.
        guide: a guidance gradient g shaped like x (e.g. s grad_x log p(y | x_t) of a classifier),
            for a plan from ``solvers.base.with_guidance``: eps shifted by -sqrt(1 - a_bar) g after
            the limit (``apply_step``), in the same pass.

    Returns:
        x_next, shaped like x. The reference backend with a ``seed`` reads the seed on the host.
    """
    args = _plan_args(plan)
    check_float(x, "x")
    check_float(model_output, "model_output")
    if args.device != x.device:
        raise ValueError(f"the plan is on {args.device}, x on {x.device}: move it once with plan.to(device)")
    guided = guidance_scale is not None
    _check_model_output(args, model_output, x, guided)
    _check_history(args, history, x)
    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed, not both")
    if noise is not None:
        noise = noise_arg(noise, x)
    if seed is not None:
        seed = _seed_arg(seed, x)
    if guide is not None:
        if args.guide_coef is None:
            raise ValueError("a guide was given but the plan takes none: make it with solvers.base.with_guidance")
        guide = noise_arg(guide, x, "guide")
    step_t, step_int = _step_arg(args, step)
    wide = torch.float64 if torch.float64 in (x.dtype, model_output.dtype) else x.dtype
    name = choose("solver_step", backend, x.device, numel=x.numel(), dtype=wide)

    if name == "reference":
        cd = reference.compute_dtype(x)
        out = model_output[:, : x.shape[1]].to(cd)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + float(guidance_scale) * (cond - uncond)
        if seed is not None:  # the kernels' Philox stream, from the key read on the host
            noise = reference.philox_randn(seed.item(), tuple(x.shape), x.device).to(x.dtype)
        return apply_step(plan, step if step_t is None else step_t.reshape(()), x, out, history, noise, guide)

    if x.numel() == 0:
        return new_like(x)
    op = _solver_step_impl if direct_call_ok(model_output, x, history, noise, guide) else _solver_step_op
    return op(
        model_output,
        x,
        history,
        step_t,
        step_int,
        *args.tensors,
        noise,
        seed,
        *args.limit,
        None if guidance_scale is None else float(guidance_scale),
        name,
        guide,
        args.guide_coef if guide is not None else None,
    )
