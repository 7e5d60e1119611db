"""Heun's second-order method (Karras et al. 2022, arXiv:2206.00364, Algorithm 1: EDM's
deterministic sampler), as diffusers' ``HeunDiscreteScheduler`` steps it: n sigmas s_0 > ... >
s_{n-1} > s_n = 0 make 2n - 1 model calls, at the timesteps t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}:
for k < n - 1 a predictor (Euler from s_k to s_{k+1}) and a corrector (the trapezoid of both
derivatives), then one Euler step from s_{n-1} into 0. Every timestep spacing, Karras sigmas, the
three prediction types and ``clip_sample``.

Notation and scalings as euler.py: diffusers' sample is x_ve = c x with c = sqrt(1 + sigma^2),
our state x the model's input; D = limit(p x + q out) the x0 prediction at the sample's sigma
(dpmsolver.x0_conversion; diffusers' corrector converts at s_{k+1}, the sigma of the predicted
sample it is given) and d = (c x - D) / sigma the derivative. With dt = s_{k+1} - s_k:

    predictor (step 2k, at s_k):        x_pred = (c_k x + dt d_1) / c_{k+1}
                                        H      = (c_k x + dt/2 d_1) / c_{k+1}       (history slot 0)
    corrector (step 2k + 1, at s_{k+1}): x_next = H + dt/2 d_2 / c_{k+1}
    last step (at s_{n-1}, into 0):     x_next = c x - s_{n-1} d = D

so each model call is one plan step; without a clip D = p x + q out is folded into the x and out
columns, with ``clip_sample`` it stays in the D_0 column behind the X0Limit. The plan's sigmas are
diffusers' (s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0): each step's input noise level and the last
output's. ``reference_step`` is each call's ``step`` written as diffusers writes it, with its saved
state (the float64 oracle of the folded plan).

Where this differs from diffusers (0.42), on purpose: the table is float64 and trailing spacing
keeps exactly n timesteps, as in dpmsolver.py; Karras timesteps come from our float64 log-sigma
table (as euler.py); a zero-terminal-SNR schedule (which diffusers' Heun does not offer) is sampled
with its last a_bar at 2^-24, as the other solvers. Refused: Karras sigmas on a zero-terminal-SNR
schedule (euler.py says why), the exponential / beta sigmas and the "exp" beta schedule (not in
schedule.py). Note diffusers' Heun defaults to beta_start=0.00085,
beta_end=0.012: the schedule comes from the ``Schedule`` given to ``plan`` (``from_config`` of a
diffusers config keeps them in ``base.schedule_from_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..reference import compute_dtype
from ..schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, Schedule, normalize_choice
from .base import D0, HIST, OUT, PlanBuilder, SolverPlan, X, X0Limit, options_from_config
from .dpmsolver import x0_conversion
from .euler import euler_timesteps_and_sigmas, init_noise_sigma

UNSUPPORTED_OPTIONS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}


@dataclass(frozen=True)
class HeunDiscrete:
    """The options of ``HeunDiscreteScheduler`` beyond the noise schedule, with diffusers' names
    and defaults. ``clip_sample`` clamps each x0 prediction to [-clip_sample_range,
    clip_sample_range] (in diffusers' Heun: before the derivative, at both stages). The noise
    schedule itself comes from the ``Schedule`` given to ``plan``."""

    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HeunDiscrete:
        """From a diffusers ``HeunDiscreteScheduler`` config (``dict(scheduler.config)``).

        The noise-schedule keys are left to ``base.schedule_from_dict``; an option this solver does
        not implement raises when it is on; other keys (not starting with '_') warn."""
        return options_from_config(cls, config, UNSUPPORTED_OPTIONS, "Heun")

    def timesteps_and_sigmas(
        self, schedule: Schedule, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The n sigmas' (n,) float32 timesteps and (n + 1,) float64 sigmas (the last 0), as
        diffusers' ``set_timesteps`` picks them before interleaving."""
        ts, sigmas = euler_timesteps_and_sigmas(
            schedule,
            self.prediction_type,
            num_inference_steps,
            timesteps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        return ts, np.concatenate([sigmas, [0.0]])

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan:
        """The plan of one run (2n - 1 model calls for n sigmas): ``num_inference_steps`` chosen
        as diffusers' ``set_timesteps`` does, or custom descending ``timesteps``; tensors on
        ``device`` (default: the schedule's)."""
        ts, sig = self.timesteps_and_sigmas(schedule, num_inference_steps, timesteps)
        n = len(ts)
        steps = 2 * n - 1
        plan = PlanBuilder(steps, 1, writes=1)
        unit = lambda c: np.eye(HIST + 1)[c]  # noqa: E731 (rows over [x, out, D_0, z, H_0])

        def fill(s: int, sigma: float, x_next: np.ndarray, write: np.ndarray | None = None) -> None:
            """Step s at noise level sigma: its rows (D_0 folded in without a clip) and its write into slot 0."""
            p, q = x0_conversion(sigma, self.prediction_type)
            plan.to_d_x[s], plan.to_d_out[s] = p, q
            for k, row in enumerate([x_next] if write is None else [x_next, write]):
                if not self.clip_sample:  # D = p x + q out: fold it
                    row = row + row[D0] * (p * unit(X) + q * unit(OUT) - unit(D0))
                plan.row(s, k)[:] = row
            if write is not None:
                plan.write(s, 0, 0)

        derivative = lambda sigma: (math.sqrt(sigma * sigma + 1.0) * unit(X) - unit(D0)) / sigma  # noqa: E731 (d)
        for k in range(n):
            s0, s1 = sig[k], sig[k + 1]
            c0, c1 = math.sqrt(s0 * s0 + 1.0), math.sqrt(s1 * s1 + 1.0)
            dt = s1 - s0
            predicted = (c0 * unit(X) + dt * derivative(s0)) / c1
            if k == n - 1:  # Euler into sigma = 0
                fill(steps - 1, s0, predicted)
                break
            fill(2 * k, s0, predicted, (c0 * unit(X) + 0.5 * dt * derivative(s0)) / c1)
            fill(2 * k + 1, s1, unit(HIST) + 0.5 * dt * derivative(s1) / c1)
        return plan.build(
            device=device if device is not None else schedule.device,
            timesteps=np.concatenate([ts[:1], np.repeat(ts[1:], 2)]),
            sigmas=np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]]),
            orders=[1 + s % 2 for s in range(steps)],
            draws=[False] * steps,
            x0_limit=X0Limit("clip", clip_range=self.clip_sample_range) if self.clip_sample else None,
            init_noise_sigma=init_noise_sigma(sig, self.timestep_spacing),
        )


# ---------------------------------------------------------------- float64 reference of one step
class HeunState(NamedTuple):
    """What diffusers' Heun keeps between its predictor and corrector calls (VE scaling)."""

    prev_derivative: torch.Tensor
    dt: torch.Tensor
    sample: torch.Tensor


def reference_step(
    solver: HeunDiscrete,
    sigmas: Sequence[float] | torch.Tensor,
    step: int,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    state: HeunState | None = None,
) -> tuple[torch.Tensor, HeunState | None]:
    """One model call's ``step`` written as diffusers' Heun writes it, between the scalings (our VP
    sample times sqrt(sigma^2 + 1) is its sample, its prev_sample over sqrt(sigma_next^2 + 1) our
    next state). ``sigmas``: the plan's interleaved (S + 1,); ``state``: None for a first-order
    call (even steps), else what the previous call returned. float64 scalars, tensors in sample's
    compute dtype (float32, or float64 for float64 input). Returns (next VP sample, state)."""
    cd = compute_dtype(sample)
    f64 = lambda v: torch.as_tensor(float(v), dtype=torch.float64)  # noqa: E731
    sample = sample.to(cd) * (f64(sigmas[step]) ** 2 + 1) ** 0.5
    model_output = model_output.to(cd)
    first = state is None
    sigma, sigma_next = (
        (f64(sigmas[step]), f64(sigmas[step + 1])) if first else (f64(sigmas[step - 1]), f64(sigmas[step]))
    )
    sigma_hat = sigma
    sigma_input = sigma_hat if first else sigma_next
    if solver.prediction_type == "epsilon":
        pred_original_sample = sample - sigma_input * model_output
    elif solver.prediction_type == "v_prediction":
        pred_original_sample = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + (
            sample / (sigma_input**2 + 1)
        )
    else:
        pred_original_sample = model_output
    if solver.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-solver.clip_sample_range, solver.clip_sample_range)
    if first:
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = sigma_next - sigma_hat
        state = HeunState(derivative, dt, sample)
    else:
        derivative = (sample - pred_original_sample) / sigma_next
        derivative = (state.prev_derivative + derivative) / 2
        dt, sample, state = state.dt, state.sample, None
    prev_sample = sample + derivative * dt
    return prev_sample / (f64(sigmas[step + 1]) ** 2 + 1) ** 0.5, state
