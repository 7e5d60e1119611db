"""The solver interface: a solver turns (schedule, its options, timesteps) into a ``SolverPlan``
of float64 per-step coefficients, computed once on the host and moved once to the device; every
step of every solver is then the same linear update (DESIGN.md, "Decided later"):

    D_0    = limit(p_s x_t + q_s out)                       the model output converted (x0 or eps)
    x_next = a_s x_t + e_s out + d_s D_0 + sum_j b_sj H_j + c_s z

``out`` is the model output, ``limit`` the optional x0 clip / dynamic threshold, ``H`` a ring of
fixed buffers holding the earlier steps' D (the multistep history) and ``z`` standard normal
noise. Without a limit the conversion is folded into the coefficients (d_s = 0, a_s and e_s take
it), so the update reads x_t, out and the history once; D_0 is still computed, to be stored for
the next steps. ``apply_step`` is that update in plain PyTorch: the reference of the fused kernel
to come, written so that a CUDA graph can capture it (the step index may be a device tensor, the
history has a fixed shape, nothing reads a tensor value on the host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..reference import compute_dtype, dynamic_threshold
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


def schedule_from_dict(config: Mapping[str, Any], device: torch.device | str = "cpu") -> Schedule:
    """Our float64 ``Schedule`` from the noise-schedule keys of any diffusers scheduler config."""
    return Schedule.from_config(SchedulerConfig(**{k: config[k] for k in SCHEDULE_KEYS if k in config}), device=device)


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


@dataclass(frozen=True, eq=False)
class SolverPlan:
    """One sampling run's steps, precomputed. S steps, R history slots.

    Tensors on one device; coefficients float64, indexed by the step s:
        timesteps (S,) int64: the model's t at each step.
        to_d_x, to_d_out (S,): D_0 = to_d_x x_t + to_d_out out (before ``x0_limit``).
        x_coef, out_coef, d0_coef, noise_coef (S,): a_s, e_s, d_s, c_s of the update.
        hist_coef (S, R): b_s per history slot (zero where a slot is not used at step s).
        write_slot (S,) int64: the slot that D_0 goes into after the update (unused when R = 0).
        sigmas (S + 1,): the noise level sigma = sqrt((1 - a_bar) / a_bar) before each step and
            after the last (inspection and float64 references; the update does not read it).
    Host values:
        orders: the multistep order used at each step.
        x0_limit: the clip / threshold applied to D_0 (which is then an x0 prediction), or None.
        init_noise_sigma: x_T = init_noise_sigma * z, as diffusers' pipelines scale their noise.
        stochastic: whether any step adds noise (``run`` then draws z at every step, as diffusers
            does); kept on the host so that nothing reads the device to know it.
        learned_variance: the model output may carry 2C channels, of which the first C are used.
    """

    timesteps: torch.Tensor
    to_d_x: torch.Tensor
    to_d_out: torch.Tensor
    x_coef: torch.Tensor
    out_coef: torch.Tensor
    d0_coef: torch.Tensor
    hist_coef: torch.Tensor
    noise_coef: torch.Tensor
    write_slot: torch.Tensor
    sigmas: torch.Tensor
    orders: tuple[int, ...]
    stochastic: bool
    x0_limit: X0Limit | None = None
    init_noise_sigma: float = 1.0
    learned_variance: bool = False

    COEFFICIENTS = ("to_d_x", "to_d_out", "x_coef", "out_coef", "d0_coef", "noise_coef")

    def __post_init__(self) -> None:
        n = self.timesteps.shape[0]
        if self.timesteps.dtype != torch.int64 or self.timesteps.shape != (n,) or n == 0:
            raise ValueError(
                f"timesteps must be a non-empty int64 (S,) tensor, got {self.timesteps.dtype} "
                f"{tuple(self.timesteps.shape)}"
            )
        device = self.timesteps.device
        for name in (*self.COEFFICIENTS, "hist_coef", "sigmas", "write_slot"):
            t = getattr(self, name)
            want = {"hist_coef": (n, t.shape[-1]), "sigmas": (n + 1,)}.get(name, (n,))
            dtype = torch.int64 if name == "write_slot" else torch.float64
            if t.shape != want or t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"plan.{name}: expected {dtype} {want} on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        if len(self.orders) != n:
            raise ValueError(f"plan.orders has {len(self.orders)} entries for {n} steps")

    @classmethod
    def from_host(cls, *, device: torch.device | str, **fields: Any) -> SolverPlan:
        """Build from numpy arrays (float64 coefficients, int timesteps and slots), moved once to
        ``device``; ``stochastic`` is read from the host's noise coefficients."""
        tensors = {"stochastic": bool(np.any(fields["noise_coef"]))}
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                dtype = torch.int64 if name in ("timesteps", "write_slot") else torch.float64
                value = torch.as_tensor(np.ascontiguousarray(value), dtype=dtype).to(device)
            tensors[name] = value
        return cls(**tensors)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def history_slots(self) -> int:
        return self.hist_coef.shape[1]

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


def new_history(plan: SolverPlan, x: torch.Tensor) -> torch.Tensor:
    """Zeroed history buffers (R, *x.shape) in x's dtype (zero: an unused slot must not hold NaN)."""
    return x.new_zeros((plan.history_slots, *x.shape))


def apply_step(
    plan: SolverPlan,
    step: int | torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One planned step x_t -> x_next (returned in x's dtype); stores D_0 into ``history`` in place.

    x: (N, C, ...); model_output: shaped like x (or (N, 2C, ...) with a learned variance);
    history: (R, *x.shape) from ``new_history``; noise: shaped like x, or None to add none (``run``
    passes it at every step of a stochastic plan). ``step``: a Python int or a
    0-dim int64 tensor on the plan's device (no host read either way). Computes in float32
    (float64 for float64 x), as ``reference.posterior_step`` does.
    """
    cd = compute_dtype(x)
    channels = x.shape[1]
    if model_output.shape[1] != channels:
        if not (plan.learned_variance and model_output.shape[1] == 2 * channels):
            raise ValueError(f"model output has {model_output.shape[1]} channels, the sample {channels}")
        model_output = model_output[:, :channels]
    if model_output.shape != x.shape:
        raise ValueError(f"model output shape {tuple(model_output.shape)} != sample shape {tuple(x.shape)}")
    shape = (-1, *([1] * x.dim()))

    def coef(name: str) -> torch.Tensor:
        return getattr(plan, name)[step].to(cd)

    xc, out = x.to(cd), model_output.to(cd)
    d0 = coef("to_d_x") * xc + coef("to_d_out") * out
    if plan.x0_limit is not None:
        d0 = plan.x0_limit(d0)
    x_next = coef("x_coef") * xc + coef("out_coef") * out + coef("d0_coef") * d0
    if plan.history_slots:
        x_next = x_next + (plan.hist_coef[step].to(cd).reshape(shape) * history.to(cd)).sum(0)
        history.index_copy_(0, plan.write_slot[step].reshape(1), d0.to(history.dtype).unsqueeze(0))
    if noise is not None:
        x_next = x_next + coef("noise_coef") * noise.to(cd)
    return x_next.to(x.dtype)


def run(
    model: Callable[..., Any],
    x_T: torch.Tensor,
    plan: SolverPlan,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The whole sampling loop over a plan, in plain PyTorch; returns the final sample (x_T's dtype).

    x_T: (N, C, ...) standard normal noise (scaled here by ``plan.init_noise_sigma``). The model is
    called as ``model(x, t)`` with t int64 (N,); a returned object's ``.sample`` is read (diffusers'
    UNet2DModel). ``noise_fn(x)`` returns fresh noise shaped like x; a stochastic plan calls it once
    per step after the model, as diffusers' ``step`` draws (pass one that draws from the same
    generator to reproduce diffusers' noise).
    """
    stochastic = plan.stochastic
    if stochastic and noise_fn is None:
        raise ValueError("this plan adds noise: pass noise_fn")
    plan = plan.to(x_T.device)
    x = x_T * plan.init_noise_sigma
    history = new_history(plan, x)
    batch = x.shape[0]
    for s in range(plan.num_steps):
        out = model(x, plan.timesteps[s].expand(batch))
        out = getattr(out, "sample", out)
        noise = noise_fn(x) if stochastic else None
        x = apply_step(plan, s, x, out, history, noise)
    return x
