"""Euler and Euler ancestral (Karras et al. 2022, arXiv:2206.00364, Algorithms 1-2; k-diffusion's
``sample_euler`` / ``sample_euler_ancestral``), as diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler`` step them: every timestep spacing (linspace gives fractional
timesteps, whose sigmas are interpolated linearly in the table), Karras sigmas, both final sigma
types, epsilon / v / sample prediction, zero terminal SNR, and Euler's ``s_churn`` noise.

diffusers keeps its sample in the variance-exploding scaling x_ve = c x with c = sqrt(1 + sigma^2)
and divides by c in ``scale_model_input``; our state is the model's input x (the VP scaling,
base.py), so each step below is diffusers' step conjugated by those scalings: x -> c x (its
sample), its update, then / c_next (the next ``scale_model_input``). The last step returns
diffusers' final sample as it is (no / c_next): the same at a final sigma = 0, where the scalings
coincide, and what diffusers' pipelines decode after a ``final_sigmas_type="sigma_min"`` end.
diffusers' x0 predictions in the VE scaling are the VP ones (x0 = c x - sigma eps = alpha x -
sigma_vp v, dpmsolver.x0_conversion), so the update of one step is

    d = (x_hat - x0) / sigma_hat,   x_ve_next = x_hat + (sigma_next - sigma_hat) d      (Euler)
    d = (x_ve - x0) / sigma,        x_ve_next = x_ve + (sigma_down - sigma) d + sigma_up z   (ancestral)

with x_hat = x_ve + s_noise sqrt(sigma_hat^2 - sigma^2) z the churned sample (sigma_hat =
(1 + gamma) sigma; the model is evaluated at the un-churned one, as in diffusers), and sigma_up^2 =
sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, sigma_down^2 = sigma_next^2 - sigma_up^2. Both are
linear in [x, out, z], so the conversion is folded into the x and out columns (D_0, the x0
prediction of the un-churned sample, feeds nothing). ``reference_step`` is each step written as
diffusers writes it (the float64 oracle of the folded plan).

The start: diffusers draws x_ve_T = init_noise_sigma z with init_noise_sigma = sigma_max for the
"linspace" and "trailing" spacings and sqrt(1 + sigma_max^2) for "leading"; the plan's
``init_noise_sigma`` is that divided by c_0, so that x_T = plan.init_noise_sigma z is diffusers'
first model input. Timesteps are float32, as diffusers passes them to the model (integral values
for leading / trailing spacing, fractional for linspace or Karras sigmas).

Where this differs from diffusers (0.42), on purpose: the table is float64 (schedule.py) and
trailing spacing keeps exactly n timesteps, as in dpmsolver.py; a zero-terminal-SNR table's last
a_bar is 2^-24 as diffusers sets it for ``rescale_betas_zero_snr``, also for trained betas that end
at 1. Karras timesteps come from our float64 log-sigma table (diffusers': fp32), so they can differ
from diffusers' in the last float32 bits. Refused: Karras sigmas on a zero-terminal-SNR schedule
(the patched table is not monotone at its end, so the first timestep is ambiguous),
``interpolation_type="log_linear"`` (diffusers then takes n + 1 log-spaced sigmas for n timesteps,
unrelated to those timesteps, and never reaches its final sigma), the exponential / beta sigmas,
and (ancestral) sample prediction, which diffusers does not implement either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..reference import compute_dtype
from ..schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, Schedule, normalize_choice, select_timesteps
from .base import NOISE, OUT, PlanBuilder, SolverPlan, X, options_from_config
from .dpmsolver import (
    check_finite_sigmas,
    karras_sigmas,
    refuse_epsilon_at_zero_snr,
    sigma_table,
    sigma_to_t,
    with_final_sigma,
    x0_conversion,
)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIMESTEP_TYPES = ("discrete", "continuous")
# diffusers options these solvers do not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "interpolation_type": "linear",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def euler_timesteps_and_sigmas(
    schedule: Schedule,
    prediction_type: str,
    num_inference_steps: int | None,
    timesteps: Sequence[int] | None,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) float32 timesteps and their (S,) float64 sigmas, as the ``set_timesteps`` of diffusers'
    Euler, Euler ancestral and Heun schedulers pick them (before the final sigma): the spacing's
    timesteps (linspace: float32 values in [0, T - 1], not rounded), their sigmas interpolated
    linearly in the table; with Karras sigmas, n sigmas from ``sigma_max`` (default: the first
    sigma) down to ``sigma_min`` (default: the last), and their continuous timesteps."""
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    if timesteps is not None and use_karras_sigmas:
        raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (diffusers refuses too)")
    if use_karras_sigmas and schedule.zero_terminal_snr:
        raise ValueError(
            "use_karras_sigmas=True on a zero-terminal-SNR schedule is not supported: its a_bar_T patched to 2^-24 "
            "lies above a_bar_{T-1}, so sigma_max has two timesteps in the table and diffusers' fp32 lookup lands "
            "on either (995.3 for 999 seen); turn use_karras_sigmas or rescale_betas_zero_snr off"
        )
    refuse_epsilon_at_zero_snr(schedule, prediction_type)
    table = sigma_table(schedule)
    T = len(table)
    config = dataclasses.replace(schedule.config, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    if timesteps is None and timestep_spacing == "linspace":
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
        ts = select_timesteps(config, num_inference_steps, timesteps).astype(np.float64)
    with np.errstate(invalid="ignore"):  # interpolating next to an infinite sigma
        sigmas = np.interp(ts, np.arange(T), table)
    check_finite_sigmas(ts, sigmas)
    if use_karras_sigmas:
        low = sigmas[-1] if sigma_min is None else sigma_min
        high = sigmas[0] if sigma_max is None else sigma_max
        sigmas = karras_sigmas(low, high, len(ts))
        ts = sigma_to_t(sigmas, np.log(table))
    return ts.astype(np.float32), sigmas


def init_noise_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """The plan's start scale: diffusers' ``init_noise_sigma`` (sigma_max, or sqrt(1 + sigma_max^2)
    for "leading" spacing) divided by sqrt(1 + sigma_0^2), its first ``scale_model_input``."""
    top = float(np.max(sigmas))
    ve = top if timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1.0)
    return ve / math.sqrt(sigmas[0] ** 2 + 1.0)


def next_scale(sigmas: np.ndarray, s: int) -> float:
    """What step s's VE result is divided by: the next ``scale_model_input``'s sqrt(1 + sigma^2),
    or 1 after the last step (diffusers' final sample as it is)."""
    return math.sqrt(sigmas[s + 1] ** 2 + 1.0) if s + 2 < len(sigmas) else 1.0


def ve_x0(sigma: float, sigma_hat: float, prediction_type: str) -> tuple[float, float]:
    """(P, Q) with diffusers' x0 = P x_hat + Q out in the VE scaling, for a (churned) sample x_hat
    at sigma_hat whose model output was computed at sigma (its formulas, sigma_hat in eps only)."""
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0


def euler_update(sigma: float, sigma_hat: float, sigma_to: float, prediction_type: str) -> tuple[float, float]:
    """(A, B) of diffusers' Euler update x_ve_to = A x_hat + B out: from a sample x_hat at sigma_hat
    (its model output computed at sigma) to sigma_to along d = (x_hat - x0) / sigma_hat."""
    P, Q = ve_x0(sigma, sigma_hat, prediction_type)
    dt = sigma_to - sigma_hat
    return 1.0 + dt * (1.0 - P) / sigma_hat, -dt * Q / sigma_hat


@dataclass(frozen=True)
class EulerDiscrete:
    """The options of ``EulerDiscreteScheduler`` beyond the noise schedule, with diffusers' names
    and defaults; ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` are the arguments of its
    ``step`` (churn: noise added before each derivative where s_tmin <= sigma <= s_tmax, gamma =
    min(s_churn / n, sqrt(2) - 1)). ``sigma_min`` / ``sigma_max`` bound the Karras sigmas only (as
    in diffusers). ``timestep_type="continuous"`` passes the model 0.25 log sigma with v
    prediction (as diffusers). The noise schedule itself comes from the ``Schedule`` given to ``plan``."""

    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        set_("final_sigmas_type", normalize_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES))
        set_("timestep_type", normalize_choice("timestep_type", self.timestep_type, TIMESTEP_TYPES))
        if self.interpolation_type != "linear":
            raise ValueError(
                f"interpolation_type={self.interpolation_type!r} is not supported (only 'linear'): diffusers' "
                "'log_linear' takes n + 1 log-spaced sigmas for n timesteps that do not match them"
            )
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)}")
        if self.s_churn < 0 or self.s_noise < 0:
            raise ValueError(f"s_churn and s_noise must be >= 0, got {self.s_churn}, {self.s_noise}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EulerDiscrete:
        """From a diffusers ``EulerDiscreteScheduler`` config (``dict(scheduler.config)``).

        The noise-schedule keys are left to ``base.schedule_from_dict``; an option this solver does
        not implement raises when it is on; other keys (not starting with '_') warn."""
        return options_from_config(cls, config, UNSUPPORTED_OPTIONS, "Euler")

    def timesteps_and_sigmas(
        self, schedule: Schedule, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(S,) float32 timesteps and (S + 1,) float64 sigmas, as diffusers' ``set_timesteps``."""
        ts, sigmas = euler_timesteps_and_sigmas(
            schedule,
            self.prediction_type,
            num_inference_steps,
            timesteps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
            self.sigma_min,
            self.sigma_max,
        )
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            ts = (0.25 * np.log(sigmas)).astype(np.float32)
        return ts, with_final_sigma(sigmas, self.final_sigmas_type, sigma_table(schedule))

    def gammas(self, sigmas: np.ndarray) -> np.ndarray:
        """Each step's churn gamma (its sigma_hat = (1 + gamma) sigma), as diffusers' ``step``."""
        n = len(sigmas) - 1
        gamma = min(self.s_churn / n, 2.0**0.5 - 1.0)
        return np.array([gamma if self.s_tmin <= s <= self.s_tmax else 0.0 for s in sigmas[:-1]])

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan:
        """The plan of one run: ``num_inference_steps`` chosen as diffusers' ``set_timesteps`` does,
        or custom descending ``timesteps``; tensors on ``device`` (default: the schedule's)."""
        ts, sigmas = self.timesteps_and_sigmas(schedule, num_inference_steps, timesteps)
        n = len(ts)
        gammas = self.gammas(sigmas)
        plan = PlanBuilder(n, 0, 0)
        for s in range(n):
            sigma, sigma_next = sigmas[s], sigmas[s + 1]
            c, c_next = math.sqrt(sigma * sigma + 1.0), next_scale(sigmas, s)
            sigma_hat = sigma * (1.0 + gammas[s])
            e = self.s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)  # x_hat = x_ve + e z
            A, B = euler_update(sigma, sigma_hat, sigma_next, self.prediction_type)  # x_ve_next = A x_hat + B out
            row = plan.row(s)
            row[X], row[OUT], row[NOISE] = A * c / c_next, B / c_next, A * e / c_next
            plan.to_d_x[s], plan.to_d_out[s] = x0_conversion(sigma, self.prediction_type)
        return plan.build(
            device=device if device is not None else schedule.device,
            timesteps=ts,
            sigmas=sigmas,
            orders=[1] * n,
            draws=[bool(g > 0) for g in gammas],
            init_noise_sigma=init_noise_sigma(sigmas, self.timestep_spacing),
        )


@dataclass(frozen=True)
class EulerAncestralDiscrete:
    """The options of ``EulerAncestralDiscreteScheduler`` beyond the noise schedule, with
    diffusers' names and defaults (epsilon or v prediction). Every step draws noise, the last too
    (with sigma_up = 0 there), as diffusers' ``step`` does. The noise schedule itself comes from
    the ``Schedule`` given to ``plan``."""

    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        if self.prediction_type == "sample":
            raise ValueError(
                "prediction_type='sample' is not supported by Euler ancestral (diffusers does not implement it "
                "either): use 'epsilon' or 'v_prediction'"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EulerAncestralDiscrete:
        """From a diffusers ``EulerAncestralDiscreteScheduler`` config (``dict(scheduler.config)``);
        noise-schedule keys are left to ``base.schedule_from_dict``, other keys warn."""
        return options_from_config(cls, config, {}, "Euler ancestral")

    def timesteps_and_sigmas(
        self, schedule: Schedule, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(S,) float32 timesteps and (S + 1,) float64 sigmas (the last 0), as diffusers'
        ``set_timesteps`` (which takes no custom timesteps; ours use the table's sigmas at them)."""
        ts, sigmas = euler_timesteps_and_sigmas(
            schedule, self.prediction_type, num_inference_steps, timesteps, self.timestep_spacing, self.steps_offset
        )
        return ts, np.concatenate([sigmas, [0.0]])

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan:
        """The plan of one run: ``num_inference_steps`` chosen as diffusers' ``set_timesteps`` does,
        or custom descending ``timesteps``; tensors on ``device`` (default: the schedule's)."""
        ts, sigmas = self.timesteps_and_sigmas(schedule, num_inference_steps, timesteps)
        n = len(ts)
        plan = PlanBuilder(n, 0, 0)
        for s in range(n):
            sigma, sigma_next = sigmas[s], sigmas[s + 1]
            c, c_next = math.sqrt(sigma * sigma + 1.0), next_scale(sigmas, s)
            sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
            # x_ve_next = A x_ve + B out + sigma_up z
            A, B = euler_update(sigma, sigma, sigma_down, self.prediction_type)
            row = plan.row(s)
            row[X], row[OUT], row[NOISE] = A * c / c_next, B / c_next, sigma_up / c_next
            plan.to_d_x[s], plan.to_d_out[s] = x0_conversion(sigma, self.prediction_type)
        return plan.build(
            device=device if device is not None else schedule.device,
            timesteps=ts,
            sigmas=sigmas,
            orders=[1] * n,
            draws=[True] * n,
            init_noise_sigma=init_noise_sigma(sigmas, self.timestep_spacing),
        )


def ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_up, sigma_down) of an ancestral step from sigma to sigma_next (k-diffusion's
    ``get_ancestral_step`` with eta = 1): sigma_up^2 + sigma_down^2 = sigma_next^2."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return sigma_up, math.sqrt(sigma_next**2 - sigma_up**2)


# ---------------------------------------------------------------- float64 references of one step
def _f64(v: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(float(v), dtype=torch.float64)


def reference_step(
    solver: EulerDiscrete | EulerAncestralDiscrete,
    sigmas: Sequence[float] | torch.Tensor,
    step: int,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step written as diffusers' Euler (or Euler ancestral) ``step`` writes it, between the
    scalings: our VP sample times sqrt(sigma^2 + 1) is diffusers' sample, and its prev_sample
    divided by sqrt(sigma_next^2 + 1) our next state. float64 scalars, tensors in sample's compute
    dtype (float32, or float64 for float64 input); ``sigmas`` the plan's (S + 1,); ``noise`` where
    the step draws. Returns the next VP sample in the compute dtype (after the last step:
    diffusers' final sample, unscaled)."""
    cd = compute_dtype(sample)
    sigma, sigma_next = _f64(sigmas[step]), _f64(sigmas[step + 1])
    sample = sample.to(cd) * (sigma**2 + 1) ** 0.5
    model_output = model_output.to(cd)
    ancestral = isinstance(solver, EulerAncestralDiscrete)
    if ancestral:
        sigma_hat = sigma
    else:
        gamma = min(solver.s_churn / (len(sigmas) - 1), 2**0.5 - 1) if solver.s_tmin <= sigma <= solver.s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = noise.to(cd) * solver.s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
    if solver.prediction_type == "sample":
        pred_original_sample = model_output
    elif solver.prediction_type == "epsilon":
        pred_original_sample = sample - sigma_hat * model_output
    else:
        pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    if ancestral:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma) + noise.to(cd) * sigma_up
    else:
        derivative = (sample - pred_original_sample) / sigma_hat
        prev_sample = sample + derivative * (sigma_next - sigma_hat)
    return prev_sample / (sigma_next**2 + 1) ** 0.5 if step + 2 < len(sigmas) else prev_sample
