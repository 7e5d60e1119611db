"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095), as diffusers'
``DPMSolverMultistepScheduler`` steps it: orders 1-3, the ODE ("dpmsolver++") and SDE
("sde-dpmsolver++") variants, midpoint / heun second order, Karras sigmas, lower-order final
steps, both final sigma types, dynamic thresholding, every prediction type.

Notation as diffusers: sigma = sqrt((1 - a_bar) / a_bar) is the noise level of a step,
alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = sigma * alpha the VP coefficients
(x_t = alpha x_0 + sigma_vp eps), lambda = log(alpha / sigma_vp) = -log(sigma) the half log-SNR
and h = lambda_next - lambda_now the step. Each model output becomes an x0 prediction m (linear
in x_t and the output), and the update is a linear combination of x_t, the last k predictions
m0 (now), m1, m2 and noise. ``update_coefficients`` is that combination's maths in float64 on the
host; ``reference_step`` is the same step written as diffusers writes it (the float64 oracle of
the folded plan).

Where this differs from diffusers (0.42), on purpose: the table is built in float64 (see
schedule.py); trailing spacing keeps exactly n timesteps (diffusers' float ``arange`` can add a
timestep -1, e.g. at n = 61), as ``schedule.select_timesteps`` does; a zero-terminal-SNR table's
last a_bar is 2^-24 as diffusers sets it for ``rescale_betas_zero_snr``, also for trained betas
that end at 1 (diffusers divides by zero there). Its deprecated ``dpmsolver`` / ``sde-dpmsolver``
algorithms, ``flow_prediction`` and the exponential / beta / Lu / flow sigmas are refused, and so
are fewer steps than ``solver_order`` (diffusers lowers the order to the steps there are).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..reference import compute_dtype, dynamic_threshold
from ..schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, Schedule, normalize_choice, select_timesteps
from .base import (
    D0,
    HIST,
    NOISE,
    OUT,
    PlanBuilder,
    SolverPlan,
    X,
    X0Limit,
    check_dynamic_thresholding,
    check_steps_for_order,
    options_from_config,
)

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
VARIANCE_TYPES = (None, "learned", "learned_range")
# diffusers options this solver does not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "flow_shift": 1.0,
    "time_shift_type": "exponential",
}
ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' last a_bar for rescale_betas_zero_snr (fp16's smallest subnormal)


@dataclass(frozen=True)
class DPMSolverMultistep:
    """The options of ``DPMSolverMultistepScheduler`` beyond the noise schedule, with diffusers'
    names and defaults (note ``timestep_spacing="linspace"``, not DDPM's "leading"). The noise
    schedule itself comes from the ``Schedule`` given to ``plan``."""

    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.solver_order, bool) or self.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.algorithm_type == "deis":  # diffusers maps it so
            set_("algorithm_type", "dpmsolver++")
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(
                f"algorithm_type {self.algorithm_type!r} (deprecated in diffusers) is not implemented: "
                f"use one of {', '.join(ALGORITHM_TYPES)}"
            )
        set_("algorithm_type", normalize_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES))
        if self.solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps them so
            set_("solver_type", "midpoint")
        set_("solver_type", normalize_choice("solver_type", self.solver_type, SOLVER_TYPES))
        set_("final_sigmas_type", normalize_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES))
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {self.variance_type!r}; valid: None, learned, learned_range")
        check_dynamic_thresholding(self.dynamic_thresholding_ratio, self.sample_max_value)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DPMSolverMultistep:
        """From a diffusers ``DPMSolverMultistepScheduler`` config (``dict(scheduler.config)``).

        The noise-schedule keys are left to ``base.schedule_from_dict``; an option this solver does
        not implement raises when it is on; other keys (not starting with '_') warn."""
        return options_from_config(cls, config, UNSUPPORTED_OPTIONS, "DPM-Solver++")

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan:
        """The plan of one run: ``num_inference_steps`` chosen as diffusers' ``set_timesteps`` does,
        or custom descending ``timesteps``; tensors on ``device`` (default: the schedule's)."""
        table = multistep_sigma_table(
            schedule, self.prediction_type, self.use_karras_sigmas, num_inference_steps, timesteps
        )
        if timesteps is not None and self.use_karras_sigmas:
            raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (diffusers refuses too)")
        if timesteps is not None:
            ts = select_timesteps(schedule.config, None, timesteps)
            sigmas = table[ts]
        else:
            ts = dpm_timesteps(
                table, num_inference_steps, self.timestep_spacing, self.steps_offset, self.lambda_min_clipped
            )
            sigmas = table[ts]
            if self.use_karras_sigmas:
                sigmas = karras_sigmas(table[0], table[-1], num_inference_steps)
                t_cont = sigma_to_t(sigmas, np.log(table))
                # diffusers rounds, except for the cosine schedule, whose float timesteps its int64 cast truncates
                ts = (t_cont if schedule.config.beta_schedule == "squaredcos_cap_v2" else t_cont.round()).astype(
                    np.int64
                )
        check_finite_sigmas(ts, sigmas)
        check_steps_for_order(self.solver_order, len(ts), num_inference_steps)
        sigmas = with_final_sigma(sigmas, self.final_sigmas_type, table)
        return self._plan_from_sigmas(ts, sigmas, device if device is not None else schedule.device)

    def step_orders(self, num_steps: int) -> tuple[int, ...]:
        """The order of each step, as diffusers' ``step`` chooses it (warm-up from order 1; lower
        orders at the end for fewer than 15 steps, and always order 1 into a zero final sigma)."""
        orders = []
        for i in range(num_steps):
            final = i == num_steps - 1 and (
                self.euler_at_final or (self.lower_order_final and num_steps < 15) or self.final_sigmas_type == "zero"
            )
            second = i == num_steps - 2 and self.lower_order_final and num_steps < 15
            done = min(i, self.solver_order)  # diffusers' lower_order_nums
            if self.solver_order == 1 or done < 1 or final:
                orders.append(1)
            elif self.solver_order == 2 or done < 2 or second:
                orders.append(2)
            else:
                orders.append(3)
        return tuple(orders)

    def _plan_from_sigmas(self, ts: np.ndarray, sigmas: np.ndarray, device: torch.device | str) -> SolverPlan:
        """x_next = a x + b0 m0 + b1 m1 + b2 m2 + c z with m0 = D_0 written into the ring slot
        s mod R (R = order - 1), where steps s + 1 and s + 2 read it as m1 and m2."""
        n = len(ts)
        orders = self.step_orders(n)
        slots = self.solver_order - 1
        fold = not self.thresholding
        plan = PlanBuilder(n, slots, writes=1 if slots else 0)
        for s in range(n):
            if orders[s] > 1 and any(sigmas[s - k] == sigmas[s - k + 1] for k in range(orders[s])):
                raise ValueError(
                    f"step {s} (t={ts[s]}): repeated sigmas (too many num_inference_steps for this spacing, or "
                    f"repeated custom timesteps) make the order-{orders[s]} update divide by a zero step in lambda"
                )
            p, q = x0_conversion(sigmas[s], self.prediction_type)
            a, b, c = update_coefficients(sigmas, s, orders[s], self.algorithm_type, self.solver_type)
            plan.to_d_x[s], plan.to_d_out[s] = p, q
            row = plan.row(s)
            row[NOISE] = c
            if fold:  # x_next = a x + b0 (p x + q out) + ...
                row[X], row[OUT] = a + b[0] * p, b[0] * q
            else:  # D_0 = limit(p x + q out) is not linear: keep it apart
                row[X], row[D0] = a, b[0]
            for j in range(1, orders[s]):
                row[HIST + (s - j) % slots] = b[j]
            if slots:
                plan.row(s, 1)[D0] = 1.0
                plan.write(s, 0, s % slots)
        limit = None
        if self.thresholding:
            limit = X0Limit("dynamic", ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        return plan.build(
            device=device,
            timesteps=ts,
            sigmas=sigmas,
            orders=orders,
            draws=[self.algorithm_type == "sde-dpmsolver++"] * n,
            x0_limit=limit,
            learned_variance=self.variance_type is not None,
        )


# ---------------------------------------------------------------- timesteps and sigmas (float64, host)
def refuse_epsilon_at_zero_snr(schedule: Schedule, prediction_type: str) -> None:
    """eps prediction cannot be turned into x0 at the last timestep of a zero-terminal-SNR schedule."""
    if prediction_type == "epsilon" and schedule.zero_terminal_snr:
        raise ValueError(
            "prediction_type='epsilon' cannot sample a zero-terminal-SNR schedule (x0 = (x - sigma eps) / alpha "
            "divides by alpha_T = 0): use prediction_type='v_prediction' or 'sample'"
        )


def sigma_table(schedule: Schedule) -> np.ndarray:
    """(T,) float64 sigma = sqrt((1 - a_bar) / a_bar) at each training timestep, the last a_bar of a
    zero-terminal-SNR schedule set to 2^-24 (as diffusers; sigma_T = 4096). A trained a_bar of 0
    gives sigma = infinity, which ``check_finite_sigmas`` refuses where a run uses it."""
    alphas_cumprod = schedule.alphas_cumprod.detach().to("cpu", torch.float64).numpy().copy()
    if schedule.zero_terminal_snr:
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def multistep_sigma_table(
    schedule: Schedule,
    prediction_type: str,
    use_karras_sigmas: bool,
    num_inference_steps: int | None,
    timesteps: Sequence[int] | None,
) -> np.ndarray:
    """``sigma_table`` after the refusals DPM-Solver++ and UniPC make first, in their order."""
    refuse_epsilon_at_zero_snr(schedule, prediction_type)
    if use_karras_sigmas and schedule.zero_terminal_snr:
        raise ValueError(
            "use_karras_sigmas=True needs a finite largest sigma, and this schedule has a zero terminal SNR "
            "(sigma_T = infinity): turn use_karras_sigmas or rescale_betas_zero_snr off"
        )
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    return sigma_table(schedule)


def check_finite_sigmas(ts: np.ndarray, sigmas: np.ndarray) -> None:
    """Refuse a run through a trained a_bar of 0 (an infinite sigma)."""
    if not np.isfinite(sigmas).all():
        raise ValueError(
            f"a_bar = 0 at timestep {ts[~np.isfinite(sigmas)][0]} of this run (infinite sigma): trained_betas "
            "reach 1 before the last timestep"
        )


def with_final_sigma(sigmas: np.ndarray, final_sigmas_type: str, table: np.ndarray) -> np.ndarray:
    """(S + 1,) float64: the run's sigmas and where the last step goes, 0 (``final_sigmas_type="zero"``)
    or the table's smallest sigma ("sigma_min")."""
    final = 0.0 if final_sigmas_type == "zero" else table[0]
    return np.concatenate([sigmas, [final]]).astype(np.float64)


def dpm_timesteps(
    sigma_table: np.ndarray, n: int, spacing: str, steps_offset: int = 0, lambda_min_clipped: float = -math.inf
) -> np.ndarray:
    """Descending int64 timesteps as ``DPMSolverMultistepScheduler.set_timesteps`` picks them
    (its spacings differ from DDPM's: linspace drops t = 0, leading divides by n + 1), below the
    first timestep whose half log-SNR falls under ``lambda_min_clipped``."""
    T = len(sigma_table)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
    lambdas = -np.log(sigma_table)  # decreasing in t
    last = T - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:  # trailing; diffusers' float arange can yield n + 1 values (the last -1): keep n
        ts = np.arange(last, 0, -T / n).round()[:n].astype(np.int64) - 1
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps past {T - 1}")
    return ts.copy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: n sigmas from sigma_max down to sigma_min, evenly in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Continuous timesteps of the sigmas: log sigma interpolated in the table (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_table[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ---------------------------------------------------------------- the step's coefficients (float64, host)
def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of a noise level: x_t = alpha x_0 + sigma_vp eps."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def x0_conversion(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(p, q) with x0 = p x_t + q out for the model output ``out`` at noise level sigma."""
    alpha, sigma_vp = vp_coefficients(sigma)
    if prediction_type == "epsilon":  # x0 = (x - sigma_vp eps) / alpha
        return 1.0 / alpha, -sigma_vp / alpha
    if prediction_type == "sample":
        return 0.0, 1.0
    return alpha, -sigma_vp  # v_prediction: x0 = alpha x - sigma_vp v


def update_coefficients(
    sigmas: np.ndarray, s: int, order: int, algorithm_type: str, solver_type: str
) -> tuple[float, np.ndarray, float]:
    """(a, b, c) of step s: x_next = a x_t + b[0] m0 + b[1] m1 + b[2] m2 + c z, where m_j is the
    x0 prediction of step s - j and ``sigmas`` the (S + 1,) noise levels.

    DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): the first-order step is eq. 5's DDIM form;
    orders 2 and 3 add the finite differences D1, D2 of the m's in lambda (the multistep Algorithm 2
    and its third-order form in the DPM-Solver code); "sde-dpmsolver++" is the SDE variant (Sec. 5
    there), each term as diffusers' ``*_order_update`` writes it. sigma_next = 0 (only into a zero
    final sigma, always at order 1) means h = infinity: exp(-h) = 0.
    """
    alpha_t, sigma_t = vp_coefficients(sigmas[s + 1])
    _, sigma_s0 = vp_coefficients(sigmas[s])
    if sigmas[s + 1] > 0:
        h = math.log(sigmas[s] / sigmas[s + 1])
        em1, e2 = math.expm1(-h), -math.expm1(-2.0 * h)  # exp(-h) - 1, 1 - exp(-2h)
    else:
        h, em1, e2 = math.inf, -1.0, 1.0
    # m0, m1, m2 -> D0, D1, D2 (vectors over m0, m1, m2)
    d0, d1, d2 = np.array([1.0, 0.0, 0.0]), np.zeros(3), np.zeros(3)
    if order == 2:
        r0 = math.log(sigmas[s - 1] / sigmas[s]) / h
        d1 = np.array([1.0, -1.0, 0.0]) / r0
    elif order == 3:
        r0 = math.log(sigmas[s - 1] / sigmas[s]) / h
        r1 = math.log(sigmas[s - 2] / sigmas[s - 1]) / h
        d1_0, d1_1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if algorithm_type == "dpmsolver++":
        a, c = sigma_t / sigma_s0, 0.0
        k0 = -alpha_t * em1
        if order == 2 and solver_type == "midpoint":
            k1, k2 = -0.5 * alpha_t * em1, 0.0
        else:
            k1 = alpha_t * (em1 / h + 1.0) if order > 1 else 0.0
            k2 = -alpha_t * ((em1 + h) / h**2 - 0.5) if order == 3 else 0.0
    else:  # sde-dpmsolver++
        a, c = sigma_t / sigma_s0 * (sigmas[s + 1] / sigmas[s]), sigma_t * math.sqrt(e2)
        k0 = alpha_t * e2
        if order == 2 and solver_type == "midpoint":
            k1, k2 = 0.5 * alpha_t * e2, 0.0
        else:
            k1 = alpha_t * (e2 / (-2.0 * h) + 1.0) if order > 1 else 0.0
            k2 = alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if order == 3 else 0.0
    return a, k0 * d0 + k1 * d1 + k2 * d2, c


# ---------------------------------------------------------------- float64 reference of one step
def reference_step(
    solver: DPMSolverMultistep,
    sigmas: Sequence[float] | torch.Tensor,
    step: int,
    order: int,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    previous_x0: Sequence[torch.Tensor] = (),
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step written as diffusers writes it (convert to x0, threshold, then the order's update
    on x0 predictions), with float64 scalars and the tensors in sample's compute dtype (float32,
    or float64 for float64 input). ``previous_x0``: m1, m2 (newest first), as earlier steps
    returned them. Returns (prev_sample, m0), both in the compute dtype."""
    cd = compute_dtype(sample)
    f64 = lambda v: torch.as_tensor(float(v), dtype=torch.float64)  # noqa: E731
    to_alpha_sigma = lambda sig: (1 / (sig**2 + 1) ** 0.5, sig / (sig**2 + 1) ** 0.5)  # noqa: E731
    x = sample.to(cd)
    out = model_output.to(cd)[:, : x.shape[1]]
    alpha_s0, sigma_s0 = to_alpha_sigma(f64(sigmas[step]))
    if solver.prediction_type == "epsilon":
        m0 = (x - sigma_s0 * out) / alpha_s0
    elif solver.prediction_type == "sample":
        m0 = out
    else:
        m0 = alpha_s0 * x - sigma_s0 * out
    if solver.thresholding:
        m0 = dynamic_threshold(m0, solver.dynamic_thresholding_ratio, solver.sample_max_value)
    m = [m0, *(p.to(cd) for p in previous_x0)]

    alpha_t, sigma_t = to_alpha_sigma(f64(sigmas[step + 1]))
    lam = lambda k: torch.log(to_alpha_sigma(f64(sigmas[k]))[0]) - torch.log(to_alpha_sigma(f64(sigmas[k]))[1])  # noqa: E731
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf into sigma = 0
    h = lambda_t - lam(step)
    D = [m[0]]
    if order == 2:
        r0 = (lam(step) - lam(step - 1)) / h
        D.append((1.0 / r0) * (m[0] - m[1]))
    elif order == 3:
        r0, r1 = (lam(step) - lam(step - 1)) / h, (lam(step - 1) - lam(step - 2)) / h
        D1_0, D1_1 = (1.0 / r0) * (m[0] - m[1]), (1.0 / r1) * (m[1] - m[2])
        D += [D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1), (1.0 / (r0 + r1)) * (D1_0 - D1_1)]
    midpoint = order == 2 and solver.solver_type == "midpoint"
    if solver.algorithm_type == "dpmsolver++":
        x_next = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D[0]
        if midpoint:
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D[1]
        elif order > 1:
            x_next = x_next + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D[1]
        if order == 3:
            x_next = x_next - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D[2]
    else:
        x_next = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * D[0]
        if midpoint:
            x_next = x_next + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D[1]
        elif order > 1:
            x_next = x_next + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D[1]
        if order == 3:
            x_next = x_next + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D[2]
        if noise is not None:
            x_next = x_next + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise.to(cd)
    return x_next, m0
