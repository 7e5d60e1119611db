"""The sampling loop's view of a solver: a stepper applies step i of a plan to a chunk of images.

Every stepper has the same call, ``stepper(model_output, x, t_row, row, noise, draw, guide)``:
``t_row`` holds the model's t for the (N or 2N with guidance) model batch, ``row`` the step's
int64 arguments (``row_for``), ``noise`` the step's noise when the caller drew it (torch noise),
``draw`` whether the step takes noise (with kernel noise: drawn in the kernel from the row's seed),
``guide`` a classifier-guidance gradient shaped like x (or None), one more input of the fused step.
Both ``t_row`` and ``row`` live on the device, so a CUDA graph replays the step with new values
copied into them. ``begin_chunk(x)`` resets the per-chunk state (a multistep solver's history).
"""

from __future__ import annotations

import torch

from . import reference
from ._backends import choose
from .ops.posterior import CLIP, CLIP_NONE, KINDS, PREDICTIONS, THRESHOLD, VARIANCES, _posterior_impl, posterior_step
from .schedule import Schedule
from .solvers.base import SolverPlan, apply_step, guide_shift, new_history, split_output
from .solvers.posterior import PosteriorPlan


def make_stepper(
    plan: PosteriorPlan | SolverPlan,
    schedule: Schedule,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    numel: int,
    graphed: bool,
    guidance_scale: float | None,
    step_fn=None,
):
    if isinstance(plan, PosteriorPlan):
        return PosteriorStepper(plan, schedule, backend, device, dtype, numel, graphed, guidance_scale)
    return LinearStepper(plan, backend, device, dtype, numel, graphed, guidance_scale, step_fn)


class PosteriorStepper:
    """DDPM / DDIM: posterior_step with everything constant worked out once. The fused kernel is
    called directly with a per-step seed tensor (the public op draws its seed from a generator,
    which a replayed CUDA graph could not vary per step); the reference backend goes through the op.
    Row: [prev_t per image (N), step index, seed]."""

    capturable = True

    def __init__(
        self,
        plan: PosteriorPlan,
        schedule: Schedule,
        backend: str | None,
        device: torch.device,
        dtype: torch.dtype,
        numel: int,
        graphed: bool,
        guidance_scale: float | None,
    ):
        self.plan, self.schedule, self.config = plan, schedule, plan.config
        config = plan.config
        self.backend = choose("posterior_step", backend, device, numel=numel, dtype=dtype, launch_bound=not graphed)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.host_seeds: list[int] = []
        self.step_index = 0
        if self.backend != "reference":
            self.table = schedule.kernel_table("alphas_cumprod", dtype, device)
            clip = THRESHOLD if config.thresholding else (CLIP if config.clip_sample else CLIP_NONE)
            self.args = (
                1.0 if config.kind == "ddpm" else schedule.final_alpha_cumprod,
                KINDS[config.kind],
                PREDICTIONS[config.prediction_type],
                VARIANCES[config.variance_type],
                clip,
                config.clip_sample_range,
                config.dynamic_thresholding_ratio,
                config.sample_max_value,
                config.eta,
                config.use_clipped_model_output,
                self.guidance_scale,
                False,
                self.backend,
            )

    def row_for(self, i: int, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.plan.prev_timesteps[i].expand(n), torch.full_like(seeds[:1], i), seeds[i : i + 1]])

    def begin_chunk(self, x: torch.Tensor) -> None:
        pass

    def __call__(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t_row: torch.Tensor,
        row: torch.Tensor,
        noise: torch.Tensor | None,
        draw: bool,
        guide: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        t, prev_t, seed = t_row[:n], row[:n], row[-1:]
        if self.backend == "reference":
            if noise is None and self.plan.stochastic and self.host_seeds:
                seed_int = self.host_seeds[self.step_index]
                noise = reference.philox_randn(seed_int, tuple(x.shape), x.device).to(x.dtype)
            return posterior_step(
                model_output,
                x,
                t,
                prev_t,
                self.schedule,
                self.config,
                noise=noise,
                guidance_scale=self.guidance_scale,
                guide=guide,
                backend="reference",
            )[0]
        seed_arg = seed if noise is None and self.plan.stochastic else None
        return _posterior_impl(model_output, x, t, prev_t, self.table, noise, seed_arg, *self.args, guide)[0]


def _fused_solver_step():
    """The fused solver_step op, where this build has it."""
    try:
        from .ops.solver_step import solver_step
    except ImportError:
        return None
    return solver_step


class LinearStepper:
    """A linear solver's plan (DPM-Solver++, UniPC, Euler, Heun, ...): the fused ``solver_step``
    with the history in fixed per-chunk-size buffers (zeroed at each chunk's start), or, for a
    plan with non-linear steps (``step_fn``, the Langevin corrector) or the reference backend,
    the plain PyTorch step. Row: [step index, seed]."""

    def __init__(
        self,
        plan: SolverPlan,
        backend: str | None,
        device: torch.device,
        dtype: torch.dtype,
        numel: int,
        graphed: bool,
        guidance_scale: float | None,
        step_fn=None,
    ):
        self.plan = plan
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.step_fn = step_fn
        self.fused = _fused_solver_step()
        if step_fn is not None or self.fused is None:
            if backend not in (None, "reference"):
                why = "this build has no fused solver_step" if self.fused is None else "its steps are not linear"
                raise ValueError(f"backend={backend!r}: this sampler runs on the reference step ({why})")
            self.backend = "reference"
        else:
            self.backend = choose("solver_step", backend, device, numel=numel, dtype=dtype, launch_bound=not graphed)
        self.capturable = self.backend != "reference"
        self.histories: dict[tuple, torch.Tensor] = {}
        self.history: torch.Tensor | None = None
        self.host_seeds: list[int] = []
        self.step_index = 0

    def row_for(self, i: int, n: int, seeds: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(seeds[:1], i), seeds[i : i + 1]])

    def begin_chunk(self, x: torch.Tensor) -> None:
        key = (tuple(x.shape), x.dtype)
        history = self.histories.get(key)
        if history is None:
            history = self.histories[key] = new_history(self.plan, x)
        else:
            history.zero_()  # an unused slot must not carry the previous chunk's values (or NaN)
        self.history = history

    def __call__(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t_row: torch.Tensor,
        row: torch.Tensor,
        noise: torch.Tensor | None,
        draw: bool,
        guide: torch.Tensor | None = None,
    ) -> torch.Tensor:
        step, seed = row[-2], row[-1]
        if self.backend != "reference":
            seed_arg = seed if draw and noise is None else None
            return self.fused(
                self.plan,
                step,
                x,
                model_output,
                self.history,
                noise=noise if draw else None,
                seed=seed_arg,
                guidance_scale=self.guidance_scale,
                backend=self.backend,
                guide=guide,
            )
        if self.guidance_scale is not None:
            uncond, cond = model_output.chunk(2)
            model_output = uncond + self.guidance_scale * (cond - uncond)
        if guide is not None and self.step_fn is not None:
            # a non-linear step_fn (pc's Langevin steps) takes no guide; its plans have no limit, so the
            # shifted output gives what apply_step's shift after the limit gives
            out = split_output(self.plan, x, model_output).to(reference.compute_dtype(x))
            model_output, guide = out + guide_shift(self.plan, self.step_index, x, guide), None
        if draw and noise is None:  # kernel noise on the reference path: the same Philox stream, host seeds
            noise = reference.philox_randn(self.host_seeds[self.step_index], tuple(x.shape), x.device).to(x.dtype)
        if self.step_fn is None:
            return apply_step(self.plan, self.step_index, x, model_output, self.history, noise if draw else None, guide)
        return self.step_fn(self.plan, self.step_index, x, model_output, self.history, noise if draw else None)
