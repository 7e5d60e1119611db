"""The predictor-corrector sampler of score-based SDEs (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", arXiv:2011.13456) for VP (DDPM) models:
score_sde's ``get_pc_sampler`` with the ``reverse_diffusion`` predictor and the ``langevin``
corrector, run on the model's own discrete schedule with respaced timesteps.

Notation: a = a_bar_t at a step's timestep t, a' = a_bar at the next timestep of the run (1 after
the last: the clean data), alpha_t = 1 - beta_t the model's own one-step alpha. The model output is
converted to the noise prediction eps (linear in x and the output: ``PREDICTION_TYPES``) and to the
score s = -eps / sqrt(1 - a) (Song et al. eq. 8's score of the Gaussian perturbation kernel).

At each timestep t of the run, in score_sde's order (its ``pc_sampler`` loop: corrector first,
then predictor, both at t):

  corrector (``corrector_steps`` times, one model call each; score_sde's ``LangevinCorrector``):
      z ~ N(0, I);  g = s(x, t);  e = 2 alpha_t (snr ||z|| / ||g||)^2  (per sample: norms over C, H, W)
      x <- x + e g + sqrt(2 e) z
  predictor (one model call; score_sde's ``ReverseDiffusionPredictor``, Alg. 5 line 3 / eq. 47):
      b = 1 - a / a'                                the forward step's beta from t' to t
      x_mean = (2 - sqrt(1 - b)) x + b s  =  (2 - sqrt(1 - b)) x - b / sqrt(1 - a) eps
      x <- x_mean + sqrt(b) z                       (x_mean alone after the last, ``noise_removal``)

Why the reverse-diffusion predictor rather than score_sde's ``EulerMaruyamaPredictor``: it is
Euler-Maruyama on the reverse SDE written with the forward process's own discrete step
(x_t = sqrt(1 - b) x_t' + sqrt(b) z, so f = (sqrt(1 - b) - 1) x and G = sqrt(b): Song et al.
Appendix E), which needs only the model's a_bar table. score_sde's Euler-Maruyama reads a continuous
beta(t) that a trained, cosine or respaced discrete schedule does not have. With every training
timestep in the run b = beta_t and the step is exactly the paper's Algorithm 5 (VP SDE).

score_sde's defaults: ``snr`` 0.16, one corrector step (``n_steps_each``), ``noise_removal`` on
(configs/default_cifar10_configs.py). Differences from score_sde, on purpose: the Langevin step
size uses each sample's own norms, where score_sde averages ||z|| and ||g|| over the batch (so its
result depends on which images share a batch); the timesteps are the model's integer timesteps
chosen as diffusers' ``set_timesteps`` does (``timestep_spacing``, default "linspace": from T - 1
down to 0), where score_sde runs all N = 1000 continuous times from 1 to eps = 1e-3.

Accuracy (tests/test_solvers_pc.py, data N(0.3, 0.5^2) with its exact score): both updates are first
order in b and the Langevin steps are unadjusted (no Metropolis test), so the output variance is
high by ~6% at 100 steps without correctors (3% at 200, 0.6% at 1000), and by ~2.5% with them
(unadjusted Langevin's stationary variance is v (1 + alpha snr^2)), plus a part from the per-sample
norms that shrinks as 1 / D for D elements per sample (+7.7% in all at D = 64, +2.2% at D = 1024).
Plan on many steps (score_sde uses 1000). A zero-terminal-SNR schedule is refused (its first step
has b = 1, where the first-order step is far off).

The plan: one step per model call, S = n (corrector_steps + 1) for n timesteps. D_0 is the score at
every step (``to_d_x``, ``to_d_out``). A predictor row is a linear step, with the score folded
into the x and out columns (x_next = (A - K e_x) x - K e_out out + sqrt(b) z for
eps = e_x x + e_out out, A = 2 - sqrt(1 - b), K = b / sqrt(1 - a)) and a zero D_0 column. A Langevin
row (``langevin_snr`` = snr) holds 1 in the x column and 2 alpha_t snr^2 in the D_0 column, the step
size per unit (||z|| / ||D_0||)^2; nothing else. So a step is a Langevin step exactly where its D_0
column is non-zero, which ``pc_step`` reads on the device when the step index is a device tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..reference import compute_dtype
from ..schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, Schedule, normalize_choice, select_timesteps
from .base import D0, NOISE, OUT, PlanBuilder, SolverPlan, X, apply_step, options_from_config, split_output

VARIANCE_TYPES = (None, "learned", "learned_range")


@dataclass(frozen=True)
class PredictorCorrector:
    """Options of the "pc" sampler (score_sde's names where it has them, diffusers' otherwise).

    corrector_steps: Langevin steps (model calls) before each predictor step; 0 = predictor only
        (score_sde's ``n_steps_each``, corrector "none" for 0).
    snr: the Langevin corrector's signal-to-noise ratio r (its step size is 2 alpha_t (r ||z|| / ||g||)^2).
    noise_removal: the last predictor step returns its mean, without noise (score_sde's default).
    prediction_type, variance_type, timestep_spacing, steps_offset: as diffusers' schedulers.
    The noise schedule itself comes from the ``Schedule`` given to ``plan``.
    """

    corrector_steps: int = 1
    snr: float = 0.16
    noise_removal: bool = True
    prediction_type: str = "epsilon"
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.corrector_steps, bool) or not isinstance(self.corrector_steps, (int, np.integer)):
            raise ValueError(f"corrector_steps must be an int >= 0, got {self.corrector_steps!r}")
        if self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an int >= 0, got {self.corrector_steps!r}")
        set_("corrector_steps", int(self.corrector_steps))
        if isinstance(self.snr, bool) or not isinstance(self.snr, (int, float)) or not 0 < self.snr < math.inf:
            raise ValueError(f"snr must be a finite number > 0, got {self.snr!r}")
        set_("snr", float(self.snr))
        if not isinstance(self.noise_removal, bool):
            raise ValueError(f"noise_removal must be True or False, got {self.noise_removal!r}")
        set_("prediction_type", normalize_choice("prediction_type", self.prediction_type, PREDICTION_TYPES))
        set_("timestep_spacing", normalize_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS))
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {self.variance_type!r}; valid: None, learned, learned_range")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, (int, np.integer)):
            raise ValueError(f"steps_offset must be an int, got {self.steps_offset!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PredictorCorrector:
        """From a scheduler config dict: this solver's fields are taken, the noise-schedule keys
        left to ``base.schedule_from_dict``, other keys (not starting with '_') warn."""
        return options_from_config(cls, config, {}, "the pc sampler")

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan:
        """The plan of one run over ``num_inference_steps`` timesteps (chosen by
        ``timestep_spacing``) or custom descending ``timesteps``: n (corrector_steps + 1) model
        calls; tensors on ``device`` (default: the schedule's)."""
        if schedule.zero_terminal_snr:
            raise ValueError(
                "scheduler='pc' cannot sample a zero-terminal-SNR schedule: its first predictor step has beta = 1 "
                "(a_bar_T = 0), where the first-order reverse-diffusion step is far off; use another sampler"
            )
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        config = dataclasses.replace(
            schedule.config, timestep_spacing=self.timestep_spacing, steps_offset=int(self.steps_offset)
        )
        ts = select_timesteps(config, num_inference_steps, timesteps)
        alphas_cumprod = schedule.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
        betas = schedule.betas.detach().to("cpu", torch.float64).numpy()

        n, per_t = len(ts), self.corrector_steps + 1
        plan = PlanBuilder(n * per_t, slots=0, writes=0)
        step_ts, sigmas, draws, snrs = [], [], [], []
        for i, t in enumerate(ts):
            a = float(alphas_cumprod[t])
            a_next = float(alphas_cumprod[ts[i + 1]]) if i + 1 < n else 1.0
            e_x, e_out = eps_conversion(a, self.prediction_type)
            last = i == n - 1
            for k in range(per_t):
                s = i * per_t + k
                plan.to_d_x[s], plan.to_d_out[s] = -e_x / math.sqrt(1.0 - a), -e_out / math.sqrt(1.0 - a)
                row = plan.row(s)
                if k < self.corrector_steps:  # Langevin: x + e D_0 + sqrt(2 e) z, e = row[D0] (|z| / |D_0|)^2
                    row[X], row[D0] = 1.0, 2.0 * (1.0 - float(betas[t])) * self.snr**2
                    draws.append(True)
                    snrs.append(self.snr)
                else:
                    A, K, c = predictor_coefficients(a, a_next)
                    row[X], row[OUT] = A - K * e_x, -K * e_out
                    noisy = not (last and self.noise_removal)
                    row[NOISE] = c if noisy else 0.0
                    draws.append(noisy)
                    snrs.append(0.0)
                step_ts.append(t)
                sigmas.append(math.sqrt((1.0 - a) / a))
        sigmas.append(0.0)  # after the last step: the clean data (a' = 1)
        return plan.build(
            device=device if device is not None else schedule.device,
            timesteps=np.asarray(step_ts, dtype=np.int64),
            sigmas=np.asarray(sigmas, dtype=np.float64),
            orders=[1] * len(step_ts),
            draws=draws,
            learned_variance=self.variance_type is not None,
            langevin_snr=snrs,
        )


# ---------------------------------------------------------------- coefficients (float64, host)
def eps_conversion(a: float, prediction_type: str) -> tuple[float, float]:
    """(e_x, e_out) with eps = e_x x_t + e_out out for the model output ``out`` at a_bar = a."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":  # x_t = sqrt(a) x0 + sqrt(1 - a) eps
        return 1.0 / math.sqrt(1.0 - a), -math.sqrt(a) / math.sqrt(1.0 - a)
    return math.sqrt(1.0 - a), math.sqrt(a)  # v = sqrt(a) eps - sqrt(1 - a) x0


def predictor_coefficients(a: float, a_next: float) -> tuple[float, float, float]:
    """(A, K, c) of the reverse-diffusion step from a_bar = a to a_bar = a_next:
    x_next = A x - K eps + c z with b = 1 - a / a_next, A = 2 - sqrt(1 - b), K = b / sqrt(1 - a), c = sqrt(b)."""
    b = 1.0 - a / a_next
    return 2.0 - math.sqrt(1.0 - b), b / math.sqrt(1.0 - a), math.sqrt(b)


# ---------------------------------------------------------------- the step (PyTorch, on the device)
def pc_step(
    plan: SolverPlan,
    step: int | torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of a "pc" plan (the ``step_fn`` of ``base.run``): ``langevin_step`` on a corrector
    step, ``base.apply_step`` on a predictor step. Arguments and dtypes as ``apply_step``.

    With a Python int ``step`` the kind is chosen on the host. With a 0-dim int64 device tensor (a
    captured CUDA graph replaying every step) both are computed and ``torch.where`` keeps the one
    the plan's D_0 column marks, so nothing is read on the host; a step given no noise is then taken
    as linear (every Langevin step draws: pass noise wherever ``plan.draws`` says).
    """
    langevin = plan.langevin_snr is not None and any(plan.langevin_snr)
    if not isinstance(step, torch.Tensor):
        if langevin and plan.langevin_snr[step]:
            if noise is None:
                raise ValueError(f"step {step} is a Langevin corrector step: it needs noise")
            return langevin_step(plan, step, x, model_output, noise)
        return apply_step(plan, step, x, model_output, history, noise)
    linear = apply_step(plan, step, x, model_output, history, noise)
    if not langevin or noise is None:
        return linear
    return torch.where(plan.mix[step, 0, D0] != 0, langevin_step(plan, step, x, model_output, noise), linear)


def langevin_step(
    plan: SolverPlan, step: int | torch.Tensor, x: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """A Langevin corrector step x -> x + e g + sqrt(2 e) z, with g = D_0 the score and the step size
    e = mix[D0] (||z|| / ||g||)^2 per sample (norms over all but dim 0). x, noise: (N, C, ...);
    model_output shaped like x (or 2C channels with a learned variance). Computes in float32
    (float64 for float64 x) and returns x's dtype; no host read for a device ``step``. A zero score
    (||g|| = 0) makes an infinite step, as in score_sde."""
    cd = compute_dtype(x)
    xc, z = x.to(cd), noise.to(cd)
    out = split_output(plan, x, model_output).to(cd)
    g = plan.to_d_x[step].to(cd) * xc + plan.to_d_out[step].to(cd) * out
    n = x.shape[0]
    ratio = torch.linalg.vector_norm(z.reshape(n, -1), dim=1) / torch.linalg.vector_norm(g.reshape(n, -1), dim=1)
    size = plan.mix[step, 0, D0].to(cd) * ratio.square().reshape(-1, *([1] * (x.dim() - 1)))
    x_next = plan.mix[step, 0, X].to(cd) * xc + size * g + (2.0 * size).sqrt() * z
    return x_next.to(x.dtype)


# ---------------------------------------------------------------- float64 reference (the paper's formulas)
def reference_eps(prediction_type: str, x: torch.Tensor, out: torch.Tensor, a: float) -> torch.Tensor:
    """The noise prediction from a model output at a_bar = a (DDPM eq. 4: x = sqrt(a) x0 + sqrt(1 - a) eps;
    v = sqrt(a) eps - sqrt(1 - a) x0)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "sample":
        return (x - math.sqrt(a) * out) / math.sqrt(1.0 - a)
    return math.sqrt(a) * out + math.sqrt(1.0 - a) * x


def reference_sample(
    solver: PredictorCorrector,
    schedule: Schedule,
    timesteps: Sequence[int],
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    noise_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """score_sde's PC loop written from the paper, independent of the plan: for each t of the
    descending ``timesteps``, ``corrector_steps`` Langevin steps then one reverse-diffusion step
    (the module docstring's formulas). Tensors in x_T's compute dtype (float32, or float64 for
    float64 x_T), scalars float64; ``noise_fn(x)`` is called after the model wherever a step adds
    noise, in the plan's order. Returns the sample in the compute dtype."""
    cd = compute_dtype(x_T)
    x = x_T.to(cd)
    ts = [int(t) for t in timesteps]
    alphas_cumprod = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    alphas = 1.0 - schedule.betas.detach().to("cpu", torch.float64)
    n = x.shape[0]
    norm = lambda v: torch.linalg.vector_norm(v.reshape(n, -1), dim=1).reshape(-1, *([1] * (v.dim() - 1)))  # noqa: E731

    def eps_at(x: torch.Tensor, t: int, a: float) -> torch.Tensor:
        out = model(x, torch.full((n,), t, dtype=torch.int64, device=x.device))
        out = getattr(out, "sample", out).to(cd)[:, : x.shape[1]]
        return reference_eps(solver.prediction_type, x, out, a)

    for i, t in enumerate(ts):
        a = alphas_cumprod[t].item()
        for _ in range(solver.corrector_steps):  # Langevin corrector (score_sde's LangevinCorrector, per sample)
            g = -eps_at(x, t, a) / math.sqrt(1.0 - a)
            z = noise_fn(x).to(cd)
            e = 2.0 * alphas[t].item() * (solver.snr * norm(z) / norm(g)) ** 2
            x = x + e * g + torch.sqrt(2.0 * e) * z
        # reverse-diffusion predictor (Alg. 5 line 3 with s = -eps / sqrt(1 - a))
        eps = eps_at(x, t, a)
        a_next = alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        b = 1.0 - a / a_next
        x_mean = (2.0 - math.sqrt(1.0 - b)) * x - (b / math.sqrt(1.0 - a)) * eps
        x = x_mean if (i == len(ts) - 1 and solver.noise_removal) else x_mean + math.sqrt(b) * noise_fn(x).to(cd)
    return x
