"""The solver interface: a solver turns (schedule, its options, timesteps) into a ``SolverPlan``
of float64 per-step coefficients, computed once on the host and moved once to the device; every
step (one model call) of every linear solver is then the same update (DESIGN.md, "Decided later"):

    D_0 = limit(p_s x + q_s out)             the model output converted (an x0 or eps prediction)
    v   = [x, out, D_0, z, H_0, ..., H_{R-1}]
    x_next = sum_c mix[s, 0, c] v_c
    H[write_slot[s, k]] = sum_c mix[s, 1 + k, c] v_c      for k < W (all read before any write)

``x`` is the state (in the VP scaling: the model's input, so no ``scale_model_input``), ``out``
the model output, ``limit`` the optional x0 clip / dynamic threshold, ``z`` standard normal noise
and ``H`` R fixed buffers of what earlier steps stored (x0 predictions for multistep solvers, a
saved sample or a partial sum for Heun and UniPC) plus one scratch buffer, slot R, that is never
read: a row that writes nothing that step names slot R, so a captured CUDA graph can write
unconditionally (a fused kernel may skip it). Without a limit the conversion can be folded into
the x and out columns (the D_0 column then only feeds the writes).

``apply_step`` is that update in plain PyTorch: the reference of the fused kernel, written so that
a CUDA graph can capture it (the step index may be a device tensor, the history has a fixed shape,
nothing reads a tensor value on the host). Steps that are not linear in their inputs (a Langevin
corrector's per-sample step size) are marked in the plan and stepped by their solver's own code.

Guidance by a gradient g (classifier guidance, Dhariwal & Nichol 2021: g = s grad_x log p(y | x_t)):
it enters eps, eps' = eps - sqrt(1 - a_bar) g (their ``condition_score``), as a shift of the model
output, shift = guide_coef[s] g (``with_guidance``: the coefficient for the model's prediction type at
each step's noise level), applied after the limit as their code applies it after the x0 clip:
out' = out + shift, D_0' = limit(p x + q out) + q shift. One more input, no extra pass.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..reference import compute_dtype, dynamic_threshold, guidance_output_coef
from ..schedule import Schedule, SchedulerConfig

# The noise-schedule keys of a diffusers scheduler config (shared by every diffusers scheduler);
# prediction_type travels with them so that SchedulerConfig can refuse eps on a zero-terminal-SNR schedule.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
)

# Columns of the mix matrix; the history slots follow from column HIST on.
X, OUT, D0, NOISE, HIST = 0, 1, 2, 3, 4


def schedule_from_dict(config: Mapping[str, Any], device: torch.device | str = "cpu") -> Schedule:
    """Our float64 ``Schedule`` from the noise-schedule keys of any diffusers scheduler config."""
    return Schedule.from_config(SchedulerConfig(**{k: config[k] for k in SCHEDULE_KEYS if k in config}), device=device)


def options_from_config(cls: Any, config: Mapping[str, Any], unsupported: Mapping[str, Any], who: str) -> Any:
    """The solver dataclass ``cls`` made from a scheduler config dict: its fields are taken, the
    noise-schedule keys left to ``schedule_from_dict``; an ``unsupported`` option (name -> the
    value that means "off") raises when it is on; other keys warn, bar those starting with '_'
    (diffusers' own). ``who`` names the solver in both messages."""
    for name, off in unsupported.items():
        if name in config and config[name] != off:
            raise ValueError(f"{name}={config[name]!r} is not supported by ddpm_fast's {who}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(
        k for k in config if k not in fields and k not in SCHEDULE_KEYS and k not in unsupported and k[:1] != "_"
    )
    if unknown:  # stacklevel 3: the caller of the solver's from_config
        warnings.warn(f"ignoring scheduler config keys {who} does not use: {unknown}", stacklevel=3)
    return cls(**{k: v for k, v in config.items() if k in fields})


@dataclass(frozen=True)
class X0Limit:
    """What is done to each x0 prediction: ``"clip"`` clamps it to [-clip_range, clip_range];
    ``"dynamic"`` is Imagen's dynamic thresholding (per-sample quantile ``ratio`` of |x0|, clamped
    to [1, max_value]), as diffusers' ``_threshold_sample``."""

    kind: str
    clip_range: float = 1.0
    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "dynamic"):
            raise ValueError(f"unknown x0 limit kind {self.kind!r}; valid: clip, dynamic")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.kind == "dynamic":
            return dynamic_threshold(x0, self.ratio, self.max_value)
        return x0.clamp(-self.clip_range, self.clip_range)


def check_dynamic_thresholding(ratio: float, max_value: float) -> None:
    """Refuse the options of a dynamic threshold (diffusers' ``dynamic_thresholding_ratio``,
    ``sample_max_value``) that ``X0Limit("dynamic", ...)`` cannot take."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
    if max_value <= 0:
        raise ValueError(f"sample_max_value must be > 0, got {max_value}")


@dataclass(frozen=True, eq=False)
class SolverPlan:
    """One sampling run's model calls ("steps"), precomputed. S steps, R history slots, W writes.

    Tensors on one device, indexed by the step s:
        timesteps (S,) int64 or float32: the model's t at each step (float32 where diffusers
            passes fractional timesteps, e.g. Euler's linspace spacing).
        to_d_x, to_d_out (S,) float64: D_0 = to_d_x x + to_d_out out (before ``x0_limit``).
        mix (S, 1 + W, 4 + R) float64: row 0 makes x_next, row 1 + k the value written into slot
            ``write_slot[s, k]``; columns x, out, D_0, z, H_0..H_{R-1} (``X``, ``OUT``, ``D0``,
            ``NOISE``, ``HIST``).
        write_slot (S, W) int64 in [0, R]: R is the scratch slot (nothing is written that step).
        sigmas (S + 1,) float64: the noise level sigma = sqrt((1 - a_bar) / a_bar) at each step's
            input and after the last (inspection and float64 references; the update does not read it).
    Host values:
        orders: the solver order used at each step (1 where the notion does not apply).
        draws: whether step s takes fresh noise z (diffusers draws one randn of x's shape in each
            such step's ``step``, after the model call); ``stochastic`` is any of them.
        x0_limit: the clip / threshold applied to D_0 (which is then an x0 prediction), or None.
        init_noise_sigma: x_T = init_noise_sigma * z (the VP-scaled start: 1 for a start at the
            top of the schedule).
        learned_variance: the model output may carry 2C channels, of which the first C are used.
        langevin_snr: per step, 0.0 for a linear step, else the signal-to-noise ratio of a
            Langevin corrector step (the "pc" solver), which ``apply_step`` does not take.
        guide_coef (S,) float64 or None: with a guidance gradient g the step reads the model
            output out + guide_coef[s] g (``with_guidance``); None: the plan takes no guide.
    """

    timesteps: torch.Tensor
    to_d_x: torch.Tensor
    to_d_out: torch.Tensor
    mix: torch.Tensor
    write_slot: torch.Tensor
    sigmas: torch.Tensor
    orders: tuple[int, ...]
    draws: tuple[bool, ...]
    x0_limit: X0Limit | None = None
    init_noise_sigma: float = 1.0
    learned_variance: bool = False
    langevin_snr: tuple[float, ...] | None = None
    guide_coef: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.timesteps.shape[0]
        if self.timesteps.dtype not in (torch.int64, torch.float32) or self.timesteps.shape != (n,) or n == 0:
            raise ValueError(
                f"timesteps must be a non-empty int64 or float32 (S,) tensor, got {self.timesteps.dtype} "
                f"{tuple(self.timesteps.shape)}"
            )
        device = self.timesteps.device
        if self.mix.dim() != 3 or self.mix.shape[0] != n or self.mix.shape[2] < HIST:
            raise ValueError(f"plan.mix: expected (S, 1 + W, 4 + R) with S = {n}, got {tuple(self.mix.shape)}")
        writes, slots = self.mix.shape[1] - 1, self.mix.shape[2] - HIST
        want = {
            "to_d_x": ((n,), torch.float64),
            "to_d_out": ((n,), torch.float64),
            "mix": ((n, 1 + writes, HIST + slots), torch.float64),
            "write_slot": ((n, writes), torch.int64),
            "sigmas": ((n + 1,), torch.float64),
        }
        if self.guide_coef is not None:
            want["guide_coef"] = ((n,), torch.float64)
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"plan.{name}: expected {dtype} {shape} on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        for name in ("orders", "draws") + (("langevin_snr",) if self.langevin_snr is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"plan.{name} has {len(getattr(self, name))} entries for {n} steps")

    @classmethod
    def from_host(cls, *, device: torch.device | str, **fields: Any) -> SolverPlan:
        """Build from numpy arrays (float64 coefficients; int timesteps and slots, or float
        timesteps, kept as float32), moved once to ``device``; tuples and scalars as given."""
        tensors = {}
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                if name == "write_slot":
                    dtype = torch.int64
                elif name == "timesteps":
                    dtype = torch.int64 if np.issubdtype(value.dtype, np.integer) else torch.float32
                else:
                    dtype = torch.float64
                value = torch.as_tensor(np.ascontiguousarray(value), dtype=dtype).to(device)
            elif name in ("orders", "draws", "langevin_snr") and value is not None:
                value = tuple(value)
            tensors[name] = value
        return cls(**tensors)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def history_slots(self) -> int:
        """R: the history buffers a step can read (the ring holds R + 1, the last a scratch)."""
        return self.mix.shape[2] - HIST

    @property
    def num_writes(self) -> int:
        return self.mix.shape[1] - 1

    @property
    def stochastic(self) -> bool:
        return any(self.draws)

    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    def to(self, device: torch.device | str) -> SolverPlan:
        if torch.device(device) == self.device:
            return self
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


class Solver(Protocol):
    """A sampler's options (diffusers' names) that can plan a run on a schedule."""

    def plan(
        self,
        schedule: Schedule,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SolverPlan: ...


class PlanBuilder:
    """Host-side float64 arrays of a plan under construction: ``row(s, k)`` is the mix row that
    makes x_next (k = 0) or write k - 1; ``write(s, k, slot)`` names the slot of write k."""

    def __init__(self, steps: int, slots: int, writes: int):
        self.steps, self.slots, self.writes = steps, slots, writes
        self.to_d_x, self.to_d_out = np.zeros(steps), np.zeros(steps)
        self.mix = np.zeros((steps, 1 + writes, HIST + slots))
        self.write_slot = np.full((steps, writes), slots, dtype=np.int64)  # the scratch slot by default

    def row(self, s: int, k: int = 0) -> np.ndarray:
        return self.mix[s, k]

    def write(self, s: int, k: int, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range for {self.slots} history slots")
        self.write_slot[s, k] = slot

    def build(self, *, device: torch.device | str, **fields: Any) -> SolverPlan:
        return SolverPlan.from_host(
            device=device,
            to_d_x=self.to_d_x,
            to_d_out=self.to_d_out,
            mix=self.mix,
            write_slot=self.write_slot,
            **fields,
        )


def check_steps_for_order(solver_order: int, steps: int, num_inference_steps: int | None) -> None:
    """Refuse fewer steps than a multistep solver's order. diffusers lowers the order to the steps
    there are without a word, which silently runs another solver than the one asked for."""
    if steps >= solver_order:
        return
    given = (
        f"num_inference_steps={num_inference_steps} is"
        if num_inference_steps is not None
        else f"{steps} custom timestep{'s are' if steps != 1 else ' is'}"
    )
    raise ValueError(f"{given} fewer than solver_order={solver_order}: ask for solver_order <= {steps} or more steps")


def with_guidance(plan: SolverPlan, prediction_type: str) -> SolverPlan:
    """The plan taking a guidance gradient g: at step s the model output is shifted by c_s g (after
    the limit, ``apply_step``), c_s giving the output whose eps is eps - sqrt(1 - a_bar_s) g
    (``reference.guidance_output_coef``), with
    a_bar_s = 1 / (1 + sigma_s^2) the noise level of the step's input (``plan.sigmas``; the state
    is in the VP scaling). ``prediction_type``: what the model predicts (the solver's option)."""
    sigmas = plan.sigmas[:-1].detach().to("cpu", torch.float64)
    coef = guidance_output_coef(1.0 / (1.0 + sigmas * sigmas), prediction_type)
    if not torch.isfinite(coef).all():
        raise ValueError("guidance through eps needs a_bar > 0 at every step (this plan has a step at a_bar = 0)")
    return dataclasses.replace(plan, guide_coef=coef.to(plan.device))


def new_history(plan: SolverPlan, x: torch.Tensor) -> torch.Tensor:
    """Zeroed history buffers (R + 1, *x.shape) in x's dtype, the last the scratch slot (zero: an
    unused slot must not hold NaN, since a zero coefficient times NaN is NaN)."""
    return x.new_zeros((plan.history_slots + 1, *x.shape))


def split_output(plan: SolverPlan, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The model output's first C channels (a learned variance's 2C are allowed when the plan says so)."""
    channels = x.shape[1]
    if model_output.shape[1] != channels:
        if not (plan.learned_variance and model_output.shape[1] == 2 * channels):
            raise ValueError(f"model output has {model_output.shape[1]} channels, the sample {channels}")
        model_output = model_output[:, :channels]
    if model_output.shape != x.shape:
        raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x.shape)}")
    return model_output


def guide_shift(plan: SolverPlan, step: int | torch.Tensor, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """guide_coef[step] g in x's compute dtype: the shift of the model output by a guide."""
    if plan.guide_coef is None:
        raise ValueError("a guide was given but the plan takes none: make it with solvers.base.with_guidance")
    if guide.shape != x.shape:
        raise ValueError(f"guide has shape {tuple(guide.shape)}, expected {tuple(x.shape)}")
    cd = compute_dtype(x)
    return plan.guide_coef[step].to(cd) * guide.to(cd)


def apply_step(
    plan: SolverPlan,
    step: int | torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """One planned linear step x -> x_next (returned in x's dtype); does the plan's writes into
    ``history`` in place.

    x: (N, C, ...); model_output: shaped like x (or (N, 2C, ...) with a learned variance);
    history: (R + 1, *x.shape) from ``new_history``; noise: shaped like x, or None for none (the
    noise column is then skipped: pass it wherever ``plan.draws`` says). ``step``: a Python int or
    a 0-dim int64 tensor on the plan's device (no host read either way). Computes in float32
    (float64 for float64 x), as ``reference.posterior_step`` does. ``guide``: a guidance gradient
    shaped like x, for a plan from ``with_guidance``: after the limit, shift = guide_coef[step] g,
    out + shift and D_0 + to_d_out shift.
    """
    cd = compute_dtype(x)
    xc, out = x.to(cd), split_output(plan, x, model_output).to(cd)
    to_d_x, to_d_out = plan.to_d_x[step].to(cd), plan.to_d_out[step].to(cd)
    d0 = to_d_x * xc + to_d_out * out
    if plan.x0_limit is not None:
        d0 = plan.x0_limit(d0)
    if guide is not None:  # after the limit (the module docstring)
        shift = guide_shift(plan, step, x, guide)
        out = out + shift
        d0 = d0 + to_d_out * shift
    mix = plan.mix[step].to(cd)  # (1 + W, 4 + R)
    values = [xc, out, d0] + ([noise.to(cd)] if noise is not None else [])
    hist = history[: plan.history_slots].to(cd)
    shape = (-1, *([1] * x.dim()))
    rows = []
    for k in range(1 + plan.num_writes):
        r = sum(mix[k, c] * v for c, v in enumerate(values))
        if plan.history_slots:
            r = r + (mix[k, HIST:].reshape(shape) * hist).sum(0)
        rows.append(r)
    for k in range(plan.num_writes):  # after every read: a write may reuse a slot read this step
        history.index_copy_(0, plan.write_slot[step, k].reshape(1), rows[1 + k].to(history.dtype).unsqueeze(0))
    return rows[0].to(x.dtype)


def run(
    model: Callable[..., Any],
    x_T: torch.Tensor,
    plan: SolverPlan,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    step_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The whole sampling loop over a plan, in plain PyTorch; returns the final sample (x_T's dtype).

    x_T: (N, C, ...) standard normal noise (scaled here by ``plan.init_noise_sigma``). The model is
    called as ``model(x, t)`` with t (N,) of the plan's timestep dtype; a returned object's
    ``.sample`` is read (diffusers' UNet2DModel). ``noise_fn(x)`` returns fresh noise shaped like
    x; it is called after the model in every step that ``plan.draws`` marks, as diffusers' ``step``
    draws (pass one that draws from the same generator to reproduce diffusers' noise).
    ``step_fn``: the step (default ``apply_step``; a solver with non-linear steps passes its own).
    """
    if plan.stochastic and noise_fn is None:
        raise ValueError("this plan adds noise: pass noise_fn")
    if plan.langevin_snr is not None and any(plan.langevin_snr) and step_fn is None:
        raise ValueError("this plan has Langevin corrector steps: pass its solver's step_fn")
    step_fn = apply_step if step_fn is None else step_fn
    plan = plan.to(x_T.device)
    x = x_T * plan.init_noise_sigma
    history = new_history(plan, x)
    batch = x.shape[0]
    for s in range(plan.num_steps):
        out = model(x, plan.timesteps[s].expand(batch))
        out = getattr(out, "sample", out)
        noise = noise_fn(x) if plan.draws[s] else None
        x = step_fn(plan, s, x, out, history, noise)
    return x
