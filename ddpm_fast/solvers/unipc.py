"""UniPC multistep (Zhao et al. 2023, arXiv:2302.04867), as diffusers' ``UniPCMultistepScheduler``
steps it: the predictor UniP-p and the corrector UniC-p with B(h) = h ("bh1") or e^h - 1 ("bh2"),
orders 1-3, on x0 predictions (``predict_x0=True``, the data-prediction form) or eps predictions;
lower-order final steps, Karras sigmas, both final sigma types, dynamic thresholding, every
prediction type, ``disable_corrector``.

Notation as dpmsolver.py: sigma = sqrt((1 - a_bar) / a_bar), alpha = 1 / sqrt(1 + sigma^2),
sigma_vp = sigma alpha, lambda = -log(sigma), h = lambda_next - lambda_now. Step s (one model
call on x_s, the predictor's output of step s - 1) in diffusers' order:

    m_s   = convert(out_s, x_s)                                  (x0 or eps prediction, D_0)
    x_s^c = UniC(x_{s-1}^c; m_{s-1}, ..., m_{s-q}; m_s)         (q = step s - 1's order; x_s^c = x_s
                                                                  at s = 0 or where disabled)
    x_s+1 = UniP(x_s^c; m_s, ..., m_{s-p+1})                     (p = step s's order)

Both updates are linear in their inputs (their rhos come from small linear solves on the sigmas
alone), so the whole step is one mix over [x, out, D_0, z, H]: the history holds the last
``solver_order`` predictions in a ring (m_j in slot j mod solver_order) and x_s^c in slot
``solver_order``, the two writes of each step. ``uni_coefficients`` is UniP / UniC's maths in
float64 on the host; ``reference_step`` is one step written as diffusers writes it (the float64
oracle of the folded plan).

Where this differs from diffusers (0.42), on purpose: the table is float64 and trailing spacing
keeps n timesteps, as in dpmsolver.py; the order-1 step into sigma = 0 is the update's limit
h -> infinity (the x0 prediction: x / alpha - sigma eps in the eps form), where diffusers' bh1 and
eps forms compute inf * 0 = NaN (its bh2 x0 form gives that limit exactly); a higher-order step
into sigma = 0 (``lower_order_final=False`` with ``final_sigmas_type="zero"``) is refused, where
diffusers returns inf or fails to solve a singular system; repeated sigmas under an order > 1
update are refused, and so are fewer steps than ``solver_order`` (diffusers lowers the order to
the steps there are). Custom ``timesteps`` (which diffusers' UniPC ``set_timesteps`` does not take)
use the table's sigmas at those timesteps. ``solver_p``, ``flow_prediction`` and the exponential /
beta / flow sigmas are refused; ``thresholding`` is ignored with ``predict_x0=False``, as diffusers
ignores it.
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
    OUT,
    PlanBuilder,
    SolverPlan,
    X,
    X0Limit,
    check_dynamic_thresholding,
    check_steps_for_order,
    options_from_config,
)
from .dpmsolver import (
    check_finite_sigmas,
    dpm_timesteps,
    karras_sigmas,
    multistep_sigma_table,
    sigma_to_t,
    vp_coefficients,
    with_final_sigma,
    x0_conversion,
)

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers options this solver does not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "solver_p": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}


@dataclass(frozen=True)
class UniPCMultistep:
    """The options of ``UniPCMultistepScheduler`` beyond the noise schedule, with diffusers' names
    and defaults. ``disable_corrector``: the step indices s whose *following* step skips UniC
    (diffusers tests ``step_index - 1 in disable_corrector``). The noise schedule itself comes from
    the ``Schedule`` given to ``plan``."""

    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.solver_order, bool) or self.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.solver_type in ("midpoint", "heun", "logrho"):  # diffusers maps them so
            set_("solver_type", "bh2")
        set_("solver_type", normalize_choice("solver_type", self.solver_type, SOLVER_TYPES))
        set_("final_sigmas_type", normalize_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES))
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        disabled = tuple(self.disable_corrector)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in disabled):
            raise ValueError(f"disable_corrector must be a list of step indices (ints), got {self.disable_corrector!r}")
        set_("disable_corrector", tuple(int(i) for i in disabled))
        check_dynamic_thresholding(self.dynamic_thresholding_ratio, self.sample_max_value)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UniPCMultistep:
        """From a diffusers ``UniPCMultistepScheduler`` config (``dict(scheduler.config)``).

        The noise-schedule keys are left to ``base.schedule_from_dict``; an option this solver does
        not implement raises when it is on; other keys (not starting with '_') warn."""
        return options_from_config(cls, config, UNSUPPORTED_OPTIONS, "UniPC")

    @property
    def thresholded(self) -> bool:
        """Whether the x0 predictions are thresholded (diffusers thresholds only in the x0 form)."""
        return self.thresholding and self.predict_x0

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
        check_steps_for_order(self.solver_order, len(ts), num_inference_steps)
        return self._plan_from_sigmas(ts, sigmas, device if device is not None else schedule.device)

    def timesteps_and_sigmas(
        self, schedule: Schedule, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(S,) int64 timesteps and (S + 1,) float64 sigmas, as diffusers' ``set_timesteps``."""
        table = multistep_sigma_table(
            schedule, self.prediction_type, self.use_karras_sigmas, num_inference_steps, timesteps
        )
        if timesteps is not None and self.use_karras_sigmas:  # diffusers' UniPC takes no custom timesteps
            raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True")
        if timesteps is not None:
            ts = select_timesteps(schedule.config, None, timesteps)
            sigmas = table[ts]
        elif self.use_karras_sigmas:
            sigmas = karras_sigmas(table[0], table[-1], num_inference_steps)
            ts = sigma_to_t(sigmas, np.log(table)).round().astype(np.int64)  # UniPC rounds for every schedule
        else:
            ts = dpm_timesteps(table, num_inference_steps, self.timestep_spacing, self.steps_offset)
            sigmas = table[ts]
        check_finite_sigmas(ts, sigmas)
        return ts, with_final_sigma(sigmas, self.final_sigmas_type, table)

    def step_orders(self, num_steps: int) -> tuple[int, ...]:
        """The predictor's order at each step, as diffusers' ``step`` chooses it (warm-up from
        order 1; with ``lower_order_final`` at most the number of steps left, whatever their count)."""
        left = lambda s: num_steps - s if self.lower_order_final else self.solver_order  # noqa: E731
        return tuple(min(self.solver_order, left(s), s + 1) for s in range(num_steps))

    def corrector_orders(self, num_steps: int) -> tuple[int, ...]:
        """The corrector's order at each step (the previous step's predictor order), 0 where UniC
        is not applied (step 0, and step s where s - 1 is in ``disable_corrector``)."""
        orders = self.step_orders(num_steps)
        return tuple(0 if s == 0 or s - 1 in self.disable_corrector else orders[s - 1] for s in range(num_steps))

    def _plan_from_sigmas(self, ts: np.ndarray, sigmas: np.ndarray, device: torch.device | str) -> SolverPlan:
        """Row 0: x_next = UniP(x_s^c; D_0, ring), with x_s^c = UniC(H[saved]; ring; D_0) or x. The
        writes: D_0 into ring slot s mod solver_order, x_s^c into the saved-sample slot, each only
        where a later step reads it (else the scratch slot)."""
        n = len(ts)
        orders, corrector = self.step_orders(n), self.corrector_orders(n)
        if sigmas[-1] == 0 and orders[-1] > 1:
            raise ValueError(
                f"lower_order_final=False with final_sigmas_type='zero': the last step is of order {orders[-1]} into "
                "sigma = 0, where UniP divides by a zero step ratio (diffusers returns inf or fails to solve); use "
                "lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        ring, saved = self.solver_order, self.solver_order  # slots 0..ring-1: predictions; slot `saved`: x_s^c
        fold = not self.thresholded
        plan = PlanBuilder(n, ring + 1, writes=2)
        unit = lambda c: np.eye(HIST + ring + 1)[c]  # noqa: E731
        m = lambda j: unit(HIST + j % ring)  # noqa: E731 (m_j, j < s, from the ring)
        convert = x0_conversion if self.predict_x0 else eps_conversion
        update = lambda t, s0, k, corr: uni_coefficients(  # noqa: E731 (from sigma index s0 to t, order k)
            sigmas[t], sigmas[s0], sigmas[s0 - np.arange(1, k)], corr, self.solver_type, self.predict_x0
        )
        for s in range(n):
            p, q = convert(sigmas[s], self.prediction_type)
            plan.to_d_x[s], plan.to_d_out[s] = p, q
            m_s = p * unit(X) + q * unit(OUT) if fold else unit(D0)  # D_0, folded where it is linear
            x_c, k = unit(X), corrector[s]
            try:
                if k:
                    a, c = update(s, s - 1, k, True)
                    x_c = a * unit(HIST + saved) + sum(c[i] * m(s - 1 - i) for i in range(k)) + c[k] * m_s
                a, c = update(s + 1, s, orders[s], False)
            except (ZeroDivisionError, np.linalg.LinAlgError) as err:
                raise ValueError(
                    f"step {s} (t={ts[s]}): repeated sigmas (too many num_inference_steps for this spacing, or "
                    f"repeated custom timesteps) make an order > 1 UniPC update divide by a zero step in lambda"
                ) from err
            plan.row(s)[:] = a * x_c + c[0] * m_s + sum(c[i] * m(s - i) for i in range(1, orders[s]))
            if s + 1 < n:
                plan.row(s, 1)[D0] = 1.0
                plan.write(s, 0, s % ring)
            if s + 1 < n and corrector[s + 1]:
                plan.row(s, 2)[:] = x_c
                plan.write(s, 1, saved)
        limit = None
        if self.thresholded:
            limit = X0Limit("dynamic", ratio=self.dynamic_thresholding_ratio, max_value=self.sample_max_value)
        return plan.build(device=device, timesteps=ts, sigmas=sigmas, orders=orders, draws=[False] * n, x0_limit=limit)


# ---------------------------------------------------------------- the step's coefficients (float64, host)
def eps_conversion(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(p, q) with eps = p x_t + q out for the model output ``out`` at noise level sigma (the eps
    form, ``predict_x0=False``)."""
    alpha, sigma_vp = vp_coefficients(sigma)
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":  # eps = (x - alpha x0) / sigma_vp
        return 1.0 / sigma_vp, -alpha / sigma_vp
    return sigma_vp, alpha  # v_prediction: eps = alpha v + sigma_vp x


def uni_coefficients(
    sigma_t: float,
    sigma_s0: float,
    sigma_prev: Sequence[float] | np.ndarray,
    corrector: bool,
    solver_type: str,
    predict_x0: bool = True,
) -> tuple[float, np.ndarray]:
    """(a, c) of one UniP (``corrector=False``) or UniC update of order k = len(sigma_prev) + 1 from
    noise level sigma_s0 to sigma_t: x_t = a x + sum_j c[j] v_j over v = [m0, m_1, ..., m_{k-1}]
    (the predictions at sigma_s0 and at the earlier ``sigma_prev``, newest first) and, for UniC,
    the new prediction m_t at sigma_t last.

    As diffusers' ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``: with hh = -h (x0
    form) or h (eps form), r_i = (lambda_i - lambda_s0) / h (i < k) and r_k = 1,
    D1_i = (m_i - m0) / r_i, the rhos solve R rho = b with R[i, j] = r_j^(i-1) and
    b_i = i! hh phi_{i+1}(hh) / B(hh), i, j = 1..k (phi_1(x) = (e^x - 1) / x,
    phi_{i+1}(x) = (phi_i(x) - 1 / i!) / x); UniP takes the leading (k - 1) x (k - 1) system and
    rho = 1/2 at k = 2, UniC the whole system and rho = 1/2 at k = 1. Then
        x_t = a x - scale (e^hh - 1) m0 - scale B(hh) (sum_{i<k} rho_i D1_i [+ rho_k (m_t - m0)])
    with (a, scale) = (sigma_vp_t / sigma_vp_s0, alpha_t) in the x0 form, (alpha_t / alpha_s0,
    sigma_vp_t) in the eps form. A zero step in lambda under an order > 1 update raises
    ZeroDivisionError (or numpy's LinAlgError).
    """
    k = len(sigma_prev) + 1
    alpha_t, sv_t = vp_coefficients(sigma_t)
    alpha_s0, sv_s0 = vp_coefficients(sigma_s0)
    if sigma_t == 0:  # h = infinity: the limit, x0 = x / alpha - sigma eps (exp(-h) = 0)
        if corrector or k > 1:
            raise ValueError(f"an order-{k} {'UniC' if corrector else 'UniP'} update into sigma = 0 has no limit")
        return (0.0, np.array([1.0])) if predict_x0 else (1.0 / alpha_s0, np.array([-sigma_s0]))
    h = math.log(sigma_s0 / sigma_t)
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    a, scale = (sv_t / sv_s0, alpha_t) if predict_x0 else (alpha_t / alpha_s0, sv_t)
    c = np.zeros(k + corrector)
    c[0] = -scale * h_phi_1
    if k == 1 and not corrector:
        return a, c
    rks = np.array([math.log(sigma_s0 / s) / h for s in sigma_prev] + [1.0])
    if k == 1 or (k == 2 and not corrector):  # diffusers' fixed 1/2 (UniC-1, UniP-2)
        rhos = np.array([0.5])
    else:
        R = np.stack([rks**i for i in range(k)])
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
        for i in range(1, k + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        b = np.array(b)
        rhos = np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1])
    for i in range(k - 1):  # sum_i rho_i (m_i - m0) / r_i
        if rks[i] == 0:
            raise ZeroDivisionError("repeated sigmas")
        w = scale * b_h * rhos[i] / rks[i]
        c[1 + i] -= w
        c[0] += w
    if corrector:  # rho_k (m_t - m0)
        w = scale * b_h * rhos[-1]
        c[k] -= w
        c[0] += w
    return a, c


# ---------------------------------------------------------------- float64 reference of one step
def reference_step(
    solver: UniPCMultistep,
    sigmas: Sequence[float] | torch.Tensor,
    step: int,
    order: int,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    previous: Sequence[torch.Tensor] = (),
    last_sample: torch.Tensor | None = None,
    corrector_order: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step written as diffusers' ``step`` writes it (convert, threshold, UniC on the saved
    sample, then UniP), with float64 scalars and the tensors in sample's compute dtype (float32, or
    float64 for float64 input). ``previous``: m_{s-1}, m_{s-2}, ... (newest first) as earlier steps
    returned them; ``last_sample``: the previous step's corrected sample, or None for no UniC
    (then ``corrector_order`` is unused). Returns (prev_sample, m_s, the corrected sample)."""
    cd = compute_dtype(sample)
    x = sample.to(cd)
    out = model_output.to(cd)
    alpha, sigma_vp = _alpha_sigma(sigmas[step])
    if solver.predict_x0:
        if solver.prediction_type == "epsilon":
            m = (x - sigma_vp * out) / alpha
        elif solver.prediction_type == "sample":
            m = out
        else:
            m = alpha * x - sigma_vp * out
        if solver.thresholding:
            m = dynamic_threshold(m, solver.dynamic_thresholding_ratio, solver.sample_max_value)
    elif solver.prediction_type == "epsilon":
        m = out
    elif solver.prediction_type == "sample":
        m = (x - alpha * out) / sigma_vp
    else:
        m = alpha * out + sigma_vp * x
    previous = [p.to(cd) for p in previous]
    if last_sample is not None:  # UniC: from the saved sample at step - 1 to here (x itself is not used)
        x = _uni_bh_update(solver, sigmas, step - 1, corrector_order, last_sample.to(cd), previous, model_t=m)
    return _uni_bh_update(solver, sigmas, step, order, x, [m, *previous]), m, x


def _alpha_sigma(sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = torch.as_tensor(float(sigma), dtype=torch.float64)
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _uni_bh_update(
    solver: UniPCMultistep,
    sigmas: Sequence[float] | torch.Tensor,
    s0: int,
    order: int,
    x: torch.Tensor,
    model_outputs: Sequence[torch.Tensor],
    model_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """diffusers' ``multistep_uni_p_bh_update`` (``model_t`` None) or ``multistep_uni_c_bh_update``
    from sigmas[s0] to sigmas[s0 + 1]; ``model_outputs``: m at s0, s0 - 1, ... (newest first)."""
    m0 = model_outputs[0]
    alpha_t, sigma_t = _alpha_sigma(sigmas[s0 + 1])
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[s0])
    if float(sigmas[s0 + 1]) == 0:  # h = inf: the limit (diffusers' bh1 and eps forms give inf * 0 = NaN)
        return m0 if solver.predict_x0 else x / alpha_s0 - (sigma_s0 / alpha_s0) * m0
    lam = lambda a, s: torch.log(a) - torch.log(s)  # noqa: E731
    lambda_s0 = lam(alpha_s0, sigma_s0)
    h = lam(alpha_t, sigma_t) - lambda_s0
    rks, D1s = [], []
    for i in range(1, order):
        rk = (lam(*_alpha_sigma(sigmas[s0 - i])) - lambda_s0) / h
        rks.append(rk)
        D1s.append((model_outputs[i] - m0) / rk)
    rks = torch.stack([*rks, torch.ones((), dtype=torch.float64)])
    hh = -h if solver.predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if solver.solver_type == "bh1" else torch.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R, b = torch.stack(R), torch.stack(b)
    if model_t is not None:  # UniC
        rhos = torch.full((1,), 0.5, dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
        res = sum(rhos[i] * D1s[i] for i in range(order - 1)) + rhos[-1] * (model_t - m0)
    else:  # UniP
        rhos = torch.full((1,), 0.5, dtype=torch.float64) if order <= 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        res = sum(rhos[i] * D1s[i] for i in range(order - 1))
    if solver.predict_x0:
        return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * B_h * res
    return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * B_h * res
